"""Groups of runs in one compiled program: padding members of different k to the largest,
each member's directory, metrics and checkpoints (:class:`Member`), and the group commit that
makes a vmapped group's checkpoints atomic.

Members with different k share a program by padding every latent axis to the group's
largest k, K: a member starts from the parameters a standalone model with its own k
would have (same fan-in scaling), zero-padded at the end of each axis whose size depends
on k, and a 0/1 latent mask switches the padded dimensions off (no KL, no decoder input,
no metric, no gradient). A group of one is an ordinary run."""

from __future__ import annotations

from collections.abc import Callable
import json
import logging as pylogging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vaekl import checkpoints, rundir, sharding
from vaekl import metrics as metrics_lib
from vaekl.train.state import create
from vaekl.train.step import EVAL_SPLITS

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines


def pad_like(tree, like):
    """Zero-pads each leaf of ``tree`` at the end of every axis to the shape of ``like``'s leaf."""
    def pad(a, b):
        a = jnp.asarray(a)
        return jnp.pad(a, [(0, nb - na) for na, nb in zip(a.shape, b.shape)]) if a.ndim else a
    return jax.tree.map(pad, tree, like)


def slice_like(tree, like):
    """The inverse of :func:`pad_like`: each leaf cut to the shape of ``like``'s leaf."""
    return jax.tree.map(lambda a, b: a[tuple(slice(0, n) for n in np.shape(b))], tree, like)


class Member:
    """One run of a group: its config, directory, metrics, checkpoints and TensorBoard."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, image_shape, train_images):
        self.config, self.workdir = config, workdir
        self.k = config.latent_dim
        self.graphdef, self.initial, _ = create(config, image_shape, train_images)
        self.log = rundir.MetricsLog(os.path.join(workdir, rundir.METRICS))
        self.lock = rundir.RunLock(workdir)
        self.mgr = None
        self.tb = None
        self.failure: str | None = None
        self.error: Exception | None = None  # what stopped it, when not a non-finite loss
        self.last_rows: dict[str, dict] | None = None
        self.group = [os.path.basename(os.path.normpath(workdir))]  # run names of its whole group

    def open(self) -> None:
        """Creates (or checks) the run directory; called once every member's input is valid."""
        os.makedirs(self.workdir, exist_ok=True)
        rundir.write_config(self.workdir, self.config.to_dict())
        self.mgr = checkpoints.manager(self.workdir, self.config.keep_checkpoints)

    def restart_tensorboard(self) -> None:
        """Rewrites TensorBoard's events from metrics.jsonl (already cut back to the restored
        step) into a new event file and removes the older ones, so that readers never see a
        step twice after a resume (the events of work a kill lost are gone with its rows)."""
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        tb_dir = os.path.join(self.workdir, rundir.TENSORBOARD)
        old = [os.path.join(tb_dir, f) for f in os.listdir(tb_dir)] if os.path.isdir(tb_dir) else []
        old = [f for f in old if ".tfevents." in os.path.basename(f) and os.path.isfile(f)]
        if self.tb is not None:
            self.tb.close()
        self.tb = SummaryWriter(tb_dir, filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        rows = self.log.read()
        if rows:
            self._tensorboard_rows(rows)
        for f in old:
            os.remove(f)

    def _tensorboard_rows(self, rows: list[dict]) -> None:
        for row in rows:
            for tag, v in metrics_lib.tensorboard_scalars(row).items():
                self.tb.add_scalar(tag, v, row["step"])
            for tag, v in metrics_lib.tensorboard_histograms(row).items():
                self.tb.add_histogram(tag, v, row["step"])
        self.tb.flush()

    def log_rows(self, rows: list[dict]) -> None:
        """Appends rows to metrics.jsonl and TensorBoard (both derived from the declarations)."""
        self.log.append(rows)
        self._tensorboard_rows(rows)
        evals = {r["split"]: r for r in rows if r["split"] in EVAL_SPLITS}
        if evals:
            self.last_rows = evals

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes the files (idempotent)."""
        mgr, tb, self.mgr, self.tb = self.mgr, self.tb, None, None
        if mgr is not None:
            mgr.wait_until_finished()
            mgr.close()
        if tb is not None:
            tb.close()

    def abort(self) -> None:
        """Closes whatever is open after a failure, never raising (so nothing waits forever on
        orbax's background threads)."""
        try:
            self.close()
        except Exception as e:  # pylint: disable=broad-except
            LOG.warning("closing %s after a failure: %s", self.workdir, e)


# A vmapped group's step is committed atomically: every member saves step s, the group waits
# for all those saves to finish, and only then writes GROUP_COMMIT = {"step": s, "members":
# [run names of the whole group]} into each member's directory (temporary file + rename). A
# checkpoint newer than its run's marker is uncommitted (a kill came between the members'
# saves, or before the markers): resuming drops it, with its metrics rows, and the group
# restarts together from the last step committed by all of them (vaekl.sweep plans the same
# group again from the markers). A run trained on its own has no marker.
GROUP_COMMIT = "group_commit.json"


# Test hook for fault injection: called as ``fault_hook(phase, step, member)`` when a group
# saves: "member_saved" after each member's save call (member = its index), "saved" once every
# member's save has finished and "committed" once the markers are written (member = -1).
fault_hook: Callable[[str, int, int], None] | None = None


def fault(phase: str, step: int, member: int = -1) -> None:
    if fault_hook is not None:
        fault_hook(phase, step, member)


def read_group_commit(workdir: str) -> dict | None:
    """A run's group commit marker ``{"step": int, "members": [run names]}``, or None if it
    has none (an unreadable one is ignored with a warning: the checkpoints then decide)."""
    path = os.path.join(workdir, GROUP_COMMIT)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
        if not isinstance(marker.get("step"), int) or not isinstance(marker.get("members"), list):
            raise ValueError("not {step, members}")
        return marker
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        LOG.warning("ignoring the unreadable group commit marker %s (%s)", path, e)
        return None


def member_rows(step: int, evals: dict[str, dict], i: int, k: int) -> list[dict]:
    return [metrics_lib.row(step, split, jax.tree.map(lambda a: a[i], ev), k)
            for split, ev in evals.items()]


def commit_group(members: list[Member], step: int) -> None:
    """Writes every live member's marker for ``step`` once all their saves have finished."""
    for m in members:
        m.mgr.wait_until_finished()
    fault("saved", step)
    for m in members:
        rundir.atomic_write(os.path.join(m.workdir, GROUP_COMMIT),
                          json.dumps({"step": int(step), "members": m.group}))
    fault("committed", step)


def drop_uncommitted(m: Member) -> None:
    """Deletes the run's checkpoints newer than its group commit marker (see GROUP_COMMIT)."""
    marker = read_group_commit(m.workdir)
    if marker is None:
        return
    for s in [s for s in m.mgr.all_steps() if s > marker["step"]]:
        LOG.warning("%s: dropping checkpoint step %d, which its group never committed (the group "
                    "resumes from step %d)", m.workdir, s, marker["step"])
        m.mgr.delete(s)


def restore_start(members: list[Member]) -> int | None:
    """The common step to resume the group from (None: start afresh), made consistent.

    Checkpoints newer than a member's group commit marker are dropped first. Normally every
    member's latest checkpoint is then the same step. After a crash between members' saves
    (of runs without markers) or a damaged checkpoint, the group resumes from the earliest of
    them; members that got further drop their later checkpoints (their metrics are cut back
    below).
    """
    latest = []
    for m in members:
        drop_uncommitted(m)
        try:
            latest.append(checkpoints.restore_latest_good(m.mgr, m.initial)[0])
        except checkpoints.CorruptCheckpoint as e:  # no usable checkpoint: only this member fails
            if len(members) == 1:
                raise
            LOG.error("%s; the rest of its group trains without it", e)
            m.failure, m.error = str(e), e
    members = [m for m in members if m.failure is None]  # latest holds their steps
    if not members:
        raise ValueError("no member of the group has a usable checkpoint")
    if all(s is None for s in latest):
        return None
    if any(s is None for s in latest):
        raise ValueError("a group mixes new runs with partly trained ones, which would restart "
                         "them; group runs by their latest checkpoint (vaekl.sweep.groups does)")
    start = min(latest)
    for m in members:
        later = [s for s in m.mgr.all_steps() if s > start]
        if start not in m.mgr.all_steps():
            raise ValueError(f"cannot resume {m.workdir} at step {start} with its group (it has "
                             f"checkpoints {m.mgr.all_steps()}); run it on its own")
        for s in later:
            m.mgr.delete(s)
    return start


def agree_start(members: list[Member], start: int | None, placement: sharding.Placement) -> int | None:
    """The step every process of the group resumes from: the earliest of their starts
    (members beyond it drop their later checkpoints, as in :func:`restore_start`)."""
    if placement.processes == 1:
        return start
    starts = sharding.all_processes([-1 if start is None else start])[:, 0]
    if (starts < 0).any() and (starts >= 0).any():
        raise ValueError(f"a group's processes mix new and partly trained runs (starts {starts.tolist()})")
    agreed = None if starts[0] < 0 else int(starts.min())
    if agreed is not None and agreed != start:
        for m in members:
            if agreed not in m.mgr.all_steps():
                raise ValueError(f"cannot resume {m.workdir} at step {agreed} with its group (it has "
                                 f"checkpoints {m.mgr.all_steps()}); run it on its own")
            for s in [s for s in m.mgr.all_steps() if s > agreed]:
                m.mgr.delete(s)
    return agreed
