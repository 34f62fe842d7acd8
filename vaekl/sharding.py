"""Placing a vmapped group of runs on devices: the run axis sharded over a mesh, the batch too.

A group's program runs on a 2-D mesh of ``R × Dd`` devices with axes ``runs`` and ``data``:

* the stacked per-run values (TrainState, hyperparameters ``hp``, keys, latent masks) are
  sharded along the run axis over ``runs`` (``NamedSharding(mesh, P("runs"))``) and
  replicated over ``data``;
* the training data and the evaluation images are replicated, one copy per device;
* with ``Dd > 1`` each training batch is sharded over ``data`` (data parallelism: the
  gradients' sums over the batch become cross-device reductions).

The run axis is padded to a multiple of ``R``: row ``r`` of the padded axis holds the run
``fill[r]``; a padding row is a copy of a real run on the same process, computed but never
read back, so it writes nothing. A run's row lies on one "runs" slice of the mesh, whose
devices belong to one process (the data axis never crosses processes): that process, and only
it, writes the run's directory. The results are those of the unsharded program up to float32
reduction order (the random bits do not depend on the sharding: ``jax_threefry_partitionable``).

Several processes (``jax.distributed``, e.g. the tasks of one Slurm job step) share one
placement over all their devices; each passes only its own runs' values
(:meth:`Placement.put_runs`) and gets only its own runs' results back (:meth:`Placement.to_host`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RUNS, DATA = "runs", "data"


def layout(num_runs: int, num_devices: int, per_process: int | None = None, batch_size: int | None = None,
           data_parallel: bool | None = None) -> tuple[int, int]:
    """(R, Dd): the sizes of the mesh's ``runs`` and ``data`` axes, R · Dd = ``num_devices``.

    Dd divides the devices of one process (``per_process``) and ``batch_size``.
    ``data_parallel``: False, runs only (Dd = 1); True, the largest such Dd; None (auto),
    runs only when there are at least as many runs as devices, else the smallest Dd that
    leaves no more runs slices than runs (2 runs on 4 devices: R = Dd = 2; 1 run: Dd = 4).
    """
    per_process = per_process or num_devices
    ok = [d for d in range(1, per_process + 1) if per_process % d == 0 and num_devices % d == 0
          and (batch_size is None or batch_size % d == 0)]
    if data_parallel is False or num_runs >= num_devices and data_parallel is None:
        d = 1
    elif data_parallel:
        d = max(ok)
    else:
        d = min((d for d in ok if num_devices // d <= num_runs), default=max(ok))
    return num_devices // d, d


def assign(num_runs: int, runs_axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(rows, fill): each run's row of the padded run axis, and each row's run.

    The axis has ``runs_axis`` slices of ⌈n/R⌉ rows; the runs fill them in order, as evenly as
    possible (slice b gets ⌊n/R⌋ runs, one more if b < n mod R), and a slice's spare rows copy
    its first run (an empty slice copies run 0). 6 runs on R = 4: rows (0, 1, 2, 3, 4, 6),
    fill (0, 1, 2, 3, 4, 4, 5, 5).
    """
    per = -(-num_runs // runs_axis)
    q, rem = divmod(num_runs, runs_axis)
    rows, fill, run = [], [], 0
    for b in range(runs_axis):
        k = q + (b < rem)
        rows += [b * per + j for j in range(k)]
        fill += list(range(run, run + k)) + [run if k else 0] * (per - k)
        run += k
    return tuple(rows), tuple(fill)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a group's runs live: the mesh, each run's row and each row's run.

    Attributes:
      mesh: devices [R, Dd] with axes (``runs``, ``data``); each runs slice within one process.
      rows: run → its row of the padded run axis (``num_runs`` entries).
      fill: row → the run it holds (``padded`` entries; padding rows repeat a run).
      latent_dim: the group's largest k over every process (0: the local runs decide).
    """

    mesh: Mesh
    rows: tuple[int, ...]
    fill: tuple[int, ...]
    latent_dim: int = 0

    @property
    def num_runs(self) -> int:
        return len(self.rows)

    @property
    def padded(self) -> int:
        return len(self.fill)

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def runs_axis(self) -> int:
        return self.mesh.shape[RUNS]

    @property
    def data_axis(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def processes(self) -> int:
        return len({d.process_index for d in self.mesh.devices.flat})

    @property
    def runs_sharding(self) -> NamedSharding:
        """Leading (run) axis over ``runs``, replicated over ``data``."""
        return NamedSharding(self.mesh, P(RUNS))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        """A training batch's leading axis over ``data`` (inside the vmap over ``runs``)."""
        return NamedSharding(self.mesh, P(DATA))

    def row_process(self, row: int) -> int:
        """The process whose devices hold ``row``."""
        return self.mesh.devices[row // (self.padded // self.runs_axis), 0].process_index

    @functools.cached_property
    def local_runs(self) -> tuple[int, ...]:
        """The runs this process holds, writes and passes in :meth:`put_runs` (in this order)."""
        me = jax.process_index()
        return tuple(i for i, row in enumerate(self.rows) if self.row_process(row) == me)

    @functools.cached_property
    def _local_rows(self) -> tuple[int, ...]:
        me = jax.process_index()
        return tuple(r for r in range(self.padded) if self.row_process(r) == me)

    def put_runs(self, tree):
        """Global arrays [padded, ...] sharded along the run axis, from this process's runs'
        values: every leaf [len(local_runs), ...] (host or device arrays; PRNG keys too)."""
        pos = {run: i for i, run in enumerate(self.local_runs)}
        take = np.asarray([pos[self.fill[r]] for r in self._local_rows], np.int64)

        def put(a):
            if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(a)), impl=jax.random.key_impl(a))
            a = np.asarray(a)
            if a.shape[:1] != (len(pos),):
                raise ValueError(f"put_runs: leaf of shape {a.shape} for {len(pos)} local run(s)")
            return jax.make_array_from_process_local_data(self.runs_sharding, a[take], (self.padded, *a.shape[1:]))

        return jax.tree.map(put, tree)

    def replicate(self, tree):
        """Global arrays with a full copy on every device of the mesh (same value in every process)."""
        def put(a):
            a = np.asarray(a)
            return jax.make_array_from_process_local_data(self.replicated, a, a.shape)
        return jax.tree.map(put, tree)

    def to_host(self, tree):
        """NumPy [len(local_runs), ...] of this process's runs (padding rows dropped), from
        run-sharded arrays [padded, ...]; reads only this process's shards."""
        def get(x):
            shards: dict[int, Any] = {}
            for s in x.addressable_shards:
                shards.setdefault(s.index[0].start or 0, s.data)
            host = {k: np.asarray(v) for k, v in shards.items()}
            out = []
            for run in self.local_runs:
                row = self.rows[run]
                start = max(k for k in host if k <= row)
                out.append(host[start][row - start])
            return np.stack(out)
        return jax.tree.map(get, tree)

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process of the placement (every process must call)."""
        if self.processes == 1:
            return flag
        return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))

    def describe(self) -> str:
        """'6 runs (+2 padding) on 4 devices (runs 4 × data 1)' (and ', 2 processes' if several)."""
        pad = f" (+{self.padded - self.num_runs} padding)" if self.padded > self.num_runs else ""
        procs = f", {self.processes} processes" if self.processes > 1 else ""
        return (f"{self.num_runs} run{'s' * (self.num_runs != 1)}{pad} on {self.devices} "
                f"device{'s' * (self.devices != 1)} (runs {self.runs_axis} × data {self.data_axis}{procs})")

    def summary(self) -> dict:
        """A plain dict for reports: runs, padded, devices, runs_axis, data_axis, processes."""
        return {"runs": self.num_runs, "padded": self.padded, "devices": self.devices,
                "runs_axis": self.runs_axis, "data_axis": self.data_axis, "processes": self.processes}


def devices(count: int = 0) -> list:
    """The first ``count`` devices (0: all) of every process together, ordered by process, then id."""
    found = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return found[:count] if count else found


def plan(num_runs: int, devices: Sequence | None = None, *, data_parallel: bool | None = None,
         batch_size: int | None = None, latent_dim: int = 0) -> Placement:
    """The placement of a group of ``num_runs`` runs on ``devices`` (default: this process's).

    Args:
      num_runs: the group's runs, over every process.
      devices: the mesh's devices; in a multi-process job, every process's (:func:`devices`).
      data_parallel: see :func:`layout`.
      batch_size: the training batch, which the data axis must divide.
      latent_dim: the group's largest k (needed when a process does not see every run).
    Raises:
      ValueError: no runs, processes with different device counts, or a process without runs
        (every process of a group must hold at least one real run).
    """
    if num_runs < 1:
        raise ValueError("a group needs at least one run")
    devs = sorted(devices if devices is not None else jax.local_devices(),
                  key=lambda d: (d.process_index, d.id))
    per = {}
    for d in devs:
        per[d.process_index] = per.get(d.process_index, 0) + 1
    if len(set(per.values())) != 1:
        raise ValueError(f"processes with different device counts: {per}")
    if 1 < len(per) < jax.process_count():  # its processes agree through gathers over all of them
        raise ValueError(f"a group on devices of {len(per)} of the job's {jax.process_count()} processes; "
                         f"use the devices of one process or of all")
    r, dd = layout(num_runs, len(devs), next(iter(per.values())), batch_size, data_parallel)
    rows, fill = assign(num_runs, r)
    mesh = Mesh(np.asarray(devs, dtype=object).reshape(r, dd), (RUNS, DATA))
    placement = Placement(mesh, rows, fill, latent_dim)
    # A padding row copies a run of its own process (an empty slice's rows: that process's first run).
    first = {}
    for run, row in enumerate(rows):
        first.setdefault(placement.row_process(row), run)
    if set(first) != set(per):
        raise ValueError(f"{placement.describe()}: processes {sorted(set(per) - set(first))} would hold "
                         f"no run; put at least {len(per)} runs in a group that spans {len(per)} processes")
    same = lambda row, run: placement.row_process(row) == placement.row_process(rows[run])
    fill = tuple(f if same(row, f) else first[placement.row_process(row)] for row, f in enumerate(fill))
    return dataclasses.replace(placement, fill=fill)


def shard_batch(draw: Callable, sharding: NamedSharding) -> Callable:
    """``draw(key, arrays, batch_size)`` whose batch is constrained to ``sharding`` (the data
    axis; under ``vmap(spmd_axis_name="runs")`` the run axis is added in front)."""
    def sharded(key, arrays, batch_size):
        return jax.lax.with_sharding_constraint(draw(key, arrays, batch_size), sharding)
    return sharded


# ----------------------------------------------------------------------------------------
# The placement of the group being trained, set by whoever plans groups (vaekl.sweep.run_groups).

_CURRENT: list[Placement] = []


@contextlib.contextmanager
def use(placement: Placement) -> Iterator[Placement]:
    """Within the block, :func:`current` is ``placement`` (the trainer places its group so)."""
    _CURRENT.append(placement)
    try:
        yield placement
    finally:
        _CURRENT.pop()


def current() -> Placement | None:
    return _CURRENT[-1] if _CURRENT else None


# ----------------------------------------------------------------------------------------
# Several processes.


def slurm_tasks() -> int:
    """How many tasks the current Slurm job step runs (1 outside a step launched by srun)."""
    if "SLURM_STEP_NODELIST" not in os.environ or "SLURM_PROCID" not in os.environ:
        return 1
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))


def initialize_distributed(**kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)`` once per process (without arguments it reads
    the Slurm environment); must come before anything touches a device."""
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**kwargs)


def all_processes(values: Sequence[int]) -> np.ndarray:
    """int32 [processes, len(values)]: every process's ``values`` (every process must call)."""
    values = np.asarray(values, np.int32).reshape(-1)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)
