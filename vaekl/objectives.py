"""The objective, assembled in one place for training and evaluation.

Reductions, everywhere in vaekl: sum over pixels and over latent dimensions, mean over the
batch; every amount is in nats per example. ``neg_elbo`` is always the true negative ELBO,
recon + KL, unweighted; ``loss`` is the objective that is minimized,

    loss = recon + penalty,

with the penalty of the run's regularizer (:mod:`vaekl.regularizers`: β·KL and its schedules,
free bits, capacity, β-TCVAE, DIP-VAE, InfoVAE/MMD, FactorVAE). The per-run hyperparameters
``hp`` (β, the strengths, …) are traced values, so runs that differ only in them share one
compiled program; the :class:`Static` settings are compile-time.

The KL the penalty uses is the closed form or a one-sample estimate (``kl_estimator``,
:mod:`vaekl.kl_estimators`); the logged ``kl`` stays the closed form, with ``kl_estimate``
beside it, except for mixture priors (mog, vamp), which have none: there ``kl`` is the
estimate and the per-dimension terms are NaN. ``objective='iwae'`` minimizes instead
``neg_iwae``, −(the K-sample importance-weighted bound) (:func:`iwae_bound`).

Besides the regularizer's own metrics, every run logs the closed-form KL with its terms per
latent dimension and β-TCVAE's split of the batch KL (index-code MI, total correlation,
dimension-wise KL; minibatch-stratified estimate with N the training-set size), whatever its
regularizer, because those are what a researcher compares across methods.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from vaekl import estimators, kl_estimators, loops, regularizers
from vaekl import metrics as M
from vaekl.models import gaussian
from vaekl.models.vae import VAE

TERMS = ("kl_trace", "kl_mahalanobis", "kl_log_det_ratio", "kl_dim")
TC_PARTS = ("index_code_mi", "total_correlation", "dimwise_kl")

M.declare("loss", "the minimized objective recon + penalty", title="loss (the objective) [nats]")
M.declare("neg_elbo", "negative ELBO recon + KL (unweighted)", title="−ELBO [nats]")
M.declare("recon", "reconstruction −E_q log p(x|z), one sample", title="distortion −E log p(x|z) [nats]")
M.declare("kl", "closed-form KL(q(z|x) ‖ p(z))", title="KL [nats]")
M.declare("kl_estimate", "the KL estimate the penalty used (kl_estimator mc or stl), one draw")
M.declare("neg_iwae", "−(the K-sample importance-weighted bound), the iwae objective's loss")
M.declare("penalty", "the regularizer's penalty", title="penalty (the regularizer) [nats]")
M.declare("kl_per_dim", "KL per latent dimension", per_dim=True)
M.declare("kl_trace", "Σᵢ of the trace term tr(Σp⁻¹Σq) (dimensionless)")
M.declare("kl_mahalanobis", "the Mahalanobis term (μp−μq)ᵀΣp⁻¹(μp−μq)")
M.declare("kl_log_det_ratio", "the log-determinant term log|Σp| − log|Σq|")
M.declare("kl_dim", "the constant term k (live latent dimensions)")
for _t in TERMS[:3]:
    M.declare(_t + "_per_dim", f"{_t} per latent dimension", per_dim=True)
M.declare("index_code_mi", "β-TCVAE index-code mutual information (batch estimate)", title="index-code MI [nats]")
M.declare("total_correlation", "β-TCVAE total correlation (batch estimate)", title="total correlation [nats]")
M.declare("dimwise_kl", "β-TCVAE dimension-wise KL (batch estimate)", title="dimension-wise KL [nats]")
M.declare("active_units", "dimensions u with Var_x E_q[z_u|x] > threshold", integer=True, title="active units")
M.declare("au_variance", "Var_x E_q[z_u|x] per latent dimension", per_dim=True)


class Static(NamedTuple):
    """The compile-time settings of the objective (hashable)."""

    regularizer: str
    settings: tuple[tuple[str, Any], ...]  # the static regularizer fields
    num_steps: int
    dataset_size: int
    kl_estimator: str = "analytic"  # analytic | mc | stl (vaekl.kl_estimators)
    objective: str = "elbo"         # elbo | iwae
    iwae_k: int = 1                 # K, importance samples of the iwae objective

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, dataset_size: int) -> "Static":
        return cls(config.regularizer, tuple((k, config[k]) for k in regularizers.static_fields()),
                   int(config.num_steps), int(dataset_size), config.kl_estimator,
                   config.objective, int(config.iwae_k))


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The per-run values of the objective, float32 scalars (stack them to vmap over runs)."""
    return {k: jnp.float32(config[k]) for k in regularizers.per_run_fields()}


class Parts(NamedTuple):
    """What the model produced for a batch of B examples (masked dimensions already zeroed)."""

    q: gaussian.Gaussian
    z: jax.Array                    # [B, k]
    p: gaussian.Gaussian | None
    mask: jax.Array                 # [k]
    per_example: dict               # name → [B] or [B, k]


def parts(model: VAE, x: jax.Array, key: jax.Array, latent_mask: jax.Array | None = None) -> Parts:
    """One-sample ELBO parts for a batch x [B, H, W, C].

    ``latent_mask`` [k] (0/1) switches latent dimensions off: a masked dimension is zeroed
    before the decoder and contributes nothing to the KL, its terms or any regularizer.

    ``per_example`` holds recon [B] (−log p(x|z), z ~ q), kl_per_dim [B, k], the KL terms
    kl_trace / kl_mahalanobis / kl_log_det_ratio / kl_dim [B], the first three per dimension
    (``*_per_dim`` [B, k]) and posterior_mean [B, k].
    """
    q = model.encode(x)
    mask = jnp.ones(q.latent_dim, q.mean.dtype) if latent_mask is None else latent_mask.astype(q.mean.dtype)
    z = q.sample(key) * mask
    p = model.prior_distribution()
    out = {"recon": -model.likelihood.log_prob(x, model.decode(z)), "posterior_mean": q.mean * mask}
    if gaussian.is_mixture(p):  # no closed form: NaN, and the objective logs the estimate as kl
        nan = jnp.full(q.mean.shape, jnp.nan, q.mean.dtype)
        out["kl_per_dim"] = nan
        for name in TERMS:
            out[name] = nan[..., 0]
            if name != "kl_dim":
                out[name + "_per_dim"] = nan
        return Parts(q, z, p, mask, out)
    out["kl_per_dim"] = gaussian.kl(q, p, per_dim=True) * mask
    for name, term in zip(TERMS, gaussian.kl_terms(q, p, per_dim=True)):
        out[name] = jnp.sum(term * mask, -1)
        if name != "kl_dim":
            out[name + "_per_dim"] = term * mask
    return Parts(q, z, p, mask, out)


def tc_parts(pt: Parts, dataset_size: int) -> dict[str, jax.Array]:
    """β-TCVAE's split of the batch KL (means over the batch, stop-gradient), for logging; NaN
    where it is undefined here (full-covariance posteriors or priors)."""
    if not pt.q.is_diagonal or (pt.p is not None and not pt.p.is_diagonal):
        return {k: jnp.float32(jnp.nan) for k in TC_PARTS}
    sg = jax.lax.stop_gradient
    pm, plv = (None, None) if pt.p is None else (sg(pt.p.mean), sg(pt.p.log_var))
    d = estimators.tc_decomposition(sg(pt.z), sg(pt.q.mean), sg(pt.q.log_var), dataset_size,
                                    estimator="mss", mask=pt.mask, prior_mean=pm, prior_log_var=plv)
    return {k: d[k].mean() for k in TC_PARTS}


def penalty_kl(pt: Parts, static: Static) -> jax.Array:
    """[B, k] the KL the penalty uses: the closed form ('analytic') or the one-sample estimate
    at the parts' draw z ('mc', 'stl'; :mod:`vaekl.kl_estimators`)."""
    return kl_estimators.per_dim(static.kl_estimator, pt.q, pt.p, pt.z, pt.mask,
                                 pt.per_example["kl_per_dim"])


def regularize(pt: Parts, step: jax.Array, hp: Mapping[str, jax.Array], static: Static,
               key: jax.Array, aux: Any = None, kl_per_dim: jax.Array | None = None
               ) -> regularizers.Output:
    """The run's regularizer applied to a batch's parts, with the KL ``kl_per_dim`` [B, k]
    (default :func:`penalty_kl`)."""
    reg = regularizers.get(static.regularizer)
    kl_per_dim = penalty_kl(pt, static) if kl_per_dim is None else kl_per_dim
    inp = regularizers.Inputs(pt.q, pt.z, pt.p, pt.mask, kl_per_dim,
                              jnp.asarray(step), static.num_steps, static.dataset_size, key, aux)
    return reg.fn(inp, hp, dict(static.settings))


def _estimate_metrics(kl_pen: jax.Array, static: Static) -> dict[str, jax.Array]:
    """``kl_estimate`` (batch mean) beside the closed form, for the sampled estimators only."""
    return {} if static.kl_estimator == "analytic" else {"kl_estimate": kl_pen.sum(-1).mean()}


def log_ratio(q: gaussian.Gaussian, p, z: jax.Array, mask: jax.Array, kl_estimator: str) -> jax.Array:
    """[B] log q(z|x) − log p(z) over the unmasked dimensions, q's parameters stopped inside
    log q for 'stl' (the per-dimension estimate of :mod:`vaekl.kl_estimators`, summed)."""
    est = kl_estimators.SAMPLED["stl" if kl_estimator == "stl" else "mc"]
    return est(q, p, z, mask).sum(-1)


def iwae_log_weights(model: VAE, x: jax.Array, q: gaussian.Gaussian, p, mask: jax.Array,
                     keys: jax.Array, kl_estimator: str) -> jax.Array:
    """[S, B] log p(x|zₛ) + log p(zₛ) − log q(zₛ|x), zₛ = q.sample(keysₛ) (masked dims zeroed)."""

    def one(key):
        z = q.sample(key) * mask
        return model.likelihood.log_prob(x, model.decode(z)) - log_ratio(q, p, z, mask, kl_estimator)

    return jax.vmap(one)(keys)


IWAE_CHUNK = 50  # draws decoded at once by the iwae objective: memory grows with IWAE_CHUNK·B


def iwae_bound(model: VAE, x: jax.Array, pt: Parts, key: jax.Array, num_samples: int,
               kl_estimator: str = "mc", chunk: int = IWAE_CHUNK) -> jax.Array:
    """[B] the K-sample importance-weighted bound log (1/K) Σₛ p(x, zₛ)/q(zₛ|x) (Burda et al.
    2016), differentiable, nats.

    Draw 0 is the parts' own z, so at K = 1 the bound is −(recon + the MC KL estimate) on that
    draw, the one-sample ELBO; draws s = 1..K−1 use fold_in(key, s), decoded ``chunk`` at a time
    (rematerialized in the backward pass) with a streaming log-sum-exp, so memory is bounded
    whatever K. With kl_estimator='stl' q's parameters are stopped inside log q (Roeder et al.'s
    path estimator; biased for K > 1, Tucker et al. 2018); 'analytic' and 'mc' both give the
    ordinary IWAE gradient (the bound has no separate KL).
    """
    lw0 = -pt.per_example["recon"] - log_ratio(pt.q, pt.p, pt.z, pt.mask, kl_estimator)
    rest = num_samples - 1
    m, s = lw0, jnp.ones_like(lw0)
    if rest:
        size = max(d for d in range(1, min(rest, chunk) + 1) if rest % d == 0)

        @jax.checkpoint
        def body(carry, c):
            m, s = carry
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(1 + c * size + jnp.arange(size))
            lw = iwae_log_weights(model, x, pt.q, pt.p, pt.mask, keys, kl_estimator)
            m_new = jax.lax.stop_gradient(jnp.maximum(m, lw.max(0)))
            return (m_new, s * jnp.exp(m - m_new) + jnp.exp(lw - m_new).sum(0)), None

        n_chunks = rest // size
        if n_chunks == 1:
            (m, s), _ = body((m, s), jnp.int32(0))
        else:
            (m, s), _ = jax.lax.scan(body, (m, s), jnp.arange(n_chunks))
    return m + jnp.log(s) - math.log(num_samples)


def objective(model: VAE, x: jax.Array, key: jax.Array, step: jax.Array,
              hp: Mapping[str, jax.Array], static: Static, latent_mask: jax.Array | None = None,
              aux: Any = None) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """The training objective on a batch: (loss, (metrics, aux_loss)), all batch means.

    ``loss`` is differentiable in the model's parameters (the auxiliary parameters enter it
    stop-gradient), ``aux_loss`` in ``aux`` only.
    """
    k_z, k_reg = jax.random.split(key)
    pt = parts(model, x, k_z, latent_mask)
    mean = {k: v.mean(0) for k, v in pt.per_example.items() if k != "posterior_mean"}
    kl_pen = penalty_kl(pt, static)
    out = regularize(pt, step, hp, static, k_reg, aux, kl_pen)
    extra = _estimate_metrics(kl_pen, static)
    kl = extra["kl_estimate"] if gaussian.is_mixture(pt.p) else mean["kl_per_dim"].sum()
    loss = mean["recon"] + out.penalty
    if static.objective == "iwae":
        extra["neg_iwae"] = -iwae_bound(model, x, pt, jax.random.fold_in(k_z, 1), static.iwae_k,
                                        static.kl_estimator).mean()
        loss = extra["neg_iwae"]
    metrics = dict(mean, kl=kl, neg_elbo=mean["recon"] + kl, loss=loss, penalty=out.penalty,
                   **tc_parts(pt, static.dataset_size), **out.metrics, **extra)
    return loss, (metrics, jnp.asarray(out.aux_loss, jnp.float32))


def evaluation(model: VAE, images: jax.Array, key: jax.Array, step: jax.Array,
               hp: Mapping[str, jax.Array], static: Static, latent_mask: jax.Array | None,
               to_inputs, batch_size: int, active_units_threshold: float,
               aux: Any = None, unroll_batches: bool = True) -> dict[str, jax.Array]:
    """Averages over all of ``images`` [N, ...] (uint8), nats per example.

    The ELBO parts are per example, over every image; the regularizer's penalty, its metrics and
    the β-TCVAE split are batch quantities, averaged over the ⌊N / batch_size⌋ full batches (the
    remainder is left out of them only). One posterior sample per example, batch b using
    fold_in(key, b) (a fixed ``key`` makes evaluations comparable across steps). Active units
    (Burda et al. 2016): dimensions u with Var_x(E_q[z_u|x]) > threshold.

    Args:
      to_inputs: (key, uint8 batch) → model inputs (binarization).
      unroll_batches: whether the CPU may unroll the batches (:func:`vaekl.loops.batched_map`;
        convolutional models only: everything else compiles one batch and loops).
    """

    n = images.shape[0]
    bs = min(batch_size, n)

    def one(x_u8, i):
        k_in, k_z, k_reg = jax.random.split(jax.random.fold_in(key, i), 3)
        x = to_inputs(k_in, x_u8)
        pt = parts(model, x, k_z, latent_mask)
        kl_pen = penalty_kl(pt, static)
        out = regularize(pt, step, hp, static, k_reg, aux, kl_pen)
        batch = dict(penalty=out.penalty, **tc_parts(pt, static.dataset_size), **out.metrics,
                     **_estimate_metrics(kl_pen, static))
        per = dict(pt.per_example)
        if static.objective == "iwae":
            per["neg_iwae"] = -iwae_bound(model, x, pt, jax.random.fold_in(k_z, 1), static.iwae_k,
                                          static.kl_estimator)
        return per, jax.tree.map(lambda v: jnp.broadcast_to(v, (x_u8.shape[0], *jnp.shape(v))), batch)

    per, batch = loops.batched_map(one, images, bs, unroll_batches)
    full = (n // bs) * bs
    means = {k: v.mean(0) for k, v in per.items() if k != "posterior_mean"}
    batch_means = {k: v[:full].mean(0) for k, v in batch.items()}
    mu = per["posterior_mean"]
    au_variance = jnp.mean(jnp.square(mu - mu.mean(0)), 0)
    kl = batch_means["kl_estimate"] if gaussian.is_mixture(model.prior_distribution()) else means["kl_per_dim"].sum()
    loss = means["neg_iwae"] if static.objective == "iwae" else means["recon"] + batch_means["penalty"]
    return dict(means, **batch_means, kl=kl, neg_elbo=means["recon"] + kl, loss=loss,
                active_units=jnp.sum(au_variance > active_units_threshold), au_variance=au_variance)
