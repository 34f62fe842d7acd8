"""Sweep definitions: grids of config overrides, stable run names, run status, grouping.

A sweep is written ``"beta=0.5,1,4 latent_dim=2,8 seed=0,1"``: the product of the listed
values of each field, in the order given. Values are cast to the type of the field in the
base config. Each point gets the readable, stable name ``beta=0.5,latent_dim=2,seed=0``.
"""

from __future__ import annotations

import ast
import itertools
import math
import os
import traceback
from typing import Any

from absl import logging
import ml_collections

from vaekl import rundir
from vaekl import config as config_lib


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
    """
    axes = []
    for item in spec.split():
        field, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"sweep: expected FIELD=V1,V2,... but got {item!r}")
        if field not in base:
            raise ValueError(f"sweep: unknown config field {field!r}")
        if any(field == f for f, _ in axes):
            raise ValueError(f"sweep: field {field!r} is given twice")
        sep = ";" if isinstance(base[field], tuple) else ","
        axes.append((field, [_cast(field, v, base[field]) for v in values.split(sep)]))
    return [dict(zip([f for f, _ in axes], point)) for point in itertools.product(*[v for _, v in axes])]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def run_name(overrides: dict[str, Any]) -> str:
    """``beta=4,latent_dim=8,seed=0``: the point's fields in sweep order (``base`` if none)."""
    return ",".join(f"{k}={_fmt(v)}" for k, v in overrides.items()) or "base"


def apply(base: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    for k, v in overrides.items():
        config[k] = v
    config_lib.validate(config)
    return config


def status(workdir: str, config: ml_collections.ConfigDict) -> str:
    """'done' (final checkpoint, metrics and images), 'partial' (resumable) or 'new'."""
    latest = latest_checkpoint(workdir)
    if latest is None:
        return "new"
    rows = rundir.MetricsLog(os.path.join(workdir, "metrics.jsonl")).read()
    final = {r["split"] for r in rows if r["step"] == config.num_steps}
    images = config.num_images == 0 or os.path.exists(os.path.join(workdir, "samples.png"))
    if latest >= config.num_steps and final == {"train", "test"} and images:
        return "done"
    return "partial"


def latest_checkpoint(workdir: str) -> int | None:
    """The step of the newest checkpoint in ``workdir`` (None if it has none)."""
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps) if steps else None


def groups(configs: list[ml_collections.ConfigDict], max_size: int,
           starts: list[int | None] | None = None) -> list[list[int]]:
    """Indices of runs that can share one vmapped program, in chunks of at most ``max_size``.

    Runs share a program when they differ only in β, k and seed and, if ``starts`` (their
    latest checkpoint steps) is given, resume from the same step: a partly trained run is
    never grouped with a new one (which would restart it). Within a chunk, runs are ordered
    by latent_dim so that padding to the largest k wastes little when a grid is split.
    """
    from vaekl.train import group_key  # pylint: disable=g-import-not-at-top

    starts = starts or [None] * len(configs)
    by_key: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        by_key.setdefault(group_key(c) + f"@{starts[i]}", []).append(i)
    out = []
    for members in by_key.values():
        members = sorted(members, key=lambda i: configs[i].latent_dim)
        n_chunks = math.ceil(len(members) / max_size)
        size = math.ceil(len(members) / n_chunks)
        out += [members[j:j + size] for j in range(0, len(members), size)]
    return out


def bytes_per_run(config: ml_collections.ConfigDict, num_params: int, image_size: int) -> int:
    """A generous estimate of one vmapped run's device memory, in bytes.

    Parameters, gradients and Adam's two moments (4 copies of float32), plus activations of a
    training batch and of an evaluation batch (inputs, every layer's width, both passes).
    """
    widths = sum(config.encoder_hidden) + sum(config.decoder_hidden) + 4 * config.latent_dim
    if config.model == "conv":
        widths += 2 * image_size * sum(config.conv_channels)
    act = (config.batch_size + config.eval_batch_size) * (3 * image_size + 2 * widths)
    return 4 * (4 * num_params + 2 * act)


def fitting_group_size(configs: list[ml_collections.ConfigDict], ds) -> int:
    """How many of these runs fit in half the device's free memory, by :func:`bytes_per_run`."""
    import jax  # pylint: disable=g-import-not-at-top
    from vaekl import train  # pylint: disable=g-import-not-at-top

    big = max(configs, key=lambda c: c.latent_dim)
    _, state, _ = train.create(big, ds.image_shape, ds.train_images)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    per_run = bytes_per_run(big, n_params, math.prod(ds.image_shape))
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, int(0.5 * free // per_run))


def run_groups(configs: list[dict], workdirs: list[str], max_group: int = 0) -> list[str | None]:
    """Trains runs as vmapped groups that fit the device (at most ``max_group`` runs each, if
    > 0); for each run None, or the error that stopped it. Failures do not stop other runs.

    Takes plain dicts so that Slurm tasks (submitit) can pickle the call.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from vaekl import data, train  # pylint: disable=g-import-not-at-top

    configs = [ml_collections.ConfigDict(c) for c in configs]
    errors: list[str | None] = [None] * len(configs)
    starts = [latest_checkpoint(w) for w in workdirs]
    for idx in groups(configs, max_size=len(configs), starts=starts):
        first = configs[idx[0]]
        try:
            ds = data.load(first.dataset, first.data_dir or None, test_fraction=first.test_fraction,
                           seed=first.data_seed)
        except Exception as e:  # pylint: disable=broad-except
            for i in idx:
                errors[i] = f"{type(e).__name__}: {e}"
            continue
        limit = max_group or fitting_group_size([configs[i] for i in idx], ds)
        for chunk in groups([configs[i] for i in idx], limit, [starts[i] for i in idx]):
            members = [idx[j] for j in chunk]
            logging.info("training %d run(s) in one program: %s", len(members),
                         ", ".join(os.path.basename(workdirs[i]) for i in members))
            try:
                results = train.train_group([configs[i] for i in members], [workdirs[i] for i in members],
                                            dataset=ds)
            except Exception as e:  # pylint: disable=broad-except
                logging.error("group failed: %s", traceback.format_exc())
                results = [e] * len(members)
            for i, r in zip(members, results):
                errors[i] = f"{type(r).__name__}: {r}" if isinstance(r, Exception) else None
            jax.clear_caches()
    return errors
