"""Tests of vaekl.estimators against brute-force float64 references, exact identities, limits
of large batches, padded/masked runs and jit + vmap.

References are written here independently: explicit loops with math.log/exp for β-TCVAE
(weights spelled out from Chen et al.'s definitions), NumPy for DIP-VAE, double loops for
the MMD, slogdet for the Gaussian total correlation. Units are nats throughout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vaekl import estimators as est
from vaekl.models import gaussian

RTOL = 1e-5

# Jitted entry points: one compilation per shape instead of op-by-op dispatch.
_tc = jax.jit(est.tc_decomposition, static_argnames=("estimator",))
_dip_cov = jax.jit(est.dip_covariance, static_argnames=("kind",))
_mmd = jax.jit(est.mmd, static_argnames=("kernel",))
_gtc = jax.jit(est.gaussian_total_correlation)
_permute = jax.jit(est.permute_dims)
_disc_init = jax.jit(est.discriminator_init, static_argnames=("latent_dim", "hidden"))
_disc_apply = jax.jit(est.discriminator_apply)


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _posteriors(seed, m, k, spread=1.0):
    """Batch of diagonal posteriors and one sample from each, float64 NumPy [m, k]."""
    rng = np.random.default_rng(seed)
    mean = spread * rng.standard_normal((m, k))
    log_var = 0.5 * rng.standard_normal((m, k)) - 0.5
    z = mean + np.exp(0.5 * log_var) * rng.standard_normal((m, k))
    return z, mean, log_var


def _pad(a, extra, fill):
    """Appends ``extra`` latent columns holding ``fill`` (garbage a mask must hide)."""
    a = np.asarray(a)
    return np.concatenate([a, np.full((*a.shape[:-1], extra), fill, a.dtype)], -1)


# ---------------------------------------------------------------------------
# β-TCVAE.


def _log_normal_1d(x, mean, log_var):
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 / math.exp(log_var))


def _weight(estimator, i, n, m, big_n):
    """W[i, n] from the definitions: MWS 1/(NM); MSS 1/N for the sample's own posterior, the
    stratum partner (i+1) mod M gets (N−M+1)/(N(M−1)), the other M−2 members 1/(M−1)."""
    if estimator == "mws":
        return 1.0 / (big_n * m)
    if n == i:
        return 1.0 / big_n
    if n == (i + 1) % m:
        return (big_n - m + 1) / (big_n * (m - 1))
    return 1.0 / (m - 1)


def _tc_reference(z, mean, log_var, big_n, estimator, prior_mean=None, prior_log_var=None):
    """Brute-force float64 β-TCVAE parts: loops over i, n, j; densities summed, not logsumexp'd."""
    m, k = z.shape
    pm = [0.0] * k if prior_mean is None else [float(v) for v in prior_mean]
    pv = [0.0] * k if prior_log_var is None else [float(v) for v in prior_log_var]
    out = {"index_code_mi": [], "total_correlation": [], "dimwise_kl": []}
    for i in range(m):
        log_q_given = [[_log_normal_1d(z[i, j], mean[n, j], log_var[n, j]) for j in range(k)]
                       for n in range(m)]
        log_qzx = sum(log_q_given[i])
        log_qz = math.log(sum(_weight(estimator, i, n, m, big_n) * math.exp(sum(log_q_given[n]))
                              for n in range(m)))
        log_qzj = [math.log(sum(_weight(estimator, i, n, m, big_n) * math.exp(log_q_given[n][j])
                                for n in range(m))) for j in range(k)]
        log_pzj = [_log_normal_1d(z[i, j], pm[j], pv[j]) for j in range(k)]
        out["index_code_mi"].append(log_qzx - log_qz)
        out["total_correlation"].append(log_qz - sum(log_qzj))
        out["dimwise_kl"].append(sum(a - b for a, b in zip(log_qzj, log_pzj)))
    return {key: np.array(v) for key, v in out.items()}


@pytest.mark.parametrize("estimator", est.ESTIMATORS)
@pytest.mark.parametrize("m,k", [(2, 1), (2, 3), (3, 1), (3, 3), (7, 1), (7, 3)])
def test_tc_matches_bruteforce(estimator, m, k):
    z, mean, log_var = _posteriors(10 * m + k, m, k, spread=0.7)
    big_n = 50
    want = _tc_reference(z, mean, log_var, big_n, estimator)
    got = _tc(*_f32(z, mean, log_var), big_n, estimator=estimator)
    scale = np.abs(want["dimwise_kl"]).max() + np.abs(want["index_code_mi"]).max()
    for key in want:
        assert got[key].shape == (m,) and got[key].dtype == jnp.float32
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=RTOL * scale, err_msg=key)
    if (m, k) not in ((2, 1), (7, 3)):
        return
    with jax.enable_x64(True):  # the float64 path agrees to float64 precision
        got64 = _tc(z, mean, log_var, big_n, estimator=estimator)
        for key in want:
            assert got64[key].dtype == jnp.float64
            np.testing.assert_allclose(got64[key], want[key], rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize("estimator", est.ESTIMATORS)
def test_tc_learned_prior_matches_bruteforce(estimator):
    z, mean, log_var = _posteriors(5, 7, 3)
    rng = np.random.default_rng(6)
    pm, pv = rng.standard_normal(3), 0.5 * rng.standard_normal(3)
    want = _tc_reference(z, mean, log_var, 1000, estimator, pm, pv)
    got = _tc(*_f32(z, mean, log_var), 1000, estimator, prior_mean=pm,
                               prior_log_var=pv)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=1e-4, err_msg=key)
    # The prior only enters dimwise_kl.
    std = _tc(*_f32(z, mean, log_var), 1000, estimator)
    np.testing.assert_array_equal(got["total_correlation"], std["total_correlation"])
    assert np.abs(np.asarray(got["dimwise_kl"] - std["dimwise_kl"])).max() > 0.1


def test_tc_log_weights():
    m, big_n = 5, 40
    w = np.exp(np.asarray(est.tc_log_weights(m, big_n, "mss"), np.float64))
    want = np.array([[_weight("mss", i, n, m, big_n) for n in range(m)] for i in range(m)])
    np.testing.assert_allclose(w, want, rtol=RTOL)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=RTOL)  # MSS rows are normalized ...
    w_mws = np.exp(np.asarray(est.tc_log_weights(m, big_n, "mws"), np.float64))
    np.testing.assert_allclose(w_mws.sum(1), 1.0 / big_n, rtol=RTOL)  # ... MWS rows sum to 1/N
    np.testing.assert_allclose(np.exp(np.asarray(est.tc_log_weights(2, 9, "mss"))),
                               [[1 / 9, 8 / 9], [8 / 9, 1 / 9]], rtol=RTOL)
    with pytest.raises(ValueError, match="at least 2"):
        est.tc_log_weights(1, 10, "mss")
    with pytest.raises(ValueError, match="dataset_size"):
        est.tc_log_weights(8, 4, "mws")
    with pytest.raises(ValueError, match="unknown estimator"):
        est.tc_log_weights(8, 40, "mis")


@pytest.mark.parametrize("estimator", est.ESTIMATORS)
@pytest.mark.parametrize("learned_prior", [False, True])
def test_tc_parts_sum_to_log_ratio(estimator, learned_prior):
    """MI + TC + DWKL = log q(z|x) − log p(z) per example, whatever the estimate of q(z)."""
    z, mean, log_var = _f32(*_posteriors(7, 16, 4))
    if learned_prior:
        pm, pv = _f32(np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 4))
        log_pz = gaussian.Gaussian(pm, log_var=pv).log_prob(z)
        kw = {"prior_mean": pm, "prior_log_var": pv}
    else:
        log_pz, kw = gaussian.standard_normal_log_prob(z), {}
    want = gaussian.Gaussian(mean, log_var=log_var).log_prob(z) - log_pz
    parts = _tc(z, mean, log_var, 1000, estimator, **kw)
    np.testing.assert_allclose(sum(parts.values()), want, rtol=RTOL, atol=1e-4)


def test_tc_consistent_at_large_batch():
    """Narrow posteriors (sd s) around means μ ~ N(0, Σ): the z are exact draws of the
    aggregate posterior N(0, Σ + s²I), whose TC is KL(N(0, Σ+s²I) || N(0, diag)) (kl_full).
    With N = M, MSS's mean TC must be within 4 Monte-Carlo standard errors (SE = sd/√M over
    the per-example terms) of it at M = 4096; it carries a positive O(1/(M sᵏ)) plug-in bias
    (≈ +0.1 nats at M = 256, ≈ +0.025 at 4096 here), so the error must also shrink from
    M = 256 (mean of 16 batches) to 4096. MWS's values exceed the consistent ones by
    (k−1)·log N (weights 1/(NM) sum to 1/N per row): minus that offset it converges too."""
    sigma = np.array([[1.0, 0.8, 0.5], [0.8, 1.0, 0.6], [0.5, 0.6, 1.0]])
    k, s = 3, 0.3
    exact = float(_gtc(jnp.asarray(sigma + s * s * np.eye(k))))
    np.testing.assert_allclose(exact, 0.5 * (np.sum(np.log(np.diag(sigma) + s * s))
                                             - np.linalg.slogdet(sigma + s * s * np.eye(k))[1]),
                               rtol=1e-5)
    rng = np.random.default_rng(0)

    def draw(m):
        mean = rng.multivariate_normal(np.zeros(k), sigma, size=m)
        z = mean + s * rng.standard_normal((m, k))
        return _f32(z, mean, np.full((m, k), 2 * np.log(s)))

    @jax.jit
    def both(z, mean, log_var):
        m = z.shape[0]
        return (est.tc_decomposition(z, mean, log_var, m, "mss")["total_correlation"],
                est.tc_decomposition(z, mean, log_var, m, "mws")["total_correlation"])

    m = 4096
    tc_mss, tc_mws = (np.asarray(t, np.float64) for t in both(*draw(m)))
    se = tc_mss.std() / math.sqrt(m)
    assert abs(tc_mss.mean() - exact) < 4 * se, (tc_mss.mean(), exact, se)
    tc_mws_corrected = tc_mws.mean() - (k - 1) * math.log(m)
    assert abs(tc_mws_corrected - exact) < 4 * se, (tc_mws_corrected, exact, se)
    small = jax.vmap(both)(*(jnp.stack(a) for a in zip(*(draw(256) for _ in range(16)))))[0]
    assert abs(tc_mss.mean() - exact) < abs(float(np.mean(small)) - exact)


@pytest.mark.parametrize("estimator", est.ESTIMATORS)
def test_tc_mask_invariance(estimator):
    """k = 3 padded to K = 6 with garbage (NaN, huge log-variances) and a mask: same values,
    finite gradients, and exactly zero gradients on the padded columns."""
    z, mean, log_var = _posteriors(3, 9, 3)
    pm, pv = np.array([0.3, -0.2, 0.1]), np.array([0.2, 0.0, -0.3])
    args = dict(prior_mean=pm, prior_log_var=pv)
    want = _tc(*_f32(z, mean, log_var), 100, estimator, **args)
    mask = jnp.array([1, 1, 1, 0, 0, 0], jnp.float32)
    padded = _f32(_pad(z, 3, np.nan), _pad(mean, 3, 1e4), _pad(log_var, 3, -300.0))
    pargs = dict(prior_mean=_pad(pm, 3, np.nan), prior_log_var=_pad(pv, 3, 500.0))
    got = _tc(*padded, 100, estimator, mask=mask, **pargs)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)

    def total(z, mean, log_var):
        d = est.tc_decomposition(z, mean, log_var, 100, estimator, mask=mask, **pargs)
        return sum(jnp.sum(v * w) for v, w in zip(d.values(), (1.0, 2.0, 3.0)))

    grads = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(*padded)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[:, 3:], 0.0)
        assert np.abs(np.asarray(g[:, :3])).max() > 0


def test_tc_jit_vmap_matches_loop():
    """A run axis of 3 (different masks and data-set sizes) under jit(vmap) equals a loop."""
    runs = [_posteriors(20 + r, 6, 4) for r in range(3)]
    z, mean, log_var = (jnp.stack(_f32(*a)) for a in zip(*runs))
    masks = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
    sizes = jnp.array([6.0, 100.0, 6000.0])
    for estimator in est.ESTIMATORS:
        fn = functools.partial(est.tc_decomposition, estimator=estimator)
        got = jax.jit(jax.vmap(lambda *a: fn(*a[:4], mask=a[4])))(z, mean, log_var, sizes, masks)
        for r in range(3):
            want = _tc(z[r], mean[r], log_var[r], float(sizes[r]), estimator, mask=masks[r])
            for key in want:
                np.testing.assert_allclose(got[key][r], want[key], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# DIP-VAE.


def _dip_penalty_reference(c, lod, ld):
    k = c.shape[0]
    off = sum(c[i, j] ** 2 for i in range(k) for j in range(k) if i != j)
    return lod * off + ld * sum((c[i, i] - 1) ** 2 for i in range(k))


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_matches_numpy(kind):
    _, mean, log_var = _posteriors(11, 32, 5)
    mean = mean + np.linspace(0, 2, 5)  # nonzero batch mean: the covariance must center
    want = np.cov(mean, rowvar=False, bias=True)  # 1/M normalization
    if kind == "ii":
        want = want + np.diag(np.exp(log_var).mean(0))
    got = _dip_cov(*_f32(mean, log_var), kind=kind)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
    got_pen = est.dip_penalty(got, 2.0, 20.0)
    np.testing.assert_allclose(got_pen, _dip_penalty_reference(want, 2.0, 20.0), rtol=RTOL)
    np.testing.assert_allclose(est.dip_penalty(jnp.eye(5), 3.0, 7.0), 0.0)


@pytest.mark.parametrize("kind", ["i", "ii"])
def test_dip_mask_invariance(kind):
    _, mean, log_var = _posteriors(12, 16, 3)
    want_cov = _dip_cov(*_f32(mean, log_var), kind=kind)
    want = est.dip_penalty(want_cov, 1.5, 10.0)
    mask = jnp.array([1, 0, 1, 1, 0], jnp.float32)  # padding need not be at the end
    cols = [0, 2, 3]
    mean_k = np.zeros((16, 5))
    mean_k[:, cols], mean_k[:, [1, 4]] = mean, 1e30
    lv_k = np.zeros((16, 5))
    lv_k[:, cols], lv_k[:, [1, 4]] = log_var, 1e3
    cov = _dip_cov(*_f32(mean_k, lv_k), kind=kind, mask=mask)
    np.testing.assert_allclose(cov[np.ix_(cols, cols)], want_cov, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(cov)[[1, 4]], 0.0)
    np.testing.assert_array_equal(np.asarray(cov)[:, [1, 4]], 0.0)
    got = est.dip_penalty(cov, 1.5, 10.0, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Without the mask the zero diagonal entries would each add λ_d·(0 − 1)².
    np.testing.assert_allclose(est.dip_penalty(cov, 1.5, 10.0), want + 2 * 10.0, rtol=1e-6)
    g = jax.jit(jax.grad(lambda m, v: est.dip_penalty(est.dip_covariance(m, v, kind, mask), 1.5,
                                                      10.0, mask)))(*_f32(mean_k, lv_k))
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, [1, 4]] == 0)


def test_dip_jit_vmap_matches_loop():
    runs = [_posteriors(30 + r, 8, 4)[1:] for r in range(3)]
    mean, log_var = (jnp.stack(_f32(*a)) for a in zip(*runs))
    masks = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 0, 1]], jnp.float32)
    lod = jnp.array([1.0, 5.0, 10.0])

    def one(m, v, mask, l):
        return est.dip_penalty(est.dip_covariance(m, v, "ii", mask), l, 10 * l, mask)

    got = jax.jit(jax.vmap(one))(mean, log_var, masks, lod)
    want = [jax.jit(one)(mean[r], log_var[r], masks[r], float(lod[r])) for r in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------
# MMD.


def _mmd_reference(x, y, kernel):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m, k = len(x), len(y), x.shape[1]
    c = 2.0 * k

    def kern(a, b):
        d2 = float(np.sum((a - b) ** 2))
        return c / (c + d2) if kernel == "imq" else math.exp(-d2 / c)

    xx = sum(kern(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(kern(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kern(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("kernel", est.KERNELS)
def test_mmd_matches_double_loop(kernel):
    rng = np.random.default_rng(40)
    x = 0.8 * rng.standard_normal((12, 3)) + 0.3
    y = rng.standard_normal((9, 3))  # unequal sample sizes
    got = _mmd(*_f32(x, y), kernel=kernel)
    # atol: float32 rounding of the O(1) kernel means that cancel in xx + yy − 2xy.
    np.testing.assert_allclose(got, _mmd_reference(x, y, kernel), rtol=RTOL, atol=RTOL)


def test_mmd_unbiased_under_null_positive_under_shift():
    """Over 400 draws of 32 + 32 points: mean ≈ 0 (within 4 SE) for identical distributions,
    and clearly positive for a shift of 0.5 per dimension, for both kernels."""
    keys = jax.random.split(jax.random.key(0), 400)

    @jax.jit
    def draws(key, shift):
        k1, k2 = jax.random.split(key)
        z = jax.random.normal(k1, (32, 3)) + shift
        z_prior = est.prior_samples(k2, z)
        return {kernel: est.mmd(z, z_prior, kernel=kernel) for kernel in est.KERNELS}

    out = jax.jit(jax.vmap(jax.vmap(draws, (0, None)), (None, 0)))(keys, jnp.array([0.0, 0.5]))
    for kernel, (null, shifted) in out.items():
        null, shifted = np.asarray(null, np.float64), np.asarray(shifted, np.float64)
        se = null.std() / math.sqrt(len(null))
        assert abs(null.mean()) < 4 * se, (kernel, null.mean(), se)
        assert shifted.mean() > 20 * se, (kernel, shifted.mean(), se)
        assert shifted.mean() > 10 * shifted.std() / math.sqrt(len(shifted))


def test_mmd_mask_invariance_and_prior_samples():
    rng = np.random.default_rng(41)
    x, y = rng.standard_normal((10, 2)) + 0.5, rng.standard_normal((10, 2))
    mask = jnp.array([1, 1, 0, 0], jnp.float32)
    for kernel in est.KERNELS:
        want = _mmd(*_f32(x, y), kernel=kernel)
        got = _mmd(*_f32(_pad(x, 2, 7.0), _pad(y, 2, np.inf)), kernel=kernel, mask=mask)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # C from k_eff = 2, not 4
    key = jax.random.key(3)
    narrow, wide = est.prior_samples(key, (16, 2)), est.prior_samples(key, jnp.zeros((16, 5)))
    assert wide.shape == (16, 5) and wide.dtype == jnp.float32
    np.testing.assert_array_equal(wide[:, :2], narrow)
    assert np.abs(np.corrcoef(np.asarray(wide).T)[np.triu_indices(5, 1)]).max() < 0.9

    one = lambda a, b, m: est.mmd(a, b, "imq", m)
    xs, ys = (jnp.stack([_f32(_pad(a, 2, 0.0))[0]] * 2) for a in (x, y))
    masks = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
    got = jax.jit(jax.vmap(one))(xs, ys, masks)
    want = [_mmd(xs[r], ys[r], "imq", masks[r]) for r in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert abs(float(got[0] - got[1])) > 1e-4  # k_eff changes C: padding zeros alone is not enough


# ---------------------------------------------------------------------------
# FactorVAE.


def test_permute_dims():
    m, k = 64, 4
    z = jnp.asarray(np.arange(m * k, dtype=np.float32).reshape(k, m).T)  # distinct columns
    key = jax.random.key(5)
    zp = np.asarray(_permute(key, z))
    for j in range(k):
        np.testing.assert_array_equal(np.sort(zp[:, j]), np.asarray(z[:, j]))  # same multiset
    order = zp - zp.min(0)  # each column's permutation of 0..M−1
    assert not np.array_equal(order[:, 0], np.arange(m))
    assert all(not np.array_equal(order[:, a], order[:, b]) for a in range(k) for b in range(a))
    # Independent of padding: the leading columns of a wider run are permuted identically.
    wide = jnp.concatenate([z, jnp.full((m, 3), jnp.nan)], 1)
    mask = jnp.array([1, 1, 1, 1, 0, 0, 0], jnp.float32)
    zw = np.asarray(_permute(key, wide, mask))
    np.testing.assert_array_equal(zw[:, :k], zp)
    np.testing.assert_array_equal(zw[:, k:], 0.0)


def test_discriminator_loss_and_tc_values():
    logits_z = np.array([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    logits_p = np.array([[0.0, 1.0], [4.0, -2.0]])

    def ce(l, c):
        return -(l[c] - np.log(np.exp(l).sum()))

    want = 0.5 * np.mean([ce(l, 0) for l in logits_z]) + 0.5 * np.mean([ce(l, 1) for l in logits_p])
    np.testing.assert_allclose(est.discriminator_loss(*_f32(logits_z, logits_p)), want, rtol=RTOL)
    np.testing.assert_allclose(est.factor_tc(_f32(logits_z)[0]), np.mean([3.0, 0.0, -4.0]),
                               rtol=RTOL)


def test_discriminator_shapes_and_padding():
    key = jax.random.key(7)
    params = jax.eval_shape(functools.partial(est.discriminator_init, latent_dim=3), key)
    assert [p["w"].shape for p in params] == [(3, 1000)] + [(1000, 1000)] * 5 + [(1000, 2)]
    assert [p["b"].shape for p in params] == [(1000,)] * 6 + [(2,)]
    small = _disc_init(key, 3, hidden=(16, 8))
    z = jnp.asarray(np.random.default_rng(8).standard_normal((10, 3)), jnp.float32)
    logits = _disc_apply(small, z)
    assert logits.shape == (10, 2)
    # Zero-padded first-layer rows: the same function of the leading columns.
    pad = [dict(small[0], w=jnp.concatenate([small[0]["w"], jnp.zeros((2, 16))], 0))] + small[1:]
    z_wide = jnp.concatenate([z, 5.0 * jnp.ones((10, 2))], 1)
    np.testing.assert_allclose(_disc_apply(pad, z_wide), logits, rtol=1e-6, atol=1e-6)
    # A masked init of width 5 is exactly that padding of the width-3 init.
    mask = jnp.array([1, 1, 1, 0, 0], jnp.float32)
    masked = _disc_init(key, 5, hidden=(16, 8), mask=mask)
    for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(pad)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(_disc_apply(masked, jnp.full((10, 5), jnp.nan)
                                                       .at[:, :3].set(z), mask),
                               logits, rtol=1e-6, atol=1e-6)


def test_discriminator_learns_total_correlation():
    """300 Adam steps on fresh batches (small widths): correlated z (ρ = 0.9, exact TC 0.83
    nats) gives factor_tc > 0.3 on held-out draws; independent z gives |factor_tc| < 0.1."""

    @jax.jit
    def trained_tc(rho):
        chol = jnp.array([[1.0, 0.0], [rho, jnp.sqrt(1 - rho * rho)]])
        params = est.discriminator_init(jax.random.key(1), 2, hidden=(32, 32))
        opt = optax.adam(2e-3)

        def step(carry, key):
            params, state = carry
            k1, k2 = jax.random.split(key)
            z = jax.random.normal(k1, (128, 2)) @ chol.T
            z_perm = est.permute_dims(k2, z)
            grads = jax.grad(lambda p: est.discriminator_loss(
                est.discriminator_apply(p, z), est.discriminator_apply(p, z_perm)))(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        keys = jax.random.split(jax.random.key(2), 300)
        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
        z = jax.random.normal(jax.random.key(3), (4096, 2)) @ chol.T
        return est.factor_tc(est.discriminator_apply(params, z))

    independent, correlated = np.asarray(jax.vmap(trained_tc)(jnp.array([0.0, 0.9])))
    exact = float(est.gaussian_total_correlation(jnp.array([[1.0, 0.9], [0.9, 1.0]])))
    np.testing.assert_allclose(exact, -0.5 * math.log(1 - 0.81), rtol=1e-6)
    assert correlated > 0.3, correlated
    assert abs(independent) < 0.1, independent


# ---------------------------------------------------------------------------
# Gaussian total correlation.


def test_gaussian_total_correlation():
    rng = np.random.default_rng(50)
    a = rng.standard_normal((4, 5, 5))
    covs = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(5)
    want = [0.5 * (np.sum(np.log(np.diag(c))) - np.linalg.slogdet(c)[1]) for c in covs]
    got = _gtc(_f32(covs)[0])
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert float(_gtc(jnp.diag(jnp.array([0.1, 2.0, 30.0])))) == 0.0
    # Nearly diagonal: ≈ ρ²/2, without cancellation.
    rho = 1e-3
    np.testing.assert_allclose(_gtc(jnp.array([[1.0, rho], [rho, 1.0]])),
                               -0.5 * math.log1p(-rho * rho), rtol=1e-4)
    # Masked rows/columns add nothing, even when garbage.
    wide = np.full((6, 6), np.nan)
    wide[:5, :5] = covs[0]
    mask = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    np.testing.assert_allclose(_gtc(_f32(wide)[0], mask), got[0],
                               rtol=1e-6)
