r"""The sweep report: a sweep directory (or one run directory) → report.html, figures/*.png,
summary.csv (seed means per configuration) and runs.csv (every run); ``write_report`` is what
``python -m experiments.report --workdir=DIR`` calls.

Runs are grouped by every config field that differs between them; seeds are the only axis
averaged. The report opens with provenance (dataset, steps, model, objective, the vaekl commit
and the command, from meta.json when the runs have one), then the tables, training curves,
the standard figures, one section per varying field, and every run's reconstructions. On data
with ground-truth factors (dSprites) it adds each disentanglement score against the strength,
the disentanglement metrics along training where the runs have a disentanglement.jsonl
(median over seeds with the min–max band; the curves also in disentanglement_curves.csv),
and latent traversals and the latent–factor mutual information of a few runs (--factor_runs).
"""

from __future__ import annotations

import html
import math
import os
import re
from urllib.parse import quote

import matplotlib.pyplot as plt
import pandas as pd

from vaekl import analysis, regularizers
from vaekl.models import architectures
from vaekl import runs as runs_lib


MODEL_FIELDS = ("model", "posterior", "prior", "likelihood", "likelihood_sigma", "latent_dim")  # + the architecture's
OPTIMIZER_FIELDS = ("batch_size", "learning_rate", "lr_schedule", "num_steps")
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1360px;margin:1em auto;
     padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;word-break:break-all} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
h3{margin-bottom:.2em}
table{border-collapse:collapse;font-size:13px;margin:.4em 0}
th,td{border:1px solid #d0d0d0;padding:2px 7px;text-align:right;white-space:nowrap}
th{background:#f2f2f2;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}
table.kv td{text-align:left;white-space:normal} table.kv td:first-child{font-weight:600;width:11em}
.scroll{overflow-x:auto;max-height:34em;overflow-y:auto}
img.fig{max-width:100%;display:block;margin:.3em 0}
p.cap{color:#555;font-size:13px;margin:.2em 0 .8em}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{border:1px solid #ddd;padding:4px;border-radius:4px;font-size:12px}
.card .imgs{display:flex;gap:4px;align-items:flex-start} .card img{height:200px;width:auto;image-rendering:pixelated}
.card .lbl{max-width:310px;overflow-wrap:anywhere;margin-bottom:2px}
code{background:#f4f4f4;padding:0 3px;word-break:break-all}
nav a{margin-right:1em}
"""


# ----------------------------------------------------------------------------------------
# Formatting.


def _num(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–" if v is None or math.isnan(v) else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(mean, err, digits: int = 2) -> str:
    """``12.34 ± 0.56`` (just the mean when err is missing)."""
    if mean is None or pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None and pd.notna(err) else "")


def _table(rows: list[dict], cls: str = "") -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '–')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<div class='scroll'><table class='{cls}'><tr>{head}</tr>{body}</table></div>"


def _kv(pairs: list[tuple[str, str]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                                          for k, v in pairs) + "</table>"


def _col(field: str) -> str:
    return analysis.SHORT.get(field, field)


# ----------------------------------------------------------------------------------------
# Sections.


def _constant_and_varying(table: pd.DataFrame, fields: list[str]) -> tuple[dict, dict]:
    varying = {f: analysis.distinct_values(table[f])
               for f in fields + ([analysis.SEED] if analysis.SEED in table.columns else [])}
    constant = {f: table[f].iloc[0] for f in table.columns if f not in varying}
    return constant, varying


def _describe(names: tuple[str, ...] | list[str], constant: dict, varying: dict) -> str:
    parts = []
    for f in names:
        if f in varying:
            parts.append(f"{f} = <b>varies</b> ({html.escape(', '.join(analysis.fmt_value(v) for v in varying[f]))})")
        elif f in constant and constant[f] not in ("", None):
            parts.append(f"{f} = {html.escape(analysis.fmt_value(constant[f]))}")
    return "; ".join(parts) or "unknown"


def _meta_value(metas: dict, key: str) -> str:
    values = sorted({str(m[key]) for m in metas.values() if m.get(key) not in (None, "")})
    if not values:
        return "unknown"
    missing = sum(1 for m in metas.values() if m.get(key) in (None, ""))
    shown = "<br>".join(f"<code>{html.escape(v)}</code>" for v in values[:4])
    more = f" (+{len(values) - 4} more)" if len(values) > 4 else ""
    return shown + more + (f" ({missing} run(s) without meta.json: unknown)" if missing else "")


def _regularizer_fields(name: str, columns: list[str]) -> list[str]:
    """The config fields regularizer ``name`` reads (vaekl.regularizers' registry); β and its
    schedule for a name the registry does not know (a user module not imported)."""
    reg = regularizers.REGISTRY.get(name)
    fields = [f for f in reg.fields if f in columns] if reg is not None else []
    return fields or ["beta", "beta_schedule"]


def _model_fields(constant: dict, varying: dict) -> list[str]:
    """MODEL_FIELDS with the fields of the sweep's architectures (vaekl.models.architectures)
    after ``model``, less σ of Bernoulli-only sweeps."""
    models = varying.get("model") or [constant.get("model", "mlp")]
    arch = [f for m in models if m in architectures.REGISTRY for f in architectures.REGISTRY[m].fields]
    gauss = "likelihood" in varying or str(constant.get("likelihood", "")).startswith("gaussian")
    fields = ["model", *dict.fromkeys(arch), *MODEL_FIELDS[1:]]
    return [f for f in fields if gauss or f != "likelihood_sigma"]


def provenance(df: pd.DataFrame, path: str) -> str:
    """What the report shows: data, steps, model, objective, code version and command."""
    table = analysis.run_table(df)
    fields = analysis.varying_fields(df)
    constant, varying = _constant_and_varying(table, fields)
    last = df[df.split == "test"].groupby("run").step.max()
    steps = f"{_describe(['num_steps'], constant, varying)}"
    if len(last):
        steps += f"; last test evaluation at step {int(last.min())}" + (
            f"–{int(last.max())}" if last.min() != last.max() else "")
    if "num_steps" in table.columns:
        target = pd.to_numeric(table.num_steps, errors="coerce").reindex(last.index)
        unfinished = int((last < target).sum())
        if unfinished:
            steps += f"; <b>{unfinished} run(s) unfinished</b> (last evaluation before num_steps)"
    regs = varying.get("regularizer") or [constant.get("regularizer", "kl")]
    reg_fields = ["regularizer"] + [f for r in regs for f in _regularizer_fields(str(r), list(table.columns))]
    reg_fields = list(dict.fromkeys(reg_fields))
    if "regularizer" not in table.columns:  # runs from before the regularizer field
        reg_fields += [f for f in ("free_bits", "capacity_max") if constant.get(f) or f in varying]
    metas = df.attrs.get("meta") or {}
    metas = {r: metas.get(r, {}) for r in table.index}
    n_seeds = len(varying.get(analysis.SEED, [])) or 1
    pairs = [
        ("directory", f"<code>{html.escape(os.path.abspath(path))}</code>"),
        ("runs", f"{len(table)} ({len(analysis.summary(df))} configuration(s) × up to {n_seeds} seed(s))"),
        ("dataset", _describe(["dataset", "data_dir", "binarization", "test_fraction"], constant, varying)),
        ("image shape", _meta_value(metas, "image_shape")),
        ("steps", steps),
        ("model", _describe(_model_fields(constant, varying), constant, varying)),
        ("objective", _describe(reg_fields, constant, varying)),
        ("optimizer", _describe(OPTIMIZER_FIELDS, constant, varying)),
        ("varying fields", ", ".join(f"<b>{html.escape(f)}</b>" for f in fields) or "none (one configuration)"),
        ("vaekl commit", _meta_value(metas, "vaekl_commit")),
        ("command", _meta_value(metas, "command")),
    ]
    rest = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(analysis.fmt_value(v))}</td></tr>"
                   for k, v in sorted(constant.items()))
    return (_kv(pairs) + "<details><summary>every config field that is the same in all runs</summary>"
            f"<table class='kv'>{rest}</table></details>")


def mi_header(name: str, num_test) -> str:
    """The header of an MI column: the plug-in MI over N test examples is at most log N (it
    saturates there when every code is told apart), so the bound is stated with it."""
    n = pd.to_numeric(pd.Series(num_test, dtype=object), errors="coerce").dropna().unique()
    if len(n) == 1 and n[0] > 0:
        return f"{name} (≤ log N = {math.log(n[0]):.2f})"
    return f"{name} (≤ log N)"


def _mi_value(mean: float, se, n) -> str:
    """MI ± se, marked "= log N" where it is within 0.01 nats of its bound."""
    text = _pm(mean, se)
    if n is not None and pd.notna(n) and n > 0 and mean >= math.log(n) - 0.01:
        text += " (= log N)"
    return text


def summary_rows(df: pd.DataFrame) -> list[dict]:
    """The seed-mean table, formatted: eval.json's Monte-Carlo terms with the standard error
    of their mean (a negative TC estimate is then seen to be noise around 0), MI with its
    bound log N."""
    fields = analysis.varying_fields(df)
    summary = analysis.summary(df)
    mi = mi_header("MI", summary.get("eval_num_test"))
    rows = []
    for _, r in summary.iterrows():
        row = {_col(f): analysis.fmt_value(r[f]) for f in fields}
        row["seeds"] = int(r.seeds)
        row["test −ELBO (± std)"] = _pm(r.get("neg_elbo"), r.get("neg_elbo_std"))
        for key, name in (("recon", "distortion"), ("kl", "KL"), ("active_units", "active units"),
                          ("train_neg_elbo", "train −ELBO"), ("gap", "test − train"),
                          ("eval_nll", "NLL"), ("eval_mutual_info", mi),
                          ("eval_total_correlation", "TC of q(z) (± se)"), ("eval_dimwise_kl", "dimwise KL")):
            if key not in r or pd.isna(r[key]):
                continue
            se = r.get(key + "_se")
            if key == "eval_mutual_info":
                row[name] = _mi_value(float(r[key]), se, r.get("eval_num_test"))
            elif key.startswith("eval_") and key != "eval_nll" and se is not None and pd.notna(se):
                row[name] = _pm(float(r[key]), se)
            else:
                row[name] = _num(float(r[key]), 1 if key == "active_units" else 2)
        rows.append(row)
    return rows


def unfinished_runs(df: pd.DataFrame) -> dict[str, str]:
    """{run: "stopped at step s of N"} for the runs whose last test evaluation comes before
    their num_steps (failed, killed or still training): their last numbers are no final
    result."""
    table = analysis.run_table(df)
    if "num_steps" not in table.columns:
        return {}
    target = pd.to_numeric(table.num_steps, errors="coerce")
    last = df[df.split == "test"].groupby("run").step.max()
    out = {}
    for run in table.index:
        step = last.get(run)
        if pd.notna(target.get(run)) and (step is None or pd.isna(step) or step < target[run]):
            shown = "–" if step is None or pd.isna(step) else int(step)
            out[run] = f"stopped at step {shown} of {int(target[run])}"
    return out


def finished_only(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without :func:`unfinished_runs` (all of it if no run finished), attrs kept."""
    unfinished = unfinished_runs(df)
    kept = df[~df.run.isin(list(unfinished))]
    if not len(kept):
        return df
    kept = kept.copy()
    kept.attrs = {k: ({r: v for r, v in d.items() if r not in unfinished} if isinstance(d, dict) else d)
                  for k, d in df.attrs.items()}
    return kept


def _log_mi_bound_n(df: pd.DataFrame, runs: pd.DataFrame, run: str) -> int | None:
    """N of the bound log N on the logged (batch) MI of ``run``: its training-set size
    (meta.json), the minibatch-stratified estimator's self-weight being 1/N; None if unknown
    or under ``tc_estimator=mws`` (whose bound is log N·M)."""
    r = runs[runs.run == run].iloc[0]
    if str(r.get("tc_estimator", "mss")) == "mws":
        return None
    n = ((df.attrs.get("meta") or {}).get(run) or {}).get("train_size")
    return int(n) if isinstance(n, (int, float)) and n > 0 else None


# eval.json's disentanglement keys shown under a clearer name (the file keeps its keys).
DIS_LABELS = {"gaussian_total_correlation_score.gaussian_total_correlation":
              "Gaussian TC of the means (not of q(z))"}


def run_rows(df: pd.DataFrame) -> list[dict]:
    """Every run's last numbers, formatted, with its status ("done", or "stopped at step s of
    N" for a run that failed or is unfinished); eval.json's when present."""
    fields = analysis.varying_fields(df)
    runs = analysis.per_run(df)
    unfinished = unfinished_runs(df)
    seed = [analysis.SEED] if analysis.SEED in runs.columns else []
    num_test = runs.get(analysis.EVAL_PREFIX + "num_test")
    mi_cols = [mi_header(name, num_test) for name in ("MI (eval)", "index-code MI (eval)")]
    train_n = {run: _log_mi_bound_n(df, runs, run) for run in runs.run}
    mi_log = mi_header("MI (log)", list(train_n.values()) if None not in train_n.values() else [])
    rows = []
    for _, r in runs.iterrows():
        row = {_col(f): analysis.fmt_value(r[f]) for f in fields + seed} if fields or seed else {"run": r.run}
        row["status"] = unfinished.get(r.run, "done")
        row["step"] = _num(r.get("step") if pd.notna(r.get("step")) else None)
        if row["step"] != "–":
            row["step"] = str(int(float(row["step"])))
        for key, name in (("train_neg_elbo", "train −ELBO"), ("neg_elbo", "test −ELBO"), ("gap", "gap"),
                          ("recon", "distortion"), ("kl", "KL"), ("index_code_mi", mi_log),
                          ("total_correlation", "TC (log)"), ("dimwise_kl", "dimwise (log)")):
            if key in r and pd.notna(r[key]):
                row[name] = (_mi_value(float(r[key]), None, train_n[r.run]) if key == "index_code_mi"
                             else _num(float(r[key])))
        if pd.notna(r.get("active_units")):
            k = r.get("latent_dim")
            row["active units"] = f"{int(r.active_units)}" + (f" / {int(k)}" if pd.notna(k) else "")
        n = r.get(analysis.EVAL_PREFIX + "num_test")
        for key, name in (("nll", "NLL"), ("neg_elbo", "−ELBO (eval)"), ("kl", "KL (eval)"),
                          ("mutual_info", mi_cols[0]), ("index_code_mi", mi_cols[1]),
                          ("total_correlation", "TC of q(z) (eval)"), ("dimwise_kl", "dimwise KL (eval)"),
                          ("marginal_kl", "marginal KL (eval)")):
            mean = r.get(analysis.EVAL_PREFIX + key)
            if mean is not None and pd.notna(mean):
                se = r.get(analysis.EVAL_PREFIX + key + "_se")
                row[name] = (_mi_value(float(mean), se, n) if key in ("mutual_info", "index_code_mi")
                             else _pm(float(mean), se))
        for c in runs.columns:
            if c.startswith(analysis.DIS_PREFIX) and pd.notna(r[c]):
                key = c[len(analysis.DIS_PREFIX):]
                row[DIS_LABELS.get(key, key)] = _num(float(r[c]), 3)
        rows.append(row)
    return rows


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _relative(target: str, start: str) -> str:
    return quote(os.path.relpath(target, start).replace(os.sep, "/"), safe="/=,()-._~;")


def images_section(df: pd.DataFrame, out_dir: str) -> str:
    """Every run's reconstructions and samples, as labelled cards."""
    dirs = df.attrs.get("dirs") or {}
    table = analysis.run_table(df)
    runs = analysis.per_run(df)
    fields = analysis.varying_fields(df) + ([analysis.SEED] if analysis.SEED in table.columns else [])
    cards = []
    for run in runs.run:
        run_dir = dirs.get(run, os.path.join(out_dir, run))
        imgs = "".join(f"<img src='{html.escape(_relative(os.path.join(run_dir, f'{name}.png'), out_dir))}' "
                       f"title='{name}' alt='{name}'>"
                       for name in ("reconstructions", "samples")
                       if os.path.exists(os.path.join(run_dir, f"{name}.png")))
        if imgs:
            text = analysis.label(fields, [table.loc[run, f] for f in fields]) if fields else run
            cards.append(f"<div class='card'><div class='lbl' title='{html.escape(run)}'>"
                         f"{html.escape(text)}</div><div class='imgs'>{imgs}</div></div>")
    if not cards:
        return "<p>(no reconstructions.png or samples.png in the runs)</p>"
    return ("<p class='cap'>Left: test images (odd rows) above their reconstructions (even rows); "
            "right: samples from the prior.</p><div class='cards'>" + "".join(cards) + "</div>")


# ----------------------------------------------------------------------------------------
# The report.


def _figures(df: pd.DataFrame, term_runs: int) -> list[tuple[str, str, plt.Figure, str]]:
    """(section, file name, figure, caption) in report order."""
    fields = analysis.varying_fields(df)
    x = analysis.x_field(df, fields)
    several = len(analysis.summary(df)) > 1
    train_batch = (df.split == "train_batch").any()
    out = [("Training curves", "training_curves", analysis.training_curves(df),
            ("Solid: means over training batches (the trainer's train_batch rows)" if train_batch else
             "Solid: evaluations on training examples (these runs have no train_batch rows)")
            + "; dashed: test evaluations. Mean over seeds, band: lowest to highest seed.")]
    if several:
        others = [f for f in fields if f != x]
        by = f"one colour per {', '.join(others)}" if others else "one colour"
        out += [
            ("Rate–distortion", "rate_distortion", analysis.rate_distortion(df),
             f"Final test rate (KL) against distortion; marker shape: {x}, {by}. "
             "Large markers: seed means; dots: single seeds."),
            (f"Test −ELBO against {x}", f"elbo_vs_{_slug(x)}", analysis.elbo_vs_beta(df),
             f"Final test −ELBO against {x}, {by}; error bars: std over seeds, dots: single seeds."),
            ("Active units", "active_units", analysis.active_units_heatmap(df),
             f"Active units (mean over seeds): columns {x}"
             + (f", rows {', '.join(others)}." if others else ".")),
        ]
    out += [
        ("KL per latent dimension", "kl_per_dim", analysis.kl_per_dim_heatmap(df),
         "Every run's final test KL per latent dimension, sorted; dark cells are collapsed dimensions, "
         "blank cells dimensions a run does not have."),
        ("KL terms over training", "kl_terms", analysis.kl_terms_over_training(df, analysis.pick_runs(df, term_runs)),
         "The KL's terms over training (test split)" + (f", runs spread over {x}." if x else ".")),
    ]
    for f in fields:
        out.append((f"Effect of {f}", f"field_{_slug(f)}", analysis.field_figure(df, f),
                    f"Final metrics against {f}"
                    + (f", one colour per {', '.join(o for o in fields if o != f)}" if len(fields) > 1 else "")
                    + "; error bars: std over seeds."))
    return out


def factor_figures(df: pd.DataFrame, factor_runs: int = 2, num_points: int = 2000
                   ) -> tuple[list[tuple[str, str, plt.Figure, str]], list[str]]:
    """On data with ground-truth factors (:func:`analysis.has_factors`): every disentanglement
    score against the strength, and for ``factor_runs`` runs spread over it, latent traversals
    and the latent–factor mutual information. Returns the figures as :func:`_figures` does,
    and notes on runs that could not be loaded."""
    if not analysis.has_factors(df):
        return [], []
    out, notes = [], []
    scores = analysis.score_columns(df)
    if scores:
        out.append(("Disentanglement against strength", "disentanglement_vs_strength",
                    analysis.metric_vs_strength(df, scores),
                    "Each disentanglement score of eval.json against the regularization strength "
                    "(a panel column per regularizer): every seed a point, the line the median over seeds "
                    "(Locatello et al. 2019's style)."))
    curves = analysis.disentanglement_curves(df)
    if len(curves):
        out.append(("Disentanglement along training", "disentanglement_along_training",
                    analysis.disentanglement_along_training(df),
                    "MIG, FactorVAE score and DCI disentanglement of the posterior means against the "
                    "training step (disentanglement.jsonl, config.metric_every), a column per regularizer "
                    "and a colour per configuration: the line is the median over seeds, the band runs from "
                    "the lowest to the highest seed. Sample sizes: " + analysis.along_sample_sizes(df) + "."))
    dirs = df.attrs.get("dirs") or {}
    table = analysis.run_table(df)
    fields = analysis.varying_fields(df) + ([analysis.SEED] if analysis.SEED in table.columns else [])
    dataset = None
    for run in analysis.pick_runs(df, factor_runs) if factor_runs > 0 else []:
        text = analysis.label(fields, [table.loc[run, f] for f in fields]) if fields else run
        try:
            loaded = runs_lib.load(dirs.get(run, run), "latest")
            dataset = dataset if dataset is not None else analysis.run_dataset(loaded.config)
            trav = analysis.latent_traversals(loaded, dataset=dataset)
            mi = analysis.factor_mi_matrix(loaded, num_points=num_points, dataset=dataset)
        except Exception as e:  # pylint: disable=broad-except  # a report never fails on one run
            notes.append(f"{run}: no traversals or MI matrix ({type(e).__name__}: {e})")
            continue
        out += [(f"Latent traversals: {text}", f"traversals_{_slug(run)}", trav,
                 f"Latest checkpoint (step {loaded.step}). For 3 test images (first column: the image and its "
                 "reconstruction), each latent dimension set to 9 values from −2 to +2 prior standard deviations "
                 "around the prior mean, the others at the image's posterior mean. Rows: dimensions by their "
                 "KL (eval.json, else the last test evaluation); red: collapsed (KL < 0.01 nats or an inactive "
                 "unit)."),
                (f"Latent–factor mutual information: {text}", f"factor_mi_{_slug(run)}", mi,
                 f"I(posterior mean z_j; factor v_k) from {num_points:,} uniformly sampled factor combinations "
                 "(20-bin histogram of each code, disentanglement_lib's estimator), as a fraction of H(v_k) "
                 "and in nats; rows as in the traversals. A disentangled code has one bright cell per factor, "
                 "each in its own row.")]
    return out, notes


def write_report(sweep_dir: str, term_runs: int = 3, factor_runs: int = 2) -> str:
    """Writes report.html, figures/*.png, summary.csv and runs.csv into ``sweep_dir`` (a sweep
    or a single run directory) and returns the path of report.html. On data with ground-truth
    factors it adds :func:`factor_figures` for ``factor_runs`` runs."""
    everything = analysis.load_sweep(sweep_dir)
    unfinished = unfinished_runs(everything)
    df = finished_only(everything)  # final results: only of runs that reached num_steps
    fig_dir = os.path.join(sweep_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    summary = analysis.summary(df)
    summary.to_csv(os.path.join(sweep_dir, "summary.csv"), index=False)
    per_run = analysis.per_run(everything)
    per_run.insert(1, "status", [unfinished.get(r, "done") for r in per_run.run])
    per_run.to_csv(os.path.join(sweep_dir, "runs.csv"), index=False)
    curves = analysis.disentanglement_curves(df)
    if len(curves):
        curves.to_csv(os.path.join(sweep_dir, "disentanglement_curves.csv"), index=False)

    extra, factor_notes = factor_figures(df, factor_runs)
    figures = _figures(df, term_runs) + extra
    for _, name, fig, _ in figures:
        fig.savefig(os.path.join(fig_dir, f"{name}.png"), dpi=110)
        plt.close(fig)

    fields = analysis.varying_fields(df)
    left_out = (f"<p class='cap'><b>Left out, unfinished:</b> "
                f"{html.escape('; '.join(f'{r} ({why})' for r, why in unfinished.items()))}.</p>"
                if unfinished and df is not everything else "")
    sections = [("provenance", "Provenance", provenance(everything, sweep_dir)),
                ("summary", "Summary: mean over seeds per configuration",
                 "<p class='cap'>Final test metrics in nats per example; one row per combination of "
                 "the varying fields" + (f" ({', '.join(fields)})" if fields else "") +
                 "; only seeds are averaged. Also in summary.csv.</p>" + left_out + _table(summary_rows(df))),
                ("runs", "Every run",
                 "<p class='cap'>At the last evaluation (step): train and test −ELBO, the gap "
                 "(test − train), distortion, KL, the KL split into index-code MI / total correlation / "
                 "dimension-wise KL as logged in metrics.jsonl (log) where the trainer logs them (the "
                 "batch MI is at most log N for N training images, and reads '= log N' where it "
                 "saturates), and "
                 "active units / k. From eval.json where the run has one: the importance-weighted NLL "
                 "(± standard error), the evaluation's −ELBO, KL and its split (eval; Monte-Carlo "
                 "estimates ± standard error: the MI is at most log N for N test examples and reads "
                 "'= log N' where it saturates; the TC of the aggregate posterior q(z) is ≥ 0, so a "
                 "negative estimate is noise around 0), and "
                 "disentanglement scores; status: done, or where a run that failed or is unfinished "
                 "stopped (its numbers are not final). Also in runs.csv.</p>" + _table(run_rows(everything)))]
    for title, name, _, caption in figures:
        body = (f"<img class='fig' src='figures/{name}.png' alt='{html.escape(title)}'>"
                f"<p class='cap'>{html.escape(caption)}</p>")
        sections.append((_slug(name), title, body))
    if len(summary) <= 1:
        sections.append(("note", "Across-configuration figures",
                         "<p>Only one configuration (runs differ at most in their seed): the "
                         "rate–distortion, −ELBO and active-unit figures are left out.</p>"))
    if factor_notes:
        sections.append(("factor_notes", "Runs without traversals",
                         "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in factor_notes) + "</ul>"))
    sections.append(("images", "Reconstructions and samples", images_section(everything, sweep_dir)))

    nav = "<nav>" + "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t, _ in sections) + "</nav>"
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>vaekl report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>vaekl report: {html.escape(os.path.basename(os.path.abspath(sweep_dir)))}</h1>", nav]
    parts += [f"<h2 id='{a}'>{html.escape(t)}</h2>{body}" for a, t, body in sections]
    parts.append("</body></html>")
    path = os.path.join(sweep_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
