"""Benchmark: sweeping a regularizer's strength, and each regularizer's step time, as ratios.

    python benchmarks/bench_regularizers.py [--regularizer capacity] [--steps 1000] [--runs 16]

1. A strength × seed sweep of ``--runs`` runs (4 seeds, the rest strengths) trained
   (a) as before per-run strengths became traced values: one compiled program per strength
       (each program vmaps that strength's seeds), one after another, in this process;
   (b) as one vmapped program for the whole sweep (what ``launch.sweep --backend=vmap`` does now).
   Both go through ``vaekl.train.train_group`` and include compilation, evaluation, checkpoints and
   images, as a user waits for them. Target on this CPU: (b) ≥ 4 × (a).
2. Each registered regularizer's training step against the plain KL's, one model, steps/s
   measured side by side in one process (compiled first, then timed).

On a GPU pass --runs 64.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STRENGTHS = {"kl": "beta", "free_bits": "free_bits", "capacity": "capacity_max", "tcvae": "beta",
             "dip_i": "dip_lambda_od", "dip_ii": "dip_lambda_od", "mmd": "mmd_lambda",
             "factor": "factor_gamma"}


def small(config_lib, **kw):
    c = config_lib.defaults()
    c.dataset = "digits"
    c.encoder_hidden = c.decoder_hidden = (128, 128)
    c.latent_dim = 8
    c.batch_size = 64
    c.num_images = 4
    for k, v in kw.items():
        c[k] = v
    return c


def sweep_ratio(reg: str, steps: int, runs: int) -> tuple[float, float]:
    from vaekl import config as config_lib, data, train  # pylint: disable=g-import-not-at-top

    field = STRENGTHS[reg]
    seeds = 4
    values = [0.5 * (i + 1) for i in range(runs // seeds)]
    every = dict(num_steps=steps, eval_every=steps, checkpoint_every=steps, log_every=steps)
    configs = [small(config_lib, regularizer=reg, seed=s, **{field: v}, **every)
               for v in values for s in range(seeds)]
    ds = data.load("digits")
    tmp = tempfile.mkdtemp(prefix="bench_reg_")
    try:
        t0 = time.perf_counter()
        for i, v in enumerate(values):  # (a): one program per strength
            group = configs[i * seeds:(i + 1) * seeds]
            train.clear_compiled()  # as before: a strength was part of the program
            train.train_group(group, [f"{tmp}/a/{i}-{s}" for s in range(seeds)], dataset=ds)
        t_a = time.perf_counter() - t0
        t0 = time.perf_counter()
        train.train_group(configs, [f"{tmp}/b/{j}" for j in range(len(configs))], dataset=ds)
        t_b = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return t_a, t_b


def step_times(steps: int) -> dict[str, float]:
    import jax  # pylint: disable=g-import-not-at-top
    from vaekl import config as config_lib, data, regularizers, train  # pylint: disable=g-import-not-at-top

    ds = data.load("digits")
    arrays, draw = train.batch_source(ds)
    out = {}
    for reg in regularizers.REGISTRY:
        c = small(config_lib, regularizer=reg)
        graphdef, state, tx = train.create(c, ds.image_shape)
        fns = train.compile_fns(c, graphdef, tx, vmapped=False, draw=draw, dataset_size=train.dataset_size(ds))
        hp, key = train.hyperparameters(c), jax.random.key(0)
        state, _ = fns.run_steps(state, arrays, hp, key, None, num_steps=steps)  # compile + warm up
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, _ = fns.run_steps(state, arrays, hp, key, None, num_steps=steps)
        jax.block_until_ready(state)
        out[reg] = steps / (time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regularizer", default="capacity", choices=sorted(STRENGTHS))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--runs", type=int, default=16)
    args = p.parse_args()
    from vaekl.cli import quiet_library_logs  # pylint: disable=g-import-not-at-top
    quiet_library_logs()
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.WARNING)

    t_a, t_b = sweep_ratio(args.regularizer, args.steps, args.runs)
    print(f"{args.runs}-run sweep of {STRENGTHS[args.regularizer]} × 4 seeds ({args.regularizer}), "
          f"{args.steps} steps, digits MLP 64-128-128-8, batch 64")
    print(f"  (a) one program per strength: {t_a:7.1f} s")
    print(f"  (b) one vmapped program:      {t_b:7.1f} s   (a)/(b) = {t_a / t_b:.2f}x")
    rates = step_times(args.steps)
    base = rates["kl"]
    print(f"training steps/s of one model ({args.steps} steps, after compilation), and the plain KL's ÷ each:")
    for reg, r in rates.items():
        print(f"  {reg:<10} {r:8.0f} steps/s   kl/{reg} = {base / r:5.2f}x")


if __name__ == "__main__":
    main()
