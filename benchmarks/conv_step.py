"""The Locatello et al. conv VAE's training step as the trainer compiles it, for the benchmarks
(``bench_vs_pytorch.py``, ``bench_conv_step.py``, ``gpu/``): one model or a group of R in one
program, and each conv layer's forward and backward time."""

from __future__ import annotations

import os
import runpy
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from vaekl import data, host_memory, train
from vaekl.models import conv as conv_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCATELLO = os.path.join(REPO, "experiments/reproduce/locatello_dsprites.py")


def setup(method: str = "beta_vae", **overrides) -> SimpleNamespace:
    """The study's config for ``method`` (with ``overrides``), its dSprites source and model; the
    process keeps freed memory as the entry points do (:mod:`vaekl.host_memory`)."""
    host_memory.keep_freed_memory()
    config = runpy.run_path(LOCATELLO)["get_config"](method)
    for k, v in overrides.items():
        config[k] = v
    ds, _ = train.prepare(config, data.for_config(config))
    graphdef, state, tx = train.create(config, ds.image_shape, ds.train_images)
    arrays, draw = train.batch_source(ds)
    return SimpleNamespace(config=config, ds=ds, graphdef=graphdef, state=state, tx=tx, arrays=arrays,
                           draw=draw)


def compiled_step(s: SimpleNamespace, group: int = 1, members: str | None = None, num_steps: int = 1):
    """A zero-argument callable that runs ``num_steps`` training steps of the trainer's compiled
    program (``train.compile_fns``) and waits for them: one model, or ``group`` models (each
    with its own β) in one program, members combined as ``members`` ('vmap', 'sequential';
    None: the trainer's choice)."""
    vmapped = group > 1
    fns = train.compile_fns(s.config, s.graphdef, s.tx, vmapped=vmapped, draw=s.draw,
                            dataset_size=train.dataset_size(s.ds), members=members)
    hp = train.hyperparameters(s.config)
    key = jax.random.key(0)
    state = s.state
    if vmapped:
        stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * group), t)  # noqa: E731
        state, key = stack(state), jax.random.split(key, group)
        hp = {k: v * jnp.arange(1, group + 1, dtype=v.dtype) if k == "beta" else jnp.stack([v] * group)
              for k, v in hp.items()}
    box = [jax.tree.map(jnp.copy, state)]

    def run():
        box[0], _ = fns.run_steps(box[0], s.arrays, hp, key, None, num_steps=num_steps)
        jax.block_until_ready(box[0])

    return run


# The model's conv layers at batch 64: (name, input side, in channels, out channels, transposed).
LAYERS = [("enc_conv0", 64, 1, 32, False), ("enc_conv1", 32, 32, 32, False), ("enc_conv2", 16, 32, 64, False),
          ("enc_conv3", 8, 64, 64, False), ("dec_deconv0", 4, 64, 64, True), ("dec_deconv1", 8, 64, 32, True),
          ("dec_deconv2", 16, 32, 32, True), ("dec_deconv3", 32, 32, 1, True)]


def _median(fn, *args, n: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def layer_times(n: int = 10, batch: int = 64) -> dict[str, dict[str, float]]:
    """{layer: {fwd, fwd_bwd, fwd_bwd_native}} seconds: the forward pass, and the forward pass with
    the gradient with respect to input and kernel (as PyTorch's layer benchmark computes) for a random cotangent
    (a constant one would let XLA fold work away), on this backend's path and on XLA's native
    convolutions."""
    out = {}
    for name, side, c_in, c_out, transposed in LAYERS:
        x = jax.random.normal(jax.random.key(0), (batch, side, side, c_in))
        w = jax.random.normal(jax.random.key(1), (4, 4, c_in, c_out)) * 0.1
        op = conv_lib.conv_transpose if transposed else conv_lib.conv
        f = lambda x, w, impl="auto", op=op: op(x, w, 2, "SAME", impl=impl)  # noqa: E731
        g = jax.random.normal(jax.random.key(2), f(x, w, "native").shape)
        # The value too, so that the forward pass is computed (the gradient of this linear loss
        # alone does not need it, and XLA would drop it), as PyTorch's forward + backward does.
        grad = lambda impl, f=f, g=g: jax.jit(jax.value_and_grad(  # noqa: E731
            lambda x, w: jnp.sum(f(x, w, impl) * g), (0, 1)))
        out[name] = {"fwd": _median(jax.jit(f), x, w, n=n), "fwd_bwd": _median(grad("auto"), x, w, n=n),
                     "fwd_bwd_native": _median(grad("native"), x, w, n=n)}
    return out
