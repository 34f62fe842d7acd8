"""Benchmark: the Locatello conv VAE's training on every core of the machine, two ways, as
model-steps per second side by side in one run:

  (a) one process, XLA's intra-op thread pool over all usable cores;
  (b) one process per core, each pinned to its core with one thread (how
      experiments/reproduce/locatello_slice_cpu.sh runs two launchers side by side).

    python benchmarks/bench_cores.py [--steps 20]

Each process times ``--steps`` one-step calls of the trainer's compiled program (after
compiling) and reports its median; (b)'s processes run at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def worker(steps: int) -> None:
    import time  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, REPO)
    from benchmarks import conv_step  # pylint: disable=g-import-not-at-top
    run = conv_step.compiled_step(conv_step.setup("beta_vae"), group=1)
    run()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"seconds_per_step": float(np.median(ts))}), flush=True)


def launch(steps: int, cores: list[int] | None, one_thread: bool) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if one_thread:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + ONE_THREAD).strip()
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps)]
    if cores is not None:
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def result(p: subprocess.Popen) -> float:
    out, _ = p.communicate()
    return json.loads(out.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.steps)
        return
    cores = sorted(os.sched_getaffinity(0))
    a = result(launch(args.steps, None, one_thread=False))
    procs = [launch(args.steps, [c], one_thread=True) for c in cores]
    b = [result(p) for p in procs]
    rate_a, rate_b = 1 / a, sum(1 / t for t in b)
    print(f"{len(cores)} cores; the conv VAE (batch 64), one model per process")
    print(f"(a) one process, {len(cores)} threads      : {rate_a:6.2f} model-steps/s ({a:.3f} s per step)")
    print(f"(b) {len(cores)} processes, one core each  : {rate_b:6.2f} model-steps/s "
          f"({', '.join(f'{t:.3f}' for t in b)} s per step)")
    print(f"(b) ÷ (a): {rate_b / rate_a:.2f}×")


if __name__ == "__main__":
    main()
