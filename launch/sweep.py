r"""Launches a sweep over β, latent dimension k, seeds (or any config field).

    python -m launch.sweep --config=experiments/configs/digits_mlp.py \
        --sweep='beta=0.5,1,4 latent_dim=2,8 seed=0,1' --backend=vmap --workdir=runs/sweep

Backends:
  vmap   groups of runs trained together in one compiled program (jax.vmap), in this process,
         the runs sharded over every visible device (--devices), or the batch when a program
         has fewer runs than devices (--data_parallel);
  local  separate `experiments.train` processes, --parallel at a time (one per GPU when
         there are several, pinned with CUDA_VISIBLE_DEVICES), for configs that cannot share
         a program;
  slurm  one Slurm job array through submitit, each task a vmapped group of runs; a task of
         several processes (--slurm_nodes, --slurm_tasks_per_node) shares each program over
         all their devices through jax.distributed, each process writing its own runs.

Every backend is idempotent: finished runs are skipped, interrupted ones resume from their
checkpoints, a failed run is retried up to --retries times without stopping the others, and
the launcher ends with a table of runs and a non-zero exit code if any failed. A run whose
directory is broken (garbage config.json, a bad metrics line, no usable checkpoint) fails
alone with its reason while the others train, and the table is printed whatever happens. Each
run lands in WORKDIR/<run name>/ with the files of a standalone run.

Two launches of one sweep may overlap: a run directory locked by another live process
(vaekl.rundir.RunLock) is left alone and waited for; once released, it is skipped if the
other launch finished it, and trained otherwise. The local backend stops its children
(SIGTERM, then waits) when the launcher gets SIGTERM or SIGINT, and shows each failed
child's last error line. Mistakes in flags or the sweep print one line (vaekl.cli).
--import=MODULE imports a user module (a regularizer, metric or dataset defined outside
vaekl) first; every run records it in config.imports, and every backend imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging as pylogging
import os
import runpy
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from vaekl import cli
from vaekl import rundir
from vaekl import sweep as sweep_lib
from vaekl import user_modules

LOG = pylogging.getLogger("launch.sweep")  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base ml_collections config file.",
                                          lock_config=False)
_SWEEP = flags.DEFINE_string("sweep", None, "Grid, e.g. 'beta=0.5,1,4 latent_dim=2,8 seed=0,1'. "
                             "Default (also when empty): the config file's get_sweep().")
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
_POLL = flags.DEFINE_float("lock_poll_s", 2.0, "Seconds between checks of runs locked by other processes.")
_DEVICES = flags.DEFINE_integer("devices", 0, "vmap/slurm: devices per program, its runs sharded over "
                                "them (0: every visible device; under slurm, of every process of a task).")
_DATA_PARALLEL = flags.DEFINE_bool("data_parallel", None, "vmap/slurm: shard each training batch over the "
                                   "devices (default: only when a program has fewer runs than devices; "
                                   "--nodata_parallel: never).")
_NODES = flags.DEFINE_integer("slurm_nodes", 1, "slurm: nodes per task (its processes share each program "
                              "through jax.distributed).")
_TASKS_PER_NODE = flags.DEFINE_integer("slurm_tasks_per_node", 1, "slurm: processes per node of a task.")
_IMPORT = cli.define_import_flag()
flags.mark_flags_as_required(["config", "workdir"])


@dataclasses.dataclass
class Run:
    """One point of the sweep and what happened to it."""

    name: str
    config: ml_collections.ConfigDict
    overrides: dict
    workdir: str
    before: str = "new"        # new | partial | done | broken (an unreadable run directory)
    outcome: str = "pending"   # completed | resumed | skipped | failed
    attempts: int = 0
    error: str = ""            # the last error line, or a note
    test_neg_elbo: float | None = None
    program: dict | None = None  # vmap/slurm: the program's runs, padding, devices and mesh


# ------------------------------------------------------------------------------------------
# The sweep.


def expand(base: ml_collections.ConfigDict, spec: str, workdir: str) -> list[Run]:
    """Every run of the grid, with its validated config (nothing is written); refuses grids
    with two points of one name or config (vaekl.sweep.points)."""
    return [Run(name, config, overrides, os.path.join(workdir, name))
            for name, overrides, config in sweep_lib.points(spec, base)]


def _finish(run: Run, error: str | None) -> None:
    run.attempts += 1
    if error is None:
        run.outcome = "resumed" if run.before == "partial" else "completed"
        run.error = ""
        row = rundir.final_rows(run.workdir, run.config.num_steps).get("test")
        run.test_neg_elbo = row["neg_elbo"] if row else None
    else:
        run.outcome, run.error = "failed", error.strip().splitlines()[-1][:300] if error.strip() else "?"


def _locked_out(run: Run) -> bool:
    """Whether the run failed because another process held its directory."""
    return run.outcome == "failed" and rundir.LOCKED_MARK in run.error


def _retry(run: Run) -> bool:
    return run.outcome == "failed" and not _locked_out(run)


# ------------------------------------------------------------------------------------------
# vmap: groups of runs in one program, in this process.


def backend_vmap(runs: list[Run]) -> None:
    """Groups of runs, each one program over --devices devices (all by default), in this
    process; a progress line after each program says how many runs and devices it used."""
    todo = runs
    t0, done = time.monotonic(), 0
    for attempt in range(1 + _RETRIES.value):
        if not todo:
            break

        def on_program(members: list[int], program: dict, errors: list[str | None], last=attempt == _RETRIES.value):
            nonlocal done
            done += sum(e is None or last or rundir.LOCKED_MARK in e for e in errors)
            LOG.info("progress: %s; last program: %s", progress(done, len(runs), time.monotonic() - t0),
                     program_text(program))

        reports = sweep_lib.run_groups([r.config.to_dict() for r in todo], [r.workdir for r in todo],
                                       _MAX_GROUP.value, devices=_DEVICES.value,
                                       data_parallel=_DATA_PARALLEL.value, distributed=False, report=True,
                                       on_program=on_program)
        for run, rep in zip(todo, reports):
            _finish(run, rep["error"])
            run.program = rep["program"] or run.program
        todo = [r for r in todo if _retry(r)]


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
    cmd += [f"--{user_modules.FLAG}={m}" for m in run.config.imports]  # before the config is built
    for k, v in run.config.items():
        if k != "imports" and (k not in file_config or file_config[k] != v):
            cmd.append(f"--config.{k}={_flag_value(v)}")
    return cmd


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress(done: int, total: int, elapsed: float) -> str:
    """'3/8 runs done, elapsed 0:01:20, ETA 0:02:13' (ETA from the mean time per run so far)."""
    eta = _clock(elapsed / done * (total - done)) if done else "?"
    return f"{done}/{total} runs done, elapsed {_clock(elapsed)}, ETA {eta}"


def program_text(program: dict) -> str:
    """'6 runs (+2 padding) on 4 devices (runs 4 × data 1)' from a program's summary
    (vaekl.sharding.Placement.summary)."""
    n, d = program["runs"], program["devices"]
    pad = f" (+{program['padded'] - n} padding)" if program["padded"] > n else ""
    procs = f", {program['processes']} processes" if program.get("processes", 1) > 1 else ""
    return (f"{n} run{'s' * (n != 1)}{pad} on {d} device{'s' * (d != 1)} "
            f"(runs {program['runs_axis']} × data {program['data_axis']}{procs})")


class _Signals:
    """Records SIGTERM/SIGINT instead of dying, so that children can be stopped first."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stop_children(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM to each child, then waits for them (SIGKILL after ``timeout`` seconds)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def backend_local(runs: list[Run], config_file: str) -> None:
    """Runs each point as an ``experiments.train`` process, --parallel at a time.

    On SIGTERM or SIGINT, stops the running children (SIGTERM, then waits; their runs resume
    from their checkpoints on the next launch) and exits with 128 + the signal number.
    """
    file_config = runpy.run_path(config_file)["get_config"]()
    gpus = _visible_gpus()
    slots = _PARALLEL.value or max(1, len(gpus))
    log_dir = os.path.join(_WORKDIR.value, "_logs")
    os.makedirs(log_dir, exist_ok=True)
    queue = list(runs)
    running: dict[int, tuple[Run, subprocess.Popen, str]] = {}
    t0, done = time.monotonic(), 0
    with _Signals() as signals:
        while queue or running:
            if signals.received is not None:
                break
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
                LOG.info("started %s (attempt %d, pid %d)%s", run.name, run.attempts + 1, proc.pid,
                         f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if len(gpus) > 1 else "")
            time.sleep(0.1)
            for slot, (run, proc, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                with open(log_path, errors="replace") as f:
                    tail = f.read()[-5000:]
                _finish(run, None if proc.returncode == 0 else cli.child_error(tail, proc.returncode, log_path))
                LOG.info("%s %s (exit %d)%s", run.name, run.outcome, proc.returncode,
                         f": {run.error}" if run.outcome == "failed" else "")
                if _retry(run) and run.attempts <= _RETRIES.value:
                    queue.append(run)
                else:
                    done += 1
                    LOG.info("progress: %s", progress(done, len(runs), time.monotonic() - t0))
        if signals.received is not None:
            name = signal.Signals(signals.received).name
            stopping = [r.name for r, _, _ in running.values()]
            print(f"{name}: stopping {len(stopping)} running run(s){': ' if stopping else ''}"
                  f"{', '.join(stopping)}; they resume from their checkpoints on the next launch",
                  file=sys.stderr, flush=True)
            stop_children([proc for _, proc, _ in running.values()])
            print(table(runs), flush=True)
            sys.exit(128 + signals.received)


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
    if _NODES.value > 1 or _TASKS_PER_NODE.value > 1:  # one task = several processes (jax.distributed)
        params.update(nodes=_NODES.value, tasks_per_node=_TASKS_PER_NODE.value)
    executor.update_parameters(**params)
    max_group = _MAX_GROUP.value or 16
    call = functools.partial(sweep_lib.run_groups, devices=_DEVICES.value, data_parallel=_DATA_PARALLEL.value,
                             report=True)
    todo = runs
    t0, done = time.monotonic(), 0
    for attempt in range(1 + _RETRIES.value):
        if not todo:
            break
        starts = [sweep_lib.latest_checkpoint(r.workdir) for r in todo]
        tasks = [[todo[i] for i in g] for g in sweep_lib.groups([r.config for r in todo], max_group, starts)]
        jobs = executor.map_array(call, [[r.config.to_dict() for r in t] for t in tasks],
                                  [[r.workdir for r in t] for t in tasks], [_MAX_GROUP.value] * len(tasks))
        LOG.info("submitted %d Slurm task(s) of %d process(es) each: job %s", len(jobs),
                 _NODES.value * _TASKS_PER_NODE.value, jobs[0].job_id.split("_")[0])
        for task, job in zip(tasks, jobs):
            try:
                reports = merge_reports(job.results())
            except Exception as e:  # pylint: disable=broad-except
                reports = [{"error": f"Slurm task {job.job_id} failed: {e}", "program": None}] * len(task)
            for run, rep in zip(task, reports):
                _finish(run, rep["error"])
                run.program = rep["program"] or run.program
            done += sum(not _retry(r) or attempt == _RETRIES.value for r in task)
            programs = {program_text(r.program) for r in task if r.program}
            LOG.info("progress: %s; task %s: %s", progress(done, len(runs), time.monotonic() - t0),
                     job.job_id, "; ".join(sorted(programs)) or "no program")
        todo = [r for r in todo if _retry(r)]


def merge_reports(per_process: list[list[dict]]) -> list[dict]:
    """One report per run from the reports of a task's processes (vaekl.sweep.run_groups with
    report=True): the one of the process that wrote the run, else the first process's."""
    return [next((r for r in reps if r["written"]), reps[0]) for reps in zip(*per_process)]


# ------------------------------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    """The closing table: one line per run (its program as runs/devices, e.g. 6r/4d), the
    counts of outcomes, and one line per kind of program (runs, padding, devices, mesh)."""
    head = (f"{'run':<40} {'before':<8} {'outcome':<10} {'tries':>5} {'test −ELBO':>11} {'program':>8}"
            f"  error or note")
    lines = [head, "-" * len(head)]
    for r in runs:
        elbo = f"{r.test_neg_elbo:.3f}" if r.test_neg_elbo is not None else "-"
        prog = f"{r.program['runs']}r/{r.program['devices']}d" if r.program else "-"
        lines.append(f"{r.name:<40} {r.before:<8} {r.outcome:<10} {r.attempts:>5} {elbo:>11} {prog:>8}  {r.error}")
    counts = {o: sum(r.outcome == o for r in runs) for o in ("completed", "resumed", "skipped", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    kinds: dict[str, int] = {}
    for r in runs:
        if r.program:
            kinds[program_text(r.program)] = kinds.get(program_text(r.program), 0) + 1
    for text, n in kinds.items():  # n runs in programs of p runs each: n / p programs
        p = next(r.program["runs"] for r in runs if r.program and program_text(r.program) == text)
        lines.append(f"program ×{max(1, n // p)}: {text}")
    return "\n".join(lines)


def _held(runs: list[Run]) -> dict[str, dict]:
    """{run name: lock holder} of the runs whose directories another live process holds."""
    out = {}
    for r in runs:
        holder = rundir.lock_holder(r.workdir)
        if holder is not None:
            out[r.name] = holder
    return out


def train_all(todo: list[Run], backend) -> None:
    """Trains ``todo`` with ``backend``, first those nobody else holds; then waits for the
    held ones (polling their locks) and, once each is released, skips it if the other
    process finished it or trains it."""
    waiting: list[Run] = []
    while todo or waiting:
        held = _held(todo)
        if held:
            print(f"{len(held)} run(s) in use by other processes, trained last if still needed: " +
                  "; ".join(f"{n} ({rundir.describe_holder(h)})" for n, h in held.items()),
                  file=sys.stderr, flush=True)
        free = [r for r in todo if r.name not in held]
        waiting += [r for r in todo if r.name in held]
        if free:
            backend(free)
        for r in free:
            if _locked_out(r):  # taken by another process between the check and the start
                r.outcome, r.error, r.attempts = "pending", "", r.attempts - 1
                waiting.append(r)
        todo = []
        t0 = time.monotonic()
        while waiting and not todo:
            time.sleep(_POLL.value)
            released = [r for r in waiting if rundir.lock_holder(r.workdir) is None]
            waiting = [r for r in waiting if r not in released]
            for r in released:
                broken = sweep_lib.check_run(r.config, r.workdir)
                if broken is not None:
                    r.before, r.outcome, r.error = "broken", "failed", broken[:300]
                    continue
                r.before = rundir.status(r.workdir, r.config)
                if r.before == "done":
                    r.outcome, r.error = "skipped", "finished by another launch"
                    row = rundir.final_rows(r.workdir, r.config.num_steps).get("test")
                    r.test_neg_elbo = row["neg_elbo"] if row else None
                    print(f"{r.name}: released, finished by another launch (skipped)", file=sys.stderr, flush=True)
                else:
                    print(f"{r.name}: released ({r.before}), training it", file=sys.stderr, flush=True)
                    todo.append(r)
            if waiting and time.monotonic() - t0 > 600:
                LOG.info("still waiting for %s", ", ".join(r.name for r in waiting))
                t0 = time.monotonic()


def sweep_spec(flag: str | None, config_file: str, config: ml_collections.ConfigDict) -> str:
    """The grid to run: ``--sweep``, or when it is absent or empty (``--sweep=''``) the config
    file's ``get_sweep()`` (``get_sweep(config)`` if it takes an argument)."""
    if flag is not None and flag.strip():
        return flag
    get_sweep = runpy.run_path(config_file).get("get_sweep")
    if get_sweep is None:
        given = "an empty --sweep" if flag is not None else "no --sweep"
        raise app.UsageError(f"{given} given and {config_file} has no get_sweep(); pass "
                             f"--sweep='FIELD=V1,V2 ...'")
    takes_config = bool(inspect.signature(get_sweep).parameters)
    return get_sweep(config) if takes_config else get_sweep()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    _CONFIG.value.imports = user_modules.merge(_CONFIG.value.imports, _IMPORT.value)  # every run records them
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    spec = sweep_spec(_SWEEP.value, config_file, _CONFIG.value)
    rundir.check_writable(_WORKDIR.value)
    runs = expand(_CONFIG.value, spec, _WORKDIR.value)
    for run in runs:
        broken = sweep_lib.check_run(run.config, run.workdir)
        if broken is not None:  # fails alone; the others train
            run.before, run.outcome, run.error = "broken", "failed", broken[:300]
            continue
        run.before = rundir.status(run.workdir, run.config)
        if run.before == "done":
            run.outcome = "skipped"
    todo = [r for r in runs if r.outcome == "pending"]
    LOG.info("sweep of %d runs: %d to train (%d to resume), %d already done", len(runs), len(todo),
             sum(r.before == "partial" for r in todo), len(runs) - len(todo))
    os.makedirs(_WORKDIR.value, exist_ok=True)
    backends = {"vmap": backend_vmap, "local": lambda rs: backend_local(rs, config_file),
                "slurm": backend_slurm}
    try:
        train_all(todo, backends[_BACKEND.value])
    except Exception as e:  # pylint: disable=broad-except  (the table is printed whatever happens)
        LOG.exception("the launcher failed")
        for r in runs:
            if r.outcome == "pending":
                r.outcome, r.error = "failed", f"launcher: {type(e).__name__}: {cli.one_line(e)}"[:300]
    print(table(runs))
    if any(r.outcome == "failed" for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    cli.main(main)
