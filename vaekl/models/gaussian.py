"""Gaussian latent distributions (diagonal or full covariance) and their closed-form KL.

A :class:`Gaussian` holds either a diagonal covariance, as log-variances, or a full one, as a
lower Cholesky factor with a positive diagonal. ``None`` stands for the standard normal
N(0, I) wherever a prior is expected, so that its KL takes the cheapest closed form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from vaekl import kl as klib


@struct.dataclass
class Gaussian:
    """N(mean, Σ) over the last axis; exactly one of ``log_var`` and ``scale_tril`` is set.

    Attributes:
      mean: [..., k].
      log_var: [..., k] natural-log variances (diagonal Σ), or None.
      scale_tril: [..., k, k] lower Cholesky factor of Σ (full Σ), or None.
    """

    mean: jax.Array
    log_var: jax.Array | None = None
    scale_tril: jax.Array | None = None

    @property
    def is_diagonal(self) -> bool:
        return self.scale_tril is None

    @property
    def latent_dim(self) -> int:
        return self.mean.shape[-1]

    def tril(self) -> jax.Array:
        """[..., k, k] the Cholesky factor (diag(exp(½ log_var)) for a diagonal Gaussian)."""
        if self.is_diagonal:
            return jnp.exp(0.5 * self.log_var)[..., None] * jnp.eye(self.latent_dim, dtype=self.mean.dtype)
        return self.scale_tril

    def log_variances(self) -> jax.Array:
        """[..., k] log Σᵢᵢ, the marginal log-variances."""
        if self.is_diagonal:
            return self.log_var
        return jnp.log(jnp.sum(jnp.square(self.scale_tril), -1))

    def sample(self, key: jax.Array, num: int | None = None) -> jax.Array:
        """Reparameterized draws, [..., k] (or [num, ..., k] when ``num`` is given)."""
        shape = self.mean.shape if num is None else (num, *self.mean.shape)
        eps = standard_normal(key, shape, self.mean.dtype)
        if self.is_diagonal:
            return self.mean + jnp.exp(0.5 * self.log_var) * eps
        return self.mean + jnp.einsum("...ij,...j->...i", self.scale_tril, eps)

    def log_prob(self, z: jax.Array) -> jax.Array:
        """log N(z; mean, Σ) in nats, summed over the last axis; z broadcasts against mean."""
        k = self.latent_dim
        if self.is_diagonal:
            sq = jnp.square(z - self.mean) * jnp.exp(-self.log_var)
            return -0.5 * (jnp.sum(sq + self.log_var, -1) + k * math.log(2 * math.pi))
        l = jnp.broadcast_to(self.scale_tril, (*jnp.broadcast_shapes(z.shape, self.mean.shape), k))
        w = jax.scipy.linalg.solve_triangular(l, (z - self.mean)[..., None], lower=True)[..., 0]
        log_det = 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(l, axis1=-2, axis2=-1))), -1)
        return -0.5 * (jnp.sum(jnp.square(w), -1) + log_det + k * math.log(2 * math.pi))


def log_prob_per_dim(g: "Gaussian | None", z: jax.Array) -> jax.Array:
    """[..., k] log g(zᵢ | z₍<ᵢ₎) in nats, whose sum over i is log g(z); g = None is N(0, I).

    Diagonal: the marginals log N(zᵢ; μᵢ, σᵢ²). Full (Σ = LLᵀ): with w = L⁻¹(z − μ),
    −½wᵢ² − log|Lᵢᵢ| − ½ log 2π (wᵢ depends on z₍≤ᵢ₎ only, L being lower triangular)."""
    log_2pi = math.log(2 * math.pi)
    if g is None:
        return -0.5 * (jnp.square(z) + log_2pi)
    if g.is_diagonal:
        return -0.5 * (jnp.square(z - g.mean) * jnp.exp(-g.log_var) + g.log_var + log_2pi)
    shape = jnp.broadcast_shapes(z.shape, g.mean.shape)
    l = jnp.broadcast_to(g.scale_tril, (*shape, shape[-1]))
    w = jax.scipy.linalg.solve_triangular(l, jnp.broadcast_to(z - g.mean, shape)[..., None], lower=True)[..., 0]
    return -0.5 * (jnp.square(w) + log_2pi) - jnp.log(jnp.abs(jnp.diagonal(l, axis1=-2, axis2=-1)))


@struct.dataclass
class Mixture:
    """A prior Σ_c π_c N(z; μ_c, Σ_c) with no closed-form KL (MoG, VampPrior).

    Attributes:
      components: a Gaussian with batch shape [C] (diagonal or full), over k dimensions.
      logits: [C] unnormalized log weights, π = softmax(logits).
    """

    components: Gaussian
    logits: jax.Array

    is_diagonal = False  # not a factorized Gaussian: no per-dimension closed forms

    @property
    def latent_dim(self) -> int:
        return self.components.latent_dim

    def log_prob(self, z: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[...] log p(z) in nats for z [..., k]; with ``mask`` [k] (0/1), over the live
        dimensions only (each component's chain-rule factors of masked dimensions dropped)."""
        per = log_prob_per_dim(self.components, z[..., None, :])  # [..., C, k]
        if mask is not None:
            per = per * mask
        return jax.nn.logsumexp(jax.nn.log_softmax(self.logits) + per.sum(-1), -1)

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        """[num, k] draws: a component c ~ π, then z ~ N(μ_c, Σ_c)."""
        k_c, k_z = jax.random.split(key)
        c = jax.random.categorical(k_c, self.logits, shape=(num,))
        comp = jax.tree.map(lambda a: a[c], self.components)
        return comp.sample(k_z)


def is_mixture(p) -> bool:
    return isinstance(p, Mixture)


def standard_normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """N(0, 1) draws of ``shape`` [..., k], latent dimension i from its own stream fold_in(key, i).

    The draws of the first k' dimensions do not depend on k, so a model with k latent
    dimensions sees the same noise as the leading block of a wider one (vmapped sweeps).
    """
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape[:-1], dtype)
    return jnp.moveaxis(jax.vmap(draw)(jnp.arange(shape[-1])), 0, -1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
    """log N(z; 0, I) in nats, summed over the last axis."""
    return -0.5 * (jnp.sum(jnp.square(z), -1) + z.shape[-1] * math.log(2 * math.pi))


def _dispatch(q: Gaussian, p: Gaussian | None, terms: bool):
    """Picks the cheapest closed form of vaekl.kl for the (q, p) pair and its arguments."""
    if p is None:
        if q.is_diagonal:
            return (klib.kl_std_normal_terms if terms else klib.kl_std_normal), (q.mean, q.log_var)
        return (klib.kl_full_std_normal_terms if terms else klib.kl_full_std_normal), (q.mean, q.scale_tril)
    if q.is_diagonal and p.is_diagonal:
        return (klib.kl_diag_terms if terms else klib.kl_diag), (q.mean, q.log_var, p.mean, p.log_var)
    fn = klib.kl_full_terms if terms else klib.kl_full
    mean_p = jnp.broadcast_to(p.mean, jnp.broadcast_shapes(p.mean.shape, q.mean.shape[-1:]))
    return fn, (q.mean, q.tril(), mean_p, p.tril())


def _no_closed_form(p) -> None:
    if isinstance(p, Mixture):
        raise ValueError("a mixture prior (mog, vamp) has no closed-form KL: use a sampled "
                         "kl_estimator (mc or stl)")


def kl(q: Gaussian, p: Gaussian | None = None, *, per_dim: bool = False) -> jax.Array:
    """KL(q || p) in nats, [...] (or [..., k]); p = None is N(0, I)."""
    _no_closed_form(p)
    fn, args = _dispatch(q, p, terms=False)
    return fn(*args, per_dim=per_dim)


def kl_terms(q: Gaussian, p: Gaussian | None = None, *, per_dim: bool = False) -> klib.KLTerms:
    """The KL's (trace, mahalanobis, log_det_ratio, dim) terms; p = None is N(0, I)."""
    _no_closed_form(p)
    fn, args = _dispatch(q, p, terms=True)
    return fn(*args, per_dim=per_dim)
