r"""Launches a sweep over β, latent dimension k, seeds (or any config field).

    python -m launch.sweep --config=experiments/configs/digits_mlp.py \
        --sweep='beta=0.5,1,4 latent_dim=2,8 seed=0,1' --backend=vmap --workdir=runs/sweep

Backends:
  vmap   groups of runs trained together in one compiled program (jax.vmap), in this process;
  local  separate `experiments.train` processes, --parallel at a time (one per GPU when
         there are several, pinned with CUDA_VISIBLE_DEVICES);
  slurm  one Slurm job array through submitit, each task a vmapped group of runs.

Every backend is idempotent: finished runs are skipped, interrupted ones resume from their
checkpoints, a failed run is retried up to --retries times without stopping the others, and
the launcher ends with a table of runs and a non-zero exit code if any failed. Each run lands
in WORKDIR/<run name>/ with the files of a standalone run.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from vaekl import rundir
from vaekl import sweep as sweep_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base ml_collections config file.",
                                          lock_config=False)
_SWEEP = flags.DEFINE_string("sweep", None, "Grid, e.g. 'beta=0.5,1,4 latent_dim=2,8 seed=0,1'. "
                             "Default: the config file's get_sweep().")
_BACKEND = flags.DEFINE_enum("backend", "vmap", ["vmap", "local", "slurm"], "Where runs execute.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; each run in WORKDIR/<run name>.")
_RETRIES = flags.DEFINE_integer("retries", 1, "Extra attempts for a failed run.")
_MAX_GROUP = flags.DEFINE_integer("max_group", 0, "vmap/slurm: most runs per program (0: as many "
                                  "as fit in half the device memory).")
_PARALLEL = flags.DEFINE_integer("parallel", 0, "local: processes at a time (0: one per visible "
                                 "GPU, or 1 without GPUs).")
_PARTITION = flags.DEFINE_string("slurm_partition", None, "slurm: partition.")
_TIME = flags.DEFINE_integer("slurm_time", 60, "slurm: time limit per task, minutes.")
_GPUS = flags.DEFINE_integer("slurm_gpus_per_task", 0, "slurm: GPUs per task.")
_CPUS = flags.DEFINE_integer("slurm_cpus_per_task", 1, "slurm: CPUs per task.")
_MEM = flags.DEFINE_integer("slurm_mem_gb", 0, "slurm: memory per task in GB (0: the default).")
flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass
class Run:
    """One point of the sweep and what happened to it."""

    name: str
    config: ml_collections.ConfigDict
    overrides: dict
    workdir: str
    before: str = "new"        # new | partial | done
    outcome: str = "pending"   # completed | resumed | skipped | failed
    attempts: int = 0
    error: str = ""
    test_neg_elbo: float | None = None


# ------------------------------------------------------------------------------------------
# The sweep.


def expand(base: ml_collections.ConfigDict, spec: str, workdir: str) -> list[Run]:
    """Every run of the grid, with its validated config (nothing is written)."""
    runs = []
    for overrides in sweep_lib.parse(spec, base):
        name = sweep_lib.run_name(overrides)
        try:
            config = sweep_lib.apply(base, overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep point {name}: {e}") from None
        runs.append(Run(name, config, overrides, os.path.join(workdir, name)))
    return runs


def _finish(run: Run, error: str | None) -> None:
    run.attempts += 1
    if error is None:
        run.outcome = "resumed" if run.before == "partial" else "completed"
        run.error = ""
        rows = [r for r in rundir.MetricsLog(os.path.join(run.workdir, "metrics.jsonl")).read()
                if r["split"] == "test" and r["step"] == run.config.num_steps]
        run.test_neg_elbo = rows[-1]["neg_elbo"] if rows else None
    else:
        run.outcome, run.error = "failed", error.strip().splitlines()[-1][:300] if error.strip() else "?"


# ------------------------------------------------------------------------------------------
# vmap: groups of runs in one program, in this process.


def backend_vmap(runs: list[Run]) -> None:
    todo = runs
    for _ in range(1 + _RETRIES.value):
        if not todo:
            break
        errors = sweep_lib.run_groups([r.config.to_dict() for r in todo], [r.workdir for r in todo],
                                      _MAX_GROUP.value)
        for run, err in zip(todo, errors):
            _finish(run, err)
        todo = [r for r in todo if r.outcome == "failed"]


# ------------------------------------------------------------------------------------------
# local: one process per run.


def _visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]


def _flag_value(value) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, float) else str(value)


def train_command(config_file: str, file_config: ml_collections.ConfigDict, run: Run) -> list[str]:
    """`python -m experiments.train` with every field where the run differs from the file."""
    cmd = [sys.executable, "-m", "experiments.train", f"--config={config_file}", f"--workdir={run.workdir}"]
    for k, v in run.config.items():
        if k not in file_config or file_config[k] != v:
            cmd.append(f"--config.{k}={_flag_value(v)}")
    return cmd


def backend_local(runs: list[Run], config_file: str) -> None:
    file_config = runpy.run_path(config_file)["get_config"]()
    gpus = _visible_gpus()
    slots = _PARALLEL.value or max(1, len(gpus))
    log_dir = os.path.join(_WORKDIR.value, "_logs")
    os.makedirs(log_dir, exist_ok=True)
    queue = list(runs)
    running: dict[int, tuple[Run, subprocess.Popen, str]] = {}
    while queue or running:
        for slot in range(slots):
            if slot in running or not queue:
                continue
            run = queue.pop(0)
            env = dict(os.environ)
            if len(gpus) > 1:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            log_path = os.path.join(log_dir, f"{run.name}.{run.attempts + 1}.log")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(train_command(config_file, file_config, run), env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
            running[slot] = (run, proc, log_path)
            logging.info("started %s (attempt %d)%s", run.name, run.attempts + 1,
                         f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if len(gpus) > 1 else "")
        time.sleep(0.1)
        for slot, (run, proc, log_path) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            with open(log_path) as f:
                tail = f.read()[-2000:]
            _finish(run, None if proc.returncode == 0 else
                    (tail or f"exit code {proc.returncode}") + f"\n(exit {proc.returncode}; log {log_path})")
            logging.info("%s %s (exit %d)", run.name, run.outcome, proc.returncode)
            if run.outcome == "failed" and run.attempts <= _RETRIES.value:
                queue.append(run)


# ------------------------------------------------------------------------------------------
# slurm: a job array through submitit, each task a vmapped group.


def backend_slurm(runs: list[Run]) -> None:
    import submitit  # pylint: disable=g-import-not-at-top

    executor = submitit.AutoExecutor(folder=os.path.join(_WORKDIR.value, "_slurm", "%j"),
                                     cluster="slurm")
    params = dict(timeout_min=_TIME.value, cpus_per_task=_CPUS.value, slurm_array_parallelism=256)
    if _PARTITION.value:
        params["slurm_partition"] = _PARTITION.value
    if _GPUS.value:
        params["slurm_gpus_per_task"] = _GPUS.value
    if _MEM.value:
        params["mem_gb"] = _MEM.value
    executor.update_parameters(**params)
    max_group = _MAX_GROUP.value or 16
    todo = runs
    for _ in range(1 + _RETRIES.value):
        if not todo:
            break
        starts = [sweep_lib.latest_checkpoint(r.workdir) for r in todo]
        tasks = [[todo[i] for i in g] for g in sweep_lib.groups([r.config for r in todo], max_group, starts)]
        jobs = executor.map_array(sweep_lib.run_groups, [[r.config.to_dict() for r in t] for t in tasks],
                                  [[r.workdir for r in t] for t in tasks], [_MAX_GROUP.value] * len(tasks))
        logging.info("submitted %d Slurm task(s): job %s", len(jobs), jobs[0].job_id.split("_")[0])
        for task, job in zip(tasks, jobs):
            try:
                errors = job.result()
            except Exception as e:  # pylint: disable=broad-except
                errors = [f"Slurm task {job.job_id} failed: {e}"] * len(task)
            for run, err in zip(task, errors):
                _finish(run, err)
        todo = [r for r in todo if r.outcome == "failed"]


# ------------------------------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    """The closing table: one line per run."""
    head = f"{'run':<40} {'before':<8} {'outcome':<10} {'tries':>5} {'test −ELBO':>11}  error"
    lines = [head, "-" * len(head)]
    for r in runs:
        elbo = f"{r.test_neg_elbo:.3f}" if r.test_neg_elbo is not None else "-"
        lines.append(f"{r.name:<40} {r.before:<8} {r.outcome:<10} {r.attempts:>5} {elbo:>11}  {r.error}")
    counts = {o: sum(r.outcome == o for r in runs) for o in ("completed", "resumed", "skipped", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    rundir.quiet_library_logs()
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    spec = _SWEEP.value
    if spec is None:
        get_sweep = runpy.run_path(config_file).get("get_sweep")
        if get_sweep is None:
            raise app.UsageError(f"no --sweep given and {config_file} has no get_sweep()")
        spec = get_sweep()
    runs = expand(_CONFIG.value, spec, _WORKDIR.value)
    for run in runs:
        rundir.check_config(run.workdir, run.config.to_dict())
        run.before = sweep_lib.status(run.workdir, run.config)
        if run.before == "done":
            run.outcome = "skipped"
    todo = [r for r in runs if r.outcome != "skipped"]
    logging.info("sweep of %d runs: %d to train (%d to resume), %d already done", len(runs), len(todo),
                 sum(r.before == "partial" for r in todo), len(runs) - len(todo))
    os.makedirs(_WORKDIR.value, exist_ok=True)
    if todo:
        if _BACKEND.value == "vmap":
            backend_vmap(todo)
        elif _BACKEND.value == "local":
            backend_local(todo, config_file)
        else:
            backend_slurm(todo)
    print(table(runs))
    if any(r.outcome == "failed" for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
