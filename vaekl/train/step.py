"""The pure training step and evaluation: one optimizer step on a batch drawn on the device,
many steps in one ``lax.scan`` (:mod:`vaekl.loops`), and every metric over a set of images.
Every per-run value (state, hyperparameters, key, latent mask) is an argument, so a group
``vmap``s them."""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import ml_collections
import optax
from flax import nnx

from vaekl import data, loops, objectives, regularizers
from vaekl import metrics as metrics_lib
from vaekl.models import architectures
from vaekl.train.state import Optimizers, TrainState


class StepConfig(NamedTuple):
    """Static settings of the compiled training loop.

    ``draw(key, arrays, batch_size) -> uint8 [B, H, W, C]`` draws a training batch from the
    device-resident ``arrays`` (e.g. sampling an image array, or rendering dSprites).
    """

    batch_size: int
    binarization: str
    objective: objectives.Static
    draw: Callable = data.sample_batch
    materialize_batch: bool = False  # compute the batch into memory once (loops.materialize)


def _scaled(updates, lr):
    return jax.tree.map(lambda u: -lr * u, updates)


def train_step(state: TrainState, arrays, hp: dict, key: jax.Array, latent_mask: jax.Array | None,
               *, graphdef, tx: Optimizers, cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch drawn on the device from ``arrays``; returns the new state
    and the step's scalar metrics."""
    k_batch, k_bin, k_obj = jax.random.split(jax.random.fold_in(key, state.step), 3)
    x = data.binarize(k_bin, cfg.draw(k_batch, arrays, cfg.batch_size), cfg.binarization)
    if cfg.materialize_batch:
        x = loops.materialize(x, state.step >= 0)

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
    return 1 if _sequential_on_cpu(config) else 0


def materialize_batch(config: ml_collections.ConfigDict) -> bool:
    """Whether the steps compute their batch into memory before using it
    (:func:`vaekl.loops.materialize`): for conv models on the CPU, where XLA would recompute a
    rendered batch inside the convolutions' padding and transposes."""
    return _sequential_on_cpu(config)


def _sequential_on_cpu(config: ml_collections.ConfigDict) -> bool:
    """Whether the architecture asks for CPU stepping (conv: Architecture.cpu_sequential) here."""
    return architectures.get(config.model).cpu_sequential and jax.default_backend() == "cpu"


def member_mode(config: ml_collections.ConfigDict) -> str:
    """How a group's members share one compiled program: 'vmap' (batched over the run axis),
    or 'sequential' on the CPU for architectures that declare ``cpu_sequential`` (conv), where vmapped convolutions become grouped
    convolutions that XLA:CPU runs ~4× slower per member; there the members' steps are
    unrolled one after another inside the program (:func:`vaekl.loops.run_map`)."""
    return "sequential" if _sequential_on_cpu(config) else "vmap"


def step_binarization(config: ml_collections.ConfigDict) -> str:
    """The training steps' :func:`vaekl.data.binarize` mode: "none" under "fixed_stochastic"
    (the training images are binarized once by :func:`prepare`), else the config's."""
    return "none" if config.binarization == "fixed_stochastic" else config.binarization


EVAL_SPLITS = ("train", "valid", "test")  # "valid" only with config.validation_size > 0


TRAIN_CURVE_SPLIT = "train_batch"  # means of the training steps' metrics since the last log


class EvalConfig(NamedTuple):
    """Static settings of the compiled evaluation."""

    batch_size: int
    binarization: str
    objective: objectives.Static
    active_units_threshold: float
    unroll_batches: bool = True  # the architecture's cpu_sequential (vaekl.loops.batched_map)


def eval_config(config: ml_collections.ConfigDict, dataset_size: int, batch_size: int | None = None) -> EvalConfig:
    """The evaluation's static settings for a run (images binarized beforehand by prepare());
    batches unrolled on the CPU only for architectures that declare ``cpu_sequential``."""
    return EvalConfig(batch_size or config.eval_batch_size, "none", objectives.Static.from_config(config, dataset_size),
                      config.active_units_threshold, architectures.get(config.model).cpu_sequential)


def evaluate(state: TrainState, images: jax.Array, hp: dict, step: jax.Array, key: jax.Array,
             latent_mask: jax.Array | None, *, graphdef, cfg: EvalConfig) -> dict[str, jax.Array]:
    """Every metric averaged over ``images`` [N, H, W, C] (uint8), nats per example
    (:func:`vaekl.objectives.evaluation`); binarization is drawn with a fixed key per batch."""
    model = nnx.merge(graphdef, state.params)
    to_inputs = lambda k, x: data.binarize(k, x, cfg.binarization)
    return objectives.evaluation(model, images, key, step, hp, cfg.objective, latent_mask, to_inputs,
                                 cfg.batch_size, cfg.active_units_threshold, state.aux, cfg.unroll_batches)


def eval_rows(step: int, evals: dict[str, dict]) -> list[dict]:
    """metrics.jsonl rows (one per split) from one run's evaluation results."""
    return [metrics_lib.row(step, split, m) for split, m in evals.items()]
