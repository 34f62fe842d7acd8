"""Posterior families: heads that map encoder features to a Gaussian q(z|x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vaekl.models.gaussian import Gaussian

FAMILIES = ("diag", "full")


def tril_from(log_var: jax.Array, off: jax.Array) -> jax.Array:
    """[..., k] log-diagonal-variances and [..., k(k−1)/2] entries → [..., k, k] Cholesky factor.

    The diagonal is exp(½ log_var) > 0; ``off`` fills the strictly lower triangle row by row
    (row i holds entries (i, 0..i−1)), so a factor's leading k' × k' block uses only the
    first k'(k'−1)/2 entries.
    """
    k = log_var.shape[-1]
    rows, cols = jnp.tril_indices(k, -1)
    l = jnp.zeros((*log_var.shape, k), log_var.dtype).at[..., rows, cols].set(off)
    return l + jnp.exp(0.5 * log_var)[..., None] * jnp.eye(k, dtype=log_var.dtype)


class GaussianHead(nnx.Module):
    """Features [..., F] → q(z|x) = N(mean, Σ), one linear layer per parameter group.

    'diag': Σ = diag(exp(log_var)). 'full': Σ = LLᵀ with L from :func:`tril_from`. Each
    group's outputs are indexed by latent dimension first, so that a model with k latent
    dimensions is the leading block of one with more (what vmapped sweeps over k rely on).
    """

    def __init__(self, family: str, in_features: int, latent_dim: int, *, rngs: nnx.Rngs):
        if family not in FAMILIES:
            raise ValueError(f"unknown posterior family {family!r}; choose from {FAMILIES}")
        k = latent_dim
        self.family = family
        self.mean = nnx.Linear(in_features, k, rngs=rngs)
        self.log_var = nnx.Linear(in_features, k, rngs=rngs)
        self.off = nnx.Linear(in_features, k * (k - 1) // 2, rngs=rngs) if family == "full" and k > 1 else None

    def __call__(self, h: jax.Array) -> Gaussian:
        mean, log_var = self.mean(h), self.log_var(h)
        if self.family == "diag":
            return Gaussian(mean=mean, log_var=log_var)
        off = self.off(h) if self.off is not None else jnp.zeros((*mean.shape[:-1], 0), mean.dtype)
        return Gaussian(mean=mean, scale_tril=tril_from(log_var, off))
