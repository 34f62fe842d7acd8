"""Evaluation of a trained VAE: importance-weighted log-likelihood, ELBO, KL analysis.

* Test log-likelihood by the importance-weighted bound of Burda et al. (2016),
  log p(x) ≥ E[log (1/K) Σₛ p(x, zₛ)/q(zₛ|x)], zₛ ~ q(z|x), which tightens to log p(x) as K
  grows. The K samples are taken in chunks with a running (streaming) log-sum-exp, and the
  examples in batches, so memory is bounded whatever K and the test-set size. Sample s of an
  example uses its own key fold_in(key, s), so the estimate does not depend on the chunking.
* The dataset-level KL decomposition ("ELBO surgery", Hoffman & Johnson 2016; β-TCVAE,
  Chen et al. 2018) over the N evaluation examples, with the aggregate posterior
  q(z) = (1/N) Σₙ q(z|xₙ) the exact mixture (no minibatch approximation):
      KL = E_x KL(q(z|x) ‖ p) = MI + marginal KL = MI + TC + dimension-wise KL,
  see :func:`kl_decomposition`.
All amounts are nats per example.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.scipy.linalg import solve_triangular

from vaekl import data, loops, objectives, rundir, runs, train, trajectory
from vaekl import metrics as metrics_lib
from vaekl.models import gaussian
from vaekl.models.gaussian import Gaussian
from vaekl.models.vae import VAE

_LOG_2PI = math.log(2 * math.pi)
_TABLE_ELEMENTS = 1 << 24  # the most entries of a [chunk, N, k] table of one block (64 MB f32)
DECOMPOSITION_TERMS = ("mutual_info", "marginal_kl", "total_correlation", "dimwise_kl")

# eval.json's "definitions": what its similarly named numbers are (the keys are kept for readers).
DEFINITIONS = {
    "mutual_info": "index-code MI I_q(x; z) of the aggregate posterior q(z) = mixture over the N test "
                   "examples, nats, Monte-Carlo (± mutual_info_se); at most log N = log num_test",
    "total_correlation": "total correlation of the aggregate posterior q(z) (the exact mixture), "
                         "KL(q(z) || Π_j q(z_j)), nats, Monte-Carlo (± total_correlation_se); ≥ 0, so a "
                         "negative estimate is noise",
    "dimwise_kl": "Σ_j KL(q(z_j) || p(z_j)) with the exact 1-D marginal mixtures, nats, Monte-Carlo",
    "marginal_kl": "KL(q(z) || p(z)) = total_correlation + dimwise_kl, nats, Monte-Carlo",
    "disentanglement.gaussian_total_correlation_score.gaussian_total_correlation":
        "disentanglement_lib's unsupervised score: the total correlation of a Gaussian fitted to the "
        "posterior means of num_train samples (10,000 by default; their covariance only), not of q(z); "
        "0 iff the means are "
        "uncorrelated",
}


def log_weights(model: VAE, x: jax.Array, keys: jax.Array) -> jax.Array:
    """log p(x, zₛ) − log q(zₛ|x) for zₛ ~ q(z|x), one sample per key: [S, B] for x [B, H, W, C].

    The S samples are decoded as one batch of S·B (vmapped), not in a loop: memory grows with
    S·B (the IWAE chunk), and XLA:CPU's convolutions stay out of a while loop."""
    q = model.encode(x)
    p = model.prior_distribution()

    def one(key):
        z = q.sample(key)
        log_pz = gaussian.standard_normal_log_prob(z) if p is None else p.log_prob(z)
        return model.likelihood.log_prob(x, model.decode(z)) + log_pz - q.log_prob(z)

    return jax.vmap(one)(keys)


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def iwae_log_likelihood(model: VAE, x: jax.Array, key: jax.Array, num_samples: int,
                        chunk: int = 100) -> jax.Array:
    """The K-sample importance-weighted estimate of log p(x), [B], streaming over chunks of K."""
    size = _divisor(num_samples, chunk)
    n_chunks = num_samples // size

    def body(carry, c):
        m, s = carry
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(c * size + jnp.arange(size))
        lw = log_weights(model, x, keys)
        m_new = jnp.maximum(m, lw.max(0))
        s = s * jnp.exp(m - m_new) + jnp.exp(lw - m_new).sum(0)
        return (m_new, s), None

    init = (jnp.full(x.shape[0], -jnp.inf), jnp.zeros(x.shape[0]))
    (m, s), _ = loops.scan(body, init, jnp.arange(n_chunks))
    return m + jnp.log(s) - math.log(num_samples)


def test_log_likelihood(model: VAE, x: jax.Array, key: jax.Array, num_samples: int,
                        chunk: int = 100, batch_size: int = 100) -> jax.Array:
    """[N] IWAE estimates of log p(x) for every example of x [N, H, W, C]."""
    return loops.batched_map(lambda xb, i: iwae_log_likelihood(model, xb, jax.random.fold_in(key, i),
                                                               num_samples, chunk), x, batch_size)


def _block_size(n: int, k: int, chunk: int) -> int:
    """Draws per block: at most ``chunk``, and few enough that a [block, n, k] table fits."""
    return max(1, min(chunk, _TABLE_ELEMENTS // (n * k)))


def _log_normal_1d(z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """Elementwise log N(z; mean, exp(log_var)) in nats (one value per dimension)."""
    return -0.5 * (jnp.square(z - mean) * jnp.exp(-log_var) + log_var + _LOG_2PI)


def _log_prob_table(mean: jax.Array, tril: jax.Array, z: jax.Array) -> jax.Array:
    """[C, M] log N(z_c; mean_m, L_m L_mᵀ) for z [C, k], mean [M, k], tril [M, k, k].

    One triangular solve per component with the C draws as right-hand sides: the largest
    intermediate is [M, k, C], not the [C, M, k, k] of broadcasting the factors.
    """
    k = z.shape[-1]
    diff = jnp.swapaxes(z[None, :, :] - mean[:, None, :], -1, -2)  # [M, k, C]
    w = solve_triangular(tril, diff, lower=True)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.abs(jnp.diagonal(tril, axis1=-2, axis2=-1))), -1)  # [M]
    return (-0.5 * (jnp.sum(jnp.square(w), 1) + log_det[:, None] + k * _LOG_2PI)).T


def _prior_log_probs(p: Gaussian | None, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(z), Σⱼ log p(zⱼ)) for z [C, k], each [C]; the same array for a factorized p."""
    if p is None:
        dims = gaussian.standard_normal_log_prob(z)
        return dims, dims
    if p.is_diagonal:
        dims = jnp.sum(_log_normal_1d(z, p.mean, p.log_var), -1)
        return dims, dims
    joint = _log_prob_table(p.mean.reshape(1, -1), p.scale_tril.reshape(1, *p.scale_tril.shape[-2:]), z)
    return joint[:, 0], jnp.sum(_log_normal_1d(z, p.mean, p.log_variances()), -1)


@functools.partial(jax.jit, static_argnames="chunk")
def decomposition_terms(q: Gaussian, p: Gaussian | None, z: jax.Array,
                        chunk: int = 1024) -> dict[str, jax.Array]:
    """Per-draw terms of the KL decomposition, each [S, N], for given draws z [S, N, k].

    ``z[s, n]`` should be a draw from q(z|xₙ), q the posteriors of the N evaluation examples
    (batch [N], diagonal or full covariance); p is the prior (None = N(0, I), or a Gaussian
    with event shape [k]). With log q(z) = logsumexpₘ log q(z|xₘ) − log N and the exact 1-D
    marginal mixtures log q(zⱼ) = logsumexpₘ log N(zⱼ; μₘⱼ, Σₘ,ⱼⱼ) − log N:
      mutual_info       = log q(z|xₙ) − log q(z),
      marginal_kl       = log q(z) − log p(z),
      total_correlation = log q(z) − Σⱼ log q(zⱼ),
      dimwise_kl        = Σⱼ log q(zⱼ) − Σⱼ log p(zⱼ)   (p's 1-D marginals for a full p).
    The N·S draws are processed in blocks of at most ``chunk`` (fewer when N·k is large), so
    memory is O(chunk · N · k) whatever S; the cost is O(S · N² · k) (O(S · N² · k²) for full q).
    """
    s, n, k = z.shape
    log_n = math.log(n)
    q_log_var = q.log_variances()  # [N, k]: a full Σ's diagonal, Σᵢ Lᵢⱼ²

    def block(zb, _):  # zb [C, k] → log q(z), Σⱼ log q(zⱼ), log p(z), Σⱼ log p(zⱼ), each [C]
        table = _log_normal_1d(zb[:, None, :], q.mean, q_log_var)  # [C, N, k]
        log_q_dims = jnp.sum(jax.nn.logsumexp(table, axis=1) - log_n, -1)
        joint = jnp.sum(table, -1) if q.is_diagonal else _log_prob_table(q.mean, q.scale_tril, zb)
        return (jax.nn.logsumexp(joint, axis=1) - log_n, log_q_dims, *_prior_log_probs(p, zb))

    flat = loops.batched_map(block, z.reshape(s * n, k), _block_size(n, k, chunk))
    log_q, log_q_dims, log_p, log_p_dims = (a.reshape(s, n) for a in flat)
    log_q_own = jax.lax.map(q.log_prob, z)  # [S, N]; a full q's factors are not broadcast over S
    return {"mutual_info": log_q_own - log_q, "marginal_kl": log_q - log_p,
            "total_correlation": log_q - log_q_dims, "dimwise_kl": log_q_dims - log_p_dims}


def _mean_and_se(per_draw: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean of [S, N] values and its Monte-Carlo standard error for the fixed N examples.

    Draws are independent across examples and draws, but each example has its own
    distribution, so se² = Σₙ Varₛ(·ₙ) / (S N²) with the within-example variance (ddof 1):
    it does not count the spread between the examples' expected values. NaN for S = 1.
    """
    s, n = per_draw.shape
    var = jnp.var(per_draw, axis=0, ddof=1) if s > 1 else jnp.full(n, jnp.nan)
    return per_draw.mean(), jnp.sqrt(jnp.sum(var) / s) / n


@jax.jit
def _summarize(q: Gaussian, p: Gaussian | None, terms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means and standard errors of the per-draw terms [S, N], with the closed-form KL."""
    kl_n = gaussian.kl(q, p)  # [N], closed form
    terms = dict(terms)
    terms["identity_gap"] = kl_n - (terms["mutual_info"] + terms["total_correlation"]
                                    + terms["dimwise_kl"])
    out = {"kl": kl_n.mean(), "kl_se": jnp.zeros((), kl_n.dtype)}
    for name in (*DECOMPOSITION_TERMS, "identity_gap"):
        out[name], out[name + "_se"] = _mean_and_se(terms[name])
    out["index_code_mi"], out["index_code_mi_se"] = out["mutual_info"], out["mutual_info_se"]
    return out


def kl_decomposition_from_draws(q: Gaussian, p: Gaussian | None, z: jax.Array,
                                chunk: int = 1024) -> dict[str, jax.Array]:
    """:func:`kl_decomposition` for given draws z [S, N, k], z[s, n] ~ q(z|xₙ)."""
    return _summarize(q, p, decomposition_terms(q, p, z, chunk))


def kl_decomposition(q: Gaussian, p: Gaussian | None, key: jax.Array, num_draws: int = 10,
                     chunk: int = 1024) -> dict:
    """The dataset-level decomposition of the average KL over N examples, nats per example.

    q: the posteriors q(z|xₙ) of the evaluation set, batch [N] (diagonal or full covariance);
    p: the prior, None for N(0, I), or a learned diagonal or full Gaussian. The aggregate
    posterior q(z) = (1/N) Σₙ q(z|xₙ) is the exact mixture over the N examples, and so are
    its 1-D marginals q(zⱼ) (a full Σ enters them through its diagonal). S = ``num_draws``
    draws z ~ q(z|xₙ) per example, draw s from q.sample(fold_in(key, s)) (per-dimension
    noise streams). Returns, each with ``<name>_se``:

      kl                 E_x KL(q(z|x) ‖ p), closed form (exact; se 0);
      mutual_info        E[log q(z|x) − log q(z)], the index-code MI, ≤ log N (also as
                         ``index_code_mi``);
      marginal_kl        E_q(z)[log q(z) − log p(z)], estimated directly (not as KL − MI);
      total_correlation  E_q(z)[log q(z) − Σⱼ log q(zⱼ)];
      dimwise_kl         E_q(z)[Σⱼ log q(zⱼ) − log p(zⱼ)];
      identity_gap       kl − (mutual_info + total_correlation + dimwise_kl);
    and ``num_draws``. Each estimate is the mean over the N·S draws, unbiased for this
    evaluation set (the mixture is exact, not itself estimated). For a factorized p (N(0, I)
    or diagonal), marginal_kl = total_correlation + dimwise_kl draw by draw and the identity
    gap is 0 in expectation. For a full-covariance p, p(zⱼ) are p's 1-D marginals, so
    dimwise_kl compares marginals only and TC + dimwise_kl ≠ marginal_kl (the difference is
    E[Σⱼ log p(zⱼ) − log p(z)]), nor is the identity gap 0.

    Standard errors: the per-draw values are independent across the N·S draws given the
    fixed evaluation set, so se is the Monte-Carlo error of the estimator for this set,
    sqrt(Σₙ Varₛ / S) / N from the within-example variances (NaN when S = 1). It is not the
    sampling error over the data distribution: the spread between examples is not in it.
    """
    return dict(_kl_decomposition(q, p, key, num_draws, chunk), num_draws=num_draws)


@functools.partial(jax.jit, static_argnames=("num_draws", "chunk"))
def _kl_decomposition(q: Gaussian, p: Gaussian | None, key: jax.Array, num_draws: int,
                      chunk: int) -> dict[str, jax.Array]:
    """The compiled body of :func:`kl_decomposition` (draw s from fold_in(key, s))."""
    z = jax.vmap(lambda s: q.sample(jax.random.fold_in(key, s)))(jnp.arange(num_draws))
    return kl_decomposition_from_draws(q, p, z, chunk)


def mutual_information(model: VAE, x: jax.Array, key: jax.Array, num_draws: int = 10,
                       chunk: int = 1024) -> jax.Array:
    """I_q(x; z) over the examples x [N, ...]: :func:`kl_decomposition`'s ``mutual_info``."""
    return kl_decomposition(model.encode(x), model.prior_distribution(), key, num_draws, chunk)["mutual_info"]


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """A run's config.json over today's defaults (:func:`vaekl.rundir.read_config`)."""
    return rundir.read_config(workdir)


def disentanglement_scores(ds: data.Dataset, graphdef, params, seed: int = 0,
                           dci_model: str = "random_forest", metrics=None,
                           options: dict | None = None, table: bool | None = None,
                           progress_every: float | None = 10.0) -> dict:
    """Every metric of :mod:`vaekl.disentanglement` for the posterior means of a trained model on
    a ground-truth dataset (:func:`vaekl.trajectory.score`): ``{"scores": {"<metric>.<output>":
    value}, "sample_sizes", "representation", "table_seconds", "seconds"}``; disentanglement_lib's
    defaults except ``dci_model`` ('gbt' is disentanglement_lib's, ~15× slower on this CPU) and
    what ``options`` ({metric: {argument: value}}, e.g. smaller sample sizes) overrides. On plain
    dSprites at the default sizes the codes come from a table of the whole grid (``table``:
    None when it pays off, True, False), with the same scores as encoding on demand."""
    return trajectory.score(ds, graphdef, params, seed, options, metrics, table, progress_every, dci_model)


def evaluate_run(workdir: str, num_samples: int = 5000, chunk: int = 100, batch_size: int = 100,
                 which: str = "best", seed: int = 0, num_draws: int = 10, disentanglement: bool = True,
                 dci_model: str = "random_forest", metric_options: dict | None = None,
                 representation_table: bool | None = None, nll_examples: int = 0) -> dict:
    """Evaluates a run's best (or latest) checkpoint on its test split; writes eval.json.

    The test images are those of training's evaluations (:func:`vaekl.train.prepare`): a
    binarized run's test set is one fixed binarization, the same for every run and seed, so
    every number in the file refers to the same binary test set. ``nll_se`` is the standard deviation over
    the test examples of their log-likelihood estimates / sqrt(N). The KL decomposition
    (:func:`kl_decomposition`, ``num_draws`` ≥ 2 draws per example) has Monte-Carlo standard
    errors ``<name>_se`` for this test set. The batch metrics of training (every declared
    metric, :mod:`vaekl.metrics`) are recomputed on the test set too. ``definitions`` says in
    words what the similarly named numbers are (:data:`DEFINITIONS`: the TC of the aggregate
    posterior vs the Gaussian TC of the means). On a dataset with
    ground-truth factors (dSprites) eval.json gains a ``disentanglement`` object
    (:func:`disentanglement_scores`, with ``disentanglement=True``), with the sample sizes used,
    whether the codes came from a table of the grid (``representation_table``: None when it
    pays off) and its times. ``eval_seconds``: the
    wall time of this evaluation, compilation included. ``nll_examples`` > 0: the NLL (only it)
    on the first that many test examples (``nll_num_test`` in the file), e.g. K = 5000 on a
    subset when the whole test set would take too long; 0: all of them.
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be at least 2 (for the standard errors), got {num_draws}")
    if nll_examples < 0:
        raise ValueError(f"nll_examples must be >= 0 (0: every test example), got {nll_examples}")
    started = time.perf_counter()
    config = load_config(workdir)
    ds = data.for_config(config)
    ds, eval_images = train.prepare(config, ds)
    key = jax.random.key(seed)
    test = jnp.asarray(eval_images["test"])
    trained = runs.Run(workdir).restore(which)
    graphdef, state, step = trained.graphdef, trained.state, trained.step
    cfg = train.eval_config(config, train.dataset_size(ds), batch_size)
    stats = jax.jit(lambda s, x: train.evaluate(s, x, train.hyperparameters(config), jnp.int32(step),
                                                jax.random.fold_in(key, 2), None, graphdef=graphdef,
                                                cfg=cfg))(state, test)
    x = data.to_float(test)

    @jax.jit
    def nll_and_decomposition(params, x):
        model = nnx.merge(graphdef, params)
        x_nll = x[:nll_examples] if nll_examples else x
        ll = test_log_likelihood(model, x_nll, jax.random.fold_in(key, 3), num_samples, chunk, batch_size)
        p = model.prior_distribution()
        if gaussian.is_mixture(p):  # mog, vamp: no closed form and no marginals here
            names = ("index_code_mi", *DECOMPOSITION_TERMS, "identity_gap")
            dec = {n + se: jnp.float32(jnp.nan) for n in names for se in ("", "_se")}
        else:
            dec = kl_decomposition(model.encode(x), p, jax.random.fold_in(key, 4), num_draws)
        return -ll.mean(), ll.std(ddof=1) / math.sqrt(x_nll.shape[0]), dec

    nll, nll_se, dec = jax.device_get(nll_and_decomposition(state.params, x))
    evaluated = metrics_lib.row(step, "test", jax.device_get(stats))  # every declared metric
    result = {k: v for k, v in evaluated.items() if k != "split"}
    result.update({
        "nll": float(nll), "nll_se": float(nll_se), "num_samples": num_samples,
        "nll_num_test": int(min(nll_examples, test.shape[0]) if nll_examples else test.shape[0]),
        **{name + se: float(dec[name + se]) for name in ("index_code_mi", *DECOMPOSITION_TERMS)
           for se in ("", "_se")},
        "kl_identity_gap": float(dec["identity_gap"]), "kl_identity_gap_se": float(dec["identity_gap_se"]),
        "kl_decomposition_draws": num_draws,
        "checkpoint": which, "num_test": int(test.shape[0]),
        "definitions": {k: v for k, v in DEFINITIONS.items() if not k.startswith("disentanglement.")},
    })
    if disentanglement and hasattr(ds, "factor_sizes"):
        dis = disentanglement_scores(ds, graphdef, state.params, seed, dci_model, options=metric_options,
                                     table=representation_table)
        result["disentanglement"] = dis["scores"]
        result["disentanglement_options"] = metric_options or {}
        result["disentanglement_sample_sizes"] = dis["sample_sizes"]
        result["disentanglement_representation"] = dis["representation"]
        result["disentanglement_seconds"] = dis["seconds"]
        result["representation_table_seconds"] = dis["table_seconds"]
        result["definitions"] = dict(DEFINITIONS)
    result["eval_seconds"] = time.perf_counter() - started  # this run's evaluation, wall time
    rundir.atomic_write(os.path.join(workdir, rundir.EVAL), json.dumps(result, indent=2))
    return result
