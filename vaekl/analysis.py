"""Sweep analysis: load run directories into pandas and draw the standard figures.

Every figure function takes the DataFrame of :func:`load_sweep` and returns a matplotlib
Figure; amounts are nats per example.
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import pandas as pd

TERMS = ("kl_trace", "kl_mahalanobis", "kl_log_det_ratio", "kl_dim")


def load_run(run_dir: str) -> pd.DataFrame:
    """One run's metrics.jsonl, with its config fields as extra columns and a `run` column."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    df = pd.read_json(os.path.join(run_dir, "metrics.jsonl"), lines=True)
    for k, v in config.items():
        if k not in df.columns:
            df[k] = [tuple(v) if isinstance(v, list) else v] * len(df)
    df["run"] = os.path.basename(os.path.normpath(run_dir))
    return df


def load_sweep(sweep_dir: str) -> pd.DataFrame:
    """All runs under ``sweep_dir`` (directories with config.json and metrics.jsonl):
    one row per run, step and split."""
    runs = sorted(d for d in os.listdir(sweep_dir)
                  if os.path.exists(os.path.join(sweep_dir, d, "metrics.jsonl"))
                  and os.path.exists(os.path.join(sweep_dir, d, "config.json")))
    if not runs:
        raise FileNotFoundError(f"no runs (config.json + metrics.jsonl) under {sweep_dir}")
    frames = [load_run(os.path.join(sweep_dir, d)) for d in runs]
    return pd.concat([f for f in frames if len(f)], ignore_index=True)


def final(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The last logged row of each run for ``split``."""
    d = df[df.split == split]
    return d.loc[d.groupby("run").step.idxmax()].reset_index(drop=True)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Final test metrics averaged over seeds, per (β, k): mean and std of −ELBO."""
    f = final(df)
    g = f.groupby(["latent_dim", "beta"])
    out = g.agg(neg_elbo=("neg_elbo", "mean"), neg_elbo_std=("neg_elbo", "std"),
                recon=("recon", "mean"), kl=("kl", "mean"), active_units=("active_units", "mean"),
                seeds=("seed", "nunique"))
    return out.reset_index()


def rate_distortion(df: pd.DataFrame) -> plt.Figure:
    """KL (rate) against reconstruction (distortion), across β, one curve per k."""
    f = final(df).groupby(["latent_dim", "beta"])[["kl", "recon"]].mean().reset_index()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for k, d in f.groupby("latent_dim"):
        d = d.sort_values("beta")
        ax.plot(d.kl, d.recon, "o-", label=f"k = {k}")
        for _, r in d.iterrows():
            ax.annotate(f"β={r.beta:g}", (r.kl, r.recon), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("rate: KL(q(z|x) ‖ p(z)) [nats]")
    ax.set_ylabel("distortion: −E log p(x|z) [nats]")
    ax.set_title("Rate–distortion plane (test)")
    ax.legend()
    fig.tight_layout()
    return fig


def _heat(ax, table: pd.DataFrame, fmt: str, cmap: str = "viridis"):
    im = ax.imshow(table.values, cmap=cmap, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [f"{c:g}" for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(table.values):
        if np.isfinite(v):
            ax.text(j, i, format(v, fmt), ha="center", va="center", color="w", fontsize=8)
    return im


def active_units_heatmap(df: pd.DataFrame) -> plt.Figure:
    """Active units (test, mean over seeds) for each β (columns) and k (rows)."""
    table = final(df).pivot_table(index="latent_dim", columns="beta", values="active_units", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * table.shape[1], 1.2 + 0.6 * table.shape[0]))
    fig.colorbar(_heat(ax, table, ".1f"), ax=ax, label="active units")
    ax.set_xlabel("β")
    ax.set_ylabel("latent dimension k")
    ax.set_title("Active units (Cov_x E_q[z_u] > 0.01)")
    fig.tight_layout()
    return fig


def kl_per_dim_heatmap(df: pd.DataFrame) -> plt.Figure:
    """Each run's final test KL per latent dimension, sorted descending (collapsed dims ≈ 0)."""
    f = final(df).sort_values(["latent_dim", "beta", "seed"])
    k_max = int(f.latent_dim.max())
    grid = np.full((len(f), k_max), np.nan)
    for i, v in enumerate(f.kl_per_dim):
        grid[i, : len(v)] = np.sort(v)[::-1]
    fig, ax = plt.subplots(figsize=(2.5 + 0.25 * k_max, 1.0 + 0.28 * len(f)))
    im = ax.imshow(np.log10(np.maximum(grid, 1e-4)), aspect="auto", cmap="magma", vmin=-4)
    ax.set_yticks(range(len(f)), f.run, fontsize=7)
    ax.set_xlabel("latent dimension (sorted by KL)")
    fig.colorbar(im, ax=ax, label="log10 KL per dimension [nats]")
    ax.set_title("KL per latent dimension (test)")
    fig.tight_layout()
    return fig


def kl_terms_over_training(df: pd.DataFrame, runs: list[str]) -> plt.Figure:
    """½·trace, ½·Mahalanobis, ½·log-det ratio, −½·k and the KL over training, per run (test)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False, sharey=False)
    for ax, run in zip(axes[0], runs):
        d = df[(df.run == run) & (df.split == "test")].sort_values("step")
        ax.plot(d.step, 0.5 * d.kl_trace, label="½ tr(Σp⁻¹Σq)")
        ax.plot(d.step, 0.5 * d.kl_mahalanobis, label="½ Mahalanobis")
        ax.plot(d.step, 0.5 * d.kl_log_det_ratio, label="½ log|Σp|/|Σq|")
        ax.plot(d.step, -0.5 * d.kl_dim, ":", label="−½ k")
        ax.plot(d.step, d.kl, "k-", lw=2, label="KL")
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("nats")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def elbo_vs_beta(df: pd.DataFrame) -> plt.Figure:
    """Test −ELBO against β, one line per k, error bars over seeds (std)."""
    s = summary(df)
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for k, d in s.groupby("latent_dim"):
        ax.errorbar(d.beta, d.neg_elbo, yerr=d.neg_elbo_std.fillna(0), fmt="o-", capsize=3, label=f"k = {k}")
    ax.set_xscale("log")
    ax.set_xlabel("β")
    ax.set_ylabel("test −ELBO [nats]")
    ax.set_title("Test −ELBO (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    return fig
