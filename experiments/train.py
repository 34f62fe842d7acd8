r"""Trains one VAE.

    python -m experiments.train --config=experiments/configs/digits_mlp.py \
        --config.beta=4 --config.latent_dim=16 --workdir=runs/x

A regularizer, metric or dataset defined outside vaekl comes from --import=MODULE (its
directory on PYTHONPATH); the run records it in config.imports for evaluation and runs.load.
Re-running the same command resumes from the latest checkpoint in --workdir. A --workdir
that another process is writing is refused (vaekl.rundir.RunLock); mistakes print one line
(vaekl.cli).
"""

import contextlib
import logging as pylogging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from vaekl import cli
from vaekl import rundir
from vaekl import train
from vaekl import user_modules

LOG = pylogging.getLogger("experiments.train")  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if present).")
_IMPORT = cli.define_import_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    workdir = _WORKDIR.value
    config = _CONFIG.value
    config.imports = user_modules.merge(config.imports, _IMPORT.value)  # recorded in config.json
    rundir.check_writable(workdir)
    # An existing directory is locked now, so that a second writer is refused before any
    # work; a new one is created and locked by the trainer once the config and data check out.
    lock = rundir.RunLock(workdir) if os.path.isdir(workdir) else contextlib.nullcontext()
    with lock:
        rows = train.train_and_evaluate(config, workdir)
    for row in rows:
        LOG.info("final %s: neg_elbo %.3f recon %.3f kl %.3f active units %d", row["split"],
                 row["neg_elbo"], row["recon"], row["kl"], row["active_units"])
    print(f"results in {workdir}")


if __name__ == "__main__":
    cli.main(main)
