r"""Issue 21's reproduction rows from their run directories → ROW.json (and a one-line table).

    python -m experiments.reproduce.closed_vs_mc --row=kl_estimators --row_runs=runs/kl_estimators
    python -m experiments.reproduce.closed_vs_mc --row=priors --row_runs=runs/priors
    python -m experiments.reproduce.closed_vs_mc --row=iwae_objective --row_runs=runs/iwae_objective

Each run is read from its config.json, eval.json (experiments.evaluate) and metrics.jsonl, and
grouped by the row's field (kl_estimator, prior, iwae_k). Per group and metric: mean, sd, min,
max over the seeds of the test −ELBO, the importance-weighted NLL, the active units, and the
steps to reach a fixed test −ELBO (``--target``; default the largest final test −ELBO among
the runs, so that every run reaches it; a run that never does counts as NaN). Writes
--out/closed_vs_mc_ROW.json (configs in experiments/reproduce/mnist_{kl_estimators,priors,
iwae_objective}.py).
"""

from __future__ import annotations

import json
import math
import os

from absl import app
from absl import flags
import numpy as np

from vaekl import rundir
from vaekl import runs as runs_lib

ROWS = {"kl_estimators": "kl_estimator", "priors": "prior", "iwae_objective": "iwae_k"}
METRICS = ("neg_elbo", "nll", "active_units", "steps_to_target")



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
        g = groups.setdefault(str(r["config"][field]), {"seeds": [], "runs": [], "values": []})
        g["seeds"].append(r["config"]["seed"])
        g["runs"].append(r["run"])
        g["values"].append({"neg_elbo": r["eval"]["neg_elbo"], "nll": r["eval"]["nll"],
                            "active_units": r["eval"]["active_units"],
                            "steps_to_target": steps_to(r["curve"], target)})
    for g in groups.values():
        values = g.pop("values")
        for m in METRICS:
            g[m] = _stats([v[m] for v in values])
    steps = {r["config"]["num_steps"] for r in runs}
    return {"row": row, "field": field, "target_neg_elbo": float(target), "num_steps": sorted(steps),
            "num_samples": sorted({r["eval"].get("num_samples") for r in runs}), "groups": groups}


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
    os.makedirs(fl.out, exist_ok=True)
    path = os.path.join(fl.out, f"closed_vs_mc_{fl.row}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["row", "row_runs"])
    app.run(main)
