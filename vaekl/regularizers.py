"""Latent regularizers: small pure functions over what a batch produced, and their registry.

A regularizer sees a batch's :class:`Inputs` (the posterior q, the sample z, the prior p, the
latent mask, the closed-form KL per example and dimension, the step, the training-set size N,
a key, its own auxiliary parameters) and its hyperparameters, and returns its penalty in nats
per example (a batch mean) with the metrics it wants logged. The objective is

    loss = recon + penalty,        recon = −E_q log p(x|z) (batch mean),

assembled in one place (:func:`vaekl.objectives.objective`) for training and evaluation.

Hyperparameters are config fields declared once in :data:`FIELDS`. Numeric fields are per-run
values: traced arguments of the compiled step, so runs that differ only in them (and in k and
seed) train in one vmapped program. String and boolean fields are static (compile-time).

Adding a regularizer is one function, one registry entry and its fields' defaults::

    FIELDS["l2_lambda"] = Field(1.0, "λ, weight of the squared posterior means", low=0.0)

    def l2_means(inp, hp, static):
        kl = inp.kl_per_dim.sum(-1).mean()
        l2 = jnp.sum(jnp.square(inp.q.mean) * inp.mask, -1).mean()
        return Output(kl + hp["l2_lambda"] * l2, {"l2_means": l2})

    register(Regularizer("l2_means", l2_means, ("l2_lambda",), "example",
                         metrics=(("l2_means", "E‖μ‖² over unmasked dims"),)))

The registered regularizers, with their papers' definitions, are in :data:`REGISTRY`; the
README has the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vaekl import estimators, schedules
from vaekl import metrics as metrics_lib
from vaekl.models.gaussian import Gaussian


# ----------------------------------------------------------------------------------------
# Hyperparameter fields (config fields; defaults in vaekl.config come from here).


@dataclasses.dataclass(frozen=True)
class Field:
    """A regularizer hyperparameter: its default, meaning and valid range.

    Numeric (int/float, not bool) fields are per-run (traced); others are static.
    """

    default: Any
    doc: str
    low: float | None = None          # value >= low
    low_open: bool = False            # value > low
    high: float | None = None         # value <= high
    choices: tuple | None = None
    static: bool = False              # a numeric field that must stay compile-time

    @property
    def per_run(self) -> bool:
        return (isinstance(self.default, (int, float)) and not isinstance(self.default, bool)
                and not self.static)


FIELDS: dict[str, Field] = {
    "beta": Field(1.0, "β: weight of the KL (kl, free_bits) or of the total correlation (tcvae)",
                  low=0.0),
    "beta_schedule": Field("constant", "w(t) multiplying β: constant | linear | cyclical",
                           choices=schedules.BETA_SCHEDULES),
    "beta_warmup_steps": Field(1000, "linear: steps from w = 0 to 1", low=1),
    "beta_cycles": Field(4, "cyclical: number of cycles M over num_steps (Fu et al. 2019)", low=1),
    "beta_cycle_ramp": Field(0.5, "cyclical: fraction R of each cycle spent ramping 0 → 1",
                             low=0.0, low_open=True, high=1.0),
    "free_bits": Field(0.0, "λ: nats per latent dimension below which the KL is not pushed",
                       low=0.0),
    "capacity_max": Field(25.0, "C_max: final capacity in nats", low=0.0),
    "capacity_steps": Field(10000, "steps over which C grows linearly from 0 to C_max", low=1),
    "capacity_gamma": Field(1000.0, "γ: weight of |KL − C| (disentanglement_lib: 1000)", low=0.0),
    "capacity_per_example": Field(False, "γ·E|KL(x) − C| per example (Burgess et al.'s form) "
                                  "instead of γ·|E KL − C| on the batch mean"),
    "tc_alpha": Field(1.0, "α: weight of the index-code mutual information", low=0.0),
    "tc_gamma": Field(1.0, "γ: weight of the dimension-wise KL", low=0.0),
    "tc_estimator": Field("mss", "log q(z) estimator: mws (minibatch weighted) | mss (stratified)",
                          choices=("mws", "mss")),
    "dip_lambda_od": Field(1.0, "λ_od: weight of the squared off-diagonal covariance", low=0.0),
    "dip_lambda_d_factor": Field(10.0, "λ_d / λ_od: the squared diagonal − 1 is weighted "
                                 "λ_d = factor·λ_od (disentanglement_lib's lambda_d_factor: "
                                 "10 for DIP-VAE-I, 1 for DIP-VAE-II)", low=0.0),
    "mmd_alpha": Field(1.0, "α: the KL weight is 1 − α", high=1.0),
    "mmd_lambda": Field(1000.0, "λ: the MMD weight is α + λ − 1", low=0.0),
    "mmd_kernel": Field("imq", "kernel: imq (inverse multiquadric) | rbf", choices=("imq", "rbf")),
    "factor_gamma": Field(10.0, "γ: weight of the discriminator's TC estimate", low=0.0),
    "factor_lr": Field(1e-4, "the discriminator's Adam learning rate", low=0.0, low_open=True),
    "factor_b1": Field(0.5, "the discriminator's Adam β1", low=0.0, high=1.0, static=True),
    "factor_b2": Field(0.9, "the discriminator's Adam β2", low=0.0, high=1.0, static=True),
}


# ----------------------------------------------------------------------------------------
# The interface.


class Inputs(NamedTuple):
    """What a batch of B examples produced (k = latent dimensions, padded dims masked out).

    Attributes:
      q: the posterior q(z|x), a Gaussian with batch shape [B] (diagonal or full).
      z: [B, k] one reparameterized draw z ~ q(z|x), masked dimensions zeroed.
      p: the prior (None: N(0, I)).
      mask: [k] 1.0 for a live latent dimension, 0.0 for a padded one.
      kl_per_dim: [B, k] KL(q(z|x) ‖ p) per example and dimension (masked), nats: the closed
        form, or the one-draw estimate at z with ``kl_estimator`` mc or stl
        (:mod:`vaekl.kl_estimators`; only its sums are meaningful for a mixture prior).
      step: int32 scalar, the training step.
      num_steps: static int, the run's length.
      dataset_size: static int N, the training-set size.
      key: a PRNG key for the regularizer's own draws.
      aux: the regularizer's auxiliary parameters (e.g. FactorVAE's discriminator) or None.
    """

    q: Gaussian
    z: jax.Array
    p: Gaussian | None
    mask: jax.Array
    kl_per_dim: jax.Array
    step: jax.Array
    num_steps: int
    dataset_size: int
    key: jax.Array
    aux: Any = None


class Output(NamedTuple):
    """A regularizer's result: ``penalty`` (scalar, nats per example, differentiable in the VAE's
    parameters), ``metrics`` (declared names → scalars or [k]) and ``aux_loss`` (scalar, minimized
    over the auxiliary parameters only; 0 when there are none)."""

    penalty: jax.Array
    metrics: dict
    aux_loss: jax.Array | float = 0.0


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A registry entry.

    Attributes:
      name: ``--config.regularizer=NAME``.
      fn: (Inputs, hp, static) → Output; hp maps the per-run fields to traced float32 scalars,
        static maps the static fields to their values.
      fields: the config fields it reads (declared in :data:`FIELDS`).
      paper: the definition's source.
      formula: the penalty, for the README table.
      metrics: (name, doc) or (name, doc, title) it logs, declared in vaekl.metrics.
      init_aux: (key, latent_dim, static) → auxiliary parameters, or None.
      aux_optimizer: (static) → optax transformation for the auxiliary parameters; its learning
        rate field (per-run) is ``aux_lr_field``.
      swept: the strengths Locatello et al. (2019) swept, for the README.
      posteriors: the posterior families it supports.
    """

    name: str
    fn: Callable[[Inputs, Mapping[str, jax.Array], Mapping[str, Any]], Output]
    fields: tuple[str, ...]
    paper: str
    formula: str = ""
    metrics: tuple[tuple[str, ...], ...] = ()
    init_aux: Callable | None = None
    aux_optimizer: Callable | None = None
    aux_lr_field: str | None = None
    swept: str = ""
    posteriors: tuple[str, ...] = ("diag", "full")


REGISTRY: dict[str, Regularizer] = {}


def register(reg: Regularizer) -> Regularizer:
    unknown = [f for f in reg.fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"regularizer {reg.name!r} reads undeclared fields {unknown}; "
                         f"add them to vaekl.regularizers.FIELDS")
    for name, doc, *title in reg.metrics:
        metrics_lib.declare(name, doc, title=title[0] if title else "")
    REGISTRY[reg.name] = reg
    return reg


def get(name: str) -> Regularizer:
    if name not in REGISTRY:
        raise ValueError(f"unknown regularizer {name!r}; choose from {tuple(REGISTRY)}")
    return REGISTRY[name]


def per_run_fields() -> tuple[str, ...]:
    """Every numeric regularizer field: per-run values of the compiled step."""
    return tuple(k for k, f in FIELDS.items() if f.per_run)


def static_fields() -> tuple[str, ...]:
    return tuple(k for k, f in FIELDS.items() if not f.per_run)


# ----------------------------------------------------------------------------------------
# Shared pieces.


def _kl(inp: Inputs) -> jax.Array:
    """The batch-mean closed-form KL, nats per example."""
    return inp.kl_per_dim.sum(-1).mean()


def _beta_weight(inp: Inputs, hp, static) -> jax.Array:
    return schedules.beta_weight(static["beta_schedule"], inp.step,
                                 warmup_steps=hp["beta_warmup_steps"], cycles=hp["beta_cycles"],
                                 ramp=hp["beta_cycle_ramp"], num_steps=inp.num_steps)


def _prior_diag(inp: Inputs):
    """(mean [k], log_var [k]) of a diagonal prior, or (None, None) for N(0, I)."""
    if inp.p is None:
        return None, None
    if not inp.p.is_diagonal:
        raise ValueError("this regularizer needs a factorized prior (prior=std_normal or diag)")
    return inp.p.mean, inp.p.log_var


_SCHEDULE_FIELDS = ("beta", "beta_schedule", "beta_warmup_steps", "beta_cycles", "beta_cycle_ramp")


# ----------------------------------------------------------------------------------------
# The regularizers.


def kl(inp: Inputs, hp, static) -> Output:
    """β-VAE (Higgins et al. 2017): β·w(t)·KL(q(z|x) ‖ p(z)), with the β schedule w(t)."""
    w = _beta_weight(inp, hp, static)
    return Output(hp["beta"] * w * _kl(inp), {"beta_weight": w})


def free_bits(inp: Inputs, hp, static) -> Output:
    """Free bits (Kingma et al. 2016): β·w(t)·Σᵢ max(λ, KLᵢ), KLᵢ the batch-averaged KL of latent
    dimension i; no gradient pushes a dimension's KL below λ nats. Masked dimensions add 0."""
    w = _beta_weight(inp, hp, static)
    per_dim = inp.kl_per_dim.mean(0)
    clamped = jnp.sum(jnp.maximum(hp["free_bits"], per_dim) * inp.mask)
    return Output(hp["beta"] * w * clamped, {"beta_weight": w})


def capacity(inp: Inputs, hp, static) -> Output:
    """AnnealedVAE / capacity control (Burgess et al. 2018): γ·|KL − C(t)| with
    C(t) = C_max·min(1, t/T_C). ``capacity_per_example=False`` (disentanglement_lib's form):
    γ·|E_batch KL − C|; True (the paper's): γ·E_batch |KL(x) − C| (≥ the former)."""
    c = schedules.capacity(inp.step, hp["capacity_max"], hp["capacity_steps"])
    if static["capacity_per_example"]:
        dev = jnp.abs(inp.kl_per_dim.sum(-1) - c).mean()
    else:
        dev = jnp.abs(_kl(inp) - c)
    return Output(hp["capacity_gamma"] * dev, {"capacity": c})


def tcvae(inp: Inputs, hp, static) -> Output:
    """β-TCVAE (Chen et al. 2018): α·MI + β·TC + γ·DWKL, the batch KL split into index-code
    mutual information, total correlation and dimension-wise KL, log q(z) estimated by minibatch
    weighted (mws) or stratified (mss) sampling with N the training-set size
    (:func:`tc_decomposition`). Written as KL + (α−1)·MI + (β−1)·TC + (γ−1)·DWKL with the
    closed-form KL, which has the same expectation and less variance. At α = γ = 1 with
    ``tc_estimator="mws"`` it is disentanglement_lib's KL + (β − 1)·TC up to a constant
    ((β − 1)(k − 1)·log(N·M), which has no gradient); the default ``"mss"`` is a different
    (consistent) estimator of the TC, so the claim does not hold for it."""
    pm, plv = _prior_diag(inp)
    parts = estimators.tc_decomposition(inp.z, inp.q.mean, inp.q.log_var, inp.dataset_size,
                                        estimator=static["tc_estimator"], mask=inp.mask,
                                        prior_mean=pm, prior_log_var=plv)
    mi, tc, dw = (parts[k].mean() for k in ("index_code_mi", "total_correlation", "dimwise_kl"))
    pen = _kl(inp) + (hp["tc_alpha"] - 1) * mi + (hp["beta"] - 1) * tc + (hp["tc_gamma"] - 1) * dw
    return Output(pen, {})


def _dip(kind: str) -> Callable:
    def fn(inp: Inputs, hp, static) -> Output:
        cov = estimators.dip_covariance(inp.q.mean, inp.q.log_var, kind=kind, mask=inp.mask)
        dip = estimators.dip_penalty(cov, hp["dip_lambda_od"],
                                     hp["dip_lambda_d_factor"] * hp["dip_lambda_od"], mask=inp.mask)
        return Output(_kl(inp) + dip, {"dip_penalty": dip})
    fn.__name__ = f"dip_{kind}"
    fn.__doc__ = (f"DIP-VAE-{kind.upper()} (Kumar et al. 2018): KL + λ_od·Σ_{{i≠j}} C_ij² + "
                  f"λ_d·Σ_i (C_ii − 1)², λ_d = dip_lambda_d_factor·λ_od, C = " +
                  ("Cov_batch[μ(x)]" if kind == "i" else "E_batch[Σ(x)] + Cov_batch[μ(x)]") +
                  " over the unmasked dimensions.")
    return fn


def mmd(inp: Inputs, hp, static) -> Output:
    """InfoVAE (Zhao et al. 2019, Eq. 6 with D = MMD): (1 − α)·KL + (α + λ − 1)·MMD(q(z), p(z)),
    the unbiased MMD estimate between the batch's z and as many prior draws, with the kernel
    ``mmd_kernel``. The prior must be N(0, I)."""
    if inp.p is not None:
        raise ValueError("regularizer 'mmd' draws from the prior N(0, I); use prior=std_normal")
    z_prior = estimators.prior_samples(inp.key, inp.z.shape) * inp.mask
    d = estimators.mmd(inp.z, z_prior, kernel=static["mmd_kernel"], mask=inp.mask)
    pen = (1 - hp["mmd_alpha"]) * _kl(inp) + (hp["mmd_alpha"] + hp["mmd_lambda"] - 1) * d
    return Output(pen, {"mmd": d})


def factor(inp: Inputs, hp, static) -> Output:
    """FactorVAE (Kim & Mnih 2018): KL + γ·TC, TC ≈ E[log D(z)/(1 − D(z))] from a discriminator
    (6 × 1000 leaky-ReLU MLP, as disentanglement_lib) that tells z ~ q(z) from dimension-wise
    permuted batches; the discriminator minimizes its cross-entropy (``aux_loss``) with its own
    Adam, on the same batch, with z held fixed."""
    logits_z = estimators.discriminator_apply(jax.lax.stop_gradient(inp.aux), inp.z)
    tc = estimators.factor_tc(logits_z)
    z_fixed = jax.lax.stop_gradient(inp.z)
    z_perm = estimators.permute_dims(inp.key, z_fixed, mask=inp.mask)
    d_loss = estimators.discriminator_loss(estimators.discriminator_apply(inp.aux, z_fixed),
                                           estimators.discriminator_apply(inp.aux, z_perm))
    return Output(_kl(inp) + hp["factor_gamma"] * tc,
                  {"factor_tc": tc, "discriminator_loss": d_loss}, d_loss)


def _factor_init(key: jax.Array, latent_dim: int, static) -> Any:
    return estimators.discriminator_init(key, latent_dim)


def _factor_optimizer(static):
    import optax  # pylint: disable=g-import-not-at-top
    return optax.scale_by_adam(b1=static["factor_b1"], b2=static["factor_b2"])


register(Regularizer(
    "kl", kl, _SCHEDULE_FIELDS, "Higgins et al. 2017 (β-VAE); Fu et al. 2019 (cyclical)",
    "β·w(t)·KL", metrics=(("beta_weight", "w(t), the β schedule's multiplier", "β weight w(t)"),),
    swept="β ∈ {1, 2, 4, 6, 8, 16}"))
register(Regularizer(
    "free_bits", free_bits, _SCHEDULE_FIELDS + ("free_bits",), "Kingma et al. 2016",
    "β·w(t)·Σᵢ max(λ, KLᵢ)", metrics=(("beta_weight", "w(t), the β schedule's multiplier", "β weight w(t)"),)))
register(Regularizer(
    "capacity", capacity, ("capacity_max", "capacity_steps", "capacity_gamma",
                           "capacity_per_example"),
    "Burgess et al. 2018 (AnnealedVAE)", "γ·|KL − C(t)|",
    metrics=(("capacity", "C(t), the capacity target in nats", "capacity C [nats]"),),
    swept="C_max ∈ {5, 10, 25, 50, 75, 100}, γ = 1000"))
register(Regularizer(
    "tcvae", tcvae, ("tc_alpha", "beta", "tc_gamma", "tc_estimator"), "Chen et al. 2018 (β-TCVAE)",
    "α·MI + β·TC + γ·DWKL", swept="β ∈ {1, 2, 4, 6, 8, 10}", posteriors=("diag",)))
register(Regularizer(
    "dip_i", _dip("i"), ("dip_lambda_od", "dip_lambda_d_factor"), "Kumar et al. 2018 (DIP-VAE-I)",
    "KL + λ_od·Σ_{i≠j} Cov[μ]ᵢⱼ² + λ_d·Σᵢ (Cov[μ]ᵢᵢ − 1)², λ_d = factor·λ_od",
    metrics=(("dip_penalty", "the DIP penalty λ_od·Σ off-diag² + λ_d·Σ (diag − 1)²"),),
    swept="λ_od ∈ {1, 2, 5, 10, 20, 50}, factor 10", posteriors=("diag",)))
register(Regularizer(
    "dip_ii", _dip("ii"), ("dip_lambda_od", "dip_lambda_d_factor"), "Kumar et al. 2018 (DIP-VAE-II)",
    "KL + λ_od·Σ_{i≠j} Cᵢⱼ² + λ_d·Σᵢ (Cᵢᵢ − 1)², λ_d = factor·λ_od, C = E[Σ] + Cov[μ]",
    metrics=(("dip_penalty", "the DIP penalty λ_od·Σ off-diag² + λ_d·Σ (diag − 1)²"),),
    swept="λ_od ∈ {1, 2, 5, 10, 20, 50}, factor 1", posteriors=("diag",)))
register(Regularizer(
    "mmd", mmd, ("mmd_alpha", "mmd_lambda", "mmd_kernel"), "Zhao et al. 2019 (InfoVAE)",
    "(1 − α)·KL + (α + λ − 1)·MMD(q(z), p(z))",
    metrics=(("mmd", "unbiased MMD² between q(z) and p(z) on the batch"),)))
register(Regularizer(
    "factor", factor, ("factor_gamma", "factor_lr", "factor_b1", "factor_b2"),
    "Kim & Mnih 2018 (FactorVAE)", "KL + γ·TC_discriminator",
    metrics=(("factor_tc", "the discriminator's TC estimate E[logit₀ − logit₁]"),
             ("discriminator_loss", "the discriminator's cross-entropy")),
    init_aux=_factor_init, aux_optimizer=_factor_optimizer, aux_lr_field="factor_lr",
    swept="γ ∈ {10, 20, 30, 40, 50, 100}"))


def tc_decomposition(z, mean, log_var, dataset_size, estimator="mss", mask=None, **kw) -> dict:
    """β-TCVAE's split of a batch's KL (see :func:`vaekl.estimators.tc_decomposition`): for z,
    mean, log_var [M, k], a dict of per-example [M] ``index_code_mi``, ``total_correlation`` and
    ``dimwise_kl`` in nats."""
    return estimators.tc_decomposition(z, mean, log_var, dataset_size, estimator=estimator,
                                       mask=mask, **kw)


def markdown_table() -> str:
    """The README's regularizer table, generated from the registry (a test keeps them equal)."""
    lines = ["| `--config.regularizer` | penalty (nats per example) | fields (default) | paper | "
             "Locatello et al. 2019 swept |", "|---|---|---|---|---|"]
    for name, reg in REGISTRY.items():
        fields = ", ".join(f"`{f}` ({FIELDS[f].default!r})" for f in reg.fields)
        formula = reg.formula.replace("|", "\\|")
        lines.append(f"| `{name}` | {formula} | {fields} | {reg.paper} | {reg.swept or '—'} |")
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> None:
    """Rewrites the table between the README's ``regularizers:start/end`` markers."""
    with open(path) as f:
        text = f.read()
    start, end = "<!-- regularizers:start -->\n", "\n<!-- regularizers:end -->"
    a, b = text.index(start) + len(start), text.index(end)
    with open(path, "w") as f:
        f.write(text[:a] + markdown_table() + text[b:])


if __name__ == "__main__":  # python -m vaekl.regularizers: regenerate the README table
    update_readme()
