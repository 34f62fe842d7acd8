"""End-to-end tests of the trainer, the run directory and the experiment script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pandas as pd
import pytest

from vaekl import checkpoints, data, loops, train
from vaekl import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
    c = config_lib.defaults()
    c.dataset = "digits"
    c.encoder_hidden = (32,)
    c.decoder_hidden = (32,)
    c.latent_dim = 4
    c.batch_size = 32
    c.num_steps = 60
    c.eval_every = 20
    c.log_every = 10
    c.checkpoint_every = 20
    c.eval_batch_size = 128
    c.num_eval_train = 200
    c.num_images = 16
    for k, v in overrides.items():
        c[k] = v
    return c


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(workdir, config):
    """The parameters of the latest checkpoint in workdir."""
    ds_shape = (8, 8, 1)
    _, state, _ = train.create(config, ds_shape)
    mgr = checkpoints.manager(workdir, config.keep_checkpoints)
    return checkpoints.restore(mgr, mgr.latest_step(), state).params


def test_run_writes_everything_and_metrics_are_consistent(tmp_path):
    workdir = str(tmp_path / "run")
    config = small_config()
    final = train.train_and_evaluate(config, workdir)
    assert {r["split"] for r in final} == {"train", "test"}
    for name in ("config.json", "metrics.jsonl", "reconstructions.png", "samples.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["40", "60"]  # keep 2 (+ best)

    df = pd.read_json(os.path.join(workdir, "metrics.jsonl"), lines=True)
    want = [(s, sp) for s in (0, 20, 40, 60) for sp in ("train", "test")]
    want += [(s, "train_batch") for s in range(10, 61, 10)]  # training curves every log_every
    assert sorted(zip(df.step, df.split)) == sorted(want)
    curve = df[df.split == "train_batch"]
    np.testing.assert_allclose(curve.neg_elbo, curve.recon + curve.kl, rtol=1e-5)
    np.testing.assert_allclose(curve.loss, curve.recon + curve.penalty, rtol=1e-5)
    assert (curve.beta_weight == 1.0).all() and curve.total_correlation.notna().all()
    assert curve.loss.iloc[-1] < curve.loss.iloc[0]
    for _, row in df[df.split != "train_batch"].iterrows():
        assert len(row.kl_per_dim) == config.latent_dim
        np.testing.assert_allclose(sum(row.kl_per_dim), row.kl, rtol=1e-5)
        np.testing.assert_allclose(row.neg_elbo, row.recon + row.kl, rtol=1e-6)
        np.testing.assert_allclose(row.loss, row.recon + row.penalty, rtol=1e-6)
        # β·KL, averaged over the full evaluation batches only (N is not a multiple of 128 here)
        np.testing.assert_allclose(row.penalty, config.beta * row.kl, rtol=5e-2)
        np.testing.assert_allclose(
            0.5 * (row.kl_trace + row.kl_mahalanobis - row.kl_dim + row.kl_log_det_ratio), row.kl,
            rtol=1e-3, atol=1e-3)
        assert row.kl_dim == config.latent_dim
        for term in ("kl_trace", "kl_mahalanobis", "kl_log_det_ratio"):
            assert len(row[f"{term}_per_dim"]) == config.latent_dim
            np.testing.assert_allclose(sum(row[f"{term}_per_dim"]), row[term], rtol=1e-4, atol=1e-5)
        assert 0 <= row.active_units <= config.latent_dim
        assert row.active_units == sum(v > 0.01 for v in row.au_variance)
    test = df[df.split == "test"].sort_values("step")
    assert test.neg_elbo.iloc[-1] < test.neg_elbo.iloc[0] - 5  # it learns
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["latent_dim"] == 4 and saved["beta"] == 1.0


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    config = small_config(num_steps=20, eval_every=20, checkpoint_every=20)
    a = train.train_and_evaluate(config, str(tmp_path / "a"))
    b = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert a == b
    _, s0, _ = train.create(config, (8, 8, 1))
    _, s1, _ = train.create(small_config(seed=1), (8, 8, 1))
    assert not np.array_equal(s0.params["head"]["mean"]["kernel"], s1.params["head"]["mean"]["kernel"])


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = str(tmp_path / "full")
    train.train_and_evaluate(small_config(num_steps=80), full)
    part = str(tmp_path / "part")
    train.train_and_evaluate(small_config(num_steps=40), part)
    train.train_and_evaluate(small_config(num_steps=80), part)  # resumes at 40
    assert read_rows(part) == read_rows(full)
    a, b = final_params(full, small_config()), final_params(part, small_config())
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_metrics_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(small_config(num_steps=40, checkpoint_every=40), workdir)
    rows = read_rows(workdir)
    # Pretend the run crashed after logging step 60 but before its checkpoint.
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(dict(rows[-1], step=60)) + "\n")
    train.train_and_evaluate(small_config(num_steps=60, checkpoint_every=40), workdir)
    steps = [(r["step"], r["split"]) for r in read_rows(workdir)]
    assert len(steps) == len(set(steps))
    want = [(s, sp) for s in (0, 20, 40, 60) for sp in ("train", "test")]
    assert sorted(st for st in steps if st[1] != "train_batch") == sorted(want)
    assert sorted(s for s, sp in steps if sp == "train_batch") == list(range(10, 61, 10))


def test_sigkill_mid_training_then_restart(tmp_path):
    """A run killed with SIGKILL resumes from its checkpoint and ends like an uninterrupted one."""
    args = ["--config=experiments/configs/digits_mlp.py", "--config.num_steps=3000",
            "--config.encoder_hidden=(16,)", "--config.decoder_hidden=(16,)",
            "--config.latent_dim=2", "--config.batch_size=16", "--config.eval_every=1000",
            "--config.checkpoint_every=500", "--config.log_every=500", "--config.num_images=0"]
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"--workdir={killed}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(killed, "checkpoints")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if any(500 <= s < 3000 for s in done):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "samples.png"))

    for workdir in (killed, str(tmp_path / "clean")):
        subprocess.run([sys.executable, "-m", "experiments.train", *args, f"--workdir={workdir}"],
                       cwd=REPO, check=True, capture_output=True)
    rows_k, rows_c = read_rows(killed), read_rows(str(tmp_path / "clean"))
    assert rows_k == rows_c
    config = small_config(encoder_hidden=(16,), decoder_hidden=(16,), latent_dim=2)
    jax.tree.map(np.testing.assert_array_equal, final_params(killed, config),
                 final_params(str(tmp_path / "clean"), config))


@pytest.mark.parametrize("field,value,message", [
    ("beta", -1.0, "config.beta=-1.0 must be >= 0"),
    ("latent_dim", 0, "config.latent_dim=0 must be >= 1"),
    ("model", "transformer", "config.model='transformer' is not one of"),
    ("dataset", "no_such_dataset", "no_such_dataset"),
    ("eval_every", 0, "config.eval_every=0 must be >= 1"),
])
def test_bad_config_fails_before_writing_anything(tmp_path, field, value, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.train_and_evaluate(small_config(**{field: value}), str(workdir))
    assert not workdir.exists()


def test_cli_rejects_bad_values_without_writing(tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "experiments.train",
                          "--config=experiments/configs/digits_mlp.py", "--config.beta=-2",
                          f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "config.beta=-2" in out.stderr
    assert not workdir.exists()
    out = subprocess.run([sys.executable, "-m", "experiments.train",
                          "--config=experiments/configs/digits_mlp.py", "--config.no_such_field=1",
                          f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "no_such_field" in out.stderr
    assert not workdir.exists()


def test_workdir_with_a_different_run_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(small_config(num_steps=20, eval_every=20, checkpoint_every=20), workdir)
    with pytest.raises(ValueError, match=r"different config \(beta: 1.0 → 4.0\)"):
        train.train_and_evaluate(small_config(num_steps=20, eval_every=20, checkpoint_every=20, beta=4.0),
                                 workdir)


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    config = small_config(num_steps=40, likelihood="gaussian", binarization="none", learning_rate=1e30)
    with pytest.raises(FloatingPointError, match="non-finite loss at step"):
        train.train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
    assert {r["step"] for r in read_rows(workdir)} == {0}


@pytest.mark.parametrize("overrides", [
    dict(posterior="full", prior="full"),
    dict(posterior="diag", prior="diag", beta_schedule="cyclical", beta_cycles=3),
    dict(model="conv", conv_channels=(8, 16), conv_hidden=32, activation="relu"),
    dict(likelihood="gaussian_learned", binarization="none", regularizer="free_bits", free_bits=0.5),
    dict(regularizer="capacity", capacity_max=5.0, capacity_steps=20, lr_schedule="cosine", binarization="threshold"),
    dict(binarization="fixed_stochastic", lr_schedule="iwae", output_bias_from_data=True, validation_size=100),
])
def test_model_variants_train(tmp_path, overrides):
    config = small_config(num_steps=20, eval_every=20, checkpoint_every=20, **overrides)
    rows = train.train_and_evaluate(config, str(tmp_path / "run"))
    for row in rows:
        assert np.isfinite(row["neg_elbo"]) and np.isfinite(row["loss"])
        np.testing.assert_allclose(sum(row["kl_per_dim"]), row["kl"], rtol=1e-5, atol=1e-6)


def test_evaluations_use_one_fixed_binarization_and_a_validation_split(tmp_path):
    """Two seeds of a dynamically binarized run evaluate the same binary test images (so their
    test rows differ by the model only); the validation split is held out of training and
    logged as split "valid"; "static" is refused as ambiguous."""
    config = small_config(num_steps=10, eval_every=10, checkpoint_every=10, validation_size=100)
    ds = data.load("digits")
    prepared, evals = train.prepare(config, ds)
    assert prepared.train_images.shape[0] == ds.train_images.shape[0] - 100
    np.testing.assert_array_equal(prepared.train_images, ds.train_images[:-100])  # dynamic: grey levels
    np.testing.assert_array_equal(evals["valid"], data.binarize_fixed(ds.train_images[-100:], 1))
    np.testing.assert_array_equal(evals["test"], data.binarize_fixed(ds.test_images, 2))
    _, again = train.prepare(small_config(num_steps=10, seed=7, validation_size=100), ds)
    np.testing.assert_array_equal(again["test"], evals["test"])  # the same for every seed
    fixed, fixed_evals = train.prepare(small_config(binarization="fixed_stochastic"), ds)
    assert set(np.unique(fixed.train_images)) == {0, 255}
    np.testing.assert_array_equal(fixed_evals["test"], evals["test"])
    rows = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert {r["split"] for r in rows} == {"train", "valid", "test"}
    with pytest.raises(ValueError, match="ambiguous"):
        train.train_and_evaluate(small_config(binarization="static"), str(tmp_path / "static"))
    with pytest.raises(ValueError, match="validation_size=5000 leaves no training images"):
        train.prepare(small_config(validation_size=5000), ds)



@pytest.mark.parametrize("length", [1, 3])
def test_unrolled_scan_equals_scan_and_leaves_no_loop(length):
    """loops.scan(unroll=True) is lax.scan written out: same carry and stacked outputs, and no while
    loop in the compiled program even for one step (lax.scan keeps a one-trip loop, inside
    which XLA:CPU ran the conv VAE's step ~20× slower)."""
    def f(c, x):
        return c * 1.5 + x, jax.numpy.stack([c, x])

    xs = np.arange(length, dtype=np.float32) + 1
    want = jax.lax.scan(f, np.float32(2), xs)
    got = loops.scan(f, np.float32(2), xs, unroll=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
    hlo = jax.jit(lambda c, x: loops.scan(f, c, x, unroll=True)).lower(np.float32(2), xs).compile().as_text()
    assert "while" not in hlo
    assert "while" in jax.jit(lambda c, x: jax.lax.scan(f, c, x)).lower(np.float32(2), xs).compile().as_text()


def test_materialize_keeps_values_and_a_conditional():
    """loops.materialize returns x unchanged, and its conditional survives compilation (XLA
    folds a conditional whose branches are the same computation, and the batch would be
    recomputed in every consumer again)."""
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    f = jax.jit(lambda x, step: jax.numpy.sum(jax.numpy.pad(loops.materialize(jax.numpy.sin(x), step >= 0), 1)))
    np.testing.assert_array_equal(jax.jit(loops.materialize)(x, np.int32(5) >= 0), x)
    assert " conditional(" in f.lower(x, np.int32(0)).compile().as_text()


def test_conv_steps_materialize_their_batch_on_the_cpu():
    """Conv models on the CPU ask for the batch in memory; MLPs do not."""
    from vaekl.train.step import materialize_batch
    assert materialize_batch(small_config(model="conv"))
    assert not materialize_batch(small_config())


def test_rate_leaves_out_the_compiling_first_call():
    """The logged steps/s counts from the end of the first call (which compiles): 100 steps in
    10 s after a 1-step first call of 30 s is 9.9 steps/s, not 101 / 40 s."""
    from vaekl.train.loop import rate_since_compiled
    assert rate_since_compiled(100, 1, 10.0, 30.0) == pytest.approx(9.9)
    assert rate_since_compiled(1, 1, 0.0, 30.0) == pytest.approx(1 / 30)  # only the first call so far
