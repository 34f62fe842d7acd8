r"""Turns a sweep directory into a report: report.html, figures/*.png and summary.csv.

    python -m experiments.report --workdir=runs/sweep
"""

from __future__ import annotations

import html
import os

from absl import app
from absl import flags

from vaekl import analysis

_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per run).")
_TERM_RUNS = flags.DEFINE_integer("term_runs", 3, "Runs shown in the KL-terms-over-training figure.")
flags.mark_flags_as_required(["workdir"])


def _pick_runs(df, n: int) -> list[str]:
    """Runs spread over β at the largest k (smallest, middle and largest β by default)."""
    f = analysis.final(df)
    at_k = f[f.latent_dim == f.latent_dim.max()].sort_values("beta")
    idx = sorted({int(round(i)) for i in [j * (len(at_k) - 1) / max(n - 1, 1) for j in range(n)]})
    return list(at_k.run.iloc[idx])


def write_report(sweep_dir: str, term_runs: int = 3) -> str:
    """Writes the report files and returns the path of report.html."""
    df = analysis.load_sweep(sweep_dir)
    fig_dir = os.path.join(sweep_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = {
        "rate_distortion": (analysis.rate_distortion(df), "Rate–distortion plane across β, one curve per k."),
        "active_units": (analysis.active_units_heatmap(df), "Active units for each β and k."),
        "kl_per_dim": (analysis.kl_per_dim_heatmap(df), "KL per latent dimension of every run, sorted: "
                       "dark cells are collapsed dimensions."),
        "kl_terms": (analysis.kl_terms_over_training(df, _pick_runs(df, term_runs)),
                     "The KL's terms over training (test split)."),
        "elbo_vs_beta": (analysis.elbo_vs_beta(df), "Test −ELBO against β and k, error bars over seeds."),
    }
    for name, (fig, _) in figures.items():
        fig.savefig(os.path.join(fig_dir, f"{name}.png"), dpi=110)
    summary = analysis.summary(df)
    summary.to_csv(os.path.join(sweep_dir, "summary.csv"), index=False)

    parts = [f"<html><head><meta charset='utf-8'><title>vaekl sweep report</title></head><body>",
             f"<h1>Sweep report: {html.escape(os.path.abspath(sweep_dir))}</h1>",
             f"<p>{df.run.nunique()} runs; final test metrics in nats per example.</p>",
             summary.to_html(index=False, float_format=lambda v: f"{v:.3f}")]
    for name, (_, caption) in figures.items():
        parts.append(f"<h2>{html.escape(caption)}</h2><img src='figures/{name}.png'>")
    parts.append("<h2>Reconstructions (odd rows: data, even rows: reconstruction) and samples</h2><table>")
    for run in sorted(df.run.unique()):
        cells = "".join(f"<td><img src='{html.escape(run)}/{img}.png' width='220'></td>"
                        for img in ("reconstructions", "samples")
                        if os.path.exists(os.path.join(sweep_dir, run, f"{img}.png")))
        parts.append(f"<tr><td>{html.escape(run)}</td>{cells}</tr>")
    parts.append("</table></body></html>")
    path = os.path.join(sweep_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    path = write_report(_WORKDIR.value, _TERM_RUNS.value)
    df = analysis.load_sweep(_WORKDIR.value)
    print(analysis.summary(df).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
