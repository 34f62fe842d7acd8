"""A run's training state and what builds it: the model split once into a graph and pure
parameters, the optimizers, and the per-run values (hyperparameters) that a vmapped group
passes as arguments."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vaekl import objectives, regularizers
from vaekl.models import vae as vae_lib


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


def stack_hyperparameters(configs) -> dict[str, jax.Array]:
    """{field: float32 [runs]}: the per-run values, stacked along the run axis."""
    per = [hyperparameters(c) for c in configs]
    return {k: jnp.stack([h[k] for h in per]) for k in per[0]}


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


def group_fields() -> tuple[str, ...]:
    """What may differ inside a group: the per-run values, the latent dimension and the seed."""
    return per_run_fields() + ("latent_dim", "seed")


def group_key(config: ml_collections.ConfigDict) -> str:
    """Runs with equal keys can share one compiled program."""
    skip = set(group_fields())
    d = {k: v for k, v in config.to_dict().items() if k not in skip}
    return repr(sorted(d.items()))
