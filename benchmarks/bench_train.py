"""Benchmark: training throughput of the Flax example's VAE, per-step loop vs vaekl's scan.

    python benchmarks/bench_train.py [--steps 2000] [--data ../shared/data/mnist_partial.npz]

The model is the official Flax VAE example's: 784-500-20 relu MLP encoder and decoder,
batch 128, Bernoulli likelihood, Adam 1e-3, dynamically binarized MNIST. Side by side in
one process:

  (a) a Python loop calling a jitted step once per step and feeding batches prepared on
      the host (the way the Flax example trains once its step is jitted);
  (b) vaekl's trainer: the dataset resident on the device as uint8, batches drawn and
      binarized inside ``lax.scan``, many steps per call;

and two ceilings measured in the same run: a large square float32 matmul, and the model's
own matmuls alone (forward and backward shapes, batch 128, no other work). Reports
samples/s, the ratio (b)/(a), and achieved FLOP/s over each ceiling.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vaekl import config as config_lib
from vaekl import data, objectives, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flax_example_config(steps: int):
    c = config_lib.defaults()
    c.model, c.encoder_hidden, c.decoder_hidden, c.activation = "mlp", (500,), (500,), "relu"
    c.latent_dim, c.batch_size, c.learning_rate, c.likelihood = 20, 128, 1e-3, "bernoulli"
    c.binarization, c.num_steps = "dynamic", steps
    return c


def load_images(path: str) -> np.ndarray:
    if os.path.exists(path):
        return data.load("npz", path).train_images
    print(f"{path} not found: using random 28×28 images (throughput does not depend on content)")
    return np.random.default_rng(0).integers(0, 256, (24345, 28, 28, 1), dtype=np.uint8)


def flops_per_step(c, image_size: int) -> float:
    """Matmul FLOPs of one training step: forward (2·MACs) and backward (2× forward)."""
    k = c.latent_dim
    macs = image_size * 500 + 500 * 2 * k + k * 500 + 500 * image_size
    return 3 * 2 * macs * c.batch_size


def timed(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "mnist_partial.npz"))
    args = p.parse_args()
    c = flax_example_config(args.steps)
    images = load_images(args.data)
    image_size = int(np.prod(images.shape[1:]))
    graphdef, state0, tx = train.create(c, images.shape[1:])
    static = objectives.Static.from_config(c, len(images))
    hp = train.hyperparameters(c)
    fresh = lambda: jax.tree.map(jnp.copy, state0)  # noqa: E731

    # (a) per-step jitted calls, host batches: the same objective and Adam update as vaekl's step.
    @jax.jit
    def step(state, x, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            loss, (m, _) = objectives.objective(model, x, key, state.step, hp, static)
            return loss, m
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.model.update(g, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: -hp["learning_rate"] * u, updates)
        return train.TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), m["loss"]

    rng = np.random.default_rng(0)
    host = images.astype(np.float32) / 255.0

    def run_a():
        state, key = fresh(), jax.random.key(0)
        for t in range(args.steps):
            idx = rng.integers(0, len(host), c.batch_size)
            x = (rng.random((c.batch_size, *host.shape[1:]), dtype=np.float32) < host[idx]).astype(np.float32)
            state, loss = step(state, x, jax.random.fold_in(key, t))
        jax.block_until_ready(loss)

    # (b) vaekl: scan-fused, data on device.
    fns = train.compile_fns(c, graphdef, tx, vmapped=False)
    dev_images = jax.device_put(images)
    chunk = 500

    def run_b():
        state, key = fresh(), jax.random.key(0)
        for _ in range(args.steps // chunk):
            state, m = fns.run_steps(state, dev_images, hp, key, None, num_steps=chunk)
        jax.block_until_ready(m["loss"])

    # Ceilings: a big square matmul, and the model's matmuls alone.
    n = 2048
    a = jax.random.normal(jax.random.key(1), (n, n))
    mm = jax.jit(lambda a: a @ a)
    t_mm = timed(lambda: mm(a).block_until_ready())
    square_flops = 2 * n**3 / t_mm

    ws = [jax.random.normal(jax.random.key(i), s) * 0.01 for i, s in
          enumerate([(image_size, 500), (500, 2 * c.latent_dim), (c.latent_dim, 500), (500, image_size)])]
    xb = jax.random.normal(jax.random.key(9), (c.batch_size, image_size))

    def matmuls_only(ws, x):
        h = x @ ws[0]
        z = (h @ ws[1])[:, : c.latent_dim]
        return jnp.sum((z @ ws[2]) @ ws[3])

    grad_mm = jax.jit(jax.grad(matmuls_only))

    @functools.partial(jax.jit, static_argnums=2)
    def many(ws, x, n):
        return jax.lax.fori_loop(0, n, lambda i, w: jax.tree.map(lambda a, g: a - 1e-9 * g, w, grad_mm(w, x)), ws)

    reps = 200
    t_model_mm = timed(lambda: jax.block_until_ready(many(ws, xb, reps))) / reps
    model_mm_flops = flops_per_step(c, image_size) / t_model_mm

    t_a, t_b = timed(run_a, 1), timed(run_b, 1)
    sps_a, sps_b = args.steps * c.batch_size / t_a, args.steps * c.batch_size / t_b
    achieved = flops_per_step(c, image_size) * args.steps / t_b
    print(f"device: {jax.devices()[0].device_kind}; Flax example VAE 784-500-20, batch 128, {args.steps} steps")
    print(f"(a) per-step jitted loop, host batches : {sps_a:10.0f} samples/s")
    print(f"(b) vaekl scan-fused, data on device   : {sps_b:10.0f} samples/s")
    print(f"(b)/(a)                                : {sps_b / sps_a:10.2f}x")
    print(f"square matmul ceiling ({n}³)          : {square_flops / 1e9:10.1f} GFLOP/s")
    print(f"model matmuls alone (fwd+bwd, b=128)   : {model_mm_flops / 1e9:10.1f} GFLOP/s")
    print(f"(b) achieved matmul FLOP/s             : {achieved / 1e9:10.1f} GFLOP/s = "
          f"{achieved / square_flops:.0%} of the square-matmul ceiling, "
          f"{achieved / model_mm_flops:.0%} of the model's matmuls alone")


if __name__ == "__main__":
    main()
