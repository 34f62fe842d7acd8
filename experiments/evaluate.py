r"""Evaluates a run (or every run of a sweep): IWAE test NLL, ELBO, KL analysis → eval.json.

    python -m experiments.evaluate --workdir=RUN_DIR [--num_samples=5000]
    python -m experiments.evaluate --workdir=SWEEP_DIR      # each run directory inside

On dSprites the disentanglement metrics run at disentanglement_lib's default sample sizes,
reading codes from a table of the whole factor grid (--representation_table); progress lines
with an ETA every 10 s. --metric_options overrides the sizes.
The user modules a run recorded (config.imports) are imported first; --import=MODULE adds
more (e.g. for runs trained before config.imports existed).
"""

import json
import logging as pylogging
import os
import time

from absl import app
from absl import flags

from vaekl import cli
from vaekl import evaluate
from vaekl import rundir, runs

LOG = pylogging.getLogger("experiments.evaluate")  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory, or a sweep directory of runs.")
_K = flags.DEFINE_integer("num_samples", 5000, "Importance samples K per test example.")
_CHUNK = flags.DEFINE_integer("chunk", 100, "Samples per chunk (memory is bounded by chunk × batch).")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Test examples per batch.")
_NLL_N = flags.DEFINE_integer("nll_examples", 0, "The NLL on the first N test examples only (0: all); "
                              "the other numbers use every test example.")
_WHICH = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to evaluate.")
_DRAWS = flags.DEFINE_integer("num_draws", 10, "z draws per example for the KL decomposition (>= 2).")
_DIS = flags.DEFINE_bool("disentanglement", True, "Disentanglement metrics on datasets with factors.")
_DCI = flags.DEFINE_enum("dci_model", "random_forest", ["random_forest", "gbt"],
                         "DCI's importance model (gbt: disentanglement_lib's, much slower).")
_OPTIONS = flags.DEFINE_string("metric_options", "", "JSON {metric: {argument: value}} overriding the "
                                "disentanglement metrics' defaults (e.g. smaller sample sizes).")
_TABLE = flags.DEFINE_enum("representation_table", "auto", ["auto", "always", "never"],
                           "Read every disentanglement metric's codes from a table of the whole factor "
                           "grid, encoded once (plain dSprites: 737,280 images, with progress): 'auto' "
                           "when that encodes fewer images than the metrics' sample sizes ask for (at "
                           "disentanglement_lib's default sizes); the scores are the same either way.")
_SKIP = flags.DEFINE_bool("skip_done", False, "Skip runs that already have an eval.json.")
_IMPORT = cli.define_import_flag()
flags.mark_flags_as_required(["workdir"])


def run_dirs(workdir: str) -> list[str]:
    """[workdir] if it is a run directory, else the run directories inside it (vaekl.runs.find)."""
    found = [r.path for r in runs.find(workdir)]
    if not found:
        raise app.UsageError(f"{workdir} is neither a run directory nor a sweep of runs")
    return found


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    todo = run_dirs(_WORKDIR.value)
    for run in todo:  # eval.json goes into each run directory
        rundir.check_writable(run)
    if _SKIP.value:
        todo = [r for r in todo if not os.path.exists(os.path.join(r, rundir.EVAL))]
    start = time.perf_counter()
    for i, run in enumerate(todo):
        r = evaluate.evaluate_run(run, _K.value, _CHUNK.value, _BATCH.value, _WHICH.value,
                                  num_draws=_DRAWS.value, disentanglement=_DIS.value,
                                  dci_model=_DCI.value,
                                  metric_options=json.loads(_OPTIONS.value) if _OPTIONS.value else None,
                                  representation_table={"auto": None, "always": True,
                                                        "never": False}[_TABLE.value],
                                  nll_examples=_NLL_N.value)
        elapsed = time.perf_counter() - start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        LOG.info("%s (step %d): NLL %.3f ± %.3f (K=%d)  -ELBO %.3f  KL %.3f = MI %.3f + TC %.3f + "
                 "dimwise %.3f  AU %d%s", run, r["step"], r["nll"], r["nll_se"], r["num_samples"],
                 r["neg_elbo"], r["kl"], r["mutual_info"], r["total_correlation"], r["dimwise_kl"],
                 r["active_units"],
                 "  MIG %.3f" % r["disentanglement"]["mig"] if "disentanglement" in r else "")
        LOG.info("progress: %d/%d runs evaluated, elapsed %.0f s, ETA %.0f s", i + 1, len(todo),
                 elapsed, eta)
        print(f"{run}: nll {r['nll']:.3f}  neg_elbo {r['neg_elbo']:.3f}  active units {r['active_units']}")


if __name__ == "__main__":
    cli.main(main)
