"""Priors p(z): the standard normal, learned diagonal or full-covariance Gaussians, and the
mixtures without a closed-form KL: a learned mixture of C diagonal Gaussians (mog) and the
VampPrior (vamp, Tomczak & Welling 2018), the mixture of the encoder's posteriors at C learned
pseudo-inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vaekl.models.gaussian import Gaussian, Mixture
from vaekl.models.posteriors import tril_from

PRIORS = ("std_normal", "diag", "full", "mog", "vamp")
MIXTURES = ("mog", "vamp")


class Prior(nnx.Module):
    """p(z) over k latent dimensions; ``__call__`` gives a Gaussian, or None for N(0, I).

    Learned priors start at N(0, I): mean 0, log-variances 0 and, for 'full', a zero
    strictly-lower triangle. 'mog': C components with means drawn N(0, 0.5²) (so that they
    differ), log-variances 0 and equal learned weights. 'vamp': C pseudo-inputs of
    ``image_shape``, sigmoid(u) with u ~ N(0, 0.01²) (grey images), equal weights; its
    ``__call__`` needs the encoder (``encode``: images → q(z|x)).
    """

    def __init__(self, kind: str, latent_dim: int, components: int = 1,
                 image_shape: Sequence[int] | None = None, key: jax.Array | None = None):
        if kind not in PRIORS:
            raise ValueError(f"unknown prior {kind!r}; choose from {PRIORS}")
        self.kind = kind
        self.latent_dim = latent_dim
        k = latent_dim
        if kind in ("diag", "full"):
            self.mean = nnx.Param(jnp.zeros(k))
            self.log_var = nnx.Param(jnp.zeros(k))
        if kind == "full":
            self.off = nnx.Param(jnp.zeros(k * (k - 1) // 2))
        if kind in MIXTURES:
            if components < 1:
                raise ValueError(f"prior_components={components!r} must be >= 1")
            key = jax.random.key(0) if key is None else key
            self.logits = nnx.Param(jnp.zeros(components))
        if kind == "mog":
            self.means = nnx.Param(0.5 * jax.random.normal(key, (components, k)))
            self.log_vars = nnx.Param(jnp.zeros((components, k)))
        if kind == "vamp":
            if image_shape is None:
                raise ValueError("prior='vamp' needs the image shape of its pseudo-inputs")
            self.pseudo_inputs = nnx.Param(0.01 * jax.random.normal(key, (components, *image_shape)))

    def __call__(self, encode: Callable[[jax.Array], Gaussian] | None = None) -> Gaussian | Mixture | None:
        if self.kind == "std_normal":
            return None
        if self.kind == "mog":
            return Mixture(Gaussian(mean=self.means[...], log_var=self.log_vars[...]), self.logits[...])
        if self.kind == "vamp":
            if encode is None:
                raise ValueError("the VampPrior is the encoder's posteriors at its pseudo-inputs: "
                                 "call it as prior(encode), or use VAE.prior_distribution()")
            return Mixture(encode(jax.nn.sigmoid(self.pseudo_inputs[...])), jnp.zeros_like(self.logits[...]))
        if self.kind == "diag":
            return Gaussian(mean=self.mean[...], log_var=self.log_var[...])
        return Gaussian(mean=self.mean[...], scale_tril=tril_from(self.log_var[...], self.off[...]))
