"""IWAE log-likelihood against a closed form, chunking, the KL decomposition, eval.json."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from vaekl import evaluate, train
from vaekl import config as config_lib
from vaekl.models import vae as vae_lib
from vaekl.models.gaussian import Gaussian

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


TERMS = ("mutual_info", "marginal_kl", "total_correlation", "dimwise_kl", "identity_gap")


def random_gaussian(rng, batch, k, full, spread=1.0):
    """A Gaussian with random means and variances (and correlations when ``full``)."""
    mean = jnp.asarray(rng.standard_normal((*batch, k)) * spread, jnp.float32)
    log_var = rng.uniform(-2.0, 0.5, (*batch, k))
    if not full:
        return Gaussian(mean, log_var=jnp.asarray(log_var, jnp.float32))
    tril = np.tril(rng.standard_normal((*batch, k, k)) * 0.5, -1) + np.exp(0.5 * log_var)[..., None] * np.eye(k)
    return Gaussian(mean, scale_tril=jnp.asarray(tril, jnp.float32))


def draw(rng, q: Gaussian, num: int) -> np.ndarray:
    """[num, N, k] float32 draws z[s, n] ~ q(z|xₙ), from NumPy's generator."""
    eps = rng.standard_normal((num, *q.mean.shape))
    return (np.asarray(q.mean) + np.einsum("nij,snj->sni", np.asarray(q.tril()), eps)).astype(np.float32)


def covariances(g: Gaussian) -> np.ndarray:
    l = np.asarray(g.tril(), np.float64)
    return l @ np.swapaxes(l, -1, -2)


def brute_force_terms(q: Gaussian, p: Gaussian | None, z: np.ndarray) -> dict[str, np.ndarray]:
    """The per-draw decomposition terms [S, N] in float64, one density at a time with scipy."""
    s, n, k = z.shape
    mq, cq = np.asarray(q.mean, np.float64), covariances(q)
    mp, cp = (np.zeros(k), np.eye(k)) if p is None else (np.asarray(p.mean, np.float64), covariances(p))
    out = {name: np.zeros((s, n)) for name in TERMS[:4]}
    for i in range(s):
        for j in range(n):
            zz = z[i, j].astype(np.float64)
            comp = np.array([stats.multivariate_normal(mq[m], cq[m]).logpdf(zz) for m in range(n)])
            log_q = special.logsumexp(comp) - np.log(n)
            log_q_dims = sum(special.logsumexp(stats.norm(mq[:, d], np.sqrt(cq[:, d, d])).logpdf(zz[d]))
                             - np.log(n) for d in range(k))
            log_p = stats.multivariate_normal(mp, cp).logpdf(zz)
            log_p_dims = stats.norm(mp, np.sqrt(np.diag(cp))).logpdf(zz).sum()
            out["mutual_info"][i, j] = comp[j] - log_q
            out["marginal_kl"][i, j] = log_q - log_p
            out["total_correlation"][i, j] = log_q - log_q_dims
            out["dimwise_kl"][i, j] = log_q_dims - log_p_dims
    return out


def gaussian_kl(c: np.ndarray) -> float:
    """KL(N(0, C) ‖ N(0, I)) in nats."""
    return 0.5 * (np.trace(c) - len(c) - np.linalg.slogdet(c)[1])


def gaussian_tc(c: np.ndarray) -> float:
    """Total correlation of N(·, C): ½(Σⱼ log Cⱼⱼ − log|C|), in nats."""
    return 0.5 * (np.sum(np.log(np.diag(c))) - np.linalg.slogdet(c)[1])


@pytest.mark.parametrize("q_full,prior", [(False, "std"), (False, "diag"), (True, "full"), (False, "full")])
def test_decomposition_matches_a_float64_brute_force_on_the_same_draws(q_full, prior):
    rng = np.random.default_rng(7)
    n, k, s = 5, 2, 3
    q = random_gaussian(rng, (n,), k, q_full)
    p = None if prior == "std" else random_gaussian(rng, (), k, prior == "full", spread=0.5)
    z = draw(rng, q, s)
    want = brute_force_terms(q, p, z)
    got = evaluate.decomposition_terms(q, p, jnp.asarray(z), chunk=4)  # 4 does not divide N·S = 15
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)
    r = evaluate.kl_decomposition_from_draws(q, p, jnp.asarray(z), chunk=4)
    for name, v in want.items():
        np.testing.assert_allclose(r[name], v.mean(), rtol=1e-4, atol=1e-5, err_msg=name)
        se = np.sqrt(np.sum(v.var(0, ddof=1)) / s) / n  # within-example variances
        np.testing.assert_allclose(r[name + "_se"], se, rtol=1e-3, atol=1e-6, err_msg=name)
    neg_entropy = np.array([-stats.multivariate_normal.entropy(cov=c) for c in covariances(q)])
    mp, cp = (np.zeros(k), np.eye(k)) if p is None else (np.asarray(p.mean, np.float64), covariances(p))
    cross = [-stats.multivariate_normal(mp, cp).logpdf(np.asarray(q.mean[m], np.float64)) +
             0.5 * np.trace(np.linalg.solve(cp, c)) for m, c in enumerate(covariances(q))]
    kl_want = np.mean(neg_entropy + np.array(cross))  # KL = −H(q) + cross-entropy
    np.testing.assert_allclose(r["kl"], kl_want, rtol=1e-4)
    assert float(r["kl_se"]) == 0.0 and r["index_code_mi"] == r["mutual_info"]
    total = want["mutual_info"] + want["total_correlation"] + want["dimwise_kl"]
    np.testing.assert_allclose(r["identity_gap"], kl_want - total.mean(), rtol=1e-4, atol=1e-4)


def test_input_independent_encoder_has_no_mutual_information_and_known_total_correlation():
    rng = np.random.default_rng(3)
    n, k = 200, 3
    one = random_gaussian(rng, (), k, full=False)
    q = Gaussian(jnp.broadcast_to(one.mean, (n, k)), log_var=jnp.broadcast_to(one.log_var, (n, k)))
    terms = evaluate.decomposition_terms(q, None, jnp.asarray(draw(rng, q, 10)))
    np.testing.assert_allclose(terms["mutual_info"], 0.0, atol=2e-5)
    np.testing.assert_allclose(terms["total_correlation"], 0.0, atol=2e-5)  # q(z) is q(z|x): factorized
    # A correlated posterior shared by every example: q(z) = N(μ, Σ) exactly, so TC and the
    # marginal KL are the Gaussian closed forms (unbiased; only Monte-Carlo error).
    one = random_gaussian(rng, (), k, full=True)
    q = Gaussian(jnp.broadcast_to(one.mean, (n, k)), scale_tril=jnp.broadcast_to(one.scale_tril, (n, k, k)))
    r = evaluate.kl_decomposition_from_draws(q, None, jnp.asarray(draw(rng, q, 5)))
    tc = gaussian_tc(covariances(one))
    assert abs(float(r["mutual_info"])) < 2e-5
    assert tc > 0.1 and abs(r["total_correlation"] - tc) < 4 * r["total_correlation_se"], (r, tc)
    assert abs(r["marginal_kl"] - r["kl"]) < 4 * r["marginal_kl_se"] + 1e-5, r  # KL(q(z)‖p) = KL(q(z|x)‖p)


def test_total_correlation_of_a_gaussian_shaped_aggregate_posterior():
    """q(z|xₙ) = N(mₙ, s²I), mₙ with covariance exactly Σ − s²I: q(z) is a kernel density
    estimate of N(0, Σ), so TC, MI, marginal and dimension-wise KL approach their Gaussian
    values (MI = ½ log|Σ| − k log s); the finite-N bias measured is below 0.015 nats."""
    n, s2 = 1000, 0.25
    sigma = np.array([[1.5, 0.9], [0.9, 1.0]])
    m = np.random.default_rng(0).standard_normal((n, 2))
    m -= m.mean(0)
    m = m @ np.linalg.inv(np.linalg.cholesky(np.cov(m.T, bias=True))).T
    m = m @ np.linalg.cholesky(sigma - s2 * np.eye(2)).T
    q = Gaussian(jnp.asarray(m, jnp.float32), log_var=jnp.full((n, 2), np.log(s2), jnp.float32))
    r = evaluate.kl_decomposition(q, None, jax.random.key(0), num_draws=4)
    want = {"total_correlation": gaussian_tc(sigma),
            "mutual_info": 0.5 * np.linalg.slogdet(sigma)[1] - np.log(s2),
            "marginal_kl": gaussian_kl(sigma),
            "dimwise_kl": sum(gaussian_kl(sigma[j:j + 1, j:j + 1]) for j in range(2))}
    assert want["total_correlation"] > 0.3
    for name, v in want.items():
        assert abs(r[name] - v) < 4 * r[name + "_se"] + 0.02, (name, r[name], r[name + "_se"], v)


@pytest.mark.parametrize("prior", ["std", "diag"])
def test_kl_identity_holds_for_factorized_priors(prior):
    rng = np.random.default_rng(11)
    q = random_gaussian(rng, (200,), 3, full=False, spread=1.5)
    p = None if prior == "std" else random_gaussian(rng, (), 3, full=False, spread=0.5)
    z = jnp.asarray(draw(rng, q, 10))
    terms = evaluate.decomposition_terms(q, p, z)
    np.testing.assert_allclose(terms["marginal_kl"], terms["total_correlation"] + terms["dimwise_kl"],
                               rtol=1e-5, atol=1e-5)  # draw by draw
    r = evaluate.kl_decomposition_from_draws(q, p, z)
    assert r["identity_gap_se"] > 0 and abs(r["identity_gap"]) < 4 * r["identity_gap_se"], r
    assert r["kl"] > 1.0 and r["total_correlation"] > -4 * r["total_correlation_se"]


def test_standard_errors_match_the_spread_over_repeated_evaluations():
    rng = np.random.default_rng(5)
    q = random_gaussian(rng, (200,), 3, full=False, spread=1.5)
    runs = [jax.device_get(evaluate.kl_decomposition(q, None, jax.random.key(i), num_draws=10))
            for i in range(20)]
    for name in TERMS:
        spread = np.std([r[name] for r in runs], ddof=1)
        se = np.mean([r[name + "_se"] for r in runs])
        assert 0.5 < spread / se < 2.0, (name, spread, se)
    assert all(r["kl"] == runs[0]["kl"] and r["kl_se"] == 0 for r in runs)


def test_full_covariance_path_agrees_with_the_diagonal_path_on_diagonal_factors():
    rng = np.random.default_rng(9)
    diag = random_gaussian(rng, (30,), 4, full=False)
    full = Gaussian(diag.mean, scale_tril=diag.tril())
    prior = random_gaussian(rng, (), 4, full=False)
    prior_full = Gaussian(prior.mean, scale_tril=prior.tril())
    z = jnp.asarray(draw(rng, diag, 3))
    for p, pf in ((None, None), (prior, prior_full)):
        a = evaluate.kl_decomposition_from_draws(diag, p, z)
        b = evaluate.kl_decomposition_from_draws(full, pf, z, chunk=7)
        for name in ("kl", *TERMS):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=2e-5, err_msg=name)
            np.testing.assert_allclose(b[name + "_se"], a[name + "_se"], rtol=1e-4, atol=1e-6, err_msg=name)


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
    for field in ("nll", "nll_se", "neg_elbo", "kl", "recon", "active_units", "mutual_info", "marginal_kl",
                  "index_code_mi", "total_correlation", "dimwise_kl", "kl_per_dim", "num_samples"):
        assert field in r
    for field in ("mutual_info", "marginal_kl", "index_code_mi", "total_correlation", "dimwise_kl"):
        assert r[field + "_se"] > 0, field
    assert r["num_samples"] == 100 and len(r["kl_per_dim"]) == 4 and r["kl_decomposition_draws"] == 10
    assert r["nll"] < r["neg_elbo"]  # the importance-weighted bound is tighter than the ELBO
    assert 0 < r["nll_se"] < 0.2 * r["nll"]
    assert r["index_code_mi"] == r["mutual_info"]
    assert 0 < r["mutual_info"] <= np.log(r["num_test"]) + 1e-4
    # std-normal prior: marginal KL (estimated directly) = TC + dimension-wise KL, and the sum
    # MI + marginal KL recovers the closed-form KL up to Monte-Carlo error
    np.testing.assert_allclose(r["marginal_kl"], r["total_correlation"] + r["dimwise_kl"], rtol=1e-5, atol=1e-5)
    assert abs(r["kl_identity_gap"]) < 4 * r["kl_identity_gap_se"] + 1e-5
    assert abs(r["mutual_info"] + r["marginal_kl"] - r["kl"]) < 4 * r["kl_identity_gap_se"] + 1e-4
    assert r["marginal_kl"] > -4 * r["marginal_kl_se"]
    assert r["nll_num_test"] == r["num_test"]
    # the NLL alone on a subset of the test set; every other number unchanged
    sub = evaluate.evaluate_run(workdir, num_samples=100, chunk=50, batch_size=128, nll_examples=40)
    assert sub["nll_num_test"] == 40 and sub["num_test"] == r["num_test"] and sub["nll"] != r["nll"]
    same = [k for k in r if not k.startswith("nll") and k != "eval_seconds"]
    assert set(same) <= set(sub)
    for k in same:  # one program either way, fused differently: float32 rounding apart
        if isinstance(r[k], (int, float, list)):
            np.testing.assert_allclose(sub[k], r[k], rtol=1e-5, atol=1e-7, err_msg=k)
        else:
            assert sub[k] == r[k], k
    with pytest.raises(ValueError, match="nll_examples must be >= 0"):
        evaluate.evaluate_run(workdir, nll_examples=-1)
