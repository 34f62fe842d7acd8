"""Disentanglement along training (issue 24 item 1): config.metric_every writes one row per
step to disentanglement.jsonl, with the values of the checkpoint of that step and the sample
sizes; a resumed run adds no duplicate step; the report draws the curves (median over seeds,
min–max band) and returns them as data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from vaekl import analysis, checkpoints, disentanglement, report, runs, train, trajectory
from vaekl import config as config_lib

pytestmark = pytest.mark.slow  # trains tiny models

SMALL = {"mig": {"num_train": 200}, "dci": {"num_train": 200, "num_test": 100},
         "sap": {"num_train": 100, "num_test": 50}, "modularity_explicitness": {"num_train": 200, "num_test": 100},
         "gaussian_total_correlation_score": {"num_train": 200},
         "factor_vae_score": {"num_train": 20, "num_eval": 10, "num_variance_estimate": 200, "batch_size": 8},
         "beta_vae_score": {"num_train": 20, "num_eval": 10, "batch_size": 8}}


def tiny_config(**changes):
    c = config_lib.defaults()
    for k, v in (dict(dataset="dsprites", model="mlp", encoder_hidden=(16,), decoder_hidden=(16,), latent_dim=3,
                     batch_size=8, num_steps=4, eval_every=4, log_every=4, checkpoint_every=2, keep_checkpoints=5,
                     eval_batch_size=500, num_eval_train=500, num_images=4, binarization="none",
                     likelihood="bernoulli", learning_rate=1e-2, metric_every=2,
                     metric_options=json.dumps(SMALL), metric_names=disentanglement.representation_metrics(), **{}) | changes).items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("traj") / "run")
    train.train_and_evaluate(tiny_config(), d)
    return d


def test_rows_at_every_metric_step_hold_the_checkpoints_scores(run_dir):
    rows = trajectory.read(run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert r["sample_sizes"]["mig"]["num_train"] == 200 and r["sample_sizes"]["dci"]["model"] == "random_forest"
        assert r["sample_sizes"]["beta_vae_score"]["batch_size"] == 8 and r["representation"] == "on_demand"
        assert 0 <= r["mig"] <= 1 and "factor_vae_score.eval_accuracy" in r and "dci.disentanglement" in r
    assert rows[0]["mig"] != rows[2]["mig"] or rows[0]["dci.disentanglement"] != rows[2]["dci.disentanglement"]
    run = runs.load(run_dir, 2)  # the recorded values are the checkpoint's
    ds = analysis.run_dataset(run.config)
    again = trajectory.score(ds, run.graphdef, run.params, run.config.seed, SMALL, progress_every=None)
    assert again["scores"] == {k: v for k, v in rows[1].items() if k in again["scores"]}


def test_resume_adds_steps_without_duplicates(run_dir):
    before = trajectory.read(run_dir)
    with open(os.path.join(run_dir, trajectory.FILE), "a") as f:  # work a crash lost after step 4
        f.write(json.dumps({"step": 6, "mig": -1.0}) + "\n")
    train.train_and_evaluate(tiny_config(num_steps=6), run_dir)  # resumes from 4, extends to 6
    rows = trajectory.read(run_dir)
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert rows[:3] == before and rows[3]["mig"] >= 0
    train.train_and_evaluate(tiny_config(num_steps=6), run_dir)  # a finished run: nothing added
    assert trajectory.read(run_dir) == rows
    assert not trajectory.record(run_dir, 6, {"scores": {}, "sample_sizes": {}, "representation": "table",
                                              "seconds": 0.0})


def test_metric_every_needs_ground_truth(tmp_path):
    c = tiny_config(dataset="digits")
    with pytest.raises(ValueError, match="metric_every=2 needs a dataset with ground-truth factors"):
        train.train_and_evaluate(c, str(tmp_path / "r"))
    assert not os.path.exists(tmp_path / "r")
    with pytest.raises(ValueError, match="unknown options"):
        train.train_and_evaluate(tiny_config(metric_options='{"mig": {"n": 1}}'), str(tmp_path / "s"))


def _fake_run(root, name, config, rows):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for s in (0, 4):
            f.write(json.dumps({"step": s, "split": "test", "neg_elbo": 100.0 - s, "kl": 1.0, "recon": 99.0}) + "\n")
    with open(os.path.join(d, trajectory.FILE), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_report_draws_the_curves_and_returns_them(tmp_path):
    base = {k: (list(v) if isinstance(v, tuple) else v) for k, v in tiny_config(num_steps=4).to_dict().items()}
    root = str(tmp_path / "sweep")
    sizes = {"mig": {"num_train": 10000}, "factor_vae_score": {"num_train": 10000, "num_eval": 5000, "batch_size": 64},
             "dci": {"num_train": 10000, "num_test": 5000, "model": "random_forest"}}
    values = {(1.0, 0): [0.0, 0.1, 0.2], (1.0, 1): [0.0, 0.3, 0.4], (1.0, 2): [0.0, 0.2, 0.9],
              (4.0, 0): [0.1, 0.5, 0.6]}
    for (beta, seed), mig in values.items():
        rows = [{"step": s, "mig": m, "factor_vae_score.eval_accuracy": 0.5, "dci.disentanglement": 2 * m,
                 "sample_sizes": sizes, "representation": "table", "seconds": 1.0} for s, m in zip((0, 2, 4), mig)]
        _fake_run(root, f"beta={beta:g},seed={seed}", dict(base, beta=beta, seed=seed), rows)
    df = analysis.load_sweep(root)
    curves = analysis.disentanglement_curves(df)
    mig = curves[(curves.metric == "mig") & (curves.beta == 1.0)].sort_values("step")
    assert mig.step.tolist() == [0, 2, 4] and mig.seeds.tolist() == [3, 3, 3]
    np.testing.assert_allclose(mig["median"], [0.0, 0.2, 0.4])
    np.testing.assert_allclose(mig["min"], [0.0, 0.1, 0.2])
    np.testing.assert_allclose(mig["max"], [0.0, 0.3, 0.9])
    assert set(curves.configuration) == {"beta=1", "beta=4"} or set(curves.configuration) == {"β=1", "β=4"}
    dci = curves[(curves.metric == "dci.disentanglement") & (curves.beta == 4.0)]
    np.testing.assert_allclose(dci.sort_values("step")["median"], [0.2, 1.0, 1.2])
    assert "mig: num_train=10000" in analysis.along_sample_sizes(df)
    page = open(report.write_report(root, factor_runs=0)).read()
    assert "Disentanglement along training" in page and "num_train=10000" in page
    assert os.path.getsize(os.path.join(root, "figures", "disentanglement_along_training.png")) > 5000
    saved = __import__("pandas").read_csv(os.path.join(root, "disentanglement_curves.csv"))
    assert len(saved) == len(curves)
