"""Benchmark: a 16-run β × k grid trained three ways, as runs × samples/s, side by side.

    python benchmarks/bench_sweep.py [--steps 2000] [--grid 'beta=0.25,0.5,1,4 latent_dim=2,4,8,16']

  (a) one run after another, each in its own `experiments.train` process;
  (b) the launcher's `local` backend (--parallel processes at a time);
  (c) the launcher's `vmap` backend (the whole grid in one compiled program).

Wall-clock includes everything a user waits for (process start, compilation, evaluation,
checkpoints, images), since that is what a sweep costs. On a GPU, pass a 64-run grid, e.g.
--grid='beta=0.25,0.5,1,2,4,8,16,32 latent_dim=2,4,8,16,32,64,96,128'.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/digits_mlp.py"


def flags(steps: int) -> list[str]:
    return [f"--config={CONFIG}", f"--config.num_steps={steps}", f"--config.eval_every={steps}",
            f"--config.checkpoint_every={steps}", f"--config.log_every={steps}", "--config.num_images=16"]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--grid", default="beta=0.25,0.5,1,4 latent_dim=2,4,8,16")
    p.add_argument("--parallel", type=int, default=2, help="processes at a time for (b)")
    p.add_argument("--sequential_runs", type=int, default=0,
                   help="time only this many runs of (a) and scale to the grid (0: all)")
    p.add_argument("--skip_local", action="store_true", help="skip (b)")
    args = p.parse_args()
    sys.path.insert(0, REPO)
    from vaekl import config as config_lib, sweep  # pylint: disable=g-import-not-at-top

    points = sweep.parse(args.grid, config_lib.defaults())
    batch = 100  # digits_mlp's batch size
    work = len(points) * args.steps * batch
    tmp = tempfile.mkdtemp(prefix="bench_sweep_")
    try:
        t_a = 0.0
        timed = points[:args.sequential_runs] if args.sequential_runs else points
        for i, point in enumerate(timed):
            over = [f"--config.{k}={v}" for k, v in point.items()]
            t_a += run([sys.executable, "-m", "experiments.train", *flags(args.steps), *over,
                        f"--workdir={tmp}/a/{i}"])
        t_a *= len(points) / len(timed)  # scaled to the whole grid when only some runs were timed
        t_b = None if args.skip_local else run([
            sys.executable, "-m", "launch.sweep", *flags(args.steps), f"--sweep={args.grid}",
            "--backend=local", f"--parallel={args.parallel}", f"--workdir={tmp}/b"])
        t_c = run([sys.executable, "-m", "launch.sweep", *flags(args.steps), f"--sweep={args.grid}",
                   "--backend=vmap", f"--workdir={tmp}/c"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(points)} runs × {args.steps} steps × batch {batch} on digits 8×8 (MLP 64-128-128-k)")
    if len(timed) < len(points):
        print(f"(a) timed on {len(timed)} of the {len(points)} runs and scaled to all of them")
    for name, t in [("(a) sequential processes", t_a), (f"(b) local backend, {args.parallel} at a time", t_b),
                    ("(c) vmap backend, one program", t_c)]:
        if t is None:
            continue
        print(f"{name:<36} {t:8.1f} s  {work / t:10.0f} samples/s (all runs)  {t_a / t:6.2f}x (a)")


if __name__ == "__main__":
    main()
