"""Independent float64 / arbitrary-precision references for the Gaussian KL tests.

Written directly from the textbook formula with NumPy/SciPy (explicit inverse and
slogdet, which the library never uses) and, for extreme or near-zero cases, mpmath.
"""

from __future__ import annotations

import mpmath
import numpy as np


def kl_full_np(mq, lq, mp, lp) -> float:
    """KL(N(mq, lq lqᵀ) || N(mp, lp lpᵀ)) for one example, float64, naive formula."""
    mq, lq, mp, lp = (np.asarray(a, np.float64) for a in (mq, lq, mp, lp))
    lq, lp = np.tril(lq), np.tril(lp)
    sq, sp = lq @ lq.T, lp @ lp.T
    sp_inv = np.linalg.inv(sp)
    dm = mp - mq
    k = mq.shape[-1]
    _, ldp = np.linalg.slogdet(sp)
    _, ldq = np.linalg.slogdet(sq)
    return 0.5 * (np.trace(sp_inv @ sq) + dm @ sp_inv @ dm - k + ldp - ldq)


def terms_full_np(mq, lq, mp, lp) -> tuple[float, float, float, float]:
    """(trace, mahalanobis, log_det_ratio, k) for one example, float64."""
    mq, lq, mp, lp = (np.asarray(a, np.float64) for a in (mq, lq, mp, lp))
    lq, lp = np.tril(lq), np.tril(lp)
    sq, sp = lq @ lq.T, lp @ lp.T
    sp_inv = np.linalg.inv(sp)
    dm = mp - mq
    return (np.trace(sp_inv @ sq), dm @ sp_inv @ dm,
            np.linalg.slogdet(sp)[1] - np.linalg.slogdet(sq)[1], float(mq.shape[-1]))


def kl_diag_mp(mq, vq, mp, vp, dps: int = 50) -> float:
    """Per-dimension-summed diagonal KL in arbitrary precision (returns a Python float)."""
    with mpmath.workdps(dps):
        total = mpmath.mpf(0)
        for a, b, c, d in zip(*(np.ravel(np.asarray(x, np.float64)) for x in (mq, vq, mp, vp))):
            a, b, c, d = (mpmath.mpf(float(x)) for x in (a, b, c, d))
            r = mpmath.exp(b - d)
            total += (r - 1 - (b - d) + (a - c) ** 2 * mpmath.exp(-d)) / 2
        return float(total)


def lognormal_pdf_np(x, mean, cov) -> np.ndarray:
    """log N(x; mean, cov) for rows of x, float64."""
    from scipy import stats

    return stats.multivariate_normal(mean=mean, cov=cov).logpdf(x)


def kl_chain_rule_np(mq, lq, mp, lp) -> np.ndarray:
    """[k] per-dimension KLs E_q[KL(q(zᵢ|z<ᵢ) || p(zᵢ|z<ᵢ))] from conditional Gaussians, float64."""
    mq, lq, mp, lp = (np.asarray(a, np.float64) for a in (mq, lq, mp, lp))
    sq, sp = np.tril(lq) @ np.tril(lq).T, np.tril(lp) @ np.tril(lp).T
    out = []
    for i in range(mq.shape[-1]):
        if i == 0:
            bq = bp = np.zeros(0)
            vq, vp = sq[0, 0], sp[0, 0]
        else:
            bq = np.linalg.solve(sq[:i, :i], sq[:i, i])
            bp = np.linalg.solve(sp[:i, :i], sp[:i, i])
            vq, vp = sq[i, i] - sq[i, :i] @ bq, sp[i, i] - sp[i, :i] @ bp
        # Conditional means: mq_i + bqᵀ(z − mq<i) and mp_i + bpᵀ(z − mp<i), z ~ q(z<i).
        c = mq[i] - mp[i] + bp @ (mp[:i] - mq[:i])
        b = bq - bp
        mean_sq = c**2 + b @ sq[:i, :i] @ b
        out.append(0.5 * (vq / vp - 1 - np.log(vq / vp) + mean_sq / vp))
    return np.array(out)


def _mp_matrices(mq, lq, mp, lp):
    """float64 NumPy inputs as exact mpmath vectors and (tril) matrices."""
    mq, lq, mp, lp = (np.asarray(a, np.float64) for a in (mq, lq, mp, lp))
    vec = lambda v: mpmath.matrix([mpmath.mpf(float(t)) for t in v])
    mat = lambda l: mpmath.matrix([[mpmath.mpf(float(l[i, j])) if j <= i else 0
                                    for j in range(l.shape[1])] for i in range(l.shape[0])])
    return vec(mq), mat(lq), vec(mp), mat(lp)


def kl_full_mp(mq, lq, mp, lp, dps: int = 60) -> float:
    """KL(N(mq, lq lqᵀ) || N(mp, lp lpᵀ)) for one example in arbitrary precision (naive formula).

    The inputs are read exactly (float32 values convert to float64 without rounding), so at
    60 digits the cancellation of the textbook formula near q = p is harmless.
    """
    with mpmath.workdps(dps):
        mq, lq, mp, lp = _mp_matrices(mq, lq, mp, lp)
        sq, sp = lq * lq.T, lp * lp.T
        sp_inv = mpmath.inverse(sp)
        dm = mp - mq
        k = sq.rows
        trace = sum((sp_inv * sq)[i, i] for i in range(k))
        maha = (dm.T * sp_inv * dm)[0, 0]
        return float((trace + maha - k + mpmath.log(mpmath.det(sp)) - mpmath.log(mpmath.det(sq))) / 2)


def kl_chain_rule_mp(mq, lq, mp, lp, dps: int = 60) -> np.ndarray:
    """[k] chain-rule per-dimension KLs (as :func:`kl_chain_rule_np`) in arbitrary precision."""
    with mpmath.workdps(dps):
        mq, lq, mp, lp = _mp_matrices(mq, lq, mp, lp)
        sq, sp = lq * lq.T, lp * lp.T
        out = []
        for i in range(sq.rows):
            if i == 0:
                vq, vp, c, mean_sq = sq[0, 0], sp[0, 0], mq[0] - mp[0], 0
            else:
                sub = lambda s: s[:i, :i]
                col = lambda s: s[:i, i]
                bq, bp = mpmath.lu_solve(sub(sq), col(sq)), mpmath.lu_solve(sub(sp), col(sp))
                vq = sq[i, i] - (col(sq).T * bq)[0, 0]
                vp = sp[i, i] - (col(sp).T * bp)[0, 0]
                c = mq[i] - mp[i] + (bp.T * (mp[:i, 0] - mq[:i, 0]))[0, 0]
                b = bq - bp
                mean_sq = (b.T * sub(sq) * b)[0, 0]
            out.append((vq / vp - 1 - mpmath.log(vq / vp) + (c**2 + mean_sq) / vp) / 2)
        return np.array([float(t) for t in out])
