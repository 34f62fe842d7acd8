r"""A one-method slice of Locatello et al.'s study on one accelerator, in a fixed time budget:
β-TCVAE (``tc_estimator=mws``) × its 6 published strengths × 2 seeds, one vmapped program,
as many steps as fit, then every run evaluated; results in one JSON file.

    python -m experiments.reproduce.locatello_gpu --workdir=DIR --out=slice.json [--seconds=180]

Called by ``benchmarks/gpu/run.sh``. The step count is measured, not guessed: a calibration
sweep of two logging intervals (its compiled program is then reused from the persistent
compilation cache) gives the steady seconds per step, and the slice trains for what the
budget leaves after compilation and evaluation. ``--tiny`` runs the same pipeline at toy size
on any device (the test suite runs it on the CPU).

The full grid stays one command per method:
    python -m launch.sweep --config=experiments/reproduce/locatello_dsprites.py:beta_tc_vae --workdir=DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from experiments.reproduce import locatello_dsprites, locatello_summary
from vaekl import trajectory

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.")
_OUT = flags.DEFINE_string("out", None, "The result JSON file.")
_SECONDS = flags.DEFINE_float("seconds", 180.0, "Wall-time budget for calibration + training + evaluation.")
_METHOD = flags.DEFINE_enum("method", "beta_tc_vae", list(locatello_dsprites.METHODS), "The study's method.")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per strength.")
_TINY = flags.DEFINE_bool("tiny", False, "Toy sizes (2 strengths, 2 seeds, 10 steps, small metrics, a small "
                         "MLP instead of the conv VAE): the pipeline, checked on a CPU.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 500, "Steps per compiled call (and per log row).")
_EVAL_SHARE = flags.DEFINE_float("eval_share", 0.6, "Fraction of the budget kept for the metrics and evaluation.")
flags.mark_flags_as_required(["workdir", "out"])

CONFIG = "experiments/reproduce/locatello_dsprites.py"
# Disentanglement metrics at reduced sizes when --tiny (stated in the result file either way).
TINY_METRICS = {"mig": {"num_train": 200}, "beta_vae_score": {"num_train": 20, "num_eval": 10},
                "factor_vae_score": {"num_train": 20, "num_eval": 10, "num_variance_estimate": 200},
                "dci": {"num_train": 200, "num_test": 100}, "sap": {"num_train": 200, "num_test": 100},
                "modularity_explicitness": {"num_train": 200, "num_test": 100},
                "gaussian_total_correlation_score": {"num_train": 200}}


# Along training (at step 0, half way and at the end, for 12 models): MIG at disentanglement_lib's
# size, the FactorVAE score on 2,000/1,000 votes and DCI on 2,000/1,000 points (stated in the
# result file; the classifiers on the host dominate the cost).
CURVE_METRICS = {"factor_vae_score": {"num_train": 2000, "num_eval": 1000},
                 "dci": {"num_train": 2000, "num_test": 1000}}


def sweep_spec(method: str, seeds: int, tiny: bool) -> str:
    _, field, values, _ = locatello_dsprites.METHODS[method]
    values = (values[0], values[-1]) if tiny else values
    return f"{field}={','.join(f'{v:g}' for v in values)} seed={','.join(map(str, range(seeds)))}"


def run(cmd: list[str]) -> float:
    """Runs a command (its output passed through); returns its wall time; raises on failure."""
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


# --tiny checks the pipeline, not the model: a small MLP compiles in seconds on a CPU.
TINY_MODEL = ["--config.model=mlp", "--config.encoder_hidden=(32,)", "--config.decoder_hidden=(32,)",
              "--config.batch_size=16", "--config.eval_batch_size=250"]


def train(workdir: str, method: str, sweep: str, steps: int, log_every: int, every: int,
          metric_every: int = 0, metric_options: dict | None = None, tiny: bool = False) -> float:
    """Trains the sweep; with ``metric_every`` MIG, FactorVAE score and DCI along training
    (disentanglement.jsonl, sample sizes from ``metric_options`` over disentanglement_lib's)."""
    extra = [f"--config.metric_every={metric_every}"] if metric_every else []
    if metric_options:
        extra.append("--config.metric_options=" + json.dumps(metric_options))
    return run([sys.executable, "-m", "launch.sweep", f"--config={CONFIG}:{method}", f"--sweep={sweep}",
                "--backend=vmap", f"--workdir={workdir}", f"--config.num_steps={steps}",
                f"--config.log_every={log_every}", f"--config.eval_every={every}",
                f"--config.checkpoint_every={every}", "--config.num_images=16", *extra,
                *(TINY_MODEL if tiny else [])])


def main(argv):
    del argv
    t_start = time.perf_counter()
    workdir, method, tiny = _WORKDIR.value, _METHOD.value, _TINY.value
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    sweep = sweep_spec(method, _SEEDS.value, tiny)
    log_every = 5 if tiny else _LOG_EVERY.value

    # Calibration: two logging intervals, the second one's rate is the steady state (--tiny trains
    # a fixed number of steps: nothing to calibrate).
    cal_seconds = sec_per_step = None
    steps = 2 * log_every
    if not tiny:
        cal_dir = os.path.join(workdir, "_calibration")
        cal_seconds = train(cal_dir, method, sweep, 2 * log_every, log_every, 2 * log_every)
        rates = [locatello_summary.steady_seconds_per_1k_steps(d) for _, d in locatello_summary.find_runs(cal_dir)]
        rates = [r for r in rates if r]
        sec_per_step = (min(rates) / 1000) if rates else cal_seconds / (2 * log_every)
        left = _SECONDS.value * (1 - _EVAL_SHARE.value) - (time.perf_counter() - t_start)
        steps = max(2 * log_every, int(left / sec_per_step) // log_every * log_every)
    every = max(log_every, steps // 2 // log_every * log_every)  # metrics at 0, half way and the end
    runs_dir = os.path.join(workdir, method)
    train_seconds = train(runs_dir, method, sweep, steps, log_every, every, metric_every=every,
                          metric_options=TINY_METRICS if tiny else CURVE_METRICS, tiny=tiny)

    eval_cmd = [sys.executable, "-m", "experiments.evaluate", f"--workdir={runs_dir}", "--checkpoint=latest",
                "--num_samples=2", "--num_draws=2", "--batch_size=500", "--skip_done", "--nodisentanglement"]
    eval_seconds = run(eval_cmd)  # the KL decomposition; the scores are the last along-training row

    found = locatello_summary.find_runs(runs_dir)
    records = [locatello_summary.read_run(m, d, runs_dir) for m, d in found]
    for rec, (_, d) in zip(records, found):
        rec["along_training"] = trajectory.read(d)
        last = max(rec["along_training"], key=lambda r: r["step"]) if rec["along_training"] else {}
        for k, key in locatello_summary.SCORES.items():
            if rec.get(k) is None and last.get(key) is not None:
                rec[k] = float(last[key])
        rec["scores_step"] = last.get("step")
        rec["sample_sizes"] = last.get("sample_sizes")
    import jax  # pylint: disable=g-import-not-at-top
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "method": method,
              "sweep": sweep, "steps": steps, "log_every": log_every, "tiny": tiny,
              "calibration": {"seconds": cal_seconds, "steady_seconds_per_step": sec_per_step},
              "train_seconds": train_seconds, "eval_seconds": eval_seconds,
              "models": len(records), "model_steps_per_second": len(records) * steps / train_seconds,
              "per_method": locatello_summary.per_method(records), "records": records}
    with open(_OUT.value, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(records)} models × {steps} steps in {train_seconds:.0f} s "
          f"({result['model_steps_per_second']:.0f} model-steps/s), evaluated in {eval_seconds:.0f} s")


if __name__ == "__main__":
    app.run(main)
