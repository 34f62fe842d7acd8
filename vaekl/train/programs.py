"""The compiled programs of a group (jit of the vmapped step and evaluation), kept in one
module-level cache keyed by what determines them, so that no program is compiled twice for
the same shapes."""

from __future__ import annotations

import collections
from collections.abc import Callable
import functools
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from vaekl import data, loops, objectives, regularizers, sharding
from vaekl.train.state import group_key
from vaekl.train.step import (StepConfig, eval_config, evaluate, materialize_batch, member_mode, run_steps,
                              step_binarization, steps_per_call)


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


def program_members(config, placement: sharding.Placement | None) -> str:
    """How the program combines a group's members: the architecture's choice
    (:func:`vaekl.train.step.member_mode`: one after another for conv models on the CPU) on
    one device, with or without a placement; vmapped when a placement spreads them over
    several devices (the run axis is then split by the mesh)."""
    if placement is None or placement.devices == 1:
        return member_mode(config)
    return "vmap"


def _compile_fns(config, graphdef, tx, vmapped, draw, dataset_size, placement, members=None) -> Compiled:
    """:func:`compile_fns` without its cache."""
    if placement is not None and placement.data_axis > 1:
        draw = sharding.shard_batch(draw, placement.batch_sharding)
    spmd = sharding.RUNS if placement is not None else None
    mode = members or program_members(config, placement)

    def static(arrays):
        n = dataset_size if dataset_size is not None else jax.tree.leaves(arrays)[0].shape[0]
        return objectives.Static.from_config(config, n)

    unroll = steps_per_call(config) > 0

    def steps(state, arrays, hp, key, latent_mask, num_steps):
        cfg = StepConfig(config.batch_size, step_binarization(config), static(arrays), draw,
                         materialize_batch(config))
        fn = functools.partial(run_steps, num_steps=num_steps, graphdef=graphdef, tx=tx, cfg=cfg,
                               unroll=unroll)
        if vmapped:
            fn = loops.run_map(fn, (0, None, 0, 0, 0), mode, spmd)
        return fn(state, arrays, hp, key, latent_mask)

    n_eval = dataset_size

    def ev(state, images, hp, step, key, latent_mask):
        cfg = eval_config(config, n_eval or images.shape[0])
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
