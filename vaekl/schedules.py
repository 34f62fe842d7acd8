"""Schedules of the objective's weights: plain ``step -> value`` functions (as optax's), whose
numeric parameters may be traced per-run values, so that runs differing in them share one program.

* β weight w(t) ∈ [0, 1], the multiplier of β at training step t:
  - ``constant``: 1;
  - ``linear``: min(1, t / T_warm) (a KL warm-up);
  - ``cyclical`` (Fu et al. 2019): the run of T = ``num_steps`` steps is split into M cycles of
    T/M steps; within a cycle, τ = (t mod (T/M)) / (T/M) and w = min(1, τ / R), i.e. a ramp
    0 → 1 over the first fraction R of each cycle, then 1 (the paper's M = 4, R = 0.5).
* capacity C(t) = C_max · min(1, t / T_C) nats (Burgess et al. 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BETA_SCHEDULES = ("constant", "linear", "cyclical")


def beta_weight(kind: str, step: jax.Array, *, warmup_steps=1.0, cycles=1.0, ramp=0.5,
                num_steps: int = 1) -> jax.Array:
    """w(t), float32 scalar; ``kind`` is static, the numeric arguments may be traced."""
    t = jnp.asarray(step, jnp.float32)
    if kind == "constant":
        return jnp.ones_like(t)
    if kind == "linear":
        return jnp.minimum(1.0, t / jnp.asarray(warmup_steps, jnp.float32))
    if kind == "cyclical":
        period = jnp.float32(num_steps) / jnp.asarray(cycles, jnp.float32)
        tau = jnp.mod(t, period) / period
        return jnp.minimum(1.0, tau / jnp.asarray(ramp, jnp.float32))
    raise ValueError(f"unknown beta_schedule {kind!r}; choose from {BETA_SCHEDULES}")


def capacity(step: jax.Array, c_max, c_steps) -> jax.Array:
    """C(t) in nats, float32 scalar."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.asarray(c_max, jnp.float32) * jnp.minimum(1.0, t / jnp.asarray(c_steps, jnp.float32))
