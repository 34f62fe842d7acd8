"""Tests of vaekl.objectives and the β/capacity schedules: per-example ELBO parts, the objective
with the kl, free_bits and capacity regularizers (the others are in test_regularizers.py).

Conventions: sums over pixels and latent dimensions, mean over the batch, nats.
References are float64 NumPy/SciPy computations written here from the model's raw weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from vaekl import config as config_lib
from vaekl import objectives, schedules
from vaekl.models.vae import make_vae

SHAPE = (8, 8, 1)
K = 3
MASK = jnp.array([1.0, 0.0, 1.0])


def _f64(a):
    return np.asarray(a, np.float64)


def _model(posterior="diag", prior="diag", likelihood="bernoulli", seed=0):
    """A tiny MLP VAE; learned priors are moved off N(0, I) so every KL term is non-trivial."""
    c = config_lib.defaults()
    c.encoder_hidden = (16,)
    c.decoder_hidden = (16,)
    c.latent_dim = K
    c.posterior, c.prior, c.likelihood = posterior, prior, likelihood
    model = make_vae(c, SHAPE, jax.random.key(seed))
    if prior != "std_normal":
        model.prior.mean[...] = jnp.array([0.3, -0.5, 0.2])
        model.prior.log_var[...] = jnp.array([0.4, -0.3, 0.1])
    if prior == "full":
        model.prior.off[...] = jnp.array([0.3, -0.2, 0.25])
    return model


def _binary_x(seed, n):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 2, (n, *SHAPE)), jnp.float32)


# --------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("schedule,kw,steps,want", [
    ("constant", {}, [0, 1, 500, 10**6], [1, 1, 1, 1]),
    ("linear", dict(warmup_steps=100), [0, 25, 50, 100, 200], [0, 0.25, 0.5, 1, 1]),
    # Fu et al.: M = 2 cycles of 100 steps over num_steps = 200, ramp R = 0.5.
    ("cyclical", dict(cycles=2, ramp=0.5, num_steps=200),
     [0, 25, 50, 60, 99, 100, 125, 160, 199], [0, 0.5, 1, 1, 1, 0, 0.5, 1, 1]),
    ("cyclical", dict(cycles=4, ramp=0.25, num_steps=160), [0, 5, 10, 39, 40, 45],
     [0, 0.5, 1, 1, 0, 0.5]),
    # A period that does not divide num_steps: the run still ends at the top of its last cycle.
    ("cyclical", dict(cycles=3, ramp=0.5, num_steps=1000), [999, 334], [1, (334 - 1000 / 3) / (1000 / 3) / 0.5]),
])
def test_beta_weight(schedule, kw, steps, want):
    got = [float(schedules.beta_weight(schedule, s, **kw)) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Also with traced step and parameters, as in the trainer.
    traced = {k: v for k, v in kw.items() if k != "num_steps"}
    jitted = jax.jit(lambda s, p: schedules.beta_weight(schedule, s, num_steps=kw.get("num_steps", 1), **p))
    np.testing.assert_allclose([float(jitted(jnp.asarray(s), traced)) for s in steps], want,
                               rtol=1e-5, atol=1e-6)


def test_unknown_beta_schedule_raises():
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        schedules.beta_weight("exponential", 3)


def test_capacity():
    got = [float(schedules.capacity(s, 10.0, 100)) for s in (0, 25, 50, 100, 150, 10**5)]
    np.testing.assert_allclose(got, [0, 2.5, 5, 10, 10, 10], rtol=1e-6)
    assert float(schedules.capacity(1234, 0.0, 10)) == 0.0


def test_static_and_hyperparameters_from_config():
    c = config_lib.defaults()
    c.beta_schedule, c.beta_warmup_steps, c.free_bits = "linear", 77, 0.25
    static = objectives.Static.from_config(c, 1000)
    hash(static)  # static: usable as a jit static argument
    assert dict(static.settings)["beta_schedule"] == "linear" and static.dataset_size == 1000
    hp = objectives.hyperparameters(c)
    assert float(hp["beta_warmup_steps"]) == 77 and float(hp["free_bits"]) == 0.25
    assert "beta_schedule" not in hp and all(v.dtype == jnp.float32 for v in hp.values())


# --------------------------------------------------------------------------------------
# per_example


def _per_example(model, x, key, mask=None):
    return objectives.parts(model, x, key, mask).per_example


def _q_prior_np(model, x):
    """Posterior parameters and prior moments in float64 (k-vectors and k×k matrices)."""
    q = model.encode(x)
    mq = _f64(q.mean)
    if q.scale_tril is None:
        sq = np.exp(_f64(q.log_var))[..., None] * np.eye(K)
    else:
        lq = _f64(q.scale_tril)
        sq = lq @ np.swapaxes(lq, -1, -2)
    p = model.prior()
    if p is None:
        return mq, sq, np.zeros(K), np.eye(K)
    if p.scale_tril is None:
        return mq, sq, _f64(p.mean), np.diag(np.exp(_f64(p.log_var)))
    lp = _f64(p.scale_tril)
    return mq, sq, _f64(p.mean), lp @ lp.T


def _per_dim_terms_ref(mq, sq, mp, sp):
    """[k] per-dimension (trace, mahalanobis, log_det_ratio) of the chain-rule split, float64.

    With Sq = Lq Lqᵀ, Sp = Lp Lpᵀ (numpy Cholesky), M = Lp⁻¹Lq and a = Lp⁻¹(μp − μq):
    trace_i = Σⱼ Mᵢⱼ², mahalanobis_i = aᵢ², log_det_ratio_i = 2 log(Lp,ᵢᵢ / Lq,ᵢᵢ);
    for diagonal covariances these are the ordinary per-dimension terms.
    """
    lq, lp = np.linalg.cholesky(sq), np.linalg.cholesky(sp)
    m = np.linalg.solve(lp, lq)
    a = np.linalg.solve(lp, mp - mq)
    return (m**2).sum(-1), a**2, 2 * (np.log(np.diag(lp)) - np.log(np.diag(lq)))


def _kl_ref(mq, sq, mp, sp):
    sp_inv = np.linalg.inv(sp)
    d = mp - mq
    return 0.5 * (np.trace(sp_inv @ sq) + d @ sp_inv @ d - len(mq)
                  + np.linalg.slogdet(sp)[1] - np.linalg.slogdet(sq)[1])


@pytest.mark.parametrize("posterior,prior", [("diag", "diag"), ("full", "full"),
                                             ("diag", "std_normal"), ("full", "diag")])
def test_per_example_terms_and_mask(posterior, prior):
    model = _model(posterior, prior)
    x = _binary_x(0, 4)
    key = jax.random.key(1)
    out = _per_example(model, x, key, MASK)
    full = _per_example(model, x, key)
    assert out["recon"].shape == (4,) and out["kl_per_dim"].shape == (4, K)
    mq, sq, mp, sp = _q_prior_np(model, x)
    keep = np.asarray(MASK, bool)
    for b in range(4):
        tr, mh, ldr = _per_dim_terms_ref(mq[b], sq[b], mp, sp)
        kl_dims = 0.5 * (tr + mh - 1 + ldr)
        # Unmasked: the per-dimension KLs sum to the independent total.
        np.testing.assert_allclose(full["kl_per_dim"][b].sum(), _kl_ref(mq[b], sq[b], mp, sp),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(full["kl_per_dim"][b], kl_dims, rtol=1e-4, atol=1e-5)
        # Masked: the masked dimension contributes exactly 0, to the KL and to every term.
        assert out["kl_per_dim"][b, 1] == 0.0
        np.testing.assert_array_equal(out["kl_per_dim"][b, keep], full["kl_per_dim"][b, keep])
        np.testing.assert_allclose(out["kl_trace"][b], tr[keep].sum(), rtol=1e-4)
        np.testing.assert_allclose(out["kl_mahalanobis"][b], mh[keep].sum(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["kl_log_det_ratio"][b], ldr[keep].sum(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(full["kl_trace"][b], tr.sum(), rtol=1e-4)
    np.testing.assert_array_equal(out["kl_dim"], 2.0)
    np.testing.assert_array_equal(full["kl_dim"], 3.0)
    np.testing.assert_array_equal(np.asarray(out["posterior_mean"])[:, 1], 0.0)
    np.testing.assert_array_equal(np.asarray(out["posterior_mean"])[:, keep], mq[:, keep].astype(np.float32))
    # KL = ½(trace + mahalanobis − dim + log_det_ratio) per example, masked or not.
    for r in (out, full):
        total = 0.5 * (r["kl_trace"] + r["kl_mahalanobis"] - r["kl_dim"] + r["kl_log_det_ratio"])
        np.testing.assert_allclose(r["kl_per_dim"].sum(-1), total, rtol=1e-4, atol=1e-4)


def _shift_posterior(model, group, index, delta):
    """Adds ``delta`` to q's ``group`` ('mean' or 'log_var') at latent ``index`` for every x
    (through the posterior head's bias)."""
    bias = getattr(model.head, group).bias
    bias[...] = bias[...].at[index].add(delta)


@pytest.mark.parametrize("posterior", ["diag", "full"])
def test_decoder_ignores_masked_latents(posterior):
    """Moving a masked dimension's posterior (mean and log-variance) leaves the reconstruction
    term unchanged, draw for draw; moving an unmasked one changes it."""
    x = _binary_x(1, 4)
    key = jax.random.key(2)
    base = _model(posterior, "std_normal")
    recon = np.asarray(_per_example(base, x, key, MASK)["recon"])
    recon_unmasked = np.asarray(_per_example(base, x, key)["recon"])
    for group in ("mean", "log_var"):
        m = _model(posterior, "std_normal")
        _shift_posterior(m, group, 1, 3.0)
        np.testing.assert_array_equal(_per_example(m, x, key, MASK)["recon"], recon)
        assert not np.allclose(_per_example(m, x, key)["recon"], recon_unmasked)
    m = _model(posterior, "std_normal")
    _shift_posterior(m, "mean", 0, 3.0)  # dimension 0 is not masked
    assert not np.allclose(_per_example(m, x, key, MASK)["recon"], recon)


# --------------------------------------------------------------------------------------
# loss


def _grads(model, *fns):
    """For each fn, the leaves of d fn(model) / d params; all under one jit (eager autodiff
    would compile op by op)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(lambda p: [jax.grad(lambda p_: fn(nnx.merge(graphdef, p_, rest)))(p)
                               for fn in fns])
    return [jax.tree.leaves(g) for g in grads(params)]


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b) > 0
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def _loss(model, x, key, step, regularizer="kl", mask=None, **fields):
    """objectives.objective under a config with ``regularizer`` and ``fields`` → (loss, metrics)."""
    c = config_lib.defaults()
    c.regularizer = regularizer
    for k, v in fields.items():
        c[k] = v
    loss, (m, _) = objectives.objective(model, x, key, jnp.asarray(step), objectives.hyperparameters(c),
                                        objectives.Static.from_config(c, 100), mask)
    return loss, m


def _batch_parts(model, x, key, mask=None):
    """The parts objectives.objective sees for this key (it splits off the sample's key)."""
    return _per_example(model, x, jax.random.split(key)[0], mask)


def test_loss_plain_with_schedule():
    model = _model("full", "full")
    x, key = _binary_x(2, 4), jax.random.key(3)
    val, m = _loss(model, x, key, 50, beta=2.0, beta_schedule="linear", beta_warmup_steps=100)
    parts = _batch_parts(model, x, key)
    recon, kl = float(parts["recon"].mean()), float(parts["kl_per_dim"].sum(-1).mean())
    np.testing.assert_allclose(float(m["neg_elbo"]), recon + kl, rtol=1e-6)  # unweighted
    np.testing.assert_allclose(float(val), recon + 2.0 * 0.5 * kl, rtol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), float(val), rtol=0)
    np.testing.assert_allclose(float(m["penalty"]), 2.0 * 0.5 * kl, rtol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-6)
    np.testing.assert_allclose(float(m["recon"]), recon, rtol=1e-6)
    assert float(m["beta_weight"]) == 0.5
    np.testing.assert_allclose(m["kl_per_dim"], parts["kl_per_dim"].mean(0), rtol=1e-6)
    assert m["kl_per_dim"].shape == (K,) and "posterior_mean" not in m
    # The recon term is a real negative log-likelihood (> 0 for binary pixels) and KL > 0.
    assert recon > 0 and kl > 0


def test_loss_beta_zero_is_recon():
    model = _model("diag", "diag")
    x, key = _binary_x(3, 4), jax.random.key(4)
    for reg, fields in (("kl", {}), ("free_bits", dict(free_bits=5.0)),
                        ("capacity", dict(capacity_max=50.0, capacity_gamma=0.0))):
        val, m = _loss(model, x, key, 10, reg, beta=0.0, **fields)
        assert float(val) == float(m["recon"])
        assert float(m["neg_elbo"]) > float(m["recon"])  # the ELBO still counts the KL


def test_loss_free_bits_value_and_gradients():
    """Σᵢ max(λ, KLᵢ) over the batch-averaged KLs: with λ between them, the loss and its
    gradient equal those of recon + β·(Σ_{KLᵢ ≥ λ} KLᵢ + λ·#{KLᵢ < λ}) — dimensions below λ
    are not pushed down, masked dimensions not at all."""
    model = _model("diag", "diag")
    x, key, beta, step = _binary_x(4, 4), jax.random.key(5), 1.5, 0
    kl_dims = np.asarray(_batch_parts(model, x, key)["kl_per_dim"].mean(0))
    order = np.argsort(kl_dims)
    lam = float(0.5 * (kl_dims[order[0]] + kl_dims[order[1]]))  # exactly one dimension below λ
    above = kl_dims > lam
    assert above.sum() == K - 1

    val, m = _loss(model, x, key, step, "free_bits", beta=beta, free_bits=lam)
    want = float(m["recon"]) + beta * (kl_dims[above].sum() + lam * (~above).sum())
    np.testing.assert_allclose(float(val), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["neg_elbo"]), float(m["recon"]) + kl_dims.sum(), rtol=1e-5)

    def reference(mdl):
        parts = _batch_parts(mdl, x, key)
        return parts["recon"].mean() + beta * jnp.sum(parts["kl_per_dim"].mean(0) * above)

    got, want, plain = _grads(model,
                              lambda mdl: _loss(mdl, x, key, step, "free_bits", beta=beta, free_bits=lam)[0],
                              reference,
                              lambda mdl: _loss(mdl, x, key, step, "kl", beta=beta)[0])
    _assert_trees_close(got, want)
    # ... which differs from the plain objective's gradient (the clamped dimension matters).
    assert any(not np.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(got, plain))

    # With a mask on top: masked dims neither count λ nor get a gradient.
    mask = np.ones(K, np.float32)
    mask[order[-1]] = 0.0  # mask the largest-KL dimension
    keep_above = above & (mask > 0)
    val_m, _ = _loss(model, x, key, step, "free_bits", jnp.asarray(mask), beta=beta, free_bits=lam)
    parts_m = _batch_parts(model, x, key, jnp.asarray(mask))
    kl_m = np.asarray(parts_m["kl_per_dim"].mean(0))
    want_m = float(parts_m["recon"].mean()) + beta * (kl_m[keep_above].sum() + lam * ((~above) & (mask > 0)).sum())
    np.testing.assert_allclose(float(val_m), want_m, rtol=1e-5)


def test_loss_free_bits_above_every_kl_gives_recon_gradient():
    model = _model("full", "full")
    x, key, beta, step = _binary_x(5, 4), jax.random.key(6), 3.0, 0
    mask = jnp.array([1.0, 0.0, 1.0])
    val, m = _loss(model, x, key, step, "free_bits", mask, beta=beta, free_bits=100.0)
    np.testing.assert_allclose(float(val), float(m["recon"]) + beta * 100.0 * 2, rtol=1e-6)
    got, recon_only = _grads(
        model, lambda mdl: _loss(mdl, x, key, step, "free_bits", mask, beta=beta, free_bits=100.0)[0],
        lambda mdl: _loss(mdl, x, key, step, "kl", mask, beta=0.0)[0])
    _assert_trees_close(got, recon_only)


@pytest.mark.parametrize("per_example", [False, True])
def test_loss_capacity(per_example):
    model = _model("diag", "std_normal")
    x, key, gamma = _binary_x(6, 4), jax.random.key(7), 4.0
    parts = _batch_parts(model, x, key)
    kl_n = np.asarray(parts["kl_per_dim"].sum(-1), np.float64)
    recon, kl = float(parts["recon"].mean()), float(kl_n.mean())
    for c_max in (0.5 * kl / 0.25, 3.0 * kl / 0.25, kl / 0.25):  # C(25) = kl/2, 3·kl, kl
        val, m = _loss(model, x, key, 25, "capacity", capacity_max=c_max, capacity_steps=100,
                       capacity_gamma=gamma, capacity_per_example=per_example)
        c = c_max * 0.25
        np.testing.assert_allclose(float(m["capacity"]), c, rtol=1e-6)
        dev = np.abs(kl_n - c).mean() if per_example else abs(kl - c)
        np.testing.assert_allclose(float(val), recon + gamma * dev, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(m["neg_elbo"]), recon + kl, rtol=1e-6)
    # E|KL − C| ≥ |E KL − C|, strictly here (C = KL's batch mean and the KLs differ).
    if per_example:
        assert np.abs(kl_n - kl).mean() > 1e-3


def test_loss_masked_plain_kl():
    model = _model("full", "diag")
    x, key = _binary_x(7, 4), jax.random.key(8)
    _, m = _loss(model, x, key, 0, "kl", MASK)
    unmasked = _batch_parts(model, x, key)["kl_per_dim"].mean(0)
    np.testing.assert_allclose(float(m["kl"]), float(unmasked[0] + unmasked[2]), rtol=1e-5)
    assert float(m["kl_per_dim"][1]) == 0.0


# --------------------------------------------------------------------------------------
# Monte Carlo: the one-sample estimates are unbiased for the float64 expectations


def _linear_np(layer, h):
    return h @ _f64(layer.kernel[...]) + _f64(layer.bias[...])


def _mlp_np(layers, h, activate_final=False):
    """The MLP forward pass in float64 from the layers' weights (tanh between layers)."""
    for layer in layers[:-1]:
        h = np.tanh(_linear_np(layer, h))
    h = _linear_np(layers[-1], h)
    return np.tanh(h) if activate_final else h


@pytest.mark.parametrize("posterior,prior", [("diag", "std_normal"), ("full", "full")])
def test_one_sample_elbo_is_unbiased(posterior, prior):
    model = _model(posterior, prior, seed=3)
    # Larger posterior variances make E_q[−log p(x|z)] depend on the whole of q, not its mean.
    _shift_posterior(model, "log_var", slice(None), 0.5)
    if posterior == "full":  # strong correlations and a sharper decoder, so that they matter too
        _shift_posterior(model, "off", slice(None), 1.5)
        first = model.decoder.mlp.layers[0].kernel
        first[...] = 3.0 * first[...]
    n = 20_000
    x1 = np.random.default_rng(9).integers(0, 2, SHAPE).astype(np.float32)
    x = jnp.broadcast_to(jnp.asarray(x1), (n, *SHAPE))  # n independent draws for one image
    parts = _per_example(model, x, jax.random.key(11))
    recon_jax = _f64(parts["recon"])

    # float64 reference from the raw weights: encoder → q, z ~ q by NumPy, decoder → Bernoulli.
    feat = _mlp_np(model.encoder.mlp.layers, _f64(x1).reshape(-1), activate_final=True)
    mq = _linear_np(model.head.mean, feat)
    lq = np.diag(np.exp(0.5 * _linear_np(model.head.log_var, feat)))
    if posterior == "full":
        lq[np.tril_indices(K, -1)] = _linear_np(model.head.off, feat)  # row by row
    rng = np.random.default_rng(12)
    z = mq + rng.standard_normal((n, K)) @ lq.T
    logits = _mlp_np(model.decoder.mlp.layers, z)
    xf = _f64(x1).reshape(-1)
    recon_np = -(xf * logits - np.logaddexp(0.0, logits)).sum(-1)
    se = np.sqrt(recon_jax.var() / n + recon_np.var() / n)
    assert abs(recon_jax.mean() - recon_np.mean()) < 4 * se, (recon_jax.mean(), recon_np.mean(), se)
    # The estimate must be sensitive at this precision: the posterior-mean plug-in differs.
    logits0 = _mlp_np(model.decoder.mlp.layers, mq[None])[0]
    plug_in = -(xf * logits0 - np.logaddexp(0.0, logits0)).sum()
    assert abs(plug_in - recon_np.mean()) > 8 * se
    if posterior == "full":  # ... and so does drawing the dimensions independently
        z_ind = mq + rng.standard_normal((n, K)) * np.sqrt(np.sum(lq**2, -1))
        logits_ind = _mlp_np(model.decoder.mlp.layers, z_ind)
        recon_ind = -(xf * logits_ind - np.logaddexp(0.0, logits_ind)).sum(-1)
        assert abs(recon_ind.mean() - recon_np.mean()) > 6 * se

    # The closed-form KL equals E_q[log q(z) − log p(z)] under these z.
    sq = lq @ lq.T
    p = model.prior()
    if p is None:
        mp, sp = np.zeros(K), np.eye(K)
    else:
        lp = _f64(p.scale_tril)
        mp, sp = _f64(p.mean), lp @ lp.T
    log_ratio = (stats.multivariate_normal(mq, sq).logpdf(z)
                 - stats.multivariate_normal(mp, sp).logpdf(z))
    kl_jax = _f64(parts["kl_per_dim"]).sum(-1)
    np.testing.assert_allclose(kl_jax, kl_jax[0], rtol=1e-5)  # one image, one KL
    se_kl = np.sqrt(log_ratio.var() / n)
    assert abs(kl_jax[0] - log_ratio.mean()) < 4 * se_kl, (kl_jax[0], log_ratio.mean(), se_kl)
    np.testing.assert_allclose(kl_jax[0], _kl_ref(mq, sq, mp, sp), rtol=1e-4)
