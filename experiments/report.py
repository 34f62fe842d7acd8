r"""Turns a sweep directory (or one run directory) into a report (vaekl.report).

    python -m experiments.report --workdir=runs/sweep
    python -m experiments.report --workdir=runs/sweep/beta=4,latent_dim=8,seed=0

The user modules the runs recorded (config.imports) are imported first; --import adds more.
"""

from absl import app
from absl import flags

from vaekl import analysis, cli, report, rundir, runs

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per run), or a "
                               "run directory (with config.json).")
_TERM_RUNS = flags.DEFINE_integer("term_runs", 3, "Runs shown in the KL-terms-over-training figure.")
_FACTOR_RUNS = flags.DEFINE_integer("factor_runs", 2, "Runs shown with latent traversals and their "
                                    "latent–factor MI matrix (data with ground-truth factors only).")
_IMPORT = cli.define_import_flag()
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for run in analysis.run_dirs(_WORKDIR.value):
        rundir.import_recorded(run)
    path = report.write_report(_WORKDIR.value, _TERM_RUNS.value, _FACTOR_RUNS.value)
    df = analysis.load_sweep(_WORKDIR.value)
    print(analysis.summary(df).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"report: {path}")


if __name__ == "__main__":
    cli.main(main)
