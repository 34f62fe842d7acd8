"""Disentanglement metrics along training: one row per step in ``disentanglement.jsonl``.

With ``config.metric_every = N`` (> 0) the trainer scores the posterior means of every run
at step 0, every N steps and at the last step (:func:`score`), before that step's
checkpoint is saved, and appends one row per step to the run directory's
``disentanglement.jsonl`` (:data:`FILE`):

    {"step": 1000, "mig": 0.08, "factor_vae_score.eval_accuracy": 0.61, ...,
     "dci.disentanglement": 0.12, ..., "sample_sizes": {"mig": {"num_train": 10000, ...}, ...},
     "representation": "table" | "on_demand", "seconds": 41.2}

Sample sizes are disentanglement_lib's defaults unless ``config.metric_options`` (JSON
``{metric: {argument: value}}``, as ``experiments.evaluate --metric_options``) overrides
them (DCI's importances from a random forest unless ``{"dci": {"model": "gbt"}}``); each
row states the sizes it used. The factor draws come from
``numpy.random.default_rng(config.seed)`` at every step (the same draws along a run, so
differences between steps are the model's, not the sample's), and a resumed run drops
the rows after its restored checkpoint (:func:`truncate`), so no step appears twice.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaekl import disentanglement, rundir

__all__ = ["FILE", "METRIC_FIELDS", "due", "parse_options", "read", "record", "representation_fn",
           "score", "truncate"]

FILE = rundir.DISENTANGLEMENT
METRIC_FIELDS = ("metric_every", "metric_options", "metric_names")  # the config fields read here
_NOT_SCORES = ("step", "sample_sizes", "representation", "seconds", "table_seconds")


def parse_options(text: str) -> dict[str, dict[str, Any]]:
    """``config.metric_options`` (JSON, "" for none) → {metric: {argument: value}}, every
    metric and argument checked (:func:`vaekl.disentanglement.sample_sizes`)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as e:
        raise ValueError(f"config.metric_options={text!r} is not JSON ({e})") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError(f"config.metric_options={text!r} must be a JSON object {{metric: {{argument: value}}}}")
    for name, kwargs in options.items():
        disentanglement.sample_sizes(name, kwargs)  # ValueError naming the metric or argument
    return options


def due(config, step: int) -> bool:
    """Whether the metrics are computed at ``step``: 0, every ``metric_every``, and the last."""
    every = config.metric_every
    return every > 0 and (step % every == 0 or step == config.num_steps)


@functools.lru_cache(maxsize=16)
def _mean_encoder(graphdef):
    return jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x).mean)


def representation_fn(graphdef, params):
    """observations float32 [B, H, W, C] → posterior means [B, d] (NumPy), jitted once per model."""
    encode = _mean_encoder(graphdef)
    return lambda x: np.asarray(encode(params, jnp.asarray(x, jnp.float32)))


def score(ds, graphdef, params, seed: int, options: Mapping | None = None, metrics=None,
          table: bool | None = None, progress_every: float | None = 10.0,
          dci_model: str = "random_forest") -> dict[str, Any]:
    """:func:`vaekl.disentanglement.evaluate_representation` of a model's posterior means on a
    ground-truth dataset, with the factor draws of ``numpy.random.default_rng(seed)``; DCI's
    importances from ``dci_model`` unless ``options["dci"]["model"]`` says otherwise
    (disentanglement_lib's "gbt" is ~15× slower on a CPU than the default random forest)."""
    options = {k: dict(v) for k, v in (options or {}).items()}
    options.setdefault("dci", {}).setdefault("model", dci_model)
    return disentanglement.evaluate_representation(
        ds, representation_fn(graphdef, params), np.random.default_rng(seed), metrics=metrics,
        options=options, table=table, progress_every=progress_every)


def _log(run_dir: str) -> rundir.MetricsLog:
    return rundir.MetricsLog(os.path.join(run_dir, FILE))


def read(run_dir: str) -> list[dict]:
    """The rows of ``run_dir``'s disentanglement.jsonl, in step order ([] without one)."""
    return sorted(_log(run_dir).read(), key=lambda r: r["step"])


def steps(run_dir: str) -> set[int]:
    """The steps that have a row."""
    return {int(r["step"]) for r in _log(run_dir).read()}


def record(run_dir: str, step: int, result: Mapping[str, Any]) -> bool:
    """Appends the row of ``step`` from :func:`score`'s result unless the file has one
    already; returns whether it wrote."""
    if step in steps(run_dir):
        return False
    row = {"step": int(step), **result["scores"], "sample_sizes": result["sample_sizes"],
           "representation": result["representation"], "seconds": round(float(result["seconds"]), 3)}
    _log(run_dir).append([row])
    return True


def truncate(run_dir: str, max_step: int) -> None:
    """Drops the rows after ``max_step`` (a resumed run recomputes them); no file, no-op."""
    if os.path.exists(os.path.join(run_dir, FILE)):
        _log(run_dir).truncate(max_step)


def score_names(rows) -> list[str]:
    """The score columns of some rows, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if k not in _NOT_SCORES))
