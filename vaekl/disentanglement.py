"""Supervised disentanglement metrics, and the unsupervised Gaussian total correlation.

Every metric scores a representation against a ground-truth generative process through
disentanglement_lib's interface, and nothing else:

    gt.factor_sizes                                   tuple of ints, one per factor
    gt.sample_factors(n, rng) -> int [n, F]           rng a numpy.random.Generator
    gt.sample_observations_from_factors(f, rng) -> [n, ...]

and each metric is ``fn(gt, representation_fn, rng, **defaults) -> dict[str, float]``,
with ``representation_fn(observations [B, ...]) -> codes [B, d]`` (NumPy or JAX; the
deterministic code, e.g. the posterior mean). Observations are made and encoded in
chunks of at most ``encode_batch`` rows, so only codes [n, d] are ever held.

**Representation tables.** Where the ground truth's observations are a fixed function of
its factors (``gt.deterministic_observations``: plain dSprites, not its colour or noise
variants), ``representation_fn`` may instead be a :class:`RepresentationTable`: the codes
of every grid point [N, d], encoded once (:func:`representation_table`, 737,280 images
for dSprites) and read by flat factor index. The metrics then draw exactly the same
factors from ``rng`` (observing such a source consumes no randomness) and get the same
codes, so the scores equal encoding on demand, at a fixed cost of N encodings instead of
the ~3 million that disentanglement_lib's default sample sizes need
(:func:`encodings_needed`; :func:`table_pays_off`). Every metric of :data:`METRICS`
reads the deterministic code only; :func:`mig_sampling` reads the posterior
(mean, log variance) of the grid through ``posterior_fn`` and draws z itself, so it
always encodes on demand.

Which variant each computes (defaults are disentanglement_lib's ``unsupervised_study_v1``
metric configs; the estimators are re-implemented, and tested on oracle representations):

=================================  ====================================================
:func:`mig`                        discrete MIG of disentanglement_lib (20-bin histograms
                                   of the codes, plug-in MI), averaged over all factors
:func:`mig_sampling`               Chen et al.'s MIG: I(z_j; v_k) by Monte Carlo over the
                                   full factor grid for Gaussian posteriors
:func:`beta_vae_score`             Higgins et al. (2017), logistic regression
:func:`factor_vae_score`           Kim & Mnih (2018), majority-vote classifier
:func:`dci`                        Eastwood & Williams (2018); ``model="gbt"`` (as
                                   disentanglement_lib) or the faster ``"random_forest"``
:func:`sap`                        Kumar et al. (2018), discrete (linear SVM) or continuous
:func:`modularity_explicitness`    Ridgeway & Mozer (2018)
:func:`gaussian_total_correlation_score`  TC of a Gaussian fitted to the codes
=================================  ====================================================

Factors with a single value (``factor_sizes[k] == 1``, e.g. dSprites' colour) carry no
information and are left out of every metric; disentanglement_lib drops them from its
dSprites factors, so with them removed the definitions coincide. Information is in nats.
The codes are handled in float64 (scikit-learn's estimators run in float64 anyway); the
Monte-Carlo entropies of :func:`mig_sampling` run jitted in float32.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import logging as pylogging

from vaekl import progress as progress_lib


def _sklearn(submodule: str):
    """``sklearn.<submodule>``, imported when a metric first needs it (importing scikit-learn
    takes ~1.5 s, and training, sweeps and most evaluations never do)."""
    return importlib.import_module(f"sklearn.{submodule}")


LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

__all__ = [
    "GroundTruthData",
    "METRICS",
    "Metric",
    "OnDemand",
    "RepresentationTable",
    "representation_table",
    "encodings_needed",
    "metric",
    "representation_metrics",
    "score_titles",
    "sample_sizes",
    "table_pays_off",
    "sample_codes_and_factors",
    "histogram_discretize",
    "discrete_mutual_info",
    "discrete_entropy",
    "mutual_info_matrix",
    "mig_from_codes",
    "mig",
    "mutual_info_sampling",
    "mig_sampling",
    "log_mixture_density",
    "beta_vae_score",
    "factor_vae_score",
    "dci_importance",
    "dci_disentanglement",
    "dci_completeness",
    "dci",
    "sap_score_matrix",
    "sap",
    "modularity",
    "modularity_explicitness",
    "gaussian_total_correlation",
    "gaussian_wasserstein_correlation",
    "gaussian_total_correlation_score",
    "evaluate_all",
    "evaluate_representation",
]

_LOG_2PI = math.log(2.0 * math.pi)
_TABLE_ELEMENTS = 1 << 22  # entries of one [S, chunk, d] block of log-densities (16 MB f32)


class GroundTruthData(Protocol):
    """What a metric needs from a ground-truth process (disentanglement_lib's interface)."""

    factor_sizes: Sequence[int]

    def sample_factors(self, num: int, rng: np.random.Generator) -> np.ndarray: ...

    def sample_observations_from_factors(self, factors: np.ndarray,
                                         rng: np.random.Generator) -> Any: ...


RepresentationFn = Callable[[Any], Any]


# --------------------------------------------------------------------------------------
# Representations: encoded on demand, or read from a table of the whole grid.


class OnDemand:
    """Codes of factors by observing them (``gt.sample_observations_from_factors(f, rng)``)
    and encoding the observations with ``representation_fn``; the default."""

    def __init__(self, representation_fn: RepresentationFn):
        self.representation_fn = representation_fn

    def codes(self, gt: GroundTruthData, factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """codes [n, d] float64 of factor indices [n, F]."""
        return _encode(self.representation_fn, gt.sample_observations_from_factors(factors, rng),
                       factors.shape[0])


class RepresentationTable:
    """The deterministic codes of every point of a factor grid, read by flat factor index.

    Args:
      table: codes [N, d] (any float dtype; read as float64), row ``i`` the code of the
        grid point of flat index ``i`` (last factor fastest, ``np.ravel_multi_index``).
      factor_sizes: the grid, N = Π factor_sizes.
    """

    def __init__(self, table: np.ndarray, factor_sizes: Sequence[int]):
        self.factor_sizes = tuple(int(s) for s in factor_sizes)
        n = math.prod(self.factor_sizes)
        if np.ndim(table) != 2 or np.shape(table)[0] != n:
            raise ValueError(f"RepresentationTable: need codes [{n}, d] for factor_sizes "
                             f"{self.factor_sizes}, got shape {np.shape(table)}")
        self.table = np.asarray(table)

    def codes(self, gt: GroundTruthData, factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """codes [n, d] float64 of factor indices [n, F]; ``rng`` unused (as the source's)."""
        del rng
        if tuple(gt.factor_sizes) != self.factor_sizes:
            raise ValueError(f"RepresentationTable of factor_sizes {self.factor_sizes} used with a "
                             f"ground truth of factor_sizes {tuple(gt.factor_sizes)}")
        if not getattr(gt, "deterministic_observations", False):
            raise ValueError("RepresentationTable: the ground truth's observations are random "
                             "(deterministic_observations is False); encode on demand instead")
        index = np.ravel_multi_index(tuple(np.asarray(factors).T), self.factor_sizes)
        return self.table[index].astype(np.float64)


def _as_representation(representation_fn):
    """A table as it is, a function of observations as :class:`OnDemand`."""
    return representation_fn if hasattr(representation_fn, "codes") else OnDemand(representation_fn)


class _Counted:
    """A representation that reports the codes it returns to a :class:`vaekl.progress.Progress`."""

    def __init__(self, representation, progress: progress_lib.Progress):
        self.representation, self.progress = representation, progress

    def codes(self, gt, factors, rng):
        out = self.representation.codes(gt, factors, rng)
        self.progress.update(factors.shape[0])
        return out


def representation_table(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn, *,
                         batch_size: int = 256, progress_every: float | None = 10.0
                         ) -> RepresentationTable:
    """Encodes every point of the factor grid once: a :class:`RepresentationTable`.

    The grid's N points (flat index order) are observed with
    ``gt.sample_observations_from_factors(factors, None)`` and encoded by
    ``representation_fn`` in batches of ``batch_size`` (the last one padded, so a jitted
    encoder compiles once); a progress line (images/s, ETA) every ``progress_every`` seconds.
    ValueError unless ``gt.deterministic_observations`` (noise or random colour: encode on
    demand). Memory: the codes [N, d] as ``representation_fn`` returns them (29 MB for
    dSprites at d = 10 in float32).
    """
    if not getattr(ground_truth_data, "deterministic_observations", False):
        raise ValueError("representation_table: the ground truth's observations are random "
                         "(deterministic_observations is False); encode on demand instead")
    if batch_size < 1:
        raise ValueError(f"representation_table: batch_size must be >= 1, got {batch_size}")
    sizes = tuple(int(s) for s in ground_truth_data.factor_sizes)
    n = math.prod(sizes)
    bar = progress_lib.Progress("representation table", n, "images", progress_every)
    table = None
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        index = np.minimum(np.arange(start, start + batch_size), n - 1)  # pad with the last point
        factors = np.stack(np.unravel_index(index, sizes), axis=1).astype(np.int64)
        c = np.asarray(representation_fn(ground_truth_data.sample_observations_from_factors(factors, None)))
        if c.ndim != 2 or c.shape[0] != batch_size:
            raise ValueError(f"representation_fn must map {batch_size} observations to "
                             f"[{batch_size}, d]; got shape {c.shape}")
        if table is None:
            table = np.empty((n, c.shape[1]), c.dtype)
        table[start:start + rows] = c[:rows]
        bar.update(rows)
    bar.finish()
    return RepresentationTable(table, sizes)


# --------------------------------------------------------------------------------------
# Sampling and encoding.


def _used_factors(gt: GroundTruthData) -> np.ndarray:
    """Indices of the factors with more than one value."""
    sizes = np.asarray(tuple(gt.factor_sizes), dtype=np.int64)
    used = np.flatnonzero(sizes > 1)
    if used.size == 0:
        raise ValueError(f"ground truth has no factor with more than one value: factor_sizes={tuple(sizes)}")
    return used


def _rows(x: Any, rows: int, what: str, dtype=np.float64) -> np.ndarray:
    """x as an array [rows, d] of ``dtype``; the error names ``what`` and the shape."""
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2 or x.shape[0] != rows:
        raise ValueError(f"{what} must map {rows} observations to [{rows}, d]; got shape {x.shape}")
    return x


def _encode(representation_fn: RepresentationFn, observations: Any, rows: int) -> np.ndarray:
    """codes [rows, d] float64 of one chunk of observations."""
    return _rows(representation_fn(observations), rows, "representation_fn")


def _codes(gt: GroundTruthData, representation, factors: np.ndarray, rng: np.random.Generator
           ) -> np.ndarray:
    """codes [n, d] float64 of factor indices [n, F], from a table or encoded on demand."""
    return _rows(_as_representation(representation).codes(gt, factors, rng), factors.shape[0],
                 "representation_fn")


def _sample_factors(gt: GroundTruthData, num: int, rng: np.random.Generator) -> np.ndarray:
    factors = np.array(gt.sample_factors(num, rng), dtype=np.int64)  # a writable copy
    if factors.shape != (num, len(gt.factor_sizes)):
        raise ValueError(f"gt.sample_factors({num}) must return [{num}, {len(gt.factor_sizes)}]; "
                         f"got shape {factors.shape}")
    return factors


def sample_codes_and_factors(gt: GroundTruthData, representation_fn: RepresentationFn, num_points: int,
                             rng: np.random.Generator, encode_batch: int = 1000
                             ) -> tuple[np.ndarray, np.ndarray]:
    """i.i.d. (codes [n, d] float64, factors [n, F'] int64) with F' the factors of size > 1.

    Factors are drawn with ``gt.sample_factors``, observed and encoded in chunks of
    ``encode_batch`` (disentanglement_lib's ``generate_batch_factor_code``), or read from a
    :class:`RepresentationTable` passed as ``representation_fn``.
    """
    used = _used_factors(gt)
    codes, factors = None, np.empty((num_points, used.size), np.int64)
    for start in range(0, num_points, encode_batch):
        rows = min(encode_batch, num_points - start)
        f = _sample_factors(gt, rows, rng)
        c = _codes(gt, representation_fn, f, rng)
        if codes is None:
            codes = np.empty((num_points, c.shape[1]), np.float64)
        codes[start:start + rows] = c
        factors[start:start + rows] = f[:, used]
    return codes, factors


# --------------------------------------------------------------------------------------
# Histogram discretisation and plug-in (discrete) mutual information.


def histogram_discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """int [n, d]: each column binned into ``num_bins`` equal-width bins over its range.

    disentanglement_lib's ``_histogram_discretize``: ``np.digitize(x, edges[:-1])`` with
    ``edges = np.histogram(x, num_bins)[1]``, so the labels are 1..num_bins and the maximum
    falls in the last bin.
    """
    codes = np.asarray(codes, dtype=np.float64)
    out = np.empty(codes.shape, np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], num_bins)
        out[:, j] = np.digitize(codes[:, j], edges[:-1])
    return out


def _labels(x: np.ndarray) -> tuple[np.ndarray, int]:
    values, inverse = np.unique(x, return_inverse=True)
    return inverse.reshape(-1), values.size


def _discrete_mi_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in I(a; b) in nats from the contingency table (= sklearn's mutual_info_score).

    Exactly 0 when either variable takes one value (a constant, padded or collapsed code),
    as scikit-learn returns: the sum below would leave a rounding residue (~1e-16) that
    :func:`modularity` would count as information.
    """
    a, na = _labels(a)
    b, nb = _labels(b)
    if na == 1 or nb == 1:
        return 0.0
    n = a.size
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb).astype(np.float64)
    pa, pb = joint.sum(1), joint.sum(0)
    i, k = np.nonzero(joint)
    nij = joint[i, k]
    mi = np.sum(nij / n * (np.log(nij) + math.log(n) - np.log(pa[i]) - np.log(pb[k])))
    return max(float(mi), 0.0)


def discrete_mutual_info(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """[d, F] plug-in mutual information (nats) between columns of two discrete arrays [n, ·].

    Each entry equals ``sklearn.metrics.mutual_info_score(factors[:, k], codes[:, j])``
    (disentanglement_lib's ``discrete_mutual_info``).
    """
    d, f = discrete_codes.shape[1], factors.shape[1]
    return np.array([[_discrete_mi_1d(discrete_codes[:, j], factors[:, k]) for k in range(f)]
                     for j in range(d)], dtype=np.float64).reshape(d, f)


def discrete_entropy(factors: np.ndarray) -> np.ndarray:
    """[F] plug-in entropy (nats) of each column of a discrete array [n, F]."""
    out = np.empty(factors.shape[1])
    for k in range(factors.shape[1]):
        _, counts = np.unique(factors[:, k], return_counts=True)
        p = counts / counts.sum()
        out[k] = -np.sum(p * np.log(p))
    return out


def mutual_info_matrix(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> np.ndarray:
    """[d, F] I(code_j; factor_k) in nats: codes [n, d] histogram-discretised into ``num_bins``.

    The estimator of disentanglement_lib's MIG and modularity (plug-in MI of the binned
    codes with the discrete factors [n, F]).
    """
    return discrete_mutual_info(histogram_discretize(np.asarray(codes), num_bins), np.asarray(factors))


# --------------------------------------------------------------------------------------
# MIG, disentanglement_lib's histogram variant.


def _top_two_gap(matrix: np.ndarray) -> np.ndarray:
    """[F] best minus second-best entry of each column of [d, F] (second = 0 when d = 1)."""
    s = np.sort(matrix, axis=0)[::-1]
    second = s[1] if s.shape[0] > 1 else np.zeros(s.shape[1])
    return s[0] - second


def mig_from_codes(codes: np.ndarray, factors: np.ndarray, num_bins: int = 20) -> dict[str, float]:
    """disentanglement_lib's discrete MIG of codes [n, d] against factors [n, F].

    MIG = (1/F) Σ_k (I(z_(1); v_k) − I(z_(2); v_k)) / H(v_k), with z_(1), z_(2) the codes of
    largest and second-largest plug-in MI with v_k (:func:`mutual_info_matrix`) and H the
    plug-in entropy of the factor in the same sample.
    """
    m = mutual_info_matrix(codes, factors, num_bins)
    return {"mig": float(np.mean(_top_two_gap(m) / discrete_entropy(factors)))}


def mig(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
        rng: np.random.Generator, *, num_train: int = 10_000, num_bins: int = 20,
        encode_batch: int = 1000) -> dict[str, float]:
    """Mutual Information Gap, disentanglement_lib's variant ("discrete_mig").

    Chen et al. (2018), "Isolating Sources of Disentanglement in VAEs", as estimated by
    disentanglement_lib (``evaluation/metrics/mig.py``): ``num_train`` = 10,000 i.i.d.
    points, the deterministic code of each, every code dimension discretised into
    ``num_bins`` = 20 equal-width histogram bins, discrete MI with the factors
    (``sklearn.metrics.mutual_info_score``), the gap of the top two MIs of each factor
    divided by the factor's entropy, averaged over all factors. For Chen's own sampling
    estimator on Gaussian posteriors see :func:`mig_sampling`.

    Returns:
      {"mig": MIG in [0, 1]}.
    """
    codes, factors = sample_codes_and_factors(ground_truth_data, representation_fn, num_train, rng,
                                              encode_batch)
    return mig_from_codes(codes, factors, num_bins)


# --------------------------------------------------------------------------------------
# MIG, Chen et al.'s sampling estimator over the factor grid.


@jax.jit
def log_mixture_density(z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """[S, d] log q(z_sj) for the equal-weight mixture q(z_j) = (1/N) Σ_n N(z_j; mean_nj, exp(log_var_nj)).

    Each dimension j is its own one-dimensional mixture (factorised posteriors). z [S, d],
    mean and log_var [N, d]. A streaming log-sum-exp over chunks of N bounds the memory by
    an [S, chunk, d] block whatever N.
    """
    s, d = z.shape
    n = mean.shape[0]
    chunk = max(1, min(n, _TABLE_ELEMENTS // max(1, s * d)))
    pad = (-n) % chunk
    # Per component: log-normaliser (−inf for the padding) and half precision.
    const = jnp.pad(-0.5 * (_LOG_2PI + log_var), ((0, pad), (0, 0)), constant_values=-jnp.inf)
    half_prec = jnp.pad(0.5 * jnp.exp(-log_var), ((0, pad), (0, 0)))
    mean = jnp.pad(mean, ((0, pad), (0, 0)))
    blocks = tuple(a.reshape(-1, chunk, d) for a in (mean, half_prec, const))

    def body(acc, block):
        m, hp, c = block
        lp = c[None] - hp[None] * jnp.square(z[:, None] - m[None])  # [S, chunk, d]
        return jnp.logaddexp(acc, jax.nn.logsumexp(lp, axis=1)), None

    acc, _ = jax.lax.scan(body, jnp.full((s, d), -jnp.inf, z.dtype), blocks)
    return acc - math.log(n)


def _mc_entropy(z: np.ndarray, mean: np.ndarray, log_var: np.ndarray, num_samples: int,
                rng: np.random.Generator) -> np.ndarray:
    """[d] −E log q(z_j) with q the mixture of (mean, log_var) [N, d], from z [M, d] drawn from q."""
    pick = rng.choice(z.shape[0], size=min(num_samples, z.shape[0]), replace=False)
    lq = log_mixture_density(jnp.asarray(z[pick], jnp.float32), jnp.asarray(mean, jnp.float32),
                             jnp.asarray(log_var, jnp.float32))
    return -np.asarray(lq, np.float64).mean(0)


def mutual_info_sampling(ground_truth_data: GroundTruthData,
                         posterior_fn: Callable[[Any], tuple[Any, Any]], rng: np.random.Generator, *,
                         factors: Sequence[int] | None = None, num_samples: int = 10_000,
                         samples_per_point: int = 1, grid_stride: int | Sequence[int] = 1,
                         encode_batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Chen et al.'s Monte-Carlo I(z_j; v_k) over the factor grid: ([d, F] nats, [F] log grid size).

    Every point of the factor grid (every ``grid_stride``-th value of each factor) is
    observed once and encoded to a factorised Gaussian q(z|x) = N(mean, exp(log_var))
    by ``posterior_fn(observations) -> (mean [B, d], log_var [B, d])``; with
    q(z) = (1/N) Σ_n q(z|x_n) the exact mixture over the N grid points (and q(z|v_k=i) the
    mixture over the points with v_k = i),

        H(z_j)       ≈ −(1/S) Σ_s log q(z_sj),      z_s ~ q(z)          (S ≤ num_samples),
        H(z_j | v_k) = (1/K_k) Σ_i H(z_j | v_k = i), each by the same estimator,
        I(z_j; v_k)  = H(z_j) − H(z_j | v_k),

    log q by a log-sum-exp over the conditioning set (:func:`log_mixture_density`). This is
    ``estimate_entropies`` of Chen's ``elbo_decomposition.py`` used as in
    ``disentanglement_metrics.py``: ``samples_per_point`` (1 in Chen's code) draws of z per
    grid point, of which ``num_samples`` (10,000 in Chen's code) random ones are used per
    entropy. The only approximation is the Monte-Carlo average over S draws.

    Args:
      factors: factor indices whose column is computed (default: every factor of size > 1);
        the other columns are NaN.
      grid_stride: keep values 0, s, 2s, ... of each factor (one int or one per factor),
        to shrink the grid (N = Π_k ⌈size_k / s_k⌉ encodings); 1 is the full grid.

    Returns:
      mi [d, F] in nats (not clipped) and log K_k [F], the entropy of the uniform factor on
      the grid used.
    """
    sizes = tuple(int(s) for s in ground_truth_data.factor_sizes)
    strides = (grid_stride,) * len(sizes) if isinstance(grid_stride, int) else tuple(grid_stride)
    if len(strides) != len(sizes) or min(strides) < 1:
        raise ValueError(f"grid_stride must be a positive int or one per factor ({len(sizes)}); "
                         f"got {grid_stride}")
    values = [np.arange(0, s, st) for s, st in zip(sizes, strides)]
    grid = tuple(v.size for v in values)
    n = math.prod(grid)
    wanted = [k for k in range(len(sizes)) if grid[k] > 1] if factors is None else list(factors)

    mean = log_var = None
    for start in range(0, n, encode_batch):
        idx = np.unravel_index(np.arange(start, min(n, start + encode_batch)), grid)
        f = np.stack([v[i] for v, i in zip(values, idx)], axis=1)
        m, lv = posterior_fn(ground_truth_data.sample_observations_from_factors(f, rng))
        m = _rows(m, f.shape[0], "posterior_fn (mean)", np.float32)
        lv = _rows(lv, f.shape[0], "posterior_fn (log_var)", np.float32)
        if mean is None:
            mean, log_var = np.empty((n, m.shape[1]), np.float32), np.empty((n, m.shape[1]), np.float32)
        mean[start:start + f.shape[0]], log_var[start:start + f.shape[0]] = m, lv
    d = mean.shape[1]
    eps = rng.standard_normal((n, samples_per_point, d)).astype(np.float32)
    z = mean[:, None] + np.exp(0.5 * log_var)[:, None] * eps  # [N, M, d]

    h_marginal = _mc_entropy(z.reshape(-1, d), mean, log_var, num_samples, rng)
    mi = np.full((d, len(sizes)), np.nan)
    shaped = (mean.reshape(grid + (d,)), log_var.reshape(grid + (d,)),
              z.reshape(grid + (samples_per_point, d)))
    for k in wanted:
        h_cond = np.zeros(d)
        for i in range(grid[k]):
            m_i, lv_i, z_i = (np.take(a, i, axis=k) for a in shaped)
            h_cond += _mc_entropy(z_i.reshape(-1, d), m_i.reshape(-1, d), lv_i.reshape(-1, d),
                                  num_samples, rng) / grid[k]
        mi[:, k] = h_marginal - h_cond
    return mi, np.log(np.asarray(grid, np.float64))


def mig_sampling(ground_truth_data: GroundTruthData, posterior_fn: Callable[[Any], tuple[Any, Any]],
                 rng: np.random.Generator, *, exclude: Sequence[int] = (0,), num_samples: int = 10_000,
                 samples_per_point: int = 1, grid_stride: int | Sequence[int] = 1,
                 encode_batch: int = 1000) -> dict[str, float]:
    """Mutual Information Gap with Chen et al.'s sampling estimator (``metric_helpers/mi_metric.py``).

    Chen et al. (2018): MIG = (1/|K|) Σ_{k∈K} (I_(1) − I_(2)) / log K_k, with I(z_j; v_k)
    from :func:`mutual_info_sampling` over the factor grid (clipped at 0, as Chen's code),
    normalised by the entropy log K_k of the uniform factor, averaged over the factors K
    not in ``exclude`` and of size > 1. Chen leave dSprites' shape out of the average
    (``exclude=(0,)``, shape being factor 0 of disentanglement_lib's dSprites without
    colour); it still varies over the grid (is marginalised). Defaults are Chen's
    (one z per grid point, 10,000 samples per entropy, full grid); use ``grid_stride``,
    ``num_samples`` for a cheaper estimate. Cost ≈ (1 + Σ_k K_k) · S · N/K_k · d Gaussian
    log-densities: minutes for dSprites on a GPU.

    Returns:
      {"mig_sampling": MIG in [0, 1]}.
    """
    sizes = tuple(int(s) for s in ground_truth_data.factor_sizes)
    keep = [k for k in range(len(sizes)) if k not in set(exclude)]
    mi, log_k = mutual_info_sampling(ground_truth_data, posterior_fn, rng, factors=keep,
                                     num_samples=num_samples, samples_per_point=samples_per_point,
                                     grid_stride=grid_stride, encode_batch=encode_batch)
    keep = [k for k in keep if log_k[k] > 0]
    if not keep:
        raise ValueError(f"no factor left to average: factor_sizes={sizes}, exclude={tuple(exclude)}")
    normed = np.clip(mi[:, keep], 0.0, None) / log_k[keep]
    return {"mig_sampling": float(np.mean(_top_two_gap(normed)))}


# --------------------------------------------------------------------------------------
# BetaVAE and FactorVAE scores: votes from batches that share one fixed factor.


def _fixed_factor_batches(gt: GroundTruthData, rng: np.random.Generator, groups: int, batch_size: int,
                          copies: int) -> tuple[np.ndarray, np.ndarray]:
    """(fixed factor index [G], factors [copies, G, batch_size, F]) with that factor shared.

    ``copies=1`` (FactorVAE): one batch whose fixed factor takes the value of its first row;
    ``copies=2`` (BetaVAE): two batches, the second copying the fixed factor of the first
    row by row. The fixed factor is uniform over the factors of size > 1.
    """
    used = _used_factors(gt)
    f_all = len(gt.factor_sizes)
    index = used[rng.integers(used.size, size=groups)]
    f = _sample_factors(gt, copies * groups * batch_size, rng).reshape(copies, groups, batch_size, f_all)
    g = np.arange(groups)
    if copies == 1:
        f[0, g, :, index] = f[0, g, 0, index][:, None]
    else:
        f[1, g, :, index] = f[0, g, :, index]
    return index, f


def _batch_codes(gt: GroundTruthData, representation_fn: RepresentationFn, rng: np.random.Generator,
                 factors: np.ndarray) -> np.ndarray:
    """Codes [..., d] of factors [..., F], observed and encoded in one chunk."""
    flat = factors.reshape(-1, factors.shape[-1])
    codes = _codes(gt, representation_fn, flat, rng)
    return codes.reshape(factors.shape[:-1] + (codes.shape[1],))


def _beta_vae_points(gt, representation_fn, rng, num_points, batch_size, encode_batch):
    """(features [P, d]: mean |z¹ − z²| over a pair of batches, labels [P]: the fixed factor)."""
    groups = max(1, encode_batch // (2 * batch_size))
    features, labels = [], []
    for start in range(0, num_points, groups):
        g = min(groups, num_points - start)
        index, f = _fixed_factor_batches(gt, rng, g, batch_size, copies=2)
        z = _batch_codes(gt, representation_fn, rng, f)  # [2, G, B, d]
        features.append(np.mean(np.abs(z[0] - z[1]), axis=1))
        labels.append(index)
    return np.concatenate(features), np.concatenate(labels)


def beta_vae_score(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
                   rng: np.random.Generator, *, batch_size: int = 64, num_train: int = 10_000,
                   num_eval: int = 5000, encode_batch: int = 1000) -> dict[str, float]:
    """BetaVAE score (Higgins et al. 2017), disentanglement_lib's ``beta_vae_sklearn``.

    Each point: a factor k uniform over the factors; two batches of ``batch_size`` = 64
    factor draws that agree on factor k row by row; the feature is the mean over the batch
    of |z¹ − z²| [d], the label k. A ``sklearn.linear_model.LogisticRegression()``
    (defaults) is fitted on ``num_train`` = 10,000 points and scored on ``num_eval`` = 5,000
    fresh ones. Chance is 1/F.

    Returns:
      {"train_accuracy", "eval_accuracy"}.
    """
    x_train, y_train = _beta_vae_points(ground_truth_data, representation_fn, rng, num_train,
                                        batch_size, encode_batch)
    x_eval, y_eval = _beta_vae_points(ground_truth_data, representation_fn, rng, num_eval,
                                      batch_size, encode_batch)
    model = _sklearn("linear_model").LogisticRegression(random_state=int(rng.integers(2**31)))
    model.fit(x_train, y_train)
    return {"train_accuracy": float(model.score(x_train, y_train)),
            "eval_accuracy": float(model.score(x_eval, y_eval))}


def _factor_vae_votes(gt, representation_fn, rng, num_points, batch_size, encode_batch,
                      scale, active) -> np.ndarray:
    """Votes [F_all, d]: how often fixing factor k left dimension j with the least scaled variance."""
    groups = max(1, encode_batch // batch_size)
    votes = np.zeros((len(gt.factor_sizes), scale.size), np.int64)
    for start in range(0, num_points, groups):
        g = min(groups, num_points - start)
        index, f = _fixed_factor_batches(gt, rng, g, batch_size, copies=1)
        z = _batch_codes(gt, representation_fn, rng, f[0])  # [G, B, d]
        ratio = np.var(z, axis=1, ddof=1) / scale  # local / global variance
        ratio[:, ~active] = np.inf
        np.add.at(votes, (index, np.argmin(ratio, axis=1)), 1)
    return votes


def factor_vae_score(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
                     rng: np.random.Generator, *, batch_size: int = 64, num_train: int = 10_000,
                     num_eval: int = 5000, num_variance_estimate: int = 10_000,
                     prune_threshold: float = 0.05, encode_batch: int = 1000) -> dict[str, float]:
    """FactorVAE score (Kim & Mnih 2018), disentanglement_lib's ``factor_vae_score``.

    Global variances of the codes from ``num_variance_estimate`` = 10,000 points (ddof=1;
    disentanglement_lib's config, Kim & Mnih use a "large enough" subset); dimensions whose
    global standard deviation is below ``prune_threshold`` = 0.05 are collapsed and pruned
    (disentanglement_lib's ``prune_dims``, which thresholds the std, not the variance).
    Each vote: a factor k uniform over the factors, one batch of ``batch_size`` = 64 draws
    sharing the value of factor k, and the active dimension of least variance after
    dividing each code by its global standard deviation votes for k. The classifier maps
    each dimension to its majority factor (argmax of the ``num_train`` = 10,000 training
    votes); accuracies are the fractions of votes it gets right, on those and on
    ``num_eval`` = 5,000 fresh votes. Chance is about 1/F. All dimensions collapsed: every
    output is 0, as in disentanglement_lib.

    Returns:
      {"train_accuracy", "eval_accuracy", "num_active_dims"} (the true count of active
      dimensions; disentanglement_lib reports the length of its mask, i.e. d).
    """
    codes, _ = sample_codes_and_factors(ground_truth_data, representation_fn, num_variance_estimate,
                                        rng, encode_batch)
    variance = np.var(codes, axis=0, ddof=1)
    active = np.sqrt(variance) >= prune_threshold
    if not active.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}
    scale = np.where(active, variance, 1.0)
    train = _factor_vae_votes(ground_truth_data, representation_fn, rng, num_train, batch_size,
                              encode_batch, scale, active)
    classifier = np.argmax(train, axis=0)  # [d] -> factor
    cols = np.arange(train.shape[1])
    evals = _factor_vae_votes(ground_truth_data, representation_fn, rng, num_eval, batch_size,
                              encode_batch, scale, active)
    return {"train_accuracy": float(train[classifier, cols].sum() / train.sum()),
            "eval_accuracy": float(evals[classifier, cols].sum() / evals.sum()),
            "num_active_dims": float(active.sum())}


# --------------------------------------------------------------------------------------
# DCI.

_DCI_MODELS = ("gbt", "random_forest")


def _dci_model(model: str, seed: int):
    if model == "gbt":
        return _sklearn("ensemble").GradientBoostingClassifier(random_state=seed)
    if model == "random_forest":
        return _sklearn("ensemble").RandomForestClassifier(n_estimators=10, max_features=None, max_depth=8,
                                               min_samples_leaf=20, random_state=seed)
    raise ValueError(f"dci model must be one of {_DCI_MODELS}; got {model!r}")


def dci_importance(codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
                   factors_test: np.ndarray, model: str = "gbt", seed: int = 0
                   ) -> tuple[np.ndarray, float, float]:
    """(importance R [d, F], mean train accuracy, mean test accuracy) of per-factor classifiers.

    One classifier per factor on all codes [n, d]; R[:, k] = |feature_importances_| (impurity
    based). ``model="gbt"``: ``GradientBoostingClassifier()`` with sklearn's defaults, as
    disentanglement_lib; ``"random_forest"``: ``RandomForestClassifier(n_estimators=10,
    max_features=None, max_depth=8, min_samples_leaf=20)``, much faster (importance from
    bagged depth-limited trees that see all codes at every split).
    """
    f = factors_train.shape[1]
    importance = np.zeros((codes_train.shape[1], f))
    train_acc, test_acc = np.zeros(f), np.zeros(f)
    for k in range(f):
        clf = _dci_model(model, seed + k).fit(codes_train, factors_train[:, k])
        importance[:, k] = np.abs(clf.feature_importances_)
        train_acc[k] = np.mean(clf.predict(codes_train) == factors_train[:, k])
        test_acc[k] = np.mean(clf.predict(codes_test) == factors_test[:, k])
    return importance, float(train_acc.mean()), float(test_acc.mean())


def _normalized_entropy(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy (base ``base``) of each row of weights [r, c] >= 0, as scipy.stats.entropy(p + 1e-11)."""
    if base <= 1:
        return np.zeros(p.shape[0])
    q = p + 1e-11
    q = q / q.sum(axis=1, keepdims=True)
    return -np.sum(q * np.log(q), axis=1) / math.log(base)


def dci_disentanglement(importance: np.ndarray) -> float:
    """D = Σ_i ρ_i (1 − H_F(P_i·)): P_i· row i of R [d, F] normalised, ρ_i = Σ_k R_ik / Σ R.

    Entropy in base F; R = 0 gives equal weights (and D = 0), as disentanglement_lib.
    """
    per_code = 1.0 - _normalized_entropy(importance, importance.shape[1])
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    return float(np.sum(per_code * weights.sum(axis=1) / weights.sum()))


def dci_completeness(importance: np.ndarray) -> float:
    """C = Σ_k ρ_k (1 − H_d(P_·k)): P_·k column k of R [d, F] normalised, ρ_k = Σ_i R_ik / Σ R."""
    per_factor = 1.0 - _normalized_entropy(importance.T, importance.shape[0])
    weights = importance if importance.sum() > 0 else np.ones_like(importance)
    return float(np.sum(per_factor * weights.sum(axis=0) / weights.sum()))


def dci(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
        rng: np.random.Generator, *, num_train: int = 10_000, num_test: int = 5000,
        model: str = "gbt", encode_batch: int = 1000) -> dict[str, float]:
    """Disentanglement, completeness, informativeness (Eastwood & Williams 2018).

    disentanglement_lib's ``dci``: ``num_train`` = 10,000 and ``num_test`` = 5,000 i.i.d.
    points; per factor a classifier of the factor from all codes gives importances R [d, F]
    (:func:`dci_importance`; ``model="gbt"`` is disentanglement_lib's gradient boosting,
    ``"random_forest"`` the fast option); D and C by :func:`dci_disentanglement` and
    :func:`dci_completeness`. Informativeness is the mean classification **accuracy** over
    factors (on the test points; ``informativeness_train`` on the training points), as
    disentanglement_lib, not Eastwood & Williams' prediction error.

    Returns:
      {"disentanglement", "completeness", "informativeness", "informativeness_train"}.
    """
    x_train, y_train = sample_codes_and_factors(ground_truth_data, representation_fn, num_train, rng,
                                                encode_batch)
    x_test, y_test = sample_codes_and_factors(ground_truth_data, representation_fn, num_test, rng,
                                              encode_batch)
    r, train_acc, test_acc = dci_importance(x_train, y_train, x_test, y_test, model,
                                            int(rng.integers(2**31 - 100)))
    return {"disentanglement": dci_disentanglement(r), "completeness": dci_completeness(r),
            "informativeness": test_acc, "informativeness_train": train_acc}


# --------------------------------------------------------------------------------------
# SAP.


def sap_score_matrix(codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
                     factors_test: np.ndarray, continuous_factors: bool = False) -> np.ndarray:
    """[d, F] predictiveness of each factor from each single code.

    Discrete: test accuracy of ``LinearSVC(C=0.01, class_weight="balanced")`` (one-vs-rest)
    fitted on the one code; continuous: R² = cov(z_j, v_k)² / (var z_j var v_k) on the
    training points (0 for a constant code). As disentanglement_lib's ``compute_score_matrix``.
    """
    d, f = codes_train.shape[1], factors_train.shape[1]
    out = np.zeros((d, f))
    for j in range(d):
        for k in range(f):
            if continuous_factors:
                c = np.cov(codes_train[:, j], factors_train[:, k], ddof=1)
                out[j, k] = c[0, 1] ** 2 / (c[0, 0] * c[1, 1]) if c[0, 0] > 1e-12 else 0.0
            else:
                clf = _sklearn("svm").LinearSVC(C=0.01, class_weight="balanced")
                clf.fit(codes_train[:, j:j + 1], factors_train[:, k])
                out[j, k] = np.mean(clf.predict(codes_test[:, j:j + 1]) == factors_test[:, k])
    return out


def sap(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
        rng: np.random.Generator, *, num_train: int = 10_000, num_test: int = 5000,
        continuous_factors: bool = False, encode_batch: int = 1000) -> dict[str, float]:
    """Separated Attribute Predictability (Kumar et al. 2018), disentanglement_lib's ``sap_score``.

    ``num_train`` = 10,000 / ``num_test`` = 5,000 points; the score matrix of
    :func:`sap_score_matrix` (``continuous_factors=False``: per (code, factor) a linear SVM
    on the single code, its test accuracy); SAP = mean over factors of the gap between the
    two largest entries of the factor's column. With discrete factors the runner-up is at
    least chance accuracy (≈ 1/K_k) and a one-dimensional one-vs-rest linear classifier
    cannot isolate the middle values of an ordinal factor, so even a perfect code scores
    well below 1 (≈ 0.5 for binary factors, ≈ 0.2 for ten values).

    Returns:
      {"sap": SAP score}.
    """
    x_train, y_train = sample_codes_and_factors(ground_truth_data, representation_fn, num_train, rng,
                                                encode_batch)
    x_test, y_test = sample_codes_and_factors(ground_truth_data, representation_fn, num_test, rng,
                                              encode_batch)
    m = sap_score_matrix(x_train, y_train, x_test, y_test, continuous_factors)
    return {"sap": float(np.mean(_top_two_gap(m)))}


# --------------------------------------------------------------------------------------
# Modularity and explicitness.


def modularity(mutual_info: np.ndarray) -> float:
    """Ridgeway & Mozer's modularity of an MI matrix [d, F], averaged over codes.

    Per code i with θ_i = max_k m_ik²: 1 − (Σ_k m_ik² − θ_i) / (θ_i (F − 1)); a code with no
    information scores 0 (disentanglement_lib's ``modularity``). One factor: 1 per informative code.
    """
    sq = np.square(mutual_info)
    top = sq.max(axis=1)
    denom = top * (sq.shape[1] - 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.where(denom > 0, (sq.sum(axis=1) - top) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(np.mean(np.where(top > 0, 1.0 - delta, 0.0)))


def _roc_auc_ovr(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Macro mean over classes of one-vs-rest ROC AUC (classes present and absent in y both needed)."""
    aucs = []
    for c, cls in enumerate(classes):
        positive = y == cls
        if 0 < positive.sum() < y.size:
            aucs.append(_sklearn("metrics").roc_auc_score(positive, proba[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def modularity_explicitness(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
                            rng: np.random.Generator, *, num_train: int = 10_000, num_test: int = 5000,
                            num_bins: int = 20, encode_batch: int = 1000) -> dict[str, float]:
    """Modularity and explicitness (Ridgeway & Mozer 2018), disentanglement_lib's variant.

    ``num_train`` = 10,000 / ``num_test`` = 5,000 points. Modularity: :func:`modularity` of
    the 20-bin histogram MI matrix (:func:`mutual_info_matrix`) of the training points.
    Explicitness: codes standardised with the training mean and std; per factor a
    ``LogisticRegression()`` (defaults, multinomial) on all codes; its one-vs-rest ROC AUC
    averaged over the factor's values (macro), then over factors, on the test points
    (``explicitness_train`` on the training points). Chance is 0.5.

    Returns:
      {"modularity", "explicitness", "explicitness_train"}.
    """
    x_train, y_train = sample_codes_and_factors(ground_truth_data, representation_fn, num_train, rng,
                                                encode_batch)
    x_test, y_test = sample_codes_and_factors(ground_truth_data, representation_fn, num_test, rng,
                                              encode_batch)
    mod = modularity(mutual_info_matrix(x_train, y_train, num_bins))
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    auc_train, auc_test = [], []
    for k in range(y_train.shape[1]):
        clf = _sklearn("linear_model").LogisticRegression().fit(x_train, y_train[:, k])
        auc_train.append(_roc_auc_ovr(y_train[:, k], clf.predict_proba(x_train), clf.classes_))
        auc_test.append(_roc_auc_ovr(y_test[:, k], clf.predict_proba(x_test), clf.classes_))
    return {"modularity": mod, "explicitness": float(np.mean(auc_test)),
            "explicitness_train": float(np.mean(auc_train))}


# --------------------------------------------------------------------------------------
# Unsupervised: Gaussian total correlation of the codes.


def _correlation_cholesky(cov: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of the correlation matrix of cov [d, d], or None if singular."""
    s = np.sqrt(np.diag(cov))
    try:
        return np.linalg.cholesky(cov / np.outer(s, s))
    except np.linalg.LinAlgError:
        return None


def gaussian_total_correlation(cov: np.ndarray) -> float:
    """TC of N(0, Σ) in nats: KL(N(0, Σ) ‖ N(0, diag Σ)) = ½(Σ_j log Σ_jj − log|Σ|).

    Computed as −½ log|R| = −Σ_j log L_jj, L the Cholesky factor of the correlation matrix
    R = D^{-½} Σ D^{-½} (no determinant, scale-free). inf for a singular Σ (positive variances assumed).
    """
    chol = _correlation_cholesky(np.asarray(cov, np.float64))
    return float("inf") if chol is None else float(-np.sum(np.log(np.diag(chol))))


def gaussian_wasserstein_correlation(cov: np.ndarray) -> float:
    """W₂² between N(0, Σ) and N(0, diag Σ): 2 tr Σ − 2 tr (D^{½} Σ D^{½})^{½}, D = diag Σ.

    disentanglement_lib's ``gaussian_wasserstein_correlation`` (its sqrtm(Σ D) is similar to
    the symmetric D^{½} Σ D^{½}, whose square root's trace is Σ √eigenvalues).
    """
    cov = np.asarray(cov, np.float64)
    root_d = np.sqrt(np.diag(cov))
    eig = np.linalg.eigvalsh(root_d[:, None] * cov * root_d[None, :])
    return float(2.0 * np.trace(cov) - 2.0 * np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def gaussian_total_correlation_score(ground_truth_data: GroundTruthData,
                                     representation_fn: RepresentationFn, rng: np.random.Generator, *,
                                     num_train: int = 10_000, num_bins: int = 20,
                                     encode_batch: int = 1000) -> dict[str, float]:
    """Unsupervised scores of the code distribution, disentanglement_lib's ``unsupervised_metrics``.

    A Gaussian is fitted to ``num_train`` = 10,000 codes (sample covariance, ddof=1) and its
    total correlation :func:`gaussian_total_correlation` reported (nats; 0 iff the codes are
    uncorrelated). Constant code dimensions are independent of the rest and contribute 0;
    they are dropped first. Also: the Wasserstein correlation (and divided by tr Σ), and the
    mean off-diagonal plug-in MI between 20-bin discretised code dimensions.

    Returns:
      {"gaussian_total_correlation", "gaussian_wasserstein_correlation",
       "gaussian_wasserstein_correlation_norm", "mutual_info_score"}.
    """
    codes, _ = sample_codes_and_factors(ground_truth_data, representation_fn, num_train, rng,
                                        encode_batch)
    codes = codes[:, np.var(codes, axis=0) > 0]
    d = codes.shape[1]
    if d < 2:
        return {"gaussian_total_correlation": 0.0, "gaussian_wasserstein_correlation": 0.0,
                "gaussian_wasserstein_correlation_norm": 0.0, "mutual_info_score": 0.0}
    cov = np.cov(codes, rowvar=False)
    discrete = histogram_discretize(codes, num_bins)
    mi = discrete_mutual_info(discrete, discrete)
    np.fill_diagonal(mi, 0.0)
    w = gaussian_wasserstein_correlation(cov)
    return {"gaussian_total_correlation": gaussian_total_correlation(cov),
            "gaussian_wasserstein_correlation": w,
            "gaussian_wasserstein_correlation_norm": w / float(np.trace(cov)),
            "mutual_info_score": float(mi.sum() / (d * d - d))}


# --------------------------------------------------------------------------------------
# All at once.

@dataclasses.dataclass(frozen=True)
class Metric:
    """A registered disentanglement metric.

    Attributes:
      name: its name (``config.metric_names``, eval.json's ``disentanglement`` keys).
      fn: ``fn(ground_truth_data, representation, rng, **sizes) -> {output: value}``, reading
        codes with :func:`sample_codes_and_factors` (on demand or from a table, counted for
        the progress line); with ``posterior``, ``fn(ground_truth_data, posterior_fn, rng,
        **sizes)``. Its keyword-only arguments and their defaults are its sample sizes
        (:func:`sample_sizes`).
      encodings: (its keyword arguments, factor_sizes) → the codes it asks for (progress, ETAs,
        :func:`table_pays_off`).
      titles: score key ("<metric>.<output>", or "<metric>" when the two agree) → its title in
        reports and figures, the headline score first.
      posterior: whether it needs the posterior q(z|x) (a posterior_fn), not only the means;
        such metrics run only when asked for, and never from a table.
    """

    name: str
    fn: Callable[..., dict[str, float]]
    encodings: Callable[[Mapping[str, Any], Sequence[int]], int]
    titles: Mapping[str, str] = dataclasses.field(default_factory=dict)
    posterior: bool = False


METRICS: dict[str, Metric] = {}  # in registration order: each metric's rng child follows it


def metric(name: str, *, encodings: Callable[[Mapping[str, Any], Sequence[int]], int],
           titles: Mapping[str, str] | None = None, posterior: bool = False) -> Callable:
    """Decorator: registers ``fn`` as metric ``name`` (see :class:`Metric`); a user module adds
    a metric with it, e.g.::

        @disentanglement.metric("axis_score", encodings=lambda a, _: a["num_train"],
                                titles={"axis_score": "axis score"})
        def axis_score(ground_truth_data, representation, rng, *, num_train=1000):
            codes, factors = sample_codes_and_factors(ground_truth_data, representation, num_train, rng)
            return {"axis_score": value}
    """
    def deco(fn):
        old = METRICS.get(name)
        if old is not None and old.fn is not fn:
            raise ValueError(f"metric {name!r} is registered already")
        METRICS[name] = Metric(name, fn, encodings, dict(titles) if titles is not None else {name: name}, posterior)
        return fn
    return deco


def representation_metrics() -> tuple[str, ...]:
    """The metrics of the posterior means alone (every metric but those needing the posterior)."""
    return tuple(n for n, m in METRICS.items() if not m.posterior)


def score_titles() -> dict[str, str]:
    """{score key: title} of every registered metric: headline scores first, in registry order."""
    heads = [next(iter(m.titles.items())) for m in METRICS.values() if m.titles]
    rest = [kv for m in METRICS.values() for kv in list(m.titles.items())[1:]]
    return dict(heads + rest)


_pairs = lambda a, _: a["num_train"] + a["num_test"]
metric("mig", encodings=lambda a, _: a["num_train"], titles={"mig": "MIG"})(mig)
metric("factor_vae_score", titles={"factor_vae_score.eval_accuracy": "FactorVAE score"},
       encodings=lambda a, _: a["num_variance_estimate"] + a["batch_size"] * (a["num_train"] + a["num_eval"]))(
    factor_vae_score)
metric("beta_vae_score", titles={"beta_vae_score.eval_accuracy": "BetaVAE score"},
       encodings=lambda a, _: 2 * a["batch_size"] * (a["num_train"] + a["num_eval"]))(beta_vae_score)
metric("dci", encodings=_pairs, titles={"dci.disentanglement": "DCI disentanglement",
                                        "dci.completeness": "DCI completeness",
                                        "dci.informativeness": "DCI informativeness"})(dci)
metric("sap", encodings=_pairs, titles={"sap": "SAP"})(sap)
metric("modularity_explicitness", encodings=_pairs,
       titles={"modularity_explicitness.modularity": "modularity",
               "modularity_explicitness.explicitness": "explicitness"})(modularity_explicitness)
metric("gaussian_total_correlation_score", encodings=lambda a, _: a["num_train"],
       titles={})(gaussian_total_correlation_score)
metric("mig_sampling", posterior=True, titles={"mig_sampling": "MIG (sampling)"},
       encodings=lambda a, sizes: math.prod(
           -(-s // st) for s, st in zip(sizes, (a["grid_stride"],) * len(sizes)
                                         if isinstance(a["grid_stride"], int) else a["grid_stride"])))(mig_sampling)


def _metric_fn(name: str) -> Callable[..., dict[str, float]]:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {list(METRICS)}")
    return METRICS[name].fn


def sample_sizes(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments metric ``name`` runs with: its defaults (disentanglement_lib's
    sample sizes) overridden by ``options`` (ValueError on an argument it does not take)."""
    params = inspect.signature(_metric_fn(name)).parameters
    defaults = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{name}: unknown options {unknown}; it takes {sorted(defaults)}")
    return {**defaults, **dict(options or {})}


def encodings_needed(name: str, factor_sizes: Sequence[int], options: Mapping[str, Any] | None = None) -> int:
    """How many codes metric ``name`` asks for (observations to encode on demand)."""
    kwargs = sample_sizes(name, options)
    return int(METRICS[name].encodings(kwargs, tuple(factor_sizes)))


def table_pays_off(ground_truth_data: GroundTruthData, metrics: Sequence[str] | None = None,
                   options: Mapping[str, Mapping[str, Any]] | None = None) -> bool:
    """Whether a :class:`RepresentationTable` is allowed (``deterministic_observations``) and
    encodes fewer images than the metrics of :func:`representation_metrics` (or ``metrics``) ask
    for on demand (metrics of the posterior always encode on demand and are not counted)."""
    if not getattr(ground_truth_data, "deterministic_observations", False):
        return False
    options = options or {}
    names = [m for m in (metrics if metrics is not None else METRICS) if not METRICS[m].posterior]
    demand = sum(encodings_needed(m, ground_truth_data.factor_sizes, options.get(m)) for m in names)
    return demand > math.prod(int(s) for s in ground_truth_data.factor_sizes)


def evaluate_all(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
                 rng: np.random.Generator, *, metrics: Sequence[str] | None = None,
                 posterior_fn: Callable[[Any], tuple[Any, Any]] | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None,
                 progress_every: float | None = None) -> dict[str, dict[str, float]]:
    """{metric name: its dict} for every metric of :data:`METRICS` (or those in ``metrics``).

    The metrics of the posterior (``mig_sampling``) are added when ``posterior_fn`` is given. ``options[name]`` overrides
    that metric's keyword defaults (e.g. ``{"dci": {"model": "random_forest"}}``). Each
    metric gets its own child of ``rng`` (``rng.spawn``, in the fixed order of
    registration in ``METRICS``), so its value does not depend on which others run.
    ``representation_fn`` may be a :class:`RepresentationTable` (same scores, no encoding).
    With ``progress_every`` (seconds), each metric logs a line when it starts (the codes it
    needs) and then at most one per ``progress_every`` seconds: codes done, codes/s and the
    ETA of the metric's codes (after its last code a metric still fits its classifiers:
    seconds for the defaults, except ``dci`` with ``model="gbt"``), and its time when done.
    """
    names = list(METRICS)
    if metrics is None:
        wanted = [n for n in names if posterior_fn is not None or not METRICS[n].posterior]
    else:
        wanted = list(metrics)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {names}")
    options = dict(options or {})
    bad = [n for n in options if n not in names]
    if bad:
        raise ValueError(f"options for unknown metrics {bad}; known: {names}")
    for name in wanted:
        sample_sizes(name, options.get(name))  # unknown arguments fail before any work
    needy = [n for n in wanted if METRICS[n].posterior]
    if needy and posterior_fn is None:
        raise ValueError(f"{', '.join(needy)} needs posterior_fn")
    children = dict(zip(names, rng.spawn(len(names))))
    representation = _as_representation(representation_fn)
    source = "table" if isinstance(representation, RepresentationTable) else "encoded on demand"
    out = {}
    for i, name in enumerate(wanted):
        kwargs = dict(options.get(name, {}))
        total = encodings_needed(name, ground_truth_data.factor_sizes, kwargs)
        bar = progress_lib.Progress(f"[{i + 1}/{len(wanted)}] {name}", total, "codes", progress_every)
        m = METRICS[name]
        if progress_every is not None:
            LOG.info("[%d/%d] %s: %s codes (%s)", i + 1, len(wanted), name, f"{total:,}",
                     "posteriors, on demand" if m.posterior else source)
        if m.posterior:
            out[name] = m.fn(ground_truth_data, posterior_fn, children[name], **kwargs)
            bar.update(total)
        else:
            out[name] = m.fn(ground_truth_data, _Counted(representation, bar), children[name], **kwargs)
        bar.finish()
    return out


def evaluate_representation(ground_truth_data: GroundTruthData, representation_fn: RepresentationFn,
                            rng: np.random.Generator, *, metrics: Sequence[str] | None = None,
                            options: Mapping[str, Mapping[str, Any]] | None = None,
                            table: bool | None = None, table_batch: int = 256,
                            progress_every: float | None = 10.0) -> dict[str, Any]:
    """:func:`evaluate_all` of a deterministic representation, through a table when it pays.

    ``table``: None reads every code from a :func:`representation_table` when
    :func:`table_pays_off` (scores are the same either way), True always (ValueError for a
    random source), False never. Returns a JSON-able dict:

      scores        {"<metric>.<output>": value} (just "<metric>" where the two agree);
      sample_sizes  {metric: its keyword arguments} (:func:`sample_sizes`);
      representation  "table" or "on_demand";
      table_seconds   time to encode the table (0 without one), seconds;
      seconds         the whole evaluation, seconds.
    """
    started = time.perf_counter()
    options = {k: dict(v) for k, v in (options or {}).items()}
    names = list(metrics) if metrics is not None else list(representation_metrics())
    sizes = {name: sample_sizes(name, options.get(name)) for name in names}
    use = table_pays_off(ground_truth_data, names, options) if table is None else table
    rep = representation_fn
    if use:
        rep = representation_table(ground_truth_data, representation_fn, batch_size=table_batch,
                                   progress_every=progress_every)
    table_seconds = time.perf_counter() - started if use else 0.0
    out = evaluate_all(ground_truth_data, rep, rng, metrics=names, options=options,
                       progress_every=progress_every)
    scores = {f"{name}.{k}" if k != name else name: float(v) for name, d in out.items() for k, v in d.items()}
    return {"scores": scores, "sample_sizes": sizes, "representation": "table" if use else "on_demand",
            "table_seconds": table_seconds, "seconds": time.perf_counter() - started}
