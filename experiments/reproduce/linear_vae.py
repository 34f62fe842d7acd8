r"""Linear VAE = probabilistic PCA (Lucas et al. 2019, "Don't Blame the ELBO!").

    python -m experiments.reproduce.linear_vae --workdir=runs/linear_vae

Theory. Decoder p(x|z) = N(Wz + μ, σ²I), encoder q(z|x) = N(Ax + c, diag(s²)), prior N(0, I).
The β-weighted objective E_q[−log p(x|z)] + β·KL equals β times the plain negative ELBO of
the same model with decoder noise σ'² = β·σ², up to a constant (divide by β: the
reconstruction term's 1/(2σ²) becomes 1/(2βσ²)). Its optimum is therefore probabilistic PCA
with the noise fixed at σ'² (Tipping & Bishop 1999; Lucas et al. 2019, who also show that the
diagonal encoder picks the axis-aligned rotation): with λ₁ ≥ λ₂ ≥ … the eigenvalues of the
data covariance, the i-th latent column is W_i = u_i √(λ_i − σ'²) when λ_i > σ'², else 0.
For such an active dimension the posterior is q(z_i|x) = N(u_iᵀ(x−μ)·√(λ_i−σ'²)/λ_i, σ'²/λ_i):
  posterior variance      s_i² = β σ² / λ_i,
  Var_x(E_q[z_i])         = (λ_i − σ'²)/λ_i = 1 − β σ² / λ_i,
  KL per dimension        ½(s_i² + Var_x(E z_i) − 1 − log s_i²) = ½ log(λ_i / (β σ²)) nats;
and a dimension collapses (W_i = 0, q = p, KL = 0) exactly when λ_i ≤ β σ². With k latent
dimensions, the k largest eigenvalues are the candidates.

The experiment: D = 10 dimensional data with a known spectrum, stored as uint8 like images
(the theory uses the covariance of the stored data, quantization included), a linear VAE
trained for each β and k in one vmapped program, and the learned per-dimension KLs,
active-unit variances and collapsed sets compared with the theory. Writes results.json and
linear_vae.png in --workdir.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from vaekl import config as config_lib
from vaekl import train
from vaekl.rundir import quiet_library_logs

SIGMA2 = 0.01 * 2.0 ** -3.5  # decoder noise σ²: each βσ² (β = ½, 1, 2, 4) falls between two λ_i
EIGENVALUES = 0.01 * 2.0 ** -np.arange(10.0)  # 1e-2 … 2e-5, a factor 2 apart

_WORKDIR = flags.DEFINE_string("workdir", "runs/linear_vae", "Output directory.")
_BETAS = flags.DEFINE_list("betas", ["0.5", "1", "2", "4"], "β values.")
_KS = flags.DEFINE_list("ks", ["3", "6", "10"], "Latent dimensions k.")
_STEPS = flags.DEFINE_integer("steps", 20000, "Training steps.")


def make_data(path: str, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Writes an .npz of uint8 [n, 1, 10] vectors 0.5 + U diag(√λ) ε (rotated by a random U);
    returns the eigenvalues of the stored data's covariance (x = u8 / 255), descending."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    splits = {}
    for name, m in (("train", n), ("test", n // 4)):
        x = 0.5 + (rng.standard_normal((m, 10)) * np.sqrt(EIGENVALUES)) @ u.T
        splits[name] = np.clip(np.round(x * 255), 0, 255).astype(np.uint8).reshape(m, 1, 10)
    np.savez(path, x_train=splits["train"], x_test=splits["test"])
    x = splits["train"].reshape(n, 10) / 255.0
    return np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]


def theory(eigenvalues: np.ndarray, beta: float, sigma2: float, k: int) -> dict:
    """Per-dimension predictions for the k largest eigenvalues (descending)."""
    lam = np.asarray(eigenvalues[:k])
    active = lam > beta * sigma2
    kl = np.where(active, 0.5 * np.log(np.maximum(lam, 1e-30) / (beta * sigma2)), 0.0)
    return {"kl_per_dim": kl, "active": active,
            "posterior_var": np.where(active, beta * sigma2 / lam, 1.0),
            "au_variance": np.where(active, 1 - beta * sigma2 / lam, 0.0)}


def config_for(data_path: str, beta: float, k: int, steps: int):
    c = config_lib.defaults()
    c.dataset, c.data_dir, c.binarization = "npz", data_path, "none"
    c.model, c.encoder_hidden, c.decoder_hidden = "mlp", (), ()
    c.likelihood, c.likelihood_sigma = "gaussian", float(np.sqrt(SIGMA2))
    c.latent_dim, c.beta = k, beta
    c.batch_size, c.learning_rate, c.lr_schedule = 500, 1e-2, "cosine"
    c.num_steps = steps
    c.eval_every = c.checkpoint_every = c.log_every = steps
    c.num_eval_train, c.eval_batch_size, c.num_images = 20000, 5000, 0
    return c


def run(workdir: str, betas: list[float], ks: list[int], steps: int) -> list[dict]:
    """Trains the grid (one vmapped program) and returns one comparison record per run."""
    os.makedirs(workdir, exist_ok=True)
    data_path = os.path.join(workdir, "data.npz")
    eig = make_data(data_path)
    points = [(b, k) for b in betas for k in ks]
    configs = [config_for(data_path, b, k, steps) for b, k in points]
    dirs = [os.path.join(workdir, f"beta={b:g},latent_dim={k}") for b, k in points]
    results = train.train_group(configs, dirs)
    records = []
    for (b, k), res in zip(points, results):
        if isinstance(res, Exception):
            raise res
        row = {r["split"]: r for r in res}["train"]
        order = np.argsort(row["kl_per_dim"])[::-1]
        th = theory(eig, b, SIGMA2, k)
        records.append({
            "beta": b, "latent_dim": k,
            "kl_per_dim": list(np.asarray(row["kl_per_dim"])[order]),
            "kl_per_dim_theory": list(th["kl_per_dim"]),
            "au_variance": list(np.asarray(row["au_variance"])[order]),
            "au_variance_theory": list(th["au_variance"]),
            "collapsed": int(np.sum(np.asarray(row["kl_per_dim"]) < 0.01)),
            "collapsed_theory": int(np.sum(~th["active"])),
            "kl": row["kl"], "kl_theory": float(th["kl_per_dim"].sum()),
        })
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"sigma2": SIGMA2, "eigenvalues": list(eig), "runs": records}, f, indent=2)
    plot(records, os.path.join(workdir, "linear_vae.png"))
    return records


def plot(records: list[dict], path: str) -> None:
    ks = sorted({r["latent_dim"] for r in records})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.5), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for r in (r for r in records if r["latent_dim"] == k):
            line, = ax.plot(range(1, k + 1), r["kl_per_dim_theory"], "-", alpha=0.6)
            ax.plot(range(1, k + 1), r["kl_per_dim"], "o", color=line.get_color(), label=f"β={r['beta']:g}")
        ax.set_title(f"k = {k}: learned (dots) vs theory (lines)")
        ax.set_xlabel("latent dimension (sorted)")
    axes[0][0].set_ylabel("KL per dimension [nats]")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    quiet_library_logs()
    records = run(_WORKDIR.value, [float(b) for b in _BETAS.value], [int(k) for k in _KS.value], _STEPS.value)
    for r in records:
        err = np.max(np.abs(np.asarray(r["kl_per_dim"]) - np.asarray(r["kl_per_dim_theory"])))
        print(f"β={r['beta']:<4g} k={r['latent_dim']:<3d} KL {r['kl']:.3f} (theory {r['kl_theory']:.3f}) "
              f"collapsed {r['collapsed']} (theory {r['collapsed_theory']})  max |ΔKL_i| {err:.3f}")


if __name__ == "__main__":
    app.run(main)
