"""Runs as objects: a run directory behind one class (:class:`Run`), a tree of runs listed
(:func:`find`), and a trained model restored from a checkpoint (:meth:`Run.restore`).

    run = runs.Run("runs/x")
    run.config, run.meta, run.metrics(), run.eval, run.along_training(), run.latest_checkpoint
    trained = run.restore()               # best checkpoint; "latest" or an int
    trained.model.reconstruct(x); trained.metrics[trained.metrics.split == "test"]
    for run in runs.find("runs/sweep"): ...

The files themselves (names, atomic writes, metrics.jsonl, locks) are :mod:`vaekl.rundir`'s;
this module sits above the trainer, since restoring needs the model it builds. Everything
except :meth:`Run.restore` and :meth:`Run.image_shape` of runs older than meta.json reads a
run without its training set.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
from typing import Any

from flax import nnx
import ml_collections

from vaekl import checkpoints, data, rundir, train, trajectory

__all__ = ["Run", "Trained", "find", "json_object", "load"]

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines


def json_object(path: str) -> dict:
    """The JSON object in ``path``; {} if the file is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclasses.dataclass(frozen=True)
class Trained:
    """A run restored from one of its checkpoints (:meth:`Run.restore`)."""

    config: Any     # ml_collections.ConfigDict: config.json over today's defaults
    model: Any      # the nnx VAE with the checkpoint's parameters
    metrics: Any    # pandas DataFrame of metrics.jsonl (one row per logged step and split)
    step: int       # the restored checkpoint's step
    params: Any     # the checkpoint's parameters (a pure dict; nnx.merge(graphdef, params) = model)
    graphdef: Any   # the model's static nnx graph
    run_dir: str = ""
    meta: dict = dataclasses.field(default_factory=dict)
    state: Any = None  # the whole train.TrainState (parameters, optimizer, aux)


class Run:
    """One run directory (the layout of :mod:`vaekl.rundir`), read on demand.

    Attributes:
      path: the directory; name: its base name (the sweep's run name).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.name = os.path.basename(os.path.normpath(self.path))

    def __repr__(self) -> str:
        return f"Run({self.path!r})"

    def file(self, name: str) -> str:
        """The path of one of the run's files (a :mod:`vaekl.rundir` name such as ``rundir.EVAL``)."""
        return os.path.join(self.path, name)

    def exists(self) -> bool:
        """Whether the directory is a run (holds config.json)."""
        return os.path.exists(self.file(rundir.CONFIG))

    @property
    def config(self) -> ml_collections.ConfigDict:
        """config.json over today's defaults, the run's user modules imported first
        (:func:`vaekl.rundir.read_config`); raises if the file is missing or unreadable."""
        return rundir.read_config(self.path)

    @property
    def config_json(self) -> dict:
        """config.json as saved (JSON types); {} if missing or unreadable (analysis reads
        damaged sweeps without stopping)."""
        return json_object(self.file(rundir.CONFIG))

    @property
    def meta(self) -> dict:
        """meta.json ({} if none)."""
        return rundir.read_meta(self.path)

    @property
    def eval(self) -> dict:
        """eval.json, experiments.evaluate's results ({} if none or unreadable)."""
        return json_object(self.file(rundir.EVAL))

    def metrics(self) -> list[dict]:
        """metrics.jsonl's rows, one per logged step and split ([] if none;
        :func:`vaekl.rundir.read_metrics`)."""
        return rundir.read_metrics(self.path)

    def along_training(self) -> list[dict]:
        """disentanglement.jsonl's rows in step order (metrics along training; [] if none)."""
        return trajectory.read(self.path)

    @property
    def latest_checkpoint(self) -> int | None:
        """The newest committed checkpoint's step (None without one)."""
        return rundir.latest_checkpoint(self.path)

    def status(self, config: ml_collections.ConfigDict | None = None) -> str:
        """'done', 'partial' or 'new' against ``config`` (default: the run's own)."""
        return rundir.status(self.path, config if config is not None else self.config)

    def image_shape(self, config: ml_collections.ConfigDict | None = None) -> tuple[int, int, int]:
        """(H, W, C) from meta.json; for runs older than it, from loading the dataset."""
        shape = self.meta.get("image_shape")
        if shape:
            return tuple(int(s) for s in shape)
        config = config or self.config
        LOG.info("%s has no %s: loading %s for the image shape", self.path, rundir.META, config.dataset)
        return tuple(data.for_config(config).image_shape)

    def restore(self, step: str | int = "best") -> Trained:
        """The run's config, model (with restored parameters) and metrics.

        Args:
          step: "best" (lowest validation negative ELBO among the kept checkpoints; the latest
            if none is ranked), "latest", or a step number. A damaged best or latest
            checkpoint falls back to the newest good one with a warning; a damaged numbered
            one raises.
        Raises:
          FileNotFoundError: not a run directory, or no (good) checkpoint.
          ValueError: no checkpoint at that step number.
        """
        import pandas as pd  # pylint: disable=g-import-not-at-top  (optional heavy library)

        config = self.config
        build = config.copy_and_resolve_references()
        build.output_bias_from_data = False  # the checkpoint holds the bias; no training set needed
        graphdef, like, _ = train.create(build, self.image_shape(config), None)
        if not os.path.isdir(self.file(rundir.CHECKPOINTS)):
            raise FileNotFoundError(f"no checkpoint in {self.file(rundir.CHECKPOINTS)}")
        mgr = checkpoints.manager(self.path, config.keep_checkpoints, read_only=True)
        try:
            found, state = checkpoints.restore_step(mgr, step, like)
        finally:
            mgr.close()
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {self.file(rundir.CHECKPOINTS)}")
        return Trained(config=config, model=nnx.merge(graphdef, state.params),
                       metrics=pd.DataFrame(self.metrics()), step=found, params=state.params,
                       graphdef=graphdef, run_dir=self.path, meta=self.meta, state=state)


def find(path: str, need_metrics: bool = False) -> list[Run]:
    """``[Run(path)]`` if ``path`` is a run directory (holds config.json), else the runs in its
    subdirectories, sorted by name (with ``need_metrics``, only those with a metrics.jsonl).

    Raises:
      FileNotFoundError: ``path`` does not exist; NotADirectoryError: it is a file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory")
    if Run(path).exists():
        return [Run(path)]
    found = [Run(os.path.join(path, d)) for d in sorted(os.listdir(path))]
    return [r for r in found if r.exists() and (not need_metrics or os.path.exists(r.file(rundir.METRICS)))]


def load(run_dir: str, step: str | int = "best") -> Trained:
    """``Run(run_dir).restore(step)``."""
    return Run(run_dir).restore(step)
