"""Sweep definitions: grids of config overrides, exact and safe run names, grouping.

A sweep is written ``"beta=0.5,1,4 latent_dim=2,8 seed=0,1"``: the product of the listed
values of each field, in the order given. Values are cast to the type of the field in the
base config. Each point gets the readable, stable name ``beta=0.5,latent_dim=2,seed=0``:
floats by their shortest round-tripping repr (``0.1234567`` and ``0.1234568`` differ; ``1``
and ``1.0`` of a float field are one value, written ``1``), and every name is one safe path
component (see :func:`run_name`). A grid with two points of one value, one name or one
config is refused before anything is written (:func:`points`).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
import difflib
import hashlib
import itertools
import json
import logging as pylogging
import math
import os
import traceback
from typing import Any

import jax
import ml_collections

from vaekl import config as config_lib
from vaekl import data, loops, rundir, sharding, train, user_modules
from vaekl.models import architectures

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

# Run status and checkpoints: the run directory's business (kept here as aliases).
status = rundir.status
latest_checkpoint = rundir.latest_checkpoint

NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._=,+-")
VALUE_CHARS = NAME_CHARS - {"=", ","}  # '=' and ',' separate a name's fields
MAX_NAME = 200  # bytes; longer names keep a readable prefix and add a hash


def _cast(field: str, text: str, like: Any) -> Any:
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(like, int):
            value = float(text)
            if value != int(value):
                raise ValueError
            return int(value)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, tuple):
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
        return text
    except (ValueError, SyntaxError):
        raise ValueError(f"sweep: {field}={text!r} is not a valid {type(like).__name__}") from None


def parse(spec: str, base: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The grid of overrides that ``spec`` describes (one dict per point, product order).

    Tuple-valued fields take values separated by ';' (``encoder_hidden=(64,);(128,128)``).
    A field listing one value twice (``beta=1,1.0``) is refused.
    """
    axes = []
    for item in spec.split():
        field, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"sweep: expected FIELD=V1,V2,... but got {item!r}")
        if field not in base:
            near = difflib.get_close_matches(field, [str(k) for k in base.keys()], n=1)
            raise ValueError(f"sweep: unknown config field {field!r} in {item!r}; "
                             + (f"did you mean {near[0]}?" if near else "the fields are the config's"))
        if any(field == f for f, _ in axes):
            raise ValueError(f"sweep: field {field!r} is given twice")
        sep = ";" if isinstance(base[field], tuple) else ","
        texts = values.split(sep)
        cast = [_cast(field, v, base[field]) for v in texts]
        for i, j in itertools.combinations(range(len(cast)), 2):
            if cast[i] == cast[j]:
                raise ValueError(f"sweep: points {field}={texts[i]} and {field}={texts[j]} are the same "
                                 f"run ({field}={_fmt(cast[i])}); list each value once")
        axes.append((field, cast))
    return [dict(zip([f for f, _ in axes], point)) for point in itertools.product(*[v for _, v in axes])]


def _fmt(value: Any) -> str:
    """A value as written in a run name: exact, before escaping."""
    if isinstance(value, float):
        text = repr(value)  # the shortest string that reads back as the same float
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, tuple):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def _escape(text: str, allowed: frozenset[str]) -> str:
    """Percent-encodes (UTF-8) every character outside ``allowed``, and '%' itself."""
    return "".join(c if c in allowed else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def run_name(overrides: dict[str, Any]) -> str:
    """``beta=4,latent_dim=8,seed=0``: the point's fields in sweep order (``base`` if none).

    The name is one safe path component: characters outside ``[A-Za-z0-9._+-]`` in values
    (and '=' or ',') are percent-encoded (``data_dir=/x/../y`` → ``data_dir=%2Fx%2F..%2Fy``),
    a leading dot is encoded, and a name longer than MAX_NAME bytes keeps a readable prefix
    followed by '+' and 16 hex digits of its SHA-256. Distinct points get distinct names.
    """
    name = ",".join(f"{k}={_escape(_fmt(v), VALUE_CHARS)}" for k, v in overrides.items()) or "base"
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 40]}+{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def apply(base: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    for k, v in overrides.items():
        config[k] = v
    config_lib.validate(config)
    return config


def points(spec: str, base: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any], ml_collections.ConfigDict]]:
    """(name, overrides, validated config) of every point of the grid; nothing is written.

    Raises:
      ValueError (one line): a bad spec or value, a point whose config is invalid, or two
        points with one run name or identical configs.
    """
    out, by_name, by_config = [], {}, {}
    for overrides in parse(spec, base):
        name = run_name(overrides)
        try:
            config = apply(base, overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep point {name}: {e}") from None
        key = json.dumps(config.to_dict(), sort_keys=True, default=repr)
        for seen, what in ((by_name, name), (by_config, key)):
            if what in seen:
                problem = "one run directory" if seen is by_name else "identical configs"
                raise ValueError(f"sweep: points {_describe(seen[what])} and {_describe(overrides)} "
                                 f"give {problem} ({name}); list each point once")
            seen[what] = overrides
        out.append((name, overrides, config))
    return out


def _describe(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in overrides.items()) or "base"


def groups(configs: list[ml_collections.ConfigDict], max_size: int,
           starts: list[int | None] | None = None, multiple: int = 1,
           together: list[list[int]] | None = None) -> list[list[int]]:
    """Indices of runs that can share one vmapped program, in chunks of at most ``max_size``.

    Runs share a program when they differ only in β, k and seed and, if ``starts`` (their
    latest checkpoint steps) is given, resume from the same step: a partly trained run is
    never grouped with a new one (which would restart it). Within a chunk, runs are ordered
    by latent_dim so that padding to the largest k wastes little when a grid is split.
    A split grid's chunks are multiples of ``multiple`` (the devices a program's run axis is
    padded to) where ``max_size`` allows: 10 runs, at most 8, on 4 devices → 8 + 2.

    ``together``: lists of runs that stay one group, in their order (a group that a kill
    interrupted, :func:`resume_plan`), where they share a key and start and fit ``max_size``.
    The result depends only on its arguments.
    """

    starts = starts or [None] * len(configs)
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_key.setdefault(train.group_key(c) + f"@{starts[i]}", []).append(i)
    out = []
    for members in by_key.values():
        kept = [list(t) for t in together or () if set(t) <= set(members) and len(t) <= max_size]
        out += kept
        taken = {i for t in kept for i in t}
        members = sorted((i for i in members if i not in taken), key=lambda i: configs[i].latent_dim)
        if not members:
            continue
        n_chunks = math.ceil(len(members) / max_size)
        size = math.ceil(len(members) / n_chunks)
        if n_chunks > 1:
            size = min(max_size, math.ceil(size / multiple) * multiple)
        out += [members[j:j + size] for j in range(0, len(members), size)]
    return out


def bytes_per_run(config: ml_collections.ConfigDict, num_params: int, image_size: int) -> int:
    """A generous estimate of one vmapped run's device memory, in bytes.

    Parameters, gradients and Adam's two moments (4 copies of float32), plus activations of a
    training batch and of an evaluation batch (inputs, every layer's width, both passes), plus
    the β-TCVAE split that every training step and evaluation batch computes: a [B, B, k]
    float32 table (and its logsumexp), for each of up to ``loops.CPU_UNROLL_BATCHES``
    evaluation batches that XLA:CPU may hold at once when it unrolls them.
    """

    widths = sum(config.encoder_hidden) + sum(config.decoder_hidden) + 4 * config.latent_dim
    extra = architectures.get(config.model).activation_floats  # e.g. the conv layers' outputs
    widths += extra(config, image_size) if extra else 0
    act = (config.batch_size + config.eval_batch_size) * (3 * image_size + 2 * widths)
    tc = 2 * config.latent_dim * (config.batch_size ** 2 + loops.CPU_UNROLL_BATCHES * config.eval_batch_size ** 2)
    return 4 * (4 * num_params + 2 * act + tc)


# The memory the planner assumes on hosts whose devices share the host's memory (CPU): fixed,
# so that a sweep is grouped the same way on every CPU host, whatever it has free or in all.
CPU_MEMORY_BYTES = 8 * 2**30


def fitting_group_size(configs: list[ml_collections.ConfigDict], ds, devices=None) -> int:
    """How many of these runs fit in half the memory of ``devices`` together (default: this
    process's), by :func:`bytes_per_run`, after one copy of the images per device; a multiple
    of the device count once at least that many fit (a program's run axis is padded to one).

    Deterministic: it depends only on the configs, the dataset and the devices' kind, count
    and total memory, never on what is free at the moment, so that a sweep and its relaunches
    are grouped alike. Devices with memory of their own (GPU, TPU) add up their allocators'
    limits (``bytes_limit``), every process's counted like this one's; devices that share the
    host's memory (CPU) count :data:`CPU_MEMORY_BYTES` once, on any host.
    """

    devices = list(devices) if devices is not None else jax.local_devices()
    big = max(configs, key=lambda c: c.latent_dim)
    _, state, _ = train.create(big, ds.image_shape, ds.train_images)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    per_run = bytes_per_run(big, n_params, math.prod(ds.image_shape))
    images = sum(getattr(a, "nbytes", 0) for a in (ds.train_images, ds.test_images))
    local = [d for d in devices if d.process_index == jax.process_index()] or jax.local_devices()
    stats = [d.memory_stats() or {} for d in local]
    if all("bytes_limit" in s for s in stats):
        free = len(devices) * (min(s["bytes_limit"] for s in stats) - images)
    else:
        free = CPU_MEMORY_BYTES - len(local) * images
    n = max(1, int(0.5 * free // per_run))
    return n - n % len(devices) if n >= len(devices) else n


def check_run(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """None if ``workdir`` can be trained as ``config``, else why not, in one line naming the
    run directory: an unreadable or different config.json, a metrics.jsonl with an invalid
    line before its last or a torn last row that resuming would lose, or a num_steps change
    the run's schedules forbid. Reads only."""

    checks = ((rundir.CONFIG, lambda: rundir.check_config(workdir, config.to_dict())),
              (rundir.METRICS, lambda: rundir.MetricsLog(os.path.join(workdir, rundir.METRICS)).read()),
              (rundir.CONFIG, lambda: train.check_extension(workdir, config)),  # pylint: disable=protected-access
              (rundir.METRICS, lambda: train.check_metrics(workdir)))
    for name, check in checks:
        try:
            check()
        except Exception as e:  # pylint: disable=broad-except  (a broken directory fails its run only)
            text = " ".join(str(e).split())
            where = "" if workdir in text else f"{os.path.join(workdir, name)}: "
            return f"{type(e).__name__}: {where}{text}"
    return None


def resume_plan(workdirs: list[str]) -> tuple[list[int | None], list[list[int]]]:
    """(each run's resume step or None, the groups that must be trained together again).

    A run's step is its latest checkpoint, or its group's last committed step when a kill
    left it newer (vaekl.train.GROUP_COMMIT). Runs whose markers name the same group, all of
    them present here, form one group again, in their order, resuming from the earliest of
    their steps; reads only.
    """

    starts = [latest_checkpoint(w) for w in workdirs]
    markers = [train.read_group_commit(w) if s is not None else None for w, s in zip(workdirs, starts)]
    for i, m in enumerate(markers):
        if m is not None and m["step"] < starts[i]:
            starts[i] = m["step"]
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    index = {n: i for i, n in enumerate(names)}
    together: list[list[int]] = []
    if len(index) != len(names):
        return starts, together
    taken: set[int] = set()
    for i, m in enumerate(markers):
        if m is None or i in taken or len(m["members"]) < 2 or not all(n in index for n in m["members"]):
            continue
        idx = [index[n] for n in m["members"]]
        if len(set(idx)) != len(idx) or taken & set(idx) or any(
                markers[j] is None or markers[j]["members"] != m["members"] for j in idx):
            continue
        step = min(starts[j] for j in idx)
        for j in idx:
            starts[j] = step
        taken.update(idx)
        together.append(idx)
    return starts, together


def run_groups(configs: list[dict], workdirs: list[str], max_group: int = 0, devices: int = 0,
               data_parallel: bool | None = None, distributed: bool | None = None, report: bool = False,
               on_program: Callable[[list[int], dict, list[str | None]], None] | None = None) -> list:
    """Trains runs as vmapped groups that fit the devices (at most ``max_group`` runs each, if
    > 0); for each run None, or the error that stopped it. Failures do not stop other runs.

    Each group is one program on ``devices`` devices (0: every visible one), its runs sharded
    over them, padded to a multiple of their count; a group with fewer runs than devices
    shards its batch instead (``data_parallel``: :func:`vaekl.sharding.layout`).

    A run whose directory is broken (:func:`check_run`) fails alone, before any group is
    planned; an error while planning a group (its data, its size, its placement) fails only
    that group's runs. Groups that a kill interrupted are planned again as they were
    (:func:`resume_plan`), and group sizes do not depend on free memory
    (:func:`fitting_group_size`), so that a relaunch trains every run as before.

    With ``distributed`` (default: when this process is one of several tasks of a Slurm job
    step), ``jax.distributed`` is initialised first, every process of the job makes this same
    call, each program spans every process's devices, and each process trains and writes
    only the runs its devices hold.

    Takes plain dicts so that Slurm tasks (submitit) can pickle the call.

    Returns:
      For each run, None or its error (one line); with ``report``, a dict per run: "error", "written"
      (whether this process trained it) and "program" (the placement's summary, or None).
      ``on_program(run indices, summary, their errors)`` is called after each program.
    """

    if distributed if distributed is not None else sharding.slurm_tasks() > 1:
        sharding.initialize_distributed()

    for c in configs:  # a Slurm task is a fresh process: the runs' user modules first
        user_modules.import_all(c.get("imports"))
    configs = [ml_collections.ConfigDict(c) for c in configs]
    errors: list[str | None] = [check_run(c, w) for c, w in zip(configs, workdirs)]
    written, programs = [False] * len(configs), [None] * len(configs)
    starts, together = resume_plan(workdirs)
    if jax.process_count() > 1:  # every process plans from the first one's view
        first_view = sharding.all_processes([-1 if s is None else s for s in starts])[0]
        starts = [None if s < 0 else int(s) for s in first_view]
    devs = sharding.devices(devices)
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        if errors[i] is None:
            by_key.setdefault(train.group_key(c) + f"@{starts[i]}", []).append(i)
    for idx in by_key.values():
        first, ds, limit, problem = configs[idx[0]], None, max_group, None
        try:
            ds = data.for_config(first)
            limit = max_group or fitting_group_size([configs[i] for i in idx], ds, devs)
        except Exception as e:  # pylint: disable=broad-except
            problem, limit = f"{type(e).__name__}: {e}", 0
        if not max_group:  # every process calls this, whatever happened here
            limit = int(sharding.all_processes([limit]).min())
        chunks: list[list[int]] = []
        if problem is None:
            try:
                if limit < 1:
                    raise RuntimeError("another process could not plan this group")
                local = [[idx.index(j) for j in t] for t in together if set(t) <= set(idx)]
                chunks = groups([configs[i] for i in idx], limit, [starts[i] for i in idx],
                                multiple=len(devs), together=local)
            except Exception as e:  # pylint: disable=broad-except
                problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            for i in idx:
                errors[i] = " ".join(problem.split())
            continue
        for chunk in chunks:
            members = [idx[j] for j in chunk]
            try:
                placement = sharding.plan(len(members), devs, data_parallel=data_parallel,
                                          batch_size=first.batch_size,
                                          latent_dim=max(configs[i].latent_dim for i in members))
            except Exception as e:  # pylint: disable=broad-except
                for i in members:
                    errors[i] = f"{type(e).__name__}: {' '.join(str(e).split())}"
                continue
            mine = [members[j] for j in placement.local_runs]  # the runs this process writes
            LOG.info("training %s in one program: %s", placement.describe(),
                     ", ".join(os.path.basename(workdirs[i]) for i in members))
            try:
                with sharding.use(placement):
                    results = train.train_group([configs[i] for i in mine], [workdirs[i] for i in mine],
                                                dataset=ds,
                                                group=[os.path.basename(os.path.normpath(workdirs[i]))
                                                       for i in members])
            except Exception as e:  # pylint: disable=broad-except
                LOG.error("group failed: %s", traceback.format_exc())
                results = [e] * len(mine)
            for i, r in zip(mine, results):
                errors[i] = f"{type(r).__name__}: {' '.join(str(r).split())}" if isinstance(r, Exception) else None
                written[i] = True
            for i in members:
                programs[i] = placement.summary()
            if on_program is not None:
                on_program(members, placement.summary(), [errors[i] for i in members])
            jax.clear_caches()
    if not report:
        return errors
    return [{"error": e, "written": w, "program": p} for e, w, p in zip(errors, written, programs)]
