"""Batch estimators behind the latent regularizers: β-TCVAE, DIP-VAE, InfoVAE (MMD), FactorVAE.

Pure JAX functions of one batch of M examples with k latent dimensions ([M, k] arrays); a
sweep's run axis is added with ``jax.vmap``. Every function is jittable, differentiable and
takes an optional ``mask`` [k] of 0/1 floats (latent dimensions switched off in padded
vmapped sweeps): a masked dimension contributes exactly nothing, so a run with k dimensions
padded to K > k under a mask gives the value of the unpadded run. Masked inputs are replaced
by zeros before any arithmetic, so whatever a padded dimension holds (even inf/NaN) reaches
neither the value nor the gradient. Densities and divergences are in nats.

  * :func:`tc_decomposition`   β-TCVAE's split of the KL (Chen et al. 2018), MWS or MSS.
  * :func:`dip_covariance`, :func:`dip_penalty`   DIP-VAE-I/II (Kumar et al. 2018).
  * :func:`mmd`, :func:`prior_samples`   unbiased MMD² of InfoVAE / WAE.
  * :func:`permute_dims`, :func:`discriminator_init`, :func:`discriminator_apply`,
    :func:`factor_tc`, :func:`discriminator_loss`   FactorVAE (Kim & Mnih 2018).
  * :func:`gaussian_total_correlation`   exact TC of N(0, Σ), through :func:`vaekl.kl.kl_full`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from vaekl import kl as klib
from vaekl.models.gaussian import standard_normal

__all__ = [
    "ESTIMATORS",
    "tc_log_weights",
    "tc_decomposition",
    "dip_covariance",
    "dip_penalty",
    "mmd",
    "prior_samples",
    "permute_dims",
    "discriminator_init",
    "discriminator_apply",
    "factor_tc",
    "discriminator_loss",
    "gaussian_total_correlation",
]

ESTIMATORS = ("mws", "mss")
_LOG_2PI = math.log(2.0 * math.pi)
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes for the batch statistics on GPU


# --------------------------------------------------------------------------------------
# Shared helpers.


def _float(*arrays):
    """Converts arrays to a common floating dtype of at least float32."""
    dtype = jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
    return tuple(jnp.asarray(a, dtype) for a in arrays)


def _keep(mask, k: int) -> jax.Array | None:
    """[k] bool, True for the dimensions in use; None without a mask."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != (k,):
        raise ValueError(f"mask must have shape ({k},) (the latent dimension), got {mask.shape}.")
    return mask > 0


def _zero_masked(keep, *arrays):
    """Replaces masked latent columns (last axis) by 0 so they cannot produce inf/NaN."""
    if keep is None:
        return arrays
    return tuple(jnp.where(keep, a, jnp.zeros((), a.dtype)) for a in arrays)


def _active_dims(keep, k: int, dtype) -> jax.Array:
    """k_eff, the number of dimensions in use (a traced scalar under a mask)."""
    if keep is None:
        return jnp.asarray(k, dtype)
    return jnp.sum(keep).astype(dtype)


def _log_normal(x, mean, log_var):
    """Elementwise log N(x; mean, exp(log_var)) in nats (no sum over dimensions)."""
    return -0.5 * (jnp.square(x - mean) * jnp.exp(-log_var) + log_var + _LOG_2PI)


def _check_batch(fn: str, **arrays) -> tuple[int, int]:
    shapes = {n: jnp.shape(a) for n, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        got = ", ".join(f"{n}: {s}" for n, s in shapes.items())
        raise ValueError(f"{fn}: expected equal [M, k] shapes (vmap for run axes), got {got}.")
    return first


# --------------------------------------------------------------------------------------
# β-TCVAE: KL decomposition with log q(z) estimated from the batch.


def tc_log_weights(batch_size: int, dataset_size, estimator: str = "mss",
                   dtype=jnp.float32) -> jax.Array:
    """[M, M] log importance weights log W[i, n] of sample i's aggregate-posterior estimate
    q(z_i) ≈ Σ_n W[i, n] q(z_i | x_n) (Chen et al. 2018, Appendix C; N = ``dataset_size``).

    'mws' (minibatch weighted sampling, C.1): W[i, n] = 1/(N·M) for all i, n. The rows sum
    to 1/N, not 1: this is the paper's (and its code's) estimator, whose constant offset
    leaves the gradients alone but not the values. Against uniform weights 1/M (the batch's
    own mixture, consistent as M grows) every log q̂(z) and log q̂(z_j) is lower by exactly
    log N, so its total_correlation is higher by (k−1)·log N, its dimwise_kl lower by
    k·log N and its index_code_mi higher by log N (k the unmasked dimensions).

    'mss' (minibatch stratified sampling, C.2), for M >= 2 and N >= M. The sample z_i comes
    from q(z|x_i); split the data set into M−1 strata of N/(M−1) points with x_i in the first.
    Each of the other M−2 strata is represented by one batch member, standing for its
    N/(M−1) points (weight 1/(M−1)); x_i's own stratum is x_i itself (weight 1/N) plus one
    batch member standing for its remaining N/(M−1) − 1 points:

        W[i, i] = 1/N,   W[i, (i+1) mod M] = (N−M+1)/(N(M−1)),   W[i, n] = 1/(M−1) otherwise.

    Each row sums to 1, and with the strata drawn at random every other data point has
    expected weight 1/N, so Σ_n W[i, n] q(z_i|x_n) is unbiased for q(z_i). This is the matrix
    that rtqichen/beta-tcvae's ``_log_importance_weight_matrix`` intends (its ``M`` is
    batch_size − 1). As written, that code fills the first column with 1/N and the second
    with the stratum weight instead of the diagonal and superdiagonal (``view(-1)[::M+1]``
    steps by the row length, not the row length + 1); with the stride fixed, ``W[M-1, 0]``
    still gives row M−1 a second stratum weight and leaves the last row (M) without one (it
    should be ``W[M, 0]``). The partner (i+1) mod M is one fixed choice; any derangement of
    the (randomly ordered) batch gives the same distribution. For M = 2 the weights are 1/N
    and (N−1)/N.

    ``dataset_size`` may be a traced scalar (one per run under vmap); N >= M is checked when it
    is a Python number.
    """
    m = int(batch_size)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")
    if isinstance(dataset_size, numbers.Real) and dataset_size < m:
        raise ValueError(f"dataset_size ({dataset_size}) must be >= the batch size ({m}).")
    n = jnp.asarray(dataset_size, dtype)
    if estimator == "mws":
        return jnp.full((m, m), -(jnp.log(n) + math.log(m)), dtype)
    if m < 2:
        raise ValueError("estimator 'mss' needs a batch of at least 2 examples.")
    eye = jnp.eye(m, dtype=bool)
    partner = jnp.roll(eye, 1, axis=1)  # [i, (i+1) mod M]
    log_self = -jnp.log(n)
    log_partner = jnp.log(n - (m - 1)) - jnp.log(n) - math.log(m - 1)
    log_other = jnp.asarray(-math.log(m - 1), dtype)
    return jnp.where(eye, log_self, jnp.where(partner, log_partner, log_other)).astype(dtype)


def tc_decomposition(z, mean, log_var, dataset_size, estimator: str = "mws", mask=None,
                     prior_mean=None, prior_log_var=None) -> dict[str, jax.Array]:
    """β-TCVAE's split of the KL (Chen et al. 2018, Sec. 3), per example, in nats.

    With z_i ~ q(z|x_i) (diagonal Gaussian posteriors), log q(z_i) and log Π_j q(z_ij) are
    estimated from the batch with the weights W of :func:`tc_log_weights`:

        log q(z_i)       ≈ logsumexp_n [log W[i, n] + Σ_j log q(z_ij | x_n)],
        log q(z_ij)      ≈ logsumexp_n [log W[i, n] + log q(z_ij | x_n)]       (each j),
        index_code_mi    = log q(z_i | x_i) − log q(z_i),
        total_correlation = log q(z_i) − Σ_j log q(z_ij),
        dimwise_kl       = Σ_j [log q(z_ij) − log p(z_ij)].

    The three parts sum to log q(z_i|x_i) − log p(z_i), a one-sample estimate of
    KL(q(z|x_i) || p(z)); their batch means estimate the MI, TC and dimension-wise KL terms.
    'mws' with N = dataset_size is the paper's MWS (log q(z_i) ≈ logsumexp_n log q(z_i|x_n) −
    log(N·M)), which offsets the values by constants (see :func:`tc_log_weights`); 'mss' is
    consistent. The prior is N(0, I), or N(prior_mean, exp(prior_log_var)) for a learned
    diagonal prior. Memory is O(M²·k).

    Args:
      z, mean, log_var: [M, k] samples and posterior parameters.
      dataset_size: N, the number of training examples (int or traced scalar).
      estimator: 'mws' or 'mss' (static).
      mask: optional [k] 0/1 dimensions in use.
      prior_mean, prior_log_var: optional [k] diagonal prior (both or neither).
    Returns:
      {'index_code_mi', 'total_correlation', 'dimwise_kl'}, each [M].
    """
    if (prior_mean is None) != (prior_log_var is None):
        raise ValueError("tc_decomposition: give both prior_mean and prior_log_var, or neither.")
    m, k = _check_batch("tc_decomposition", z=z, mean=mean, log_var=log_var)
    z, mean, log_var = _float(z, mean, log_var)
    keep = _keep(mask, k)
    z, mean, log_var = _zero_masked(keep, z, mean, log_var)
    if prior_mean is None:
        prior_mean = prior_log_var = jnp.zeros((k,), z.dtype)
    prior_mean, prior_log_var = (jnp.broadcast_to(jnp.asarray(a, z.dtype), (k,))
                                 for a in (prior_mean, prior_log_var))
    prior_mean, prior_log_var = _zero_masked(keep, prior_mean, prior_log_var)

    def masked(a):  # [..., k] per-dimension log densities, masked dimensions exactly 0
        return a if keep is None else jnp.where(keep, a, jnp.zeros((), a.dtype))

    log_w = tc_log_weights(m, dataset_size, estimator, z.dtype)                   # [M, M]
    log_q_mat = masked(_log_normal(z[:, None, :], mean[None], log_var[None]))     # [M(i), M(n), k]
    log_qz = logsumexp(log_w + jnp.sum(log_q_mat, -1), axis=1)                     # [M]
    log_qz_dims = masked(logsumexp(log_w[:, :, None] + log_q_mat, axis=1))         # [M, k]
    log_qz_product = jnp.sum(log_qz_dims, -1)
    log_qzx = jnp.sum(masked(_log_normal(z, mean, log_var)), -1)                   # [M]
    log_pz_dims = masked(_log_normal(z, prior_mean, prior_log_var))                # [M, k]
    return {
        "index_code_mi": log_qzx - log_qz,
        "total_correlation": log_qz - log_qz_product,
        "dimwise_kl": jnp.sum(log_qz_dims - log_pz_dims, -1),
    }


# --------------------------------------------------------------------------------------
# DIP-VAE.


def dip_covariance(mean, log_var=None, kind: str = "i", mask=None) -> jax.Array:
    """DIP-VAE's covariance of the aggregate posterior (Kumar et al. 2018, Sec. 3), [k, k].

    'i':  Cov_batch[μ(x)] = (1/M) Σ_i (μ_i − μ̄)(μ_i − μ̄)ᵀ;
    'ii': E_batch[diag exp(log_var(x))] + Cov_batch[μ(x)], the covariance of q(z).
    Both normalize by 1/M (the maximum-likelihood batch covariance, as disentanglement_lib's
    ``compute_covariance_z_mean``). Rows and columns of masked dimensions are 0.

    Args:
      mean, log_var: [M, k] posterior parameters (log_var unused, may be None, for 'i').
      kind: 'i' or 'ii' (static).
      mask: optional [k] 0/1 dimensions in use.
    """
    if kind not in ("i", "ii"):
        raise ValueError(f"unknown DIP-VAE kind {kind!r}; choose 'i' or 'ii'")
    if kind == "ii" and log_var is None:
        raise ValueError("dip_covariance: kind 'ii' needs log_var.")
    arrays = {"mean": mean} if log_var is None else {"mean": mean, "log_var": log_var}
    m, k = _check_batch("dip_covariance", **arrays)
    (mean,) = _float(mean)
    keep = _keep(mask, k)
    (mean,) = _zero_masked(keep, mean)
    centered = mean - jnp.mean(mean, 0)
    cov = jnp.einsum("mi,mj->ij", centered, centered, precision=_HIGHEST) / m
    if kind == "ii":
        (log_var,) = _zero_masked(keep, *_float(log_var))
        cov = cov + jnp.diag(jnp.mean(jnp.exp(log_var), 0).astype(cov.dtype))
    if keep is not None:
        cov = jnp.where(keep[:, None] & keep[None, :], cov, jnp.zeros((), cov.dtype))
    return cov


def dip_penalty(cov, lambda_od, lambda_d, mask=None) -> jax.Array:
    """λ_od·Σ_{i≠j} C_ij² + λ_d·Σ_i (C_ii − 1)² over the unmasked dimensions (scalar).

    A masked dimension adds neither its off-diagonal entries nor (C_ii − 1)². λ_od and λ_d
    may be traced (per-run sweep values).
    """
    (cov,) = _float(cov)
    k = cov.shape[-1]
    if cov.shape != (k, k):
        raise ValueError(f"dip_penalty: cov must be [k, k], got {cov.shape}.")
    keep = _keep(mask, k)
    eye = jnp.eye(k, dtype=bool)
    pair = ~eye
    if keep is not None:
        both = keep[:, None] & keep[None, :]
        cov = jnp.where(both, cov, jnp.zeros((), cov.dtype))
        pair = pair & both
    off = jnp.sum(jnp.where(pair, jnp.square(cov), 0.0))
    diag = jnp.square(jnp.diagonal(cov) - 1.0)
    if keep is not None:
        diag = jnp.where(keep, diag, 0.0)
    return lambda_od * off + lambda_d * jnp.sum(diag)


# --------------------------------------------------------------------------------------
# InfoVAE / WAE: maximum mean discrepancy.

KERNELS = ("imq", "rbf")


def mmd(z, z_prior, kernel: str = "imq", mask=None, prior_var=1.0) -> jax.Array:
    """Unbiased MMD² between the batch z [n, k] and prior draws z_prior [m, k] (scalar).

    The U-statistic (Gretton et al. 2012, Lemma 6), without the i = j terms of the
    within-sample sums:

        MMD²_u = Σ_{i≠j} κ(z_i, z_j)/(n(n−1)) + Σ_{i≠j} κ(y_i, y_j)/(m(m−1))
                 − 2 Σ_{i,j} κ(z_i, y_j)/(nm),

    whose expectation is 0 when q(z) = p(z) (it can be negative). Kernels, with
    C = 2·k_eff·σ_p² (σ_p² = ``prior_var``, 1 for N(0, I); k_eff the unmasked dimensions):
    'imq' κ(x, y) = C/(C + ‖x − y‖²) as in WAE-MMD (Tolstikhin et al. 2018, Sec. 4; its
    code also sums over several multiples of C, not done here), and 'rbf' κ(x, y) =
    exp(−‖x − y‖²/C), the Gaussian kernel of InfoVAE (Zhao et al. 2019) with the same scale
    (ShengjiaZhao/MMD-Variational-Autoencoder uses exp(−‖x − y‖²/k²) and the biased
    V-statistic). Squared distances are formed from differences, never ‖x‖² + ‖y‖² − 2xᵀy.
    Needs n, m >= 2; O(n·m·k) memory.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
    z, z_prior = _float(z, z_prior)
    if z.ndim != 2 or z_prior.ndim != 2 or z.shape[1] != z_prior.shape[1]:
        raise ValueError(f"mmd: expected [n, k] and [m, k], got {z.shape} and {z_prior.shape}.")
    n, k = z.shape
    m = z_prior.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd: the unbiased estimator needs at least 2 samples on each side.")
    keep = _keep(mask, k)
    z, z_prior = _zero_masked(keep, z, z_prior)
    c = 2.0 * jnp.maximum(_active_dims(keep, k, z.dtype), 1.0) * prior_var

    def gram(a, b):
        d2 = jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), -1)
        return c / (c + d2) if kernel == "imq" else jnp.exp(-d2 / c)

    def off_diagonal_mean(g):
        s = g.shape[0]
        return jnp.sum(jnp.where(jnp.eye(s, dtype=bool), 0.0, g)) / (s * (s - 1))

    return (off_diagonal_mean(gram(z, z)) + off_diagonal_mean(gram(z_prior, z_prior))
            - 2.0 * jnp.mean(gram(z, z_prior)))


def prior_samples(key: jax.Array, shape_like_z, dtype=None) -> jax.Array:
    """N(0, I) draws shaped like z (an array or a shape [..., k]), dimension j from its own
    stream fold_in(key, j) (:func:`vaekl.models.gaussian.standard_normal`), so a k-run's
    draws are the leading block of a wider run's."""
    if hasattr(shape_like_z, "shape"):
        shape = tuple(shape_like_z.shape)
        dtype = dtype or jnp.promote_types(shape_like_z.dtype, jnp.float32)
    else:
        shape = tuple(shape_like_z)
    return standard_normal(key, shape, dtype or jnp.float32)


# --------------------------------------------------------------------------------------
# FactorVAE.


def permute_dims(key: jax.Array, z, mask=None) -> jax.Array:
    """z [M, k] with each column permuted independently across the batch (Kim & Mnih 2018,
    Alg. 2): column j by jax.random.permutation(fold_in(key, j), M), so the first k columns
    do not depend on how many follow. Masked columns are returned as 0."""
    (z,) = _float(z)
    m, k = _check_batch("permute_dims", z=z)
    keep = _keep(mask, k)
    shuffle = lambda j, col: col[jax.random.permutation(jax.random.fold_in(key, j), m)]
    out = jax.vmap(shuffle, in_axes=(0, 1), out_axes=1)(jnp.arange(k), z)
    return _zero_masked(keep, out)[0]


def discriminator_init(key: jax.Array, latent_dim: int, hidden: Sequence[int] = (1000,) * 6,
                       mask=None) -> list[dict[str, jax.Array]]:
    """FactorVAE discriminator parameters: a list of {'w': [in, out], 'b': [out]} layers,
    ``latent_dim`` → hidden... → 2, as disentanglement_lib's ``fc_discriminator``
    (6 × 1000, leaky ReLU 0.2). Glorot-uniform kernels, zero biases.

    The first kernel is [latent_dim, hidden[0]], row j drawn from its own stream and scaled
    by the Glorot limit with fan-in k_eff (the unmasked dimensions), and masked rows are 0:
    ``discriminator_init(key, K, mask=m)`` equals ``discriminator_init(key, k)`` with K − k
    zero rows appended when m keeps the first k dimensions, and computes the same function.
    """
    sizes = (int(latent_dim), *(int(h) for h in hidden), 2)
    keep = _keep(mask, sizes[0])
    params = []
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lkey = jax.random.fold_in(key, layer)
        if layer == 0:
            u = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(lkey, j), (fan_out,),
                                                      minval=-1.0, maxval=1.0))(jnp.arange(fan_in))
            fan_in = _active_dims(keep, fan_in, jnp.float32)
        else:
            u = jax.random.uniform(lkey, (fan_in, fan_out), minval=-1.0, maxval=1.0)
        w = u * jnp.sqrt(6.0 / (jnp.asarray(fan_in, jnp.float32) + fan_out))
        if layer == 0 and keep is not None:
            w = jnp.where(keep[:, None], w, 0.0)
        params.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    return params


def discriminator_apply(params, z, mask=None) -> jax.Array:
    """Logits [M, 2] of the discriminator for z [M, k]: class 0 'z ~ q(z)', class 1
    'dimension-wise permuted'. Masked columns of z are zeroed first."""
    (z,) = _float(z)
    keep = _keep(mask, z.shape[-1])
    (h,) = _zero_masked(keep, z)
    for layer in params[:-1]:
        h = jax.nn.leaky_relu(h @ layer["w"] + layer["b"], negative_slope=0.2)
    return h @ params[-1]["w"] + params[-1]["b"]


def factor_tc(logits) -> jax.Array:
    """FactorVAE's TC estimate mean(logit₀ − logit₁) = E[log D(z)/(1 − D(z))] with
    D = softmax(logits)₀, the density-ratio estimate of KL(q(z) || Π_j q(z_j)) (nats)."""
    return jnp.mean(logits[:, 0] - logits[:, 1])


def discriminator_loss(logits_z, logits_perm) -> jax.Array:
    """The discriminator's cross-entropy ½·mean CE(logits_z, 0) + ½·mean CE(logits_perm, 1)
    (class 0 = z ~ q(z), class 1 = permuted), with log_softmax (nats)."""
    ce_z = -jax.nn.log_softmax(logits_z, axis=-1)[:, 0]
    ce_perm = -jax.nn.log_softmax(logits_perm, axis=-1)[:, 1]
    return 0.5 * jnp.mean(ce_z) + 0.5 * jnp.mean(ce_perm)


# --------------------------------------------------------------------------------------
# Exact total correlation of a Gaussian.


def gaussian_total_correlation(cov, mask=None) -> jax.Array:
    """TC of N(0, Σ): KL(N(0, Σ) || N(0, diag Σ)) = ½(Σ_j log Σ_jj − log|Σ|), in nats.

    Evaluated by :func:`vaekl.kl.kl_full` from the Cholesky factors of Σ and diag Σ (no
    determinant), so it is cancellation-free near diagonal Σ and exactly 0 for diagonal Σ.
    cov: [..., k, k] symmetric positive definite; masked rows and columns are replaced by
    those of the identity, which add exactly 0. Returns [...].
    """
    (cov,) = _float(cov)
    k = cov.shape[-1]
    keep = _keep(mask, k)
    eye = jnp.eye(k, dtype=cov.dtype)
    if keep is not None:
        cov = jnp.where(keep[:, None] & keep[None, :], cov, eye)
    scale_tril = jnp.linalg.cholesky(cov)
    diag_tril = jnp.sqrt(jnp.diagonal(cov, axis1=-2, axis2=-1))[..., None] * eye
    zeros = jnp.zeros(cov.shape[:-1], cov.dtype)
    return klib.kl_full(zeros, scale_tril, zeros, diag_tril)
