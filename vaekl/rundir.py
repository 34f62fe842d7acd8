"""A run directory's files: the layout, whole-file atomic writes, config.json and meta.json,
the metrics.jsonl log, the status of a run, a lock against two writers, and images.

A run directory holds::

    config.json          the run's config (every field; resumable fields may change)
    meta.json            what the trainer knew: image_shape, train_size, vaekl_commit, command
    metrics.jsonl        one JSON object per logged (step, split): the metrics' source of truth
    checkpoints/<step>/  checkpoints of the TrainState, each with a checksum and the config
                         (orbax's format; a plain per-process one in jax.distributed jobs)
    tensorboard/         TensorBoard events (a view of metrics.jsonl)
    reconstructions.png  test images above their reconstructions (final step)
    samples.png          samples from the prior (final step)
    eval.json            experiments.evaluate's results
    disentanglement.jsonl  metrics along training (vaekl.trajectory)
    .lock                the advisory lock of the process writing the run (:class:`RunLock`)

``metrics.jsonl`` is written in whole lines and cut back to the restored checkpoint's step
on resume, so that no step is duplicated or missing; the checkpoints decide where a run
stands. This module is the bottom of the run-directory stack (no model, no jax arrays):
:mod:`vaekl.checkpoints` and the trainer write through it, and :class:`vaekl.runs.Run`
reads a whole run through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import contextlib
import fcntl
import json
import logging as pylogging
import math
import os
import re
import shlex
import socket
import sys
import threading
import time

import numpy as np
from PIL import Image

from vaekl import config as config_lib
from vaekl import user_modules

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

# The layout.
CONFIG = "config.json"
META = "meta.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
EVAL = "eval.json"
DISENTANGLEMENT = "disentanglement.jsonl"  # metrics along training (vaekl.trajectory)
RECONSTRUCTIONS = "reconstructions.png"
SAMPLES = "samples.png"
LOCK = ".lock"
CHECKPOINT_CONFIG = "vaekl_config"  # the config's key in a checkpoint's custom metadata

# Fields that may change between a run and its resumption (they do not change the model).
RESUMABLE_CHANGES = ("num_steps", "eval_every", "log_every", "checkpoint_every",
                     "keep_checkpoints", "num_images", "steps_per_call", "metric_every",
                     "metric_options", "metric_names", "imports")


# ----------------------------------------------------------------------------------------
# Files written whole.


def _jsonable(value):
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "tolist"):
        value = np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _jsonable_dict(config: Mapping) -> dict:
    return {k: _jsonable(v) for k, v in dict(config).items()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteFailed(OSError):
    """A run-directory file could not be written (disk full, quota, I/O error); one line
    naming the file, and nothing of it left behind (:func:`atomic_write`); ``errno`` is the
    cause's."""

    def __str__(self) -> str:
        return str(self.strerror)


STALE_TMP_SECONDS = 60.0  # a temporary file older than this, of no live process here, is debris


def atomic_write(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that readers see the old file or the new one, never a
    part (a temporary file, fsync, rename, fsync of the directory).

    A failed write (disk full, say) removes its temporary file and raises :class:`WriteFailed`
    naming ``path``, the old file untouched; a successful one also removes the temporary files
    of ``path`` that earlier writers left (killed ones: older than :data:`STALE_TMP_SECONDS`
    and of no live process on this host).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
        raise WriteFailed(e.errno, f"cannot write {path}: {reason}; it is unchanged (free space or fix the "
                                   f"error, then run the command again)") from e
    _fsync_dir(os.path.dirname(path))
    _remove_stale_tmp(path)


def _remove_stale_tmp(path: str) -> None:
    """Deletes ``path.tmp<pid>`` files left by writers that died (see :func:`atomic_write`)."""
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.tmp(\d+)$")
    now = time.time()
    for name in os.listdir(folder or "."):
        m = pattern.match(name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        stale = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(stale) > STALE_TMP_SECONDS and not _pid_alive(int(m.group(1))):
                os.remove(stale)
                LOG.info("removed %s, left by an interrupted write", stale)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def check_writable(path: str) -> None:
    """Raises NotADirectoryError or PermissionError (one line, naming the culprit) unless
    ``path`` is a writable directory or could be created as one. Writes nothing."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {path}: {parent} is not writable")


# ----------------------------------------------------------------------------------------
# config.json and meta.json.


def jsonable_config(config: Mapping) -> dict:
    """``config`` as config.json holds it (JSON types only: tuples become lists)."""
    return json.loads(json.dumps(_jsonable_dict(config)))


def _config_changes(old: Mapping, new: Mapping) -> str:
    """'beta: 1.0 → 4.0, …' over the fields outside RESUMABLE_CHANGES that differ ('' if none)."""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed)


def checkpoint_config(run_dir: str) -> tuple[int, dict] | None:
    """(step, config) stored in the newest committed checkpoint that has a readable one
    (vaekl.checkpoints saves the config with every checkpoint); None if none has."""
    ckpt = os.path.join(run_dir, CHECKPOINTS)
    steps = sorted((int(d) for d in os.listdir(ckpt) if d.isdigit()), reverse=True) if os.path.isdir(ckpt) else []
    for step in steps:
        try:
            with open(os.path.join(ckpt, str(step), "_CHECKPOINT_METADATA")) as f:
                config = (json.load(f).get("custom_metadata") or {}).get(CHECKPOINT_CONFIG)
        except (OSError, ValueError, AttributeError):
            continue  # missing or damaged: vaekl.checkpoints falls back past it too
        if isinstance(config, dict):
            return step, config
    return None


def check_config(run_dir: str, config: Mapping) -> None:
    """Raises ValueError (one line) if ``run_dir`` holds a run that cannot be resumed as ``config``.

    That is: config.json, or the config saved in the newest checkpoint (which still holds
    when config.json is lost), differs from ``config`` in a field outside RESUMABLE_CHANGES;
    or the run has checkpoints but no metrics.jsonl rows (resuming would silently lack them).
    """
    path = os.path.join(run_dir, CONFIG)
    new = jsonable_config(config)
    if os.path.exists(path):
        old = read_config_json(run_dir)
        diffs = _config_changes(old, new)
        if diffs:
            raise ValueError(f"{run_dir} holds a run with a different config ({diffs}); "
                             f"use a new --workdir or the original config")
    saved = checkpoint_config(run_dir)
    if saved is not None:
        diffs = _config_changes(saved[1], new)
        if diffs:
            raise ValueError(f"{run_dir} holds a run whose checkpoint step {saved[0]} has a different config "
                             f"({diffs}); use a new --workdir or the original config")
    latest = latest_checkpoint(run_dir)
    metrics = os.path.join(run_dir, METRICS)
    if latest is not None and not MetricsLog(metrics).read():
        what = "is empty" if os.path.exists(metrics) else "is missing"
        raise ValueError(f"{run_dir} has checkpoints up to step {latest} but its {METRICS} {what}, so a resumed "
                         f"run would lack the rows of steps 0–{latest}; restore {METRICS}, or move "
                         f"{os.path.join(run_dir, CHECKPOINTS)} aside to train the run again from step 0")


def write_config(run_dir: str, config: Mapping) -> None:
    """Writes config.json atomically, after :func:`check_config`."""
    check_config(run_dir, config)
    atomic_write(os.path.join(run_dir, CONFIG),
                 json.dumps(_jsonable_dict(config), indent=2, sort_keys=True))


def read_config(run_dir: str):
    """A run's config.json over today's defaults (fields added since keep their defaults),
    as an ml_collections.ConfigDict; JSON lists become tuples. The user modules the run
    recorded (``imports``) are imported first (vaekl.user_modules)."""
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG})")
    saved = read_config_json(run_dir)
    config = config_lib.defaults(tuple(saved.get("imports") or ()))
    for k, v in saved.items():
        config[k] = tuple(v) if isinstance(v, list) else v
    return config


def read_config_json(run_dir: str) -> dict:
    """config.json's fields as saved (JSON types). A garbage, empty or non-object config.json
    raises a one-line ValueError naming the file and the remedy: the checkpoints hold the
    run's config (:func:`check_config` checks a new command against it), so deleting the file
    and running the training command again restores it."""
    path = os.path.join(run_dir, CONFIG)
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not an object")
        return config
    except (ValueError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split()) or type(e).__name__
    saved = checkpoint_config(run_dir)
    if saved is None:
        raise ValueError(f"{path} is not a readable config ({problem}) and no checkpoint of the run holds "
                         f"its config; restore the file from a copy, or delete {run_dir} to train the run afresh")
    raise ValueError(f"{path} is not a readable config ({problem}); checkpoint step {saved[0]} holds the run's "
                     f"config: delete {path} and run the training command again, which checks the command "
                     f"against it and rewrites the file")


def import_recorded(run_dir: str) -> tuple[str, ...]:
    """Imports the user modules recorded in a run's config.json (none if it has no readable
    one); returns their names."""
    try:
        with open(os.path.join(run_dir, CONFIG)) as f:
            recorded = json.load(f).get("imports") or ()
    except (OSError, ValueError, AttributeError):
        return ()
    return user_modules.import_all(recorded)


def write_meta(run_dir: str, meta: Mapping) -> None:
    """Writes meta.json atomically: what a reader needs without the data, e.g.
    ``{"image_shape": [H, W, C], "train_size": N, "vaekl_commit": ..., "command": ...}``
    (see :func:`provenance` for the last two)."""
    atomic_write(os.path.join(run_dir, META), json.dumps(_jsonable_dict(meta), indent=2, sort_keys=True))


def read_meta(run_dir: str) -> dict:
    """meta.json's contents, or {} for a run written before it existed."""
    path = os.path.join(run_dir, META)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def provenance() -> dict:
    """``{"vaekl_commit": git HEAD of this checkout or None, "command": this process's argv}``."""
    import subprocess  # pylint: disable=g-import-not-at-top

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    return {"vaekl_commit": commit, "command": _command()}


def _command() -> str:
    return shlex.join([os.path.basename(sys.executable), *sys.argv])[:1000]


# ----------------------------------------------------------------------------------------
# metrics.jsonl.


class MetricsLog:
    """Append-only JSON-lines metrics file, safe against torn writes.

    Each :meth:`append` is one ``write()`` of whole lines followed by fsync. A crash can
    still leave a torn last line: :meth:`read` drops it with a warning (the checkpoints say
    where the run stands), :meth:`truncate` rewrites the file without it, and :meth:`append`
    cuts it off before writing. An invalid line anywhere else raises ValueError naming the
    file and line.
    """

    def __init__(self, path: str):
        self.path = path
        self.torn: bytes | None = None  # the torn last line the latest read() dropped

    def read(self) -> list[dict]:
        self.torn = None
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")  # the last item is b"" when the file ends with a newline
        rows = []
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if last or (i == len(lines) - 2 and not lines[-1].strip()):
                    LOG.warning("%s: dropping a torn last line (%s): %r", self.path, e, line[:80])
                    self.torn = line
                    continue
                raise ValueError(f"{self.path}, line {i + 1}: invalid metrics row ({e}): "
                                 f"{line[:80].decode(errors='replace')!r}") from None
            if last:  # valid JSON but no newline: the write was cut short
                LOG.warning("%s: dropping a torn last line (no newline): %r", self.path, line[:80])
                self.torn = line
                continue
            rows.append(row)
        return rows

    def truncate(self, max_step: int) -> None:
        """Drops rows logged after ``max_step`` (work a crash lost) and any torn line, atomically."""
        rows = [r for r in self.read() if r["step"] <= max_step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, rows: Iterable[Mapping]) -> None:
        text = "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows)
        data = text.encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line from a crash: cut it
                with open(self.path, "rb") as f:
                    keep = f.read().rfind(b"\n") + 1
                LOG.warning("%s: cutting a torn last line (%d bytes) before appending",
                            self.path, size - keep)
                os.ftruncate(fd, keep)
            while data:  # one write() normally; loop only on a partial write
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)


_STEP = re.compile(rb'"step":\s*(\d+)')


def check_torn_row(run_dir: str, resume_step: int | None) -> None:
    """Raises ValueError (one line) if metrics.jsonl ends in a torn line that resuming from
    ``resume_step`` would lose for good: a row at or before that step (a kill never tears a
    row the checkpoint covers, since rows are written before their checkpoint; outside damage
    can), or one whose step cannot be read. A torn row after ``resume_step`` is recomputed by
    the resumed run; with no checkpoint (None) every row is."""
    log = MetricsLog(os.path.join(run_dir, METRICS))
    rows = log.read()
    if log.torn is None or resume_step is None:
        return
    m = _STEP.search(log.torn)
    step = int(m.group(1)) if m else None
    if step is not None and step > resume_step:
        return
    what = f"a row of step {step}" if step is not None else "a row whose step is unreadable"
    last = f" (the last whole row is step {rows[-1].get('step')})" if rows else ""
    raise ValueError(f"{log.path}: its last line is torn, {what}{last}, and the run would resume from "
                     f"checkpoint step {resume_step}, losing that row for good; restore the file from a "
                     f"copy, or delete its last line to resume without the row, or delete {run_dir} to "
                     f"train the run again")


def read_metrics(run_dir: str) -> list[dict]:
    """metrics.jsonl's rows (one per logged step and split, a torn last line dropped; [] if
    none): the one reader of the file."""
    return MetricsLog(os.path.join(run_dir, METRICS)).read()


# ----------------------------------------------------------------------------------------
# Status.


def latest_checkpoint(run_dir: str) -> int | None:
    """The step of the newest committed checkpoint in ``run_dir`` (None if it has none).

    A step directory without orbax's commit files (an interrupted or emptied one) does not
    count; a committed but damaged one does (its restore falls back, see vaekl.checkpoints).
    """
    ckpt = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(ckpt):
        return None
    steps = [int(d) for d in os.listdir(ckpt)
             if d.isdigit() and os.path.exists(os.path.join(ckpt, d, "_CHECKPOINT_METADATA"))]
    return max(steps) if steps else None


def status(run_dir: str, config) -> str:
    """'done' (final checkpoint, final metrics of both splits and images), 'partial'
    (resumable from a checkpoint) or 'new'."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "new"
    rows = read_metrics(run_dir)
    final = {r["split"] for r in rows if r["step"] == config.num_steps}
    images = config.num_images == 0 or os.path.exists(os.path.join(run_dir, SAMPLES))
    if latest >= config.num_steps and final >= {"train", "test"} and images:
        return "done"
    return "partial"


def final_rows(run_dir: str, step: int) -> dict[str, dict]:
    """{split: row} of the metrics logged at ``step``."""
    return {r["split"]: r for r in read_metrics(run_dir) if r["step"] == step}


# ----------------------------------------------------------------------------------------
# The lock: one writer per run directory.

LOCKED_MARK = " is in use by "  # in every RunLocked message (launchers look for it in child errors)


class RunLocked(RuntimeError):
    """Another process holds the run directory's lock."""

    def __init__(self, run_dir: str, holder: dict | None):
        self.run_dir, self.holder = run_dir, holder or {}
        super().__init__(f"run directory {run_dir}{LOCKED_MARK}{describe_holder(self.holder)}; "
                         f"wait for it to finish or stop it")


def describe_holder(holder: Mapping) -> str:
    """'pid 123 on host since 12:00:00 (python -m experiments.train ...)' from lock-file contents."""
    if not holder.get("pid"):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {since} ({holder.get('command', '?')})"


_HELD: dict[str, list] = {}  # realpath → [fd, holder info, count]: the locks this process holds
_HELD_GUARD = threading.Lock()


def _read_holder(fd: int) -> dict:
    for _ in range(3):  # the holder writes its details right after locking: retry a torn read
        try:
            return json.loads(os.pread(fd, 8192, 0) or b"{}")
        except ValueError:
            time.sleep(0.05)
    return {}


class RunLock:
    """An exclusive advisory lock on a run directory: ``fcntl.flock`` on ``run_dir/.lock``.

    The kernel releases the lock when the holding process exits in any way (SIGKILL
    included), so it is never stale; the lock file holds the holder's pid, host, start time
    and command while it is held. Locks are per process and re-entrant within it (the
    launcher's and the trainer's acquisitions of one directory nest); exec'd child processes
    do not inherit them. Over NFS, Linux emulates flock with byte-range locks, which work
    across hosts. ::

        with runs.RunLock(run_dir):      # raises RunLocked naming the holder
            ...write the run...
    """

    def __init__(self, run_dir: str, grace: float = 0.5):
        """``grace``: seconds to retry before giving up (covers :func:`lock_holder` probes)."""
        self.run_dir, self.grace = run_dir, grace
        self._key = ""
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> RunLock:
        if self._held:
            return self
        if not os.path.isdir(self.run_dir):
            raise FileNotFoundError(f"cannot lock {self.run_dir}: no such directory")
        self._key = os.path.realpath(self.run_dir)
        with _HELD_GUARD:
            if self._key in _HELD:
                _HELD[self._key][2] += 1
                self._held = True
                return self
            fd = os.open(os.path.join(self.run_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            deadline = time.monotonic() + self.grace
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _read_holder(fd)
                        os.close(fd)
                        raise RunLocked(self.run_dir, holder) from None
                    time.sleep(0.02)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                    "command": _command()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _HELD[self._key] = [fd, info, 1]
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with _HELD_GUARD:
            entry = _HELD[self._key]
            entry[2] -= 1
            if entry[2] == 0:
                del _HELD[self._key]
                os.ftruncate(entry[0], 0)
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_holder(run_dir: str) -> dict | None:
    """None if nobody holds ``run_dir``'s lock; else the holder's details (pid, host, since,
    command; {} if unreadable). This process's own locks count as held."""
    with _HELD_GUARD:
        if os.path.realpath(run_dir) in _HELD:
            return dict(_HELD[os.path.realpath(run_dir)][1])
    try:
        fd = os.open(os.path.join(run_dir, LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:  # a shared lock for an instant: fails only while a writer holds the exclusive one
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------
# Images.


def image_grid(images: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """[N, H, W, C] floats in [0, 1] → one uint8 [rows·(H+1)+1, cols·(W+1)+1, C] grid."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.float32)
    for i, img in enumerate(np.clip(images, 0.0, 1.0)):
        r, col = divmod(i, ncols)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = img
    return np.round(grid * 255).astype(np.uint8)


def save_png(path: str, images: np.ndarray, ncols: int | None = None, scale: int = 4) -> None:
    """Writes an image grid as a PNG, each pixel enlarged ``scale`` times (atomically)."""
    grid = image_grid(images, ncols)
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    os.replace(tmp, path)
