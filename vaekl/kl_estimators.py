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
import jax
import jax.numpy as jnp

from vaekl.models.gaussian import Gaussian, Mixture, log_prob_per_dim

ESTIMATORS = ("analytic", "mc", "stl")
__all__ = ["ESTIMATORS", "log_prob_per_dim", "monte_carlo", "sticking_the_landing", "per_dim"]


def _stopped(q: Gaussian) -> Gaussian:
    return jax.tree.map(jax.lax.stop_gradient, q)


def monte_carlo(q: Gaussian, p: Gaussian | Mixture | None, z: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, k] log q(zᵢ|x, z₍<ᵢ₎) − log p(zᵢ|z₍<ᵢ₎) at z [B, k], masked dimensions 0 (estimator A).

    A mixture prior's log p(z) does not split by dimension: its share is spread evenly over the
    live dimensions, so only sums over dimensions are meaningful then."""
    if isinstance(p, Mixture):
        share = p.log_prob(z, mask)[..., None] * mask / jnp.maximum(mask.sum(), 1.0)
        return log_prob_per_dim(q, z) * mask - share
    return (log_prob_per_dim(q, z) - log_prob_per_dim(p, z)) * mask


def sticking_the_landing(q: Gaussian, p: Gaussian | None, z: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`monte_carlo` with q's parameters stopped inside log q (the value is the same)."""
    return monte_carlo(_stopped(q), p, z, mask)


SAMPLED: dict[str, Callable[[Gaussian, Gaussian | Mixture | None, jax.Array, jax.Array], jax.Array]] = {
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
        if isinstance(p, Mixture):
            raise ValueError("kl_estimator='analytic' has no closed form for a mixture prior "
                             "(mog, vamp): use mc or stl")
        return closed_form
    return SAMPLED[estimator](q, p, z, mask)
