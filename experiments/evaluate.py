r"""Evaluates a run (or every run of a sweep): IWAE test NLL, ELBO, KL analysis → eval.json.

    python -m experiments.evaluate --workdir=RUN_DIR [--num_samples=5000]
    python -m experiments.evaluate --workdir=SWEEP_DIR      # each run directory inside
"""

import os

from absl import app
from absl import flags
from absl import logging

from vaekl import evaluate
from vaekl.rundir import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory, or a sweep directory of runs.")
_K = flags.DEFINE_integer("num_samples", 5000, "Importance samples K per test example.")
_CHUNK = flags.DEFINE_integer("chunk", 100, "Samples per chunk (memory is bounded by chunk × batch).")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Test examples per batch.")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to evaluate.")
flags.mark_flags_as_required(["workdir"])


def run_dirs(workdir: str) -> list[str]:
    if os.path.exists(os.path.join(workdir, "config.json")):
        return [workdir]
    runs = sorted(os.path.join(workdir, d) for d in os.listdir(workdir)
                  if os.path.exists(os.path.join(workdir, d, "config.json")))
    if not runs:
        raise app.UsageError(f"{workdir} is neither a run directory nor a sweep of runs")
    return runs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    for run in run_dirs(_WORKDIR.value):
        r = evaluate.evaluate_run(run, _K.value, _CHUNK.value, _BATCH.value, _WHICH.value)
        logging.info("%s (step %d): NLL %.3f (K=%d)  -ELBO %.3f  KL %.3f = MI %.3f + marginal KL %.3f"
                     "  AU %d", run, r["step"], r["nll"], r["num_samples"], r["neg_elbo"], r["kl"],
                     r["mutual_info"], r["marginal_kl"], r["active_units"])
        print(f"{run}: nll {r['nll']:.3f}  neg_elbo {r['neg_elbo']:.3f}  active units {r['active_units']}")


if __name__ == "__main__":
    app.run(main)
