r"""Issue 21's reproduction rows from their run directories → ROW.json, ROW.png (and a table).

    python -m experiments.reproduce.closed_vs_mc --row=kl_estimators --row_runs=runs/kl_estimators
    python -m experiments.reproduce.closed_vs_mc --row=priors --row_runs=runs/priors
    python -m experiments.reproduce.closed_vs_mc --row=iwae_objective --row_runs=runs/iwae_objective

Each run is read from its config.json, eval.json (experiments.evaluate) and metrics.jsonl, and
grouped by the row's field (kl_estimator, prior, iwae_k). Per group and metric: mean, sd, min,
max over the seeds of the test −ELBO, the importance-weighted NLL, the active units, and the
steps to reach a fixed test −ELBO (``--target``; default the largest final test −ELBO among
the runs, so that every run reaches it; a run that never does counts as NaN). Writes
--out/closed_vs_mc_ROW.json (configs in experiments/reproduce/mnist_{kl_estimators,priors,
iwae_objective}.py), with the test −ELBO curves per group in closed_vs_mc_ROW.png and the
published claim the row tests (:data:`PUBLISHED`) with a verdict read from the numbers.
``gradient_variance(run_dirs)`` gathers experiments.gradient_variance's files of several seeds
into one result (ratios to the analytic estimator per checkpoint: mean and range over seeds).
"""

from __future__ import annotations

import json
import math
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from vaekl import analysis, rundir
from vaekl import runs as runs_lib

ROWS = {"kl_estimators": "kl_estimator", "priors": "prior", "iwae_objective": "iwae_k"}
METRICS = ("neg_elbo", "nll", "active_units", "steps_to_target")
# What each row's paper published (their architecture, data and schedule: the direction is the claim).
PUBLISHED = {
    "kl_estimators": "Kingma & Welling 2014: the analytic KL (estimator B) has lower variance than the "
                     "one-draw MC KL (estimator A) and trains at least as well; Roeder et al. 2017: STL's "
                     "gradient variance is lower still near convergence",
    "priors": "Tomczak & Welling 2018, Table 2 (one stochastic layer, dynamic MNIST): standard normal "
              "88.56 → VampPrior 85.57 nats",
    "iwae_objective": "Burda et al. 2016, Table 1 (one stochastic layer): VAE (k = 1) 86.76, IWAE k = 5 "
                      "85.54, k = 50 84.78 nats; the active units grow with k (19 at k = 1)",
}



def define_flags() -> None:
    """The command line's flags, defined only when this module is the main program (other absl
    mains, e.g. summarize, define --out too, and tests import both)."""
    flags.DEFINE_enum("row", None, list(ROWS), "Which row.")
    flags.DEFINE_string("row_runs", None, "The row's sweep directory.")
    flags.DEFINE_string("out", "docs/reproductions", "Where closed_vs_mc_ROW.json goes.")
    flags.DEFINE_float("target", None, "The fixed test −ELBO (default: the worst run's final one).")


def _read(run_dir: str) -> dict:
    run = runs_lib.Run(run_dir)
    if not run.eval:
        raise FileNotFoundError(f"{run.file(rundir.EVAL)} is missing or unreadable: run python -m "
                                f"experiments.evaluate --workdir={run_dir}")
    curve = [(r["step"], float(r["neg_elbo"])) for r in run.metrics() if r["split"] == "test"]
    return {"run": run.name, "config": run.config_json, "eval": run.eval, "curve": sorted(curve)}


def steps_to(curve: list[tuple[int, float]], target: float) -> float:
    """The first evaluated step whose test −ELBO is ≤ target (NaN if none)."""
    return next((float(s) for s, v in curve if v <= target), math.nan)


def _stats(values) -> dict:
    a = np.asarray(values, np.float64)
    ok = a[np.isfinite(a)]
    if not len(ok):
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(ok.mean()), "sd": float(ok.std(ddof=1)) if len(ok) > 1 else math.nan,
            "min": float(ok.min()), "max": float(ok.max()), "n": int(len(ok))}


def summarize(runs_dir: str, row: str, target: float | None = None) -> dict:
    """The row's result: {row, field, target, groups: {value: {seeds, runs, <metric>: stats}}}."""
    field = ROWS[row]
    dirs = [r.path for r in runs_lib.find(runs_dir)]
    if not dirs:
        raise FileNotFoundError(f"no run directory in {runs_dir}")
    runs = [_read(d) for d in dirs]
    if target is None:
        target = max(r["curve"][-1][1] for r in runs)
    groups: dict = {}
    for r in runs:
        g = groups.setdefault(str(r["config"][field]), {"seeds": [], "runs": [], "values": [], "curves": []})
        g["seeds"].append(r["config"]["seed"])
        g["runs"].append(r["run"])
        g["curves"].append(r["curve"])
        g["values"].append({"neg_elbo": r["eval"]["neg_elbo"], "nll": r["eval"]["nll"],
                            "active_units": r["eval"]["active_units"],
                            "steps_to_target": steps_to(r["curve"], target)})
    for g in groups.values():
        values = g.pop("values")
        for m in METRICS:
            g[m] = _stats([v[m] for v in values])
    steps = {r["config"]["num_steps"] for r in runs}
    return {"row": row, "field": field, "target_neg_elbo": float(target), "num_steps": sorted(steps),
            "num_samples": sorted({r["eval"].get("num_samples") for r in runs}),
            "nll_num_test": sorted({r["eval"].get("nll_num_test", r["eval"].get("num_test")) for r in runs}),
            "groups": groups, "published": PUBLISHED[row]}


def _mean(result: dict, group: str, metric: str) -> float:
    return result["groups"][group][metric]["mean"] if group in result["groups"] else math.nan


def difference(result: dict, a: str, b: str, metric: str = "nll") -> tuple[float, float]:
    """(mean_a − mean_b, its standard error over seeds: √(sd_a²/n_a + sd_b²/n_b))."""
    ga, gb = result["groups"][a][metric], result["groups"][b][metric]
    var = sum((g["sd"] ** 2 / g["n"]) if g["n"] > 1 and math.isfinite(g["sd"]) else 0.0 for g in (ga, gb))
    return ga["mean"] - gb["mean"], math.sqrt(var)


def _better(result: dict, a: str, b: str) -> str:
    """'yes' if a's NLL is below b's by more than 2 standard errors of the difference, 'no' if
    above by more, else 'within seed noise'."""
    d, se = difference(result, a, b)
    return "yes" if d < -2 * se else "no" if d > 2 * se else "within seed noise"


def verdict(result: dict) -> dict:
    """The published direction checked on the row, against the spread over seeds: {claim,
    holds (True, False, or None when a group is missing or the difference is within 2 standard
    errors), detail}."""
    row, g = result["row"], result["groups"]
    nll = lambda v: _mean(result, v, "nll")  # noqa: E731
    diff = lambda a, b: "{:+.2f} ± {:.2f}".format(*difference(result, a, b))  # noqa: E731
    if row == "kl_estimators":
        if not {"analytic", "mc"} <= set(g):
            holds, detail = None, "analytic or mc missing"
        else:  # "at least as well": fails only if the closed form is worse beyond the seeds' noise
            worse = _better(result, "mc", "analytic") == "yes"
            holds = not worse
            detail = (f"NLL analytic − mc {diff('analytic', 'mc')} nats (± 1 standard error over seeds)"
                      + (f", stl − analytic {diff('stl', 'analytic')}" if "stl" in g else "")
                      + f"; the closed form trains at least as well as one-draw MC: {holds}")
    elif row == "priors":
        if not {"std_normal", "vamp"} <= set(g):
            holds, detail = None, "std_normal or vamp missing"
        else:
            b = _better(result, "vamp", "std_normal")
            holds = {"yes": True, "no": False}.get(b)
            detail = (f"NLL vamp − std_normal {diff('vamp', 'std_normal')} nats"
                      + (f", mog − std_normal {diff('mog', 'std_normal')}" if "mog" in g else "")
                      + f"; VampPrior below N(0, I) beyond seed noise: {b}")
    else:
        ks = sorted(g, key=int)
        pairs = [_better(result, b, a) for a, b in zip(ks, ks[1:])]  # larger k lower NLL?
        aus = [_mean(result, k, "active_units") for k in ks]
        au_up = all(a <= b for a, b in zip(aus, aus[1:]))
        holds = None if len(ks) < 2 or "within seed noise" in pairs else all(p == "yes" for p in pairs) and au_up
        detail = (f"NLL for k = {', '.join(ks)}: {', '.join(f'{nll(k):.2f}' for k in ks)} (successive "
                  f"differences {', '.join(diff(b, a) for a, b in zip(ks, ks[1:]))}); active units "
                  f"{', '.join(f'{v:g}' for v in aus)}; NLL lower with each larger k beyond seed noise: "
                  f"{', '.join(pairs)}; AU do not fall: {au_up}")
    return {"claim": PUBLISHED[row], "holds": holds, "detail": detail}


def figure(result: dict):
    """Test −ELBO against the step per group: mean over seeds and the min–max band."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, g in result["groups"].items():
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in g["curves"])))
        vals = np.array([[dict(c)[s] for s in steps] for c in g["curves"]])
        ax.plot(steps, vals.mean(0), label=f"{result['field']}={value} ({len(g['curves'])} seeds)")
        ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.25)
    lo = min(np.min([v for _, v in c]) for g in result["groups"].values() for c in g["curves"])
    ax.set_ylim(lo - 2, lo + 40)
    ax.set_xlabel("step")
    ax.set_ylabel("test −ELBO [nats]")
    ax.set_title(f"{result['row']}: mean and min–max over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gradient_variance(paths: list[str]) -> dict:
    """Several seeds' experiments.gradient_variance files (one run each, the same estimators
    and steps) → per step and estimator ≠ analytic, the variance ratio to analytic for each
    parameter group (total, encoder, decoder), and the KL estimate's variance [nats²]: mean,
    min, max over the files; each file's raw rows under ``per_run``."""
    results = [json.load(open(p)) for p in paths]
    steps = sorted(set.intersection(*({r["step"] for r in res["checkpoints"]} for res in results)))
    others = [e for e in results[0]["estimators"] if e != "analytic"]
    rows = []
    for step in steps:
        at = [next(r for r in res["checkpoints"] if r["step"] == step) for res in results]
        row = {"step": step}
        for e in others:
            row[e] = {}
            for grp in ("total", "encoder", "decoder"):
                vals = [r["ratio"][e][grp] for r in at]
                row[e][grp] = analysis.spread(vals)
            kl = [r[e]["kl_variance"] for r in at]  # the closed form's is 0: no ratio
            row[e]["kl_estimate_variance"] = analysis.spread(kl)
        rows.append(row)
    last = rows[-1]
    return {"runs": [r["run_dir"] for r in results], "num_draws": results[0]["num_draws"],
            "seconds_per_run": analysis.spread(r["seconds"] for r in results if "seconds" in r)
            if any("seconds" in r for r in results) else None,
            "batch_size": results[0]["batch_size"], "estimators": results[0]["estimators"], "steps": steps,
            "ratios": rows, "per_run": results,
            "claims": {"mc_encoder_variance_above_analytic_at_every_step_every_seed":
                       bool(all(r["mc"]["encoder"]["min"] > 1 for r in rows)) if "mc" in others else None,
                       "stl_encoder_variance_below_analytic_at_the_last_step_every_seed":
                       bool(last["stl"]["encoder"]["max"] < 1) if "stl" in others else None}}


def gradient_variance_figure(result: dict):
    """Encoder and total gradient-variance ratios to analytic against the step (mean, band)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    steps = [r["step"] for r in result["ratios"]]
    for ax, grp in zip(axes, ("encoder", "decoder", "total")):
        for e in (e for e in result["estimators"] if e != "analytic"):
            m = [r[e][grp]["mean"] for r in result["ratios"]]
            ax.plot(steps, m, marker="o", label=f"{e} / analytic")
            ax.fill_between(steps, [r[e][grp]["min"] for r in result["ratios"]],
                            [r[e][grp]["max"] for r in result["ratios"]], alpha=0.25)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        vals = [r[e][grp][b] for r in result["ratios"] for e in result["estimators"] if e != "analytic"
                for b in ("min", "max")]
        ax.set_ylim(min(0.3, 0.8 * min(vals)), max(3.0, 1.25 * max(vals)))  # a flat 1 stays readable
        ax.set_xlabel("training step of the analytic run")
        ax.set_title(f"{grp} gradient variance ratio")
        ax.legend(fontsize=8)
    fig.suptitle(f"ELBO gradient variance over {len(result['runs'])} seeds (S = {result['num_draws']}, "
                 f"B = {result['batch_size']}): mean and min–max")
    fig.tight_layout()
    return fig


def table(result: dict) -> str:
    lines = [f"| {result['field']} | seeds | test −ELBO | NLL | active units | steps to −ELBO ≤ "
             f"{result['target_neg_elbo']:.2f} |", "|---|---|---|---|---|---|"]
    for value, g in result["groups"].items():
        cell = lambda s: f"{s['mean']:.2f} ({s['min']:.2f}–{s['max']:.2f})"  # noqa: E731
        lines.append(f"| {value} | {len(g['seeds'])} | {cell(g['neg_elbo'])} | {cell(g['nll'])} | "
                     f"{cell(g['active_units'])} | {cell(g['steps_to_target'])} |")
    return "\n".join(lines)


def main(argv):
    del argv
    fl = flags.FLAGS
    result = summarize(fl.row_runs, fl.row, fl.target)
    result["verdict"] = verdict(result)
    os.makedirs(fl.out, exist_ok=True)
    path = os.path.join(fl.out, f"closed_vs_mc_{fl.row}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    figure(result).savefig(path[:-5] + ".png", dpi=110)
    print(table(result))
    print(result["verdict"]["detail"])
    print(f"wrote {path} and its .png")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["row", "row_runs"])
    app.run(main)
