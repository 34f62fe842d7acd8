r"""Turns the reproduction runs into results.json files and figures, and the README table.

    python -m experiments.reproduce.summarize --runs=runs --out=docs/reproductions

Reads (each optional; missing ones are reported and left out):
  runs/iwae_vae/<run>/eval.json + config.json  IWAE Table 1, VAE row (a sweep over seeds)
  runs/linear_vae/results.json                 linear VAE vs pPCA theory
  runs/rate_distortion/                        β sweep on MNIST
  runs/collapse_mnist/, runs/collapse_fashion/ k sweeps at β = 1
  runs/locatello_cpu/<method>/<run>/           Locatello et al.'s study, CPU-sized (--locatello_runs)
  runs/{kl_estimators,priors,iwae_objective}/  issue 21's rows (experiments.reproduce.closed_vs_mc),
                                               and gradient_variance.json in each analytic run of
                                               runs/kl_estimators (experiments.gradient_variance)
and writes OUT/<name>.json and OUT/<name>.png for each, OUT/table.md, and the table into
README.md between the reproduction markers, so the README's numbers come from files.
A result whose runs are absent, or that --only leaves out, keeps its row from the existing
OUT/<name>.json; ``--only=locatello`` recomputes only the Locatello study.
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

from experiments.reproduce import closed_vs_mc, locatello_curves, locatello_summary
from vaekl import analysis, rundir
from vaekl import runs as runs_lib

_RUNS = flags.DEFINE_string("runs", "runs", "Directory holding the reproduction runs.")
_OUT = flags.DEFINE_string("out", "docs/reproductions", "Where results and figures go.")
_README = flags.DEFINE_string("readme", "README.md", "README to update ('' to skip).")
_ONLY = flags.DEFINE_list("only", [], "Results to recompute (iwae, linear, rd, collapse, terms, "
                          "locatello, locatello_slice, locatello_gpu, kl_estimators, priors, iwae_objective, gradient_variance); the others are read from OUT/<name>.json. Default: all.")
_LOCATELLO = flags.DEFINE_string("locatello_runs", None, "The Locatello study's runs "
                                 "(default: RUNS/locatello_cpu).")
_SLICE = flags.DEFINE_string("locatello_slice_runs", None, "The CPU slice's runs "
                             "(experiments/reproduce/locatello_slice_cpu.sh; default: RUNS/locatello_slice).")
SLICE_NAME = "locatello_slice_cpu"
GPU_SLICE_NAME = "locatello_beta_tc_vae_gpu"  # written by experiments.reproduce.gpu_results

START, END = "<!-- reproductions:start -->", "<!-- reproductions:end -->"
KL_START, KL_END = "<!-- locatello-kl:start -->", "<!-- locatello-kl:end -->"  # the study's KL-view paragraph


def wall_minutes(*run_dirs: str, end_file: str = rundir.SAMPLES) -> float:
    """Minutes from the first run's config.json to the last run's ``end_file`` (file times)."""
    starts = [os.path.getmtime(os.path.join(d, rundir.CONFIG)) for d in run_dirs]
    ends = [os.path.getmtime(os.path.join(d, end_file)) for d in run_dirs
            if os.path.exists(os.path.join(d, end_file))]
    return (max(ends) - min(starts)) / 60 if ends else float("nan")


def _sweep_runs(sweep: str) -> list[str]:
    return [r.path for r in runs_lib.find(sweep)]


def _save(out: str, name: str, result: dict, fig=None) -> None:
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    if fig is not None:
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=110)
        plt.close(fig)


def _eval_minutes_per_seed(run_dirs: list[str], evals: list[dict]) -> dict:
    """{"eval_minutes": per seed, "eval_minutes_source"}: the mean of eval.json's eval_seconds
    when every run has it, else the mean gap between successive eval.json file times (seeds
    evaluated one after another; the first run's start is not on file), else the time from the
    end of training to the last eval.json."""
    if all("eval_seconds" in e for e in evals):
        return {"eval_minutes": float(np.mean([e["eval_seconds"] for e in evals])) / 60,
                "eval_minutes_source": "eval.json eval_seconds"}
    ends = sorted(os.path.getmtime(os.path.join(d, rundir.EVAL)) for d in run_dirs)
    if len(ends) > 1:
        return {"eval_minutes": float(np.mean(np.diff(ends))) / 60,
                "eval_minutes_source": "gaps between successive eval.json file times"}
    return {"eval_minutes": wall_minutes(*run_dirs, end_file=rundir.EVAL) - wall_minutes(*run_dirs),
            "eval_minutes_source": "end of training to eval.json (file times)"}


def iwae(runs: str, out: str) -> dict | None:
    """The IWAE VAE row over seeds: RUNS/iwae_vae is a sweep (``--sweep='seed=0,1'``) whose
    runs each have an eval.json from ``experiments.evaluate`` (their validation-selected
    checkpoint, test NLL with K importance samples); mean (min–max) over seeds."""
    sweep = os.path.join(runs, "iwae_vae")
    if not os.path.isdir(sweep):
        return None
    run_dirs = sorted(d for d in _sweep_runs(sweep) if os.path.exists(os.path.join(d, rundir.EVAL)))
    if not run_dirs:
        return None
    evals = [runs_lib.Run(d).eval for d in run_dirs]
    cfgs = [runs_lib.Run(d).config_json for d in run_dirs]
    train_images = 24345 - cfgs[0].get("validation_size", 0)
    per_seed = [{"seed": c["seed"], "nll": e["nll"], "nll_se": e.get("nll_se"), "neg_elbo": e["neg_elbo"],
                 "active_units": e["active_units"], "step": e["step"]} for c, e in zip(cfgs, evals)]
    num_steps = cfgs[0]["num_steps"]
    epochs = num_steps * cfgs[0]["batch_size"] / train_images
    result = {"published_nll": 86.76, "published_active_units": 19, "K": evals[0]["num_samples"],
              "seeds": len(per_seed), "per_seed": per_seed,
              "nll": analysis.spread(p["nll"] for p in per_seed),
              "neg_elbo": analysis.spread(p["neg_elbo"] for p in per_seed),
              "active_units": analysis.spread(p["active_units"] for p in per_seed),
              "num_steps": num_steps, "epochs": epochs, "train_images": train_images,
              "validation_size": cfgs[0].get("validation_size", 0),
              "train_minutes": wall_minutes(*run_dirs), **_eval_minutes_per_seed(run_dirs, evals),
              "note": f"{epochs:.0f} of the paper's 3,280 epochs (its 8-stage schedule compressed), "
                      f"{train_images:,} training images instead of 60,000; active units on the test set"}
    _save(out, "iwae_vae", result)
    return result


def closed_vs_mc_row(runs: str, out: str, row: str) -> dict | None:
    """Issue 21's row ``row`` from RUNS/<row> (every run evaluated): closed_vs_mc's summary,
    its verdict, figure and the wall times (training from file times, evaluation per run)."""
    sweep = os.path.join(runs, row)
    if not os.path.isdir(sweep):
        return None
    result = closed_vs_mc.summarize(sweep, row)
    result["verdict"] = closed_vs_mc.verdict(result)
    run_dirs = _sweep_runs(sweep)
    result["train_minutes"] = wall_minutes(*run_dirs)
    result.update(_eval_minutes_per_seed(run_dirs, [runs_lib.Run(d).eval for d in run_dirs]))
    _save(out, f"closed_vs_mc_{row}", result, closed_vs_mc.figure(result))
    return result


def grad_variance(runs: str, out: str) -> dict | None:
    """The gradient-variance ratios over the seeds of RUNS/kl_estimators' analytic runs."""
    sweep = os.path.join(runs, "kl_estimators")
    if not os.path.isdir(sweep):
        return None
    paths = sorted(os.path.join(d, "gradient_variance.json") for d in _sweep_runs(sweep)
                   if "kl_estimator=analytic" in d and os.path.exists(os.path.join(d, "gradient_variance.json")))
    if not paths:
        return None
    result = closed_vs_mc.gradient_variance(paths)
    _save(out, "gradient_variance_mnist", result, closed_vs_mc.gradient_variance_figure(result))
    return result


def _minutes_per_seed(g: dict) -> str:
    s = g.get("seconds_per_run")
    return f"{s['mean'] / 60:.1f} min per seed" if s else "not recorded"


def _closed_vs_mc_rows(results: dict) -> list[str]:
    """The README rows of issue 21 (closed form vs Monte Carlo)."""
    rows = []
    titles = {"kl_estimators": ("Closed-form vs Monte Carlo KL (Kingma & Welling 2014; Roeder et al. 2017)",
                                "mnist_kl_estimators.py"),
              "priors": ("Priors without a closed form (Tomczak & Welling 2018)", "mnist_priors.py"),
              "iwae_objective": ("IWAE objective, k = 1, 5, 50 (Burda et al. 2016)", "mnist_iwae_objective.py")}
    for row, (title, config) in titles.items():
        r = results.get(row)
        if not r:
            continue
        cells = []
        for value, g in r["groups"].items():
            f = lambda m, d=2: (f"{g[m]['mean']:.{d}f} ({g[m]['min']:.{d}f}–{g[m]['max']:.{d}f})")  # noqa: E731
            cells.append(f"{r['field']}={value}: NLL {f('nll')}, −ELBO {f('neg_elbo')}, AU {f('active_units', 0)}, "
                         f"steps to −ELBO ≤ {r['target_neg_elbo']:.1f}: {f('steps_to_target', 0)}")
        v = r["verdict"]
        holds = {True: "yes", False: "no"}.get(v["holds"], "not resolved")
        rows.append(f"| {title} | {r['published']} | {'; '.join(cells)}. **Direction holds: {holds}** "
                    f"({v['detail']}) | "
                    f"`experiments/reproduce/{config}` + `experiments.evaluate` + `closed_vs_mc` | MNIST subset | "
                    f"{r['train_minutes']:.0f} min train + {r['eval_minutes']:.1f} min eval per run | "
                    f"{r['num_steps'][0]:,} steps; mean (min–max) over {min(len(g['seeds']) for g in r['groups'].values())}"
                    f" seeds; NLL with K = {r['num_samples'][0]} on the first {r['nll_num_test'][0]:,} test images "
                    f"(−ELBO and AU on all); closed_vs_mc_{row}.json/.png |")
    g = results.get("gradient_variance")
    if g:
        first, last = g["ratios"][0], g["ratios"][-1]
        rng = lambda e, grp, r: f"{r[e][grp]['mean']:.2f} ({r[e][grp]['min']:.2f}–{r[e][grp]['max']:.2f})"  # noqa: E731
        rows.append(f"| ELBO gradient variance by KL estimator (Kingma & Welling 2014; Roeder et al. 2017) | MC above "
                    f"analytic; STL → 0 as q → the true posterior | encoder-gradient variance / analytic's at step "
                    f"{first['step']:,} → {last['step']:,}: mc {rng('mc', 'encoder', first)} → {rng('mc', 'encoder', last)}, "
                    f"stl {rng('stl', 'encoder', first)} → {rng('stl', 'encoder', last)}; decoder: mc "
                    f"{rng('mc', 'decoder', last)} at the end. MC above analytic at every step and seed: "
                    f"{g['claims']['mc_encoder_variance_above_analytic_at_every_step_every_seed']}; STL below at the "
                    f"end: {g['claims']['stl_encoder_variance_below_analytic_at_the_last_step_every_seed']} | "
                    f"`experiments.gradient_variance` on the kl_estimators row's analytic runs | MNIST subset | "
                    f"{_minutes_per_seed(g)} | {len(g['runs'])} seeds, S = {g['num_draws']} draws, B = "
                    f"{g['batch_size']} test images, at each kept checkpoint; gradient_variance_mnist.json/.png |")
    return rows


def linear(runs: str, out: str) -> dict | None:
    """The linear-VAE run's summary (spread over seeds per (β, k); "clear" dimensions are those
    with λᵢ/βσ² ∉ (1, 2), see experiments.reproduce.linear_vae), its command and wall time."""
    path = os.path.join(runs, "linear_vae", "results.json")
    if not os.path.exists(path):
        return None
    res = json.load(open(path))
    if "summary" not in res:
        raise ValueError(f"{path} has no per-seed summary; re-run experiments.reproduce.linear_vae")
    keep = ("beta", "latent_dim", "seed", "kl", "kl_theory", "collapsed", "collapsed_theory", "max_abs_err",
            "max_abs_err_clear", "max_abs_err_au_variance")
    result = {**res["summary"], "settings": res["settings"], "command": res["command"],
              "minutes": res["wall_minutes"], "cpu_count": res.get("cpu_count"),
              "per_run": [{k: r[k] for k in keep} for r in res["runs"]]}
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.copy(os.path.join(runs, "linear_vae", "linear_vae.png"), os.path.join(out, "linear_vae.png"))
    _save(out, "linear_vae", result)
    return result


def rate_distortion(runs: str, out: str) -> dict | None:
    """Final test rate R = KL and distortion D = reconstruction NLL per β, for each seed.

    The claims checked, per seed: R falls and D rises with β, and the β = 1 run (the only one
    trained on the ELBO itself) has the lowest D + R = −ELBO, so every other β lies above the
    line D + R = −ELBO(β = 1). The latter is a statement about optimization, not true by
    construction: a badly trained β = 1 run would fail it.
    """
    sweep = os.path.join(runs, "rate_distortion")
    if not os.path.isdir(sweep):
        return None
    f = analysis.final(analysis.load_sweep(sweep)).sort_values(["seed", "beta"])
    seeds = sorted(int(s) for s in f.seed.unique())
    per_seed = {}
    for s in seeds:
        g = f[f.seed == s]
        rate, dist, beta = g.kl.to_numpy(), g.recon.to_numpy(), g.beta.to_numpy()
        elbo = rate + dist
        per_seed[s] = {"beta": beta.tolist(), "rate": rate.tolist(), "distortion": dist.tolist(),
                       "neg_elbo": elbo.tolist(), "rate_decreasing": bool(np.all(np.diff(rate) < 0)),
                       "distortion_increasing": bool(np.all(np.diff(dist) > 0)),
                       "beta1_lowest_neg_elbo": bool(np.isclose(beta[np.argmin(elbo)], 1.0)),
                       "beta1_neg_elbo": float(elbo[np.isclose(beta, 1.0)][0]) if np.isclose(beta, 1.0).any()
                       else float("nan")}
    betas = sorted(float(b) for b in f.beta.unique())
    by_beta = {b: f[np.isclose(f.beta, b)] for b in betas}
    result = {"seeds": seeds, "beta": betas,
              "rate": [analysis.spread(g.kl) for g in by_beta.values()],
              "distortion": [analysis.spread(g.recon) for g in by_beta.values()],
              "neg_elbo": [analysis.spread(g.kl + g.recon) for g in by_beta.values()],
              "beta1_neg_elbo": analysis.spread([p["beta1_neg_elbo"] for p in per_seed.values()]),
              "rate_decreasing": sum(p["rate_decreasing"] for p in per_seed.values()),
              "distortion_increasing": sum(p["distortion_increasing"] for p in per_seed.values()),
              "beta1_lowest_neg_elbo": sum(p["beta1_lowest_neg_elbo"] for p in per_seed.values()),
              "per_seed": per_seed, "minutes": wall_minutes(*_sweep_runs(sweep))}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for s, p in per_seed.items():
        ax.plot(p["rate"], p["distortion"], "o-", ms=4, label=f"seed {s}")
    for b, r, d in zip(betas, result["rate"], result["distortion"]):
        ax.annotate(f"β={b:g}", (r["mean"], d["mean"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    bound = result["beta1_neg_elbo"]["mean"]
    xs = np.linspace(0, max(r["max"] for r in result["rate"]) * 1.05, 50)
    ax.plot(xs, bound - xs, "k--", lw=1, label=f"D + R = {bound:.1f} (−ELBO at β = 1)")
    ax.set_xlabel("rate R = KL [nats]")
    ax.set_ylabel("distortion D = −E log p(x|z) [nats]")
    ax.set_title("β sweep on MNIST (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(out, "rate_distortion", result, fig)
    return result


INFORMATIVE_KL = 0.1  # nats: a latent dimension with a larger KL carries information


def _collapse_counts(rows) -> tuple[int, int]:
    """(active units, dimensions with KL > INFORMATIVE_KL) of one evaluation row."""
    return int(rows.active_units), int(np.sum(np.asarray(rows.kl_per_dim) > INFORMATIVE_KL))


def collapse(runs: str, out: str) -> dict | None:
    """Per dataset and k (over seeds): active units (Var_x E_q[z_u] > 0.01, Burda et al.) and
    the number of dimensions with KL > 0.1 nats, at the final test evaluation; and how much
    each count moved between the last two evaluations (whether the collapse has settled)."""
    found = {name: os.path.join(runs, f"collapse_{name}") for name in ("mnist", "fashion")}
    found = {k: v for k, v in found.items() if os.path.isdir(v)}
    if not found:
        return None
    result, fig, axes = {"informative_kl": INFORMATIVE_KL}, *plt.subplots(1, 2, figsize=(10, 4))
    for name, sweep in found.items():
        df = analysis.load_sweep(sweep)
        test = df[df.split == "test"].sort_values("step")
        ks = sorted(int(k) for k in test.latent_dim.unique())
        per_k, moved = [], []
        for k in ks:
            au, inf, kls, d_au, d_inf = [], [], [], [], []
            for _, g in test[test.latent_dim == k].groupby("run"):
                (a1, i1), (a0, i0) = _collapse_counts(g.iloc[-1]), _collapse_counts(g.iloc[max(len(g) - 2, 0)])
                au.append(a1)
                inf.append(i1)
                kls.append(float(g.iloc[-1].kl))
                d_au.append(a1 - a0)
                d_inf.append(i1 - i0)
                moved.append(max(abs(a1 - a0), abs(i1 - i0)))
            per_k.append({"latent_dim": k, "active_units": analysis.spread(au), "informative_dims": analysis.spread(inf),
                          "kl": analysis.spread(kls), "seeds": len(au),
                          "active_units_change_last_eval": d_au, "informative_dims_change_last_eval": d_inf})
        steps = sorted(test.step.unique())
        result[name] = {"minutes": wall_minutes(*_sweep_runs(sweep)), "per_k": per_k,
                        "final_step": int(steps[-1]), "previous_step": int(steps[max(len(steps) - 2, 0)]),
                        "max_count_change_last_eval": int(max(moved))}
        for key, ax in (("active_units", axes[0]), ("informative_dims", axes[1])):
            mean = np.array([p[key]["mean"] for p in per_k])
            lo, hi = mean - [p[key]["min"] for p in per_k], [p[key]["max"] for p in per_k] - mean
            ax.errorbar(ks, mean, yerr=[lo, hi], fmt="o-", capsize=3, label=name)
    for ax, title in ((axes[0], "active units (Var E[z] > 0.01)"), (axes[1], f"dims with KL > {INFORMATIVE_KL} nats")):
        ax.plot([8, 128], [8, 128], "k:", lw=1)
        ax.set(xscale="log", xlabel="latent dimension k", title=f"{title} vs k (β = 1)")
        ax.legend()
    fig.tight_layout()
    _save(out, "collapse_vs_k", result, fig)
    return result


def kl_terms(runs: str, out: str) -> dict | None:
    """Per-dimension terms over training for the collapse sweep's k = 64 run on MNIST."""
    sweep = os.path.join(runs, "collapse_mnist")
    if not os.path.isdir(sweep):
        return None
    df = analysis.load_sweep(sweep)
    k = 64 if (df.latent_dim == 64).any() else int(df.latent_dim.max())
    d = df[(df.latent_dim == k) & (df.split == "test") & (df.seed == df.seed.min())].sort_values("step")
    last = d.iloc[-1]
    kl = np.asarray(last.kl_per_dim)
    active, collapsed = int(np.argmax(kl)), int(np.argmin(kl))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    result = {"run": last.run}
    for ax, dim, label in ((axes[0], active, "active"), (axes[1], collapsed, "collapsed")):
        tr = np.array([r[dim] for r in d.kl_trace_per_dim])
        ma = np.array([r[dim] for r in d.kl_mahalanobis_per_dim])
        ld = np.array([r[dim] for r in d.kl_log_det_ratio_per_dim])
        ax.plot(d.step, 0.5 * (tr - 1), label="½(σ² − 1)  [trace − 1]")
        ax.plot(d.step, 0.5 * ma, label="½ μ²  [Mahalanobis]")
        ax.plot(d.step, 0.5 * ld, label="−½ log σ²  [log-det]")
        ax.plot(d.step, [r[dim] for r in d.kl_per_dim], "k", lw=2, label="KL of the dimension")
        ax.set_title(f"{label} dimension {dim} of {last.run} (test)", fontsize=9)
        ax.set_xlabel("step")
        result[label] = {"dim": dim, "kl": float(kl[dim]), "half_trace_minus_1": float(0.5 * (tr[-1] - 1)),
                         "half_mahalanobis": float(0.5 * ma[-1]), "half_log_det": float(0.5 * ld[-1])}
    axes[0].set_ylabel("nats")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    a = result["active"]
    result["active_log_det_dominates"] = bool(a["half_log_det"] > max(a["half_trace_minus_1"], 0)
                                               and a["half_log_det"] > a["half_mahalanobis"] / 2)
    c = result["collapsed"]
    result["collapsed_terms_cancel"] = bool(abs(c["half_trace_minus_1"]) < 0.02 and abs(c["half_log_det"]) < 0.02
                                            and c["half_mahalanobis"] < 0.02)
    _save(out, "kl_terms", result, fig)
    return result


def table(results: dict) -> str:
    rows = ["| reproduction | published | ours | command | data | time (2 CPU cores) | notes |",
            "|---|---|---|---|---|---|---|"]
    if results.get("iwae"):
        r = results["iwae"]
        if isinstance(r["nll"], dict):
            nll, elbo, au = r["nll"], r["neg_elbo"], r["active_units"]
            ours = (f"NLL {nll['mean']:.2f} ({nll['min']:.2f}–{nll['max']:.2f}) (K={r['K']}), −ELBO "
                    f"{elbo['mean']:.2f} ({elbo['min']:.2f}–{elbo['max']:.2f}), AU {au['mean']:g} "
                    f"({au['min']:g}–{au['max']:g})")
            selection = (f"mean (min–max) over {r['seeds']} seeds; each checkpoint chosen by −ELBO on "
                         f"{r['validation_size']} held-out training images, the test set binarized once "
                         f"(fixed draw) for every seed")
        else:  # a single-seed result written before the validation split
            ours = f"NLL {r['nll']:.2f} (K={r['K']}), −ELBO {r['neg_elbo']:.2f}, {r['active_units']} AU"
            selection = ("one seed, run before the validation split: its checkpoint was chosen on the test set "
                         "(the config now holds out 400 training images for that)")
        rows.append(f"| IWAE Table 1, VAE k=1 (Burda et al. 2016) | NLL 86.76, 19 AU | {ours} | "
                    f"`experiments/reproduce/iwae_vae_k1.py` + `experiments.evaluate` | MNIST, "
                    f"{r.get('train_images', 24345):,} train images | {r['train_minutes']:.0f} min train"
                    f"{' (seeds together)' if r.get('seeds', 1) > 1 else ''} + {r['eval_minutes']:.0f} min eval"
                    f"{' per seed' if r.get('seeds', 1) > 1 else ''} | "
                    f"{r['note']}; {selection} |")
    if results.get("linear"):
        r = results["linear"]
        per, st = r["per_beta_k"], r["settings"]
        worst = max((p for p in per if p["max_abs_err_clear"]), key=lambda p: p["max_abs_err_clear"]["max"])
        w = worst["max_abs_err_clear"]
        inexact = [f"β={p['beta']:g} k={p['latent_dim']} ({p['collapsed_exact']}/{len(p['seeds'])} seeds exact)"
                   for p in per if p["collapsed_exact"] < len(p["seeds"])]
        rows.append(f"| Linear VAE = pPCA (Lucas et al. 2019) | KLᵢ = ½log(λᵢ/βσ²), collapse iff λᵢ ≤ βσ² | "
                    f"max \\|ΔKLᵢ\\| {r['max_abs_err_clear']:.3f} nats where λᵢ/βσ² ∉ (1, 2), over {r['runs']} runs "
                    f"({len(per)} (β, k) × {len(r['seeds'])} seeds; worst (β, k): β={worst['beta']:g} "
                    f"k={worst['latent_dim']}, mean {w['mean']:.3f}, min {w['min']:.3f}, max {w['max']:.3f}); "
                    f"collapsed sets exact in {r['collapsed_exact']}/{r['runs']} runs | `{r['command']}` | "
                    f"synthetic, known spectrum | {r['minutes']:.1f} min | {st['steps']:,} steps of Adam (batch "
                    f"{st['batch_size']}, lr {st['learning_rate']:g}, cosine). Near-threshold dims (λᵢ/βσ² = √2) "
                    f"converge slowest: max \\|ΔKLᵢ\\| over all dims {r['max_abs_err']:.3f}; inexact collapse: "
                    f"{', '.join(inexact) or 'none'}. Spread per (β, k): docs/reproductions/linear_vae.json |")
    if results.get("rd"):
        r = results["rd"]
        n, b1 = len(r["seeds"]), r["beta1_neg_elbo"]
        rows.append(f"| Rate–distortion under β (Alemi et al. 2018) | R ↓, D ↑ with β; β = 1 (the ELBO) has the "
                    f"lowest D + R, the other β lie above the line D + R = −ELBO(β = 1) | R ↓ in "
                    f"{r['rate_decreasing']}/{n} seeds, D ↑ in {r['distortion_increasing']}/{n}, β = 1 lowest "
                    f"D + R in {r['beta1_lowest_neg_elbo']}/{n}; −ELBO at β = 1: {b1['mean']:.2f} (seeds "
                    f"{b1['min']:.2f}–{b1['max']:.2f}) | "
                    f"`launch.sweep --config=experiments/reproduce/mnist_rate_distortion.py` | MNIST subset | "
                    f"{r['minutes']:.1f} min | {n} seeds; per-seed points in rate_distortion.json |")
    if results.get("collapse"):
        r = results["collapse"]
        names = [n for n in ("mnist", "fashion") if n in r]
        fmt = lambda per, key: ", ".join(
            f"{p[key]['mean']:g}" + (f" ({p[key]['min']:g}–{p[key]['max']:g})" if p[key]["min"] != p[key]["max"] else "")
            for p in per)
        moved = lambda per, key: max(abs(d) for p in per for d in p[key])
        parts, notes = [], []
        for n in names:
            per, d = r[n]["per_k"], r[n]
            span = f"steps {d['previous_step']:,} → {d['final_step']:,}"
            parts.append(f"{n}, k = {[p['latent_dim'] for p in per]}: KL > {r['informative_kl']:g}: "
                         f"[{fmt(per, 'informative_dims')}]; AU: [{fmt(per, 'active_units')}]")
            notes.append(f"{n}: over {span} the KL > {r['informative_kl']:g} counts moved by ≤ "
                         f"{moved(per, 'informative_dims_change_last_eval')}, AU by ≤ "
                         f"{moved(per, 'active_units_change_last_eval')}")
        minutes = " + ".join(f"{r[n]['minutes']:.1f}" for n in names)
        seeds = max(p["seeds"] for n in names for p in r[n]["per_k"])
        rows.append(f"| Posterior collapse vs k (β=1) | latent dimensions beyond what the data need collapse (KL → 0) | "
                    f"{'; '.join(parts)} | `launch.sweep --config=experiments/reproduce/collapse_vs_k.py` | "
                    f"MNIST subset, Fashion-MNIST | {minutes} min | mean (min–max) over {seeds} seeds, "
                    f"{r[names[0]]['final_step']:,} steps. KL > {r['informative_kl']:g} nats counts the dimensions "
                    f"that carry information; AU (Burda et al.: Var_x E_q[z] > 0.01) also counts dimensions "
                    f"still on their way to collapse. {'; '.join(notes)} (a count that still moves is not "
                    f"settled) |")
    if results.get("terms"):
        r = results["terms"]
        rows.append(f"| KL terms in training (this project) | collapsed: σ²→1, μ→0, terms cancel; active: "
                    f"log-det dominates | collapsed cancel: {r['collapsed_terms_cancel']}; active log-det "
                    f"dominates: {r['active_log_det_dominates']} ({r['run']}) | "
                    f"`experiments.reproduce.summarize` | MNIST subset | (from the k sweep) | see kl_terms.png |")
    rows += _closed_vs_mc_rows(results)
    if results.get("locatello"):
        rows.append(locatello_summary.readme_row(results["locatello"]))
    if results.get("locatello_slice"):
        r = results["locatello_slice"]
        timing = r.get("timing") or {}
        minutes = f"{timing['train_seconds'] / 60:.0f} min on 2 cores" if timing.get("train_seconds") else "see json"
        rows.append(f"| Locatello et al. 2019, along training (CPU slice) | MIG 0.45 β-TCVAE, 0.21 β-VAE at "
                    f"300,000 steps (Lin et al. 2020's table) | {locatello_curves.row_text(r)} | "
                    f"`bash experiments/reproduce/locatello_slice_cpu.sh` | dSprites rendered on the device | "
                    f"{minutes} | {r['runs']} runs ({', '.join(r['methods'])}; seeds {r['seeds']}), "
                    f"{r['last_step']:,} steps; curves in {SLICE_NAME}.png; sample sizes in the json |")
    if results.get("locatello_gpu"):
        r = results["locatello_gpu"]
        rows.append(f"| Locatello et al. 2019, β-TCVAE slice on **{r.get('device', 'a GPU')}** | MIG 0.45 "
                    f"β-TCVAE at 300,000 steps (Lin et al. 2020) | {locatello_curves.row_text(r)} | "
                    f"`bash benchmarks/gpu/run.sh OUT` + `experiments.reproduce.gpu_results` | dSprites rendered "
                    f"on the device | one time-budgeted call (benchmarks/gpu/run.sh) | {r['runs']} runs (6 β × "
                    f"{len(r['seeds'])} seeds) in one vmapped program, {r['last_step']:,} steps; curves in "
                    f"{GPU_SLICE_NAME}.png; device numbers in nvidia_h200_gpu.json |")
    return "\n".join(rows)


def _slice(runs_dir: str, out: str) -> dict | None:
    """The CPU slice's curves (locatello_curves), with RUNS/timing.txt's training time."""
    if not os.path.isdir(runs_dir):
        return None
    timing = locatello_summary.read_timing(runs_dir)
    return locatello_curves.summarize(runs_dir, out, SLICE_NAME, extra={"timing": timing})


def collect(runs: str, out: str, only: list[str] | None = None, locatello_runs: str | None = None,
            slice_runs: str | None = None) -> dict[str, dict | None]:
    """Each result, recomputed from its runs when ``only`` names it (or is empty) and its runs
    are there, else read back from OUT/<name>.json (None if neither)."""
    makers = {"iwae": ("iwae_vae", lambda: iwae(runs, out)), "linear": ("linear_vae", lambda: linear(runs, out)),
              "rd": ("rate_distortion", lambda: rate_distortion(runs, out)),
              "collapse": ("collapse_vs_k", lambda: collapse(runs, out)),
              "terms": ("kl_terms", lambda: kl_terms(runs, out)),
              "locatello": (locatello_summary.NAME, lambda: locatello_summary.summarize(
                  locatello_runs or os.path.join(runs, "locatello_cpu"), out)),
              "locatello_slice": (SLICE_NAME, lambda: _slice(slice_runs or os.path.join(runs, "locatello_slice"), out)),
              "locatello_gpu": (GPU_SLICE_NAME, lambda: None),  # made by gpu_results from the GPU's files
              **{row: (f"closed_vs_mc_{row}", lambda row=row: closed_vs_mc_row(runs, out, row))
                 for row in closed_vs_mc.ROWS},
              "gradient_variance": ("gradient_variance_mnist", lambda: grad_variance(runs, out))}
    unknown = sorted(set(only or ()) - set(makers))
    if unknown:
        raise ValueError(f"--only: unknown results {unknown}; choose from {sorted(makers)}")
    results = {}
    for name, (file, make) in makers.items():
        fresh = make() if not only or name in only else None
        results[name] = fresh if fresh is not None else (analysis.read_json(os.path.join(out, f"{file}.json")) or None)
        print(f"{name}: " + ("recomputed" if fresh is not None else
                             f"kept from {file}.json" if results[name] else "missing (not run)"))
    return results


def locatello_md(results: dict[str, dict | None]) -> str | None:
    """docs/reproductions/locatello_dsprites.md: the 36-model study's per-method table and
    claims, then disentanglement along training for each slice (CPU, GPU) with its compute,
    curves and the published comparisons; None when no Locatello result exists."""
    parts = []
    if results.get("locatello"):
        parts += ["## The study at 400 steps (36 models, CPU)", "", locatello_summary.table_md(results["locatello"]), ""]
    slices = []
    if results.get("locatello_slice"):
        r = results["locatello_slice"]
        t = r.get("timing") or {}
        compute = (f"{t['train_seconds'] / 3600:.2f} h of a 2-core CPU machine for training and the metrics along "
                   f"it in the script's last invocation ({t.get('models', r['runs']):g} models, two launchers each "
                   f"pinned to one core; timing.txt: a resumed slice counts only what that invocation trained)"
                   if t.get("train_seconds") else "compute not recorded (no timing.txt)")
        slices.append(locatello_curves.markdown(r, "CPU slice (`bash experiments/reproduce/locatello_slice_cpu.sh`)",
                                                f"{SLICE_NAME}.png", compute))
    if results.get("locatello_gpu"):
        r = results["locatello_gpu"]
        slices.append(locatello_curves.markdown(
            r, f"β-TCVAE slice on one {r.get('device', 'GPU')} (`bash benchmarks/gpu/run.sh OUT`)",
            f"{GPU_SLICE_NAME}.png", "one time-budgeted call of benchmarks/gpu/run.sh (all runs in one vmapped "
            "program; device numbers in nvidia_h200_gpu.json)"))
    if slices:
        parts += ["## Disentanglement along training", "", *slices]
    return "\n".join(parts) if parts else None


def _fill(text: str, start: str, end: str, md: str) -> str:
    """``text`` with what stands between the markers ``start`` and ``end`` replaced by ``md``
    (unchanged when a marker is missing)."""
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    return head + start + "\n" + md + "\n" + end + rest.split(end, 1)[1]


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    results = collect(_RUNS.value, _OUT.value, _ONLY.value, _LOCATELLO.value, _SLICE.value)
    doc = locatello_md(results)
    if doc:
        with open(os.path.join(_OUT.value, f"{locatello_summary.NAME}.md"), "w") as f:
            f.write(doc + "\n")
    md = table(results)
    with open(os.path.join(_OUT.value, "table.md"), "w") as f:
        f.write(md + "\n")
    if _README.value:
        text = _fill(open(_README.value).read(), START, END, md)
        if results.get("locatello"):
            text = _fill(text, KL_START, KL_END, locatello_summary.kl_view_md(results["locatello"]))
        with open(_README.value, "w") as f:
            f.write(text)
    print(md)


if __name__ == "__main__":
    app.run(main)
