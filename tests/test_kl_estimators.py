"""The KL estimators (analytic, mc, stl) and the IWAE objective (issue 21, items 1 and 5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from vaekl import config as config_lib
from vaekl import kl_estimators, objectives, regularizers, train
from vaekl.models.gaussian import Gaussian
from vaekl.models.vae import make_vae

SHAPE = (8, 8, 1)
K = 3


def _config(**fields):
    c = config_lib.defaults()
    c.encoder_hidden, c.decoder_hidden, c.latent_dim = (16,), (16,), K
    for k, v in fields.items():
        c[k] = v
    return c


def _model(posterior="diag", prior="std_normal", seed=0):
    model = make_vae(_config(posterior=posterior, prior=prior), SHAPE, jax.random.key(seed))
    if prior != "std_normal":  # off N(0, I), so every part of log p matters
        model.prior.mean[...] = jnp.array([0.3, -0.5, 0.2])
        model.prior.log_var[...] = jnp.array([0.4, -0.3, 0.1])
    if prior == "full":
        model.prior.off[...] = jnp.array([0.3, -0.2, 0.25])
    return model


def _x(seed, n):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 2, (n, *SHAPE)), jnp.float32)


def _objective(model, x, key, config, mask=None):
    loss, (m, _) = objectives.objective(model, x, key, jnp.int32(0), objectives.hyperparameters(config),
                                        objectives.Static.from_config(config, 100), mask)
    return loss, m


@pytest.mark.parametrize("kind", ["none", "diag", "full"])
def test_log_prob_per_dim_is_the_chain_rule(kind):
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, K)).astype(np.float32)
    z = rng.normal(size=(5, K)).astype(np.float32)
    if kind == "none":
        g, cov, mean = None, np.eye(K), np.zeros(K)
    elif kind == "diag":
        lv = rng.normal(size=(5, K)).astype(np.float32) * 0.5
        g = Gaussian(jnp.asarray(mean), log_var=jnp.asarray(lv))
        cov = np.stack([np.diag(np.exp(v)) for v in lv])
    else:
        l = np.tril(rng.normal(size=(5, K, K)) * 0.4) + 1.5 * np.eye(K)
        g = Gaussian(jnp.asarray(mean), scale_tril=jnp.asarray(l, jnp.float32))
        cov = l @ np.swapaxes(l, -1, -2)
    got = np.asarray(kl_estimators.log_prob_per_dim(g, jnp.asarray(z)), np.float64)
    means = np.broadcast_to(mean, (5, K))
    covs = np.broadcast_to(cov, (5, K, K))
    want = [stats.multivariate_normal(means[i], covs[i]).logpdf(z[i]) for i in range(5)]
    np.testing.assert_allclose(got.sum(-1), want, rtol=1e-5)
    # dimension 0's share is its marginal log density
    want0 = stats.norm(means[:, 0], np.sqrt(covs[:, 0, 0])).logpdf(z[:, 0])
    np.testing.assert_allclose(got[:, 0], want0, rtol=1e-5)


def test_unknown_estimator_and_iwae_settings_are_refused():
    for bad, msg in [(dict(kl_estimator="exact"), "kl_estimator='exact'"),
                     (dict(iwae_k=5), "iwae_k=5 has no effect"),
                     (dict(objective="iwae", iwae_k=5, beta=2.0), "objective='iwae'"),
                     (dict(objective="iwae", iwae_k=0), "iwae_k=0")]:
        with pytest.raises(ValueError, match=msg):
            config_lib.validate(_config(**bad))
    config_lib.validate(_config(objective="iwae", iwae_k=5, kl_estimator="mc"))


@pytest.mark.parametrize("posterior,prior", [("diag", "std_normal"), ("diag", "diag"), ("full", "full")])
def test_mc_estimate_is_unbiased_and_stl_has_the_same_value(posterior, prior):
    """Over n draws for one image, the mean of the MC estimate is within 4 standard errors of the
    closed form (per dimension too where q and p factorize); STL's value is MC's."""
    model = _model(posterior, prior, seed=3)
    n = 20_000
    x = jnp.broadcast_to(_x(1, 1), (n, *SHAPE))
    pt = objectives.parts(model, x, jax.random.key(5))
    closed = np.asarray(pt.per_example["kl_per_dim"], np.float64)
    mc = np.asarray(kl_estimators.per_dim("mc", pt.q, pt.p, pt.z, pt.mask, pt.per_example["kl_per_dim"]),
                    np.float64)
    stl = kl_estimators.per_dim("stl", pt.q, pt.p, pt.z, pt.mask, pt.per_example["kl_per_dim"])
    np.testing.assert_array_equal(np.asarray(stl, np.float64), mc)
    assert mc.std(0).min() > 1e-3  # a real estimate, with spread
    total = mc.sum(-1)
    se = total.std() / np.sqrt(n)
    assert abs(total.mean() - closed[0].sum()) < 4 * se, (total.mean(), closed[0].sum(), se)
    if posterior == "diag":
        se_d = mc.std(0) / np.sqrt(n)
        assert np.all(np.abs(mc.mean(0) - closed[0]) < 4 * se_d), (mc.mean(0), closed[0], se_d)
    # The estimate is sensitive at this precision: a log q whose mean is off by 0.2σ fails.
    q_bad = Gaussian(pt.q.mean + 0.2 * jnp.exp(0.5 * pt.q.log_variances()), log_var=pt.q.log_variances())
    bad = np.asarray(kl_estimators.monte_carlo(q_bad, pt.p, pt.z, pt.mask).sum(-1), np.float64)
    assert abs(bad.mean() - closed[0].sum()) > 8 * se


def test_objective_logs_the_closed_form_and_the_estimate():
    model, x, key = _model("diag", "diag"), _x(2, 64), jax.random.key(0)
    _, ref = _objective(model, x, key, _config())
    assert "kl_estimate" not in ref
    for est in ("mc", "stl"):
        loss, m = _objective(model, x, key, _config(kl_estimator=est))
        np.testing.assert_array_equal(m["kl"], ref["kl"])  # kl stays the closed form
        np.testing.assert_allclose(loss, m["recon"] + m["kl_estimate"], rtol=1e-6)
        assert abs(float(m["kl_estimate"] - m["kl"])) > 1e-4  # … and the estimate differs from it


def _linear_gaussian_vae(sigma=0.5, d=6, k=2, seed=0):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I) with orthogonal columns of W, and the encoder set
    to the exact (diagonal) posterior q(z|x) = N(ΣWᵀ(x − b)/σ², Σ), Σ = (I + WᵀW/σ²)⁻¹."""
    c = config_lib.defaults()
    c.encoder_hidden = c.decoder_hidden = ()
    c.latent_dim, c.likelihood, c.likelihood_sigma = k, "gaussian", sigma
    model = make_vae(c, (d, 1, 1), jax.random.key(seed))
    rng = np.random.default_rng(seed)
    w = np.linalg.qr(rng.normal(size=(d, k)))[0] * np.array([1.5, 0.7])[:k]  # WᵀW diagonal
    b = rng.normal(size=d)
    cov = 1.0 / (1.0 + np.sum(w * w, 0) / sigma**2)  # [k]
    a = w * cov / sigma**2  # [d, k]: μ = (x − b) a
    model.decoder.mlp.layers[0].kernel[...] = jnp.asarray(w.T, jnp.float32)
    model.decoder.mlp.layers[0].bias[...] = jnp.asarray(b, jnp.float32)
    model.head.mean.kernel[...] = jnp.asarray(a, jnp.float32)
    model.head.mean.bias[...] = jnp.asarray(-b @ a, jnp.float32)
    model.head.log_var.kernel[...] = jnp.zeros((d, k))
    model.head.log_var.bias[...] = jnp.asarray(np.log(cov), jnp.float32)
    x = jnp.asarray(rng.normal(size=(16, d, 1, 1)) + b[:, None, None], jnp.float32)
    return model, x


def _head_grads(model, x, estimator, keys):
    graphdef, params = nnx.split(model)
    config = _config(kl_estimator=estimator, latent_dim=model.latent_dim)

    def loss(p, key):
        return _objective(nnx.merge(graphdef, p), x, key, config)[0]

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, keys)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads)["head"])
    return np.concatenate([np.asarray(g).reshape(len(keys), -1) for g in leaves], 1)


def test_stl_gradient_vanishes_at_the_exact_posterior():
    """Roeder et al. 2017: at q = p(z|x) the STL gradient in q's parameters is 0 for every draw;
    MC's (its score term) is not, and moving q off the posterior makes STL's non-zero."""
    model, x = _linear_gaussian_vae()
    keys = jax.random.split(jax.random.key(0), 8)
    stl = _head_grads(model, x, "stl", keys)
    mc = _head_grads(model, x, "mc", keys)
    assert np.abs(stl).max() < 1e-4, np.abs(stl).max()
    assert np.abs(mc).max() > 0.1 and mc.std(0).max() > 0.1, np.abs(mc).max()
    model.head.log_var.bias[...] = model.head.log_var.bias[...] + 0.3
    off = _head_grads(model, x, "stl", keys)
    assert np.abs(off).max() > 0.1 and off.std(0).max() > 1e-2


def _reference_objective(model, x, key, step, hp, static, mask=None):
    """The objective as it was before the estimators (commit 31cc708): the closed-form KL into the
    regularizer directly."""
    k_z, k_reg = jax.random.split(key)
    pt = objectives.parts(model, x, k_z, mask)
    mean = {k: v.mean(0) for k, v in pt.per_example.items() if k != "posterior_mean"}
    reg = regularizers.get(static.regularizer)
    inp = regularizers.Inputs(pt.q, pt.z, pt.p, pt.mask, pt.per_example["kl_per_dim"], jnp.asarray(step),
                              static.num_steps, static.dataset_size, k_reg, None)
    out = reg.fn(inp, hp, dict(static.settings))
    return mean["recon"] + out.penalty


@pytest.mark.parametrize("regularizer,fields", [("kl", dict(beta=2.0)), ("free_bits", dict(free_bits=0.3)),
                                                 ("tcvae", dict(beta=3.0))])
def test_analytic_is_unchanged_bit_for_bit(regularizer, fields):
    """Five Adam steps with kl_estimator='analytic' give exactly the losses and parameters of the
    objective before the estimators existed."""
    config = _config(regularizer=regularizer, kl_estimator="analytic", **fields)
    model = _model("diag", "diag", seed=1)
    graphdef, params0 = nnx.split(model)
    params0 = nnx.to_pure_dict(params0)
    hp, static = objectives.hyperparameters(config), objectives.Static.from_config(config, 100)
    x = _x(3, 32)
    tx = optax.adam(1e-2)

    def run(fn):
        @jax.jit
        def step(params, opt, i):
            def loss(p):
                out = fn(nnx.merge(graphdef, p), x, jax.random.fold_in(jax.random.key(0), i), i, hp, static)
                return out[0] if isinstance(out, tuple) else out
            value, g = jax.value_and_grad(loss)(params)
            updates, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, updates), opt, value
        params, opt, losses = params0, tx.init(params0), []
        for i in range(5):
            params, opt, value = step(params, opt, jnp.int32(i))
            losses.append(value)
        return params, np.asarray(losses)

    new = lambda *a: objectives.objective(*a)[0]  # noqa: E731
    p_new, l_new = run(new)
    p_ref, l_ref = run(_reference_objective)
    np.testing.assert_array_equal(l_new, l_ref)
    jax.tree.map(np.testing.assert_array_equal, p_new, p_ref)
    p_mc, l_mc = run(lambda m, x, k, s, hp, st: objectives.objective(m, x, k, s, hp, st._replace(
        kl_estimator="mc"))[0])
    assert not np.array_equal(l_mc, l_ref)  # the comparison can fail


# ----------------------------------------------------------------------------------------
# The IWAE objective.


@pytest.mark.parametrize("posterior,prior", [("diag", "std_normal"), ("full", "full")])
def test_iwae_with_one_sample_is_the_mc_elbo_on_the_same_draw(posterior, prior):
    model, x, key = _model(posterior, prior, seed=2), _x(4, 32), jax.random.key(7)
    loss_mc, m_mc = _objective(model, x, key, _config(kl_estimator="mc", posterior=posterior, prior=prior))
    loss_iw, m_iw = _objective(model, x, key, _config(objective="iwae", iwae_k=1, kl_estimator="mc",
                                                      posterior=posterior, prior=prior))
    np.testing.assert_allclose(loss_iw, loss_mc, rtol=1e-6)
    np.testing.assert_allclose(m_iw["neg_iwae"], m_mc["recon"] + m_mc["kl_estimate"], rtol=1e-6)
    loss_5, _ = _objective(model, x, key, _config(objective="iwae", iwae_k=5, kl_estimator="mc",
                                                  posterior=posterior, prior=prior))
    assert not np.isclose(loss_5, loss_mc)


def test_iwae_bound_is_above_the_elbo_and_chunking_does_not_change_it():
    model = _model("diag", "std_normal", seed=4)
    model.head.log_var.bias[...] = model.head.log_var.bias[...] + 1.0  # a loose q: a visible gap
    x, key = _x(5, 200), jax.random.key(3)
    pt = objectives.parts(model, x, jax.random.key(8))
    elbo = np.asarray(objectives.iwae_bound(model, x, pt, key, 1), np.float64)
    iw = np.asarray(objectives.iwae_bound(model, x, pt, key, 11, chunk=10), np.float64)
    iw_chunked = np.asarray(objectives.iwae_bound(model, x, pt, key, 11, chunk=2), np.float64)
    np.testing.assert_allclose(iw_chunked, iw, rtol=1e-5)
    diff = iw - elbo
    se = diff.std() / np.sqrt(len(diff))
    assert diff.mean() > 4 * se, (diff.mean(), se)
    assert np.all(diff >= np.log(1 / 11) - 1e-4)  # log-mean-exp ≥ the first term − log K


def test_iwae_objective_trains(tmp_path):
    from test_train import small_config  # noqa: PLC0415
    config = small_config(num_steps=20, eval_every=20, checkpoint_every=20, objective="iwae", iwae_k=3,
                          kl_estimator="mc")
    rows = train.train_and_evaluate(config, str(tmp_path / "run"))
    for row in rows:
        assert np.isfinite(row["neg_iwae"]) and row["loss"] == row["neg_iwae"]
        assert row["neg_iwae"] <= row["neg_elbo"] + 1.0


@pytest.mark.parametrize("estimator", ["mc", "stl"])
def test_sampled_estimators_train(tmp_path, estimator):
    from test_train import small_config  # noqa: PLC0415
    config = small_config(num_steps=20, eval_every=20, checkpoint_every=20, kl_estimator=estimator,
                          regularizer="free_bits", free_bits=0.1)
    rows = train.train_and_evaluate(config, str(tmp_path / "run"))
    for row in rows:
        assert np.isfinite(row["kl_estimate"]) and np.isfinite(row["loss"])
        np.testing.assert_allclose(sum(row["kl_per_dim"]), row["kl"], rtol=1e-5, atol=1e-6)
