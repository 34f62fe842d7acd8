"""Benchmark: dSprites rendered on the device inside the training loop against training from an
array of the same images held on the device, as images per second side by side.

    python benchmarks/bench_dsprites.py [--steps 300] [--batch 64] [--model mlp|conv]

(a) the array source: N = 20,000 images rendered once, held as uint8 on the device, batches
    drawn by index (what any image dataset does);
(b) the rendered source: factor indices drawn and the images rendered inside the compiled step.
Also the renderer alone, inside a jitted scan. The model is the one of --model (default a small
MLP, so that the data path is a visible part of the step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default="mlp", choices=["mlp", "conv"])
    args = p.parse_args()
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from vaekl import config as config_lib, data, dsprites, train  # pylint: disable=g-import-not-at-top

    c = config_lib.defaults()
    c.dataset, c.binarization, c.batch_size, c.latent_dim = "dsprites", "none", args.batch, 10
    if args.model == "conv":
        c.model, c.conv_channels, c.conv_hidden, c.activation = "conv", (32, 32, 64, 64), 256, "relu"
    else:
        c.encoder_hidden = c.decoder_hidden = (256,)
    ds = data.load("dsprites")
    factors = ds.sample_factors(20_000, np.random.default_rng(0))
    images = np.concatenate([np.asarray(dsprites.render(jnp.asarray(factors[i:i + 2000])))
                             for i in range(0, len(factors), 2000)])
    sources = {"(a) array of 20,000 images": (jax.device_put(images), data.sample_batch),
               "(b) rendered in the step": ds.batch_source()}
    rates = {}
    for name, (arrays, draw) in sources.items():
        graphdef, state, tx = train.create(c, ds.image_shape)
        fns = train.compile_fns(c, graphdef, tx, vmapped=False, draw=draw, dataset_size=ds.train_size)
        hp, key = train.hyperparameters(c), jax.random.key(0)
        n = train.steps_per_call(c) or args.steps
        state, _ = fns.run_steps(state, arrays, hp, key, None, num_steps=n)  # compile, warm up
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.steps // n):
            state, _ = fns.run_steps(state, arrays, hp, key, None, num_steps=n)
        jax.block_until_ready(state)
        rates[name] = args.steps // n * n * args.batch / (time.perf_counter() - t0)

    render = jax.jit(lambda k: jax.lax.scan(
        lambda c_, i: (c_, dsprites.render(dsprites.sample_factor_indices(jax.random.fold_in(k, i),
                                                                            args.batch)).sum()),
        0, jnp.arange(50))[1])
    render(jax.random.key(1)).block_until_ready()
    t0 = time.perf_counter()
    render(jax.random.key(2)).block_until_ready()
    render_rate = 50 * args.batch / (time.perf_counter() - t0)

    base = rates["(a) array of 20,000 images"]
    print(f"training a {args.model} VAE on 64×64 dSprites, batch {args.batch}, {args.steps} steps, "
          f"{jax.default_backend()}:")
    for name, r in rates.items():
        print(f"  {name:<30} {r:9.0f} training images/s   {r / base:5.2f}x (a)")
    print(f"  renderer alone (jitted scan)   {render_rate:9.0f} images/s")


if __name__ == "__main__":
    main()
