r"""The ELBO gradient's variance under each KL estimator (analytic, mc, stl), at a run's checkpoints.

    python -m experiments.gradient_variance --workdir=RUN_DIR [--num_draws=100] [--batch_size=100]
    python -m experiments.gradient_variance --workdir=RUN_DIR --steps=0,1000,5000

Writes RUN_DIR/gradient_variance.json and RUN_DIR/gradient_variance.png (or --output=PREFIX
for PREFIX.json and PREFIX.png): per checkpoint and estimator the total, encoder and decoder
gradient variance over the draws and the KL estimate's variance, with standard errors, and
the ratios to the analytic estimator (vaekl.gradient_variance). Keep more checkpoints while
training (--config.keep_checkpoints) for a curve over training.
"""

import os

from absl import app
from absl import flags

from vaekl import cli
from vaekl import gradient_variance

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory.")
_STEPS = flags.DEFINE_list("steps", [], "Checkpoint steps (default: every kept checkpoint).")
_DRAWS = flags.DEFINE_integer("num_draws", 100, "Gradient draws S per estimator and checkpoint (>= 2).")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Test images in the fixed batch.")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Draws whose gradients are computed at once (memory).")
_SEED = flags.DEFINE_integer("seed", 0, "Key of the draws (the same for every estimator).")
_OUTPUT = flags.DEFINE_string("output", "", "Output prefix (default RUN_DIR/gradient_variance).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    steps = [int(s) for s in _STEPS.value] or None
    result = gradient_variance.analyze_run(_WORKDIR.value, steps, _DRAWS.value, _BATCH.value,
                                           _SEED.value, chunk=_CHUNK.value)
    prefix = _OUTPUT.value or os.path.join(_WORKDIR.value, "gradient_variance")
    gradient_variance.write(result, prefix + ".json", prefix + ".png")
    for row in result["checkpoints"]:
        ratio = row.get("ratio", {})
        print(f"step {row['step']}: " + ", ".join(
            f"{e}/analytic encoder {r['encoder']:.3g} total {r['total']:.3g}" for e, r in ratio.items()))
    print(f"results in {prefix}.json and {prefix}.png")


if __name__ == "__main__":
    cli.main(main)
