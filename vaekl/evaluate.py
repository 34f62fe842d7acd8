"""Evaluation of a trained VAE: importance-weighted log-likelihood, ELBO, KL analysis.

* Test log-likelihood by the importance-weighted bound of Burda et al. (2016),
  log p(x) ≥ E[log (1/K) Σₛ p(x, zₛ)/q(zₛ|x)], zₛ ~ q(z|x), which tightens to log p(x) as K
  grows. The K samples are taken in chunks with a running (streaming) log-sum-exp, and the
  examples in batches, so memory is bounded whatever K and the test-set size. Sample s of an
  example uses its own key fold_in(key, s), so the estimate does not depend on the chunking.
* "ELBO surgery" (Hoffman & Johnson 2016): the average KL splits into the mutual information
  I_q(x; z) = E_x E_q(z|x)[log q(z|x) − log q(z)] and the marginal KL(q(z) ‖ p(z)), where
  q(z) = (1/N) Σₙ q(z|xₙ) is the aggregate posterior over the N evaluation examples.
  Estimator: one zᵢ ~ q(z|xᵢ) per example and log q(zᵢ) = logsumexpₙ log q(zᵢ|xₙ) − log N
  over all N examples (exact mixture, no minibatch approximation); MI is at most log N.
  marginal KL = average KL − MI.
All amounts are nats per example.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vaekl import checkpoints, data, objectives, train
from vaekl.models import gaussian
from vaekl.models.vae import VAE


def log_weights(model: VAE, x: jax.Array, keys: jax.Array) -> jax.Array:
    """log p(x, zₛ) − log q(zₛ|x) for zₛ ~ q(z|x), one sample per key: [S, B] for x [B, H, W, C]."""
    q = model.encode(x)
    p = model.prior()

    def one(key):
        z = q.sample(key)
        log_pz = gaussian.standard_normal_log_prob(z) if p is None else p.log_prob(z)
        return model.likelihood.log_prob(x, model.decode(z)) + log_pz - q.log_prob(z)

    return jax.lax.map(one, keys)


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def iwae_log_likelihood(model: VAE, x: jax.Array, key: jax.Array, num_samples: int,
                        chunk: int = 100) -> jax.Array:
    """The K-sample importance-weighted estimate of log p(x), [B], streaming over chunks of K."""
    size = _divisor(num_samples, chunk)
    n_chunks = num_samples // size

    def body(carry, c):
        m, s = carry
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(c * size + jnp.arange(size))
        lw = log_weights(model, x, keys)
        m_new = jnp.maximum(m, lw.max(0))
        s = s * jnp.exp(m - m_new) + jnp.exp(lw - m_new).sum(0)
        return (m_new, s), None

    init = (jnp.full(x.shape[0], -jnp.inf), jnp.zeros(x.shape[0]))
    (m, s), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return m + jnp.log(s) - math.log(num_samples)


def test_log_likelihood(model: VAE, x: jax.Array, key: jax.Array, num_samples: int,
                        chunk: int = 100, batch_size: int = 100) -> jax.Array:
    """[N] IWAE estimates of log p(x) for every example of x [N, H, W, C]."""
    return train.batched_map(lambda xb, i: iwae_log_likelihood(model, xb, jax.random.fold_in(key, i),
                                                               num_samples, chunk), x, batch_size)


def mutual_information(model: VAE, x: jax.Array, key: jax.Array, chunk: int = 64) -> jax.Array:
    """I_q(x; z) over the examples x [N, ...], with q(z) the exact mixture of their posteriors."""
    q = model.encode(x)  # batch [N]
    n = x.shape[0]
    z = q.sample(key)  # [N, k], zᵢ ~ q(z|xᵢ)
    log_q_own = q.log_prob(z)  # [N]

    def log_q_marginal(zi):  # zi [C, k] → log (1/N) Σₙ q(zᵢ|xₙ), [C]
        table = q.log_prob(zi[:, None, :])  # [C, N], posteriors broadcast over the chunk
        return jax.nn.logsumexp(table, axis=1) - math.log(n)

    if not q.is_diagonal:  # full covariances broadcast a [C, N, k, k] table: keep it ~200 MB
        chunk = max(1, min(chunk, int(5e7 // (n * q.latent_dim**2))))
    log_q_z = train.batched_map(lambda zb, _: log_q_marginal(zb), z, chunk)
    return jnp.mean(log_q_own - log_q_z)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's config.json over today's defaults (fields added since keep their defaults)."""
    from vaekl import config as config_lib  # pylint: disable=g-import-not-at-top

    config = config_lib.defaults()
    with open(os.path.join(workdir, "config.json")) as f:
        for k, v in json.load(f).items():
            config[k] = tuple(v) if isinstance(v, list) else v
    return config


def _restore(workdir: str, config: ml_collections.ConfigDict, image_shape, train_images, which: str):
    graphdef, state, _ = train.create(config, image_shape, train_images)
    mgr = checkpoints.manager(workdir, config.keep_checkpoints)
    step = mgr.best_step() if which == "best" else mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = checkpoints.restore(mgr, step, state)
    mgr.close()
    return graphdef, state, step


def evaluate_run(workdir: str, num_samples: int = 5000, chunk: int = 100, batch_size: int = 100,
                 which: str = "best", seed: int = 0) -> dict:
    """Evaluates a run's best (or latest) checkpoint on its test split; writes eval.json.

    Dynamically binarized data is binarized once, with a fixed key, so that every number in
    the file refers to the same binary test set.
    """
    config = load_config(workdir)
    ds = data.load(config.dataset, config.data_dir or None, test_fraction=config.test_fraction,
                   seed=config.data_seed)
    train_np, test_np = train.prepare_images(config, ds)
    key = jax.random.key(seed)
    test = jnp.asarray(test_np)
    if config.binarization == "dynamic":
        test = (data.binarize(jax.random.fold_in(key, 1), test, "dynamic") * 255).astype(jnp.uint8)
    graphdef, state, step = _restore(workdir, config, ds.image_shape, train_np, which)
    obj = objectives.Objective.from_config(config)
    cfg = train.EvalConfig(batch_size, "none", obj, config.active_units_threshold)
    stats = jax.jit(lambda p, x: train.evaluate(p, x, jnp.float32(config.beta), jnp.int32(step),
                                                jax.random.fold_in(key, 2), None, graphdef=graphdef,
                                                cfg=cfg))(state.params, test)
    x = data.to_float(test)

    @jax.jit
    def nll_and_mi(params, x):
        model = nnx.merge(graphdef, params)
        ll = test_log_likelihood(model, x, jax.random.fold_in(key, 3), num_samples, chunk, batch_size)
        return -ll.mean(), mutual_information(model, x, jax.random.fold_in(key, 4))

    nll, mi = jax.device_get(nll_and_mi(state.params, x))
    kl = float(stats["kl"])
    result = {
        "nll": float(nll), "num_samples": num_samples, "neg_elbo": float(stats["neg_elbo"]),
        "recon": float(stats["recon"]), "kl": kl, "active_units": int(stats["active_units"]),
        "mutual_info": float(mi), "marginal_kl": kl - float(mi),
        "kl_per_dim": [float(v) for v in stats["kl_per_dim"]],
        "kl_trace": float(stats["kl_trace"]), "kl_mahalanobis": float(stats["kl_mahalanobis"]),
        "kl_log_det_ratio": float(stats["kl_log_det_ratio"]), "kl_dim": float(stats["kl_dim"]),
        "au_variance": [float(v) for v in stats["au_variance"]],
        "step": int(step), "checkpoint": which, "num_test": int(test.shape[0]),
    }
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
