"""Priors p(z): the standard normal, and learned diagonal or full-covariance Gaussians."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vaekl.models.gaussian import Gaussian
from vaekl.models.posteriors import tril_from

PRIORS = ("std_normal", "diag", "full")


class Prior(nnx.Module):
    """p(z) over k latent dimensions; ``__call__`` gives a Gaussian, or None for N(0, I).

    Learned priors start at N(0, I): mean 0, log-variances 0 and, for 'full', a zero
    strictly-lower triangle.
    """

    def __init__(self, kind: str, latent_dim: int):
        if kind not in PRIORS:
            raise ValueError(f"unknown prior {kind!r}; choose from {PRIORS}")
        self.kind = kind
        self.latent_dim = latent_dim
        k = latent_dim
        if kind != "std_normal":
            self.mean = nnx.Param(jnp.zeros(k))
            self.log_var = nnx.Param(jnp.zeros(k))
        if kind == "full":
            self.off = nnx.Param(jnp.zeros(k * (k - 1) // 2))

    def __call__(self) -> Gaussian | None:
        if self.kind == "std_normal":
            return None
        if self.kind == "diag":
            return Gaussian(mean=self.mean[...], log_var=self.log_var[...])
        return Gaussian(mean=self.mean[...], scale_tril=tril_from(self.log_var[...], self.off[...]))
