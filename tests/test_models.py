"""Tests of vaekl.models (Gaussians, posteriors, priors, likelihoods, networks, the VAE).

Every reference is an independent float64 NumPy/SciPy computation written here.
Conventions: sums over pixels and latent dimensions, nats.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from vaekl import config as config_lib
from vaekl.models import gaussian, networks, posteriors
from vaekl.models.likelihoods import Likelihood
from vaekl.models.priors import Prior
from vaekl.models.vae import VAE, make_vae, set_output_bias

RTOL = 2e-5  # float32 library vs float64 reference


def _f64(a):
    return np.asarray(a, np.float64)


def _uniform(seed, shape):
    """Test inputs from NumPy (eager jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rand_tril(rng, k, shape=(), off=0.5, log_sd=0.4):
    """Random lower-triangular factors [*shape, k, k] with positive diagonal, float32."""
    l = np.tril(off * rng.standard_normal((*shape, k, k)), -1)
    d = np.exp(log_sd * rng.standard_normal((*shape, k)))
    return (l + d[..., None] * np.eye(k)).astype(np.float32)


def _rand_gaussian(rng, kind, k, shape=()):
    mean = rng.standard_normal((*shape, k)).astype(np.float32)
    if kind == "diag":
        log_var = (0.8 * rng.standard_normal((*shape, k))).astype(np.float32)
        return gaussian.Gaussian(mean=jnp.asarray(mean), log_var=jnp.asarray(log_var))
    return gaussian.Gaussian(mean=jnp.asarray(mean), scale_tril=jnp.asarray(_rand_tril(rng, k, shape)))


def _cov_np(g: gaussian.Gaussian) -> np.ndarray:
    """Σ in float64, from the raw fields (not through the library's tril())."""
    if g.scale_tril is None:
        v = np.exp(_f64(g.log_var))
        return v[..., None] * np.eye(v.shape[-1])
    l = _f64(g.scale_tril)
    return l @ np.swapaxes(l, -1, -2)


# --------------------------------------------------------------------------------------
# Gaussian


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_log_prob_matches_scipy(kind):
    rng = np.random.default_rng(0)
    k, b = 3, 4
    g = _rand_gaussian(rng, kind, k, (b,))
    z = rng.standard_normal((b, k)).astype(np.float32) * 2.0
    got = np.asarray(g.log_prob(jnp.asarray(z)))
    cov = _cov_np(g)
    want = np.array([stats.multivariate_normal(_f64(g.mean[i]), cov[i]).logpdf(_f64(z[i]))
                     for i in range(b)])
    assert got.shape == (b,)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_log_prob_broadcasts_z_against_mean(kind):
    rng = np.random.default_rng(1)
    k = 3
    g = _rand_gaussian(rng, kind, k, (2,))
    z = rng.standard_normal((6, 2, k)).astype(np.float32)
    got = np.asarray(g.log_prob(jnp.asarray(z)))
    cov = _cov_np(g)
    want = np.array([[stats.multivariate_normal(_f64(g.mean[j]), cov[j]).logpdf(_f64(z[n, j]))
                      for j in range(2)] for n in range(6)])
    assert got.shape == (6, 2)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-5)


def test_standard_normal_log_prob_matches_scipy():
    z = np.random.default_rng(2).standard_normal((7, 3)).astype(np.float32)
    got = np.asarray(gaussian.standard_normal_log_prob(jnp.asarray(z)))
    want = stats.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(_f64(z))
    np.testing.assert_allclose(got, want, rtol=RTOL)


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_sample_shapes(kind):
    g = _rand_gaussian(np.random.default_rng(3), kind, 3, (4,))
    key = jax.random.key(0)
    assert g.sample(key).shape == (4, 3)
    assert g.sample(key, 5).shape == (5, 4, 3)
    # Different keys give different draws; the same key the same draw.
    np.testing.assert_array_equal(g.sample(key), g.sample(key))
    assert not np.allclose(g.sample(key), g.sample(jax.random.key(1)))


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_sample_moments_match_mean_and_covariance(kind):
    rng = np.random.default_rng(4)
    k, n = 3, 200_000
    g = _rand_gaussian(rng, kind, k)
    z = _f64(g.sample(jax.random.key(7), n))
    assert z.shape == (n, k)
    mu, cov = _f64(g.mean), _cov_np(g)
    # Means: standard error sqrt(Σᵢᵢ/n).
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(z.mean(0) - mu) < 5 * se_mean), (z.mean(0), mu)
    # Covariances: Var(ẑᵢẑⱼ) ≈ (ΣᵢᵢΣⱼⱼ + Σᵢⱼ²)/n for a Gaussian.
    emp = np.cov(z, rowvar=False)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(emp - cov) < 5 * se_cov), (emp, cov)


def test_sample_is_reparameterized():
    """d sample / d mean = I and d sample / d log_var = ½ σ ε: gradients flow to both."""
    g = _rand_gaussian(np.random.default_rng(5), "diag", 3)
    key = jax.random.key(3)
    eps = _f64(gaussian.Gaussian(mean=jnp.zeros(3), log_var=jnp.zeros(3)).sample(key))

    def f(mean, log_var):
        return gaussian.Gaussian(mean=mean, log_var=log_var).sample(key).sum()

    dm, dv = jax.grad(f, argnums=(0, 1))(g.mean, g.log_var)
    np.testing.assert_allclose(dm, np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(dv, 0.5 * np.exp(0.5 * _f64(g.log_var)) * eps, rtol=1e-5)
    np.testing.assert_allclose(g.sample(key), _f64(g.mean) + np.exp(0.5 * _f64(g.log_var)) * eps,
                               rtol=1e-5, atol=1e-6)


def test_tril_of_diagonal_and_full():
    rng = np.random.default_rng(6)
    g = _rand_gaussian(rng, "diag", 4, (2,))
    want = np.exp(0.5 * _f64(g.log_var))[..., None] * np.eye(4)
    np.testing.assert_allclose(g.tril(), want, rtol=1e-6)
    assert g.is_diagonal and g.latent_dim == 4
    f = _rand_gaussian(rng, "full", 4, (2,))
    np.testing.assert_array_equal(f.tril(), f.scale_tril)
    assert not f.is_diagonal


def test_log_variances():
    rng = np.random.default_rng(7)
    f = _rand_gaussian(rng, "full", 4, (3,))
    want = np.log(np.diagonal(_cov_np(f), axis1=-2, axis2=-1))
    np.testing.assert_allclose(f.log_variances(), want, rtol=1e-5, atol=1e-6)
    d = _rand_gaussian(rng, "diag", 4, (3,))
    np.testing.assert_array_equal(d.log_variances(), d.log_var)


# --------------------------------------------------------------------------------------
# KL dispatch against an independent float64 reference


def _kl_ref(mq, sq, mp, sp):
    """(kl, trace, mahalanobis, log_det_ratio, k) for one example, naive float64 formula."""
    k = mq.shape[-1]
    sp_inv = np.linalg.inv(sp)
    dm = mp - mq
    tr = np.trace(sp_inv @ sq)
    mh = dm @ sp_inv @ dm
    ldr = np.linalg.slogdet(sp)[1] - np.linalg.slogdet(sq)[1]
    return 0.5 * (tr + mh - k + ldr), tr, mh, ldr, k


def _kl_chain_rule_ref(mq, sq, mp, sp):
    """[k] per-dimension KLs E_{q(z<ᵢ)} KL(q(zᵢ|z<ᵢ) || p(zᵢ|z<ᵢ)), float64, via conditionals."""
    out = []
    for i in range(mq.shape[-1]):
        bq = np.linalg.solve(sq[:i, :i], sq[:i, i]) if i else np.zeros(0)
        bp = np.linalg.solve(sp[:i, :i], sp[:i, i]) if i else np.zeros(0)
        vq = sq[i, i] - sq[i, :i] @ bq
        vp = sp[i, i] - sp[i, :i] @ bp
        # mean difference of the conditionals, linear in z<ᵢ ~ q: c + (bq − bp)ᵀ(z<ᵢ − mq<ᵢ)
        c = mq[i] - mp[i] + bp @ (mp[:i] - mq[:i])
        b = bq - bp
        e_sq = c**2 + b @ sq[:i, :i] @ b
        out.append(0.5 * (vq / vp - 1 - np.log(vq / vp) + e_sq / vp))
    return np.array(out)


def _prior_moments(p, k):
    if p is None:
        return np.zeros(k), np.eye(k)
    return np.broadcast_to(_f64(p.mean), (k,)), _cov_np(p)


@pytest.mark.parametrize("q_kind,p_kind", list(itertools.product(["diag", "full"],
                                                                  [None, "diag", "full"])))
def test_kl_dispatch_matches_reference(q_kind, p_kind):
    rng = np.random.default_rng(10)
    k, b = 3, 4
    q = _rand_gaussian(rng, q_kind, k, (b,))
    p = None if p_kind is None else _rand_gaussian(rng, p_kind, k)  # unbatched prior, [k]
    got = np.asarray(gaussian.kl(q, p))
    per_dim = np.asarray(gaussian.kl(q, p, per_dim=True))
    terms = gaussian.kl_terms(q, p)
    terms_pd = gaussian.kl_terms(q, p, per_dim=True)
    assert got.shape == (b,) and per_dim.shape == (b, k)
    mp, sp = _prior_moments(p, k)
    sq = _cov_np(q)
    for i in range(b):
        kl, tr, mh, ldr, kk = _kl_ref(_f64(q.mean[i]), sq[i], mp, sp)
        np.testing.assert_allclose(got[i], kl, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(terms.trace[i], tr, rtol=1e-4)
        np.testing.assert_allclose(terms.mahalanobis[i], mh, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(terms.log_det_ratio[i], ldr, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(terms.dim[i], kk)
        # The per-dimension values are the chain-rule decomposition (the ordinary
        # per-dimension KLs when both covariances are diagonal) and sum to the total.
        np.testing.assert_allclose(per_dim[i], _kl_chain_rule_ref(_f64(q.mean[i]), sq[i], mp, sp),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_dim.sum(-1), got, rtol=1e-5, atol=1e-6)
    for t, t_pd in zip(terms, terms_pd):
        assert t_pd.shape == (b, k)
        np.testing.assert_allclose(np.asarray(t_pd).sum(-1), t, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Posteriors and priors


def test_tril_from_layout():
    k = 4
    rng = np.random.default_rng(12)
    log_var = rng.standard_normal((2, 3, k)).astype(np.float32)
    off = rng.standard_normal((2, 3, k * (k - 1) // 2)).astype(np.float32)
    l = np.asarray(posteriors.tril_from(jnp.asarray(log_var), jnp.asarray(off)))
    assert l.shape == (2, 3, k, k)
    # Upper triangle exactly zero, diagonal exp(½ log_var) > 0.
    iu = np.triu_indices(k, 1)
    assert np.all(l[..., iu[0], iu[1]] == 0)
    np.testing.assert_allclose(np.diagonal(l, axis1=-2, axis2=-1), np.exp(0.5 * _f64(log_var)),
                               rtol=1e-6)
    # Strictly-lower entries row by row: (1,0), (2,0), (2,1), (3,0), (3,1), (3,2).
    n = 0
    for r in range(k):
        for c in range(r):
            np.testing.assert_array_equal(l[..., r, c], off[..., n])
            n += 1
    assert n == off.shape[-1]


def test_tril_from_is_a_valid_factor_even_with_extreme_log_var():
    l = np.asarray(posteriors.tril_from(jnp.array([-30.0, 0.0, 30.0]), jnp.array([5.0, -5.0, 5.0])))
    assert np.all(np.diag(l) > 0) and np.all(np.isfinite(l))


def _linear_np(layer, h):
    return h @ _f64(layer.kernel[...]) + _f64(layer.bias[...])


@pytest.mark.parametrize("family,k", [("diag", 3), ("full", 3), ("full", 1)])
def test_gaussian_head(family, k):
    """The head's Gaussian against a float64 NumPy evaluation of its linear layers."""
    f = 5
    head = posteriors.GaussianHead(family, f, k, rngs=_rngs())
    h = np.random.default_rng(13).standard_normal((2, 4, f)).astype(np.float32)
    q = head(jnp.asarray(h))
    mean, log_var = _linear_np(head.mean, _f64(h)), _linear_np(head.log_var, _f64(h))
    assert q.mean.shape == (2, 4, k)
    np.testing.assert_allclose(q.mean, mean, rtol=1e-5, atol=1e-6)
    n_off = k * (k - 1) // 2
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(head, nnx.Param)))
    n_out = 2 * k + (n_off if family == "full" else 0)
    assert n_params == (f + 1) * n_out
    if family == "diag":
        assert q.is_diagonal
        np.testing.assert_allclose(q.log_var, log_var, rtol=1e-5, atol=1e-6)
        return
    assert not q.is_diagonal and q.scale_tril.shape == (2, 4, k, k)
    off = _linear_np(head.off, _f64(h)) if n_off else np.zeros((2, 4, 0))
    want = np.zeros((2, 4, k, k))
    want[..., np.arange(k), np.arange(k)] = np.exp(0.5 * log_var)
    rows, cols = np.tril_indices(k, -1)  # row by row
    want[..., rows, cols] = off
    np.testing.assert_allclose(q.scale_tril, want, rtol=1e-5, atol=1e-6)


def test_unknown_posterior_family_raises():
    with pytest.raises(ValueError, match="unknown posterior family 'lowrank'"):
        posteriors.GaussianHead("lowrank", 4, 3, rngs=_rngs())


@pytest.mark.parametrize("kind", ["std_normal", "diag", "full"])
def test_prior_starts_at_standard_normal(kind):
    p = Prior(kind, 3)
    g = p()
    if kind == "std_normal":
        assert g is None
        assert not nnx.state(p, nnx.Param)  # nothing to learn
        return
    np.testing.assert_array_equal(g.mean, np.zeros(3))
    np.testing.assert_allclose(g.tril(), np.eye(3))
    assert g.is_diagonal == (kind == "diag")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(p, nnx.Param)))
    assert n_params == (6 if kind == "diag" else 9)


def test_diag_prior_uses_its_parameters():
    p = Prior("diag", 3)
    p.mean[...] = jnp.array([1.0, 2.0, 3.0])
    p.log_var[...] = jnp.array([0.0, math.log(4.0), math.log(9.0)])
    g = p()
    np.testing.assert_array_equal(g.mean, [1, 2, 3])
    np.testing.assert_allclose(g.tril(), np.diag([1.0, 2.0, 3.0]), rtol=1e-6)


def test_full_prior_uses_its_parameters():
    p = Prior("full", 3)
    p.mean[...] = jnp.array([1.0, 2.0, 3.0])
    p.log_var[...] = jnp.array([0.0, math.log(4.0), math.log(9.0)])
    p.off[...] = jnp.array([0.5, -1.0, 0.25])
    l = np.asarray(p().scale_tril)
    np.testing.assert_allclose(l, [[1, 0, 0], [0.5, 2, 0], [-1, 0.25, 3]], rtol=1e-6)
    np.testing.assert_array_equal(p().mean, [1, 2, 3])


def test_unknown_prior_raises():
    with pytest.raises(ValueError, match="unknown prior"):
        Prior("laplace", 3)


# --------------------------------------------------------------------------------------
# Likelihoods


def test_bernoulli_binary_matches_scipy():
    rng = np.random.default_rng(20)
    x = rng.integers(0, 2, (3, 4, 5, 2)).astype(np.float32)
    out = (3.0 * rng.standard_normal(x.shape)).astype(np.float32)
    got = np.asarray(Likelihood("bernoulli").log_prob(jnp.asarray(x), jnp.asarray(out)))
    p = 1.0 / (1.0 + np.exp(-_f64(out)))
    want = stats.bernoulli.logpmf(x.astype(int), p).sum(axis=(1, 2, 3))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_bernoulli_grey_levels_are_cross_entropy():
    rng = np.random.default_rng(21)
    x = rng.uniform(size=(2, 3, 3, 1)).astype(np.float32)
    out = (2.0 * rng.standard_normal(x.shape)).astype(np.float32)
    got = np.asarray(Likelihood("bernoulli").log_prob(jnp.asarray(x), jnp.asarray(out)))
    p = 1.0 / (1.0 + np.exp(-_f64(out)))
    want = (_f64(x) * np.log(p) + (1 - _f64(x)) * np.log1p(-p)).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_bernoulli_is_stable_for_large_logits():
    x = jnp.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 2, 2, 1)
    out = jnp.array([200.0, -200.0, -200.0, 200.0]).reshape(1, 2, 2, 1)
    got = float(Likelihood("bernoulli").log_prob(x, out)[0])
    np.testing.assert_allclose(got, -400.0, rtol=1e-6)


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_gaussian_matches_scipy(sigma):
    rng = np.random.default_rng(22)
    x = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
    out = rng.uniform(size=x.shape).astype(np.float32)
    got = np.asarray(Likelihood("gaussian", sigma).log_prob(jnp.asarray(x), jnp.asarray(out)))
    want = stats.norm.logpdf(_f64(x), _f64(out), sigma).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=RTOL)
    assert not nnx.state(Likelihood("gaussian", sigma), nnx.Param)


def test_gaussian_learned_starts_at_sigma_and_gets_gradient():
    sigma = 0.5
    lik = Likelihood("gaussian_learned", sigma)
    np.testing.assert_allclose(float(lik.log_var[...]), 2 * math.log(sigma), rtol=1e-6)
    rng = np.random.default_rng(23)
    x = jnp.asarray(rng.uniform(size=(2, 3, 3, 1)).astype(np.float32))
    out = jnp.asarray(rng.uniform(size=(2, 3, 3, 1)).astype(np.float32))
    np.testing.assert_allclose(lik.log_prob(x, out), Likelihood("gaussian", sigma).log_prob(x, out),
                               rtol=1e-6)

    grads = nnx.grad(lambda m: m.log_prob(x, out).sum())(lik)
    g = float(grads["log_var"][...])
    # d/dv Σ −½((x−o)² e^{−v} + v + log 2π) = ½ Σ ((x−o)² e^{−v} − 1).
    want = 0.5 * np.sum(np.square(_f64(x) - _f64(out)) / sigma**2 - 1)
    np.testing.assert_allclose(g, want, rtol=1e-5)
    assert g != 0

    # A changed log σ² changes the log-probability as scipy says.
    lik.log_var[...] = jnp.asarray(0.0)
    want = stats.norm.logpdf(_f64(x), _f64(out), 1.0).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(lik.log_prob(x, out), want, rtol=RTOL)


def test_likelihood_mean():
    out = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_allclose(Likelihood("bernoulli").mean(out), 1 / (1 + np.exp(-_f64(out))),
                               rtol=1e-6)
    np.testing.assert_array_equal(Likelihood("gaussian").mean(out), out)
    np.testing.assert_array_equal(Likelihood("gaussian_learned").mean(out), out)


def test_bad_likelihoods_raise():
    with pytest.raises(ValueError, match="unknown likelihood"):
        Likelihood("poisson")
    with pytest.raises(ValueError, match="must be > 0"):
        Likelihood("gaussian", 0.0)


# --------------------------------------------------------------------------------------
# Networks


def _rngs(seed=0):
    return nnx.Rngs(params=jax.random.key(seed))


def _abstract(make):
    """Builds a module abstractly (no initializer runs): shapes and construction errors only."""
    return nnx.eval_shape(make)


def _out_shape(module, *args, method="__call__"):
    """Output shape(s) of ``module.method(*args)`` by abstract evaluation (nothing compiled)."""
    graphdef, state = nnx.split(module)
    specs = [jax.ShapeDtypeStruct(a, jnp.float32) for a in args]
    out = jax.eval_shape(lambda s, *xs: getattr(nnx.merge(graphdef, s), method)(*xs), state, *specs)
    return jax.tree.map(lambda o: o.shape, out)


def test_mlp_encoder_decoder_shapes():
    shape = (8, 8, 1)
    enc = networks.MLPEncoder(shape, (16,), "tanh", rngs=_rngs())
    dec = networks.MLPDecoder(3, (16,), shape, "relu", rngs=_rngs())
    assert enc.features == 16
    x = _uniform(0, (2, 5, *shape))
    h = np.asarray(enc(x))
    assert h.shape == (2, 5, 16) and enc(x[0]).shape == (5, 16) and enc(x[0, 0]).shape == (16,)
    # The features are the activated hidden layer: tanh(x W + b).
    np.testing.assert_allclose(h, np.tanh(_linear_np(enc.mlp.layers[0], _f64(x).reshape(2, 5, -1))),
                               rtol=1e-5, atol=1e-6)
    assert dec(jnp.zeros((5, 3))).shape == (5, *shape)
    assert dec(jnp.zeros((2, 5, 3))).shape == (2, 5, *shape)
    assert len(dec.mlp.layers) == 2
    deep = _abstract(lambda: networks.MLPEncoder(shape, (16, 8, 4), "tanh", rngs=_rngs()))
    assert deep.features == 4 and _out_shape(deep, (7, *shape)) == (7, 4)
    # No hidden layers: the features are the flattened pixels.
    flat = networks.MLPEncoder(shape, (), "tanh", rngs=_rngs())
    assert flat.features == 64
    np.testing.assert_array_equal(flat(x), np.asarray(x).reshape(2, 5, 64))


def test_mlp_matches_numpy_forward():
    mlp = networks.MLP(4, (5,), 3, "tanh", rngs=_rngs(1))
    x = np.random.default_rng(30).standard_normal((2, 4)).astype(np.float32)
    w0, b0 = _f64(mlp.layers[0].kernel[...]), _f64(mlp.layers[0].bias[...])
    w1, b1 = _f64(mlp.layers[1].kernel[...]), _f64(mlp.layers[1].bias[...])
    want = np.tanh(_f64(x) @ w0 + b0) @ w1 + b1  # no activation after the last layer
    np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,channels", [((28, 28, 1), (32, 64)), ((32, 32, 3), (32, 64)),
                                            ((64, 64, 3), (32, 64, 64)), ((64, 64, 1), (8, 8, 8, 8))])
def test_conv_encoder_decoder_shapes(shape, channels):
    # Built and evaluated abstractly: the real thing would compile every conv on the CPU.
    enc = _abstract(lambda: networks.ConvEncoder(shape, channels, 10, "relu", rngs=_rngs()))
    dec = _abstract(lambda: networks.ConvDecoder(5, channels, 32, shape, "relu", rngs=_rngs()))
    side = shape[0] // 2 ** len(channels)
    assert enc.dense.in_features == side * side * channels[-1] and enc.features == 10
    assert dec.project.out_features == side * side * channels[-1]
    assert len(enc.convs) == len(dec.deconvs) == len(channels)
    assert _out_shape(enc, (2, *shape)) == (2, 10)
    assert _out_shape(enc, (2, 1, *shape)) == (2, 1, 10)
    assert _out_shape(enc, shape) == (10,)
    assert _out_shape(dec, (2, 5)) == (2, *shape)
    assert _out_shape(dec, (3, 2, 5)) == (3, 2, *shape)


@pytest.mark.parametrize("shape,channels", [((28, 28, 1), (32, 64, 64)), ((32, 28, 1), (32, 64)),
                                            ((30, 30, 1), (32, 64))])
def test_bad_conv_sizes_raise(shape, channels):
    with pytest.raises(ValueError, match="square images whose side is divisible"):
        _abstract(lambda: networks.ConvEncoder(shape, channels, 16, "relu", rngs=_rngs()))
    with pytest.raises(ValueError, match=rf"2\^{len(channels)} = {2 ** len(channels)}.*got "
                                         rf"{shape[0]}×{shape[1]}"):
        _abstract(lambda: networks.ConvDecoder(3, channels, 16, shape, "relu", rngs=_rngs()))


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation 'sigmoidish'"):
        networks.activation("sigmoidish")
    with pytest.raises(ValueError, match="unknown activation"):
        networks.MLP(2, (3,), 1, "sigmoidish", rngs=_rngs())
    x = jnp.array([-1.0, 2.0])
    np.testing.assert_array_equal(networks.activation("linear")(x), x)
    np.testing.assert_array_equal(networks.activation("relu")(x), [0.0, 2.0])


# --------------------------------------------------------------------------------------
# The VAE


def _config(**overrides):
    c = config_lib.defaults()
    c.encoder_hidden = (16,)
    c.decoder_hidden = (16,)
    c.conv_channels = (4, 4)  # real conv models are 8×8 here; realistic sizes are abstract
    c.conv_hidden = 8
    c.latent_dim = 3
    for k, v in overrides.items():
        c[k] = v
    config_lib.validate(c)
    return c


_MLP_SHAPE = (8, 8, 1)
_VAE_CASES = [
    dict(model="mlp", posterior=post, prior=prior, likelihood=lik)
    for (post, prior), lik in zip(itertools.product(["diag", "full"], ["std_normal", "diag", "full"]),
                                  itertools.cycle(["bernoulli", "gaussian", "gaussian_learned"]))
]


@pytest.mark.parametrize("overrides", _VAE_CASES, ids=lambda o: "-".join(o.values()))
def test_make_vae_shapes(overrides):
    shape = _MLP_SHAPE
    c = _config(**overrides)
    model = make_vae(c, shape, jax.random.key(0))
    assert isinstance(model, VAE)
    x = _uniform(1, (4, *shape))
    q = model.encode(x)
    k = c.latent_dim
    assert q.mean.shape == (4, k)
    if c.posterior == "diag":
        assert q.is_diagonal and q.log_var.shape == (4, k)
    else:
        assert q.scale_tril.shape == (4, k, k)
        np.testing.assert_array_equal(np.triu(np.asarray(q.scale_tril), 1), 0)
    assert model.decode(q.mean).shape == (4, *shape)
    samples = model.sample(jax.random.key(2), 5)
    recon = model.reconstruct(x)
    assert samples.shape == (5, *shape) and recon.shape == (4, *shape)
    if c.likelihood == "bernoulli":  # E[x|z] is a probability
        assert np.all((np.asarray(samples) >= 0) & (np.asarray(samples) <= 1))
    # The prior and likelihood are what the config asks for.
    assert (model.prior() is None) == (c.prior == "std_normal")
    assert model.likelihood.kind == c.likelihood
    assert ("log_var" in nnx.state(model.likelihood, nnx.Param)) == (c.likelihood == "gaussian_learned")


@pytest.mark.parametrize("shape,channels,posterior", [((28, 28, 1), (32, 64), "diag"),
                                                      ((32, 32, 3), (32, 64), "full"),
                                                      ((64, 64, 3), (32, 64, 64), "full")])
def test_make_vae_conv_shapes_at_dataset_sizes(shape, channels, posterior):
    c = _config(model="conv", conv_channels=channels, conv_hidden=256, posterior=posterior,
                latent_dim=8, prior="full", likelihood="gaussian")
    model = _abstract(lambda: make_vae(c, shape, jax.random.key(0)))
    q = _out_shape(model, (4, *shape), method="encode")
    assert q.mean == (4, 8)
    assert (q.log_var if posterior == "diag" else q.scale_tril) == ((4, 8) if posterior == "diag"
                                                                    else (4, 8, 8))
    assert _out_shape(model, (4, 8), method="decode") == (4, *shape)
    assert _out_shape(model, (4, *shape), method="reconstruct") == (4, *shape)
    graphdef, state = nnx.split(model)
    samples = jax.eval_shape(lambda s: nnx.merge(graphdef, s).sample(jax.random.key(0), 6), state)
    assert samples.shape == (6, *shape)
    with pytest.raises(ValueError, match="divisible"):
        make_vae(_config(model="conv", conv_channels=(8, 8, 8)), (28, 28, 1), jax.random.key(0))


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_make_vae_mlp_is_deterministic_in_its_key():
    c = _config(posterior="full", prior="full")
    a, b = (make_vae(c, _MLP_SHAPE, jax.random.key(0)) for _ in range(2))
    other = make_vae(c, _MLP_SHAPE, jax.random.key(1))
    pa, pb, po = _params(a), _params(b), _params(other)
    assert len(pa) == len(pb) == len(po) > 0
    for u, v in zip(pa, pb):
        np.testing.assert_array_equal(u, v)
    # Every weight matrix (ndim >= 2, randomly initialized) differs with a different key.
    mats = [(u, v) for u, v in zip(pa, po) if u.ndim >= 2]
    assert mats and all(not np.array_equal(u, v) for u, v in mats)


@functools.cache
def _conv_vae_run():
    """A real (small, 8×8) conv VAE built and applied under one jit: eager conv init would
    compile op by op. Returns its config and run(key, x, z) → params and outputs."""
    c = _config(model="conv", prior="diag", likelihood="bernoulli")

    @jax.jit
    def run(key, x, z):
        m = make_vae(c, _MLP_SHAPE, key)
        q = m.encode(x)
        return dict(params=nnx.state(m, nnx.Param), mean=q.mean, log_var=q.log_var,
                    decode=m.decode(z), sample=m.sample(jax.random.key(2), 5),
                    recon=m.reconstruct(x), enc=m.encoder(x), enc_12=m.encoder(x[1, 2][None])[0],
                    dec_10=m.decoder(z[1, 0][None])[0])

    return c, run


def test_make_vae_conv_runs_and_is_deterministic_in_its_key():
    """Shapes with two batch axes, outputs per example (flattening and restoring the batch
    axes around the convs does not mix examples), E[x|z] in [0, 1], and key determinism."""
    c, run = _conv_vae_run()
    x, z = _uniform(0, (2, 3, *_MLP_SHAPE)), _normal(1, (2, 3, c.latent_dim))
    a, b, other = run(jax.random.key(0), x, z), run(jax.random.key(0), x, z), run(jax.random.key(1), x, z)
    assert a["mean"].shape == a["log_var"].shape == (2, 3, c.latent_dim)
    assert a["decode"].shape == a["recon"].shape == (2, 3, *_MLP_SHAPE)
    enc = np.asarray(a["enc"])
    assert enc.shape == (2, 3, c.conv_hidden)
    np.testing.assert_allclose(enc[1, 2], a["enc_12"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["decode"][1, 0], a["dec_10"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(enc[0, 0], enc[1, 2]) and not np.allclose(a["decode"][0, 0], a["decode"][1, 0])
    assert np.all(np.isfinite(enc)) and np.all(np.isfinite(a["decode"]))
    assert a["sample"].shape == (5, *_MLP_SHAPE)
    assert np.all((np.asarray(a["sample"]) >= 0) & (np.asarray(a["sample"]) <= 1))
    assert np.all((np.asarray(a["recon"]) >= 0) & (np.asarray(a["recon"]) <= 1))
    pa, pb, po = (jax.tree.leaves(r["params"]) for r in (a, b, other))
    assert len(pa) == len(po) > 0
    for u, v in zip(pa, pb):
        np.testing.assert_array_equal(u, v)
    mats = [(u, v) for u, v in zip(pa, po) if u.ndim >= 2]
    assert len(mats) >= 6 and all(not np.array_equal(u, v) for u, v in mats)  # convs and denses
    assert not np.allclose(a["decode"], other["decode"])


def test_split_merge_round_trip():
    c = _config(posterior="full", prior="full", likelihood="gaussian_learned")
    model = make_vae(c, _MLP_SHAPE, jax.random.key(0))
    model.prior.mean[...] = jnp.array([0.5, -0.5, 1.0])  # a non-initial state survives too
    graphdef, state = nnx.split(model)
    clone = nnx.merge(graphdef, state)
    x = _uniform(1, (3, *_MLP_SHAPE))
    qa, qb = model.encode(x), clone.encode(x)
    np.testing.assert_array_equal(qa.mean, qb.mean)
    np.testing.assert_array_equal(qa.scale_tril, qb.scale_tril)
    np.testing.assert_array_equal(model.reconstruct(x), clone.reconstruct(x))
    np.testing.assert_array_equal(model.sample(jax.random.key(5), 4), clone.sample(jax.random.key(5), 4))
    np.testing.assert_array_equal(clone.prior().mean, [0.5, -0.5, 1.0])


def test_reconstruct_decodes_the_posterior_mean():
    c = _config()
    model = make_vae(c, _MLP_SHAPE, jax.random.key(0))
    x = _uniform(1, (2, *_MLP_SHAPE))
    want = jax.nn.sigmoid(model.decode(model.encode(x).mean))
    np.testing.assert_allclose(model.reconstruct(x), want, rtol=1e-6)


@pytest.mark.parametrize("prior", ["std_normal", "full"])
def test_sample_draws_from_the_prior(prior):
    """With a linear decoder and a Gaussian likelihood, samples are W z + b for z ~ p(z):
    their empirical mean is W μp + b and their covariance W Σp Wᵀ."""
    c = _config(decoder_hidden=(), prior=prior, likelihood="gaussian")
    model = make_vae(c, (2, 2, 1), jax.random.key(0))
    mu_p, cov_p = np.zeros(3), np.eye(3)
    if prior == "full":
        model.prior.mean[...] = jnp.array([2.0, -1.0, 0.5])
        model.prior.log_var[...] = jnp.array([0.5, -0.5, 0.0])
        model.prior.off[...] = jnp.array([0.7, -0.3, 0.4])
        g = model.prior()
        mu_p, cov_p = _f64(g.mean), _cov_np(g)
    layer = model.decoder.mlp.layers[0]
    w, b = _f64(layer.kernel[...]), _f64(layer.bias[...])
    n = 50_000
    s = _f64(model.sample(jax.random.key(3), n)).reshape(n, -1)
    mean, cov = b + mu_p @ w, w.T @ cov_p @ w
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(s.mean(0) - mean) < 5 * se), (s.mean(0), mean)
    np.testing.assert_allclose(np.cov(s, rowvar=False), cov, atol=0.05 * np.abs(cov).max())


def test_set_output_bias():
    c = _config()
    model = make_vae(c, _MLP_SHAPE, jax.random.key(0))
    z = _normal(1, (2, 3))
    before = np.asarray(model.decode(z))
    bias = _normal(2, _MLP_SHAPE)
    old = np.asarray(model.decoder.mlp.layers[-1].bias[...]).reshape(_MLP_SHAPE)
    set_output_bias(model, bias)
    np.testing.assert_array_equal(model.decoder.mlp.layers[-1].bias[...], np.asarray(bias).ravel())
    np.testing.assert_allclose(model.decode(z), before + (np.asarray(bias) - old), rtol=1e-5, atol=1e-5)
    conv = _abstract(lambda: make_vae(_config(model="conv"), (28, 28, 1), jax.random.key(0)))
    with pytest.raises(ValueError, match="MLP decoders only"):
        set_output_bias(conv, jnp.zeros((28, 28, 1)))


def test_unknown_model_raises():
    c = config_lib.defaults()
    c.model = "transformer"
    with pytest.raises(ValueError, match="unknown model"):
        make_vae(c, _MLP_SHAPE, jax.random.key(0))


@pytest.mark.parametrize("size,k,s,padding", [(8, 4, 2, "SAME"), (5, 4, 2, "SAME"), (6, 3, 2, "SAME"),
                                              (4, 4, 2, "VALID"), (4, 5, 3, "SAME")])
def test_conv_transpose_by_phases_equals_flax(size, k, s, padding):
    """networks.ConvTranspose computes flax's ConvTranspose (lax.conv_transpose) exactly, values
    and gradients, without XLA:CPU's slow input-dilated convolution."""
    from vaekl.models import conv as conv_lib, networks
    ref = nnx.ConvTranspose(3, 4, kernel_size=(k, k), strides=(s, s), padding=padding, rngs=nnx.Rngs(0))
    fast = networks.ConvTranspose(3, 4, kernel_size=(k, k), strides=(s, s), padding=padding,
                                  rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(fast.kernel[...], ref.kernel[...])  # same initialisation
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    np.testing.assert_allclose(fast(x), ref(x), rtol=1e-5, atol=1e-5)
    grad = lambda m: jax.grad(lambda kern, xx: jnp.sum(jnp.sin(  # noqa: E731
        conv_lib.conv_transpose(xx, kern, (s, s), padding, impl="cpu") if m is fast else
        jax.lax.conv_transpose(xx, kern, (s, s), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))),
        argnums=(0, 1))(ref.kernel[...], x)
    for a, b in zip(grad(fast), grad(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
