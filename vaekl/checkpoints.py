"""Orbax checkpoints of the training state: keep the last N and the best by validation negative ELBO.

Every checkpoint carries a SHA-256 of the saved arrays (their dtypes, shapes and bytes, in
tree order) in orbax's step metadata, and :func:`restore` recomputes it: a damaged file
fails loudly as :class:`CorruptCheckpoint` instead of resuming from garbage (which would
surface as a non-finite loss much later). :func:`restore_latest_good` falls back to the
newest checkpoint that verifies, moving the damaged ones aside as ``<step>.corrupt``.
Every checkpoint also carries the run's config (:data:`CONFIG_KEY`), which
:func:`vaekl.rundir.check_config` compares on resume.

In a ``jax.distributed`` job (several processes, each writing its own runs), orbax 0.12 saves
collectively (numpy leaves only from process 0, jax arrays only when global, barriers across
processes), so :func:`manager` returns a :class:`LocalManager` there instead: a plain
per-process format, one ``state.npz`` per step written atomically, with the same checksum and
metadata. A directory in that format stays in it (its ``checkpoints/VAEKL_FORMAT`` marker), so
single-process readers (:func:`vaekl.runs.load`) read it too. Single-process runs keep
orbax's format.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import hashlib
import json
import logging as pylogging
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from vaekl import rundir

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

BEST_METRIC = "valid_neg_elbo"  # the run's "valid" split (config.validation_size > 0)
CHECKSUM = "vaekl_sha256"          # key in the step's custom metadata
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM = "default"                   # orbax's directory of the saved state inside a step
CONFIG_KEY = rundir.CHECKPOINT_CONFIG  # key in the step's custom metadata: the run's config (JSON)

# A process of a jax.distributed job can save and restore its own runs' checkpoints
# (:class:`LocalManager`), without any collective with the other processes.
PROCESS_LOCAL = True
LOCAL_FORMAT = "VAEKL_FORMAT"      # file in checkpoints/ marking the process-local format
LOCAL_STATE = "state.npz"          # a LocalManager step's arrays
LOCAL_VERSION = "vaekl-npz-1"
_TMP = ".vaekl-tmp"                # a LocalManager step being written: <step>.vaekl-tmp<pid>


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be restored as saved: missing files, unreadable, or a
    checksum that does not match."""

    def __init__(self, step: int, reason: str, directory: str = "", incomplete: bool = False):
        self.step, self.reason, self.incomplete = step, reason, incomplete
        super().__init__(f"checkpoint step {step}{f' in {directory}' if directory else ''} is "
                         f"unusable: {reason}")


def manager(workdir: str, keep: int, read_only: bool = False,
            process_local: bool | None = None) -> Manager:
    """A CheckpointManager in ``workdir/checkpoints`` that keeps the ``keep`` latest
    checkpoints and the one with the lowest validation negative ELBO. ``read_only``: for readers
    (creates, saves and deletes nothing). ``process_local``: a :class:`LocalManager` instead of
    orbax's; by default when this process is one of several (``jax.process_count() > 1``) or
    the directory is already in that format."""
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if process_local is None:
        process_local = jax.process_count() > 1 or os.path.exists(os.path.join(path, LOCAL_FORMAT))
    if process_local:
        return LocalManager(path, keep, read_only)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        best_fn=lambda m: m[BEST_METRIC],  # makes the manager write and rank metrics
        best_mode="min",
        keep_checkpoints_without_metrics=False,
        create=not read_only,
        read_only=read_only,
    )
    if not read_only:
        return ocp.CheckpointManager(path, options=options)
    with _quiet_read_only():
        return ocp.CheckpointManager(path, options=options)


def _ranked_saves_only_warn(record) -> bool:
    """Drops orbax's warning for a save without the ranking metric: normal here (checkpoints
    between evaluations, and every checkpoint of a run without a validation split)."""
    return "did not provide metrics" not in record.getMessage()


logging.get_absl_logger().addFilter(_ranked_saves_only_warn)


@contextlib.contextmanager
def _quiet_read_only() -> Iterator[None]:
    """Silences orbax's warnings that a reader's manager is read-only."""
    quiet = lambda record: "read only" not in record.getMessage() and "read_only" not in record.getMessage()
    logging.get_absl_logger().addFilter(quiet)
    try:
        yield
    finally:
        logging.get_absl_logger().removeFilter(quiet)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalManager:
    """Checkpoints that involve no other process: each process of a jax.distributed job saves
    and restores only its own runs' (the subset of orbax's CheckpointManager that vaekl uses).

    A step is a directory ``<step>/`` holding ``state.npz`` (the leaves in tree order,
    ``leaf_00000``, …) and ``_CHECKPOINT_METADATA`` (JSON: the leaves' tree paths, the
    ranking metric, the custom metadata with the checksum and the config), written into
    ``<step>.vaekl-tmp<pid>/``, fsynced and renamed: a step exists whole or not at all. Saves
    are synchronous. Like :func:`manager`'s orbax one, it keeps the ``keep`` latest steps and
    the one with the lowest validation negative ELBO. Steps saved by orbax (a run begun in one
    process) are listed and restored too.
    """

    def __init__(self, directory: str, keep: int, read_only: bool = False):
        self.directory, self.keep, self.read_only = directory, keep, read_only
        if read_only:
            return
        os.makedirs(directory, exist_ok=True)
        marker = os.path.join(directory, LOCAL_FORMAT)
        if not os.path.exists(marker):
            with open(f"{marker}{_TMP}{os.getpid()}", "w") as f:
                f.write(LOCAL_VERSION + "\n")
            os.replace(f"{marker}{_TMP}{os.getpid()}", marker)
        for name in os.listdir(directory):  # saves cut short (one writer per run: its lock)
            if _TMP in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    def all_steps(self) -> list[int]:
        """The committed steps (those with their metadata file), ascending."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(d) for d in os.listdir(self.directory)
                      if d.isdigit() and os.path.exists(os.path.join(self.directory, d, STEP_METADATA)))

    def latest_step(self) -> int | None:
        return max(self.all_steps(), default=None)

    def metrics(self, step: int) -> dict | None:
        """The step's ranking metrics (None: none, or unreadable)."""
        path = os.path.join(self.directory, str(step))
        try:
            if os.path.exists(os.path.join(path, "metrics", "metrics")):  # saved by orbax
                with open(os.path.join(path, "metrics", "metrics")) as f:
                    return json.load(f) or None
            with open(os.path.join(path, STEP_METADATA)) as f:
                return json.load(f).get("metrics") or None
        except (OSError, ValueError, AttributeError):
            return None

    def best_step(self) -> int | None:
        ranked = {s: m[BEST_METRIC] for s in self.all_steps()
                  if BEST_METRIC in (m := self.metrics(s) or {})}
        return min(ranked, key=ranked.get, default=None)

    def save(self, step: int, args: ocp.args.StandardSave, metrics: Mapping | None = None,
             custom_metadata: Mapping | None = None) -> bool:
        """Writes ``args.item`` (leaves: host arrays, or jax arrays this process can read
        whole) as step ``step``, then deletes the steps the policy no longer keeps."""
        if self.read_only:
            raise ValueError(f"{self.directory}: cannot save in a read-only manager")
        final = os.path.join(self.directory, str(step))
        if os.path.exists(final):
            raise ValueError(f"{self.directory}: a checkpoint for step {step} already exists")
        leaves = jax.tree_util.tree_flatten_with_path(args.item)[0]
        tmp = f"{final}{_TMP}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with open(os.path.join(tmp, LOCAL_STATE), "wb") as f:
            np.savez(f, **{f"leaf_{i:05d}": np.asarray(a) for i, (_, a) in enumerate(leaves)})
            f.flush()
            os.fsync(f.fileno())
        meta = {"format": LOCAL_VERSION, "paths": [jax.tree_util.keystr(p) for p, _ in leaves],
                "metrics": dict(metrics or {}), "custom_metadata": dict(custom_metadata or {}),
                "commit_timestamp_nsecs": time.time_ns()}
        with open(os.path.join(tmp, STEP_METADATA), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(self.directory)
        self._apply_policy()
        return True

    def _apply_policy(self) -> None:
        prune(self, self.keep)

    def restore(self, step: int, args: ocp.args.StandardRestore) -> Any:
        """The state saved at ``step`` in the structure of ``args.item`` (ShapeDtypeStructs
        or arrays): device arrays where its leaves have a sharding, else numpy.

        Raises:
          ValueError (and others): unreadable files, or another tree, shape or dtype kind.
        """
        path = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(path, LOCAL_STATE)):
            return self._restore_orbax(step, args)
        with open(os.path.join(path, STEP_METADATA)) as f:
            meta = json.load(f)
        flat, treedef = jax.tree_util.tree_flatten_with_path(args.item)
        paths = [jax.tree_util.keystr(p) for p, _ in flat]
        if meta.get("paths") != paths:
            raise ValueError(f"the saved tree differs from the requested one ({len(meta.get('paths') or [])} "
                             f"saved leaves, {len(paths)} requested)")
        out = []
        with np.load(os.path.join(path, LOCAL_STATE), allow_pickle=False) as z:
            for i, (_, want) in enumerate(flat):
                a = z[f"leaf_{i:05d}"]
                if a.shape != tuple(want.shape):
                    raise ValueError(f"leaf {paths[i]} has shape {a.shape}, expected {tuple(want.shape)}")
                a = a.astype(want.dtype, copy=False)
                sharding = getattr(want, "sharding", None)
                out.append(jax.device_put(a, sharding) if sharding is not None else a)
        return jax.tree_util.tree_unflatten(treedef, out)

    def _restore_orbax(self, step: int, args: ocp.args.StandardRestore) -> Any:
        """A step saved by orbax, read by this process alone."""
        me = jax.process_index()
        mp = (ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                                 barrier_sync_key_prefix=f"vaekl{me}:{self.directory}")
              if jax.process_count() > 1 else ocp.options.MultiprocessingOptions())
        with _quiet_read_only():
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, multiprocessing_options=mp)
            reader = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=ocp.StandardCheckpointHandler(multiprocessing_options=mp))
        try:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args.item)
            state = reader.restore(step, args=ocp.args.StandardRestore(abstract))
        finally:
            reader.close()
        return jax.tree.map(lambda a, want: jax.device_put(np.asarray(a), want.sharding)
                            if getattr(want, "sharding", None) is not None else np.asarray(a), state, args.item)

    def delete(self, step: int) -> None:
        if self.read_only:
            raise ValueError(f"{self.directory}: cannot delete in a read-only manager")
        shutil.rmtree(os.path.join(self.directory, str(step)))

    def reload(self) -> None:
        """Nothing to do: every call reads the directory."""

    def wait_until_finished(self) -> None:
        """Nothing to wait for: saves are synchronous."""

    def close(self) -> None:
        """Nothing to close."""


Manager = ocp.CheckpointManager | LocalManager


def checksum(state: Any) -> str:
    """SHA-256 (hex) over the leaves of ``state`` in tree order: dtype, shape and bytes of each."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def prune(mgr: Manager, keep: int) -> None:
    """Deletes every checkpoint but the ``keep`` latest and the best (the keep policy; orbax
    applies it only when it saves, so a kill right after a save can leave more behind)."""
    steps = sorted(mgr.all_steps())
    kept = set(steps[-keep:]) | ({mgr.best_step()} - {None})
    for s in steps:
        if s not in kept:
            mgr.delete(s)


def save(mgr: Manager, step: int, state: Any, valid_neg_elbo: float | None,
         config: Mapping | None = None) -> None:
    """Saves ``state`` (asynchronously with orbax) with its checksum, the run's config and, if
    given, its ranking metric. ``config`` defaults to the run directory's config.json (the
    trainer writes it before the first save); a run without one stores none."""
    metrics = None if valid_neg_elbo is None else {BEST_METRIC: float(valid_neg_elbo)}
    custom = {CHECKSUM: checksum(state)}
    config = config if config is not None else _run_config(str(mgr.directory))
    if config is not None:
        custom[CONFIG_KEY] = rundir.jsonable_config(config)
    mgr.save(step, args=ocp.args.StandardSave(state), metrics=metrics, custom_metadata=custom)


def _run_config(directory: str) -> dict | None:
    """config.json of the run whose checkpoints are in ``directory`` (None: none, unreadable)."""
    try:
        with open(os.path.join(os.path.dirname(directory), rundir.CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _step_dir(mgr: Manager, step: int) -> str:
    return os.path.join(str(mgr.directory), str(step))


def _step_metadata(mgr: Manager, step: int) -> dict:
    """The step's orbax metadata, or CorruptCheckpoint(incomplete=True) when files are missing."""
    path = _step_dir(mgr, step)
    fail = lambda reason, incomplete: CorruptCheckpoint(step, reason, str(mgr.directory), incomplete)
    if not os.path.isdir(path):
        raise fail("its directory is missing", True)
    if not os.path.exists(os.path.join(path, STEP_METADATA)):
        raise fail(f"no {STEP_METADATA} (an interrupted or emptied save)", True)
    if not os.path.exists(os.path.join(path, ITEM, "_METADATA")) and not os.path.exists(
            os.path.join(path, LOCAL_STATE)):
        raise fail(f"the saved state ({ITEM}/_METADATA or {LOCAL_STATE}) is missing", True)
    try:
        with open(os.path.join(path, STEP_METADATA)) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise fail(f"unreadable {STEP_METADATA} ({e})", False) from None
    return meta


def restore(mgr: Manager, step: int, like: Any) -> Any:
    """Restores the state saved at ``step`` into the structure (and shardings) of ``like``,
    verified against its checksum (checkpoints without one: all values must be finite).

    Raises:
      CorruptCheckpoint: missing files, unreadable data, or a checksum mismatch.
    """
    meta = _step_metadata(mgr, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  (tensorstore raises many kinds)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpoint(step, f"unreadable ({type(e).__name__}: {first})", str(mgr.directory)) from e
    expected = (meta.get("custom_metadata") or {}).get(CHECKSUM)
    if expected is not None:
        actual = checksum(state)
        if actual != expected:
            raise CorruptCheckpoint(step, f"checksum mismatch (saved {expected[:12]}…, read {actual[:12]}…)",
                                    str(mgr.directory))
    elif not all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(state)
                 if np.issubdtype(np.asarray(a).dtype, np.inexact)):
        raise CorruptCheckpoint(step, "non-finite values (and no checksum)", str(mgr.directory))
    return state


def quarantine(mgr: Manager, step: int, reason: str) -> str:
    """Moves a damaged step aside to ``<step>.corrupt`` (which orbax ignores) with a
    REASON.txt, so that saving continues past it; returns the new path."""
    src = _step_dir(mgr, step)
    dst, n = f"{src}.corrupt", 1
    while os.path.exists(dst):
        n += 1
        dst = f"{src}.corrupt{n}"
    os.replace(src, dst)
    with open(os.path.join(dst, "REASON.txt"), "w") as f:
        f.write(reason + "\n")
    mgr.reload()
    return dst


def restore_latest_good(mgr: Manager, like: Any, quarantine_bad: bool = True,
                        skip: tuple[int, ...] = ()) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that verifies, or (None, None) if there is none.

    Damaged newer checkpoints are skipped with a warning naming the step and the reason and,
    if ``quarantine_bad``, moved aside (:func:`quarantine`). Checkpoints whose files are
    missing (interrupted saves) are always moved aside when ``quarantine_bad``; others only
    once an older good one is found, so that a caller's mismatched ``like`` never moves good
    checkpoints.

    Raises:
      CorruptCheckpoint: every checkpoint is damaged and some have all their files (nothing
        is moved; the message lists each step's reason).
    """
    bad: list[CorruptCheckpoint] = []
    found: tuple[int | None, Any] = (None, None)
    for step in sorted(mgr.all_steps(), reverse=True):
        if step in skip:
            continue
        try:
            found = (step, restore(mgr, step, like))
            break
        except CorruptCheckpoint as e:
            LOG.warning("checkpoint step %d in %s is unusable (%s); trying the previous one",
                        step, mgr.directory, e.reason)
            bad.append(e)
    if found[0] is None and not all(e.incomplete for e in bad):
        reasons = "; ".join(f"step {e.step}: {e.reason}" for e in bad)
        raise CorruptCheckpoint(bad[0].step, f"no usable checkpoint in {mgr.directory} ({reasons}); move "
                                f"the checkpoints aside to restart the run")
    if quarantine_bad:
        for e in bad:
            LOG.warning("moved %s aside", quarantine(mgr, e.step, e.reason))
    if bad and found[0] is not None:
        LOG.warning("resuming %s from checkpoint step %d", mgr.directory, found[0])
    return found


def restore_step(mgr: Manager, which: str | int, like: Any) -> tuple[int, Any]:
    """(step, state) for ``which`` = "best", "latest" or a step number; best and latest fall
    back to the newest good checkpoint (without moving anything) when theirs is damaged.

    Raises:
      FileNotFoundError: no (good) checkpoint. ValueError: no checkpoint at that number, or
      a damaged one (CorruptCheckpoint).
    """
    steps = mgr.all_steps()
    if not isinstance(which, str):
        if int(which) not in steps:
            raise ValueError(f"no checkpoint at step {which} in {mgr.directory} (it has {sorted(steps)})")
        return int(which), restore(mgr, int(which), like)
    if which not in ("best", "latest"):
        raise ValueError(f"checkpoint {which!r} is not 'best', 'latest' or a step number")
    skip: tuple[int, ...] = ()
    best = mgr.best_step() if which == "best" else None
    if best is not None:
        try:
            return best, restore(mgr, best, like)
        except CorruptCheckpoint as e:
            LOG.warning("the best checkpoint is unusable (%s); using the latest good one instead", e)
            skip = (best,)
    step, state = restore_latest_good(mgr, like, quarantine_bad=False, skip=skip)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    return step, state
