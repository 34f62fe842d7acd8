# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The Gaussian KL, from its definition to the closed form, and its terms in a trained VAE
#
# Run it as a script from the repository root (`python docs/tutorial_kl.py`) or open it as a
# notebook with jupytext (percent format). Every step is checked numerically: the closed form of
# `vaekl.kl` against the definition, by quadrature where it is one-dimensional and by Monte
# Carlo (with its standard error) everywhere. The test suite executes this file
# (`tests/test_tutorial_kl.py`), so what it says stays true.
#
# Settings (environment variables): `VAEKL_TUTORIAL_STEPS` (training steps of the digits VAE,
# default 2000, under a minute on one CPU core; at 2000, 12 of 16 dimensions were active and 4
# collapsed), `VAEKL_TUTORIAL_RUN` (an existing run directory to load instead of training),
# `VAEKL_TUTORIAL_OUT` (where the run and the figure go; default next to this file, the run as
# `tutorial_kl_run/`), `VAEKL_TUTORIAL_DRAWS` (Monte Carlo draws, default 200,000). The figure
# `docs/tutorial_kl.png` is this default's.

# %%
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vaekl import kl as klib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("VAEKL_TUTORIAL_OUT", HERE)
STEPS = int(os.environ.get("VAEKL_TUTORIAL_STEPS", "2000"))
RUN = os.environ.get("VAEKL_TUTORIAL_RUN", "")
DRAWS = int(os.environ.get("VAEKL_TUTORIAL_DRAWS", "200000"))
rng = np.random.default_rng(0)


def mc_check(name, closed, log_ratio):
    """Prints and checks |closed − mean(log q − log p)| < 4 standard errors (nats)."""
    mean, se = log_ratio.mean(), log_ratio.std(ddof=1) / math.sqrt(len(log_ratio))
    print(f"{name}: closed form {closed:.5f}, Monte Carlo {mean:.5f} ± {se:.5f} (S = {len(log_ratio)})")
    assert abs(closed - mean) < 4 * se, (name, closed, mean, se)


# %% [markdown]
# ## 1. The definition
#
# For densities q and p on ℝᵏ, KL(q ‖ p) = E_q[log q(z) − log p(z)] = ∫ q(z) log(q(z)/p(z)) dz,
# in nats. It is ≥ 0, 0 only at q = p, and not symmetric. Its Monte Carlo estimate is the
# mean of log q(zₛ) − log p(zₛ) over draws zₛ ~ q: unbiased, with a standard error
# sd/√S. That is the `mc` estimator of `--config.kl_estimator`; the closed form below is
# `analytic`.
#
# ## 2. One dimension
#
# With q = N(μq, σq²), p = N(μp, σp²):
#
#     log q(z) − log p(z) = log(σp/σq) − (z − μq)²/(2σq²) + (z − μp)²/(2σp²).
#
# Take E_q: E(z − μq)² = σq², and E(z − μp)² = σq² + (μq − μp)². So
#
#     KL = log(σp/σq) − ½ + (σq² + (μq − μp)²)/(2σp²)
#        = ½ [ σq²/σp²  +  (μp − μq)²/σp²  −  1  +  log(σp²/σq²) ]
#             trace       mahalanobis       dim     log-det ratio
#
# the four terms that `vaekl.kl` returns (`KLTerms`).

# %%
mq, vq, mp, vp = 0.7, math.log(0.3), -0.4, math.log(1.8)  # means and log-variances
closed = float(klib.kl_normal(mq, vq, mp, vp))
by_hand = 0.5 * (math.exp(vq - vp) + (mp - mq) ** 2 / math.exp(vp) - 1 + vp - vq)
q1, p1 = stats.norm(mq, math.exp(vq / 2)), stats.norm(mp, math.exp(vp / 2))
quad, _ = integrate.quad(lambda z: q1.pdf(z) * (q1.logpdf(z) - p1.logpdf(z)), -np.inf, np.inf)
print(f"1-D: vaekl.kl.kl_normal {closed:.7f}, by hand {by_hand:.7f}, quadrature {quad:.7f}")
assert abs(closed - by_hand) < 1e-6 and abs(closed - quad) < 1e-6
z = q1.rvs(DRAWS, random_state=rng)
mc_check("1-D", closed, q1.logpdf(z) - p1.logpdf(z))

# %% [markdown]
# ## 3. Diagonal covariances
#
# If q and p both factorize over dimensions, log q − log p is a sum over dimensions and the
# expectation of each summand involves only its own dimension: the KL is the sum of k
# one-dimensional KLs. `per_dim=True` returns them; the trace term becomes Σᵢ σq,ᵢ²/σp,ᵢ², and
# so on. Against N(0, I) this is the VAE's familiar ½ Σᵢ (σᵢ² + μᵢ² − 1 − log σᵢ²).

# %%
k = 4
mq_d, vq_d = rng.normal(size=k), rng.normal(size=k) * 0.7
mp_d, vp_d = rng.normal(size=k) * 0.3, rng.normal(size=k) * 0.3
per_dim = np.asarray(klib.kl_diag(mq_d, vq_d, mp_d, vp_d, per_dim=True), np.float64)
one_d = np.array([float(klib.kl_normal(*a)) for a in zip(mq_d, vq_d, mp_d, vp_d)])
print("diagonal, per dimension:", np.round(per_dim, 5), "= the 1-D KLs", np.round(one_d, 5))
np.testing.assert_allclose(per_dim, one_d, rtol=1e-5)
qd = stats.multivariate_normal(mq_d, np.diag(np.exp(vq_d)))
pd_ = stats.multivariate_normal(mp_d, np.diag(np.exp(vp_d)))
z = qd.rvs(DRAWS, random_state=rng)
mc_check("diagonal", per_dim.sum(), qd.logpdf(z) - pd_.logpdf(z))
std = np.asarray(klib.kl_std_normal(mq_d, vq_d, per_dim=True), np.float64)
np.testing.assert_allclose(std, 0.5 * (np.exp(vq_d) + mq_d**2 - 1 - vq_d), rtol=1e-5)

# %% [markdown]
# ## 4. Full covariances
#
# For q = N(μq, Σq), p = N(μp, Σp):
#
#     log q(z) − log p(z) = ½ log(|Σp|/|Σq|) − ½ (z−μq)ᵀΣq⁻¹(z−μq) + ½ (z−μp)ᵀΣp⁻¹(z−μp).
#
# Under q, E[(z−μq)ᵀΣq⁻¹(z−μq)] = tr(Σq⁻¹Σq) = k, and with z − μp = (z − μq) + (μq − μp),
# E[(z−μp)ᵀΣp⁻¹(z−μp)] = tr(Σp⁻¹Σq) + (μp−μq)ᵀΣp⁻¹(μp−μq). Hence
#
#     KL = ½ [ tr(Σp⁻¹Σq) + (μp−μq)ᵀΣp⁻¹(μp−μq) − k + log|Σp| − log|Σq| ],
#
# which reduces to the diagonal form when both are diagonal. `vaekl.kl.kl_full` evaluates it
# from Cholesky factors without an inverse and without the cancellation of adding the terms.

# %%
lq = np.tril(rng.normal(size=(k, k)) * 0.4) + np.diag(np.exp(rng.normal(size=k) * 0.3))
lp = np.tril(rng.normal(size=(k, k)) * 0.3) + np.diag(np.exp(rng.normal(size=k) * 0.3))
sq, sp = lq @ lq.T, lp @ lp.T
closed = float(klib.kl_full(mq_d, lq, mp_d, lp))
sp_inv = np.linalg.inv(sp)
trace, maha = np.trace(sp_inv @ sq), (mp_d - mq_d) @ sp_inv @ (mp_d - mq_d)
logdet = np.linalg.slogdet(sp)[1] - np.linalg.slogdet(sq)[1]
terms = klib.kl_full_terms(mq_d, lq, mp_d, lp)
print(f"full: trace {float(terms.trace):.5f} ({trace:.5f}), mahalanobis {float(terms.mahalanobis):.5f} "
      f"({maha:.5f}), log-det ratio {float(terms.log_det_ratio):.5f} ({logdet:.5f}), k {float(terms.dim):.0f}")
np.testing.assert_allclose([terms.trace, terms.mahalanobis, terms.log_det_ratio], [trace, maha, logdet],
                           rtol=1e-4)
np.testing.assert_allclose(closed, 0.5 * (trace + maha - k + logdet), rtol=1e-5)
qf, pf = stats.multivariate_normal(mq_d, sq), stats.multivariate_normal(mp_d, sp)
z = qf.rvs(DRAWS, random_state=rng)
mc_check("full", closed, qf.logpdf(z) - pf.logpdf(z))
# The diagonal case is the full one with diagonal factors.
np.testing.assert_allclose(float(klib.kl_full(mq_d, np.diag(np.exp(vq_d / 2)), mp_d, np.diag(np.exp(vp_d / 2)))),
                           per_dim.sum(), rtol=1e-5)

# %% [markdown]
# ## 5. Each term's role in a trained VAE
#
# A VAE on the 8×8 digits with k = 16 latent dimensions and the prior N(0, I) (trained here for
# `VAEKL_TUTORIAL_STEPS` steps, or loaded from `VAEKL_TUTORIAL_RUN`). Per latent dimension i,
# averaged over the test images, KLᵢ = ½ [σᵢ² + μᵢ² − 1 − log σᵢ²]:
#
# * a **collapsed** dimension ignores x: q(zᵢ|x) ≈ N(0, 1) for every x, so σᵢ² ≈ 1 (trace
#   term ≈ 1, log-det term ≈ 0), μᵢ ≈ 0 (Mahalanobis ≈ 0), and KLᵢ ≈ 0: it costs nothing and
#   carries nothing. Active units (Burda et al. 2016) count the dimensions with
#   Var_x E_q[zᵢ|x] > 0.01.
# * an **active** dimension pays for its information in two ways: the Mahalanobis term
#   E_x μᵢ² (the posterior means spread out to tell images apart) and the log-det term
#   −log σᵢ² (each posterior is sharper than the prior), less the trace term's shortfall σᵢ² < 1.

# %%
from vaekl import config as config_lib  # noqa: E402
from vaekl import data, runs, train  # noqa: E402
from vaekl.models import gaussian  # noqa: E402

if not RUN:
    c = config_lib.defaults()
    c.dataset, c.binarization = "digits", "dynamic"
    c.encoder_hidden = c.decoder_hidden = (64,)
    c.latent_dim, c.batch_size, c.learning_rate = 16, 100, 3e-3
    c.num_steps, c.log_every = STEPS, max(1, STEPS // 4)
    c.eval_every = c.checkpoint_every = STEPS
    c.num_eval_train, c.num_images = 200, 16
    RUN = os.path.join(OUT, "tutorial_kl_run")
    train.train_and_evaluate(c, RUN)  # resumes (here: finds it finished) if the run exists
run = runs.load(RUN, "latest")
ds = data.load(run.config.dataset, run.config.data_dir or None, test_fraction=run.config.test_fraction,
               seed=run.config.data_seed)
_, images = train.prepare(run.config, ds)
x = data.to_float(jnp.asarray(images["test"]))
q = run.model.encode(x)
p = run.model.prior_distribution()
t = gaussian.kl_terms(q, p, per_dim=True)
kl_i = np.asarray(gaussian.kl(q, p, per_dim=True), np.float64).mean(0)
trace_i, maha_i, logdet_i = (np.asarray(a, np.float64).mean(0) for a in (t.trace, t.mahalanobis, t.log_det_ratio))
np.testing.assert_allclose(0.5 * (trace_i + maha_i - 1 + logdet_i), kl_i, rtol=1e-3, atol=1e-5)
mu = np.asarray(q.mean, np.float64)
au_var = mu.var(0)
active = au_var > run.config.active_units_threshold
order = np.argsort(-kl_i)
print(f"step {run.step}: {int(active.sum())} of {len(kl_i)} dimensions active; KL {kl_i.sum():.3f} nats")
for i in order:
    print(f"  z{i}: KL {kl_i[i]:.3f} = ½(trace {trace_i[i]:.3f} + mahalanobis {maha_i[i]:.3f} − 1 "
          f"+ log-det {logdet_i[i]:.3f}); Var_x μ {au_var[i]:.4f} {'active' if active[i] else 'collapsed'}")
# The Mahalanobis term is E_x μᵢ², the activity statistic plus the squared mean of μᵢ.
np.testing.assert_allclose(maha_i, au_var + mu.mean(0) ** 2, rtol=1e-3, atol=1e-6)
# Monte Carlo check of the dataset's average KL from the model's own posteriors.
zs = np.asarray(q.sample(jax.random.key(0)), np.float64)
lr = (np.asarray(q.log_prob(jnp.asarray(zs, jnp.float32)), np.float64)
      - stats.multivariate_normal(np.zeros(len(kl_i)), np.eye(len(kl_i))).logpdf(zs))
mc_check("trained VAE, average over test images (one draw each)", kl_i.sum(), lr)

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(8, 3.5))
pos = np.arange(len(order))
w = 0.2
ax.bar(pos - 1.5 * w, kl_i[order], w, label="KLᵢ", color=["C0" if active[i] else "0.6" for i in order])
ax.bar(pos - 0.5 * w, 0.5 * (trace_i[order] - 1), w, label="½(trace − 1)", color="C1")
ax.bar(pos + 0.5 * w, 0.5 * maha_i[order], w, label="½ mahalanobis", color="C2")
ax.bar(pos + 1.5 * w, 0.5 * logdet_i[order], w, label="½ log-det ratio", color="C3")
ax.axhline(0, color="k", lw=0.6)
ax.set_xticks(pos, [f"z{i}\n{'active' if active[i] else 'collapsed'}" for i in order], fontsize=7)
ax.set_ylabel("nats (test average)")
ax.set_title(f"Per-dimension KL and its terms, digits VAE at step {run.step} (grey KL: collapsed)")
ax.legend(fontsize=7, ncol=4)
fig.tight_layout()
FIGURE = os.path.join(OUT, "tutorial_kl.png")
fig.savefig(FIGURE, dpi=100)
plt.close(fig)
print(f"figure: {FIGURE}")
