"""Estimators of KL(q(z|x) ‖ p(z)) for the penalty: the closed form or a one-sample Monte Carlo.

``config.kl_estimator`` chooses what every KL-based regularizer sees as the KL:

  analytic  the closed form of :mod:`vaekl.kl` (Kingma & Welling 2014, estimator B);
  mc        log q(z|x) − log p(z) at the reparameterized draw z ~ q(z|x) that also feeds the
            reconstruction (estimator A), unbiased, with a score term in its gradient;
  stl       the same value with q's parameters stopped inside log q ("sticking the landing",
            Roeder et al. 2017): the gradient keeps only the path through z, so when q is the
            exact posterior the ELBO's gradient in q's parameters is 0 for every draw.

The estimates are split per latent dimension by the chain rule, log q(z) = Σᵢ log q(zᵢ|z₍<ᵢ₎)
(the marginals for a diagonal Gaussian; the Cholesky factor's conditionals for a full one), so
that per-dimension regularizers (free bits) see them too; for a full Gaussian a dimension's
share is not its closed-form KLᵢ in expectation, only the sum is. Nats per example.
"""

from __future__ import annotations

from collections.abc import Callable
import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from vaekl.models.gaussian import Gaussian

ESTIMATORS = ("analytic", "mc", "stl")
_LOG_2PI = math.log(2 * math.pi)


def log_prob_per_dim(g: Gaussian | None, z: jax.Array) -> jax.Array:
    """[..., k] log g(zᵢ | z₍<ᵢ₎) in nats, whose sum over i is log g(z); g = None is N(0, I).

    Diagonal: the marginals log N(zᵢ; μᵢ, σᵢ²). Full (Σ = LLᵀ): with w = L⁻¹(z − μ),
    −½wᵢ² − log|Lᵢᵢ| − ½ log 2π (wᵢ depends on z₍≤ᵢ₎ only, L being lower triangular)."""
    if g is None:
        return -0.5 * (jnp.square(z) + _LOG_2PI)
    if g.is_diagonal:
        return -0.5 * (jnp.square(z - g.mean) * jnp.exp(-g.log_var) + g.log_var + _LOG_2PI)
    shape = jnp.broadcast_shapes(z.shape, g.mean.shape)
    l = jnp.broadcast_to(g.scale_tril, (*shape, shape[-1]))
    w = solve_triangular(l, jnp.broadcast_to(z - g.mean, shape)[..., None], lower=True)[..., 0]
    log_diag = jnp.log(jnp.abs(jnp.diagonal(l, axis1=-2, axis2=-1)))
    return -0.5 * (jnp.square(w) + _LOG_2PI) - log_diag


def _stopped(q: Gaussian) -> Gaussian:
    return jax.tree.map(jax.lax.stop_gradient, q)


def monte_carlo(q: Gaussian, p: Gaussian | None, z: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, k] log q(zᵢ|x, z₍<ᵢ₎) − log p(zᵢ|z₍<ᵢ₎) at z [B, k], masked dimensions 0 (estimator A)."""
    return (log_prob_per_dim(q, z) - log_prob_per_dim(p, z)) * mask


def sticking_the_landing(q: Gaussian, p: Gaussian | None, z: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`monte_carlo` with q's parameters stopped inside log q (the value is the same)."""
    return monte_carlo(_stopped(q), p, z, mask)


def log_q_for(estimator: str) -> Callable[[Gaussian, jax.Array], jax.Array]:
    """(q, z) → [B] log q(z|x) as the estimator differentiates it (stopped parameters for stl)."""
    check(estimator)
    if estimator == "stl":
        return lambda q, z: jnp.sum(log_prob_per_dim(_stopped(q), z), -1)
    return lambda q, z: jnp.sum(log_prob_per_dim(q, z), -1)


SAMPLED: dict[str, Callable[[Gaussian, Gaussian | None, jax.Array, jax.Array], jax.Array]] = {
    "mc": monte_carlo,
    "stl": sticking_the_landing,
}


def check(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r} is not one of {ESTIMATORS}")


def per_dim(estimator: str, q: Gaussian, p: Gaussian | None, z: jax.Array, mask: jax.Array,
            closed_form: jax.Array) -> jax.Array:
    """[B, k] the KL per example and dimension that the penalty uses: ``closed_form`` (the
    masked closed form, returned as is) for 'analytic', else the one-sample estimate at z."""
    check(estimator)
    if estimator == "analytic":
        return closed_form
    return SAMPLED[estimator](q, p, z, mask)
