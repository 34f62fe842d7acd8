"""Benchmark: one sweep program on 1 device vs all devices (vaekl.sharding), side by side.

    python benchmarks/bench_scale.py [--devices 4] [--runs 16] [--steps 100] [--batch 256]

Measures the compiled training loop alone (``train.compile_fns(..., placement=...)``, after
a warm-up call that compiles it), on the same sweep and in the same process:

  (a) runs sharded: a β × seed sweep of ``--runs`` digits MLP runs (64→128→128→k, tanh, batch 100),
      its run axis on 1 device vs sharded over every device: runs × steps per second;
  (b) data parallel: one run with batch ``--batch``, on 1 device vs its batch sharded over
      every device: steps per second (samples/s = steps/s × batch);

and, from the compiled programs, the cross-device collectives each one contains (none for
(a); all-reduces of the gradients for (b)).

Without accelerators it re-runs itself on ``--devices`` forced XLA:CPU host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``). Those devices share the machine's
cores, so there the ratios measure the sharding's overhead, not a speed-up: on a 2-core
machine none is expected. On a multi-GPU or TPU host the same script measures the scaling.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(batch: int, steps: int):
    import runpy  # pylint: disable=g-import-not-at-top
    c = runpy.run_path(os.path.join(REPO, "experiments/configs/digits_mlp.py"))["get_config"]()
    c.batch_size, c.num_steps, c.steps_per_call = batch, steps, 0
    return c


def measure(configs, devices, steps: int, repeats: int) -> tuple[float, dict[str, int]]:
    """(runs × steps / s of the compiled loop, {collective: count in the compiled program})."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vaekl import data, sharding, train  # pylint: disable=g-import-not-at-top

    ds = data.load("digits")
    big = configs[0].copy_and_resolve_references()
    big.latent_dim = max(c.latent_dim for c in configs)
    placement = sharding.plan(len(configs), devices, batch_size=big.batch_size, latent_dim=big.latent_dim)
    graphdef, template, tx = train.create(big, ds.image_shape, ds.train_images)
    states = [train.pad_like(train.create(c, ds.image_shape, ds.train_images)[1], template) for c in configs]
    state = placement.put_runs(jax.tree.map(lambda *a: np.stack(a), *states))
    hp = placement.put_runs(train.stack_hyperparameters(configs))  # pylint: disable=protected-access
    masks = placement.put_runs(np.asarray([np.arange(big.latent_dim) < c.latent_dim for c in configs], np.float32))
    keys = placement.put_runs(jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 2) for c in configs]))
    arrays, draw = train.batch_source(ds)
    arrays = placement.replicate(arrays)
    fns = train.compile_fns(big, graphdef, tx, draw=draw, dataset_size=train.dataset_size(ds), placement=placement)
    hlo = fns.run_steps.lower(state, arrays, hp, keys, masks, num_steps=steps).compile().as_text()
    collectives = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
                   for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute")}
    state, metrics = fns.run_steps(state, arrays, hp, keys, masks, num_steps=steps)  # compiles
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = fns.run_steps(state, arrays, hp, keys, masks, num_steps=steps)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - t0)
    return len(configs) * steps / best, {k: v for k, v in collectives.items() if v}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=4, help="forced host devices when there is no accelerator")
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--steps", type=int, default=100, help="steps per compiled call")
    p.add_argument("--batch", type=int, default=256, help="the data-parallel run's batch")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax  # pylint: disable=g-import-not-at-top
        if jax.default_backend() == "cpu":  # run again with forced host devices (set before jax starts)
            env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") +
                                               f" --xla_force_host_platform_device_count={args.devices}").strip()}
            sys.exit(subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode)
    sys.path.insert(0, REPO)
    import jax  # pylint: disable=g-import-not-at-top
    from vaekl import sharding, sweep  # pylint: disable=g-import-not-at-top

    devices = sharding.devices()
    n = len(devices)
    base = _config(100, args.steps)
    betas = ",".join(str(0.25 * 2 ** i) for i in range(max(1, args.runs // 2)))
    grid = [c for _, _, c in sweep.points(f"beta={betas} seed=0,1", base)][: args.runs]
    single = [_config(args.batch, args.steps)]
    rows = []
    for name, configs, unit in [(f"(a) runs sharded: {len(grid)} runs, batch 100", grid, "runs·steps/s"),
                                (f"(b) data parallel: 1 run, batch {args.batch}", single, "steps/s")]:
        one, c1 = measure(configs, devices[:1], args.steps, args.repeats)
        all_, cn = measure(configs, devices, args.steps, args.repeats)
        rows.append((name, unit, one, all_, c1, cn))
    kind = jax.devices()[0].device_kind
    print(f"{n} × {kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores; digits MLP 64-128-128-k, "
          f"{args.steps} steps per call, best of {args.repeats}")
    if jax.default_backend() == "cpu":
        print(f"NOTE: the {n} devices are forced XLA:CPU host devices sharing {os.cpu_count()} cores: the "
              f"ratios measure the sharding's overhead; no speed-up is expected here.")
    print(f"{'':<40} {'unit':<13} {'1 device':>10} {f'{n} devices':>10} {'ratio':>7}  collectives ({n} devices)")
    for name, unit, one, all_, _, cn in rows:
        print(f"{name:<40} {unit:<13} {one:10.1f} {all_:10.1f} {all_ / one:6.2f}x  {cn or 'none'}")


if __name__ == "__main__":
    main()
