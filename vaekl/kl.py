"""Closed-form KL divergences between Gaussians, and their term decomposition.

For q = N(μq, Σq) and p = N(μp, Σp) in k dimensions, in nats:

    KL(q || p) = ½ [ tr(Σp⁻¹Σq) + (μp−μq)ᵀΣp⁻¹(μp−μq) − k + log|Σp| − log|Σq| ]
               = ½ [ trace + mahalanobis − dim + log_det_ratio ].

Conventions shared by every function here:
  * the event (latent) dimension is the last axis; a covariance is given by its
    lower Cholesky factor on the last two axes (only the lower triangle is read);
  * leading (batch) axes broadcast against each other, so one call evaluates a
    minibatch, a sweep axis, or both;
  * log-variances are natural logs; results are in nats, one per batch element
    (or per batch element and latent dimension with ``per_dim=True``);
  * inputs are promoted to at least float32; float64 is kept when enabled.

Each function is written for one example and vectorized with ``jnp.vectorize``
(i.e. ``jax.vmap``); all are jittable and differentiable.

Numerics. The totals are never formed by adding the four terms, which cancel
catastrophically when q ≈ p (trace ≈ k, log_det_ratio ≈ 0). Instead each
diagonal variance ratio r = exp(d) enters through the non-negative
``exp(d) − 1 − d`` evaluated by :func:`expm1_minus_x` (a Taylor series near 0,
``expm1(d) − d`` elsewhere); off-diagonal and mean contributions are sums of
squares (never ``norm(x)**2``, whose gradient is NaN at 0). Full covariances use
triangular solves and log-determinants from the factors' diagonals, never an
explicit inverse or ``det``. NaN inputs give NaN outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

__all__ = [
    "KLTerms",
    "expm1_minus_x",
    "kl_normal",
    "kl_std_normal",
    "kl_std_normal_terms",
    "kl_diag",
    "kl_diag_terms",
    "kl_full",
    "kl_full_terms",
    "kl_full_std_normal",
    "kl_full_std_normal_terms",
]


class KLTerms(NamedTuple):
    """The four terms of a Gaussian KL; KL = ½(trace + mahalanobis − dim + log_det_ratio).

    Attributes:
      trace: tr(Σp⁻¹Σq).
      mahalanobis: (μp−μq)ᵀΣp⁻¹(μp−μq).
      log_det_ratio: log|Σp| − log|Σq| (nats).
      dim: k, the number of latent dimensions (1 per dimension with ``per_dim``).
    Each has the batch shape (with a trailing k axis for ``per_dim=True``).
    """

    trace: jax.Array
    mahalanobis: jax.Array
    log_det_ratio: jax.Array
    dim: jax.Array

    def total(self) -> jax.Array:
        """½(trace + mahalanobis − dim + log_det_ratio), in nats.

        Adds the terms as written; fine for logging, but use the ``kl_*``
        functions for the value itself (they avoid the cancellation near q = p).
        """
        return 0.5 * (self.trace + self.mahalanobis - self.dim + self.log_det_ratio)


# --------------------------------------------------------------------------------------
# Elementwise building blocks.


def _series_terms(dtype) -> int:
    """Number of Taylor terms that make the |x| < ½ series exact to the dtype's precision."""
    return 14 if jnp.finfo(dtype).bits > 32 else 8


def expm1_minus_x(x: jax.Array) -> jax.Array:
    """exp(x) − 1 − x, accurate to a few float32 ulps for every finite x (elementwise, >= 0).

    ``expm1(x) − x`` loses about log2(2/|x|) bits near 0, where the result is
    ≈ x²/2; for |x| < ½ a Taylor series in Horner form is used instead.

    The branch is chosen by a 0/1 weight built from ``floor`` rather than by
    ``where``/``clip``: XLA:CPU does not fuse a select or clamp into the
    reduction over latent dimensions that always follows, and the unfused form
    costs a second pass over memory (measured 1.5× slower on a [2²⁰, 64] batch).
    The weight is exactly 1 for |x| < ½ and at most 1e-30 otherwise, so each
    branch contributes exactly or not at all; the series branch sees x·w, which
    is tiny outside its range, so neither branch's gradient is inf/NaN where it
    is not used. NaN propagates; ±inf inputs give NaN.
    """
    x = jnp.asarray(x)
    w = 1.0 / (1.0 + 1e30 * jnp.floor(2.0 * jnp.abs(x)))  # 1 if |x| < ½ else <= 1e-30
    xs = x * w
    n = _series_terms(x.dtype)
    # x²/2! + x³/3! + ... + x^(n+1)/(n+1)!  =  x² (1/2! + x (1/3! + x (...)))
    acc = jnp.full_like(xs, 1.0 / math.factorial(n + 1))
    for j in range(n, 1, -1):
        acc = 1.0 / math.factorial(j) + xs * acc
    return w * (xs * xs * acc) + (1.0 - w) * (jnp.expm1(x) - x)


def _float(*arrays):
    """Converts arrays to a common floating dtype of at least float32."""
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _check_event(fn: str, names: tuple[str, ...], arrays, matrix: tuple[bool, ...]) -> None:
    """Raises a ValueError naming the arguments if event shapes disagree (at trace time)."""
    sizes = []
    for name, a, is_matrix in zip(names, arrays, matrix):
        need = 2 if is_matrix else 1
        if a.ndim < need:
            raise ValueError(
                f"{fn}: `{name}` must have at least {need} axis (the event "
                f"{'matrix' if is_matrix else 'dimension'}), got shape {a.shape}.")
        if is_matrix and a.shape[-1] != a.shape[-2]:
            raise ValueError(f"{fn}: `{name}` must be square on its last two axes, got shape {a.shape}.")
        sizes.append(a.shape[-1])
    if len(set(sizes)) != 1:
        got = ", ".join(f"{n}: {a.shape}" for n, a in zip(names, arrays))
        raise ValueError(f"{fn}: event dimensions differ (last axis): {got}.")
    batch = [a.shape[: a.ndim - (2 if m else 1)] for a, m in zip(arrays, matrix)]
    try:
        jnp.broadcast_shapes(*batch)
    except ValueError:
        got = ", ".join(f"{n}: {b}" for n, b in zip(names, batch))
        raise ValueError(f"{fn}: batch shapes do not broadcast: {got}.") from None


def kl_normal(mean_q, log_var_q, mean_p, log_var_p) -> jax.Array:
    """KL(N(mean_q, exp(log_var_q)) || N(mean_p, exp(log_var_p))) for univariate Gaussians.

    Elementwise over broadcast inputs (no event axis); nats.
    """
    mean_q, log_var_q, mean_p, log_var_p = _float(mean_q, log_var_q, mean_p, log_var_p)
    d = log_var_q - log_var_p
    z = (mean_q - mean_p) * jnp.exp(-0.5 * log_var_p)
    return 0.5 * (expm1_minus_x(d) + jnp.square(z))


# --------------------------------------------------------------------------------------
# Diagonal Gaussian vs N(0, I).


def _std_normal_per_dim(mean, log_var):
    return 0.5 * (expm1_minus_x(log_var) + jnp.square(mean))


def _std_normal_terms_per_dim(mean, log_var):
    return jnp.exp(log_var), jnp.square(mean), -log_var, jnp.ones_like(log_var)


def kl_std_normal(mean, log_var, *, per_dim: bool = False) -> jax.Array:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) = ½ Σᵢ (exp(vᵢ) − 1 − vᵢ + μᵢ²).

    Args:
      mean: [..., k] posterior means.
      log_var: [..., k] posterior log-variances.
      per_dim: if True, return the [..., k] per-dimension KLs instead of the sum.
    Returns:
      [...] (or [..., k]) KL in nats.
    """
    mean, log_var = _float(mean, log_var)
    _check_event("kl_std_normal", ("mean", "log_var"), (mean, log_var), (False, False))
    sig = "(k),(k)->(k)" if per_dim else "(k),(k)->()"
    fn = _std_normal_per_dim if per_dim else (lambda m, v: _std_normal_per_dim(m, v).sum(-1))
    return jnp.vectorize(fn, signature=sig)(mean, log_var)


def kl_std_normal_terms(mean, log_var, *, per_dim: bool = False) -> KLTerms:
    """The terms of :func:`kl_std_normal`: (Σ exp(v), Σ μ², −Σ v, k), each [...] or [..., k]."""
    mean, log_var = _float(mean, log_var)
    _check_event("kl_std_normal_terms", ("mean", "log_var"), (mean, log_var), (False, False))
    return _vectorized_terms(_std_normal_terms_per_dim, per_dim, mean, log_var)


def _vectorized_terms(per_dim_fn, per_dim: bool, *args) -> KLTerms:
    """Vectorizes a per-example, per-dimension terms function; optionally sums over k."""
    if per_dim:
        out = jnp.vectorize(per_dim_fn, signature=",".join(["(k)"] * len(args)) + "->(k),(k),(k),(k)")
    else:
        out = jnp.vectorize(lambda *a: tuple(t.sum(-1) for t in per_dim_fn(*a)),
                            signature=",".join(["(k)"] * len(args)) + "->(),(),(),()")
    return KLTerms(*out(*args))


# --------------------------------------------------------------------------------------
# Diagonal Gaussian vs diagonal Gaussian.


def _diag_terms_per_dim(mean_q, log_var_q, mean_p, log_var_p):
    d = log_var_q - log_var_p
    z = (mean_q - mean_p) * jnp.exp(-0.5 * log_var_p)
    return jnp.exp(d), jnp.square(z), -d, jnp.ones_like(d)


def kl_diag(mean_q, log_var_q, mean_p, log_var_p, *, per_dim: bool = False) -> jax.Array:
    """KL(N(μq, diag(exp(vq))) || N(μp, diag(exp(vp)))), e.g. against a learned diagonal prior.

    Per dimension ½(exp(d) − 1 − d + (μq − μp)² exp(−vp)) with d = vq − vp.

    Args:
      mean_q, log_var_q: [..., k] posterior mean and log-variance.
      mean_p, log_var_p: [..., k] prior mean and log-variance (broadcast, e.g. [k]).
      per_dim: if True, return the [..., k] per-dimension KLs instead of the sum.
    Returns:
      [...] (or [..., k]) KL in nats.
    """
    args = _float(mean_q, log_var_q, mean_p, log_var_p)
    _check_event("kl_diag", ("mean_q", "log_var_q", "mean_p", "log_var_p"), args, (False,) * 4)
    if per_dim:
        return jnp.vectorize(kl_normal, signature="(k),(k),(k),(k)->(k)")(*args)
    return jnp.vectorize(lambda *a: kl_normal(*a).sum(-1), signature="(k),(k),(k),(k)->()")(*args)


def kl_diag_terms(mean_q, log_var_q, mean_p, log_var_p, *, per_dim: bool = False) -> KLTerms:
    """The terms of :func:`kl_diag`: (Σ exp(vq−vp), Σ (μq−μp)² exp(−vp), Σ (vp−vq), k)."""
    args = _float(mean_q, log_var_q, mean_p, log_var_p)
    _check_event("kl_diag_terms", ("mean_q", "log_var_q", "mean_p", "log_var_p"), args, (False,) * 4)
    return _vectorized_terms(_diag_terms_per_dim, per_dim, *args)


# --------------------------------------------------------------------------------------
# Full covariance, from lower Cholesky factors.


def _log_abs_diag(scale_tril):
    return jnp.log(jnp.abs(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)))


def _full_parts(mean_q, scale_tril_q, mean_p, scale_tril_p):
    """For one example: (d, off, mahalanobis) with d = log σq,ᵢ² − log σp,ᵢ² [k].

    M = Lp⁻¹Lq is lower triangular with diagonal Lq,ᵢᵢ/Lp,ᵢᵢ, so
    tr(Σp⁻¹Σq) = ‖M‖²_F = Σᵢ exp(dᵢ) + off, with off the sum of squares of M's
    strictly lower part, and log|Σp|/|Σq| = −Σᵢ dᵢ.
    """
    lq, lp = jnp.tril(scale_tril_q), jnp.tril(scale_tril_p)
    m = solve_triangular(lp, lq, lower=True)
    a = solve_triangular(lp, mean_p - mean_q, lower=True)
    d = 2.0 * (_log_abs_diag(lq) - _log_abs_diag(lp))
    off = jnp.sum(jnp.square(jnp.tril(m, -1)))
    return d, off, jnp.sum(jnp.square(a))


def _full_kl(*args):
    d, off, mahal = _full_parts(*args)
    return 0.5 * (jnp.sum(expm1_minus_x(d)) + off + mahal)


def _full_terms(*args):
    d, off, mahal = _full_parts(*args)
    return (jnp.sum(jnp.exp(d)) + off, mahal, -jnp.sum(d), jnp.asarray(d.shape[-1], d.dtype))


_FULL_SIG = "(k),(k,k),(k),(k,k)->"
_FULL_NAMES = ("mean_q", "scale_tril_q", "mean_p", "scale_tril_p")


def kl_full(mean_q, scale_tril_q, mean_p, scale_tril_p) -> jax.Array:
    """KL(N(μq, LqLqᵀ) || N(μp, LpLpᵀ)) for full covariances given by Cholesky factors.

    Args:
      mean_q: [..., k]; scale_tril_q: [..., k, k] lower-triangular, nonzero diagonal.
      mean_p: [..., k]; scale_tril_p: [..., k, k] lower-triangular, nonzero diagonal.
    Returns:
      [...] KL in nats.
    """
    args = _float(mean_q, scale_tril_q, mean_p, scale_tril_p)
    _check_event("kl_full", _FULL_NAMES, args, (False, True, False, True))
    return jnp.vectorize(_full_kl, signature=_FULL_SIG + "()")(*args)


def kl_full_terms(mean_q, scale_tril_q, mean_p, scale_tril_p) -> KLTerms:
    """The terms of :func:`kl_full`, each [...] (no per-dimension split for full covariances)."""
    args = _float(mean_q, scale_tril_q, mean_p, scale_tril_p)
    _check_event("kl_full_terms", _FULL_NAMES, args, (False, True, False, True))
    return KLTerms(*jnp.vectorize(_full_terms, signature=_FULL_SIG + "(),(),(),()")(*args))


# --------------------------------------------------------------------------------------
# Full covariance vs N(0, I): no solve needed.


def _full_std_parts(mean, scale_tril):
    lq = jnp.tril(scale_tril)
    d = 2.0 * _log_abs_diag(lq)
    return d, jnp.sum(jnp.square(jnp.tril(lq, -1))), jnp.sum(jnp.square(mean))


def _full_std_kl(mean, scale_tril):
    d, off, mahal = _full_std_parts(mean, scale_tril)
    return 0.5 * (jnp.sum(expm1_minus_x(d)) + off + mahal)


def _full_std_terms(mean, scale_tril):
    d, off, mahal = _full_std_parts(mean, scale_tril)
    return (jnp.sum(jnp.exp(d)) + off, mahal, -jnp.sum(d), jnp.asarray(d.shape[-1], d.dtype))


def kl_full_std_normal(mean, scale_tril) -> jax.Array:
    """KL(N(μ, LLᵀ) || N(0, I)) = ½(‖L‖²_F + ‖μ‖² − k − 2 Σᵢ log|Lᵢᵢ|).

    Args:
      mean: [..., k]; scale_tril: [..., k, k] lower-triangular.
    Returns:
      [...] KL in nats.
    """
    mean, scale_tril = _float(mean, scale_tril)
    _check_event("kl_full_std_normal", ("mean", "scale_tril"), (mean, scale_tril), (False, True))
    return jnp.vectorize(_full_std_kl, signature="(k),(k,k)->()")(mean, scale_tril)


def kl_full_std_normal_terms(mean, scale_tril) -> KLTerms:
    """The terms of :func:`kl_full_std_normal`, each [...]."""
    mean, scale_tril = _float(mean, scale_tril)
    _check_event("kl_full_std_normal_terms", ("mean", "scale_tril"), (mean, scale_tril), (False, True))
    return KLTerms(*jnp.vectorize(_full_std_terms, signature="(k),(k,k)->(),(),(),()")(mean, scale_tril))
