"""The sweep report: grouping by every varying field, per-run tables, optional files, figures,
single runs, and a report built from a real (tiny) sweep over a field other than β."""

from __future__ import annotations

import json
import os
import shutil
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from vaekl import analysis, report
from vaekl import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _neg_elbo(config: dict, step: int) -> float:
    """A made-up, exactly known final −ELBO: each field moves it, seeds by ±0.5."""
    return (100.0 - step / 10 + 3.0 * config["free_bits"] + 0.25 * config["latent_dim"]
            + 2.0 * config["beta"] + (0.5 if config["seed"] % 2 else -0.5))


def fake_run(root: str, overrides: dict, steps=(0, 50, 100), train_batch: bool = True,
             eval_json: dict | None = None, meta: dict | None = None, name: str | None = None) -> str:
    """A run directory with config.json and metrics.jsonl shaped like the trainer's."""
    config = {"dataset": "digits", "model": "mlp", "encoder_hidden": [24], "decoder_hidden": [24],
              "latent_dim": 4, "beta": 1.0, "free_bits": 0.0, "seed": 0, "num_steps": steps[-1],
              "regularizer": "kl", "learning_rate": 1e-3}
    config.update(overrides)
    name = name or ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in overrides.items())
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    k = config["latent_dim"]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in steps:
            for split in ("test", "train"):
                ne = _neg_elbo(config, step) + (0.0 if split == "test" else -1.0)
                kl = 2.0 + config["free_bits"]
                row = {"step": step, "split": split, "loss": ne, "neg_elbo": ne, "recon": ne - kl, "kl": kl,
                       "kl_trace": k * 0.9, "kl_mahalanobis": 1.0, "kl_log_det_ratio": 1.5, "kl_dim": float(k),
                       "beta": config["beta"], "beta_weight": 1.0, "active_units": k - 1,
                       "kl_per_dim": [kl / k] * (k - 1) + [1e-5], "au_variance": [0.5] * k,
                       "total_correlation": "nan"}  # rundir writes non-finite numbers as strings
                f.write(json.dumps(row) + "\n")
            if train_batch and step > 0:
                f.write(json.dumps({"step": step, "split": "train_batch", "loss": 90.0 - step / 10,
                                    "neg_elbo": 91.0 - step / 10, "kl": 2.5, "beta_weight": step / 100,
                                    "penalty": 1.25}) + "\n")
        f.write('{"step": 150, "split": "te')  # a torn last line (a crash mid-write) is skipped
    if eval_json is not None:
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(eval_json, f)
    if meta is not None:
        with open(os.path.join(run_dir, "meta.json"), "w") as f:
            json.dump(meta, f)
    return run_dir


def fake_sweep(root: str, **axes) -> list[str]:
    """Every combination of ``axes`` (field → values), as fake runs under ``root``."""
    grid = [{}]
    for field, values in axes.items():
        grid = [dict(g, **{field: v}) for g in grid for v in values]
    return [fake_run(root, g) for g in grid]


# ---------------------------------------------------------------------------
# Grouping.


def test_varying_fields_from_configs_and_frames(tmp_path):
    configs = [{"beta": 1.0, "seed": s, "free_bits": fb, "num_steps": 100, "encoder_hidden": [24]}
               for fb in (0.0, 2.0) for s in (0, 1)]
    assert analysis.varying_fields(configs) == ["free_bits"]
    configs[0]["num_steps"] = 50           # bookkeeping fields count too when they differ
    configs[1]["encoder_hidden"] = [24, 24]  # lists compare as tuples
    assert set(analysis.varying_fields(configs)) == {"free_bits", "num_steps", "encoder_hidden"}
    configs[2].pop("free_bits")             # a field one run lacks differs
    assert "free_bits" in analysis.varying_fields(configs)
    assert analysis.varying_fields([{"seed": 0, "beta": 1.0}, {"seed": 1, "beta": 1.0}]) == []

    fake_sweep(str(tmp_path), latent_dim=[2, 4], free_bits=[0.0, 2.0], seed=[0, 1])
    df = analysis.load_sweep(str(tmp_path))
    assert analysis.varying_fields(df) == ["latent_dim", "free_bits"]  # in sweep (run name) order
    assert analysis.varying_fields(analysis.run_table(df)) == ["latent_dim", "free_bits"]
    assert analysis.x_field(df) == "latent_dim"  # numeric; tie on the number of values: the first
    assert analysis.x_field(df, ["free_bits"]) == "free_bits"


def test_x_field_prefers_beta_then_most_values_then_any(tmp_path):
    fake_sweep(str(tmp_path / "a"), free_bits=[0.0, 1.0, 2.0], beta=[1.0, 4.0])
    assert analysis.x_field(analysis.load_sweep(str(tmp_path / "a"))) == "beta"
    fake_sweep(str(tmp_path / "b"), latent_dim=[2, 4], free_bits=[0.0, 1.0, 2.0])
    assert analysis.x_field(analysis.load_sweep(str(tmp_path / "b"))) == "free_bits"
    fake_sweep(str(tmp_path / "c"), regularizer=["kl", "tcvae"])
    assert analysis.x_field(analysis.load_sweep(str(tmp_path / "c"))) == "regularizer"
    fake_sweep(str(tmp_path / "d"), seed=[0, 1])
    assert analysis.x_field(analysis.load_sweep(str(tmp_path / "d"))) is None


def test_summary_groups_by_every_varying_field_and_averages_only_seeds(tmp_path):
    # The case of issue 11: `free_bits=0,2 beta=4` used to become one row of "2 seeds".
    fake_sweep(str(tmp_path), free_bits=[0.0, 2.0], beta=[4.0], seed=[0, 1, 2])
    df = analysis.load_sweep(str(tmp_path))
    s = analysis.summary(df)
    assert list(s.free_bits) == [0.0, 2.0] and "beta" not in s.columns
    assert list(s.seeds) == [3, 3] and list(s.runs) == [3, 3]
    for _, r in s.iterrows():
        expect = [_neg_elbo({"free_bits": r.free_bits, "latent_dim": 4, "beta": 4.0, "seed": seed}, 100)
                  for seed in (0, 1, 2)]
        np.testing.assert_allclose(r.neg_elbo, np.mean(expect), rtol=1e-12)
        np.testing.assert_allclose(r.neg_elbo_std, np.std(expect, ddof=1), rtol=1e-12)
        np.testing.assert_allclose(r.gap, 1.0, rtol=1e-12)  # test − train, as written
    assert "eval_nll" not in s.columns  # no eval.json: the column is left out, not made up


def test_per_run_reads_optional_files_and_non_finite_values(tmp_path):
    root = str(tmp_path)
    ev = {"nll": 95.5, "nll_se": 0.25, "neg_elbo": 97.0, "kl": 3.0, "mutual_info": 1.5,
          "total_correlation": 0.5, "dimwise_kl": 1.0, "checkpoint": "best", "kl_per_dim": [1, 2],
          "disentanglement": {"mig": 0.125, "note": "text is ignored"}}
    fake_run(root, {"free_bits": 0.0}, eval_json=ev, meta={"vaekl_commit": "abc1234", "command": "x --y"})
    fake_run(root, {"free_bits": 2.0}, train_batch=False)
    os.makedirs(os.path.join(root, "not_a_run"))  # ignored: no config.json
    df = analysis.load_sweep(root)
    assert df.split.isin(["test", "train", "train_batch"]).all() and (df.step <= 100).all()
    assert df.total_correlation.isna().all()  # "nan" strings became NaN floats
    runs = analysis.per_run(df)
    assert list(runs.run) == ["free_bits=0", "free_bits=2"] and list(runs.step) == [100, 100]
    assert runs.eval_nll.iloc[0] == 95.5 and np.isnan(runs.eval_nll.iloc[1])
    assert runs.dis_mig.iloc[0] == 0.125 and "dis_note" not in runs.columns
    assert df.attrs["meta"]["free_bits=0"]["vaekl_commit"] == "abc1234" and df.attrs["meta"]["free_bits=2"] == {}
    rows = report.run_rows(df)
    assert rows[0]["NLL"] == "95.50 ± 0.25" and "NLL" not in rows[1]
    assert rows[0]["active units"] == "3 / 4" and rows[0]["mig"] == "0.125"
    fake_run(root, {"free_bits": 4.0, "num_steps": 100}, steps=(0, 50))  # interrupted at step 50
    df = analysis.load_sweep(root)
    assert analysis.per_run(df).step.tolist() == [100, 100, 50]
    assert "1 run(s) unfinished" in report.provenance(df, root)
    with pytest.raises(FileNotFoundError, match="no runs"):
        analysis.load_sweep(os.path.join(root, "not_a_run"))


# ---------------------------------------------------------------------------
# Figures and the HTML.


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_figures_mark_values_and_keep_legends_off_the_axes(tmp_path):
    fake_sweep(str(tmp_path), beta=[0.25, 1.0, 4.0], latent_dim=[2, 8], seed=[0, 1])
    df = analysis.load_sweep(str(tmp_path))
    fig = analysis.elbo_vs_beta(df)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.25", "1", "4"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["k=2", "k=8"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not _overlaps(fig.legends[0].get_window_extent(renderer), ax.get_window_extent(renderer))
    # One curve per k, each point a mean over the two seeds.
    means = [line.get_ydata() for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert len(means) == 2 and all(len(m) == 3 for m in means)
    np.testing.assert_allclose(means[0][0], _neg_elbo({"free_bits": 0, "latent_dim": 2, "beta": 0.25, "seed": 0}, 100)
                               + 0.5, rtol=1e-12)
    rd = analysis.rate_distortion(df)
    labels = [t.get_text() for t in rd.legends[0].get_texts()]
    assert labels == ["k=2", "k=8", "β=0.25", "β=1", "β=4"]  # colours: k; markers: β; no annotations
    assert not rd.axes[0].texts
    heat = analysis.active_units_heatmap(df)
    assert [t.get_text() for t in heat.axes[0].get_yticklabels()] == ["k=2", "k=8"]
    assert analysis.pick_runs(df, 3) == ["beta=0.25,latent_dim=8,seed=0", "beta=1,latent_dim=8,seed=0",
                                         "beta=4,latent_dim=8,seed=0"]
    curves = analysis.training_curves(df)
    titles = [a.get_title() for a in curves.axes if a.get_visible()]
    assert titles[:4] == [metrics_lib.title(m) for m in ("loss", "neg_elbo", "kl", "beta_weight")]
    assert titles[0] == "loss (the objective) [nats]"
    assert metrics_lib.title("penalty") in titles and "kl_dim" not in titles


def test_report_html_for_a_sweep_and_a_single_run(tmp_path):
    root = str(tmp_path / "sweep")
    dirs = fake_sweep(root, free_bits=[0.0, 2.0], latent_dim=[2, 4], seed=[0, 1])
    with open(os.path.join(dirs[0], "meta.json"), "w") as f:
        json.dump({"vaekl_commit": "0123abc", "command": "python -m launch.sweep --x", "image_shape": [8, 8, 1]}, f)
    path = report.write_report(root)
    page = open(path).read()
    for name in ("training_curves", "rate_distortion", "elbo_vs_free_bits", "active_units", "kl_per_dim",
                 "kl_terms", "field_free_bits", "field_latent_dim"):
        assert f"figures/{name}.png" in page and os.path.getsize(os.path.join(root, "figures", f"{name}.png")) > 5000
    assert "0123abc" in page and "python -m launch.sweep --x" in page and "run(s) without meta.json" in page
    assert "Effect of free_bits" in page and "Effect of latent_dim" in page
    summary = pd.read_csv(os.path.join(root, "summary.csv"))
    assert len(summary) == 4 and (summary.seeds == 2).all()
    assert len(pd.read_csv(os.path.join(root, "runs.csv"))) == 8
    every_run = page[page.index("id='runs'"):page.index("id='training_curves'")]
    assert every_run.count("<tr>") == 1 + 8

    single = dirs[0]
    path = report.write_report(single)
    page = open(path).read()
    assert os.path.dirname(path) == single and "Only one configuration" in page
    assert "figures/kl_per_dim.png" in page and "rate_distortion.png" not in page


# ---------------------------------------------------------------------------
# A real sweep over a field other than β.


def test_report_from_a_free_bits_sweep(tmp_path):
    from vaekl import data, sweep  # pylint: disable=g-import-not-at-top
    from vaekl import config as config_lib  # pylint: disable=g-import-not-at-top

    base = config_lib.defaults()
    n_test = data.load("digits", None, test_fraction=base.test_fraction, seed=base.data_seed).test_images.shape[0]
    for k, v in dict(encoder_hidden=(16,), decoder_hidden=(16,), latent_dim=3, batch_size=16, num_steps=20,
                     eval_every=20, log_every=10, checkpoint_every=20, eval_batch_size=128,
                     num_eval_train=n_test, num_images=4, beta=4.0).items():  # one evaluation shape
        base[k] = v
    if "regularizer" in base:
        base.regularizer = "free_bits"
    grid = sweep.parse("free_bits=0,2 seed=0,1", base)
    workdir = str(tmp_path / "sweep")
    dirs = [os.path.join(workdir, sweep.run_name(o)) for o in grid]
    errors = sweep.run_groups([sweep.apply(base, o).to_dict() for o in grid], dirs, max_group=4)
    assert errors == [None] * 4
    out = subprocess.run([sys.executable, "-m", "experiments.report", f"--workdir={workdir}"], cwd=REPO,
                         check=True, capture_output=True, text=True)
    assert "report:" in out.stdout
    summary = pd.read_csv(os.path.join(workdir, "summary.csv"))
    assert list(summary.free_bits) == [0, 2] and list(summary.seeds) == [2, 2]
    assert summary.neg_elbo_std.notna().all()
    page = open(os.path.join(workdir, "report.html")).read()
    table = page[page.index("id='summary'"):page.index("id='runs'")]
    assert re.findall(r"<tr><td>([02])</td><td>2</td>", table) == ["0", "2"]  # free_bits, seeds
    assert "free_bits=2,seed=1/samples.png" in page
    df = analysis.load_sweep(workdir)
    assert (analysis.final(df).step == 20).all() and analysis.varying_fields(df) == ["free_bits"]


# ---------------------------------------------------------------------------
# Ground-truth factors: the Locatello study summary, disentanglement against strength,
# latent traversals and the latent–factor MI matrix.


def _study_mig(method: str, strength: float, seed: int) -> float:
    """Made-up MIGs: β-TCVAE above β-VAE and rising with β; seeds move it by 0.002 only."""
    base = {"beta_vae": 0.05 + 0.001 * strength, "beta_tc_vae": 0.10 + 0.02 * strength}.get(method, 0.2)
    return base + 0.002 * seed


def fake_study(root: str, sweeps: dict, seeds=(0, 1), k: int = 3, timing: str | None = "120 60") -> dict:
    """Runs laid out as locatello_dsprites_cpu.sh does (root/<method>/<run>/) with eval.json;
    returns {run dir: its eval.json}."""
    from experiments.reproduce import locatello_dsprites as ld  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    evals = {}
    for method, values in sweeps.items():
        _, field, _, _ = ld.METHODS[method]
        for v in values:
            for s in seeds:
                config = json.loads(json.dumps(ld.get_config(method).to_dict()))
                config.update({field: float(v), "seed": s, "num_steps": 16, "latent_dim": k})
                run = os.path.join(root, method, f"{field}={v:g},seed={s}")
                os.makedirs(run)
                with open(os.path.join(run, "config.json"), "w") as f:
                    json.dump(config, f)
                kl = rng.uniform(0.0, 2.0, k)
                var, mu2 = np.exp(-kl), rng.uniform(0.0, 0.3, k)
                with open(os.path.join(run, "metrics.jsonl"), "w") as f:
                    f.write(json.dumps({"step": 16, "split": "test", "kl": float(kl.sum()), "neg_elbo": 90.0,
                                        "kl_per_dim": kl.tolist(), "au_variance": [0.5] * k}) + "\n")
                m = _study_mig(method, v, s)
                fv = 0.6 + 0.002 * v + 0.001 * s if method == "factor_vae" else 0.5 + m
                ev = {"step": 16, "kl": float(kl.sum()), "index_code_mi": 0.5, "total_correlation": 0.25 * v,
                      "dimwise_kl": float(kl.sum()) - 0.5 - 0.25 * v, "kl_per_dim": kl.tolist(),
                      "kl_trace_per_dim": var.tolist(), "kl_mahalanobis_per_dim": mu2.tolist(),
                      "kl_log_det_ratio_per_dim": (2 * kl - (var - 1) - mu2).tolist(),  # terms sum to the KL
                      "disentanglement": {"mig": m, "factor_vae_score.eval_accuracy": fv,
                                          "dci.disentanglement": 0.1 + m, "sap": 0.05}}
                with open(os.path.join(run, "eval.json"), "w") as f:
                    json.dump(ev, f)
                evals[run] = ev
    if timing:
        train_s, eval_s = timing.split()
        with open(os.path.join(root, "timing.txt"), "w") as f:
            f.write(f"train_seconds={train_s} eval_seconds={eval_s}\n")
    return evals


STUDY = {"beta_vae": (1, 4), "factor_vae": (10, 100), "beta_tc_vae": (1, 4)}


def test_locatello_summary_from_a_fake_study(tmp_path):
    from experiments.reproduce import locatello_summary as ls  # pylint: disable=g-import-not-at-top
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    evals = fake_study(runs, STUDY)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    writer = SummaryWriter(os.path.join(runs, "beta_vae", "beta=1,seed=0", "tensorboard"))
    for step, wall in ((0, 50.0), (8, 100.0), (16, 101.0), (24, 102.5)):  # fastest: 1 s per 8 steps
        writer.add_scalar("train_batch/loss" if step else "test/loss", 1.0, step, walltime=wall)
    writer.close()
    assert ls.train_batch_times(os.path.join(runs, "beta_vae", "beta=1,seed=0")) == {8: 100.0, 16: 101.0, 24: 102.5}
    grouped = str(tmp_path / "grouped")  # the same events, from a run trained in a group of 2
    shutil.copytree(os.path.join(runs, "beta_vae", "beta=1,seed=0", "tensorboard"), os.path.join(grouped, "tensorboard"))
    assert ls.steady_seconds_per_1k_steps(grouped) == pytest.approx(125.0)
    with open(os.path.join(grouped, "group_commit.json"), "w") as f:
        json.dump({"step": 16, "members": ["a", "b"]}, f)
    assert ls.steady_seconds_per_1k_steps(grouped) == pytest.approx(62.5)  # each step's time shared by 2
    r = ls.summarize(runs, out)
    for name in ("locatello_dsprites.json", "locatello_dsprites.md", "locatello_dsprites.png", "locatello_kl.png"):
        assert os.path.getsize(os.path.join(out, name)) > 500
    assert json.load(open(os.path.join(out, "locatello_dsprites.json")))["methods"].keys() == r["methods"].keys()
    assert list(r["methods"]) == ["beta_vae", "factor_vae", "beta_tc_vae"] and len(r["runs"]) == 12
    rec = next(x for x in r["runs"] if x["run"] == os.path.join("beta_tc_vae", "beta=4,seed=1"))
    assert (rec["method"], rec["strength_field"], rec["strength"], rec["seed"], rec["steps"]) == \
        ("beta_tc_vae", "beta", 4.0, 1, 16)
    assert rec["mig"] == pytest.approx(_study_mig("beta_tc_vae", 4, 1)) and rec["disentanglement"]["sap"] == 0.05
    tc = r["methods"]["beta_tc_vae"]["mig"]
    migs = [_study_mig("beta_tc_vae", b, s) for b in (1, 4) for s in (0, 1)]
    assert (tc["median"], tc["min"], tc["max"]) == pytest.approx((np.median(migs), min(migs), max(migs)))
    # Cost: 120 s of training / 12 models / (16 steps / 1000).
    assert r["cost"]["seconds_per_model_per_1k_steps"] == pytest.approx(120 / 12 / 0.016)
    assert r["cost"]["eval_seconds_per_model"] == pytest.approx(5.0)
    assert r["cost"]["steady_seconds_per_model_per_1k_steps"] == pytest.approx(125.0)
    # The claims, from the data.
    chen = r["claims"]["chen2018"]["ours"]
    assert chen["above_beta_vae_at_same_beta"]["status"] == "supported"
    assert [row["beta"] for row in chen["above_beta_vae_at_same_beta"]["by_beta"]] == [1.0, 4.0]
    assert chen["rises_with_beta"]["status"] == "supported"
    lin = r["claims"]["lin2020"]["ours"]
    assert lin["factor_vae.factor_vae_score"]["status"] == "supported"  # 0.8015 vs 0.82
    assert lin["factor_vae.factor_vae_score"]["ours_best_median"] == pytest.approx(0.8005)
    assert lin["beta_tc_vae.mig"]["status"] == "not reached (ours lower)"
    assert lin["mig_order"]["status"] == "supported"
    seed = r["claims"]["locatello2019"]["ours"]["mig"]
    groups = [[_study_mig(m, v, s) for s in (0, 1)] for m, vs in STUDY.items() for v in vs]
    assert seed["seed_variance"] == pytest.approx(np.mean([np.var(g, ddof=1) for g in groups]))
    assert seed["config_variance"] == pytest.approx(np.var([np.mean(g) for g in groups], ddof=1))
    assert seed["status"] == "not supported"  # seeds move the made-up MIG by 0.002 only
    assert r["claims"]["locatello2019"]["caveat"] is None  # best median MIG 0.2: informative
    low = {m: dict(v, mig=dict(v["mig"], median=0.03)) for m, v in r["methods"].items()}
    assert not ls.informative(low)["informative"] and ls.claims(r["runs"], low)["locatello2019"]["caveat"]
    # The KL view: the per-dimension terms add up to each dimension's KL; TC grows 0.25 per unit.
    view = r["kl_view"]["beta_vae"]
    d = view["per_dim"]["strongest"]
    np.testing.assert_allclose(np.sum([d[k] for k in ("half_trace_minus_1", "half_mahalanobis", "half_log_det")],
                                      axis=0), d["kl"], rtol=1e-6)
    assert d["kl"] == sorted(d["kl"], reverse=True) and d["seeds"] == 2 and d["strength"] == 4.0
    assert view["change_weakest_to_strongest"]["total_correlation"] == pytest.approx(0.75)
    kls = [sum(evals[os.path.join(runs, "beta_vae", f"beta=1,seed={s}")]["kl_per_dim"]) for s in (0, 1)]
    assert view["split_by_strength"]["1"]["kl"] == pytest.approx(np.mean(kls))
    md = open(os.path.join(out, "locatello_dsprites.md")).read()
    assert md.count("\n| β-VAE | β ∈ {1, 4} × 2 seed(s) | ") == 1 and "Chen et al. 2018" in md
    row = ls.readme_row(r)
    assert row.startswith("| Locatello et al. 2019 study (dSprites, CPU-sized) |") and row.count(" | ") == 6
    assert "125 s per model per 1,000 steps of one core in steady state (625 of wall time with start-up" in row
    # The README's KL-view paragraph reads its numbers from the result: β-VAE's TC 1 → 4.
    para = ls.kl_view_md(r)
    tc_lo, tc_hi = (r["kl_view"]["beta_vae"]["split_by_strength"][b]["total_correlation"] for b in ("1", "4"))
    assert f"β-VAE (β 1 → 4): KL " in para and f"total correlation {tc_lo:.2f} → {tc_hi:.2f}" in para
    assert para.startswith("At 16 steps the best median MIG is 0.") and "uninformative" not in para
    from experiments.reproduce import summarize  # pylint: disable=g-import-not-at-top
    text = "a\n<!-- locatello-kl:start -->\nold\n<!-- locatello-kl:end -->\nb"
    assert summarize._fill(text, summarize.KL_START, summarize.KL_END, para) == \
        f"a\n<!-- locatello-kl:start -->\n{para}\n<!-- locatello-kl:end -->\nb"
    # Evaluation cost: each eval.json's own eval_seconds once every run has one (evaluations may
    # run beside training, so timing.txt's wall time would not count them).
    for run, ev in evals.items():
        with open(os.path.join(run, "eval.json"), "w") as f:
            json.dump(dict(ev, eval_seconds=7.0 + ("seed=1" in run)), f)
    c = ls.summarize(runs, out)["cost"]
    assert c["eval_seconds_per_model"] == pytest.approx(7.5) and c["eval_source"].startswith("eval.json")


def test_locatello_figures_and_runs_directly_under_the_directory(tmp_path):
    from experiments.reproduce import locatello_summary as ls  # pylint: disable=g-import-not-at-top
    fake_study(str(tmp_path / "nested"), STUDY, timing=None)
    df = analysis.load_runs(analysis.run_dirs(str(tmp_path / "nested" / "beta_vae"))
                            + analysis.run_dirs(str(tmp_path / "nested" / "beta_tc_vae")))
    assert len(set(df.run)) == 8 and "beta_vae/beta=1,seed=0" in set(df.run)  # same names, kept apart
    assert analysis.has_factors(df) and analysis.score_columns(df)[:3] == [
        "dis_mig", "dis_factor_vae_score.eval_accuracy", "dis_dci.disentanglement"]
    fig = analysis.metric_vs_strength(df, ["mig", "sap"], titles={"kl": "β-VAE", "tcvae": "β-TCVAE"},
                                      references={("mig", "tcvae"): [(0.45, "published")]})
    axes = np.array(fig.axes).reshape(2, 2)
    assert [a.get_title() for a in axes[0]] == ["β-VAE", "β-TCVAE"] and axes[1][0].get_ylabel() == "SAP"
    tc = axes[0][1]
    points = np.concatenate([line.get_ydata() for line in tc.get_lines() if line.get_marker() == "o"])
    np.testing.assert_allclose(sorted(points), sorted(_study_mig("beta_tc_vae", b, s) for b in (1, 4) for s in (0, 1)))
    median = [line for line in tc.get_lines() if line.get_linestyle() == "-" and len(line.get_xdata()) == 2][0]
    np.testing.assert_allclose(median.get_ydata(), [_study_mig("beta_tc_vae", b, 0) + 0.001 for b in (1, 4)])
    assert any(line.get_ydata()[0] == 0.45 for line in tc.get_lines() if line.get_linestyle() == "--")
    # Runs directly under the directory (one sweep, no method level): the method from the config.
    flat = tmp_path / "flat"
    os.makedirs(flat)
    for d in analysis.run_dirs(str(tmp_path / "nested" / "factor_vae")):
        os.rename(d, flat / os.path.basename(d))
    r = ls.summarize(str(flat), str(tmp_path / "out"))
    assert list(r["methods"]) == ["factor_vae"] and r["methods"]["factor_vae"]["strengths"] == [10.0, 100.0]
    assert r["cost"]["source"].startswith("file times")  # no timing.txt
    assert r["claims"]["chen2018"]["ours"]["rises_with_beta"]["status"] == "cannot test"
    assert ls.summarize(str(tmp_path / "none"), str(tmp_path / "out")) is None


def test_summarize_keeps_rows_whose_runs_are_absent(tmp_path):
    from experiments.reproduce import summarize  # pylint: disable=g-import-not-at-top
    out = str(tmp_path / "out")
    os.makedirs(out)
    iwae = {"nll": 91.5, "K": 5000, "neg_elbo": 97.0, "active_units": 24, "train_minutes": 15.0,
            "eval_minutes": 16.0, "note": "kept"}
    with open(os.path.join(out, "iwae_vae.json"), "w") as f:
        json.dump(iwae, f)
    fake_study(str(tmp_path / "loc"), {"beta_vae": (1, 4)})
    results = summarize.collect(str(tmp_path / "no_runs"), out, ["locatello"], str(tmp_path / "loc"))
    assert results["iwae"] == iwae and results["linear"] is None and results["locatello"]["methods"]
    md = summarize.table(results)
    assert "NLL 91.50 (K=5000)" in md and "| Locatello et al. 2019 study" in md
    again = summarize.collect(str(tmp_path / "no_runs"), out)  # every result's runs absent: all from json
    assert again["iwae"] == iwae and again["locatello"]["methods"].keys() == {"beta_vae"}
    with pytest.raises(ValueError, match="unknown results"):
        summarize.collect(str(tmp_path / "no_runs"), out, ["locatelo"])


def test_iwae_row_over_seeds(tmp_path):
    """RUNS/iwae_vae as a sweep over seeds: mean (min–max) of NLL, −ELBO and AU, the
    validation split named, epochs counted on the training images left."""
    from experiments.reproduce import summarize  # pylint: disable=g-import-not-at-top
    runs, out = tmp_path / "runs", str(tmp_path / "out")
    os.makedirs(out)
    for seed, nll, au in ((0, 91.0, 23), (1, 92.0, 25)):
        run = runs / "iwae_vae" / f"seed={seed}"
        os.makedirs(run)
        config = {"seed": seed, "num_steps": 23945, "batch_size": 20, "validation_size": 400}
        (run / "config.json").write_text(json.dumps(config))
        (run / "samples.png").write_text("x")
        (run / "eval.json").write_text(json.dumps({"nll": nll, "nll_se": 0.5, "neg_elbo": nll + 5,
                                                   "active_units": au, "step": 20000, "num_samples": 5000}))
    r = summarize.iwae(str(runs), out)
    assert r["seeds"] == 2 and r["epochs"] == pytest.approx(20.0) and r["train_images"] == 23945
    assert r["nll"] == {"mean": 91.5, "min": 91.0, "max": 92.0} and r["active_units"]["max"] == 25
    row = summarize.table({"iwae": r})
    assert "NLL 91.50 (91.00–92.00) (K=5000), −ELBO 96.50 (96.00–97.00), AU 24 (23–25)" in row
    assert "over 2 seeds" in row and "400 held-out training images" in row and "23,945 train images" in row
    assert json.load(open(os.path.join(out, "iwae_vae.json")))["per_seed"][1]["nll"] == 92.0


@pytest.fixture(scope="module")
def dsprites_run(tmp_path_factory):
    """One tiny MLP VAE trained for 4 steps on the rendered dSprites."""
    from vaekl import config as config_lib, train  # pylint: disable=g-import-not-at-top
    c = config_lib.defaults()
    for k, v in dict(dataset="dsprites", model="mlp", encoder_hidden=(16,), decoder_hidden=(16,), latent_dim=3,
                     batch_size=8, num_steps=4, eval_every=4, log_every=4, checkpoint_every=4, eval_batch_size=500,
                     num_eval_train=500, num_images=4, binarization="none", likelihood="bernoulli",
                     learning_rate=1e-2).items():
        c[k] = v
    run_dir = str(tmp_path_factory.mktemp("ds") / "sweep" / "run")
    train.train_and_evaluate(c, run_dir)
    return run_dir


def test_traversals_and_factor_mi_of_a_dsprites_run(dsprites_run):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from vaekl import disentanglement, runs  # pylint: disable=g-import-not-at-top
    run = runs.load(dsprites_run, "latest")
    ds = analysis.run_dataset(run.config)
    kl, au = analysis.kl_per_dim(dsprites_run)
    assert kl.shape == (3,) and au.shape == (3,)
    x = analysis._test_images(ds, 2, seed=0)
    imgs = analysis.traversal_images(run, x, [2, 0], [-2.0, 1.0])
    assert imgs.shape == (2, 2, 2, 64, 64, 1)
    z = np.array(run.model.encode(jnp.asarray(x)).mean)
    z[:, 0] = 1.0  # the prior is N(0, I): value 1 is one standard deviation
    np.testing.assert_allclose(imgs[:, 1, 1], np.asarray(run.model.likelihood.mean(run.model.decode(z))), atol=1e-5)
    fig = analysis.latent_traversals(run, num_codes=2, num_values=5, dataset=ds)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    order = np.argsort(-kl, kind="stable")
    assert [lab.split()[0] for lab in labels] == [f"z{d}" for d in order]
    dead = analysis.collapsed_dims(kl, au, 3)
    assert [("collapsed" in lab) for lab in labels] == list(dead[order])
    np.testing.assert_array_equal(analysis.collapsed_dims(np.array([0.005, 1.0, 1.0]), np.array([1.0, 0.01, 1.0]), 3),
                                  [True, True, False])
    r = analysis.factor_mi(run, num_points=300, dataset=ds)
    assert r["mi"].shape == (3, 5) and (r["mi"] >= -1e-12).all() and r["factor_names"][0] == "shape"
    rng = np.random.default_rng(0)  # factor_mi's draws, repeated
    factors = ds.sample_factors(300, rng)
    codes = np.asarray(run.model.encode(jnp.asarray(ds.sample_observations_from_factors(factors, rng))).mean)
    np.testing.assert_allclose(r["mi"], disentanglement.mutual_info_matrix(codes, factors), atol=1e-9)
    assert r["mig"] == pytest.approx(disentanglement.mig_from_codes(codes, factors)["mig"], abs=1e-9)
    mi_fig = analysis.factor_mi_matrix(run, num_points=300, dataset=ds)
    assert [t.get_text().split("\n")[0] for t in mi_fig.axes[0].get_xticklabels()] == list(ds.factor_names)


def test_report_sections_on_dsprites(dsprites_run):
    ev = {"kl": 1.0, "disentanglement": {"mig": 0.1, "factor_vae_score.eval_accuracy": 0.4, "dci.disentanglement": 0.2}}
    with open(os.path.join(dsprites_run, "eval.json"), "w") as f:
        json.dump(ev, f)
    sweep = os.path.dirname(dsprites_run)
    other = os.path.join(sweep, "beta=4")  # the same config at β = 4, without a checkpoint
    os.makedirs(other)
    config = dict(json.load(open(os.path.join(dsprites_run, "config.json"))), beta=4.0)
    for name, value in (("config.json", config), ("eval.json", {"disentanglement": {"mig": 0.3}})):
        with open(os.path.join(other, name), "w") as f:
            json.dump(value, f)
    with open(os.path.join(other, "metrics.jsonl"), "w") as f:
        f.write(open(os.path.join(dsprites_run, "metrics.jsonl")).read())
    page = open(report.write_report(sweep, factor_runs=2)).read()
    for section in ("Disentanglement against strength", "Latent traversals: β=1",
                    "Latent–factor mutual information: β=1", "Runs without traversals"):
        assert section in page
    for name in ("disentanglement_vs_strength", "traversals_run", "factor_mi_run"):
        assert os.path.getsize(os.path.join(sweep, "figures", f"{name}.png")) > 5000
    os.remove(os.path.join(dsprites_run, "eval.json"))


def test_slice_curves_verdicts_and_the_study_page(tmp_path):
    """The CPU slice's summary (experiments.reproduce.locatello_curves): curves from each run's
    disentanglement.jsonl, the informative test and extrapolation, the seed-vs-method ratio with
    its bootstrap interval, and locatello_dsprites.md's section with the published comparisons."""
    from experiments.reproduce import locatello_curves as lc, summarize  # pylint: disable=g-import-not-at-top
    runs, out = str(tmp_path / "slice"), str(tmp_path / "out")
    fake_study(runs, {"beta_vae": (1, 4), "beta_tc_vae": (1, 6)}, seeds=(0, 1, 2), timing=None)
    for method, values in (("beta_vae", (1, 4)), ("beta_tc_vae", (1, 6))):
        for v in values:
            for s in (0, 1, 2):
                rows = [{"step": step, "mig": 0.01 + 1e-5 * step * v * (2 if method == "beta_tc_vae" else 1) + 0.001 * s,
                         "factor_vae_score.eval_accuracy": 0.4, "dci.disentanglement": 0.1,
                         "sample_sizes": {"mig": {"num_train": 10000, "num_bins": 20}}} for step in (0, 500, 1000)]
                with open(os.path.join(runs, method, f"beta={v:g},seed={s}", "disentanglement.jsonl"), "w") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in rows))
    with open(os.path.join(runs, "timing.txt"), "w") as f:
        f.write("train_seconds=3600 steps=1000 models=12 cores=2\n")
    r = summarize.collect(str(tmp_path / "none"), out, ["locatello_slice"], slice_runs=runs)["locatello_slice"]
    assert r["runs"] == 12 and r["last_step"] == 1000 and r["timing"]["train_seconds"] == 3600
    mig = next(c for c in r["curves"] if (c["method"], c["strength"], c["score"]) == ("beta_tc_vae", 6.0, "mig"))
    assert mig["steps"] == [0, 500, 1000] and mig["median"][-1] == pytest.approx(0.01 + 0.12 + 0.001)
    v = r["verdicts"]
    assert v["informative"] and v["best_median_mig"] == pytest.approx(0.131)  # ≥ 0.1: no extrapolation
    lo, hi = v["seed_vs_method"]["interval_95"]
    assert lo <= v["seed_vs_method"]["ratio"] <= hi and v["seed_vs_method"]["verdict"] == "not supported"
    md = summarize.locatello_md({"locatello_slice": r})
    assert "## Disentanglement along training" in md and "locatello_slice_cpu.png" in md
    assert "1.00 h of a 2-core CPU machine for training and the metrics along it in the script's last invocation" in md and "| β-TCVAE | β = 6 | 0.011" in md
    assert "Best median MIG at step 1,000: β-TCVAE 0.131 (β = 6) vs β-VAE 0.051 (β = 4): **supported**" in md
    assert "β-TCVAE's MIG 0.45 at 300,000+ steps, tuned; ours 0.131" in md and "**not reached at this length**" in md
    assert os.path.getsize(os.path.join(out, "locatello_slice_cpu.png")) > 1000
    assert lc.row_text(r).startswith("median MIG at step 1,000:")
