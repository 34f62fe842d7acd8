"""IWAE log-likelihood against a closed form, chunking, mutual information, eval.json."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from vaekl import evaluate, train
from vaekl import config as config_lib
from vaekl.models import vae as vae_lib

D, K_LAT, SIGMA = 5, 2, 0.5


def linear_gaussian_model(inflate: float = 1.0, n: int = 200):
    """x = Wᵀz + b + σε with z ~ N(0, I): p(x) = N(b, WᵀW + σ²I) exactly.

    The encoder is the exact posterior mean with diagonal log-variances inflated by
    ``inflate`` (so q ≠ p(z|x) and the IWAE bound is strict for small K).
    """
    c = config_lib.defaults()
    c.encoder_hidden, c.decoder_hidden = (), ()
    c.latent_dim, c.likelihood, c.likelihood_sigma = K_LAT, "gaussian", SIGMA
    model = vae_lib.make_vae(c, (1, 1, D), jax.random.key(0))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K_LAT, D)) * 0.8
    b = rng.standard_normal(D) * 0.3
    post_cov = np.linalg.inv(np.eye(K_LAT) + w @ w.T / SIGMA**2)
    a = post_cov @ w / SIGMA**2  # posterior mean = a (x − b)
    dec = model.decoder.mlp.layers[0]
    dec.kernel[...], dec.bias[...] = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    model.head.mean.kernel[...] = jnp.asarray(a.T, jnp.float32)
    model.head.mean.bias[...] = jnp.asarray(-a @ b, jnp.float32)
    model.head.log_var.kernel[...] = jnp.zeros((D, K_LAT))
    model.head.log_var.bias[...] = jnp.asarray(np.log(np.diag(post_cov)) + inflate, jnp.float32)
    exact = stats.multivariate_normal(mean=b, cov=w.T @ w + SIGMA**2 * np.eye(D))
    x = exact.rvs(size=n, random_state=1).reshape(n, 1, 1, D).astype(np.float32)
    return model, jnp.asarray(x), exact.logpdf(x.reshape(n, D))


def test_iwae_converges_to_the_exact_log_likelihood_from_below():
    model, x, exact = linear_gaussian_model()
    est = {k: np.asarray(evaluate.test_log_likelihood(model, x, jax.random.key(2), k, chunk=100, batch_size=16))
           for k in (1, 10, 5000)}
    gaps = {k: float(np.mean(exact - v)) for k, v in est.items()}
    assert gaps[1] > gaps[10] > gaps[5000], gaps  # tighter with K …
    assert gaps[1] > 0.3  # … strictly below log p(x) for K = 1 (q is not the posterior) …
    assert abs(gaps[5000]) < 0.005, gaps  # … and at the exact value for large K
    np.testing.assert_allclose(est[5000], exact, atol=0.1)  # per example


def test_chunked_and_unchunked_estimates_agree():
    model, x, _ = linear_gaussian_model(n=40)
    key = jax.random.key(4)
    whole = evaluate.iwae_log_likelihood(model, x, key, num_samples=140, chunk=140)
    for chunk in (7, 20, 35):
        np.testing.assert_allclose(evaluate.iwae_log_likelihood(model, x, key, 140, chunk=chunk), whole,
                                   rtol=1e-5, atol=1e-5)
    batched = evaluate.test_log_likelihood(model, x, key, 140, chunk=20, batch_size=7)
    assert batched.shape == (40,) and np.all(np.isfinite(batched))


def test_mutual_information_zero_for_an_input_independent_encoder_and_bounded_by_log_n():
    model, x, _ = linear_gaussian_model(n=40)
    mi = float(evaluate.mutual_information(model, x, jax.random.key(5), chunk=8))
    assert 0.0 < mi <= np.log(40) + 1e-5
    model.head.mean.kernel[...] = jnp.zeros_like(model.head.mean.kernel[...])
    mi0 = float(evaluate.mutual_information(model, x, jax.random.key(5), chunk=8))
    assert abs(mi0) < 1e-5


def test_evaluate_run_writes_eval_json(tmp_path):
    c = config_lib.defaults()
    c.encoder_hidden, c.decoder_hidden, c.latent_dim = (32,), (32,), 4
    c.batch_size, c.num_steps, c.eval_every, c.checkpoint_every, c.log_every = 32, 200, 100, 100, 100
    c.num_images = 0
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(c, workdir)
    r = evaluate.evaluate_run(workdir, num_samples=100, chunk=50, batch_size=128)
    saved = json.load(open(os.path.join(workdir, "eval.json")))
    assert saved == r
    for field in ("nll", "neg_elbo", "kl", "recon", "active_units", "mutual_info", "marginal_kl",
                  "kl_per_dim", "num_samples"):
        assert field in r
    assert r["num_samples"] == 100 and len(r["kl_per_dim"]) == 4
    assert r["nll"] < r["neg_elbo"]  # the importance-weighted bound is tighter than the ELBO
    np.testing.assert_allclose(r["mutual_info"] + r["marginal_kl"], r["kl"], rtol=1e-6)
    assert 0 < r["mutual_info"] <= np.log(r["num_test"]) + 1e-4
    assert r["marginal_kl"] > -0.05
