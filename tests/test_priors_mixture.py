"""Priors without a closed-form KL: mog and vamp (issue 21, item 4)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from vaekl import config as config_lib
from vaekl import kl_estimators, objectives, train
from vaekl.models import gaussian
from vaekl.models.vae import make_vae

SHAPE = (8, 8, 1)


def _config(prior, components=3, estimator="mc", **fields):
    c = config_lib.defaults()
    c.encoder_hidden = c.decoder_hidden = (16,)
    c.latent_dim, c.prior, c.prior_components, c.kl_estimator = 3, prior, components, estimator
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.mark.parametrize("diagonal", [True, False])
def test_mixture_log_prob_against_scipy(diagonal):
    rng = np.random.default_rng(0)
    c, k = 4, 3
    means = rng.normal(size=(c, k))
    logits = rng.normal(size=c)
    if diagonal:
        lv = rng.normal(size=(c, k)) * 0.5
        comp = gaussian.Gaussian(jnp.asarray(means, jnp.float32), log_var=jnp.asarray(lv, jnp.float32))
        covs = [np.diag(np.exp(v)) for v in lv]
    else:
        l = np.tril(rng.normal(size=(c, k, k)) * 0.3) + np.eye(k)
        comp = gaussian.Gaussian(jnp.asarray(means, jnp.float32), scale_tril=jnp.asarray(l, jnp.float32))
        covs = [m @ m.T for m in l]
    mix = gaussian.Mixture(comp, jnp.asarray(logits, jnp.float32))
    z = rng.normal(size=(6, k))
    got = np.asarray(mix.log_prob(jnp.asarray(z, jnp.float32)))
    logw = logits - logsumexp(logits)
    want = logsumexp([logw[i] + stats.multivariate_normal(means[i], covs[i]).logpdf(z) for i in range(c)], 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    s = np.asarray(mix.sample(jax.random.key(0), 20000))
    np.testing.assert_allclose(s.mean(0), np.exp(logw) @ means, atol=0.05)


def test_one_component_mog_is_its_gaussian_and_mc_is_unbiased():
    """With C = 1 the mixture is one diagonal Gaussian: log p agrees draw by draw, and the MC
    estimate's mean over many draws is within 4 standard errors of that Gaussian's closed form."""
    model = make_vae(_config("mog", 1), SHAPE, jax.random.key(0))
    model.prior.log_vars[...] = jnp.array([[0.4, -0.3, 0.1]])
    p = model.prior_distribution()
    g = gaussian.Gaussian(p.components.mean[0], log_var=p.components.log_var[0])
    n = 20000
    x = jnp.broadcast_to(jnp.asarray(np.random.default_rng(1).integers(0, 2, (1, *SHAPE)), jnp.float32),
                         (n, *SHAPE))
    pt = objectives.parts(model, x, jax.random.key(2))
    np.testing.assert_allclose(p.log_prob(pt.z), g.log_prob(pt.z), rtol=1e-5, atol=1e-5)
    est = np.asarray(kl_estimators.monte_carlo(pt.q, p, pt.z, pt.mask).sum(-1), np.float64)
    closed = float(gaussian.kl(jax.tree.map(lambda a: a[:1], pt.q), g)[0])
    se = est.std() / np.sqrt(n)
    assert abs(est.mean() - closed) < 4 * se, (est.mean(), closed, se)
    with pytest.raises(ValueError, match="no closed-form KL"):
        gaussian.kl(pt.q, p)


def test_vamp_components_are_the_encoders_posteriors_at_the_pseudo_inputs():
    model = make_vae(_config("vamp", 5), SHAPE, jax.random.key(0))
    p = model.prior_distribution()
    q = model.encode(jax.nn.sigmoid(model.prior.pseudo_inputs[...]))
    np.testing.assert_array_equal(p.components.mean, q.mean)
    np.testing.assert_array_equal(p.components.log_var, q.log_var)
    assert p.components.mean.shape == (5, 3)
    with pytest.raises(ValueError, match="prior\\(encode\\)"):
        model.prior()


@pytest.mark.parametrize("prior", ["mog", "vamp"])
def test_analytic_with_a_mixture_is_refused_before_anything_is_written(tmp_path, prior):
    for bad, msg in [(dict(estimator="analytic"), "no closed-form KL"),
                     (dict(regularizer="free_bits", free_bits=0.5), "free_bits")]:
        workdir = tmp_path / "run"
        with pytest.raises(ValueError, match=msg):
            train.train_and_evaluate(_config(prior, **bad), str(workdir))
        assert not os.path.exists(workdir)
    with pytest.raises(ValueError, match="prior_components=3 has no effect"):
        config_lib.validate(_config("std_normal", 3))


@pytest.mark.parametrize("prior,estimator", [("mog", "mc"), ("vamp", "stl")])
def test_mixture_priors_train(tmp_path, prior, estimator):
    from test_train import small_config  # noqa: PLC0415
    config = small_config(num_steps=20, eval_every=20, checkpoint_every=20, prior=prior, prior_components=4,
                          kl_estimator=estimator)
    rows = train.train_and_evaluate(config, str(tmp_path / "run"))
    for row in rows:
        assert np.isfinite(row["loss"]) and np.isfinite(row["kl"]) and row["kl"] == row["kl_estimate"]
        np.testing.assert_allclose(row["neg_elbo"], row["recon"] + row["kl"], rtol=1e-5)
