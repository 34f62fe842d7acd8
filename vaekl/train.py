"""Training: pure functions over the split nnx state, many steps per ``jax.jit`` call.

The model is split once into a static graph definition and a pytree of parameters; the
training loop is ``lax.scan`` over a pure step function, with the dataset held on the
device as uint8 and every batch drawn (and binarized) inside the compiled loop. Step t
uses the key ``fold_in(key(seed), t)``, so a run is deterministic given its seed and a
resumed run repeats exactly the steps an uninterrupted one would take.

The pure functions take the per-run values (state, β, latent mask) as arguments, so that
a sweep can ``jax.vmap`` them over many runs in one program.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vaekl import checkpoints, data, objectives, rundir
from vaekl import config as config_lib
from vaekl.models import vae as vae_lib
from vaekl.objectives import Objective

SCALARS = ("loss", "neg_elbo", "recon", "kl", "kl_trace", "kl_mahalanobis",
           "kl_log_det_ratio", "kl_dim", "beta", "beta_weight", "capacity")


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as is)."""

    params: Any      # nested dict of arrays: the model's nnx.Param values
    opt_state: Any   # optax state over params
    step: jax.Array  # int32 scalar, steps taken


# ----------------------------------------------------------------------------------------
# Construction.


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """'constant'; 'cosine' decay to 0 over num_steps; or 'iwae': Burda et al.'s 8 stages
    of 3^i epochs (i = 0..7) with the rate 10^(−i/7) × learning_rate, the stage lengths
    scaled to num_steps (exactly the paper's when num_steps is 3,280 epochs)."""
    lr, n = config.learning_rate, config.num_steps
    if config.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, n)
    if config.lr_schedule == "iwae":
        ends = np.cumsum([3**i for i in range(8)]) / sum(3**i for i in range(8))
        boundaries = {int(round(e * n)): 10 ** (-1 / 7) for e in ends[:-1]}
        return optax.piecewise_constant_schedule(lr, boundaries)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adam(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                      eps=config.adam_eps)


def create(config: ml_collections.ConfigDict, image_shape, train_images: np.ndarray | None = None):
    """Builds the model and its initial state.

    Returns:
      (graphdef, state, tx): the static nnx graph, the TrainState at step 0 and the optimizer.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    model = vae_lib.make_vae(config, image_shape, key)
    if config.output_bias_from_data:
        if train_images is None:
            raise ValueError("output_bias_from_data needs the training images")
        mean = np.clip(np.asarray(train_images, np.float64).mean(0) / 255.0, 1e-3, 1 - 1e-3)
        bias = np.log(mean) - np.log1p(-mean)
        vae_lib.set_output_bias(model, jnp.asarray(bias if config.likelihood == "bernoulli" else mean,
                                                   jnp.float32))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    tx = make_optimizer(config)
    return graphdef, TrainState(params, tx.init(params), jnp.zeros((), jnp.int32)), tx


# ----------------------------------------------------------------------------------------
# Pure training steps.


class StepConfig(NamedTuple):
    """Static settings of the compiled training loop."""

    batch_size: int
    binarization: str
    objective: Objective


def train_step(state: TrainState, images: jax.Array, beta: jax.Array, key: jax.Array,
               latent_mask: jax.Array | None, *, graphdef, tx: optax.GradientTransformation,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch drawn on the device from uint8 ``images``."""
    k_batch, k_bin, k_z = jax.random.split(jax.random.fold_in(key, state.step), 3)
    x = data.binarize(k_bin, data.sample_batch(k_batch, images, cfg.batch_size), cfg.binarization)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        return objectives.loss(model, x, k_z, state.step, beta, cfg.objective, latent_mask)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics = {k: metrics[k] for k in ("loss", "neg_elbo", "recon", "kl")}
    return TrainState(params, opt_state, state.step + 1), step_metrics


def run_steps(state: TrainState, images: jax.Array, beta: jax.Array, key: jax.Array,
              latent_mask: jax.Array | None, *, num_steps: int, graphdef, tx, cfg: StepConfig):
    """``num_steps`` training steps in one ``lax.scan``; returns (state, per-step metrics [n])."""
    step = functools.partial(train_step, images=images, beta=beta, key=key, latent_mask=latent_mask,
                             graphdef=graphdef, tx=tx, cfg=cfg)
    return jax.lax.scan(lambda s, _: step(s), state, None, length=num_steps)


# ----------------------------------------------------------------------------------------
# Evaluation.


class EvalConfig(NamedTuple):
    """Static settings of the compiled evaluation."""

    batch_size: int
    binarization: str
    objective: Objective
    active_units_threshold: float


def evaluate(params, images: jax.Array, beta: jax.Array, step: jax.Array, key: jax.Array,
             latent_mask: jax.Array | None, *, graphdef, cfg: EvalConfig) -> dict[str, jax.Array]:
    """Averages over all of ``images`` [N, H, W, C] (uint8), in nats per example.

    One posterior sample per example for the reconstruction term (a fixed ``key``, so that
    evaluations are comparable across steps; dynamic binarization is likewise fixed). Active
    units (Burda et al. 2016): dimensions u with Cov_x(E_q[z_u|x]) > threshold.
    """
    model = nnx.merge(graphdef, params)
    n = images.shape[0]
    bs = min(cfg.batch_size, n)
    n_batches = -(-n // bs)
    pad = n_batches * bs - n
    padded = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)])
    batches = padded.reshape(n_batches, bs, *images.shape[1:])
    keys = jax.random.split(key, n_batches)

    def one_batch(args):
        x_u8, k = args
        k_bin, k_z = jax.random.split(k)
        return objectives.per_example(model, data.binarize(k_bin, x_u8, cfg.binarization), k_z,
                                      latent_mask)

    per = jax.lax.map(one_batch, (batches, keys))
    per = jax.tree.map(lambda a: a.reshape(n_batches * bs, *a.shape[2:])[:n], per)
    means = {k: v.mean(0) for k, v in per.items() if k != "posterior_mean"}
    mu = per["posterior_mean"]
    au_variance = jnp.mean(jnp.square(mu - mu.mean(0)), 0)
    kl = means["kl_per_dim"].sum()
    obj = cfg.objective
    w, c = objectives.beta_weight(obj, step), objectives.capacity(obj, step)
    reg = objectives.regularizer(obj, means["kl_per_dim"], kl, c, latent_mask)
    return dict(means, kl=kl, neg_elbo=means["recon"] + kl, loss=means["recon"] + beta * w * reg,
                beta=jnp.asarray(beta, jnp.float32), beta_weight=w, capacity=c,
                active_units=jnp.sum(au_variance > cfg.active_units_threshold),
                au_variance=au_variance)


# ----------------------------------------------------------------------------------------
# The host loop.


class Compiled(NamedTuple):
    """The jitted functions of one run: (state, images, β, key, mask) → …"""

    run_steps: Callable  # also takes num_steps (static)
    evaluate: Callable


def compile_fns(config: ml_collections.ConfigDict, graphdef, tx) -> Compiled:
    obj = Objective.from_config(config)
    mode = "none" if config.binarization == "static" else config.binarization  # static is done on host
    steps = jax.jit(functools.partial(run_steps, graphdef=graphdef, tx=tx,
                                      cfg=StepConfig(config.batch_size, mode, obj)),
                    static_argnames="num_steps", donate_argnums=0)
    ev = jax.jit(functools.partial(evaluate, graphdef=graphdef, cfg=EvalConfig(
        config.eval_batch_size, mode, obj, config.active_units_threshold)))
    return Compiled(steps, ev)


def prepare_images(config: ml_collections.ConfigDict, ds: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 arrays, binarized once here when binarization is 'static'."""
    fix = data.binarize_static if config.binarization == "static" else (lambda a: a)
    return fix(ds.train_images), fix(ds.test_images)


def eval_rows(step: int, evals: dict[str, dict]) -> list[dict]:
    """metrics.jsonl rows (one per split) from device results."""
    rows = []
    for split, m in evals.items():
        m = jax.device_get(m)
        row = {"step": int(step), "split": split}
        row.update({k: float(m[k]) for k in SCALARS})
        row["kl_per_dim"] = [float(v) for v in m["kl_per_dim"]]
        row["active_units"] = int(m["active_units"])
        row["au_variance"] = [float(v) for v in m["au_variance"]]
        rows.append(row)
    return rows


def _boundaries(config: ml_collections.ConfigDict, start: int) -> list[int]:
    """The steps after ``start`` where the loop stops to log, evaluate or checkpoint."""
    every = (config.log_every, config.eval_every, config.checkpoint_every)
    stops = {s for e in every for s in range(e, config.num_steps, e)} | {config.num_steps}
    return sorted(s for s in stops if s > start)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains one VAE as ``config`` says, writing everything to ``workdir``; resumes if it can.

    Bad config values and missing datasets fail before anything is written.

    Returns:
      The final evaluation rows (train and test).
    """
    config_lib.validate(config)
    ds = data.load(config.dataset, config.data_dir or None, test_fraction=config.test_fraction,
                   seed=config.seed)
    train_np, test_np = prepare_images(config, ds)
    graphdef, state, tx = create(config, ds.image_shape, train_np)

    os.makedirs(workdir, exist_ok=True)
    rundir.write_config(workdir, config.to_dict())
    log = rundir.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
    mgr = checkpoints.manager(workdir, config.keep_checkpoints)
    latest = mgr.latest_step()
    if latest is not None:
        state = checkpoints.restore(mgr, latest, state)
        logging.info("resuming %s from step %d", workdir, latest)
    log.truncate(-1 if latest is None else latest)

    fns = compile_fns(config, graphdef, tx)
    images = jax.device_put(train_np)
    evals_on = {"train": jax.device_put(train_np[: config.num_eval_train]),
                "test": jax.device_put(test_np)}
    beta = jnp.float32(config.beta)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    eval_key = jax.random.fold_in(jax.random.key(config.seed), 3)

    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def eval_and_log(step: int) -> dict[str, dict]:
        evals = {split: fns.evaluate(state.params, imgs, beta, jnp.int32(step), eval_key, None)
                 for split, imgs in evals_on.items()}
        rows = eval_rows(step, evals)
        log.append(rows)
        for row in rows:
            for k in SCALARS + ("active_units",):
                tb.add_scalar(f"{row['split']}/{k}", row[k], step)
            tb.add_histogram(f"{row['split']}/kl_per_dim", np.asarray(row["kl_per_dim"]), step)
        tb.flush()
        return {r["split"]: r for r in rows}

    step = int(state.step)
    last_rows = None
    if latest is None:
        last_rows = eval_and_log(0)
        checkpoints.save(mgr, 0, state, last_rows["test"]["neg_elbo"])
    t_start, step_start = time.perf_counter(), step
    for stop in _boundaries(config, step):
        state, metrics = fns.run_steps(state, images, beta, train_key, None, num_steps=stop - step)
        losses = np.asarray(metrics["loss"])
        if not np.all(np.isfinite(losses)):
            bad = step + 1 + int(np.argmin(np.isfinite(losses)))
            mgr.wait_until_finished()
            raise FloatingPointError(
                f"non-finite loss at step {bad} of {workdir}; the last good checkpoint is step "
                f"{mgr.latest_step()}. Lower learning_rate or check the data.")
        step = stop
        rate = (step - step_start) / (time.perf_counter() - t_start)
        logging.info("step %d/%d  loss %.3f  neg_elbo %.3f  kl %.3f  %.1f steps/s  ETA %s",
                     step, config.num_steps, losses.mean(), float(np.mean(metrics["neg_elbo"])),
                     float(np.mean(metrics["kl"])), rate, _format_eta((config.num_steps - step) / rate))
        evaluated = step % config.eval_every == 0 or step == config.num_steps
        if evaluated:
            last_rows = eval_and_log(step)
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            checkpoints.save(mgr, step, state, last_rows["test"]["neg_elbo"] if evaluated else None)
    mgr.wait_until_finished()
    tb.close()

    if last_rows is None:  # resumed a finished run: read its final rows back
        last_rows = {r["split"]: r for r in log.read() if r["step"] == config.num_steps}
    write_images(config, workdir, graphdef, state.params, test_np)
    return list(last_rows.values())


def write_images(config, workdir: str, graphdef, params, test_images: np.ndarray) -> None:
    """PNG grids: test images above their reconstructions, and samples from the prior."""
    cols = math.isqrt(min(config.num_images, test_images.shape[0]))
    n = cols * cols
    if n == 0:
        return
    model = nnx.merge(graphdef, params)
    x = data.to_float(jnp.asarray(test_images[:n]))
    recon = np.asarray(model.reconstruct(x))
    pairs = []
    for r in range(0, n, cols):  # alternate rows: originals, then their reconstructions
        pairs += [np.asarray(x[r:r + cols]), recon[r:r + cols]]
    rundir.save_png(os.path.join(workdir, "reconstructions.png"), np.concatenate(pairs), cols)
    samples = np.asarray(model.sample(jax.random.fold_in(jax.random.key(config.seed), 4), n))
    rundir.save_png(os.path.join(workdir, "samples.png"), samples, cols)
