"""Benchmark: one training step of the Locatello et al. conv VAE (64×64 dSprites, batch 64) as
the trainer compiles it on the CPU (``loops.scan``, no loop) against the same step inside
``lax.scan``'s one-trip while loop, seconds per step side by side in one run.

    python benchmarks/bench_conv_step.py [--repeats 5] [--method beta_vae]

XLA:CPU runs convolutions inside a while loop far slower than outside one; ``lax.scan`` keeps
a loop even for one step with ``unroll=True``. The ratio is what the fix buys per step.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--method", default="beta_vae")
    args = p.parse_args()
    import jax  # pylint: disable=g-import-not-at-top
    from benchmarks import conv_step  # pylint: disable=g-import-not-at-top
    from vaekl import loops, objectives, train  # pylint: disable=g-import-not-at-top

    s = conv_step.setup(args.method)
    config, state = s.config, s.state
    cfg = train.StepConfig(config.batch_size, train.step_binarization(config),
                           objectives.Static.from_config(config, train.dataset_size(s.ds)), s.draw)
    step = functools.partial(train.train_step, arrays=s.arrays, hp=train.hyperparameters(config),
                             key=jax.random.key(0), latent_mask=None, graphdef=s.graphdef, tx=s.tx, cfg=cfg)
    body = lambda s, _: step(s)
    variants = {"loops.scan (trainer)": jax.jit(lambda s: loops.scan(body, s, None, length=1)[0]),
                "lax.scan, one-trip loop": jax.jit(lambda s: jax.lax.scan(body, s, None, length=1, unroll=True)[0])}
    times = {}
    for name, fn in variants.items():
        s = jax.block_until_ready(fn(state))  # compile
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            s = jax.block_until_ready(fn(s))
        times[name] = (time.perf_counter() - t0) / args.repeats
        print(f"{name:28s} {times[name]:.3f} s per step", flush=True)
    a, b = times.values()
    print(f"loop ÷ no loop: {b / a:.1f}× ({jax.devices()[0].device_kind}, {os.cpu_count()} CPUs visible, "
          f"{len(os.sched_getaffinity(0))} usable)")


if __name__ == "__main__":
    main()
