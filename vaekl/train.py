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

import collections
from collections.abc import Callable
import dataclasses
import functools
import json
import logging as pylogging
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vaekl import checkpoints, data, loops, objectives, regularizers, rundir, sharding, trajectory
from vaekl import metrics as metrics_lib
from vaekl import config as config_lib
from vaekl.models import vae as vae_lib

LOG = pylogging.getLogger(__name__)  # by name: cli.quiet_library_logs keeps vaekl's INFO lines

# Per-run values of the optimizer (the objective's come from vaekl.regularizers.FIELDS).
OPTIMIZER_PER_RUN = ("learning_rate",)


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as is)."""

    params: Any      # nested dict of arrays: the model's nnx.Param values
    opt_state: Any   # optax state over params
    step: jax.Array  # int32 scalar, steps taken
    aux: Any = None            # the regularizer's auxiliary parameters (FactorVAE's discriminator)
    aux_opt_state: Any = None  # optax state over aux


class Optimizers(NamedTuple):
    """Gradient transformations without the learning rate, which is a per-run value applied in
    the step: update = −lr · tx(grad)."""

    model: optax.GradientTransformation
    aux: optax.GradientTransformation | None = None


# ----------------------------------------------------------------------------------------
# Construction.


def learning_rate_schedule(config: ml_collections.ConfigDict, peak: float = 1.0) -> optax.Schedule:
    """The learning rate's shape over the run, scaled to ``peak`` (the trainer uses peak 1 and
    multiplies by the per-run ``learning_rate``): 'constant'; 'cosine' decay to 0 over num_steps;
    or 'iwae': Burda et al.'s 8 stages of 3^i epochs (i = 0..7) with the rate 10^(−i/7) × peak,
    the stage lengths scaled to num_steps (exactly the paper's when num_steps is 3,280 epochs)."""
    n = config.num_steps
    if config.lr_schedule == "constant":
        return optax.constant_schedule(peak)
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(peak, n)
    if config.lr_schedule == "iwae":
        ends = np.cumsum([3**i for i in range(8)]) / sum(3**i for i in range(8))
        boundaries = {int(round(e * n)): 10 ** (-1 / 7) for e in ends[:-1]}
        return optax.piecewise_constant_schedule(peak, boundaries)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}")


def make_optimizer(config: ml_collections.ConfigDict) -> Optimizers:
    """Adam with the learning-rate schedule's shape; the per-run learning rates multiply it."""
    model = optax.chain(optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
                        optax.scale_by_schedule(learning_rate_schedule(config)))
    reg = regularizers.get(config.regularizer)
    aux = reg.aux_optimizer(static_settings(config)) if reg.aux_optimizer else None
    return Optimizers(model, aux)


def static_settings(config: ml_collections.ConfigDict) -> dict:
    return {k: config[k] for k in regularizers.static_fields()}


def per_run_fields() -> tuple[str, ...]:
    """The config fields whose values are arguments of the compiled program (may differ within
    a vmapped group), derived from the objective's and the optimizer's declarations."""
    return regularizers.per_run_fields() + OPTIMIZER_PER_RUN


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """{field: float32 scalar} for every per-run field: the objective's
    (:func:`vaekl.objectives.hyperparameters`) and the optimizer's."""
    return {**objectives.hyperparameters(config), **{k: jnp.float32(config[k]) for k in OPTIMIZER_PER_RUN}}


def create(config: ml_collections.ConfigDict, image_shape, train_images: np.ndarray | None = None):
    """Builds the model and its initial state.

    Returns:
      (graphdef, state, tx): the static nnx graph, the TrainState at step 0 and the optimizers.
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
    reg = regularizers.get(config.regularizer)
    aux = aux_opt = None
    if reg.init_aux is not None:
        aux = reg.init_aux(jax.random.fold_in(jax.random.key(config.seed), 5), config.latent_dim,
                           static_settings(config))
        aux_opt = tx.aux.init(aux)
    return graphdef, TrainState(params, tx.model.init(params), jnp.zeros((), jnp.int32), aux, aux_opt), tx


# ----------------------------------------------------------------------------------------
# Pure training steps.


class StepConfig(NamedTuple):
    """Static settings of the compiled training loop.

    ``draw(key, arrays, batch_size) -> uint8 [B, H, W, C]`` draws a training batch from the
    device-resident ``arrays`` (e.g. sampling an image array, or rendering dSprites).
    """

    batch_size: int
    binarization: str
    objective: objectives.Static
    draw: Callable = data.sample_batch


def _scaled(updates, lr):
    return jax.tree.map(lambda u: -lr * u, updates)


def train_step(state: TrainState, arrays, hp: dict, key: jax.Array, latent_mask: jax.Array | None,
               *, graphdef, tx: Optimizers, cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch drawn on the device from ``arrays``; returns the new state
    and the step's scalar metrics."""
    k_batch, k_bin, k_obj = jax.random.split(jax.random.fold_in(key, state.step), 3)
    x = data.binarize(k_bin, cfg.draw(k_batch, arrays, cfg.batch_size), cfg.binarization)

    def loss_fn(params, aux):
        model = nnx.merge(graphdef, params)
        loss, (metrics, aux_loss) = objectives.objective(model, x, k_obj, state.step, hp, cfg.objective,
                                                         latent_mask, aux)
        return loss + aux_loss, metrics  # aux_loss depends on aux only, loss on params only

    grads, metrics = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.aux)
    updates, opt_state = tx.model.update(grads[0], state.opt_state, state.params)
    params = optax.apply_updates(state.params, _scaled(updates, hp["learning_rate"]))
    aux, aux_opt_state = state.aux, state.aux_opt_state
    if aux is not None:
        lr = hp[regularizers.get(cfg.objective.regularizer).aux_lr_field]
        aux_updates, aux_opt_state = tx.aux.update(grads[1], aux_opt_state, aux)
        aux = optax.apply_updates(aux, _scaled(aux_updates, lr))
    scalars = {k: v for k, v in metrics.items() if not metrics_lib.get(k).per_dim}
    return TrainState(params, opt_state, state.step + 1, aux, aux_opt_state), scalars


def run_steps(state: TrainState, arrays, hp: dict, key: jax.Array, latent_mask: jax.Array | None,
              *, num_steps: int, graphdef, tx, cfg: StepConfig, unroll: bool = False):
    """``num_steps`` training steps in one ``lax.scan`` (fully unrolled with ``unroll``); returns
    (state, per-step metrics [n])."""
    step = functools.partial(train_step, arrays=arrays, hp=hp, key=key, latent_mask=latent_mask,
                             graphdef=graphdef, tx=tx, cfg=cfg)
    return loops.scan(lambda s, _: step(s), state, None, length=num_steps, unroll=unroll)


def steps_per_call(config: ml_collections.ConfigDict) -> int:
    """How many training steps one compiled call takes (0: a whole logging interval in one
    rolled ``lax.scan``). ``config.steps_per_call = 0`` picks automatically: one step per call
    for conv models on the CPU, where XLA runs convolutions inside a while loop ~20× slower than
    outside one (the 64×64 conv VAE on one core: 0.23 s per step without a loop, 5.3 s in a
    one-trip loop, see :func:`vaekl.loops.scan`); unrolling more steps per call only multiplies the
    compile time; otherwise 0."""
    if config.steps_per_call:
        return int(config.steps_per_call)
    return 1 if _conv_on_cpu(config) else 0


def _conv_on_cpu(config: ml_collections.ConfigDict) -> bool:
    return config.model == "conv" and jax.default_backend() == "cpu"


def member_mode(config: ml_collections.ConfigDict) -> str:
    """How a group's members share one compiled program: 'vmap' (batched over the run axis),
    or 'sequential' for conv models on the CPU, where vmapped convolutions become grouped
    convolutions that XLA:CPU runs ~4× slower per member; there the members' steps are
    unrolled one after another inside the program (:func:`vaekl.loops.run_map`)."""
    return "sequential" if _conv_on_cpu(config) else "vmap"


# ----------------------------------------------------------------------------------------
# Evaluation.


class EvalConfig(NamedTuple):
    """Static settings of the compiled evaluation."""

    batch_size: int
    binarization: str
    objective: objectives.Static
    active_units_threshold: float


def evaluate(state: TrainState, images: jax.Array, hp: dict, step: jax.Array, key: jax.Array,
             latent_mask: jax.Array | None, *, graphdef, cfg: EvalConfig) -> dict[str, jax.Array]:
    """Every metric averaged over ``images`` [N, H, W, C] (uint8), nats per example
    (:func:`vaekl.objectives.evaluation`); binarization is drawn with a fixed key per batch."""
    model = nnx.merge(graphdef, state.params)
    to_inputs = lambda k, x: data.binarize(k, x, cfg.binarization)
    return objectives.evaluation(model, images, key, step, hp, cfg.objective, latent_mask, to_inputs,
                                 cfg.batch_size, cfg.active_units_threshold, state.aux)


# ----------------------------------------------------------------------------------------
# Groups of runs: one compiled program for many runs, vmapped.
#
# Members with different k share a program by padding every latent axis to the group's
# largest k, K: a member starts from the parameters a standalone model with its own k
# would have (same fan-in scaling), zero-padded at the end of each axis whose size depends
# on k, and a 0/1 latent mask switches the padded dimensions off (no KL, no decoder input,
# no metric, no gradient). Every per-run value (the objective's strengths, the learning rate,
# keys, masks) is an argument of the program. A group of one is an ordinary run.


def group_fields() -> tuple[str, ...]:
    """What may differ inside a group: the per-run values, the latent dimension and the seed."""
    return per_run_fields() + ("latent_dim", "seed")


def group_key(config: ml_collections.ConfigDict) -> str:
    """Runs with equal keys can share one compiled program."""
    skip = set(group_fields())
    d = {k: v for k, v in config.to_dict().items() if k not in skip}
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
        self.lock = rundir.RunLock(workdir)
        self.mgr = None
        self.tb = None
        self.failure: str | None = None
        self.error: Exception | None = None  # what stopped it, when not a non-finite loss
        self.last_rows: dict[str, dict] | None = None
        self.group = [os.path.basename(os.path.normpath(workdir))]  # run names of its whole group

    def open(self) -> None:
        """Creates (or checks) the run directory; called once every member's input is valid."""
        os.makedirs(self.workdir, exist_ok=True)
        rundir.write_config(self.workdir, self.config.to_dict())
        self.mgr = checkpoints.manager(self.workdir, self.config.keep_checkpoints)

    def restart_tensorboard(self) -> None:
        """Rewrites TensorBoard's events from metrics.jsonl (already cut back to the restored
        step) into a new event file and removes the older ones, so that readers never see a
        step twice after a resume (the events of work a kill lost are gone with its rows)."""
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        tb_dir = os.path.join(self.workdir, rundir.TENSORBOARD)
        old = [os.path.join(tb_dir, f) for f in os.listdir(tb_dir)] if os.path.isdir(tb_dir) else []
        old = [f for f in old if ".tfevents." in os.path.basename(f) and os.path.isfile(f)]
        if self.tb is not None:
            self.tb.close()
        self.tb = SummaryWriter(tb_dir, filename_suffix=f".{os.getpid()}.{time.time_ns()}")
        rows = self.log.read()
        if rows:
            self._tensorboard_rows(rows)
        for f in old:
            os.remove(f)

    def _tensorboard_rows(self, rows: list[dict]) -> None:
        for row in rows:
            for tag, v in metrics_lib.tensorboard_scalars(row).items():
                self.tb.add_scalar(tag, v, row["step"])
            for tag, v in metrics_lib.tensorboard_histograms(row).items():
                self.tb.add_histogram(tag, v, row["step"])
        self.tb.flush()

    def log_rows(self, rows: list[dict]) -> None:
        """Appends rows to metrics.jsonl and TensorBoard (both derived from the declarations)."""
        self.log.append(rows)
        self._tensorboard_rows(rows)
        evals = {r["split"]: r for r in rows if r["split"] in EVAL_SPLITS}
        if evals:
            self.last_rows = evals

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes the files (idempotent)."""
        mgr, tb, self.mgr, self.tb = self.mgr, self.tb, None, None
        if mgr is not None:
            mgr.wait_until_finished()
            mgr.close()
        if tb is not None:
            tb.close()

    def abort(self) -> None:
        """Closes whatever is open after a failure, never raising (so nothing waits forever on
        orbax's background threads)."""
        try:
            self.close()
        except Exception as e:  # pylint: disable=broad-except
            LOG.warning("closing %s after a failure: %s", self.workdir, e)


# A vmapped group's step is committed atomically: every member saves step s, the group waits
# for all those saves to finish, and only then writes GROUP_COMMIT = {"step": s, "members":
# [run names of the whole group]} into each member's directory (temporary file + rename). A
# checkpoint newer than its run's marker is uncommitted (a kill came between the members'
# saves, or before the markers): resuming drops it, with its metrics rows, and the group
# restarts together from the last step committed by all of them (vaekl.sweep plans the same
# group again from the markers). A run trained on its own has no marker.
GROUP_COMMIT = "group_commit.json"

# Test hook for fault injection: called as ``fault_hook(phase, step, member)`` when a group
# saves: "member_saved" after each member's save call (member = its index), "saved" once every
# member's save has finished and "committed" once the markers are written (member = -1).
fault_hook: Callable[[str, int, int], None] | None = None


def _fault(phase: str, step: int, member: int = -1) -> None:
    if fault_hook is not None:
        fault_hook(phase, step, member)


def read_group_commit(workdir: str) -> dict | None:
    """A run's group commit marker ``{"step": int, "members": [run names]}``, or None if it
    has none (an unreadable one is ignored with a warning: the checkpoints then decide)."""
    path = os.path.join(workdir, GROUP_COMMIT)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
        if not isinstance(marker.get("step"), int) or not isinstance(marker.get("members"), list):
            raise ValueError("not {step, members}")
        return marker
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        LOG.warning("ignoring the unreadable group commit marker %s (%s)", path, e)
        return None


def _commit_group(members: list[Member], step: int) -> None:
    """Writes every live member's marker for ``step`` once all their saves have finished."""
    for m in members:
        m.mgr.wait_until_finished()
    _fault("saved", step)
    for m in members:
        rundir.atomic_write(os.path.join(m.workdir, GROUP_COMMIT),
                          json.dumps({"step": int(step), "members": m.group}))
    _fault("committed", step)


def _drop_uncommitted(m: Member) -> None:
    """Deletes the run's checkpoints newer than its group commit marker (see GROUP_COMMIT)."""
    marker = read_group_commit(m.workdir)
    if marker is None:
        return
    for s in [s for s in m.mgr.all_steps() if s > marker["step"]]:
        LOG.warning("%s: dropping checkpoint step %d, which its group never committed (the group "
                    "resumes from step %d)", m.workdir, s, marker["step"])
        m.mgr.delete(s)


def _restore_start(members: list[Member]) -> int | None:
    """The common step to resume the group from (None: start afresh), made consistent.

    Checkpoints newer than a member's group commit marker are dropped first. Normally every
    member's latest checkpoint is then the same step. After a crash between members' saves
    (of runs without markers) or a damaged checkpoint, the group resumes from the earliest of
    them; members that got further drop their later checkpoints (their metrics are cut back
    below).
    """
    latest = []
    for m in members:
        _drop_uncommitted(m)
        try:
            latest.append(checkpoints.restore_latest_good(m.mgr, m.initial)[0])
        except checkpoints.CorruptCheckpoint as e:  # no usable checkpoint: only this member fails
            if len(members) == 1:
                raise
            LOG.error("%s; the rest of its group trains without it", e)
            m.failure, m.error = str(e), e
    members = [m for m in members if m.failure is None]  # latest holds their steps
    if not members:
        raise ValueError("no member of the group has a usable checkpoint")
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


EVAL_SPLITS = ("train", "valid", "test")  # "valid" only with config.validation_size > 0
TRAIN_CURVE_SPLIT = "train_batch"  # means of the training steps' metrics since the last log


def _member_rows(step: int, evals: dict[str, dict], i: int, k: int) -> list[dict]:
    return [metrics_lib.row(step, split, jax.tree.map(lambda a: a[i], ev), k)
            for split, ev in evals.items()]


def stack_hyperparameters(configs) -> dict[str, jax.Array]:
    """{field: float32 [runs]}: the per-run values, stacked along the run axis."""
    per = [hyperparameters(c) for c in configs]
    return {k: jnp.stack([h[k] for h in per]) for k in per[0]}


def batch_source(ds: data.Dataset) -> tuple[Any, Callable]:
    """(device arrays, draw) of the training batches: the dataset's own source when it has one
    (e.g. dSprites rendered on the device), else uniform draws from its uint8 training images."""
    if hasattr(ds, "batch_source"):
        return ds.batch_source()
    return ds.train_images, data.sample_batch


def dataset_size(ds: data.Dataset) -> int:
    """N, the training-set size (β-TCVAE's estimators weight by it)."""
    return int(getattr(ds, "train_size", ds.train_images.shape[0]))


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                dataset: data.Dataset | None = None,
                group: list[str] | None = None) -> list[list[dict] | Exception]:
    """Trains runs that differ only in per-run values (:func:`group_fields`) together, in one
    vmapped program.

    Each run writes its own directory exactly as :func:`train_and_evaluate` does, and
    resumes from its checkpoints. Bad config values and missing datasets fail before any
    directory is written. A run whose loss turns non-finite is stopped (its last good
    checkpoint kept) without stopping the others.

    metrics.jsonl gets evaluation rows (splits 'train' and 'test') every ``eval_every`` steps
    and training-curve rows (split 'train_batch': the means of the steps' batch metrics since
    the previous log) every ``log_every`` steps. With ``metric_every`` > 0 (ground-truth data),
    disentanglement.jsonl gets the disentanglement metrics of step 0, every ``metric_every``
    steps and the last (:mod:`vaekl.trajectory`).

    Args:
      configs, workdirs: the runs.
      dataset: the runs' dataset, if already loaded.
      group: the run names of the whole group, for its commit markers (default: these runs';
        in a multi-process group, every process's).
    Returns:
      For each run, its final evaluation rows, or the exception that stopped it.
    """
    for c in configs:
        config_lib.validate(c)
    if len({group_key(c) for c in configs}) != 1:
        raise ValueError(f"a group's runs may differ only in {group_fields()}")
    config = configs[0]
    ds = dataset or data.for_config(config)
    if ds.train_images.shape[0] == 0 or ds.test_images.shape[0] == 0:
        raise ValueError(f"dataset {config.dataset!r} has {ds.train_images.shape[0]} training and "
                         f"{ds.test_images.shape[0]} test images; both must be > 0")
    ds, eval_images = prepare(config, ds)
    if config.metric_every > 0:
        if ds.ground_truth is None:
            raise ValueError(f"config.metric_every={config.metric_every} needs a dataset with ground-truth "
                             f"factors ({data.GROUND_TRUTH_SOURCES}), not {config.dataset!r}")
        trajectory.parse_options(config.metric_options)
    members = [Member(c, w, ds.image_shape, ds.train_images) for c, w in zip(configs, workdirs)]
    for m in members:
        m.group = list(group) if group else [os.path.basename(os.path.normpath(w)) for w in workdirs]
    big = config.copy_and_resolve_references()
    big.unlock()
    big.latent_dim = max(m.k for m in members)

    _check_batch_size(config, ds)
    for m in members:  # every check before the first directory is written
        rundir.check_config(m.workdir, m.config.to_dict())
        check_extension(m.workdir, m.config)
        check_metrics(m.workdir)
    try:
        for m in members:  # one writer per run directory (RunLocked names the holder)
            os.makedirs(m.workdir, exist_ok=True)
            m.lock.acquire()
        meta = {"image_shape": list(ds.image_shape), "train_size": dataset_size(ds), **rundir.provenance()}
        for m in members:
            m.open()
            rundir.write_meta(m.workdir, meta)
        return _train_opened(members, config, ds, big, eval_images)
    finally:
        for m in members:
            m.abort()
            m.lock.release()


def _check_batch_size(config: ml_collections.ConfigDict, ds: data.Dataset) -> None:
    """Refuses a batch larger than the training images the steps draw from (after the
    validation split; the TC estimators need N ≥ M), before anything is written."""
    n = dataset_size(ds)
    if config.batch_size > n:
        held = f" after validation_size={config.validation_size}" if config.validation_size else ""
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the {n} training images of "
                         f"dataset {config.dataset!r}{held}; use --config.batch_size={n} or less")


def check_metrics(workdir: str) -> None:
    """Refuses to resume a run whose metrics.jsonl lost a row for good to a torn last line
    (:func:`vaekl.rundir.check_torn_row`), resuming from its latest checkpoint or its group's
    last committed step, whichever is earlier."""
    start = rundir.latest_checkpoint(workdir)
    marker = read_group_commit(workdir) if start is not None else None
    if marker is not None:
        start = min(start, marker["step"])
    rundir.check_torn_row(workdir, start)


def check_extension(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to change num_steps of a run whose schedules depend on it."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    old = rundir.read_config(workdir)
    if old.num_steps == config.num_steps:
        return
    depends = [f"lr_schedule={config.lr_schedule!r}"] * (config.lr_schedule in ("cosine", "iwae"))
    depends += [f"beta_schedule={config.beta_schedule!r}"] * (
        config.regularizer in ("kl", "free_bits") and config.beta_schedule == "cyclical")
    if depends and rundir.latest_checkpoint(workdir) is not None:
        raise ValueError(f"{workdir}: num_steps {old.num_steps} → {config.num_steps} would change the "
                         f"schedule of a started run ({', '.join(depends)} depends on num_steps); "
                         f"train a new run instead")


def _placement(members: list[Member], config, big) -> sharding.Placement:
    """Where the group runs: the placement its planner set (:func:`vaekl.sharding.use`; its
    ``local_runs`` are ``members``, in order), else all of this process's devices, sharding
    the batch when there are fewer runs than devices. Raises ``big.latent_dim`` to the whole
    group's largest k when the group spans processes."""
    placement = sharding.current() or sharding.plan(len(members), batch_size=config.batch_size)
    if len(placement.local_runs) != len(members):
        raise ValueError(f"the placement gives this process {len(placement.local_runs)} run(s) of the "
                         f"group; it has {len(members)}")
    big.latent_dim = max(big.latent_dim, placement.latent_dim)
    LOG.info("program: %s", placement.describe())
    return placement


def _agree_start(members: list[Member], start: int | None, placement: sharding.Placement) -> int | None:
    """The step every process of the group resumes from: the earliest of their starts
    (members beyond it drop their later checkpoints, as in :func:`_restore_start`)."""
    if placement.processes == 1:
        return start
    starts = sharding.all_processes([-1 if start is None else start])[:, 0]
    if (starts < 0).any() and (starts >= 0).any():
        raise ValueError(f"a group's processes mix new and partly trained runs (starts {starts.tolist()})")
    agreed = None if starts[0] < 0 else int(starts.min())
    if agreed is not None and agreed != start:
        for m in members:
            if agreed not in m.mgr.all_steps():
                raise ValueError(f"cannot resume {m.workdir} at step {agreed} with its group (it has "
                                 f"checkpoints {m.mgr.all_steps()}); run it on its own")
            for s in [s for s in m.mgr.all_steps() if s > agreed]:
                m.mgr.delete(s)
    return agreed


def _train_opened(members: list[Member], config, ds, big, eval_images: dict[str, np.ndarray]
                  ) -> list[list[dict] | Exception]:
    """The body of :func:`train_group` once every member's directory is open and locked;
    ``eval_images`` as :func:`prepare` gives them."""
    train_np, test_np = ds.train_images, eval_images["test"]
    placement = _placement(members, config, big)
    graphdef, template, tx = create(big, ds.image_shape, train_np)
    start = _agree_start(members, _restore_start(members), placement)
    member_states = []
    for m in members:
        if m.failure is not None:  # no usable checkpoint (_restore_start): a placeholder, never saved
            member_states.append(pad_like(m.initial, template))
            continue
        state = m.initial if start is None else checkpoints.restore(m.mgr, start, m.initial)
        m.log.truncate(-1 if start is None else start)
        trajectory.truncate(m.workdir, -1 if start is None else start)
        m.restart_tensorboard()
        if start is not None:
            checkpoints.prune(m.mgr, m.config.keep_checkpoints)
        if len(m.group) == 1 and os.path.exists(os.path.join(m.workdir, GROUP_COMMIT)):
            os.remove(os.path.join(m.workdir, GROUP_COMMIT))  # now a run on its own
        member_states.append(pad_like(state, template))
    state = placement.put_runs(jax.tree.map(lambda *a: np.stack(a), *member_states))
    if start is not None:
        LOG.info("resuming %d run(s) from step %d", len(members), start)

    arrays, draw = batch_source(ds)
    fns = compile_fns(config, graphdef, tx, vmapped=True, draw=draw, dataset_size=dataset_size(ds),
                      placement=placement)
    arrays = placement.replicate(arrays)
    evals_on = {split: placement.replicate(images) for split, images in eval_images.items()}
    hp = placement.put_runs(stack_hyperparameters([m.config for m in members]))
    masks = placement.put_runs(np.asarray([np.arange(big.latent_dim) < m.k for m in members], np.float32))
    seeds = [jax.random.key(m.config.seed) for m in members]
    train_keys = placement.put_runs(jnp.stack([jax.random.fold_in(k, 2) for k in seeds]))
    eval_keys = placement.put_runs(jnp.stack([jax.random.fold_in(k, 3) for k in seeds]))
    live = lambda: [(i, m) for i, m in enumerate(members) if m.failure is None]

    def eval_and_log(step: int) -> None:
        evals = {split: fns.evaluate(state, imgs, hp, jnp.int32(step), eval_keys, masks)
                 for split, imgs in evals_on.items()}
        evals = placement.to_host(evals)
        for i, m in live():
            m.log_rows(_member_rows(step, evals, i, m.k))

    def save(step: int, evaluated: bool) -> None:
        host = placement.to_host(state)
        for i, m in live():
            own = slice_like(jax.tree.map(lambda a: a[i], host), m.initial)
            checkpoints.save(m.mgr, step, own,
                             m.last_rows["valid"]["neg_elbo"] if evaluated and "valid" in m.last_rows else None)
            _fault("member_saved", step, i)
        if len(members[0].group) > 1:
            _commit_group([m for _, m in live()], step)

    metric_options = trajectory.parse_options(config.metric_options)

    def disentanglement_along(step: int) -> None:
        """Scores every live member at a due step that has no row yet (before its checkpoint)."""
        todo = [(i, m) for i, m in live() if step not in trajectory.steps(m.workdir)]
        if not trajectory.due(config, step) or not todo:
            return
        host_params = placement.to_host(state.params)
        for i, m in todo:
            params = slice_like(jax.tree.map(lambda a: a[i], host_params), m.initial.params)
            result = trajectory.score(ds, m.graphdef, params, m.config.seed, metric_options,
                                      metrics=tuple(config.metric_names))
            trajectory.record(m.workdir, step, result)
            LOG.info("%s step %d: MIG %.3f  FactorVAE %.3f  DCI-D %.3f (%s, %.0f s)", m.workdir, step,
                         result["scores"].get("mig", float("nan")),
                         result["scores"].get("factor_vae_score.eval_accuracy", float("nan")),
                         result["scores"].get("dci.disentanglement", float("nan")),
                         result["representation"], result["seconds"])

    step = 0 if start is None else start
    if start is None:
        eval_and_log(0)
        disentanglement_along(0)
        save(0, evaluated=True)
    else:
        disentanglement_along(start)  # a row lost to a crash, or metric_every set on resuming
    t_start, step_start = time.perf_counter(), step
    curve: list[dict] = []  # per-chunk step metrics since the last training-curve row
    per_call = steps_per_call(config)

    def advance(state, n):
        """n steps, in calls of ``per_call`` steps (or one); metrics name → [members, n]."""
        sizes = [n] if not per_call else [per_call] * (n // per_call) + [n % per_call] * bool(n % per_call)
        chunks = []
        for size in sizes:
            state, m = fns.run_steps(state, arrays, hp, train_keys, masks, num_steps=size)
            chunks.append(m)
        chunks = placement.to_host(chunks)
        return state, {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}

    for stop in _boundaries(config, step):
        state, metrics = advance(state, stop - step)  # name → [members, steps]
        losses = np.asarray(metrics["loss"])
        for i, m in live():
            if not np.all(np.isfinite(losses[i])):
                bad = step + 1 + int(np.argmin(np.isfinite(losses[i])))
                m.mgr.wait_until_finished()
                m.failure = (f"non-finite loss at step {bad} of {m.workdir}; the last good checkpoint "
                             f"is step {m.mgr.latest_step()}. Lower learning_rate or check the data.")
                LOG.error("%s", m.failure)
        if not placement.any_process(bool(live())):  # processes of one program stop together
            break
        step = stop
        curve.append(metrics)
        if step % config.log_every == 0 or step == config.num_steps:
            steps = {k: np.concatenate([c[k] for c in curve], axis=1) for k in curve[0]}
            for i, m in live():
                m.log_rows([metrics_lib.row(step, TRAIN_CURVE_SPLIT,
                                            {k: np.mean(v[i]) for k, v in steps.items()})])
            curve = []
        rate = (step - step_start) / (time.perf_counter() - t_start)
        alive = [i for i, _ in live()]
        LOG.info("step %d/%d  loss %.3f  neg_elbo %.3f  kl %.3f  %.1f steps/s%s  ETA %s",
                 step, config.num_steps, losses[alive].mean(),
                 float(np.mean(np.asarray(metrics["neg_elbo"])[alive])),
                 float(np.mean(np.asarray(metrics["kl"])[alive])), rate,
                 f" × {len(alive)} runs" if len(members) > 1 else "",
                 _format_eta((config.num_steps - step) / rate))
        evaluated = step % config.eval_every == 0 or step == config.num_steps
        if evaluated:
            eval_and_log(step)
        disentanglement_along(step)
        if step % config.checkpoint_every == 0 or step == config.num_steps:
            save(step, evaluated)

    results: list[list[dict] | Exception] = []
    host_params = placement.to_host(state.params)
    for i, m in enumerate(members):
        m.close()
        if m.failure is not None:
            results.append(m.error or FloatingPointError(m.failure))
            continue
        if m.last_rows is None:  # resumed a finished run: read its final rows back
            m.last_rows = {r["split"]: r for r in m.log.read()
                           if r["step"] == config.num_steps and r["split"] in EVAL_SPLITS}
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
    return [metrics_lib.row(step, split, m) for split, m in evals.items()]


def _boundaries(config: ml_collections.ConfigDict, start: int) -> list[int]:
    """The steps after ``start`` where the loop stops to log, evaluate, score or checkpoint."""
    every = (config.log_every, config.eval_every, config.checkpoint_every) + (
        (config.metric_every,) if config.metric_every > 0 else ())
    stops = {s for e in every for s in range(e, config.num_steps, e)} | {config.num_steps}
    return sorted(s for s in stops if s > start)


def _format_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Compiled(NamedTuple):
    """The jitted functions of a group: (state, data, hp, key, mask) → …"""

    run_steps: Callable  # also takes num_steps (static)
    evaluate: Callable


def compile_fns(config: ml_collections.ConfigDict, graphdef, tx, vmapped: bool = True,
                draw: Callable = data.sample_batch, dataset_size: int | None = None,
                placement: sharding.Placement | None = None, members: str | None = None) -> Compiled:
    """jit(vmap(...)) of run_steps and evaluate over the members' state, per-run values ``hp``,
    keys and masks; the training data and the images to evaluate are shared.

    ``dataset_size`` defaults to the leading size of the training arrays. With a
    ``placement`` (vmapped only), the per-run arguments (placed by ``placement.put_runs``) and
    results are sharded along the run axis over its mesh (``placement.padded`` runs), the data
    and images (placed by ``placement.replicate``) replicated, and the training batch sharded
    over the mesh's data axis when it has more than one device (:mod:`vaekl.sharding`);
    evaluate's ``step`` may then be any integer.
    """
    if placement is not None and not vmapped:
        raise ValueError("compile_fns: a placement shards the run axis of a vmapped group")
    key = _program_key(config, graphdef, vmapped, draw, dataset_size, placement, members)
    if key is not None and key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key]
    fns = _compile_fns(config, graphdef, tx, vmapped, draw, dataset_size, placement, members)
    if key is not None:
        _COMPILED[key] = fns
        while len(_COMPILED) > COMPILED_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    return fns


# compile_fns' programs by what determines them (_program_key), most recently used last.
_COMPILED: collections.OrderedDict[tuple, Compiled] = collections.OrderedDict()
COMPILED_CACHE_SIZE = 8


def clear_compiled() -> None:
    """Forgets :func:`compile_fns`' programs (the next call compiles anew)."""
    _COMPILED.clear()


def _program_key(config, graphdef, vmapped, draw, dataset_size, placement, members=None) -> tuple | None:
    """What fixes the programs of :func:`compile_fns` (None: not hashable, never cached): the
    config outside the values passed as arguments (:func:`group_key`; ``tx`` is made from
    it), the regularizer's registry entry, the model's graph, the batch source, the dataset
    size and the placement. Equal keys give the same programs, so the jitted functions (and
    the executables they keep per argument shape) are reused across calls."""
    key = (group_key(config), regularizers.REGISTRY.get(config.regularizer), graphdef, vmapped, members, draw,
           dataset_size, placement)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _compile_fns(config, graphdef, tx, vmapped, draw, dataset_size, placement, members=None) -> Compiled:
    """:func:`compile_fns` without its cache."""
    if placement is not None and placement.data_axis > 1:
        draw = sharding.shard_batch(draw, placement.batch_sharding)
    spmd = sharding.RUNS if placement is not None else None
    # A placement shards the run axis over devices: there the members stay vmapped.
    mode = members or (member_mode(config) if placement is None else "vmap")

    def static(arrays):
        n = dataset_size if dataset_size is not None else jax.tree.leaves(arrays)[0].shape[0]
        return objectives.Static.from_config(config, n)

    unroll = steps_per_call(config) > 0

    def steps(state, arrays, hp, key, latent_mask, num_steps):
        cfg = StepConfig(config.batch_size, step_binarization(config), static(arrays), draw)
        fn = functools.partial(run_steps, num_steps=num_steps, graphdef=graphdef, tx=tx, cfg=cfg,
                               unroll=unroll)
        if vmapped:
            fn = loops.run_map(fn, (0, None, 0, 0, 0), mode, spmd)
        return fn(state, arrays, hp, key, latent_mask)

    n_eval = dataset_size

    def ev(state, images, hp, step, key, latent_mask):
        cfg = EvalConfig(config.eval_batch_size, "none",  # images binarized by prepare()
                         objectives.Static.from_config(config, n_eval or images.shape[0]),
                         config.active_units_threshold)
        fn = functools.partial(evaluate, graphdef=graphdef, cfg=cfg)
        if vmapped:
            fn = loops.run_map(fn, (0, None, 0, None, 0, 0), mode, spmd)
        return fn(state, images, hp, step, key, latent_mask)

    if placement is None:
        return Compiled(jax.jit(steps, static_argnames="num_steps", donate_argnums=0), jax.jit(ev))
    # The inputs come placed (Placement.put_runs, .replicate); the outputs stay on the run axis.
    steps_jit = jax.jit(steps, static_argnames="num_steps", donate_argnums=0,
                        out_shardings=placement.runs_sharding)
    ev_jit = jax.jit(ev, out_shardings=placement.runs_sharding)

    def ev_placed(state, images, hp, step, key, latent_mask):
        return ev_jit(state, images, hp, placement.replicate(np.asarray(step, np.int32)), key, latent_mask)

    return Compiled(steps_jit, ev_placed)


def step_binarization(config: ml_collections.ConfigDict) -> str:
    """The training steps' :func:`vaekl.data.binarize` mode: "none" under "fixed_stochastic"
    (the training images are binarized once by :func:`prepare`), else the config's."""
    return "none" if config.binarization == "fixed_stochastic" else config.binarization


def prepare(config: ml_collections.ConfigDict, ds: data.Dataset) -> tuple[data.Dataset, dict[str, np.ndarray]]:
    """(the dataset the training steps draw from, {split: uint8 evaluation images}).

    ``config.validation_size`` > 0 holds out the last training images as split "valid" (not
    trained on; the best checkpoint is chosen on it). The evaluation images are binarized
    here, once and for every run and seed alike, so that evaluation runs with mode "none":
    thresholded under "threshold", one fixed Bernoulli draw (:func:`vaekl.data.binarize_fixed`,
    seed ``data.BINARIZATION_SEEDS[split]``) under "dynamic" and "fixed_stochastic". Under
    "fixed_stochastic" the training images are such a draw too (the "static MNIST"
    construction); under "dynamic" the steps draw anew. Splits: "train" (the first
    ``num_eval_train`` training images), "valid" (if any), "test".
    """
    train, labels = ds.train_images, ds.train_labels
    valid = train[:0]
    if config.validation_size:
        if ds.ground_truth is not None:
            raise ValueError(f"config.validation_size={config.validation_size}: {config.dataset!r} renders its "
                             f"training images; it has no held-out validation split")
        n = train.shape[0] - config.validation_size
        if n < 1:
            raise ValueError(f"config.validation_size={config.validation_size} leaves no training images "
                             f"(dataset {config.dataset!r} has {train.shape[0]})")
        train, labels, valid = train[:n], labels[:n], train[n:]
    mode = config.binarization
    if mode == "threshold":
        fix = lambda a, split: data.binarize_threshold(a)
    elif mode in ("dynamic", "fixed_stochastic"):
        fix = lambda a, split: data.binarize_fixed(a, data.BINARIZATION_SEEDS[split])
    else:
        fix = lambda a, split: a
    if mode == "fixed_stochastic":
        train = fix(train, "train")
        evals = {"train": train[: config.num_eval_train]}
    else:
        evals = {"train": fix(train[: config.num_eval_train], "train")}
    if valid.shape[0]:
        evals["valid"] = fix(valid, "valid")
    evals["test"] = fix(ds.test_images, "test")
    if train is not ds.train_images:
        ds = dataclasses.replace(ds, train_images=train, train_labels=labels)
    return ds, evals


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
