"""Sweep analysis: load run directories into pandas, group runs by what differs, draw figures.

A sweep is any set of run directories (config.json + metrics.jsonl; optionally eval.json and
meta.json). Runs are grouped by EVERY config field whose value differs between them
(:func:`varying_fields`); the seed is the only axis ever averaged. In figures the x-axis is
the numeric varying field with most values (β when it varies, :func:`x_field`), each other
combination of varying fields is a curve (or a heatmap row), and seeds are faint points
around a mean with ±std error bars.

Every figure function takes the DataFrame of :func:`load_sweep` and returns a matplotlib
Figure; amounts are nats per example. Optional files and columns may be missing: what is not
there is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import json
import math
import os
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
from matplotlib.ticker import NullFormatter, NullLocator  # pylint: disable=g-import-not-at-top
import numpy as np
import pandas as pd

from vaekl import config as config_lib
from vaekl import data, disentanglement, rundir
from vaekl import metrics as metrics_lib
from vaekl import runs as runs_lib
SEED = "seed"
TERMS = ("kl_trace", "kl_mahalanobis", "kl_log_det_ratio", "kl_dim")
KEYS = ("run", "step", "split")          # metrics.jsonl columns that are not metrics
EVAL_PREFIX, DIS_PREFIX = "eval_", "dis_"  # eval.json scalars and its `disentanglement` object
SHORT = {"beta": "β", "latent_dim": "k"}
CURVE_METRICS = ("loss", "neg_elbo", "kl", "beta_weight", "recon")  # first panels of training_curves
_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
              "infinity": math.inf, "-infinity": -math.inf}
_MARKERS = "osD^vP*Xph<>"


# ----------------------------------------------------------------------------------------
# Loading.


def _clean(value: Any) -> Any:
    """JSON value → float for the strings rundir writes for non-finite numbers ("nan")."""
    if isinstance(value, str) and value.lower() in _NONFINITE:
        return _NONFINITE[value.lower()]
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _hashable(value: Any) -> Any:
    """Config values as hashable, comparable cells: lists → tuples, dicts → sorted JSON."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def spread(values: Iterable[float]) -> dict[str, float]:
    """{"mean", "min", "max"} of ``values`` (e.g. one metric over seeds)."""
    v = np.asarray(list(values), np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def read_json(path: str) -> dict:
    """The JSON object in ``path``; {} if the file is missing, unreadable or not an object."""
    return runs_lib.json_object(path)


def metrics_rows(run_dir: str) -> list[dict]:
    """A run's metrics.jsonl rows (:meth:`vaekl.runs.Run.metrics`) with "nan"/"inf" strings
    as floats; rows without a step and a split are left out."""
    return [{k: _clean(v) for k, v in row.items()} for row in runs_lib.Run(run_dir).metrics()
            if "step" in row and "split" in row]


def run_dirs(path: str) -> list[str]:
    """``[path]`` if it is a run directory (has config.json), else its subdirectories that
    hold config.json and metrics.jsonl, sorted by name (:func:`vaekl.runs.find`)."""
    return [r.path for r in runs_lib.find(path, need_metrics=True)]


def load_run(run_dir: str) -> pd.DataFrame:
    """One run's metrics.jsonl, one row per (step, split), with a ``run`` column, its config
    fields as extra columns (a metric of the same name wins) and eval.json's numbers as
    ``eval_<name>`` (``dis_<name>`` for its `disentanglement` object).

    ``df.attrs`` keeps the run's config, eval.json and meta.json under "configs", "evals" and
    "meta" (dicts keyed by run name).
    """
    name = os.path.basename(os.path.normpath(run_dir))
    run = runs_lib.Run(run_dir)
    config = {k: _hashable(v) for k, v in run.config_json.items()}
    evals = run.eval
    df = pd.DataFrame.from_records(metrics_rows(run_dir))
    extra = {k: v for k, v in config.items() if k not in df.columns and k not in KEYS}
    for k, v in evals.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            extra[EVAL_PREFIX + k] = float(v)
    for k, v in (evals.get("disentanglement") or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            extra[DIS_PREFIX + k] = float(v)
    df = pd.concat([df, pd.DataFrame({k: [v] * len(df) for k, v in extra.items()}, index=df.index)],
                   axis=1)
    df["run"] = name
    df.attrs = {"configs": {name: config}, "evals": {name: evals},
                "meta": {name: run.meta},
                "dirs": {name: os.path.abspath(run_dir)}}
    return df


def load_sweep(sweep_dir: str) -> pd.DataFrame:
    """All runs under ``sweep_dir`` (or the single run ``sweep_dir`` itself, if it holds a
    config.json): one row per run, step and split. ``attrs`` as in :func:`load_run`."""
    dirs = run_dirs(sweep_dir)
    if not dirs:
        raise FileNotFoundError(f"no runs (config.json + metrics.jsonl) under {sweep_dir}")
    frames = [load_run(d) for d in dirs]
    kept = [f for f in frames if len(f)]
    if not kept:
        raise FileNotFoundError(f"no metrics rows in the runs under {sweep_dir}")
    df = pd.concat(kept, ignore_index=True)
    df.attrs = {key: {k: v for f in kept for k, v in f.attrs[key].items()}
                for key in ("configs", "evals", "meta", "dirs")}
    return df


def _default_config_fields() -> list[str]:
    return list(config_lib.defaults().keys())


def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (index: run name, in order of appearance), its config fields as
    columns; from ``df.attrs`` when present, else from the config columns of ``df``."""
    runs = list(dict.fromkeys(df.run))
    configs = df.attrs.get("configs") or {}
    if runs and all(r in configs for r in runs):
        return pd.DataFrame.from_records([configs[r] for r in runs], index=pd.Index(runs, name="run"))
    fields = [f for f in _default_config_fields() if f in df.columns]
    first = df.groupby("run", sort=False).first()
    return first.loc[runs, fields] if fields else pd.DataFrame(index=pd.Index(runs, name="run"))


def config_fields(df: pd.DataFrame) -> list[str]:
    """The config field names of the runs in ``df``."""
    return list(run_table(df).columns)


# ----------------------------------------------------------------------------------------
# What differs between runs.


def _run_name_order(names: Iterable[str]) -> dict[str, int]:
    """field → position in sweep run names like ``beta=4,latent_dim=8,seed=0``."""
    order: dict[str, int] = {}
    for name in names:
        for i, part in enumerate(str(name).split(",")):
            field, sep, _ = part.partition("=")
            if sep and field:
                order.setdefault(field, i)
    return order


def _distinct(series: pd.Series) -> list:
    """Distinct values in order of first appearance; NaN (a field a run lacks) counts once."""
    out, seen_nan = [], False
    for v in series:
        if _is_nan(v):
            if not seen_nan:
                out.append(v)
                seen_nan = True
        elif v not in out:
            out.append(v)
    return out


def _is_nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def varying_fields(df_or_configs: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[str]:
    """Config fields whose values differ between runs, the seed excluded.

    Args:
      df_or_configs: a :func:`load_sweep` DataFrame, a :func:`run_table`, or config dicts.
    Returns:
      Field names in sweep order (as they appear in run names), then β, k, the rest sorted.
    """
    names: list[str] = []
    if isinstance(df_or_configs, pd.DataFrame):
        if "run" in df_or_configs.columns:
            table = run_table(df_or_configs)
            names = list(table.index)
        else:
            table = df_or_configs
            names = [str(i) for i in table.index]
    else:
        table = pd.DataFrame.from_records([{k: _hashable(v) for k, v in dict(c).items()}
                                           for c in df_or_configs])
    fields = [f for f in table.columns if f != SEED and len(_distinct(table[f])) > 1]
    order = _run_name_order(names)
    first = {"beta": 0, "latent_dim": 1}
    return sorted(fields, key=lambda f: (f not in order, order.get(f, 0), first.get(f, 2), f))


def _numeric(values: Iterable) -> bool:
    vals = [v for v in values if not _is_nan(v)]
    return bool(vals) and all(isinstance(v, (int, float, np.integer, np.floating))
                              and not isinstance(v, (bool, np.bool_)) for v in vals)


def x_field(df: pd.DataFrame, fields: Sequence[str] | None = None) -> str | None:
    """The field for the x-axis: β if it varies, else the numeric varying field with most
    values, else the first varying field; None if no field varies."""
    fields = varying_fields(df) if fields is None else list(fields)
    if not fields:
        return None
    if "beta" in fields:
        return "beta"
    table = run_table(df)
    numeric = [f for f in fields if _numeric(table[f])]
    if not numeric:
        return fields[0]
    return max(numeric, key=lambda f: (len(_distinct(table[f])), -fields.index(f)))


def fmt_value(value: Any) -> str:
    """A config value as short text: 0.5, 128-128, tanh; – when missing."""
    if _is_nan(value) or value == ("<nan>",):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "-".join(fmt_value(v) for v in value) or "()"
    return str(value)


def label(fields: Sequence[str], values: Sequence[Any]) -> str:
    """``k=8, free_bits=2``: a combination of field values ("all runs" if there are none)."""
    return ", ".join(f"{SHORT.get(f, f)}={fmt_value(v)}" for f, v in zip(fields, values)) or "all runs"


def sort_key(value: Any) -> tuple:
    """Orders mixed cells: numbers by value, then anything else by its text, then missing."""
    if _is_nan(value) or value == ("<nan>",):
        return (2, 0.0, "")
    if _numeric([value]):
        return (0, float(value), "")
    return (1, 0.0, fmt_value(value))


def _groups(table: pd.DataFrame, fields: Sequence[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(values, rows) for each combination of ``fields`` in ``table``, sorted by the values."""
    if not fields:
        return [((), table)] if len(table) else []
    keys = [tuple(_cell_key(table[f].iloc[i]) for f in fields) for i in range(len(table))]
    out: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    items = [(tuple(table[f].iloc[rows[0]] for f in fields), table.iloc[rows]) for rows in out.values()]
    return sorted(items, key=lambda kv: tuple(sort_key(v) for v in kv[0]))


def _cell_key(v: Any) -> Any:
    return ("<nan>",) if _is_nan(v) else v


def distinct_values(column: Iterable) -> list:
    """The distinct values of a column, sorted (numbers, then strings, then missing)."""
    return sorted({_cell_key(v) for v in column}, key=sort_key)


# ----------------------------------------------------------------------------------------
# Tables.


def final(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The last logged row of each run for ``split``."""
    d = df[df.split == split]
    return d.loc[d.groupby("run", sort=False).step.idxmax()].reset_index(drop=True)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric scalar metric columns of ``df`` (not keys, config fields or eval.json)."""
    cfg = set(config_fields(df))
    return [c for c in df.columns
            if c not in KEYS and c not in cfg and not c.startswith((EVAL_PREFIX, DIS_PREFIX))
            and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]


def per_run(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run, sorted by the varying fields and the seed.

    Columns: run, the varying fields, seed, step (the last test evaluation), the final test
    scalars (neg_elbo, recon, kl, active_units, ... as logged), train_<m> for the final
    train-split neg_elbo/recon/kl/active_units, gap = test − train −ELBO, latent_dim, and
    eval_*/dis_* from eval.json where present.
    """
    table = run_table(df)
    fields = varying_fields(df)
    keep = fields + [f for f in (SEED, "latent_dim") if f in table.columns and f not in fields]
    keep = [f for f in keep if f != "step"]
    out = table[keep].reset_index()
    metrics = [c for c in metric_columns(df) if c not in keep]
    test = final(df, "test")
    out = out.merge(test[["run", "step"] + metrics], on="run", how="left")
    train = final(df, "train")
    train_cols = [c for c in ("neg_elbo", "recon", "kl", "active_units") if c in train.columns]
    out = out.merge(train[["run"] + train_cols].rename(columns={c: f"train_{c}" for c in train_cols}),
                    on="run", how="left")
    if "neg_elbo" in out.columns and "train_neg_elbo" in out.columns:
        out["gap"] = out.neg_elbo - out.train_neg_elbo
    extra = [c for c in df.columns if c.startswith((EVAL_PREFIX, DIS_PREFIX)) and c not in out.columns]
    if extra:  # (a config field such as eval_every is already in out)
        out = out.merge(df.groupby("run", sort=False)[extra].first().reset_index(), on="run", how="left")
    order = sorted(range(len(out)), key=lambda i: tuple(sort_key(out[f].iloc[i])
                                                        for f in fields + [SEED] if f in out.columns))
    return out.iloc[order].reset_index(drop=True)


SUMMARY_METRICS = ("recon", "kl", "active_units", "train_neg_elbo", "gap", "eval_nll",
                   "eval_mutual_info", "eval_total_correlation", "eval_dimwise_kl")


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Final metrics averaged over seeds, one row per combination of the varying fields.

    Columns: the varying fields; neg_elbo (test, mean) and neg_elbo_std (std over seeds);
    the means of recon, kl, active_units, train_neg_elbo, gap and eval.json's nll, MI, TC and
    dimwise KL where present, with ``<name>_se`` the standard error of that mean (from the
    runs' ``_se``, where every run has one) and ``eval_num_test`` (N, when the runs share it);
    seeds (distinct seeds) and runs.
    """
    runs = per_run(df)
    fields = varying_fields(df)
    rows = []
    for values, d in _groups(runs, fields):
        row = dict(zip(fields, values))
        if "neg_elbo" in d.columns:
            row["neg_elbo"] = d.neg_elbo.mean()
            row["neg_elbo_std"] = d.neg_elbo.std()
        for m in SUMMARY_METRICS:
            if m in d.columns and d[m].notna().any():
                row[m] = d[m].mean()
                se = d[m + "_se"] if m + "_se" in d.columns else None
                if se is not None and se[d[m].notna()].notna().all():  # of the seed mean
                    row[m + "_se"] = float(np.sqrt(np.sum(np.square(se[d[m].notna()])))) / int(d[m].notna().sum())
        if "eval_num_test" in d.columns and d.eval_num_test.notna().any() and d.eval_num_test.nunique() == 1:
            row["eval_num_test"] = int(d.eval_num_test.dropna().iloc[0])
        row["seeds"] = d[SEED].nunique() if SEED in d.columns else len(d)
        row["runs"] = len(d)
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def pick_runs(df: pd.DataFrame, n: int) -> list[str]:
    """Up to ``n`` runs spread over the x-axis field (smallest, middle, largest), at the
    last combination of the other fields (e.g. the largest k) and the smallest seed."""
    runs = per_run(df)
    fields = varying_fields(df)
    x = x_field(df, fields)
    if SEED in runs.columns:
        runs = runs[runs[SEED] == min(runs[SEED], key=sort_key)]
    others = [f for f in fields if f != x]
    if others:
        runs = _groups(runs, others)[-1][1]
    if x is not None:
        runs = runs.iloc[sorted(range(len(runs)), key=lambda i: sort_key(runs[x].iloc[i]))]
    idx = sorted({int(round(j * (len(runs) - 1) / max(n - 1, 1))) for j in range(n)})
    return list(runs.run.iloc[idx])


# ----------------------------------------------------------------------------------------
# Figure helpers.


def _colors(n: int) -> list:
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    return [plt.get_cmap("viridis")(i / max(n - 1, 1)) for i in range(n)]


def _x_axis(ax, vals_in: Iterable, field: str) -> dict:
    """Puts ``values`` of ``field`` on the x-axis, ticks exactly at them (log scale for
    positive values spanning ≥ 4×, labels thinned past 8); returns value → position."""
    vals = distinct_values(vals_in)
    if _numeric(vals):
        pos = {v: float(v) for v in vals}
        fl = np.array(sorted(pos.values()))
        if len(fl) > 1 and fl.min() > 0 and fl.max() / fl.min() >= 4:
            ax.set_xscale("log")
            pad = (fl.max() / fl.min()) ** 0.06
            ax.set_xlim(fl.min() / pad, fl.max() * pad)
    else:
        pos = {v: float(i) for i, v in enumerate(vals)}
        ax.set_xlim(-0.5, len(vals) - 0.5)
    ticks = sorted(pos.values())
    stride = max(1, math.ceil(len(ticks) / 8))
    labels = {p: fmt_value(v) for v, p in pos.items()}
    ax.set_xticks(ticks, [labels[p] if i % stride == 0 or i == len(ticks) - 1 else ""
                          for i, p in enumerate(ticks)])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if max((len(s) for s in labels.values()), default=0) * len(ticks) > 40:
        ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel(SHORT.get(field, field))
    return pos


def _metric_vs_x(ax, runs: pd.DataFrame, x: str | None, metric: str, curve_fields: Sequence[str],
                 colors: list) -> list[tuple[Any, str]]:
    """Mean ± std over seeds of ``metric`` against ``x``, one curve per combination of
    ``curve_fields``; seeds as faint points. Returns (handle, label) for a legend."""
    handles = []
    if metric not in runs.columns or not runs[metric].notna().any():
        ax.text(0.5, 0.5, f"no {metric}", ha="center", va="center", transform=ax.transAxes)
        return handles
    pos = _x_axis(ax, runs[x], x) if x is not None else {(): 0.0}
    if x is None:
        ax.set_xticks([])
    for (values, d), c in zip(_groups(runs, curve_fields), colors):
        if x is None:
            pts = [(0.0, d[metric].to_numpy(float))]
        else:
            pts = [(pos[_cell_key(xv)], g[metric].to_numpy(float)) for (xv,), g in _groups(d, [x])]
        xs = np.array([p for p, _ in pts])
        for p, v in pts:
            ax.plot([p] * len(v), v, ".", color=c, alpha=0.35, ms=5)
        means = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for _, v in pts])
        stds = np.array([np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else 0.0 for _, v in pts])
        line = "o-" if x is None or _numeric(runs[x]) else "o"  # no lines between categories
        h = ax.errorbar(xs, means, yerr=stds, fmt=line, color=c, capsize=3, ms=4, lw=1.5)
        handles.append((h, label(curve_fields, values)))
    return handles


def _legend(fig, handles: list[tuple[Any, str]], title: str | None = None) -> None:
    """A figure legend outside the axes, on the right (no curve is covered)."""
    if handles and not (len(handles) == 1 and handles[0][1] == "all runs"):
        fig.legend([h for h, _ in handles], [l for _, l in handles], loc="outside right upper",
                   fontsize=8, frameon=False)


def _curve_title(fields: Sequence[str]) -> str | None:
    return ", ".join(SHORT.get(f, f) for f in fields) or None


# ----------------------------------------------------------------------------------------
# Figures.


def rate_distortion(df: pd.DataFrame) -> plt.Figure:
    """KL (rate) against reconstruction (distortion), final test values. Colour: each
    combination of the varying fields other than the x-axis field; marker: the x-axis field's
    value (β when it varies). Big markers are seed means, faint dots single seeds."""
    runs = per_run(df)
    fields = varying_fields(df)
    x = x_field(df, fields)
    curve_fields = [f for f in fields if f != x]
    groups = _groups(runs, curve_fields)
    xvals = distinct_values(runs[x]) if x else [()]
    marker = {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(xvals)}
    fig, ax = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
    handles = []
    if not {"kl", "recon"} <= set(runs.columns):
        groups = []
        ax.text(0.5, 0.5, "no kl / recon in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    for (values, d), c in zip(groups, _colors(len(groups))):
        ax.plot(d.kl, d.recon, ".", color=c, alpha=0.35, ms=5)
        means = [((xv,), g.kl.mean(), g.recon.mean()) for (xv,), g in _groups(d, [x])] if x else \
                [((), d.kl.mean(), d.recon.mean())]
        ax.plot([m[1] for m in means], [m[2] for m in means], "-", color=c, lw=1.2, alpha=0.8)
        for xv, kl, rec in means:
            ax.plot(kl, rec, marker[_cell_key(xv[0]) if x else ()], color=c, ms=7, mec="k", mew=0.5)
        handles.append((Line2D([], [], color=c, lw=2), label(curve_fields, values)))
    if x:
        handles += [(Line2D([], [], ls="", marker=marker[v], color="0.5", mec="k", mew=0.5, ms=7),
                     label([x], [v])) for v in xvals]
    ax.set_xlabel("rate: KL(q(z|x) ‖ p(z)) [nats]")
    ax.set_ylabel("distortion: −E log p(x|z) [nats]")
    ax.set_title("Rate–distortion plane (test, final step)")
    ax.grid(alpha=0.3)
    _legend(fig, handles)
    return fig


def _heat(ax, table: np.ndarray, fmt: str, cmap: str = "viridis"):
    im = ax.imshow(table, cmap=cmap, aspect="auto")
    finite = table[np.isfinite(table)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for (i, j), v in np.ndenumerate(table):
        if np.isfinite(v):
            light = hi > lo and (v - lo) / (hi - lo) > 0.6
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                    color="k" if light else "w")
    return im


def active_units_heatmap(df: pd.DataFrame) -> plt.Figure:
    """Active units (final test, mean over seeds): columns the x-axis field's values, rows
    the combinations of the other varying fields."""
    runs = per_run(df)
    fields = varying_fields(df)
    x = x_field(df, fields)
    row_fields = [f for f in fields if f != x]
    cols = distinct_values(runs[x]) if x else [()]
    rows = _groups(runs, row_fields)
    table = np.full((len(rows), len(cols)), np.nan)
    for i, (_, d) in enumerate(rows):
        for j, xv in enumerate(cols):
            sel = d[d[x].map(lambda v: _cell_key(v) == xv).astype(bool)] if x else d
            if len(sel) and "active_units" in sel:
                table[i, j] = sel.active_units.mean()
    fig, ax = plt.subplots(figsize=(3.4 + 0.8 * len(cols), 1.4 + 0.35 * len(rows)), layout="constrained")
    fig.colorbar(_heat(ax, table, ".1f"), ax=ax, label="active units")
    ax.set_xticks(range(len(cols)), [fmt_value(v) for v in cols] if x else ["all"])
    ax.set_yticks(range(len(rows)), [label(row_fields, v) for v, _ in rows], fontsize=8)
    ax.set_xlabel(SHORT.get(x, x) if x else "")
    ax.set_title("Active units, mean over seeds", fontsize=10)
    return fig


def kl_per_dim_heatmap(df: pd.DataFrame) -> plt.Figure:
    """Each run's final test KL per latent dimension, sorted descending (collapsed dims ≈ 0)."""
    runs = per_run(df)
    fields = varying_fields(df) + ([SEED] if SEED in runs.columns else [])
    f = final(df)
    last = dict(zip(f.run, f.kl_per_dim)) if "kl_per_dim" in f.columns else {}
    vectors = [np.asarray(last[r], float) if isinstance(last.get(r), (list, tuple)) else np.zeros(0)
               for r in runs.run]
    k_max = max([len(v) for v in vectors] + [1])
    grid = np.full((len(runs), k_max), np.nan)
    for i, v in enumerate(vectors):
        grid[i, : len(v)] = np.sort(v)[::-1]
    fig, ax = plt.subplots(figsize=(4.0 + 0.22 * k_max, 1.3 + 0.26 * len(runs)), layout="constrained")
    im = ax.imshow(np.log10(np.maximum(grid, 1e-4)), aspect="auto", cmap="magma", vmin=-4,
                   interpolation="nearest")
    ax.set_yticks(range(len(runs)), [label(fields, [r[f] for f in fields]) for _, r in runs.iterrows()],
                  fontsize=7)
    ax.set_xticks(range(k_max), [str(i + 1) if k_max <= 20 or i % 4 == 0 else "" for i in range(k_max)],
                  fontsize=7)
    ax.set_xlabel("latent dimension, sorted by its KL (1 = largest)")
    fig.colorbar(im, ax=ax, label="log10 KL per dimension [nats]")
    ax.set_title("KL per latent dimension (test, final step)", fontsize=10)
    return fig


def kl_terms_over_training(df: pd.DataFrame, runs: list[str]) -> plt.Figure:
    """½·trace, ½·Mahalanobis, ½·log-det ratio, −½·k and the KL over training, per run (test)."""
    fields = varying_fields(df)
    table = run_table(df)
    ncols = min(len(runs), 4) or 1
    nrows = max(1, math.ceil(len(runs) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    curves = [("kl_trace", 0.5, "-", "½ tr(Σp⁻¹Σq)"), ("kl_mahalanobis", 0.5, "-", "½ Mahalanobis"),
              ("kl_log_det_ratio", 0.5, "-", "½ log|Σp|/|Σq|"), ("kl_dim", -0.5, ":", "−½ k"),
              ("kl", 1.0, "k-", "KL")]
    for ax, run in zip(axes.flat, runs):
        d = df[(df.run == run) & (df.split == "test")].sort_values("step")
        for col, scale, style, name in curves:
            if col in d.columns and d[col].notna().any():
                ax.plot(d.step, scale * d[col], style, lw=2 if col == "kl" else 1.3, label=name)
        seed = [SEED] if SEED in table.columns else []
        title = label(fields + seed, [table.loc[run, f] for f in fields + seed]) if run in table.index else run
        ax.set_title("\n".join(textwrap.wrap(title, 38)), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("nats")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return fig


def metric_vs_field(df: pd.DataFrame, metric: str = "neg_elbo", field: str | None = None,
                    ylabel: str | None = None) -> plt.Figure:
    """Final ``metric`` against ``field`` (default :func:`x_field`), one curve per combination
    of the other varying fields, mean ± std over seeds, seeds as faint points."""
    runs = per_run(df)
    fields = varying_fields(df)
    x = field or x_field(df, fields)
    curve_fields = [f for f in fields if f != x]
    n = len(_groups(runs, curve_fields))
    fig, ax = plt.subplots(figsize=(7.0, 4.2), layout="constrained")
    handles = _metric_vs_x(ax, runs, x, metric, curve_fields, _colors(n))
    ax.set_ylabel(ylabel or metric)
    ax.grid(alpha=0.3)
    ax.set_title(f"{ylabel or metric} (mean ± std over seeds)", fontsize=10)
    _legend(fig, handles, _curve_title(curve_fields))
    return fig


def elbo_vs_beta(df: pd.DataFrame) -> plt.Figure:
    """Test −ELBO against the x-axis field (β when it varies), error bars over seeds (std)."""
    return metric_vs_field(df, "neg_elbo", ylabel="test −ELBO [nats]")


FIELD_PANELS = (("neg_elbo", "test −ELBO [nats]"), ("recon", "distortion −E log p(x|z) [nats]"),
                ("kl", "rate KL [nats]"), ("active_units", "active units"),
                ("gap", "test − train −ELBO [nats]"), ("eval_nll", "test NLL (IWAE) [nats]"),
                ("eval_mutual_info", "index-code MI (eval) [nats]"),
                ("eval_total_correlation", "total correlation (eval) [nats]"),
                ("eval_dimwise_kl", "dimension-wise KL (eval) [nats]"))


def field_figure(df: pd.DataFrame, field: str) -> plt.Figure:
    """The final metrics (test −ELBO, distortion, rate, active units, generalization gap and
    eval.json's numbers where present) against one varying ``field``, a curve per
    combination of the others."""
    runs = per_run(df)
    fields = varying_fields(df)
    curve_fields = [f for f in fields if f != field]
    panels = [(m, y) for m, y in FIELD_PANELS if m in runs.columns and runs[m].notna().any()]
    panels += [(c, c[len(DIS_PREFIX):]) for c in runs.columns
               if c.startswith(DIS_PREFIX) and runs[c].notna().any()]
    ncols = min(3, len(panels)) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols + 1.8, 2.8 * nrows), squeeze=False,
                             layout="constrained")
    colors = _colors(len(_groups(runs, curve_fields)))
    handles = []
    for ax, (m, y) in zip(axes.flat, panels):
        handles = _metric_vs_x(ax, runs, field, m, curve_fields, colors) or handles
        ax.set_title(y, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    _legend(fig, handles, _curve_title(curve_fields))
    return fig


def training_curves(df: pd.DataFrame, max_panels: int = 12) -> plt.Figure:
    """loss, −ELBO, KL, β weight (and any other logged training metric) against step.

    Solid: the "train_batch" rows (means over the last log_every steps) when the runs have
    them, else the evaluations on training examples ("train" rows); dashed: test evaluations.
    One colour per combination of the varying fields: the mean over seeds, with the band
    from the lowest to the highest seed.
    """
    fields = varying_fields(df)
    table = run_table(df)
    source = "train_batch" if (df.split == "train_batch").any() else "train"
    tr = df[df.split == source]
    te = df[df.split == "test"]
    cols = [c for c in metric_columns(df) if c in tr.columns and tr[c].notna().any()]
    panels = [c for c in CURVE_METRICS if c in cols]
    if source == "train_batch":  # the regularizer's own metrics; the KL's terms have their figure
        panels += [c for c in cols if c not in panels and c not in TERMS]
    panels = panels[:max_panels] or ["neg_elbo"]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.8, 2.7 * nrows), squeeze=False,
                             layout="constrained")
    combos = _groups(table[fields].reset_index() if fields else table.reset_index()[["run"]], fields)
    colors = _colors(len(combos))
    handles = []
    for (values, members), c in zip(combos, colors):
        runs = set(members.run)
        for ax, m in zip(axes.flat, panels):
            for d, style in ((tr, "-"), (te, "--")):
                if m not in d.columns:
                    continue
                d = d[d.run.isin(runs)].dropna(subset=[m])
                if not len(d):
                    continue
                g = d.groupby("step")[m]
                steps, mean = g.mean().index.to_numpy(), g.mean().to_numpy()
                ax.plot(steps, mean, style, color=c, lw=1.4)
                if members.shape[0] > 1:
                    ax.fill_between(steps, g.min().to_numpy(), g.max().to_numpy(), color=c, alpha=0.15, lw=0)
        handles.append((Line2D([], [], color=c, lw=2), label(fields, values)))
    for ax, m in zip(axes.flat, panels):
        ax.set_title(metrics_lib.title(m), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    what = "training batches" if source == "train_batch" else "training examples (evaluation)"
    handles += [(Line2D([], [], color="0.4", ls="-"), f"train: {what}"),
                (Line2D([], [], color="0.4", ls="--"), "test (evaluation)")]
    fig.legend([h for h, _ in handles], [l for _, l in handles], loc="outside right upper",
               fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------------------
# Ground-truth factors: disentanglement against strength, latent traversals, latent–factor MI.

# eval.json `disentanglement` keys (columns dis_<key>) → titles, in figure order: the titles
# each metric declares where it is registered (vaekl.disentanglement.metric).
DIS_SCORES = disentanglement.score_titles()
COLLAPSED_KL = 0.01  # nats: a latent dimension with less KL than this is marked collapsed


def has_factors(df: pd.DataFrame) -> bool:
    """Whether the runs' data has ground-truth factors: a dataset whose source declares them
    (:func:`vaekl.data.has_factors`) in their configs, or disentanglement scores in an eval.json."""
    table = run_table(df)
    if "dataset" in table.columns and any(data.has_factors(str(v)) for v in table.dataset):
        return True
    return any(c.startswith(DIS_PREFIX) for c in df.columns)


def load_runs(dirs: Sequence[str], root: str | None = None) -> pd.DataFrame:
    """Run directories from anywhere (e.g. one sweep per method) in one frame, as
    :func:`load_sweep`; each run is named by its path relative to ``root`` (default: the
    common parent of the runs' parents), so equal names in two sweeps stay apart."""
    dirs = [os.path.abspath(d) for d in dirs]
    if not dirs:
        raise FileNotFoundError("no run directories given")
    root = os.path.abspath(root) if root else os.path.commonpath([os.path.dirname(d) for d in dirs])
    frames = []
    for d in dirs:
        f = load_run(d)
        if not len(f):
            continue
        old, new = f.run.iloc[0], os.path.relpath(d, root)
        f["run"] = new
        f.attrs = {key: {new: value[old]} for key, value in f.attrs.items()}
        frames.append(f)
    if not frames:
        raise FileNotFoundError(f"no metrics rows in the runs under {root}")
    df = pd.concat(frames, ignore_index=True)
    df.attrs = {key: {k: v for f in frames for k, v in f.attrs[key].items()}
                for key in ("configs", "evals", "meta", "dirs")}
    return df


def score_columns(df: pd.DataFrame) -> list[str]:
    """The dis_<score> columns of the registered metrics' scores (:data:`DIS_SCORES`, and those
    of metrics registered since) that hold a number for some run, in order."""
    return [DIS_PREFIX + k for k in disentanglement.score_titles()
            if DIS_PREFIX + k in df.columns and df[DIS_PREFIX + k].notna().any()]


def _score_title(column: str) -> str:
    key = column[len(DIS_PREFIX):] if column.startswith(DIS_PREFIX) else column
    return disentanglement.score_titles().get(key, metrics_lib.title(key))


def _seed_points(ax, runs: pd.DataFrame, x: str | None, column: str, curve_fields: Sequence[str],
                 colors: list) -> list[tuple[Any, str]]:
    """Every run of ``runs`` as a point at its ``x`` (seeds side by side), the median over
    seeds as a line, one colour per combination of ``curve_fields``."""
    handles = []
    if column not in runs.columns or not runs[column].notna().any():
        ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes, color="0.4")
        return handles
    if x is None:
        pos, log = {(): 1.0}, False
        ax.set_xticks([])
        ax.set_xlim(0.5, 1.5)
    else:
        pos = _x_axis(ax, runs[x], x)
        log = ax.get_xscale() == "log"
    lo, hi = ax.get_xlim() if (x is None or len(pos) > 1) else (min(pos.values()) - 1, max(pos.values()) + 1)
    width = 0.025 * (math.log(hi / lo) if log else hi - lo)
    for (values, d), c in zip(_groups(runs, curve_fields), colors):
        groups = [((), d)] if x is None else _groups(d, [x])
        xs, medians = [], []
        for key, g in groups:
            p = pos[_cell_key(key[0])] if x is not None else 1.0
            v = g[column].to_numpy(float)
            offsets = np.linspace(-width, width, len(v)) if len(v) > 1 else np.zeros(len(v))
            at = p * np.exp(offsets) if log else p + offsets
            ax.plot(at, v, "o", color=c, alpha=0.55, ms=4.5, mec="none")
            if np.isfinite(v).any():
                xs.append(p)
                medians.append(float(np.nanmedian(v)))
        line, = ax.plot(xs, medians, "-" if x is not None else "_", color=c, lw=1.6, ms=14)
        handles.append((line, label(curve_fields, values)))
    return handles


def metric_vs_strength(df: pd.DataFrame, metric: str | Sequence[str] = "mig", group: str = "regularizer",
                       titles: Mapping[Any, str] | None = None,
                       references: Mapping[tuple[str, Any], Sequence[tuple[float, str]]] | None = None,
                       wrap: bool | None = None) -> plt.Figure:
    """Disentanglement metrics against the regularization strength, in Locatello et al.'s
    (2019) style: every seed a point, the median over seeds a line.

    One column of panels per value of ``group`` (per regularizer: each has its own strength
    field, the numeric field that varies among its runs, β first), one row per metric; a
    single group wraps its metrics over up to four columns unless ``wrap`` is False. Other
    fields that vary within a group get a colour each.

    Args:
      df: a :func:`load_sweep` or :func:`load_runs` frame.
      metric: a column (``dis_mig``) or an eval.json `disentanglement` key (``mig``), or several.
      group: the config field whose values get a column each (ignored when it does not vary).
      titles: group value → column title.
      references: {(metric key or column, group value or None for all): [(value, text)]},
        published values drawn as dashed lines.
    Returns:
      The figure; a panel whose runs lack the metric says "not evaluated".
    """
    runs = per_run(df)
    table = run_table(df)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    columns = [m if m in runs.columns or DIS_PREFIX + m not in runs.columns else DIS_PREFIX + m
               for m in metrics]
    if group in table.columns and len(_distinct(table[group])) > 1:
        groups = [(v, list(d.index)) for (v,), d in _groups(table, [group])]
        if titles:
            order = list(titles)
            groups.sort(key=lambda g: order.index(g[0]) if g[0] in order else len(order))
    else:
        groups = [(table[group].iloc[0] if group in table.columns else None, list(table.index))]
    wrap = len(groups) == 1 if wrap is None else wrap
    n = len(columns) if wrap else len(columns) * len(groups)
    ncols = min(4, len(columns)) if wrap else len(groups)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(2.9 * ncols + 0.9, 5.0), 2.45 * nrows + 0.7), squeeze=False,
                             layout="constrained", sharey="row" if not wrap else False)
    handles = []
    for gi, (value, names) in enumerate(groups):
        sub = df[df.run.isin(names)]
        sub.attrs = df.attrs
        fields = varying_fields(table.loc[names])
        x = x_field(sub, fields)
        curve_fields = [f for f in fields if f != x]
        sub_runs = runs[runs.run.isin(names)]
        colors = _colors(len(_groups(sub_runs, curve_fields)))
        for mi, col in enumerate(columns):
            ax = axes.flat[mi] if wrap else axes[mi][gi]
            h = _seed_points(ax, sub_runs, x, col, curve_fields, colors)
            handles = h if len(h) > len(handles) else handles
            key = col[len(DIS_PREFIX):] if col.startswith(DIS_PREFIX) else col
            for (ref_metric, ref_group), lines in (references or {}).items():
                if ref_metric in (key, col) and ref_group in (None, value):
                    for v, text in lines:
                        ax.axhline(v, ls="--", color="0.35", lw=1)
                        ax.annotate(text, (0.02, v), xycoords=("axes fraction", "data"), fontsize=6.5,
                                    color="0.25", va="bottom")
            ax.grid(alpha=0.3)
            if wrap:
                ax.set_title(_score_title(col), fontsize=9)
            else:
                if mi == 0:
                    ax.set_title(titles.get(value, str(value)) if titles else label([group], [value]),
                                 fontsize=10)
                if gi == 0:
                    ax.set_ylabel(_score_title(col), fontsize=9)
                if mi < len(columns) - 1:
                    ax.set_xlabel("")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    legend = [(Line2D([], [], ls="", marker="o", color="0.4", alpha=0.55, mec="none"), "one seed"),
              (Line2D([], [], color="0.4", lw=1.6), "median over seeds")]
    legend += [h for h in handles if h[1] != "all runs"]
    fig.legend([h for h, _ in legend], [l for _, l in legend], loc="outside lower center", ncol=len(legend),
               fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------------------
# Disentanglement along training (disentanglement.jsonl, written with config.metric_every).

ALONG_FILE = rundir.DISENTANGLEMENT
ALONG_SCORES = ("mig", "factor_vae_score.eval_accuracy", "dci.disentanglement")
_SIZE_KEYS = ("num_train", "num_test", "num_eval", "num_variance_estimate", "batch_size", "model")


def disentanglement_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Every run's disentanglement.jsonl (from ``df.attrs["dirs"]``): one row per run and
    step, columns run, step, the scores, representation, seconds and sample_sizes (a dict).
    Empty when no run has the file; a torn last line is skipped (:class:`vaekl.rundir.MetricsLog`)."""
    frames = []
    for run, d in (df.attrs.get("dirs") or {}).items():
        rows = [{k: v if k == "sample_sizes" else _clean(v) for k, v in row.items()}
                for row in runs_lib.Run(d).along_training()]
        if rows:
            frames.append(pd.DataFrame(rows).assign(run=run).drop_duplicates("step", keep="last"))
    if not frames:
        return pd.DataFrame(columns=["run", "step"])
    return pd.concat(frames, ignore_index=True).sort_values(["run", "step"], ignore_index=True)


def disentanglement_curves(df: pd.DataFrame, metrics: Sequence[str] = ALONG_SCORES,
                           group: str = "regularizer") -> pd.DataFrame:
    """The curves of the disentanglement metrics along training, as data.

    One row per (``group`` value, configuration, metric, step): columns ``group`` (e.g. the
    regularizer, i.e. the method), ``configuration`` (a label of the other fields that vary
    within the group, e.g. ``β=4``), those fields' values, ``metric``, ``step``, and over the
    seeds that have that step: ``median``, ``min``, ``max``, ``seeds``. Empty when no run has
    a disentanglement.jsonl.
    """
    rows = disentanglement_rows(df)
    cols = ["group", "configuration", "metric", "step", "median", "min", "max", "seeds"]
    if not len(rows):
        return pd.DataFrame(columns=cols)
    table = run_table(df)
    out = []
    groups = ([(v, list(d.index)) for (v,), d in _groups(table, [group])]
              if group in table.columns else [(None, list(table.index))])
    for value, names in groups:
        fields = varying_fields(table.loc[names])
        for config_values, d in _groups(table.loc[names], fields):
            runs_here = list(d.index)
            sub = rows[rows.run.isin(runs_here)]
            for metric in metrics:
                if metric not in sub.columns:
                    continue
                for step, g in sub.groupby("step"):
                    v = pd.to_numeric(g[metric], errors="coerce").dropna().to_numpy(float)
                    if not v.size:
                        continue
                    out.append({"group": value, "configuration": label(fields, config_values) if fields
                                else "all runs", **dict(zip(fields, config_values)), "metric": metric,
                                "step": int(step), "median": float(np.median(v)), "min": float(v.min()),
                                "max": float(v.max()), "seeds": int(v.size)})
    return pd.DataFrame(out, columns=list(dict.fromkeys(cols + [k for r in out for k in r])))


def along_sample_sizes(df: pd.DataFrame, metrics: Sequence[str] = ALONG_SCORES) -> str:
    """The sample sizes of the disentanglement.jsonl rows, e.g. ``mig: num_train=10000; …``
    (every distinct setting of each metric's family, '/'-joined)."""
    rows = disentanglement_rows(df)
    if "sample_sizes" not in rows.columns:
        return "unknown"
    parts = []
    for family in dict.fromkeys(m.split(".")[0] for m in metrics):
        seen = []
        for sizes in rows.sample_sizes:
            kw = (sizes or {}).get(family) if isinstance(sizes, dict) else None
            if kw:
                text = ", ".join(f"{k}={kw[k]}" for k in _SIZE_KEYS if k in kw)
                if text not in seen:
                    seen.append(text)
        if seen:
            parts.append(f"{family}: {' / '.join(seen)}")
    return "; ".join(parts) or "unknown"


def disentanglement_along_training(df: pd.DataFrame, metrics: Sequence[str] = ALONG_SCORES,
                                   group: str = "regularizer") -> plt.Figure:
    """The disentanglement metrics against the training step: one column of panels per
    ``group`` value (method), one row per metric, a line per configuration (strength) with
    the median over seeds and a band from the lowest to the highest seed
    (:func:`disentanglement_curves`)."""
    curves = disentanglement_curves(df, metrics, group)
    groups = list(dict.fromkeys(curves.group)) or [None]
    present = [m for m in metrics if (curves.metric == m).any()] or list(metrics)[:1]
    fig, axes = plt.subplots(len(present), len(groups), figsize=(3.3 * len(groups) + 1.6, 2.3 * len(present) + 0.6),
                             squeeze=False, layout="constrained", sharex="col", sharey="row")
    handles: dict[str, Any] = {}
    configs = list(dict.fromkeys(curves.configuration))
    colors = dict(zip(configs, _colors(len(configs))))
    for gi, value in enumerate(groups):
        for mi, metric in enumerate(present):
            ax = axes[mi][gi]
            c = curves[(curves.group == value) & (curves.metric == metric)] if len(curves) else curves
            if not len(c):
                ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes, color="0.4")
            for conf, d in c.groupby("configuration", sort=False):
                d = d.sort_values("step")
                line, = ax.plot(d.step, d["median"], "o-", color=colors[conf], lw=1.5, ms=3)
                ax.fill_between(d.step, d["min"], d["max"], color=colors[conf], alpha=0.2, lw=0)
                handles.setdefault(conf, line)
            ax.grid(alpha=0.3)
            if mi == 0:
                ax.set_title(label([group], [value]) if value is not None else "all runs", fontsize=10)
            if gi == 0:
                ax.set_ylabel(_score_title(metric), fontsize=9)
            if mi == len(present) - 1:
                ax.set_xlabel("step")
    _legend(fig, [(h, k) for k, h in handles.items()])
    return fig


def kl_per_dim(run_dir: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(KL per latent dimension [d] in nats, Var_x E[z|x] per dimension [d]) of a run, from
    eval.json, else from the last test row of metrics.jsonl; None where neither has it."""
    ev = runs_lib.Run(run_dir).eval
    test = [r for r in metrics_rows(run_dir) if r["split"] == "test"]
    last = max(test, key=lambda r: r["step"]) if test else {}

    def pick(key: str) -> np.ndarray | None:
        for source in (ev, last):
            v = source.get(key)
            if isinstance(v, list) and v:
                return np.asarray(v, float)
        return None

    return pick("kl_per_dim"), pick("au_variance")


def collapsed_dims(kl: np.ndarray | None, au_variance: np.ndarray | None, d: int,
                   kl_threshold: float = COLLAPSED_KL, au_threshold: float = 0.01) -> np.ndarray:
    """[d] bool: KL below ``kl_threshold`` nats or Var_x E[z|x] at most ``au_threshold``
    (an inactive unit, Burda et al. 2016); False where neither is known."""
    out = np.zeros(d, bool)
    if kl is not None and len(kl) == d:
        out |= kl < kl_threshold
    if au_variance is not None and len(au_variance) == d:
        out |= au_variance <= au_threshold
    return out


def _as_run(run: Any, step: str | int):
    if isinstance(run, str):
        return runs_lib.load(run, step)
    return run


def run_dataset(config: Any):
    """The dataset a run's config trains on (vaekl.data.load with its fields)."""
    return data.for_config(config)


def _images01(x: Any) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _encode_means(run: Any, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """[n, d] posterior means E[z|x] of images x [n, H, W, C] in [0, 1], in batches."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    encode = jax.jit(lambda p, x: nnx.merge(run.graphdef, p).encode(x).mean)
    return np.concatenate([np.asarray(encode(run.params, x[i:i + batch])) for i in range(0, len(x), batch)])


def _prior_moments(run: Any) -> tuple[np.ndarray, np.ndarray]:
    """([d] mean, [d] standard deviation) of the run's prior's marginals."""
    p = run.model.prior_distribution()
    k = run.model.latent_dim
    if p is None:
        return np.zeros(k, np.float32), np.ones(k, np.float32)
    return np.asarray(p.mean, np.float32), np.exp(0.5 * np.asarray(p.log_variances(), np.float32))


def traversal_images(run: Any, x: np.ndarray, dims: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """Decoder means E[x|z] [n, len(dims), len(values), H, W, C] for z = the posterior mean of
    each image of x [n, H, W, C] with dimension dims[i] set to μ_p + values[j]·σ_p (the
    prior's mean and standard deviation in that dimension)."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    z0 = _encode_means(run, x)
    mean, std = _prior_moments(run)
    dims, values = np.asarray(dims, int), np.asarray(values, np.float32)
    z = np.broadcast_to(z0[:, None, None, :], (len(z0), len(dims), len(values), z0.shape[1])).copy()
    for i, d in enumerate(dims):
        z[:, i, :, d] = mean[d] + values * std[d]
    decode = jax.jit(lambda p, z: (lambda m: m.likelihood.mean(m.decode(z)))(nnx.merge(run.graphdef, p)))
    out = np.asarray(decode(run.params, z.reshape(-1, z.shape[-1])))
    return np.clip(out, 0.0, 1.0).reshape(*z.shape[:3], *out.shape[1:])


def _reconstruct(run: Any, x: np.ndarray) -> np.ndarray:
    """E[x|z] at the posterior mean, [n, H, W, C] in [0, 1]."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    f = jax.jit(lambda p, x: nnx.merge(run.graphdef, p).reconstruct(x))
    return np.clip(np.asarray(f(run.params, x)), 0.0, 1.0)


def _test_images(ds: Any, n: int, seed: int) -> np.ndarray:
    """n images in [0, 1]: rendered from uniformly sampled factors on a ground-truth dataset,
    else the first test images."""
    if hasattr(ds, "factor_sizes"):
        rng = np.random.default_rng(seed)
        return _images01(ds.sample_observations_from_factors(ds.sample_factors(n, rng), rng))
    return _images01(ds.test_images[:n])


def _dim_labels(kl: np.ndarray | None, dead: np.ndarray, order: np.ndarray) -> list[str]:
    return [f"z{d}" + (f"  KL {kl[d]:.2f}" if kl is not None and len(kl) > d else "")
            + ("  collapsed" if dead[d] else "") for d in order]


def _dim_order(run: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(dimensions by KL descending, KL per dim or None, collapsed mask) of a loaded run."""
    k = run.model.latent_dim
    kl, au = kl_per_dim(run.run_dir) if run.run_dir else (None, None)
    thr = float(run.config.get("active_units_threshold", 0.01)) if hasattr(run.config, "get") else 0.01
    dead = collapsed_dims(kl, au, k, au_threshold=thr)
    order = np.argsort(-kl, kind="stable") if kl is not None and len(kl) == k else np.arange(k)
    return order, (kl if kl is not None and len(kl) == k else None), dead


def _tile(images: np.ndarray, sep: int, fill: float) -> np.ndarray:
    """[R, C, H, W, ch] images in [0, 1] → one [R·(H+sep)+sep, C·(W+sep)+sep, ch] array,
    cells separated by ``sep`` pixels of ``fill``."""
    r, c, h, w, ch = images.shape
    out = np.full((r * (h + sep) + sep, c * (w + sep) + sep, ch), fill, np.float32)
    for i in range(r):
        for j in range(c):
            out[sep + i * (h + sep): sep + i * (h + sep) + h, sep + j * (w + sep): sep + j * (w + sep) + w] = \
                images[i, j]
    return out


def latent_traversals(run: Any, num_codes: int = 3, num_values: int = 9, span: float = 2.0,
                      max_dims: int = 10, step: str | int = "latest", seed: int = 0,
                      dataset: Any = None) -> plt.Figure:
    """Latent traversals of a trained run: for ``num_codes`` test images, each latent dimension
    set to ``num_values`` values over ±``span`` prior standard deviations around the prior
    mean, the others kept at the image's posterior mean; one panel per image, one row per
    dimension ordered by its KL (eval.json's, else the last test evaluation's), collapsed
    dimensions (KL < 0.01 nats or an inactive unit) marked in red. The panel's first column
    holds the test image (top) and its reconstruction at the posterior mean (below it).

    Args:
      run: a run directory, or a :class:`vaekl.runs.Run`.
      max_dims: at most this many dimensions (the largest KL first).
      step: the checkpoint ("latest", "best" or a step) when ``run`` is a directory.
      seed: draws the test images (factors sampled uniformly on a ground-truth dataset).
      dataset: the run's dataset, when already loaded.
    """
    run = _as_run(run, step)
    ds = dataset if dataset is not None else run_dataset(run.config)
    order, kl, dead = _dim_order(run)
    order = order[:max_dims]
    values = np.linspace(-span, span, num_values)
    x = _test_images(ds, num_codes, seed)
    trav = traversal_images(run, x, order, values)                    # [n, D, V, H, W, C]
    recon = _reconstruct(run, x)
    n, dims, _, h, w, ch = trav.shape
    first = np.full((n, dims, 1, h, w, ch), 0.75, np.float32)          # the input and its reconstruction
    first[:, 0, 0] = x
    if dims > 1:
        first[:, 1, 0] = recon
    imgs = np.concatenate([first, trav], axis=2)
    sep = max(2, h // 16)
    cell = 0.42
    fig, axes = plt.subplots(1, num_codes, figsize=(num_codes * (num_values + 1) * cell + 1.9,
                                                    dims * cell + 1.3),
                             squeeze=False, layout="constrained")
    labels = _dim_labels(kl, dead, order)
    for c, ax in enumerate(axes[0]):
        grid = _tile(imgs[c], sep, 0.75)
        ax.imshow(grid[..., 0] if ch == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="antialiased")
        ax.set_xticks([sep + j * (w + sep) + w / 2 for j in range(num_values + 1)],
                      ["input,\nrecon."] + [f"{v:+.1f}" if v else "0" for v in values], fontsize=7)
        ax.set_yticks([sep + i * (h + sep) + h / 2 for i in range(dims)],
                      labels if c == 0 else [""] * dims, fontsize=8)
        if c == 0:
            for t, d in zip(ax.get_yticklabels(), order):
                t.set_color("tab:red" if dead[d] else "k")
        ax.tick_params(length=0)
        ax.set_xlabel("z_j = μ_p + t·σ_p,  t =", fontsize=8)
        ax.set_title(f"test image {c + 1}", fontsize=9)
    name = os.path.basename(os.path.normpath(run.run_dir)) if run.run_dir else "run"
    fig.suptitle(f"Latent traversals of {name} (step {run.step}): rows = latent dimensions by their KL "
                 f"[nats], red = collapsed", fontsize=9)
    return fig


def factor_mi(run: Any, num_points: int = 2000, num_bins: int = 20, step: str | int = "latest",
              seed: int = 0, dataset: Any = None) -> dict[str, Any]:
    """The mutual information between each latent dimension's posterior mean and each
    ground-truth factor, from ``num_points`` uniformly sampled factor combinations.

    Returns:
      mi [d, F] I(z_j; v_k) in nats (:func:`vaekl.disentanglement.mutual_info_matrix`, codes
      binned into ``num_bins``), entropy [F] H(v_k) in nats, factor_names, factor_sizes,
      kl_per_dim [d] or None, collapsed [d], order (dimensions by KL, descending), and mig
      (disentanglement_lib's MIG of these codes).
    Raises:
      ValueError: the run's dataset has no ground-truth factors.
    """
    run = _as_run(run, step)
    ds = dataset if dataset is not None else run_dataset(run.config)
    if not hasattr(ds, "factor_sizes"):
        raise ValueError(f"dataset {run.config.dataset!r} has no ground-truth factors")
    rng = np.random.default_rng(seed)
    factors = np.asarray(ds.sample_factors(num_points, rng))
    codes = _encode_means(run, _images01(ds.sample_observations_from_factors(factors, rng)))
    mi = disentanglement.mutual_info_matrix(codes, factors, num_bins)
    entropy = disentanglement.discrete_entropy(factors)
    order, kl, dead = _dim_order(run)
    s = np.sort(mi, axis=0)[::-1]
    gap = s[0] - (s[1] if len(s) > 1 else 0.0)
    return {"mi": mi, "entropy": entropy, "factor_names": list(ds.factor_names),
            "factor_sizes": list(ds.factor_sizes), "kl_per_dim": kl, "collapsed": dead, "order": order,
            "mig": float(np.mean(gap / entropy)), "num_points": num_points, "num_bins": num_bins}


def factor_mi_matrix(run: Any, num_points: int = 2000, num_bins: int = 20, step: str | int = "latest",
                     seed: int = 0, dataset: Any = None) -> plt.Figure:
    """Heatmap of I(z_j; v_k) / H(v_k), the fraction of each factor's entropy that each latent
    dimension's posterior mean carries (:func:`factor_mi`); rows ordered by KL, collapsed
    dimensions in red, each cell also in nats. A disentangled code has one bright cell per
    column, in different rows."""
    run = _as_run(run, step)
    r = factor_mi(run, num_points, num_bins, step, seed, dataset)
    order = r["order"]
    norm = r["mi"][order] / r["entropy"][None, :]
    nf = norm.shape[1]
    fig, ax = plt.subplots(figsize=(2.6 + 1.05 * nf, 1.3 + 0.36 * len(order)), layout="constrained")
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=max(1e-3, min(1.0, float(norm.max()))), aspect="auto")
    for (i, j), v in np.ndenumerate(norm):
        ax.text(j, i, f"{v:.2f}\n({r['mi'][order[i], j]:.2f})", ha="center", va="center", fontsize=6.5,
                color="k" if v > 0.6 * norm.max() else "w")
    # The plug-in MI of binned codes is biased upward by ≈ (bins − 1)(|v_k| − 1) / (2n) nats.
    bias = [(r["num_bins"] - 1) * (s - 1) / (2 * r["num_points"]) for s in r["factor_sizes"]]
    ax.set_xticks(range(nf), [f"{n}\n{s} values\nH={h:.2f}\nbias≈{b:.2f}" for n, s, h, b in
                              zip(r["factor_names"], r["factor_sizes"], r["entropy"], bias)], fontsize=7.5)
    ax.set_yticks(range(len(order)), _dim_labels(r["kl_per_dim"], r["collapsed"], order), fontsize=7.5)
    for t, d in zip(ax.get_yticklabels(), order):
        t.set_color("tab:red" if r["collapsed"][d] else "k")
    fig.colorbar(im, ax=ax, label="I(z_j; v_k) / H(v_k)")
    name = os.path.basename(os.path.normpath(run.run_dir)) if run.run_dir else "run"
    ax.set_title(f"{name}: latent–factor MI, cell = fraction of H(v_k) (nats); {r['num_points']:,} "
                 f"factor draws, {r['num_bins']} bins; MIG {r['mig']:.3f}", fontsize=8.5)
    return fig
