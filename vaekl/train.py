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
PER_DIM = ("kl_per_dim", "au_variance", "kl_trace_per_dim", "kl_mahalanobis_per_dim",
           "kl_log_det_ratio_per_dim")  # lists of k numbers in metrics.jsonl


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


def batched_map(fn, x: jax.Array, batch_size: int):
    """``fn(batch, batch_index)`` over x [N, ...] in batches (the last one zero-padded), with
    ``lax.map``; the per-example outputs concatenated back to [N, ...]."""
    n = x.shape[0]
    bs = min(batch_size, n)
    nb = -(-n // bs)
    xp = jnp.concatenate([x, jnp.zeros((nb * bs - n, *x.shape[1:]), x.dtype)])
    out = jax.lax.map(lambda a: fn(*a), (xp.reshape(nb, bs, *x.shape[1:]), jnp.arange(nb)))
    return jax.tree.map(lambda a: a.reshape(nb * bs, *a.shape[2:])[:n], out)


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

    def one_batch(x_u8, i):
        k_bin, k_z = jax.random.split(jax.random.fold_in(key, i))
        return objectives.per_example(model, data.binarize(k_bin, x_u8, cfg.binarization), k_z,
                                      latent_mask)

    per = batched_map(one_batch, images, cfg.batch_size)
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
# Groups of runs: one compiled program for many (β, k, seed), vmapped.
#
# Members with different k share a program by padding every latent axis to the group's
# largest k, K: a member starts from the parameters a standalone model with its own k
# would have (same fan-in scaling), zero-padded at the end of each axis whose size depends
# on k, and a 0/1 latent mask switches the padded dimensions off (no KL, no decoder input,
# no metric, no gradient). A group of one is an ordinary run.

GROUP_FIELDS = ("beta", "latent_dim", "seed")  # what may differ inside a group


def group_key(config: ml_collections.ConfigDict) -> str:
    """Runs with equal keys can share one compiled program."""
    d = {k: v for k, v in config.to_dict().items() if k not in GROUP_FIELDS}
    return repr(sorted(d.items()))


def pad_like(tree, like):
    """Zero-pads each leaf of ``tree`` at the end of every axis to the shape of ``like``'s leaf."""
    def pad(a, b):
        a = jnp.asarray(a)
        return jnp.pad(a, [(0, nb - na) for na, nb in zip(a.shape, b.shape)]) if a.ndim else a
    return jax.tree.map(pad, tree, like)


def slice_like(tree, like):
    """The inverse of :func:`pad_like`: each leaf cut to the shape of ``like``'s leaf."""
    return jax.tree.map(lambda a, b: a[tuple(slice(0, n) for n in np.shape(b))], tree, like)


class Member:
    """One run of a group: its config, directory, metrics, checkpoints and TensorBoard."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, image_shape, train_images):
        self.config, self.workdir = config, workdir
        self.k = config.latent_dim
        self.graphdef, self.initial, _ = create(config, image_shape, train_images)
        self.log = rundir.MetricsLog(os.path.join(workdir, "metrics.jsonl"))
        self.mgr = None
        self.tb = None
        self.failure: str | None = None
        self.last_rows: dict[str, dict] | None = None

    def open(self) -> None:
        """Creates (or checks) the run directory; called once every member's input is valid."""
        os.makedirs(self.workdir, exist_ok=True)
        rundir.write_config(self.workdir, self.config.to_dict())
        self.mgr = checkpoints.manager(self.workdir, self.config.keep_checkpoints)
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self.tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))

    def log_rows(self, rows: list[dict]) -> None:
        self.log.append(rows)
        for row in rows:
            for k in SCALARS + ("active_units",):
                self.tb.add_scalar(f"{row['split']}/{k}", row[k], row["step"])
            self.tb.add_histogram(f"{row['split']}/kl_per_dim", np.asarray(row["kl_per_dim"]), row["step"])
        self.tb.flush()
        self.last_rows = {r["split"]: r for r in rows}

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()
        self.tb.close()


def _restore_start(members: list[Member]) -> int | None:
    """The common step to resume the group from (None: start afresh), made consistent.

    Normally every member's latest checkpoint is the same step. After a crash between
    members' saves, the group resumes from the earliest of them; members that got further
    drop their later checkpoints (their metrics are cut back below).
    """
    latest = [m.mgr.latest_step() for m in members]
    if all(s is None for s in latest):
        return None
    if any(s is None for s in latest):
        raise ValueError("a group mixes new runs with partly trained ones, which would restart "
                         "them; group runs by their latest checkpoint (vaekl.sweep.groups does)")
    start = min(latest)
    for m in members:
        later = [s for s in m.mgr.all_steps() if s > start]
        if start not in m.mgr.all_steps():
            raise ValueError(f"cannot resume {m.workdir} at step {start} with its group (it has "
                             f"checkpoints {m.mgr.all_steps()}); run it on its own")
        for s in later:
            m.mgr.delete(s)
    return start


def _member_rows(step: int, evals: dict[str, dict], i: int, k: int) -> list[dict]:
    rows = eval_rows(step, {split: jax.tree.map(lambda a: a[i], ev) for split, ev in evals.items()})
    for r in rows:
        for name in PER_DIM:
            r[name] = r[name][:k]
    return rows


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                dataset: data.Dataset | None = None) -> list[list[dict] | Exception]:
    """Trains runs that differ only in β, latent_dim and seed together, in one vmapped program.

    Each run writes its own directory exactly as :func:`train_and_evaluate` does, and
    resumes from its checkpoints. Bad config values and missing datasets fail before any
    directory is written. A run whose loss turns non-finite is stopped (its last good
    checkpoint kept) without stopping the others.

    Args:
      configs, workdirs: the runs.
      dataset: the runs' dataset, if already loaded.
    Returns:
      For each run, its final evaluation rows, or the exception that stopped it.
    """
    for c in configs:
        config_lib.validate(c)
    if len({group_key(c) for c in configs}) != 1:
        raise ValueError(f"a group's runs may differ only in {GROUP_FIELDS}")
    config = configs[0]
    ds = dataset or data.load(config.dataset, config.data_dir or None,
                              test_fraction=config.test_fraction, seed=config.data_seed)
    train_np, test_np = prepare_images(config, ds)
    members = [Member(c, w, ds.image_shape, train_np) for c, w in zip(configs, workdirs)]
    big = config.copy_and_resolve_references()
    big.unlock()
    big.latent_dim = max(m.k for m in members)
    graphdef, template, tx = create(big, ds.image_shape, train_np)

    for m in members:  # every check before the first directory is written
        rundir.check_config(m.workdir, m.config.to_dict())
    for m in members:
        m.open()
    start = _restore_start(members)
    member_states = []
    for m in members:
        state = m.initial if start is None else checkpoints.restore(m.mgr, start, m.initial)
        m.log.truncate(-1 if start is None else start)
        member_states.append(pad_like(state, template))
    state = jax.tree.map(lambda *a: jnp.stack(a), *member_states)
    if start is not None:
        logging.info("resuming %d run(s) from step %d", len(members), start)

    fns = compile_fns(config, graphdef, tx, vmapped=True)
    images = jax.device_put(train_np)
    evals_on = {"train": jax.device_put(train_np[: config.num_eval_train]),
                "test": jax.device_put(test_np)}
    betas = jnp.asarray([m.config.beta for m in members], jnp.float32)
    masks = jnp.asarray([np.arange(big.latent_dim) < m.k for m in members], jnp.float32)
    seeds = [jax.random.key(m.config.seed) for m in members]
    train_keys = jnp.stack([jax.random.fold_in(k, 2) for k in seeds])
    eval_keys = jnp.stack([jax.random.fold_in(k, 3) for k in seeds])
    live = lambda: [(i, m) for i, m in enumerate(members) if m.failure is None]

    def eval_and_log(step: int) -> None:
        evals = {split: fns.evaluate(state.params, imgs, betas, jnp.int32(step), eval_keys, masks)
                 for split, imgs in evals_on.items()}
        evals = jax.device_get(evals)
        for i, m in live():
            m.log_rows(_member_rows(step, evals, i, m.k))

    def save(step: int, evaluated: bool) -> None:
        host = jax.device_get(state)
        for i, m in live():
            own = slice_like(jax.tree.map(lambda a: a[i], host), m.initial)
            checkpoints.save(m.mgr, step, own, m.last_rows["test"]["neg_elbo"] if evaluated else None)

    step = 0 if start is None else start
    if start is None:
        eval_and_log(0)
        save(0, evaluated=True)
    t_start, step_start = time.perf_counter(), step
    for stop in _boundaries(config, step):
        state, metrics = fns.run_steps(state, images, betas, train_keys, masks, num_steps=stop - step)
        losses = np.asarray(metrics["loss"])  # [members, steps]
        for i, m in live():
            if not np.all(np.isfinite(losses[i])):
                bad = step + 1 + int(np.argmin(np.isfinite(losses[i])))
                m.mgr.wait_until_finished()
                m.failure = (f"non-finite loss at step {bad} of {m.workdir}; the last good checkpoint "
                             f"is step {m.mgr.latest_step()}. Lower learning_rate or check the data.")
                logging.error("%s", m.failure)
        if not live():
            break
        step = stop
        rate = (step - step_start) / (time.perf_counter() - t_start)
        alive = [i for i, _ in live()]
        logging.info("step %d/%d  loss %.3f  neg_elbo %.3f  kl %.3f  %.1f steps/s%s  ETA %s",
                     step, config.num_steps, losses[alive].mean(),
                     float(np.mean(np.asarray(metrics["neg_elbo"])[alive])),
                     float(np.mean(np.asarray(metrics["kl"])[alive])), rate,
                     f" × {len(alive)} runs" if len(members) > 1 else "",
                     _format_eta((config.num_steps - step) / rate))
        evaluated = step % config.eval_every == 0 or step == config.num_steps
        if evaluated:
            eval_and_log(step)
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            save(step, evaluated)

    results: list[list[dict] | Exception] = []
    host_params = jax.device_get(state.params)
    for i, m in enumerate(members):
        m.close()
        if m.failure is not None:
            results.append(FloatingPointError(m.failure))
            continue
        if m.last_rows is None:  # resumed a finished run: read its final rows back
            m.last_rows = {r["split"]: r for r in m.log.read() if r["step"] == config.num_steps}
        params = slice_like(jax.tree.map(lambda a: a[i], host_params), m.initial.params)
        write_images(m.config, m.workdir, m.graphdef, params, test_np)
        results.append(list(m.last_rows.values()))
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains one VAE as ``config`` says, writing everything to ``workdir``; resumes if it can.

    Bad config values and missing datasets fail before anything is written.

    Returns:
      The final evaluation rows (train and test).
    Raises:
      FloatingPointError: the loss became non-finite (the last good checkpoint is kept).
    """
    (result,) = train_group([config], [workdir])
    if isinstance(result, Exception):
        raise result
    return result


def eval_rows(step: int, evals: dict[str, dict]) -> list[dict]:
    """metrics.jsonl rows (one per split) from one run's evaluation results."""
    rows = []
    for split, m in evals.items():
        row = {"step": int(step), "split": split}
        row.update({k: float(m[k]) for k in SCALARS})
        row["active_units"] = int(m["active_units"])
        for k in PER_DIM:
            row[k] = [float(v) for v in m[k]]
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


class Compiled(NamedTuple):
    """The jitted functions of a group: (state, images, β, key, mask) → …"""

    run_steps: Callable  # also takes num_steps (static)
    evaluate: Callable


def compile_fns(config: ml_collections.ConfigDict, graphdef, tx, vmapped: bool = True) -> Compiled:
    """jit(vmap(...)) of run_steps and evaluate over the members' state, β, keys and masks."""
    obj = Objective.from_config(config)
    mode = "none" if config.binarization == "static" else config.binarization  # static is done on host
    step_cfg = StepConfig(config.batch_size, mode, obj)
    ev = functools.partial(evaluate, graphdef=graphdef, cfg=EvalConfig(
        config.eval_batch_size, mode, obj, config.active_units_threshold))

    def steps(state, images, beta, key, latent_mask, num_steps):
        fn = functools.partial(run_steps, num_steps=num_steps, graphdef=graphdef, tx=tx, cfg=step_cfg)
        if vmapped:
            fn = jax.vmap(fn, in_axes=(0, None, 0, 0, 0))
        return fn(state, images, beta, key, latent_mask)

    if vmapped:
        ev = jax.vmap(ev, in_axes=(0, None, 0, None, 0, 0))
    return Compiled(jax.jit(steps, static_argnames="num_steps", donate_argnums=0), jax.jit(ev))


def prepare_images(config: ml_collections.ConfigDict, ds: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 arrays, binarized once here when binarization is 'static'."""
    fix = data.binarize_static if config.binarization == "static" else (lambda a: a)
    return fix(ds.train_images), fix(ds.test_images)


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
