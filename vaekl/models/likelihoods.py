"""Decoder likelihoods p(x|z): log-probabilities in nats, summed over pixels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned")


class Likelihood(nnx.Module):
    """p(x|z) given the decoder's per-pixel output [..., H, W, C].

    'bernoulli': the output is a logit; x in [0, 1] (binary, or grey levels as the
      usual cross-entropy). 'gaussian': the output is the mean, the variance σ² is
      fixed (``sigma``). 'gaussian_learned': as 'gaussian' with one learned log σ²,
      started at log(sigma²).
    """

    def __init__(self, kind: str, sigma: float = 1.0):
        if kind not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {kind!r}; choose from {LIKELIHOODS}")
        if kind != "bernoulli" and not sigma > 0:
            raise ValueError(f"likelihood_sigma must be > 0, got {sigma}")
        self.kind = kind
        self.log_var_init = 2.0 * math.log(sigma)
        if kind == "gaussian_learned":
            self.log_var = nnx.Param(jnp.asarray(self.log_var_init))

    def _log_var(self) -> jax.Array:
        return self.log_var[...] if self.kind == "gaussian_learned" else jnp.asarray(self.log_var_init)

    def log_prob(self, x: jax.Array, out: jax.Array) -> jax.Array:
        """log p(x|z) [...] in nats for images x [..., H, W, C] and decoder outputs ``out``."""
        if self.kind == "bernoulli":
            ll = x * out - jax.nn.softplus(out)
        else:
            log_var = self._log_var()
            ll = -0.5 * (jnp.square(x - out) * jnp.exp(-log_var) + log_var + math.log(2 * math.pi))
        return jnp.sum(ll, axis=(-3, -2, -1))

    def mean(self, out: jax.Array) -> jax.Array:
        """E[x|z], [..., H, W, C]."""
        return jax.nn.sigmoid(out) if self.kind == "bernoulli" else out
