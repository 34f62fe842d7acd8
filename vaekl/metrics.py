"""Every logged quantity, declared once: its name, its shape (scalar or per latent dimension), its
meaning. metrics.jsonl rows, TensorBoard and eval.json are built from these declarations, and a
value without a declaration is an error, never silently dropped.

A module that computes a metric declares it next to the code (``declare("kl", "…")``); the
regularizers declare theirs in their registry entry. All amounts are nats per example unless a
declaration says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Metric:
    """A logged quantity: ``per_dim`` metrics are lists of k numbers (one per latent dimension)."""

    name: str
    doc: str
    per_dim: bool = False
    integer: bool = False
    title: str = ""  # in figures and reports, with its unit (e.g. "KL [nats]"); the name if empty


REGISTRY: dict[str, Metric] = {}


def declare(name: str, doc: str, per_dim: bool = False, integer: bool = False, title: str = "") -> Metric:
    """Declares a metric (idempotent for an identical declaration); ``title`` is how figures
    and reports name it."""
    m = Metric(name, doc, per_dim, integer, title)
    old = REGISTRY.get(name)
    if old is not None and old != m:
        raise ValueError(f"metric {name!r} is declared twice, differently: {old} and {m}")
    REGISTRY[name] = m
    return m


def get(name: str) -> Metric:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not declared (vaekl.metrics.declare); "
                       f"declared: {sorted(REGISTRY)}") from None


def title(name: str) -> str:
    """A metric's declared title; its name when it has none or is not declared."""
    m = REGISTRY.get(name)
    return m.title if m is not None and m.title else name


def scalars(values: Mapping[str, Any]) -> list[str]:
    """The names in ``values`` that are declared scalars (each name must be declared)."""
    return [k for k in values if not get(k).per_dim]


def row(step: int, split: str, values: Mapping[str, Any], latent_dim: int | None = None) -> dict:
    """One metrics.jsonl row: {step, split, every value}, per-dim values cut to ``latent_dim``.

    Every key of ``values`` must be declared; non-finite floats are kept (as JSON strings by
    the writer), never dropped.
    """
    out: dict[str, Any] = {"step": int(step), "split": split}
    for name, value in values.items():
        m = get(name)
        a = np.asarray(value)
        if m.per_dim:
            a = a.reshape(-1)[:latent_dim] if latent_dim is not None else a.reshape(-1)
            out[name] = [float(v) for v in a]
        elif m.integer:
            out[name] = int(a)
        else:
            out[name] = float(a)
    return out


def tensorboard_scalars(r: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of a row, tagged ``split/name``, for TensorBoard."""
    return {f"{r['split']}/{k}": float(v) for k, v in r.items()
            if k in REGISTRY and not REGISTRY[k].per_dim
            and isinstance(v, (int, float)) and math.isfinite(float(v))}


def tensorboard_histograms(r: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The per-dimension entries of a row, tagged ``split/name``, for TensorBoard histograms
    (those with a non-finite value, e.g. the NaN closed-form terms of a mixture prior, left out)."""
    return {f"{r['split']}/{k}": np.asarray(v, np.float64) for k, v in r.items()
            if k in REGISTRY and REGISTRY[k].per_dim and len(v)
            and np.all(np.isfinite(np.asarray(v, np.float64)))}
