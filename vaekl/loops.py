"""Loops for compiled code: ``lax.scan`` without its CPU pitfalls, a batched map, and a map
over the run axis of a group (vmapped, or member by member).

The lowest layer of the trainer: the objectives, the evaluation and the trainer use these
without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["CPU_UNROLL_BATCHES", "batched_map", "materialize", "run_map", "scan"]

CPU_UNROLL_BATCHES = 16  # batches that batched_map unrolls on the CPU instead of looping


def scan(f, init, xs=None, length: int | None = None, unroll: bool = False):
    """``lax.scan(f, init, xs, length)``, fully unrolled with ``unroll``, and never a one-trip
    while loop: ``lax.scan`` keeps one when ``length`` is 1 (even fully unrolled), and XLA:CPU
    runs the convolutions inside it ~20× slower (the 64×64 conv VAE's step: 5.3 s in the loop,
    0.23 s outside, one core). ``f`` is traced once either way."""
    n = length if length is not None else jax.tree.leaves(xs)[0].shape[0]
    if n == 1:
        carry, y = f(init, jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: jnp.asarray(a)[None], y)
    return jax.lax.scan(f, init, xs, length=n, unroll=n if unroll else 1)


def materialize(x, true: jax.Array):
    """``x`` (an array or a pytree), computed into memory once: its floating-point leaves are the
    operands of a conditional on ``true``, a traced scalar (XLA cannot fold it away). Both
    branches return the leaves unchanged, so the predicate's value does not matter; its inputs
    do: the leaves are only used after ``true`` is computed.

    XLA fuses a cheap elementwise producer into each of its consumers and recomputes it in
    each; for a training batch rendered from factors (dSprites) those consumers include the
    convolution's padding and transposes, loops that XLA:CPU runs slowly when they compute
    the rendering per element. ``lax.optimization_barrier`` would say the same, but XLA:CPU
    drops it. The conv VAE's training step on one core: 3 % faster (paired, 60 alternating
    steps of both programs). Meant for unbatched code (the trainer uses it where a group's
    members run one after another): under ``vmap`` a batched ``true`` turns the conditional
    into a select."""
    leaves, tree = jax.tree.flatten(x)
    idx = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    # Identical branches would be folded away with the conditional: the second adds zero.
    kept = jax.lax.cond(true, lambda v: v, lambda v: [a + jnp.zeros((), a.dtype) for a in v],
                        [leaves[i] for i in idx])
    for i, leaf in zip(idx, kept):
        leaves[i] = leaf
    return jax.tree.unflatten(tree, leaves)


def _after(previous, x):
    """``x``, used only once ``previous`` (a pytree of arrays) is computed (:func:`materialize`
    on a scalar read from it)."""
    numbers = [a for a in jax.tree.leaves(previous) if jnp.issubdtype(a.dtype, jnp.number)]
    if not numbers:
        return x
    token = jnp.ravel(numbers[0])[0]
    return materialize(x, token == token)


def run_map(fn: Callable, in_axes: tuple, mode: str = "vmap", spmd_axis_name: str | None = None) -> Callable:
    """``jax.vmap(fn, in_axes)`` over the run axis (axis 0 of the mapped arguments), or with
    ``mode='sequential'`` the same function computed member by member (each member sliced,
    ``fn`` applied, the results stacked): one program, no batched convolutions. The members run
    in order, each one's inputs taken after the previous one's outputs (:func:`_after`): left to
    itself XLA interleaves them, and a group of 4 conv VAE steps on one core cost 1.09× one
    model's time per member, in order 1.00× (paired, 16 alternating calls)."""
    if mode == "vmap":
        return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=spmd_axis_name)
    if mode != "sequential":
        raise ValueError(f"unknown member mode {mode!r}; choose 'vmap' or 'sequential'")

    def mapped(*args):
        sizes = {a.shape[0] for arg, ax in zip(args, in_axes) if ax == 0 for a in jax.tree.leaves(arg)}
        if len(sizes) != 1:
            raise ValueError(f"run_map: the mapped arguments disagree on the run axis: sizes {sorted(sizes)}")
        outs = []
        for i in range(sizes.pop()):
            member = [jax.tree.map(lambda a, i=i: a[i], arg) if ax == 0 else None for arg, ax in zip(args, in_axes)]
            if outs:  # in order: XLA would interleave the members, a group of 4 conv steps 1.09× slower per member
                member = _after(outs[-1], member)
            outs.append(fn(*[m if ax == 0 else arg for m, arg, ax in zip(member, args, in_axes)]))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return mapped


def batched_map(fn, x: jax.Array, batch_size: int, unroll: bool = True):
    """``fn(batch, batch_index)`` over x [N, ...] in batches (the last one zero-padded), with
    a ``lax.scan``; the per-example outputs concatenated back to [N, ...].

    With ``unroll``, on the CPU up to :data:`CPU_UNROLL_BATCHES` batches are unrolled: XLA:CPU
    runs convolutions inside a while loop ~10× slower (see :func:`scan`). Functions without
    convolutions pass False: a loop runs them as fast, and compiles one batch instead of N."""
    n = x.shape[0]
    bs = min(batch_size, n)
    nb = -(-n // bs)
    xp = jnp.concatenate([x, jnp.zeros((nb * bs - n, *x.shape[1:]), x.dtype)])
    unroll = unroll and jax.default_backend() == "cpu" and nb <= CPU_UNROLL_BATCHES
    _, out = scan(lambda c, a: (c, fn(*a)), None, (xp.reshape(nb, bs, *x.shape[1:]), jnp.arange(nb)),
                  unroll=unroll)
    return jax.tree.map(lambda a: a.reshape(nb * bs, *a.shape[2:])[:n], out)

