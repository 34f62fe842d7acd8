"""Disentanglement along training for slices of Locatello et al.'s study: curves, verdicts, rows.

A slice is a directory of runs (``<method>/<run>/`` or runs directly under it) trained with
``--config.metric_every`` (``disentanglement.jsonl``, :mod:`vaekl.trajectory`). From it:

  curves        per (method, strength), at every scored step: the median, min and max over
                seeds of MIG, FactorVAE score and DCI disentanglement;
  informative   whether some method's median MIG reaches :data:`INFORMATIVE_MIG` at the last
                step; if none does, per method a log-linear fit of its best-strength median MIG
                against steps, extrapolated to 0.1 (an estimate, stated as one);
  seed_ratio    Locatello et al.'s "the seed matters about as much as the method": the mean
                within-cell variance over seeds divided by the variance of the (method,
                strength) means, at the last step, with a bootstrap interval (seeds resampled
                within each cell); verdict "supported" when the interval lies above
                ``SEED_RATIO``, "not supported" when below, else "uninformative" — and
                "uninformative" whenever the slice is not informative.

``summarize(runs, out, name)`` writes ``OUT/<name>.json`` and ``OUT/<name>.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments.reproduce import locatello_summary
from vaekl import trajectory
from vaekl import runs as runs_lib

SCORES = locatello_summary.SCORES            # result key → disentanglement.jsonl key
TITLES = locatello_summary.SCORE_TITLES
INFORMATIVE_MIG = locatello_summary.INFORMATIVE_MIG
SEED_RATIO = locatello_summary.SEED_RATIO
BOOTSTRAP = 2000


def read_slice(runs_dir: str) -> list[dict]:
    """One record per run: method, strength, seed, its along-training rows and sample sizes."""
    out = []
    for method, run_dir in locatello_summary.find_runs(runs_dir):
        config = runs_lib.Run(run_dir).config_json
        field = locatello_summary.locatello_dsprites.METHODS[method][1]
        rows = sorted(trajectory.read(run_dir), key=lambda r: r["step"])
        if not rows:
            continue
        out.append({"method": method, "run": os.path.relpath(run_dir, runs_dir), "strength_field": field,
                    "strength": float(config[field]), "seed": int(config["seed"]),
                    "num_steps": int(config["num_steps"]), "sample_sizes": rows[-1].get("sample_sizes"),
                    "rows": [{"step": int(r["step"]), **{k: _num(r.get(key)) for k, key in SCORES.items()}}
                             for r in rows]})
    return out


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _cells(records: Sequence[dict]) -> dict[tuple[str, float], list[dict]]:
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        cells.setdefault((r["method"], r["strength"]), []).append(r)
    return cells


def curves(records: Sequence[dict]) -> list[dict]:
    """Per (method, strength, score): steps and the median / min / max over seeds at each."""
    out = []
    for (method, strength), runs in sorted(_cells(records).items()):
        steps = sorted({row["step"] for r in runs for row in r["rows"]})
        for score in SCORES:
            med, lo, hi, n = [], [], [], []
            for s in steps:
                v = [row[score] for r in runs for row in r["rows"] if row["step"] == s and row[score] is not None]
                med.append(float(np.median(v)) if v else None)
                lo.append(float(min(v)) if v else None)
                hi.append(float(max(v)) if v else None)
                n.append(len(v))
            out.append({"method": method, "strength": strength, "score": score, "steps": steps,
                        "median": med, "min": lo, "max": hi, "seeds": n})
    return out


def final_scores(records: Sequence[dict], score: str) -> dict[tuple[str, float], list[float]]:
    """{(method, strength): [the score at each seed's last scored step]}."""
    return {cell: [r["rows"][-1][score] for r in runs if r["rows"][-1][score] is not None]
            for cell, runs in _cells(records).items()}


def seed_ratio(records: Sequence[dict], score: str = "mig", seed: int = 0) -> dict:
    """Within-cell variance over seeds / variance of the cell means, with a bootstrap interval."""
    cells = [np.asarray(v, float) for v in final_scores(records, score).values() if len(v) >= 2]
    if len(cells) < 2:
        return {"ratio": None, "why": "needs ≥ 2 (method, strength) cells with ≥ 2 seeds"}

    def ratio(cs):
        between = np.var([c.mean() for c in cs], ddof=1)
        within = np.mean([np.var(c, ddof=1) for c in cs])
        return float(within / between) if between > 0 else math.inf

    rng = np.random.default_rng(seed)
    boot = [ratio([c[rng.integers(0, len(c), len(c))] for c in cells]) for _ in range(BOOTSTRAP)]
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    return {"score": score, "ratio": ratio(cells), "interval_95": [lo, hi], "bootstrap": BOOTSTRAP,
            "cells": len(cells), "threshold": SEED_RATIO}


def extrapolate(steps: Sequence[int], values: Sequence[float | None], target: float = INFORMATIVE_MIG) -> dict:
    """A least-squares fit value ≈ a + b·ln(step) over the scored steps after 0, and the step at
    which it reaches ``target`` (None when the fit does not rise)."""
    pts = [(s, v) for s, v in zip(steps, values) if s > 0 and v is not None]
    if len(pts) < 2:
        return {"fit": None, "steps_to_target": None, "why": "fewer than 2 scored steps after step 0"}
    x, y = np.log([p[0] for p in pts]), np.asarray([p[1] for p in pts])
    b, a = np.polyfit(x, y, 1)
    reach = float(math.exp((target - a) / b)) if b > 0 else None
    return {"fit": {"a": float(a), "b_per_ln_step": float(b)}, "target": target,
            "steps_to_target": reach, "points": len(pts)}


def verdicts(records: Sequence[dict], curve_list: Sequence[dict]) -> dict:
    last_med = {}
    for c in curve_list:
        if c["score"] == "mig" and c["median"] and c["median"][-1] is not None:
            last_med[(c["method"], c["strength"])] = c["median"][-1]
    best = max(last_med.values(), default=None)
    informative = best is not None and best >= INFORMATIVE_MIG
    per_method = {}
    for method in sorted({m for m, _ in last_med}):
        strength, value = max(((s, v) for (m, s), v in last_med.items() if m == method), key=lambda t: t[1])
        curve = next(c for c in curve_list if c["method"] == method and c["strength"] == strength and c["score"] == "mig")
        per_method[method] = {"best_strength": strength, "median_mig_last": value,
                              "extrapolation": None if informative else extrapolate(curve["steps"], curve["median"])}
    ratio = seed_ratio(records)
    if not informative:
        verdict = "uninformative"
    elif ratio.get("ratio") is None:
        verdict = "uninformative"
    else:
        lo, hi = ratio["interval_95"]
        verdict = "supported" if lo >= SEED_RATIO else "not supported" if hi < SEED_RATIO else "uninformative"
    return {"best_median_mig": best, "informative": informative, "informative_mig": INFORMATIVE_MIG,
            "per_method": per_method, "seed_vs_method": {**ratio, "verdict": verdict}}


def figure(curve_list: Sequence[dict], title: str) -> plt.Figure:
    methods = sorted({c["method"] for c in curve_list})
    fig, axes = plt.subplots(len(SCORES), len(methods), figsize=(4 * len(methods), 2.8 * len(SCORES)),
                             squeeze=False, sharex="col")
    for j, method in enumerate(methods):
        for i, score in enumerate(SCORES):
            ax = axes[i][j]
            for c in (c for c in curve_list if c["method"] == method and c["score"] == score):
                ok = [k for k, m in enumerate(c["median"]) if m is not None]
                x = [c["steps"][k] for k in ok]
                line, = ax.plot(x, [c["median"][k] for k in ok], marker="o",
                                label=f"{c['strength']:g} ({max(c['seeds'])} seeds)")
                ax.fill_between(x, [c["min"][k] for k in ok], [c["max"][k] for k in ok], alpha=0.2,
                                color=line.get_color())
            if score == "mig":
                ax.axhline(INFORMATIVE_MIG, color="grey", ls=":", lw=1)
            ax.set_title(f"{locatello_summary.TITLES.get(method, method)}: {TITLES[score]}", fontsize=9)
            ax.set_xlabel("step") if i == len(SCORES) - 1 else None
            ax.legend(fontsize=7, title="strength", title_fontsize=7)
    fig.suptitle(title + "\nmedian over seeds, band min–max; dotted: MIG 0.1", fontsize=9)
    fig.tight_layout()
    return fig


def summarize(runs_dir: str, out_dir: str, name: str, extra: dict | None = None) -> dict | None:
    """Reads a slice, writes OUT/<name>.json and OUT/<name>.png; None when there are no runs."""
    records = read_slice(runs_dir)
    if not records:
        return None
    cl = curves(records)
    steps = max(r["rows"][-1]["step"] for r in records)
    result = {"runs": len(records), "methods": sorted({r["method"] for r in records}),
              "seeds": sorted({r["seed"] for r in records}), "last_step": steps,
              "sample_sizes": records[0]["sample_sizes"], **(extra or {}),
              "verdicts": verdicts(records, cl), "curves": cl, "records": records}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    fig = figure(cl, f"{name}: {len(records)} runs, {steps:,} steps")
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=110)
    plt.close(fig)
    return result


def row_text(result: dict) -> str:
    """The 'ours' cell of a README row: best medians, informative or not, seed-vs-method verdict."""
    v = result["verdicts"]
    fields = {r["method"]: r["strength_field"] for r in result["records"]}
    parts = [f"{locatello_summary.TITLES.get(m, m)} {p['median_mig_last']:.3f} (best at "
             f"{locatello_summary.STRENGTH_SYMBOL.get(fields[m], fields[m])} = {p['best_strength']:g})"
             for m, p in v["per_method"].items()]
    text = f"median MIG at step {result['last_step']:,}: " + ", ".join(parts)
    if v["informative"]:
        text += "; informative (a median MIG ≥ 0.1)"
    else:
        ext = [f"{locatello_summary.TITLES.get(m, m)} ~{p['extrapolation']['steps_to_target']:,.0f}"
               for m, p in v["per_method"].items() if p["extrapolation"] and p["extrapolation"]["steps_to_target"]]
        text += (f"; not informative (no median MIG ≥ 0.1); log-linear extrapolation to MIG 0.1: "
                 f"{', '.join(ext) or 'no curve rising'} steps (an estimate, not a result)")
    s = v["seed_vs_method"]
    if s.get("ratio") is not None:
        text += (f"; seed vs method variance ratio {s['ratio']:.2f} (95% bootstrap "
                 f"{s['interval_95'][0]:.2f}–{s['interval_95'][1]:.2f}): {s['verdict']}")
    return text


def _cell(c: dict, k: int) -> str:
    if c["median"][k] is None:
        return "–"
    return f"{c['median'][k]:.3f} ({c['min'][k]:.3f}–{c['max'][k]:.3f})"


def published_lines(result: dict) -> list[str]:
    """The slice beside the published numbers (Lin et al. 2020's table) and claims (Chen et al.
    2018), each with its verdict; every comparison with a 300,000-step number says how far
    short of that length the slice is."""
    v, last = result["verdicts"], result["last_step"]
    pub = locatello_summary.PUBLISHED
    best = {}  # (method, score) → (median at the last step, strength), best strength by median
    for c in result["curves"]:
        m = c["median"][-1]
        if m is not None and m > best.get((c["method"], c["score"]), (-math.inf, None))[0]:
            best[(c["method"], c["score"])] = (m, c["strength"])
    lines = []
    for score, per in pub["lin2020"]["values"].items():
        for method, value in per.items():
            if (method, score) not in best:
                continue
            ours, strength = best[(method, score)]
            verdict = ("reached" if ours >= value - locatello_summary.MATCH_TOLERANCE else
                       "not reached at this length" if v["informative"] else "uninformative (not yet disentangling)")
            lines.append(f"- {pub['lin2020']['source']}: {locatello_summary.TITLES.get(method, method)}'s "
                         f"{TITLES[score]} {value} at 300,000+ steps, tuned; ours {ours:.3f} (best median over "
                         f"seeds, strength {strength:g}) at step {last:,} ({last / 300_000:.1%} of that length): "
                         f"**{verdict}**.")
    tc, bv = best.get(("beta_tc_vae", "mig")), best.get(("beta_vae", "mig"))
    if tc and bv:
        verdict = ("uninformative (no median MIG ≥ 0.1)" if not v["informative"] else
                   "supported" if tc[0] > bv[0] else "not supported")
        lines.append(f"- {pub['chen2018']['source']} ({pub['chen2018']['kind']}): {pub['chen2018']['claim']}. "
                     f"Best median MIG at step {last:,}: β-TCVAE {tc[0]:.3f} (β = {tc[1]:g}) vs β-VAE "
                     f"{bv[0]:.3f} (β = {bv[1]:g}): **{verdict}**.")
    s = v["seed_vs_method"]
    if s.get("ratio") is not None:
        lines.append(f"- {pub['locatello2019']['source']} ({pub['locatello2019']['kind']}): "
                     f"{pub['locatello2019']['claim']}. MIG at step {last:,}: mean within-cell variance over "
                     f"seeds / variance of the (method, strength) means = {s['ratio']:.2f}, 95% bootstrap "
                     f"interval {s['interval_95'][0]:.2f}–{s['interval_95'][1]:.2f} ({s['bootstrap']} "
                     f"resamples of the seeds within each of {s['cells']} cells); supported when the "
                     f"interval lies above {s['threshold']}: **{s['verdict']}**.")
    return lines


def markdown(result: dict, title: str, figure_file: str, compute: str) -> str:
    """A section of locatello_dsprites.md for one slice: what was trained and with what compute,
    the curves (figure + table of median (min–max) over seeds at each scored step), whether it
    is informative (else the extrapolation), and the published comparisons with verdicts."""
    v = result["verdicts"]
    fields = {r["method"]: r["strength_field"] for r in result["records"]}
    by_cell: dict[tuple[str, float], dict[str, dict]] = {}
    for c in result["curves"]:
        by_cell.setdefault((c["method"], c["strength"]), {})[c["score"]] = c
    steps = sorted({s for c in result["curves"] for s in c["steps"]})
    sizes = "; ".join(f"{m}: " + ", ".join(f"{k}={x}" for k, x in sorted(a.items()) if k != "encode_batch")
                      for m, a in sorted((result.get("sample_sizes") or {}).items()))
    out = [f"### {title}", "",
           f"{result['runs']} runs ({', '.join(locatello_summary.TITLES.get(m, m) for m in result['methods'])}; "
           f"seeds {', '.join(map(str, result['seeds']))}), {result['last_step']:,} steps each; {compute}. "
           f"Metrics along training every {steps[1] - steps[0] if len(steps) > 1 else 0:,} steps on the "
           f"posterior means, sample sizes: {sizes}.", "",
           f"![curves]({figure_file})", "",
           "Median MIG over seeds (min–max) at each scored step:", "",
           "| method | strength | " + " | ".join(f"step {s:,}" for s in steps) + " | FactorVAE score, last | DCI-D, last |",
           "|---|---|" + "---|" * len(steps) + "---|---|"]
    for (method, strength), sc in sorted(by_cell.items()):
        mig = sc["mig"]
        cells = [_cell(mig, mig["steps"].index(s)) if s in mig["steps"] else "–" for s in steps]
        sym = locatello_summary.STRENGTH_SYMBOL.get(fields[method], fields[method])
        out.append(f"| {locatello_summary.TITLES.get(method, method)} | {sym} = {strength:g} | " + " | ".join(cells)
                   + f" | {_cell(sc['factor_vae_score'], -1)} | {_cell(sc['dci_disentanglement'], -1)} |")
    out.append("")
    if v["informative"]:
        out.append(f"Informative: the best median MIG at the last step is {v['best_median_mig']:.3f} ≥ "
                   f"{v['informative_mig']}.")
    else:
        ext = [f"{locatello_summary.TITLES.get(m, m)} ~{p['extrapolation']['steps_to_target']:,.0f} steps"
               for m, p in v["per_method"].items() if p["extrapolation"] and p["extrapolation"]["steps_to_target"]]
        out.append(f"Not informative: the best median MIG at the last step is {v['best_median_mig']:.3f} < "
                   f"{v['informative_mig']}. A least-squares fit MIG ≈ a + b·ln(step) of each method's "
                   f"best-strength median extrapolates to MIG 0.1 at: {', '.join(ext) or 'no rising curve'} "
                   f"(an estimate from the curve, not a result).")
    out += ["", "Beside the published results:", "", *published_lines(result), ""]
    return "\n".join(out)
