"""The variance of the ELBO's gradient under each KL estimator, measured at a run's checkpoints.

For a checkpoint and a fixed batch of B test images, S draws of the one-sample ELBO gradient
(the objective with regularizer 'kl', β = 1, and ``kl_estimator`` = analytic, mc or stl; draw
s uses fold_in(key, s) for every estimator, so the decoder sees the same z under each) give

  variance       tr Cov[∇] = E‖∇ − E∇‖², the total over a parameter group's coordinates
                 (``total``; ``encoder`` = encoder torso and posterior head; ``decoder`` =
                 decoder and likelihood; ``prior`` when it is learned), per-example nats² per
                 parameter², the unbiased (S − 1) estimate;
  kl_variance    the variance over the draws of the batch-mean KL the penalty used (0 for the
                 closed form);
each with a standard error (``*_se``) from the spread of the per-draw squared deviations,
sd(dₛ)·√S/(S − 1) with dₛ = ‖∇ₛ − ∇̄‖² (first order; the dependence through ∇̄ is O(1/S)).
Over the checkpoints of a run this gives the curves of Roeder et al. (2017, Fig. 3): each
estimator's variance and its ratio to the analytic one against the training step.

The gradients of a chunk of draws are vmapped; two passes over the same keys (the mean, then
the deviations) keep memory at chunk × parameters whatever S.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaekl import checkpoints, data, kl_estimators, objectives, rundir, runs, train
from vaekl import config as config_lib
from vaekl.models.priors import MIXTURES

GROUPS: dict[str, tuple[str, ...]] = {"encoder": ("encoder", "head"),
                                      "decoder": ("decoder", "likelihood"), "prior": ("prior",)}


def group_of(top: str) -> str:
    """The parameter group of a top-level module name of the VAE."""
    for group, modules in GROUPS.items():
        if top in modules:
            return group
    raise ValueError(f"parameter module {top!r} is in no group of {GROUPS}")


def flatten_groups(grads: dict) -> dict[str, jax.Array]:
    """{group: [P_group]} from one draw's pure-dict gradient; 'total' concatenates the groups."""
    parts: dict[str, list] = {}
    for top, sub in grads.items():
        parts.setdefault(group_of(top), []).extend(l.reshape(-1) for l in jax.tree.leaves(sub))
    out = {g: jnp.concatenate(v) for g, v in parts.items() if v}
    out["total"] = jnp.concatenate([out[g] for g in GROUPS if g in out])
    return out


def variance_with_se(sq_dev: np.ndarray) -> tuple[float, float]:
    """(unbiased variance, its standard error) from S per-draw squared deviations dₛ (about the
    sample mean): Σdₛ/(S − 1) and sd(dₛ)·√S/(S − 1)."""
    d = np.asarray(sq_dev, np.float64)
    s = d.shape[0]
    if s < 2:
        raise ValueError(f"the variance needs at least 2 draws, got {s}")
    return float(d.sum() / (s - 1)), float(d.std(ddof=1) * math.sqrt(s) / (s - 1))


def elbo_static(estimator: str, num_steps: int = 1, dataset_size: int = 1) -> objectives.Static:
    """The plain ELBO (regularizer 'kl', β = 1, constant) with ``estimator`` for its KL."""
    c = config_lib.defaults()
    c.kl_estimator, c.num_steps = estimator, num_steps
    return objectives.Static.from_config(c, dataset_size)


def _elbo_hp() -> dict[str, jax.Array]:
    return objectives.hyperparameters(config_lib.defaults())


def measure(graphdef, params, x: jax.Array, key: jax.Array, num_draws: int,
            estimators: Sequence[str] = kl_estimators.ESTIMATORS, chunk: int = 16) -> dict:
    """Per estimator: {group: {variance, variance_se}} for the ELBO gradient over ``num_draws``
    draws on the batch x [B, H, W, C], and kl_mean, kl_variance, kl_variance_se of the KL the
    penalty used. Also ``ratio``: {estimator: {group: variance / analytic's}} when 'analytic'
    is among the estimators."""
    hp = _elbo_hp()
    size = max(d for d in range(1, min(num_draws, chunk) + 1) if num_draws % d == 0)

    def per_draw(static):
        def one(params, k):
            def loss(p):
                loss, (m, _) = objectives.objective(nnx.merge(graphdef, p), x, k, jnp.int32(0), hp, static)
                return loss, m.get("kl_estimate", m["kl"])
            g, kl = jax.grad(loss, has_aux=True)(params)
            return flatten_groups(g), kl
        return jax.jit(jax.vmap(one, in_axes=(None, 0)))

    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(num_draws))
    blocks = [keys[i:i + size] for i in range(0, num_draws, size)]
    out: dict = {}
    for est in estimators:
        fn = per_draw(elbo_static(est, dataset_size=int(x.shape[0])))
        total, kls = None, []
        for b in blocks:  # pass 1: the mean gradient
            g, kl = fn(params, b)
            s = {k: v.sum(0) for k, v in g.items()}
            total = s if total is None else {k: total[k] + s[k] for k in s}
            kls.append(np.asarray(kl, np.float64))
        mean = {k: v / num_draws for k, v in total.items()}
        sq = {k: [] for k in mean}
        for b in blocks:  # pass 2: each draw's squared deviation, per group
            g, _ = fn(params, b)
            for k in mean:
                sq[k].append(np.asarray(jnp.sum(jnp.square(g[k] - mean[k]), -1), np.float64))
        res = {}
        for k in mean:
            v, se = variance_with_se(np.concatenate(sq[k]))
            res[k] = {"variance": v, "variance_se": se, "mean_norm": float(jnp.linalg.norm(mean[k]))}
        kl = np.concatenate(kls)
        res["kl_mean"] = float(kl.mean())
        res["kl_variance"], res["kl_variance_se"] = variance_with_se(np.square(kl - kl.mean()))
        out[est] = res
    if "analytic" in out:
        out["ratio"] = {e: {g: out[e][g]["variance"] / out["analytic"][g]["variance"]
                            for g in out[e] if isinstance(out[e][g], dict)}
                        for e in estimators if e != "analytic"}
    return out


def test_batch(run_dir: str, batch_size: int) -> np.ndarray:
    """The first ``batch_size`` images of the run's test split as training evaluates them (one
    fixed binarization), float [B, H, W, C] in [0, 1]."""
    config = rundir.read_config(run_dir)
    ds = data.for_config(config)
    _, eval_images = train.prepare(config, ds)
    return np.asarray(data.to_float(jnp.asarray(eval_images["test"][:batch_size])))


def checkpoint_steps(run_dir: str) -> list[int]:
    """Every kept checkpoint's step, ascending."""
    config = rundir.read_config(run_dir)
    mgr = checkpoints.manager(run_dir, config.keep_checkpoints, read_only=True)
    try:
        return sorted(int(s) for s in mgr.all_steps())
    finally:
        mgr.close()


def analyze_run(run_dir: str, steps: Sequence[int] | None = None, num_draws: int = 100,
                batch_size: int = 100, seed: int = 0,
                estimators: Sequence[str] = kl_estimators.ESTIMATORS, chunk: int = 16) -> dict:
    """:func:`measure` at each of ``steps`` (default: every kept checkpoint) of a run, on the
    same test batch and keys: {run_dir, num_draws, batch_size, seed, estimators, checkpoints:
    [{step, <estimator>: …, ratio: …}], seconds (wall time)}. A mixture prior (mog, vamp) has no analytic
    estimator: only mc and stl are measured, without ratios."""
    if rundir.read_config(run_dir).prior in MIXTURES:  # no closed form to compare with
        estimators = [e for e in estimators if e != "analytic"]
    if num_draws < 2:
        raise ValueError(f"num_draws={num_draws} must be at least 2 (for the variance)")
    for e in estimators:
        kl_estimators.check(e)
    steps = checkpoint_steps(run_dir) if steps is None else list(steps)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    started = time.perf_counter()
    x = jnp.asarray(test_batch(run_dir, batch_size))
    key = jax.random.key(seed)
    rows = []
    for step in steps:
        run = runs.load(run_dir, int(step))
        rows.append({"step": run.step, **measure(run.graphdef, run.params, x, key, num_draws,
                                                 estimators, chunk)})
    return {"run_dir": os.path.abspath(run_dir), "num_draws": num_draws, "batch_size": int(x.shape[0]),
            "seed": seed, "estimators": list(estimators), "checkpoints": rows,
            "seconds": time.perf_counter() - started}


def figure(result: dict):
    """Per group (total, encoder, decoder): each estimator's gradient variance against the
    step (log scale, ±2 se), and the ratio to the analytic estimator's."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    rows = result["checkpoints"]
    steps = [r["step"] for r in rows]
    groups = [g for g in ("total", "encoder", "decoder") if g in rows[0][result["estimators"][0]]]
    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 6), squeeze=False)
    for j, g in enumerate(groups):
        ax = axes[0, j]
        for e in result["estimators"]:
            v = np.array([r[e][g]["variance"] for r in rows])
            se = np.array([r[e][g]["variance_se"] for r in rows])
            ax.errorbar(steps, v, yerr=2 * se, marker="o", capsize=2, label=e)
        ax.set_yscale("log")
        ax.set_title(f"{g}: tr Cov[∇ ELBO]")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax = axes[1, j]
        for e in result["estimators"]:
            if e != "analytic" and "ratio" in rows[0]:
                ax.plot(steps, [r["ratio"][e][g] for r in rows], marker="o", label=f"{e} / analytic")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{g}: variance ratio")
        ax.legend(fontsize=8)
    fig.suptitle(f"ELBO gradient variance, S = {result['num_draws']} draws, B = {result['batch_size']}")
    fig.tight_layout()
    return fig


def write(result: dict, json_path: str, png_path: str) -> None:
    """The result as JSON and its :func:`figure` as PNG (directories created)."""
    for p in (json_path, png_path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    rundir.atomic_write(json_path, json.dumps(result, indent=2))
    fig = figure(result)
    fig.savefig(png_path, dpi=100)
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    plt.close(fig)
