"""Posterior families: maps from encoder features to a Gaussian q(z|x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vaekl.models.gaussian import Gaussian


def num_params(family: str, latent_dim: int) -> int:
    """Encoder outputs needed by a posterior family with k = latent_dim."""
    k = latent_dim
    if family == "diag":
        return 2 * k
    if family == "full":
        return 2 * k + k * (k - 1) // 2
    raise ValueError(f"unknown posterior family {family!r}; choose 'diag' or 'full'")


def diag_gaussian(params: jax.Array) -> Gaussian:
    """[..., 2k] → N(mean, diag(exp(log_var))), split as (mean, log_var)."""
    mean, log_var = jnp.split(params, 2, axis=-1)
    return Gaussian(mean=mean, log_var=log_var)


def tril_from(log_var: jax.Array, off: jax.Array) -> jax.Array:
    """[..., k] log-diagonal-variances and [..., k(k−1)/2] entries → [..., k, k] Cholesky factor.

    The diagonal is exp(½ log_var) > 0; ``off`` fills the strictly lower triangle row by row.
    """
    k = log_var.shape[-1]
    rows, cols = jnp.tril_indices(k, -1)
    l = jnp.zeros((*log_var.shape, k), log_var.dtype).at[..., rows, cols].set(off)
    return l + jnp.exp(0.5 * log_var)[..., None] * jnp.eye(k, dtype=log_var.dtype)


def full_gaussian(params: jax.Array, latent_dim: int) -> Gaussian:
    """[..., 2k + k(k−1)/2] → N(mean, LLᵀ), split as (mean, log-diagonal, strictly-lower entries)."""
    k = latent_dim
    mean, log_var, off = params[..., :k], params[..., k:2 * k], params[..., 2 * k:]
    return Gaussian(mean=mean, scale_tril=tril_from(log_var, off))


def posterior(family: str, params: jax.Array, latent_dim: int) -> Gaussian:
    """The Gaussian q(z|x) of ``family`` ('diag' or 'full') from encoder outputs."""
    if family == "diag":
        return diag_gaussian(params)
    if family == "full":
        return full_gaussian(params, latent_dim)
    raise ValueError(f"unknown posterior family {family!r}; choose 'diag' or 'full'")
