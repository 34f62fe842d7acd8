"""Tests of vaekl.kl against independent references, Monte Carlo, quadrature and identities."""

from __future__ import annotations

import itertools

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from scipy import integrate, stats

import kl_reference as ref
from vaekl import kl

F32_RTOL = 1e-5


def _rand_tril(rng, shape, k, off_scale=0.3, log_sd=0.4):
    """Random well-conditioned lower Cholesky factors of shape [*shape, k, k], float32."""
    l = np.tril(off_scale * rng.standard_normal((*shape, k, k)), -1)
    diag = np.exp(log_sd * rng.standard_normal((*shape, k)))
    sign = rng.choice([-1.0, 1.0], size=(*shape, k))  # any sign convention is valid
    l = l + np.einsum("...i,ij->...ij", diag * sign, np.eye(k))
    return l.astype(np.float32)


def _rand_diag(rng, shape, k, mean_sd=1.0, log_var_sd=1.0):
    m = (mean_sd * rng.standard_normal((*shape, k))).astype(np.float32)
    v = (log_var_sd * rng.standard_normal((*shape, k))).astype(np.float32)
    return m, v


def _f64(a):
    return np.asarray(a, np.float64)


SHAPES = [((), 1), ((5,), 3), ((2, 3), 7), ((4,), 16), ((3, 1), 64)]


# ---------------------------------------------------------------------------
# Against an independent float64 reference.


@pytest.mark.parametrize("batch,k", SHAPES)
def test_std_normal_matches_reference(batch, k):
    rng = np.random.default_rng(k)
    m, v = _rand_diag(rng, batch, k)
    got = np.asarray(kl.kl_std_normal(m, v))
    assert got.shape == batch and got.dtype == np.float32
    want = 0.5 * np.sum(np.exp(_f64(v)) - 1 - _f64(v) + _f64(m) ** 2, -1)
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)


@pytest.mark.parametrize("batch,k", SHAPES)
def test_diag_matches_reference(batch, k):
    rng = np.random.default_rng(100 + k)
    mq, vq = _rand_diag(rng, batch, k)
    mp, vp = _rand_diag(rng, batch[-1:], k)  # a prior that broadcasts over leading axes
    got = np.asarray(kl.kl_diag(mq, vq, mp, vp))
    want = 0.5 * np.sum(np.exp(_f64(vq) - _f64(vp)) + (_f64(mp) - _f64(mq)) ** 2 / np.exp(_f64(vp))
                        - 1 + _f64(vp) - _f64(vq), -1)
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)


@pytest.mark.parametrize("batch,k", SHAPES[:4] + [((2,), 24)])
def test_full_matches_reference(batch, k):
    rng = np.random.default_rng(200 + k)
    mq, mp = (rng.standard_normal((*batch, k)).astype(np.float32) for _ in range(2))
    lq, lp = _rand_tril(rng, batch, k), _rand_tril(rng, batch, k, off_scale=0.1)
    got = np.asarray(kl.kl_full(mq, lq, mp, lp))
    assert got.shape == batch
    flat = [x.reshape(-1, *x.shape[len(batch):]) for x in (mq, lq, mp, lp)]
    want = np.array([ref.kl_full_np(*row) for row in zip(*flat)]).reshape(batch)
    np.testing.assert_allclose(got, want, rtol=F32_RTOL * max(1, k / 8))
    terms = kl.kl_full_terms(mq, lq, mp, lp)
    want_terms = np.array([ref.terms_full_np(*row) for row in zip(*flat)])
    for i, name in enumerate(kl.KLTerms._fields):
        np.testing.assert_allclose(np.asarray(getattr(terms, name)).reshape(-1), want_terms[:, i],
                                   rtol=F32_RTOL * max(1, k / 8), atol=1e-5, err_msg=name)


def test_full_std_normal_matches_reference():
    rng = np.random.default_rng(3)
    m = rng.standard_normal((6, 5)).astype(np.float32)
    l = _rand_tril(rng, (6,), 5)
    got = np.asarray(kl.kl_full_std_normal(m, l))
    want = [ref.kl_full_np(m[i], l[i], np.zeros(5), np.eye(5)) for i in range(6)]
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)


def test_univariate_matches_reference():
    rng = np.random.default_rng(4)
    mq, vq, mp, vp = (rng.standard_normal(50).astype(np.float32) for _ in range(4))
    got = np.asarray(kl.kl_normal(mq, vq, mp, vp))
    want = [kl_reference_1d(*row) for row in zip(mq, vq, mp, vp)]
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)


def kl_reference_1d(mq, vq, mp, vp):
    return ref.kl_diag_mp([mq], [vq], [mp], [vp])


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-5, 1e-7])
def test_near_equal_distributions_keep_relative_accuracy(scale):
    """Where the naive exp(v) − 1 − v loses every digit in float32, the result stays exact."""
    rng = np.random.default_rng(5)
    m, v = (scale * rng.standard_normal((20, 8))).astype(np.float32), \
           (scale * rng.standard_normal((20, 8))).astype(np.float32)
    got = np.asarray(kl.kl_std_normal(m, v))
    want = np.array([ref.kl_diag_mp(m[i], v[i], np.zeros(8), np.zeros(8)) for i in range(20)])
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)
    naive = np.asarray(0.5 * jnp.sum(jnp.exp(v) - 1 - v + m**2, -1))
    if scale <= 1e-3:  # shows the test can tell the stable form from the naive one
        assert np.max(np.abs(naive / want - 1)) > 1e-3
    # The same through the diagonal and full paths.
    mp, vp = (scale * rng.standard_normal((20, 8))).astype(np.float32), \
             (scale * rng.standard_normal((20, 8))).astype(np.float32)
    got = np.asarray(kl.kl_diag(m, v, mp, vp))
    want = np.array([ref.kl_diag_mp(m[i], v[i], mp[i], vp[i]) for i in range(20)])
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)
    # The full path sees float32 factors exp(v/2), a slightly different distribution: its
    # reference takes the log-variances 2·log(factor) of exactly those factors.
    sq, sp = np.exp(v / 2).astype(np.float32), np.exp(vp / 2).astype(np.float32)
    got = np.asarray(kl.kl_full(m, _np_diag(sq), mp, _np_diag(sp)))
    want = np.array([ref.kl_diag_mp(m[i], 2 * np.log(_f64(sq[i])), mp[i], 2 * np.log(_f64(sp[i])))
                     for i in range(20)])
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)
    got = np.asarray(kl.kl_full_std_normal(m, _np_diag(sq)))
    want = np.array([ref.kl_diag_mp(m[i], 2 * np.log(_f64(sq[i])), np.zeros(8), np.zeros(8))
                     for i in range(20)])
    np.testing.assert_allclose(got, want, rtol=F32_RTOL)


def _np_diag(s):
    """[..., k] -> [..., k, k] diagonal matrices, in NumPy (keeps the dtype)."""
    return s[..., :, None] * np.eye(s.shape[-1], dtype=s.dtype)


def _near(rng, x, eps):
    """x (float32) perturbed by eps relative to max(|x|, 0.3), elementwise; lower triangle for matrices."""
    # At least eps·|x| >= one half ulp, so that every entry changes even at eps = 1e-7.
    noise = eps * np.maximum(np.abs(x), 0.3) * (1 + np.abs(rng.standard_normal(x.shape)))
    noise *= rng.choice([-1.0, 1.0], size=x.shape)
    return (x + (np.tril(noise) if x.ndim == 2 else noise)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("eps", [1e-7, 1e-5, 1e-4])
def test_full_near_equal_distributions_keep_relative_accuracy(k, eps):
    """q ≈ p through the factor, the mean or both: a few float32 ulps of the exact KL.

    The reference is the textbook formula in 60-digit arithmetic at the same float32 inputs.
    Flipping the signs of factor columns (same covariance) must not matter either.
    """
    rng = np.random.default_rng(int(1e8 * eps) + k)
    rtol = 2e-6  # measured <= 3e-7; the former difference-of-logs form was off by 1e-4..1
    for _ in range(3):
        lp, mp = _rand_tril(rng, (), k), rng.standard_normal(k).astype(np.float32)
        flip = np.diag(rng.choice([-1.0, 1.0], size=k)).astype(np.float32)
        for lq, mq in [(_near(rng, lp, eps), mp), (lp, _near(rng, mp, eps)),
                       (_near(rng, lp, eps), _near(rng, mp, eps))]:
            want = ref.kl_full_mp(mq, lq, mp, lp)
            assert want > 0
            for lq_, lp_ in [(lq, lp), (lq @ flip, lp), (lq, lp @ flip)]:
                got = float(kl.kl_full(mq, lq_, mp, lp_))
                np.testing.assert_allclose(got, want, rtol=rtol, err_msg=str((k, eps)))
            per = np.asarray(kl.kl_full(mq, lq, mp, lp, per_dim=True))
            assert np.all(per >= 0)
            np.testing.assert_allclose(per.sum(), want, rtol=rtol)
    # The same through kl_full_std_normal, near the identity.
    m, l = _near(rng, np.zeros(k, np.float32), eps), _near(rng, np.eye(k, dtype=np.float32), eps)
    want = ref.kl_full_mp(m, l, np.zeros(k), np.eye(k))
    np.testing.assert_allclose(float(kl.kl_full_std_normal(m, l)), want, rtol=rtol)
    np.testing.assert_allclose(float(kl.kl_full(m, l, 0 * m, np.eye(k, dtype=np.float32))), want,
                               rtol=rtol)
    # Adding the terms (what a naive implementation does) loses these digits, so the
    # references above can tell the stable form from the naive one.
    if eps <= 1e-5:
        naive = float(kl.kl_full_terms(m, l, 0 * m, np.eye(k, dtype=np.float32)).total())
        assert abs(naive / want - 1) > 1e-3


@pytest.mark.parametrize("k", [3, 8])
def test_full_per_dim_near_equal_matches_chain_rule(k):
    rng = np.random.default_rng(90 + k)
    lp, mp = _rand_tril(rng, (), k), rng.standard_normal(k).astype(np.float32)
    lq, mq = _near(rng, lp, 1e-5), _near(rng, mp, 1e-5)
    want = ref.kl_chain_rule_mp(mq, lq, mp, lp)
    np.testing.assert_allclose(kl.kl_full(mq, lq, mp, lp, per_dim=True), want, rtol=1e-5)


@pytest.mark.parametrize("eps", [1e-7, 1e-5, 1e-4])
def test_full_equals_diag_on_diagonal_factors_near_equal(eps):
    """Diagonal factors sq ≈ sp: kl_full and kl_full_std_normal agree with the diagonal
    mpmath reference at log-variances 2·log(s), in total and per dimension."""
    rng = np.random.default_rng(int(1e8 * eps))
    k = 8
    sp = np.exp(0.4 * rng.standard_normal((6, k))).astype(np.float32)
    sq = _near(rng, sp, eps)
    mp = rng.standard_normal((6, k)).astype(np.float32)
    mq = _near(rng, mp, eps)
    vq, vp = 2 * np.log(_f64(sq)), 2 * np.log(_f64(sp))
    per = np.asarray(kl.kl_full(mq, _np_diag(sq), mp, _np_diag(sp), per_dim=True))
    want = np.array([[ref.kl_diag_mp(mq[i, j:j + 1], vq[i, j:j + 1], mp[i, j:j + 1], vp[i, j:j + 1])
                      for j in range(k)] for i in range(6)])
    np.testing.assert_allclose(per, want, rtol=2e-6)
    np.testing.assert_allclose(per.sum(-1), want.sum(-1), rtol=2e-6)
    s1, m1 = _near(rng, np.ones((6, k), np.float32), eps), _near(rng, np.zeros((6, k), np.float32), eps)
    want_std = np.array([ref.kl_diag_mp(m1[i], 2 * np.log(_f64(s1[i])), np.zeros(k), np.zeros(k))
                         for i in range(6)])
    np.testing.assert_allclose(kl.kl_full_std_normal(m1, _np_diag(s1)), want_std, rtol=2e-6)
    # With equal covariances (up to rounding exp(v/2) to float32) both paths agree in float32.
    v = np.log(sp.astype(np.float64) ** 2).astype(np.float32)
    s = np.exp(_f64(v) / 2).astype(np.float32)
    np.testing.assert_allclose(kl.kl_full(mq, _np_diag(s), mp, _np_diag(s)), kl.kl_diag(mq, v, mp, v),
                               rtol=1e-6)
    # In float64 both paths can represent the same distribution: they agree to ~1e-10.
    with jax.enable_x64(True):
        got_full = kl.kl_full(_f64(mq), _np_diag(_f64(sq)), _f64(mp), _np_diag(_f64(sp)),
                               per_dim=True)
        got_diag = kl.kl_diag(_f64(mq), vq, _f64(mp), vp, per_dim=True)
        assert got_full.dtype == np.float64
        np.testing.assert_allclose(got_full, got_diag, rtol=1e-9)
        np.testing.assert_allclose(got_full, want, rtol=1e-9)


@pytest.mark.parametrize("log_sq,log_sp", [(40, 0), (-40, 0), (0, 40), (0, -40), (40, 40), (-40, -40),
                                           (-40, 40), (40, -40), (-60, 30)])
def test_full_extreme_diagonals_keep_relative_accuracy(log_sq, log_sp):
    """Factor diagonals near e^±40 (and a ratio e^-90 that underflows float32): a few ulps of
    the exact KL; the variance ratio is the squared factor ratio, not exp of a log difference."""
    rng = np.random.default_rng(abs(log_sq) + 2 * abs(log_sp) + (log_sq < 0) + 2 * (log_sp < 0))
    k = 4
    for _ in range(4):
        sq = np.exp(log_sq + rng.uniform(-1, 1, k)) * rng.choice([-1.0, 1.0], size=k)
        sp = np.exp(log_sp + rng.uniform(-1, 1, k))
        lq, lp = np.diag(sq).astype(np.float32), np.diag(sp).astype(np.float32)
        # Off-diagonal entries 1e-3 of their column's diagonal.
        lq += np.tril(1e-3 * np.abs(lq).max(0) * rng.standard_normal((k, k)), -1).astype(np.float32)
        z = np.zeros(k, np.float32)
        want = ref.kl_full_mp(z, lq, z, lp)
        got = float(kl.kl_full(z, lq, z, lp))
        if want >= F32_MAX / 2:
            assert got == np.inf, (got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=5e-7)  # was 4e-6..1e-5 via exp(log − log)
        if log_sp == 0:  # the same against N(0, I)
            want_std = ref.kl_full_mp(z, lq, z, np.eye(k))
            got_std = float(kl.kl_full_std_normal(z, lq))
            if want_std >= F32_MAX / 2:
                assert got_std == np.inf
            else:
                np.testing.assert_allclose(got_std, want_std, rtol=5e-7)


def test_full_float64_near_equal():
    with jax.enable_x64(True):
        rng = np.random.default_rng(95)
        lp, mp = _rand_tril(rng, (), 5).astype(np.float64), rng.standard_normal(5)
        lq = lp + 1e-12 * np.tril(rng.standard_normal((5, 5)))
        mq = mp + 1e-12 * rng.standard_normal(5)
        got = kl.kl_full(mq, lq, mp, lp)
        assert got.dtype == np.float64
        np.testing.assert_allclose(float(got), ref.kl_full_mp(mq, lq, mp, lp), rtol=1e-12)


def test_expm1_minus_x_is_accurate_everywhere():
    x = np.concatenate([-np.logspace(-8, 1.9, 200), [0.0], np.logspace(-8, 1.9, 200),
                        np.linspace(-0.6, 0.6, 101)]).astype(np.float32)
    got = np.asarray(kl.expm1_minus_x(x), np.float64)
    with mpmath.workdps(60):
        want = np.array([float(mpmath.expm1(mpmath.mpf(float(t))) - mpmath.mpf(float(t))) for t in x])
    np.testing.assert_allclose(got, want, rtol=5e-7, atol=0)
    with jax.enable_x64(True):
        x64 = np.linspace(-0.6, 0.6, 101)
        got64 = np.asarray(kl.expm1_minus_x(jnp.asarray(x64)))
        assert got64.dtype == np.float64
        with mpmath.workdps(60):
            want64 = np.array([float(mpmath.expm1(mpmath.mpf(t)) - mpmath.mpf(t)) for t in x64])
        np.testing.assert_allclose(got64, want64, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------
# Monte Carlo and quadrature.


@pytest.mark.parametrize("k", [1, 3, 6])
def test_full_matches_monte_carlo(k):
    rng = np.random.default_rng(10 + k)
    mq, mp = rng.standard_normal(k), rng.standard_normal(k)
    lq, lp = _rand_tril(rng, (), k).astype(np.float64), _rand_tril(rng, (), k).astype(np.float64)
    n = 200_000
    z = mq + rng.standard_normal((n, k)) @ np.tril(lq).T
    log_ratio = (ref.lognormal_pdf_np(z, mq, np.tril(lq) @ np.tril(lq).T)
                 - ref.lognormal_pdf_np(z, mp, np.tril(lp) @ np.tril(lp).T))
    est, se = log_ratio.mean(), log_ratio.std() / np.sqrt(n)
    got = float(kl.kl_full(mq.astype(np.float32), lq.astype(np.float32),
                           mp.astype(np.float32), lp.astype(np.float32)))
    assert abs(got - est) < 4 * se, (got, est, se)


def test_diag_matches_monte_carlo():
    rng = np.random.default_rng(20)
    mq, vq, mp, vp = (rng.standard_normal(4) for _ in range(4))
    n = 400_000
    z = mq + np.exp(vq / 2) * rng.standard_normal((n, 4))
    lr = (stats.norm.logpdf(z, mq, np.exp(vq / 2)) - stats.norm.logpdf(z, mp, np.exp(vp / 2))).sum(-1)
    got = float(kl.kl_diag(*(a.astype(np.float32) for a in (mq, vq, mp, vp))))
    assert abs(got - lr.mean()) < 4 * lr.std() / np.sqrt(n)


@pytest.mark.parametrize("mq,vq,mp,vp", [(0.3, -1.2, -0.5, 0.4), (2.0, 1.5, 0.0, 0.0),
                                         (-1.0, 0.0, -1.0, 0.0), (0.1, -3.0, 0.2, 1.0)])
def test_univariate_matches_quadrature(mq, vq, mp, vp):
    q, p = stats.norm(mq, np.exp(vq / 2)), stats.norm(mp, np.exp(vp / 2))
    lo, hi = mq - 12 * np.exp(vq / 2), mq + 12 * np.exp(vq / 2)
    want, _ = integrate.quad(lambda z: q.pdf(z) * (q.logpdf(z) - p.logpdf(z)), lo, hi,
                             epsabs=1e-12, epsrel=1e-10, limit=200)
    got = float(kl.kl_normal(mq, vq, mp, vp))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Identities.


def test_diag_cases_equal_full_formula():
    rng = np.random.default_rng(30)
    mq, vq = _rand_diag(rng, (7,), 5)
    mp, vp = _rand_diag(rng, (7,), 5)
    lq = jnp.vectorize(jnp.diag, signature="(k)->(k,k)")(jnp.exp(vq / 2))
    lp = jnp.vectorize(jnp.diag, signature="(k)->(k,k)")(jnp.exp(vp / 2))
    np.testing.assert_allclose(kl.kl_diag(mq, vq, mp, vp), kl.kl_full(mq, lq, mp, lp), rtol=1e-6)
    np.testing.assert_allclose(kl.kl_std_normal(mq, vq), kl.kl_full(mq, lq, 0 * mq, jnp.eye(5) + 0 * lq),
                               rtol=1e-6)
    np.testing.assert_allclose(kl.kl_std_normal(mq, vq), kl.kl_full_std_normal(mq, lq), rtol=1e-6)
    np.testing.assert_allclose(kl.kl_std_normal(mq, vq), kl.kl_diag(mq, vq, 0 * mq, 0 * vq), rtol=1e-6)
    for a, b in [(kl.kl_diag_terms(mq, vq, mp, vp), kl.kl_full_terms(mq, lq, mp, lp)),
                 (kl.kl_std_normal_terms(mq, vq), kl.kl_full_std_normal_terms(mq, lq))]:
        for name in kl.KLTerms._fields:
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=2e-6, atol=1e-6,
                                       err_msg=name)


def _all_term_cases(rng):
    mq, vq = _rand_diag(rng, (4, 3), 6)
    mp, vp = _rand_diag(rng, (3,), 6)
    lq, lp = _rand_tril(rng, (4, 3), 6), _rand_tril(rng, (3,), 6)
    return [
        (kl.kl_std_normal(mq, vq), kl.kl_std_normal_terms(mq, vq)),
        (kl.kl_diag(mq, vq, mp, vp), kl.kl_diag_terms(mq, vq, mp, vp)),
        (kl.kl_full(mq, lq, mp, lp), kl.kl_full_terms(mq, lq, mp, lp)),
        (kl.kl_full_std_normal(mq, lq), kl.kl_full_std_normal_terms(mq, lq)),
    ]


def test_terms_sum_to_total():
    for total, terms in _all_term_cases(np.random.default_rng(31)):
        assert isinstance(terms, kl.KLTerms)
        for t in terms:
            assert t.shape == total.shape
        np.testing.assert_allclose(terms.total(), total, rtol=1e-5)
        np.testing.assert_allclose(terms.dim, 6.0)


def test_per_dim_sums_to_total_and_matches_terms():
    rng = np.random.default_rng(32)
    mq, vq = _rand_diag(rng, (4, 3), 6)
    mp, vp = _rand_diag(rng, (), 6)
    for fn, fn_terms, args in [(kl.kl_std_normal, kl.kl_std_normal_terms, (mq, vq)),
                               (kl.kl_diag, kl.kl_diag_terms, (mq, vq, mp, vp))]:
        per = fn(*args, per_dim=True)
        assert per.shape == (4, 3, 6)
        np.testing.assert_allclose(per.sum(-1), fn(*args), rtol=1e-6)
        terms = fn_terms(*args, per_dim=True)
        assert all(t.shape == (4, 3, 6) for t in terms)
        np.testing.assert_allclose(terms.total(), per, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(terms.dim, 1.0)
        summed = fn_terms(*args)
        for a, b in zip(terms, summed):
            np.testing.assert_allclose(a.sum(-1), b, rtol=1e-6)


def test_kl_of_a_distribution_with_itself_is_zero():
    rng = np.random.default_rng(33)
    m, v = _rand_diag(rng, (10,), 8)
    l = _rand_tril(rng, (10,), 8)
    np.testing.assert_array_equal(kl.kl_diag(m, v, m, v), 0.0)
    np.testing.assert_array_equal(kl.kl_std_normal(0 * m, 0 * v), 0.0)
    np.testing.assert_allclose(kl.kl_full(m, l, m, l), 0.0, atol=1e-6)
    np.testing.assert_array_equal(kl.kl_full_std_normal(0 * m, jnp.eye(8)), 0.0)


finite_f32 = st.floats(-8, 8, width=32)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(hnp.arrays(np.float32, (4, 5), elements=finite_f32))
def test_kl_is_nonnegative_diag(x):
    mq, vq, mp, vp = x
    assert float(kl.kl_diag(mq, vq, mp, vp)) >= 0
    assert np.all(np.asarray(kl.kl_diag(mq, vq, mp, vp, per_dim=True)) >= 0)
    assert float(kl.kl_std_normal(mq, vq)) >= 0


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(hnp.arrays(np.float32, (2, 4, 4), elements=st.floats(-2, 2, width=32)),
                  hnp.arrays(np.float32, (2, 4), elements=finite_f32))
def test_kl_is_nonnegative_full(ls, ms):
    # Keep the diagonal away from 0 so that the factors are valid.
    ls = ls + 2.5 * np.sign(ls + 1e-3) * np.eye(4, dtype=np.float32)
    got = float(kl.kl_full(ms[0], ls[0], ms[1], ls[1]))
    assert got >= -1e-5 * (1 + abs(ref.kl_full_np(ms[0], ls[0], ms[1], ls[1])))


# ---------------------------------------------------------------------------
# Gradients.


def _fd_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 NumPy function."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = eps
        g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def test_grads_match_finite_differences_diag():
    rng = np.random.default_rng(40)
    mq, vq = _rand_diag(rng, (), 4)
    mp, vp = _rand_diag(rng, (), 4)
    args = [mq, vq, mp, vp]
    grads = jax.grad(lambda *a: kl.kl_diag(*a), argnums=(0, 1, 2, 3))(*args)
    for i in range(4):
        def f(x, i=i):
            a = [_f64(t) for t in args]
            a[i] = x
            return ref.kl_full_np(a[0], np.diag(np.exp(a[1] / 2)), a[2], np.diag(np.exp(a[3] / 2)))
        np.testing.assert_allclose(grads[i], _fd_grad(f, args[i]), rtol=1e-4, atol=1e-5)
    g_std = jax.grad(lambda m, v: kl.kl_std_normal(m, v), argnums=(0, 1))(mq, vq)
    np.testing.assert_allclose(g_std[0], mq, rtol=1e-6)
    np.testing.assert_allclose(g_std[1], 0.5 * np.expm1(_f64(vq)), rtol=1e-5)


def test_grads_match_finite_differences_full():
    rng = np.random.default_rng(41)
    k = 3
    mq, mp = (rng.standard_normal(k).astype(np.float32) for _ in range(2))
    lq, lp = _rand_tril(rng, (), k), _rand_tril(rng, (), k)
    args = [mq, lq, mp, lp]
    grads = jax.grad(lambda *a: kl.kl_full(*a), argnums=(0, 1, 2, 3))(*args)
    for i in range(4):
        def f(x, i=i):
            a = [_f64(t) for t in args]
            a[i] = x
            return ref.kl_full_np(*a)
        want = _fd_grad(f, args[i])
        if i in (1, 3):
            want = np.tril(want)  # only the lower triangle is read
        np.testing.assert_allclose(grads[i], want, rtol=2e-4, atol=2e-5)


def test_grads_are_finite_at_q_equals_p():
    rng = np.random.default_rng(42)
    m, v = _rand_diag(rng, (), 5)
    l = _rand_tril(rng, (), 5)
    cases = [
        (kl.kl_diag, (m, v, m, v)),
        (kl.kl_std_normal, (np.zeros(5, np.float32), np.zeros(5, np.float32))),
        (kl.kl_full, (m, l, m, l)),
        (kl.kl_full_std_normal, (np.zeros(5, np.float32), np.eye(5, dtype=np.float32))),
    ]
    for fn, args in cases:
        grads = jax.grad(lambda *a: fn(*a), argnums=tuple(range(len(args))))(*args)
        for g in grads:
            assert np.all(np.isfinite(g)), fn.__name__
            np.testing.assert_allclose(g, 0.0, atol=1e-5)  # q = p is the minimum
    for fn in (kl.kl_std_normal_terms, kl.kl_diag_terms):
        args = cases[0][1][: 2 if fn is kl.kl_std_normal_terms else 4]
        g = jax.grad(lambda *a: sum(t.sum() for t in fn(*a)), argnums=0)(*args)
        assert np.all(np.isfinite(g))


def _full_grads_f64(mq, lq, mp, lp):
    """Analytic (d/dmq, d/dLq, d/dmp, d/dLp) of KL(N(mq, LqLqᵀ) || N(mp, LpLpᵀ)), float64.

    With G = Σp⁻¹(Σq + δδᵀ)Σp⁻¹, δ = mp − mq: dKL/dLq = tril((Σp⁻¹ − Σq⁻¹)Lq),
    dKL/dLp = tril((Σp⁻¹ − G)Lp), dKL/dmq = −dKL/dmp = Σp⁻¹(mq − mp); tril(Σ⁻¹L) = tril(L⁻ᵀ)
    = diag(1/Lᵢᵢ) is used exactly.
    """
    mq, lq, mp, lp = (np.asarray(a, np.float64) for a in (mq, lq, mp, lp))
    lq, lp = np.tril(lq), np.tril(lp)
    sq, sp = lq @ lq.T, lp @ lp.T
    spi = np.linalg.inv(sp)
    dm = mp - mq
    g_mq = spi @ (mq - mp)
    return (g_mq, np.tril(spi @ lq) - np.diag(1 / np.diag(lq)), -g_mq,
            np.diag(1 / np.diag(lp)) - np.tril(spi @ (sq + np.outer(dm, dm)) @ spi @ lp))


@pytest.mark.parametrize("eps", [1e-7, 1e-4])
def test_full_grads_near_q_equals_p(eps):
    """Gradients at q ≈ p are small (O(eps)) yet accurate, and exactly 0 at q = p for any
    sign convention of the factors (LqD is a factor of the same Σq)."""
    rng = np.random.default_rng(43)
    k = 5
    lp, mp = _rand_tril(rng, (), k), rng.standard_normal(k).astype(np.float32)
    lq, mq = _near(rng, lp, eps), _near(rng, mp, eps)
    args = (mq, lq, mp, lp)
    grads = jax.grad(lambda *a: kl.kl_full(*a), argnums=(0, 1, 2, 3))(*args)
    for name, g, want in zip(("mq", "lq", "mp", "lp"), grads, _full_grads_f64(*args)):
        # measured <= 3e-7 of the largest entry; the former form was off by 2e-4 (eps 1e-4) to 0.2
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
    flip = np.diag(rng.choice([-1.0, 1.0], size=k)).astype(np.float32)
    flip[0, 0] = -1.0  # at least one column flipped
    for fn in (lambda *a: kl.kl_full(*a), lambda *a: kl.kl_full(*a, per_dim=True).sum(),
               lambda *a: sum(t.sum() for t in kl.kl_full_terms(*a, per_dim=True))):
        for q_factor in (lp, lp @ flip):
            grads = jax.grad(fn, argnums=(0, 1, 2, 3))(mp, q_factor, mp, lp)
            assert all(np.all(np.isfinite(g)) for g in grads)
    grads = jax.grad(lambda *a: kl.kl_full(*a), argnums=(0, 1, 2, 3))(mp, lp @ flip, mp, lp)
    for g in grads:
        np.testing.assert_allclose(g, 0.0, atol=1e-5)


def test_full_grads_are_finite_at_extreme_ratios():
    k = 3
    z = np.zeros(k, np.float32)
    for log_sq, log_sp in [(-60, 30), (-40, 40), (40, 0), (0, 40)]:  # (−60, 30): r underflows
        lq = np.exp(log_sq) * (np.eye(k) + np.tril(np.full((k, k), 1e-3), -1))
        lp = np.exp(log_sp) * np.eye(k)
        args = (z, lq.astype(np.float32), z, lp.astype(np.float32))
        assert np.isfinite(float(kl.kl_full(*args)))
        grads = jax.grad(lambda *a: kl.kl_full(*a), argnums=(1, 3))(*args)
        _, want_q, _, want_p = _full_grads_f64(*args)
        for g, want in [(grads[0], want_q), (grads[1], want_p)]:
            assert np.all(np.isfinite(g)), (log_sq, log_sp)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-30, err_msg=str((log_sq, log_sp)))


# ---------------------------------------------------------------------------
# jit, vmap, sweep axes.


def test_jit_and_vmap_match_python_loop():
    rng = np.random.default_rng(50)
    sweep, batch, k = 3, 4, 5
    mq, vq = _rand_diag(rng, (sweep, batch), k)
    mp, vp = _rand_diag(rng, (sweep, 1), k)
    lq, lp = _rand_tril(rng, (sweep, batch), k), _rand_tril(rng, (sweep, 1), k)
    funcs = [
        (kl.kl_std_normal, (mq, vq)),
        (kl.kl_diag, (mq, vq, mp, vp)),
        (kl.kl_full, (mq, lq, mp, lp)),
        (kl.kl_full_std_normal, (mq, lq)),
    ]
    for fn, args in funcs:
        loop = np.array([[float(fn(*(a[s, min(b, a.shape[1] - 1)] for a in args)))
                          for b in range(batch)] for s in range(sweep)])
        np.testing.assert_allclose(jax.jit(fn)(*args), loop, rtol=1e-6, err_msg=fn.__name__)
        vm = jax.vmap(jax.vmap(fn, in_axes=tuple(0 if a.shape[1] == batch else None for a in args)))
        squeezed = [a if a.shape[1] == batch else a[:, 0] for a in args]
        np.testing.assert_allclose(vm(*squeezed), loop, rtol=1e-6, err_msg=fn.__name__)


# ---------------------------------------------------------------------------
# Extreme inputs, NaN and shape errors.


EXTREME_LOG_VARS = [-80.0, -20.0, 0.0, 20.0, 80.0]
EXTREME_MEANS = [-1e6, 0.0, 1e-3, 1e6]
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # results below it are subnormal; XLA flushes them to 0


def _assert_f32_accurate(got, want, msg):
    """rtol 1e-5 where the true value is a normal float32; inf where it overflows."""
    if want >= F32_MAX / 2:
        assert got == np.inf, (msg, got)
    elif want < F32_TINY:
        assert 0 <= got < F32_TINY, (msg, got)
    else:
        np.testing.assert_allclose(got, want, rtol=F32_RTOL, err_msg=msg)


def test_extreme_std_normal_is_finite_and_accurate():
    for m, v in itertools.product(EXTREME_MEANS, EXTREME_LOG_VARS):
        x = np.array([m, m / 2], np.float32), np.array([v, -v], np.float32)
        got = float(kl.kl_std_normal(*x))
        want = ref.kl_diag_mp(x[0], x[1], np.zeros(2), np.zeros(2))
        assert np.isfinite(got), (m, v)
        np.testing.assert_allclose(got, want, rtol=F32_RTOL)


def test_extreme_diag_is_accurate_or_overflows_to_inf():
    for mq, mp, vq, vp in itertools.product(EXTREME_MEANS, [0.0, 1e6], EXTREME_LOG_VARS, EXTREME_LOG_VARS):
        x = [np.array([t], np.float32) for t in (mq, vq, mp, vp)]
        got = float(kl.kl_diag(*x))
        _assert_f32_accurate(got, ref.kl_diag_mp(*x), str((mq, mp, vq, vp)))


def test_extreme_full_is_accurate_or_overflows_to_inf():
    k = 3
    for mq, vq, vp in itertools.product(EXTREME_MEANS, EXTREME_LOG_VARS, EXTREME_LOG_VARS):
        lq = np.diag(np.full(k, np.exp(vq / 2))).astype(np.float32)
        lp = np.diag(np.full(k, np.exp(vp / 2))).astype(np.float32)
        mean_q = np.full(k, mq, np.float32)
        got = float(kl.kl_full(mean_q, lq, np.zeros(k, np.float32), lp))
        want = ref.kl_diag_mp(mean_q, np.full(k, vq), np.zeros(k), np.full(k, vp))
        _assert_f32_accurate(got, want, str((mq, vq, vp)))


@pytest.mark.parametrize("fn,n_args,matrix", [
    (kl.kl_std_normal, 2, ()), (kl.kl_diag, 4, ()), (kl.kl_full, 4, (1, 3)),
    (kl.kl_full_std_normal, 2, (1,)), (kl.kl_diag_terms, 4, ()), (kl.kl_full_terms, 4, (1, 3)),
])
def test_nan_propagates(fn, n_args, matrix):
    k = 3
    base = [np.eye(k, dtype=np.float32) if i in matrix else np.full(k, 0.5, np.float32)
            for i in range(n_args)]
    for i in range(n_args):
        args = [a.copy() for a in base]
        args[i][..., 0] = np.nan
        out = fn(*args)
        leaves = jax.tree.leaves(out)
        assert any(np.isnan(np.asarray(leaf)).any() for leaf in leaves), (fn.__name__, i)
        total = out.total() if isinstance(out, kl.KLTerms) else out
        assert np.isnan(np.asarray(total)).all(), (fn.__name__, i)


def test_mismatched_shapes_raise_clear_errors_at_trace_time():
    with pytest.raises(ValueError, match=r"kl_std_normal: event dimensions differ.*mean.*log_var"):
        kl.kl_std_normal(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match=r"kl_diag: event dimensions differ"):
        jax.jit(kl.kl_diag)(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match=r"kl_full: .*scale_tril_q.*square"):
        kl.kl_full(np.zeros(3), np.zeros((3, 2)), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"kl_full: event dimensions differ"):
        kl.kl_full(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"batch shapes do not broadcast"):
        kl.kl_std_normal(np.zeros((2, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"at least 1 axis"):
        kl.kl_std_normal(np.float32(0.0), np.float32(0.0))


def test_float64_is_kept_when_enabled():
    with jax.enable_x64(True):
        rng = np.random.default_rng(60)
        m, v = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
        got = kl.kl_std_normal(jnp.asarray(m), jnp.asarray(v))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, 0.5 * np.sum(np.expm1(v) - v + m**2, -1), rtol=1e-13)


def test_full_per_dim_is_the_chain_rule_decomposition():
    rng = np.random.default_rng(70)
    k = 5
    mq, mp = (rng.standard_normal((3, k)).astype(np.float32) for _ in range(2))
    lq, lp = _rand_tril(rng, (3,), k), _rand_tril(rng, (3,), k)
    per = np.asarray(kl.kl_full(mq, lq, mp, lp, per_dim=True))
    assert per.shape == (3, k)
    want = np.stack([ref.kl_chain_rule_np(mq[i], lq[i], mp[i], lp[i]) for i in range(3)])
    np.testing.assert_allclose(per, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(per.sum(-1), kl.kl_full(mq, lq, mp, lp), rtol=1e-6)
    terms = kl.kl_full_terms(mq, lq, mp, lp, per_dim=True)
    np.testing.assert_allclose(terms.total(), per, rtol=1e-4, atol=1e-5)
    per_std = np.asarray(kl.kl_full_std_normal(mq, lq, per_dim=True))
    want_std = np.stack([ref.kl_chain_rule_np(mq[i], lq[i], np.zeros(k), np.eye(k)) for i in range(3)])
    np.testing.assert_allclose(per_std, want_std, rtol=1e-4, atol=1e-6)
    # On diagonal factors the chain rule is the ordinary per-dimension split.
    mq1, vq1 = _rand_diag(rng, (3,), k)
    lq1 = jnp.vectorize(jnp.diag, signature="(k)->(k,k)")(jnp.exp(vq1 / 2))
    np.testing.assert_allclose(kl.kl_full_std_normal(mq1, lq1, per_dim=True),
                               kl.kl_std_normal(mq1, vq1, per_dim=True), rtol=1e-5, atol=1e-7)
