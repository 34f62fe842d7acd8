r"""Results of the CPU-sized Locatello et al. (2019) study on dSprites: JSON, figures, tables.

    python -m experiments.reproduce.summarize --only=locatello --locatello_runs=runs/locatello_cpu

:func:`summarize` reads every run under RUNS/<method>/<run>/ (or runs directly under RUNS; the
method comes from the config, :func:`locatello_dsprites.method_of`, else the directory name)
and RUNS/timing.txt (``train_seconds=… eval_seconds=…``, written by locatello_dsprites_cpu.sh),
and writes into OUT:

  locatello_dsprites.json  every run (method, strength, seed, steps, disentanglement scores,
                           the KL and its splits), per method the median MIG / FactorVAE score /
                           DCI disentanglement with min and max, the cost per model per 1,000
                           steps, the published references and which of them our runs support
                           (computed from the runs, never written in by hand)
  locatello_dsprites.png   per method, MIG, FactorVAE score and DCI disentanglement against the
                           strength, every seed a point (Locatello et al.'s figure style)
  locatello_kl.png         the KL view: how each method's average KL splits into index-code
                           MI, total correlation and dimension-wise KL at each strength, and
                           how each latent dimension's KL splits into ½(trace − 1),
                           ½·Mahalanobis and ½·log-det ratio at the weakest and strongest strength
  locatello_dsprites.md    the per-method table for the README

:func:`readme_row` is the study's row of the README reproduction table.
"""

from __future__ import annotations

from collections.abc import Sequence
import glob
import json
import math
import os
import struct
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments.reproduce import locatello_dsprites
from vaekl import analysis, rundir, train
from vaekl import runs as runs_lib

NAME = "locatello_dsprites"
TITLES = {"beta_vae": "β-VAE", "annealed_vae": "AnnealedVAE", "factor_vae": "FactorVAE",
          "dip_vae_i": "DIP-VAE-I", "dip_vae_ii": "DIP-VAE-II", "beta_tc_vae": "β-TCVAE"}
STRENGTH_SYMBOL = {"beta": "β", "capacity_max": "C_max", "factor_gamma": "γ", "dip_lambda_od": "λ_od"}
# The three scores of the per-method table and figure: result key → eval.json disentanglement key.
SCORES = {"mig": "mig", "factor_vae_score": "factor_vae_score.eval_accuracy",
          "dci_disentanglement": "dci.disentanglement"}
SCORE_TITLES = {"mig": "MIG", "factor_vae_score": "FactorVAE score", "dci_disentanglement": "DCI disentanglement"}
KL_SPLIT = ("index_code_mi", "total_correlation", "dimwise_kl")  # sums to the KL (Hoffman & Johnson)
PER_DIM = ("kl_per_dim", "kl_trace_per_dim", "kl_mahalanobis_per_dim", "kl_log_det_ratio_per_dim")
# A published number counts as matched when ours is within this much of it (scores lie in [0, 1]).
MATCH_TOLERANCE = 0.05
# "The seed matters about as much as the method and strength": the variance across seeds within a
# (method, strength) is at least this fraction of the variance of the (method, strength) means.
SEED_RATIO = 0.5
# Below this best median MIG no method has begun to disentangle (scores near chance).
INFORMATIVE_MIG = 0.1
PUBLISHED = {
    "chen2018": {
        "source": "Chen et al. 2018 (β-TCVAE paper), dSprites",
        "kind": "qualitative: a figure, no number",
        "claim": "β-TCVAE's MIG rises with β and is above β-VAE's at the same β"},
    "lin2020": {
        "source": "Lin et al. 2020 (InfoGAN-CR), table of published dSprites results",
        "kind": "published numbers: each method at its tuned setting, 300,000+ steps",
        "claim": "FactorVAE's own score for FactorVAE ≈ 0.82 (Kim & Mnih 2018); MIG 0.45 for "
                 "β-TCVAE and 0.21 for β-VAE",
        "values": {"factor_vae_score": {"factor_vae": 0.82}, "mig": {"beta_tc_vae": 0.45, "beta_vae": 0.21}}},
    "locatello2019": {
        "source": "Locatello et al. 2019, unsupervised_study_v1",
        "kind": "qualitative: the spread over 50 seeds × 6 strengths × 6 methods",
        "claim": "the random seed matters about as much as the method and its strength"},
}


# ----------------------------------------------------------------------------------------
# Reading the runs.


def _method(run_dir: str, parent: str) -> str | None:
    """The method of a run: from its config, else from the directory it sits in."""
    config = runs_lib.Run(run_dir).config_json
    try:
        return locatello_dsprites.method_of(ml_collections.ConfigDict(config))
    except (ValueError, KeyError, AttributeError):
        return parent if parent in locatello_dsprites.METHODS else None


def find_runs(runs_dir: str) -> list[tuple[str, str]]:
    """(method, run directory) for every run under ``runs_dir``/<method>/ or directly under it."""
    found = []
    for entry in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        path = os.path.join(runs_dir, entry)
        if not os.path.isdir(path) or entry.startswith("."):
            continue
        if runs_lib.Run(path).exists():
            dirs, parent = [path], os.path.basename(os.path.normpath(runs_dir))
        else:
            dirs, parent = analysis.run_dirs(path), entry
        for d in dirs:
            method = _method(d, parent)
            if method is not None:
                found.append((method, d))
    return found


def _last_test_row(run_dir: str) -> dict:
    rows = [r for r in analysis.metrics_rows(run_dir) if r["split"] == "test"]
    return max(rows, key=lambda r: r["step"]) if rows else {}


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def read_run(method: str, run_dir: str, runs_dir: str) -> dict:
    """One run's record: method, strength, seed, steps, disentanglement scores and KL split.

    Numbers come from eval.json; a run without one keeps its last test evaluation in
    metrics.jsonl for the KL (``kl_source``) and has no scores.
    """
    run = runs_lib.Run(run_dir)
    config, ev = run.config_json, run.eval
    last = _last_test_row(run_dir)
    source, src = (rundir.EVAL, ev) if ev else (rundir.METRICS, last)
    _, field, _, _ = locatello_dsprites.METHODS[method]
    dis = {k: float(v) for k, v in (ev.get("disentanglement") or {}).items() if _float(v) is not None}
    rec = {"method": method, "run": os.path.relpath(run_dir, runs_dir), "strength_field": field,
           "strength": _float(config.get(field)), "seed": config.get("seed"),
           "steps": int(ev.get("step", last.get("step", 0)) or 0), "num_steps": config.get("num_steps"),
           "evaluated": bool(dis), "kl_source": source, "eval_seconds": _float(ev.get("eval_seconds")),
           **{k: dis.get(key) for k, key in SCORES.items()}, "disentanglement": dis,
           "disentanglement_options": ev.get("disentanglement_options")}
    for k in ("kl", *KL_SPLIT, "neg_elbo", "recon", "nll", "active_units"):
        rec[k] = _float(src.get(k))
        if _float(src.get(k + "_se")) is not None:
            rec[k + "_se"] = _float(src[k + "_se"])
    for k in PER_DIM:
        v = src.get(k) if isinstance(src.get(k), list) else last.get(k)
        rec[k] = [float(x) for x in v] if isinstance(v, list) else None
    return rec


def read_timing(runs_dir: str) -> dict[str, float]:
    """``train_seconds`` and ``eval_seconds`` from RUNS/timing.txt ({} if it is missing)."""
    path = os.path.join(runs_dir, "timing.txt")
    out = {}
    if os.path.exists(path):
        for part in open(path).read().split():
            k, _, v = part.partition("=")
            if _safe_number(v) is not None:
                out[k] = _safe_number(v)
    return out


def _safe_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def train_batch_times(run_dir: str) -> dict[int, float]:
    """step → wall time [s] of the run's first TensorBoard event of each logged train_batch
    row (tensorboard/events.out.tfevents.*, TFRecord framing of tensorboardX Event protos)."""
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    times: dict[int, float] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + n > len(data):
                break  # a record cut off mid-write
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n  # length, its CRC, the record, its CRC
            if any(v.tag.startswith("train_batch/") for v in event.summary.value):
                times.setdefault(int(event.step), float(event.wall_time))
    return times


def steady_seconds_per_1k_steps(run_dir: str) -> float | None:
    """Training seconds per model and 1,000 steps without start-up, compilation or evaluation:
    the fastest interval between consecutive logged training steps (after the first log),
    divided by the models that shared the program's steps (its group's members, from the run's
    group commit marker; 1 for a run trained alone)."""
    t = sorted(train_batch_times(run_dir).items())
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(t, t[1:]) if b[0] > a[0] and b[1] >= a[1]]
    marker = train.read_group_commit(run_dir)
    members = len(marker["members"]) if marker and marker["members"] else 1
    return 1000 * min(rates) / members if rates else None


def cost(runs_dir: str, records: Sequence[dict]) -> dict:
    """Seconds per model per 1,000 steps: timing.txt's training time / models / (steps / 1000)
    (without timing.txt, the sum over runs of config.json → samples.png file times), which
    includes start-up and compilation; and the steady-state rate of each run (the median over
    runs of :func:`steady_seconds_per_1k_steps`), which is what scales to long runs."""
    models = len(records)
    steps = float(np.median([r["steps"] for r in records])) if records else float("nan")
    timing = read_timing(runs_dir)
    source = "timing.txt"
    if "train_seconds" not in timing:
        source = "file times (config.json → samples.png; evaluation time unknown)"
        train = 0.0
        for r in records:
            d = os.path.join(runs_dir, r["run"])
            start = os.path.getmtime(os.path.join(d, rundir.CONFIG))
            end = os.path.join(d, rundir.SAMPLES)
            if os.path.exists(end):
                train += os.path.getmtime(end) - start
        timing = {"train_seconds": train}
    per_model = timing["train_seconds"] / models if models else float("nan")
    steady = [x for x in (steady_seconds_per_1k_steps(os.path.join(runs_dir, r["run"])) for r in records)
              if x is not None]
    eval_s = timing.get("eval_seconds")
    own = [r["eval_seconds"] for r in records if r.get("eval_seconds") is not None]
    eval_per_model = (float(np.mean(own)) if own and len(own) == models else
                      eval_s / models if models and eval_s is not None else None)
    return {"source": source, "models": models, "steps_per_model": steps,
            "steady_seconds_per_model_per_1k_steps": float(np.median(steady)) if steady else None,
            "steady_source": f"TensorBoard event times of {len(steady)} run(s): the fastest interval between "
                             "logged training steps",
            "train_seconds": timing["train_seconds"], "eval_seconds": timing.get("eval_seconds"),
            "seconds_per_model_per_1k_steps": per_model / (steps / 1000) if steps else float("nan"),
            "eval_seconds_per_model": eval_per_model,
            "eval_source": ("eval.json's eval_seconds, mean over runs" if own and len(own) == models
                            else "timing.txt / models"),
            "note": "wall time on this machine including start-up and compilation, which dominate short runs"}


# ----------------------------------------------------------------------------------------
# Summaries and claims.


def _stats(values: Sequence[float | None]) -> dict:
    v = np.array([x for x in values if x is not None], float)
    if not v.size:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _by_strength(records: Sequence[dict], key: str) -> dict[float, list[float]]:
    out: dict[float, list[float]] = {}
    for r in records:
        if r.get(key) is not None and r["strength"] is not None:
            out.setdefault(r["strength"], []).append(r[key])
    return dict(sorted(out.items()))


def per_method(records: Sequence[dict]) -> dict[str, dict]:
    """Per method (in METHODS order): strengths, seeds, runs, and for each score its median,
    min and max over every run, and the median over seeds at each strength."""
    out = {}
    for method in locatello_dsprites.METHODS:
        rs = [r for r in records if r["method"] == method]
        if not rs:
            continue
        out[method] = {
            "title": TITLES[method], "strength_field": rs[0]["strength_field"],
            "strengths": sorted({r["strength"] for r in rs if r["strength"] is not None}),
            "seeds": sorted({r["seed"] for r in rs if r["seed"] is not None}),
            "runs": len(rs), "evaluated": sum(r["evaluated"] for r in rs),
            **{k: _stats([r[k] for r in rs]) for k in SCORES},
            "median_by_strength": {k: {f"{s:g}": float(np.median(v)) for s, v in _by_strength(rs, k).items()}
                                   for k in SCORES}}
    return out


def _cannot(why: str) -> dict:
    return {"status": "cannot test", "why": why}


def chen2018(records: Sequence[dict]) -> dict:
    """β-TCVAE's MIG above β-VAE's at every β both ran (seed medians), and rising with β
    (seed medians non-decreasing over β, and the highest β above the lowest)."""
    tc = _by_strength([r for r in records if r["method"] == "beta_tc_vae"], "mig")
    bv = _by_strength([r for r in records if r["method"] == "beta_vae"], "mig")
    common = sorted(set(tc) & set(bv))
    out = {}
    if common:
        rows = [{"beta": b, "beta_tc_vae": float(np.median(tc[b])), "beta_vae": float(np.median(bv[b]))}
                for b in common]
        above = all(r["beta_tc_vae"] > r["beta_vae"] for r in rows)
        out["above_beta_vae_at_same_beta"] = {"status": "supported" if above else "not supported", "by_beta": rows}
    else:
        out["above_beta_vae_at_same_beta"] = _cannot("no β evaluated for both β-TCVAE and β-VAE")
    if len(tc) >= 2:
        med = [float(np.median(v)) for v in tc.values()]
        rising = all(b >= a for a, b in zip(med, med[1:])) and med[-1] > med[0]
        out["rises_with_beta"] = {"status": "supported" if rising else "not supported",
                                  "beta": list(tc), "median_mig": med}
    else:
        out["rises_with_beta"] = _cannot("β-TCVAE evaluated at fewer than two β")
    return out


def lin2020(methods: dict[str, dict]) -> dict:
    """Ours against the published numbers: the best seed median over strengths (the papers
    report tuned settings), "supported" when within :data:`MATCH_TOLERANCE`, else "not reached"
    or "exceeded"; and the ordering
    β-TCVAE's MIG > β-VAE's (medians over all their runs)."""
    out = {}
    for score, per in PUBLISHED["lin2020"]["values"].items():
        for method, published in per.items():
            by = methods.get(method, {}).get("median_by_strength", {}).get(score, {})
            if not by:
                out[f"{method}.{score}"] = {**_cannot(f"{TITLES[method]} not evaluated"), "published": published}
                continue
            best_at, best = max(by.items(), key=lambda kv: kv[1])
            diff = best - published
            out[f"{method}.{score}"] = {
                "published": published, "ours_best_median": best, "at_strength": float(best_at),
                "ours_median_all": methods[method][score]["median"], "difference": diff,
                "status": "supported" if abs(diff) <= MATCH_TOLERANCE else
                          ("not reached (ours lower)" if diff < 0 else "exceeded (ours higher)")}
    tc, bv = (methods.get(m, {}).get("mig", {}).get("median") for m in ("beta_tc_vae", "beta_vae"))
    out["mig_order"] = (_cannot("β-TCVAE or β-VAE not evaluated") if tc is None or bv is None else
                        {"status": "supported" if tc > bv else "not supported",
                         "beta_tc_vae": tc, "beta_vae": bv})
    return out


def seed_vs_config(records: Sequence[dict], score: str) -> dict:
    """Variance of ``score`` across seeds within a (method, strength) (mean of the groups'
    ddof=1 variances, groups with ≥ 2 evaluated seeds) against the variance of the
    (method, strength) seed means (ddof=1); ``seed_share`` = within-group sum of squares /
    total sum of squares."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r.get(score) is not None:
            groups.setdefault((r["method"], r["strength"]), []).append(r[score])
    multi = [np.array(v) for v in groups.values() if len(v) >= 2]
    if len(groups) < 2 or not multi:
        return _cannot("needs ≥ 2 evaluated (method, strength) groups and one with ≥ 2 seeds")
    seed_var = float(np.mean([v.var(ddof=1) for v in multi]))
    means = np.array([np.mean(v) for v in groups.values()])
    config_var = float(means.var(ddof=1))
    allv = np.concatenate([np.array(v) for v in groups.values()])
    within = sum(float(((np.array(v) - np.mean(v)) ** 2).sum()) for v in groups.values())
    total = float(((allv - allv.mean()) ** 2).sum())
    ratio = seed_var / config_var if config_var > 0 else math.inf
    return {"status": "supported" if ratio >= SEED_RATIO else "not supported",
            "seed_variance": seed_var, "config_variance": config_var, "ratio": ratio,
            "seed_share": within / total if total > 0 else float("nan"),
            "groups": len(groups), "groups_with_seeds": len(multi),
            "seeds_per_group": sorted({len(v) for v in groups.values()})}


def informative(methods: dict[str, dict]) -> dict:
    """Whether the runs have begun to disentangle: some method's median MIG ≥ INFORMATIVE_MIG.
    Below it every score is near chance, and seed-vs-method comparisons compare noise."""
    medians = [m["mig"]["median"] for m in methods.values() if m.get("mig", {}).get("median") is not None]
    best = max(medians) if medians else None
    return {"best_median_mig": best, "threshold": INFORMATIVE_MIG,
            "informative": best is not None and best >= INFORMATIVE_MIG}


def claims(records: Sequence[dict], methods: dict[str, dict]) -> dict:
    """Each published reference, marked as what it is, with what our runs say about it."""
    info = informative(methods)
    caveat = (None if info["informative"] else
              f"no method's median MIG reaches {INFORMATIVE_MIG} (best "
              f"{_num(info['best_median_mig'])}): the models have not begun to disentangle, so the seed and "
              "(method, strength) differences are mostly noise and this comparison is not evidence either way")
    return {
        "chen2018": {**PUBLISHED["chen2018"], "ours": chen2018(records)},
        "lin2020": {**PUBLISHED["lin2020"], "ours": lin2020(methods)},
        "locatello2019": {**PUBLISHED["locatello2019"],
                          "ours": {k: seed_vs_config(records, k) for k in SCORES},
                          "rule": f"supported when the seed variance is ≥ {SEED_RATIO} × the variance of the "
                                  "(method, strength) means", "informative": info, "caveat": caveat},
    }


def kl_view(records: Sequence[dict], methods: dict[str, dict]) -> dict:
    """Per method: at each strength the seed means of the KL and its split (index-code MI,
    total correlation, dimension-wise KL); at its weakest and strongest strength the seed
    means of each latent dimension's terms, dimensions sorted by KL (descending) within each
    run; and the change of each part from the weakest to the strongest strength [nats]."""
    out = {}
    for method, m in methods.items():
        rs = [r for r in records if r["method"] == method]
        split = {}
        for s in m["strengths"]:
            g = [r for r in rs if r["strength"] == s]
            split[f"{s:g}"] = {k: _mean([r[k] for r in g]) for k in ("kl", *KL_SPLIT)}
        dims = {}
        for which, s in (("weakest", m["strengths"][0]), ("strongest", m["strengths"][-1])) if m["strengths"] else ():
            dims[which] = {"strength": s, **sorted_terms([r for r in rs if r["strength"] == s])}
        change = {}
        if len(m["strengths"]) >= 2:
            lo, hi = split[f"{m['strengths'][0]:g}"], split[f"{m['strengths'][-1]:g}"]
            change = {k: (hi[k] - lo[k]) if hi[k] is not None and lo[k] is not None else None
                      for k in ("kl", *KL_SPLIT)}
            for term in ("half_trace_minus_1", "half_mahalanobis", "half_log_det"):
                a, b = dims["weakest"].get(term), dims["strongest"].get(term)
                change[term + "_sum"] = float(np.sum(b) - np.sum(a)) if a and b else None
        out[method] = {"split_by_strength": split, "per_dim": dims, "change_weakest_to_strongest": change}
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def sorted_terms(records: Sequence[dict]) -> dict:
    """Seed means of the per-dimension KL and ½(trace − 1), ½·Mahalanobis, ½·log-det ratio,
    each run's dimensions sorted by their KL (descending) first. {} if no run has them."""
    rows = []
    for r in records:
        if all(r.get(k) for k in PER_DIM):
            kl, tr, ma, ld = (np.asarray(r[k], float) for k in PER_DIM)
            o = np.argsort(-kl, kind="stable")
            rows.append(np.stack([kl[o], 0.5 * (tr[o] - 1), 0.5 * ma[o], 0.5 * ld[o]]))
    if not rows or len({x.shape for x in rows}) != 1:
        return {}
    mean = np.mean(rows, axis=0)
    return {"seeds": len(rows), "kl": mean[0].tolist(), "half_trace_minus_1": mean[1].tolist(),
            "half_mahalanobis": mean[2].tolist(), "half_log_det": mean[3].tolist()}


# ----------------------------------------------------------------------------------------
# Figures.


def scores_figure(df, methods: dict[str, dict]) -> plt.Figure:
    """MIG, FactorVAE score and DCI disentanglement (rows) against each method's strength
    (columns), every seed a point, the median a line; published numbers dashed."""
    reg = {m: locatello_dsprites.METHODS[m][0] for m in methods}
    vals = PUBLISHED["lin2020"]["values"]
    refs = {("mig", reg[m]): [(v, f"{TITLES[m]} {v} (published, via Lin et al. 2020)")]
            for m, v in vals["mig"].items() if m in reg}
    refs.update({(SCORES["factor_vae_score"], reg[m]): [(v, f"{v} (Kim & Mnih 2018, via Lin et al. 2020)")]
                 for m, v in vals["factor_vae_score"].items() if m in reg})
    fig = analysis.metric_vs_strength(df, list(SCORES.values()), group="regularizer",
                                      titles={reg[m]: TITLES[m] for m in methods}, references=refs, wrap=False)
    fig.suptitle("Locatello et al. (2019) study on dSprites, CPU-sized:\nscores against regularization strength",
                 fontsize=10)
    return fig


COLORS = {"index_code_mi": "tab:blue", "total_correlation": "tab:red", "dimwise_kl": "tab:green",
          "half_trace_minus_1": "tab:purple", "half_mahalanobis": "tab:orange", "half_log_det": "tab:cyan"}
LABELS = {"index_code_mi": "index-code MI", "total_correlation": "total correlation",
          "dimwise_kl": "dimension-wise KL", "half_trace_minus_1": "½(tr − 1) = ½(σ² − 1)",
          "half_mahalanobis": "½·Mahalanobis = ½μ²", "half_log_det": "½·log-det ratio = −½ log σ²"}


def _stacked(ax, xs: np.ndarray, parts: dict[str, np.ndarray], width: float) -> None:
    """Bars stacked upward from 0 for positive parts and downward for negative ones."""
    up, down = np.zeros(len(xs)), np.zeros(len(xs))
    for name, v in parts.items():
        v = np.nan_to_num(np.asarray(v, float))
        pos, neg = np.maximum(v, 0), np.minimum(v, 0)
        ax.bar(xs, pos, width, bottom=up, color=COLORS[name], lw=0)
        ax.bar(xs, neg, width, bottom=down, color=COLORS[name], lw=0)
        up, down = up + pos, down + neg


def kl_figure(view: dict, methods: dict[str, dict]) -> plt.Figure:
    """The KL view: row 1, each method's KL split into index-code MI, total correlation and
    dimension-wise KL at each strength (seed means; black: the KL); rows 2 and 3, each latent
    dimension's KL split into ½(trace − 1), ½·Mahalanobis and ½·log-det ratio at the weakest
    and the strongest strength (dimensions sorted by KL; black: the dimension's KL)."""
    names = list(methods)
    fig, axes = plt.subplots(3, len(names), figsize=(max(2.9 * len(names) + 0.6, 8.0), 8.4), squeeze=False,
                             layout="constrained")
    for j, m in enumerate(names):
        v, sym = view[m], STRENGTH_SYMBOL.get(methods[m]["strength_field"], methods[m]["strength_field"])
        keys = list(v["split_by_strength"])
        xs = np.arange(len(keys))
        ax = axes[0][j]
        _stacked(ax, xs, {k: [v["split_by_strength"][s][k] or 0.0 for s in keys] for k in KL_SPLIT}, 0.6)
        ax.plot(xs, [v["split_by_strength"][s]["kl"] or np.nan for s in keys], "k_", ms=22, mew=2)
        ax.set_xticks(xs, keys)
        ax.set_xlabel(sym)
        ax.set_title(TITLES[m], fontsize=10)
        ax.axhline(0, color="k", lw=0.6)
        for i, which in ((1, "weakest"), (2, "strongest")):
            ax = axes[i][j]
            d = v["per_dim"].get(which, {})
            if not d.get("kl"):
                ax.text(0.5, 0.5, "no per-dimension terms", ha="center", va="center", transform=ax.transAxes)
                continue
            xs = np.arange(1, len(d["kl"]) + 1)
            _stacked(ax, xs, {k: d[k] for k in ("half_trace_minus_1", "half_mahalanobis", "half_log_det")}, 0.7)
            ax.plot(xs, d["kl"], "k_", ms=9, mew=2)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(xs, [str(x) if len(xs) <= 10 or x % 2 == 1 else "" for x in xs], fontsize=7)
            ax.set_title(f"{which}: {sym}={d['strength']:g} ({d['seeds']} seed(s))", fontsize=8.5)
            ax.set_xlabel("latent dimension, by KL")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3, axis="y")
        lo = min(axes[1][j].get_ylim()[0], axes[2][j].get_ylim()[0])
        hi = max(axes[1][j].get_ylim()[1], axes[2][j].get_ylim()[1])
        pad = 0.05 * (hi - lo)
        axes[1][j].set_ylim(lo - pad, hi + pad)
        axes[2][j].set_ylim(lo - pad, hi + pad)
    axes[0][0].set_ylabel("average KL and its split [nats]")
    axes[1][0].set_ylabel("KL of each dimension [nats]")
    axes[2][0].set_ylabel("KL of each dimension [nats]")
    handles = [Patch(color=COLORS[k], label=LABELS[k]) for k in COLORS]
    handles.append(plt.Line2D([], [], color="k", ls="", marker="_", ms=12, mew=2, label="the KL (its sum)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles) if len(names) >= 4 else 3,
               fontsize=8, frameon=False)
    fig.suptitle("Which part of the KL each regularizer moves (test set, seed means)", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------
# Tables and the README row.


def _change(split: dict, key: str, digits: int) -> str:
    """'a → b' of ``key`` from the weakest to the strongest strength of a method's KL split."""
    keys = sorted(split, key=float)
    lo, hi = split[keys[0]][key], split[keys[-1]][key]
    return f"{lo:.{digits}f} → {hi:.{digits}f}"


def kl_view_md(result: dict) -> str:
    """The README's paragraph on the study's KL view, every number read from ``result``: per
    method the KL and its total-correlation and dimension-wise parts from the weakest to the
    strongest strength (seed means, nats), and how β-VAE's most active dimension at β's weakest
    strength splits into the three terms."""
    steps = result["cost"].get("steps_per_model")
    inf = informative(result["methods"])
    best = inf.get("best_median_mig")
    out = [f"At {steps:,.0f} steps the best median MIG is {best:.3f}" if best is not None and steps else "",
           (" (below 0.1: no model has begun to disentangle, so the published scores are not reached and the "
            "seed-versus-method comparison is marked uninformative)." if best is not None and not inf.get("informative")
            else "."), " What the runs do show is the KL view (right; `kl_view` in the json), weakest → strongest "
           "strength, seed means in nats:"]
    parts = []
    for method, v in result["kl_view"].items():
        split = v["split_by_strength"]
        if len(split) < 2 or any(split[k][x] is None for k in split for x in ("kl", "total_correlation", "dimwise_kl")):
            continue
        m = result["methods"][method]
        sym = STRENGTH_SYMBOL.get(m["strength_field"], m["strength_field"])
        parts.append(f"{m['title']} ({sym} {m['strengths'][0]:g} → {m['strengths'][-1]:g}): KL {_change(split, 'kl', 1)}, "
                     f"total correlation {_change(split, 'total_correlation', 2)}, dimension-wise KL "
                     f"{_change(split, 'dimwise_kl', 1)}")
    out.append(" " + "; ".join(parts) + ".")
    dims = result["kl_view"].get("beta_vae", {}).get("per_dim", {}).get("weakest", {})
    if dims.get("kl"):
        kl, ma, ld, tr = dims["kl"][0], dims["half_mahalanobis"][0], dims["half_log_det"][0], dims["half_trace_minus_1"][0]
        out.append(f" Within β-VAE's most active dimension at β = {dims['strength']:g} ({kl:.2f} nats), the "
                   f"Mahalanobis term ½μ² is {ma:.2f}, −½ log σ² is {ld:.2f} and ½(σ² − 1) is "
                   + f"{tr:.2f}.".replace("-", "−"))
    out.append(f" These are {steps:,.0f}-step models: a direction of movement, not a converged value.")
    return "".join(out)


def _fmt(s: dict | None) -> str:
    if not s or s.get("median") is None:
        return "–"
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def table_md(result: dict) -> str:
    """The per-method table: strengths, seeds, and each score's median (min–max) over runs."""
    rows = ["| method | strengths | median MIG (min–max) | median FactorVAE score (min–max) | "
            "median DCI disentanglement (min–max) |", "|---|---|---|---|---|"]
    for m in result["methods"].values():
        sym = STRENGTH_SYMBOL.get(m["strength_field"], m["strength_field"])
        strengths = f"{sym} ∈ {{{', '.join(f'{s:g}' for s in m['strengths'])}}} × {len(m['seeds'])} seed(s)"
        if m["evaluated"] < m["runs"]:
            strengths += f"; {m['evaluated']} of {m['runs']} runs evaluated"
        rows.append(f"| {m['title']} | {strengths} | {_fmt(m['mig'])} | {_fmt(m['factor_vae_score'])} | "
                    f"{_fmt(m['dci_disentanglement'])} |")
    c = result["cost"]
    lines = ["\n".join(rows), "",
             f"Cost on this machine: {c['models']} models of {c['steps_per_model']:g} steps; "
             f"{_num(c.get('steady_seconds_per_model_per_1k_steps'), 0)} s per model per 1,000 training steps "
             f"in steady state ({c.get('steady_source')}), "
             f"{_num(c['seconds_per_model_per_1k_steps'], 0)} s with start-up and compilation ({c['source']}); "
             + (f"{c['eval_seconds_per_model']:.0f} s of evaluation per model." if c['eval_seconds_per_model']
                is not None else "evaluation not timed (no timing.txt)."), "",
             "Published references, and what these runs say about them:", ""]
    lines += [f"- {line}" for line in claim_lines(result["claims"])]
    return "\n".join(lines)


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def claim_lines(c: dict) -> list[str]:
    """One line per published reference: what it says, what kind of reference it is, ours."""
    ch, lin, loc = c["chen2018"], c["lin2020"], c["locatello2019"]
    above, rising = ch["ours"]["above_beta_vae_at_same_beta"], ch["ours"]["rises_with_beta"]
    at = "; ".join(f"β={r['beta']:g}: {r['beta_tc_vae']:.3f} vs {r['beta_vae']:.3f}" for r in above.get("by_beta", []))
    out = [f"{ch['source']} ({ch['kind']}): {ch['claim']}. Above β-VAE at the same β: **{above['status']}**"
           + (f" ({at})" if at else f" ({above.get('why')})")
           + f"; rising with β: **{rising['status']}**"
           + (f" (median MIG {', '.join(f'{x:.3f}' for x in rising['median_mig'])} at β "
              f"{', '.join(f'{b:g}' for b in rising['beta'])})" if "median_mig" in rising
              else f" ({rising.get('why')})")
           + "."]
    parts = []
    for key, r in lin["ours"].items():
        if key == "mig_order":
            continue
        method, score = key.split(".")
        ours = (f"ours {r['ours_best_median']:.3f} (best seed median, at strength {r['at_strength']:g})"
                if "ours_best_median" in r else r.get("why", ""))
        parts.append(f"{TITLES[method]}'s {SCORE_TITLES[score]} {r['published']}: {ours}, **{r['status']}**")
    order = lin["ours"]["mig_order"]
    out.append(f"{lin['source']} ({lin['kind']}): " + "; ".join(parts)
               + f". β-TCVAE's MIG above β-VAE's: **{order['status']}**"
               + (f" ({order['beta_tc_vae']:.3f} vs {order['beta_vae']:.3f})" if "beta_tc_vae" in order else "")
               + f" (matched = within {MATCH_TOLERANCE}).")
    parts = []
    for score, r in loc["ours"].items():
        if r["status"] == "cannot test":
            parts.append(f"{SCORE_TITLES[score]}: cannot test ({r['why']})")
        else:
            parts.append(f"{SCORE_TITLES[score]}: seed variance {r['seed_variance']:.2g} vs (method, strength) "
                         f"variance {r['config_variance']:.2g}, ratio {r['ratio']:.2f}, **{r['status']}**")
    out.append(f"{loc['source']} ({loc['kind']}): {loc['claim']}. " + "; ".join(parts) + f" ({loc['rule']})."
               + (f" **Caveat:** {loc['caveat']}." if loc.get("caveat") else ""))
    return out


def readme_row(result: dict) -> str:
    """The study's row of the README reproduction table."""
    methods, c, cl = result["methods"], result["cost"], result["claims"]
    lin = cl["lin2020"]["ours"]

    def best(key: str) -> str:
        r = lin.get(key, {})
        return f"{r['ours_best_median']:.2f}" if "ours_best_median" in r else "–"

    above = cl["chen2018"]["ours"]["above_beta_vae_at_same_beta"]["status"]
    loc = cl["locatello2019"]["ours"]["mig"]
    seed = (f"seed/(method, strength) variance of MIG {loc['ratio']:.2f}: {loc['status']}"
            if "ratio" in loc else f"seed vs method: {loc['status']}")
    if cl["locatello2019"].get("caveat"):
        seed += (f" but uninformative (best median MIG {_num(cl['locatello2019']['informative']['best_median_mig'])}"
                 f" < {INFORMATIVE_MIG}: not yet disentangling)")
    strengths = sorted({len(m["strengths"]) for m in methods.values()})
    seeds = sorted({len(m["seeds"]) for m in methods.values()})
    steps = f"{c['steps_per_model']:,.0f}"
    train_min = c["train_seconds"] / 60 if c["train_seconds"] is not None else None
    eval_min = (c["eval_seconds_per_model"] * c["models"] / 60 if c.get("eval_seconds_per_model") is not None
                else None)  # summed over models (evaluations may run beside training)
    pub = PUBLISHED["lin2020"]["values"]
    published = (f"FactorVAE score {pub['factor_vae_score']['factor_vae']} for FactorVAE; MIG "
                 f"{pub['mig']['beta_tc_vae']} β-TCVAE, {pub['mig']['beta_vae']} β-VAE (Lin et al. 2020's table); "
                 "β-TCVAE's MIG > β-VAE's, rising with β (Chen et al. 2018); seed matters ≈ method + strength "
                 "(Locatello et al.)")
    ours = (f"FactorVAE score {best('factor_vae.factor_vae_score')}; MIG β-TCVAE {best('beta_tc_vae.mig')}, "
            f"β-VAE {best('beta_vae.mig')} (best seed medians); β-TCVAE above β-VAE at same β: {above}; {seed}")
    time = (f"{_num(train_min, 1)} min train"
            + (f" + {eval_min:.1f} min eval (summed over models)" if eval_min is not None else " (evaluation not timed)")
            + f"; {_num(c.get('steady_seconds_per_model_per_1k_steps'), 0)} s per model per 1,000 steps of one core "
            f"in steady state ({_num(c['seconds_per_model_per_1k_steps'], 0)} of wall time with start-up, "
            "the launchers side by side)")
    notes = (f"{len(methods)} method(s) × {'/'.join(map(str, strengths))} strengths × {'/'.join(map(str, seeds))} "
             f"seed(s), {steps} of 300,000 steps; see locatello_dsprites.md; full scale: `python -m launch.sweep "
             "--config=experiments/reproduce/locatello_dsprites.py:METHOD`")
    return (f"| Locatello et al. 2019 study (dSprites, CPU-sized) | {published} | {ours} | "
            f"`bash experiments/reproduce/locatello_dsprites_cpu.sh` | dSprites rendered on the device | {time} | "
            f"{notes} |")


# ----------------------------------------------------------------------------------------
# Everything.


def summarize(runs_dir: str, out_dir: str) -> dict | None:
    """Writes locatello_dsprites.{json,png,md} and locatello_kl.png into ``out_dir`` from the
    runs under ``runs_dir``; returns the result (the JSON's content), or None without runs."""
    found = find_runs(runs_dir)
    if not found:
        return None
    records = [read_run(m, d, runs_dir) for m, d in found]
    methods = per_method(records)
    result = {"runs_dir": os.path.abspath(runs_dir), "runs": records, "methods": methods,
              "cost": cost(runs_dir, records), "claims": claims(records, methods),
              "kl_view": kl_view(records, methods)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{NAME}.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    df = analysis.load_runs([d for _, d in found], root=runs_dir)
    for fig, name in ((scores_figure(df, methods), NAME), (kl_figure(result["kl_view"], methods), "locatello_kl")):
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=110)
        plt.close(fig)
    with open(os.path.join(out_dir, f"{NAME}.md"), "w") as f:
        f.write(table_md(result) + "\n")
    return result
