"""A run directory: config.json, metrics.jsonl, TensorBoard events and PNG image grids.

``metrics.jsonl`` is the source of truth: one JSON object per logged (step, split),
loadable with ``pandas.read_json(path, lines=True)``. On resume it is cut back to the
restored checkpoint's step, so that no step is duplicated or missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import json
import logging as pylogging
import math
import os

from absl import logging
import numpy as np
from PIL import Image

# Fields that may change between a run and its resumption (they do not change the model).
RESUMABLE_CHANGES = ("num_steps", "eval_every", "log_every", "checkpoint_every",
                     "keep_checkpoints", "num_images")


def _jsonable(value):
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "tolist"):
        value = np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def check_config(workdir: str, config: Mapping) -> None:
    """Raises ValueError if ``workdir`` holds a run with a config that cannot be resumed as ``config``."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(json.dumps(_jsonable_dict(config)))
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            diffs = ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in changed)
            raise ValueError(f"{workdir} holds a run with a different config ({diffs}); "
                             f"use a new --workdir or the original config")


def write_config(workdir: str, config: Mapping) -> None:
    """Writes config.json, after :func:`check_config`."""
    check_config(workdir, config)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable_dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _jsonable_dict(config: Mapping) -> dict:
    return {k: _jsonable(v) for k, v in dict(config).items()}


class MetricsLog:
    """Append-only JSON-lines metrics file."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, max_step: int) -> None:
        """Drops rows logged after ``max_step`` (work a crash lost), atomically."""
        rows = [r for r in self.read() if r["step"] <= max_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def append(self, rows: Iterable[Mapping]) -> None:
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
    """Writes an image grid as a PNG, each pixel enlarged ``scale`` times."""
    grid = image_grid(images, ncols)
    grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def quiet_library_logs() -> None:
    """Shows vaekl's INFO lines (progress) on stderr, and only warnings from libraries
    (orbax logs every checkpoint file operation at INFO through the same absl logger)."""
    logging.set_verbosity(logging.INFO)
    logging.set_stderrthreshold(logging.INFO)

    def keep(record) -> bool:
        path = record.pathname.replace("\\", "/")
        return record.levelno >= pylogging.WARNING or any(
            f"/{d}/" in path for d in ("vaekl", "experiments", "launch"))

    logging.get_absl_logger().addFilter(keep)
    logging.get_absl_handler().addFilter(keep)  # records of libraries using std logging
