"""Orbax checkpoints of the training state: keep the last N and the best by test negative ELBO."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "test_neg_elbo"


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager in ``workdir/checkpoints`` that keeps the ``keep`` latest
    checkpoints and the one with the lowest test negative ELBO."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        best_fn=lambda m: m[BEST_METRIC],  # makes the manager write and rank metrics
        best_mode="min",
        keep_checkpoints_without_metrics=False,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, test_neg_elbo: float | None) -> None:
    metrics = None if test_neg_elbo is None else {BEST_METRIC: float(test_neg_elbo)}
    mgr.save(step, args=ocp.args.StandardSave(state), metrics=metrics)


def restore(mgr: ocp.CheckpointManager, step: int, like: Any) -> Any:
    """Restores the state saved at ``step`` into the structure (and shardings) of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract))
