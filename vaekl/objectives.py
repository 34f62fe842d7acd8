"""The β-VAE objective: negative ELBO = reconstruction + β·KL, with schedules, free bits, capacity.

Reductions, everywhere in vaekl: sum over pixels and over latent dimensions, mean over the
batch; every amount is in nats per example. ``neg_elbo`` is always the true negative ELBO,
recon + KL, unweighted; ``loss`` is the objective that is minimized:

  * plain:     recon + β·w(t)·KL
  * free bits: recon + β·w(t)·Σᵢ max(λ, KLᵢ), KLᵢ the batch-averaged KL of dimension i
               (Kingma et al. 2016): each dimension's batch-averaged KL is clamped from
               below at λ, so no gradient pushes a dimension under λ nats;
  * capacity:  recon + β·w(t)·|KL − C(t)|, C(t) = C_max·min(1, t/T) (Burgess et al. 2018);

with w(t) the β schedule: 1 (constant), min(1, t/T_warm) (linear warm-up), or the
cyclical schedule of Fu et al. (2019), ramping 0 → 1 over the first ``ramp`` fraction of
each period, then holding 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from vaekl.models import gaussian
from vaekl.models.vae import VAE


class Objective(NamedTuple):
    """The static (compile-time) settings of the objective; β itself is traced."""

    beta_schedule: str = "constant"
    beta_warmup_steps: int = 1
    beta_cycle_steps: int = 1
    beta_cycle_ramp: float = 0.5
    free_bits: float = 0.0
    capacity_max: float = 0.0
    capacity_steps: int = 1

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Objective":
        return cls(**{f: config[f] for f in cls._fields})


def beta_weight(obj: Objective, step: jax.Array) -> jax.Array:
    """w(t) in [0, 1], the schedule's multiplier of β at training step t."""
    t = jnp.asarray(step, jnp.float32)
    if obj.beta_schedule == "constant":
        return jnp.ones_like(t)
    if obj.beta_schedule == "linear":
        return jnp.minimum(1.0, t / obj.beta_warmup_steps)
    if obj.beta_schedule == "cyclical":
        phase = jnp.mod(t, obj.beta_cycle_steps) / obj.beta_cycle_steps
        return jnp.minimum(1.0, phase / obj.beta_cycle_ramp)
    raise ValueError(f"unknown beta_schedule {obj.beta_schedule!r}")


def capacity(obj: Objective, step: jax.Array) -> jax.Array:
    """C(t) in nats (0 when capacity control is off)."""
    t = jnp.asarray(step, jnp.float32)
    return obj.capacity_max * jnp.minimum(1.0, t / obj.capacity_steps)


def regularizer(obj: Objective, kl_per_dim: jax.Array, kl: jax.Array, c: jax.Array,
                latent_mask: jax.Array | None = None) -> jax.Array:
    """What β·w(t) multiplies: KL, Σᵢ max(λ, KLᵢ) (free bits) or |KL − C| (capacity).

    ``kl_per_dim`` [k] is batch-averaged; masked dimensions add nothing, even under free bits.
    """
    if obj.free_bits > 0:
        mask = jnp.ones_like(kl_per_dim) if latent_mask is None else latent_mask.astype(kl.dtype)
        return jnp.sum(jnp.maximum(obj.free_bits, kl_per_dim) * mask)
    if obj.capacity_max > 0:
        return jnp.abs(kl - c)
    return kl


def per_example(model: VAE, x: jax.Array, key: jax.Array,
                latent_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """One-sample ELBO parts for a batch x [B, H, W, C], each per example.

    ``latent_mask`` [k] (0/1) switches latent dimensions off: a masked dimension is zeroed
    before the decoder and contributes nothing to the KL or its terms.

    Returns:
      recon [B] (−log p(x|z), z ~ q), kl_per_dim [B, k], kl_trace / kl_mahalanobis /
      kl_log_det_ratio / kl_dim [B] (the KL terms), the first three also per dimension
      (``*_per_dim`` [B, k]), and posterior_mean [B, k].
    """
    q = model.encode(x)
    z = q.sample(key)
    mask = jnp.ones(q.latent_dim, z.dtype) if latent_mask is None else latent_mask.astype(z.dtype)
    recon = -model.likelihood.log_prob(x, model.decode(z * mask))
    p = model.prior()
    kl_per_dim = gaussian.kl(q, p, per_dim=True) * mask
    terms = gaussian.kl_terms(q, p, per_dim=True)
    out = {"recon": recon, "kl_per_dim": kl_per_dim, "posterior_mean": q.mean * mask}
    for name, term in zip(("kl_trace", "kl_mahalanobis", "kl_log_det_ratio", "kl_dim"), terms):
        out[name] = jnp.sum(term * mask, -1)
        if name != "kl_dim":
            out[name + "_per_dim"] = term * mask
    return out


def loss(model: VAE, x: jax.Array, key: jax.Array, step: jax.Array, beta: jax.Array,
         obj: Objective, latent_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The objective (scalar, nats per example) and the batch-mean metrics the trainer logs."""
    parts = per_example(model, x, key, latent_mask)
    batch_mean = {k: v.mean(0) for k, v in parts.items() if k != "posterior_mean"}
    kl_per_dim = batch_mean["kl_per_dim"]
    kl = kl_per_dim.sum()
    w, c = beta_weight(obj, step), capacity(obj, step)
    reg = regularizer(obj, kl_per_dim, kl, c, latent_mask)
    objective = batch_mean["recon"] + beta * w * reg
    metrics = dict(batch_mean, loss=objective, neg_elbo=batch_mean["recon"] + kl, kl=kl,
                   beta=jnp.asarray(beta, kl.dtype), beta_weight=w, capacity=c)
    return objective, metrics
