"""Orbax checkpoints of the training state: keep the last N and the best by test negative ELBO.

Every checkpoint carries a SHA-256 of the saved arrays (their dtypes, shapes and bytes, in
tree order) in orbax's step metadata, and :func:`restore` recomputes it: a damaged file
fails loudly as :class:`CorruptCheckpoint` instead of resuming from garbage (which would
surface as a non-finite loss much later). :func:`restore_latest_good` falls back to the
newest checkpoint that verifies, moving the damaged ones aside as ``<step>.corrupt``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "test_neg_elbo"
CHECKSUM = "vaekl_sha256"          # key in the step's custom metadata
STEP_METADATA = "_CHECKPOINT_METADATA"
ITEM = "default"                   # orbax's directory of the saved state inside a step


class CorruptCheckpoint(ValueError):
    """A checkpoint that cannot be restored as saved: missing files, unreadable, or a
    checksum that does not match."""

    def __init__(self, step: int, reason: str, directory: str = "", incomplete: bool = False):
        self.step, self.reason, self.incomplete = step, reason, incomplete
        super().__init__(f"checkpoint step {step}{f' in {directory}' if directory else ''} is "
                         f"unusable: {reason}")


def manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager in ``workdir/checkpoints`` that keeps the ``keep`` latest
    checkpoints and the one with the lowest test negative ELBO. ``read_only``: for readers
    (creates, saves and deletes nothing)."""
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
    path = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not read_only:
        return ocp.CheckpointManager(path, options=options)
    quiet = lambda record: "read only" not in record.getMessage() and "read_only" not in record.getMessage()
    logging.get_absl_logger().addFilter(quiet)  # orbax warns that a reader's manager is read-only
    try:
        return ocp.CheckpointManager(path, options=options)
    finally:
        logging.get_absl_logger().removeFilter(quiet)


def checksum(state: Any) -> str:
    """SHA-256 (hex) over the leaves of ``state`` in tree order: dtype, shape and bytes of each."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(mgr: ocp.CheckpointManager, step: int, state: Any, test_neg_elbo: float | None) -> None:
    """Saves ``state`` (asynchronously) with its checksum and, if given, its ranking metric."""
    metrics = None if test_neg_elbo is None else {BEST_METRIC: float(test_neg_elbo)}
    mgr.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
             custom_metadata={CHECKSUM: checksum(state)})


def _step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(mgr.directory), str(step))


def _step_metadata(mgr: ocp.CheckpointManager, step: int) -> dict:
    """The step's orbax metadata, or CorruptCheckpoint(incomplete=True) when files are missing."""
    path = _step_dir(mgr, step)
    fail = lambda reason, incomplete: CorruptCheckpoint(step, reason, str(mgr.directory), incomplete)
    if not os.path.isdir(path):
        raise fail("its directory is missing", True)
    if not os.path.exists(os.path.join(path, STEP_METADATA)):
        raise fail(f"no {STEP_METADATA} (an interrupted or emptied save)", True)
    if not os.path.exists(os.path.join(path, ITEM, "_METADATA")):
        raise fail(f"the saved state ({ITEM}/_METADATA) is missing", True)
    try:
        with open(os.path.join(path, STEP_METADATA)) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise fail(f"unreadable {STEP_METADATA} ({e})", False) from None
    return meta


def restore(mgr: ocp.CheckpointManager, step: int, like: Any) -> Any:
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


def quarantine(mgr: ocp.CheckpointManager, step: int, reason: str) -> str:
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


def restore_latest_good(mgr: ocp.CheckpointManager, like: Any, quarantine_bad: bool = True,
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
            logging.warning("checkpoint step %d in %s is unusable (%s); trying the previous one",
                            step, mgr.directory, e.reason)
            bad.append(e)
    if found[0] is None and not all(e.incomplete for e in bad):
        reasons = "; ".join(f"step {e.step}: {e.reason}" for e in bad)
        raise CorruptCheckpoint(bad[0].step, f"no usable checkpoint in {mgr.directory} ({reasons}); move "
                                f"the checkpoints aside to restart the run")
    if quarantine_bad:
        for e in bad:
            logging.warning("moved %s aside", quarantine(mgr, e.step, e.reason))
    if bad and found[0] is not None:
        logging.warning("resuming %s from checkpoint step %d", mgr.directory, found[0])
    return found


def restore_step(mgr: ocp.CheckpointManager, which: str | int, like: Any) -> tuple[int, Any]:
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
            logging.warning("the best checkpoint is unusable (%s); using the latest good one instead", e)
            skip = (best,)
    step, state = restore_latest_good(mgr, like, quarantine_bad=False, skip=skip)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    return step, state
