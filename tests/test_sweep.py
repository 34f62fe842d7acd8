"""Sweeps: grid parsing, the vmapped-member equivalence, the launcher's backends, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import analysis, data, sweep, train
from vaekl import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
    c = config_lib.defaults()
    c.encoder_hidden = (24,)
    c.decoder_hidden = (24,)
    c.batch_size = 16
    c.num_steps = 40
    c.eval_every = 20
    c.log_every = 20
    c.checkpoint_every = 20
    c.eval_batch_size = 128
    c.num_eval_train = 128
    c.num_images = 4
    for k, v in overrides.items():
        c[k] = v
    return c


# ---------------------------------------------------------------------------
# Grid definitions.


def test_parse_and_names():
    base = config_lib.defaults()
    grid = sweep.parse("beta=0.5,1,4 latent_dim=2,8 seed=0,1", base)
    assert len(grid) == 12
    assert grid[0] == {"beta": 0.5, "latent_dim": 2, "seed": 0}
    assert isinstance(grid[0]["latent_dim"], int) and isinstance(grid[3]["beta"], float)
    assert sweep.run_name(grid[-1]) == "beta=4,latent_dim=8,seed=1"
    assert sweep.run_name(sweep.parse("beta=1.0", base)[0]) == sweep.run_name(sweep.parse("beta=1", base)[0])
    assert sweep.parse("encoder_hidden=(64,);(32,32)", base)[1]["encoder_hidden"] == (32, 32)
    for bad, msg in [("beta", "expected FIELD=V1"), ("nope=1", "unknown config field"),
                     ("latent_dim=2.5", "not a valid int"), ("beta=1 beta=2", "given twice"),
                     ("beta=x", "not a valid float"),
                     # one value written twice: refused, naming both points
                     ("beta=0.5,1,1.0", r"points beta=1 and beta=1.0 are the same run \(beta=1\)"),
                     ("latent_dim=2,2.0", "latent_dim=2 and latent_dim=2.0 are the same run"),
                     ("encoder_hidden=(64,);64", "are the same run"),
                     ("output_bias_from_data=true,1", "are the same run")]:
        with pytest.raises(ValueError, match=msg):
            sweep.parse(bad, base)
    # Exact floats: the shortest repr that reads back as the same number.
    names = [sweep.run_name(p) for p in sweep.parse("beta=0.1234567,0.1234568,1e-05,2.5e+16", base)]
    assert names == ["beta=0.1234567", "beta=0.1234568", "beta=1e-05", "beta=2.5e+16"]
    assert [float(n.split("=")[1]) for n in names] == [0.1234567, 0.1234568, 1e-05, 2.5e16]
    # Safe single path components that keep distinct values apart.
    root = "/sweep"
    values = ["../../../x", "/abs/path", "a/b", "a%2Fb", "..", ".hidden", "a,b=c", "é ü", "x" * 300, ""]
    named = [sweep.run_name({"data_dir": v}) for v in values] + [sweep.run_name({})]
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._=,+-%")
    for value, name in zip(values, named):
        assert set(name) <= allowed and not name.startswith(".") and len(name) <= sweep.MAX_NAME, (value, name)
        assert os.path.dirname(os.path.normpath(os.path.join(root, name))) == root, (value, name)
    assert len(set(named)) == len(named)
    assert named[0] == "data_dir=..%2F..%2F..%2Fx" and named[-1] == "base"
    assert named[-3].startswith("data_dir=xxxx") and len(named[-3]) < 200
    assert sweep.run_name({"data_dir": "y" * 300}) != named[-3]
    assert sweep.run_name({".x": 1}).startswith("%2Ex=")
    # Whole grids: points that give one directory or one config are refused before anything.
    assert [n for n, _, _ in sweep.points("beta=1,2 seed=0", base)] == ["beta=1,seed=0", "beta=2,seed=0"]
    with pytest.raises(ValueError, match="sweep point beta=-1"):
        sweep.points("beta=-1", base)


def test_groups_split_by_shared_fields_and_size():
    base = small_config()
    configs = [sweep.apply(base, o) for o in sweep.parse("beta=1,2 latent_dim=2,4,8 batch_size=16,32", base)]
    gs = sweep.groups(configs, max_size=4)
    assert sorted(i for g in gs for i in g) == list(range(12))
    for g in gs:
        assert len(g) <= 4
        assert len({configs[i].batch_size for i in g}) == 1
        assert [configs[i].latent_dim for i in g] == sorted(configs[i].latent_dim for i in g)
    # A run that has trained to step 100 never shares a program with new runs.
    starts = [100 if i == 3 else None for i in range(12)]
    gs = sweep.groups(configs, max_size=12, starts=starts)
    assert [3] in gs and sorted(i for g in gs for i in g) == list(range(12))


# ---------------------------------------------------------------------------
# A vmapped member is the standalone run.


# The default pair and the most general one (learned full-covariance prior and posterior); the
# learned diagonal prior lies between them (and trains in tests/test_train.py's variants).
@pytest.mark.parametrize("posterior,prior", [("diag", "std_normal"), ("full", "full")])
def test_vmapped_member_step_equals_standalone_step(posterior, prior):
    points = [(0.5, 2), (1.0, 5), (4.0, 8), (1.0, 8)]
    ds = data.load("digits")
    images = jnp.asarray(ds.train_images)
    configs = [small_config(beta=b, latent_dim=k, seed=i, posterior=posterior, prior=prior)
               for i, (b, k) in enumerate(points)]
    standalone = []
    for c in configs:
        graphdef, state, tx = train.create(c, ds.image_shape)
        fns = train.compile_fns(c, graphdef, tx, vmapped=False)
        key = jax.random.fold_in(jax.random.key(c.seed), 2)
        new, metrics = fns.run_steps(jax.tree.map(jnp.copy, state), images, train.hyperparameters(c), key,
                                     None, num_steps=3)  # run_steps donates its state
        standalone.append((state, new, metrics))

    big = small_config(latent_dim=8, posterior=posterior, prior=prior)
    graphdef, template, tx = train.create(big, ds.image_shape)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[train.pad_like(s, template) for s, _, _ in standalone])
    masks = jnp.asarray([np.arange(8) < c.latent_dim for c in configs], jnp.float32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 2) for c in configs])
    hp = train.stack_hyperparameters(configs)
    fns = train.compile_fns(big, graphdef, tx, vmapped=True)
    new, metrics = fns.run_steps(stacked, images, hp, keys, masks, num_steps=3)
    for i, (init, want, want_metrics) in enumerate(standalone):
        member = jax.tree.map(lambda a: a[i], new)
        got = train.slice_like(member, init)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                     got.params, want.params)
        np.testing.assert_allclose(metrics["loss"][i], want_metrics["loss"], rtol=1e-5)
        # The padding stays exactly zero: masked dimensions get no gradient.
        padded_back = train.pad_like(got.params, template.params)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda a: a[i], new.params), padded_back)


def test_vmapped_evaluation_equals_standalone():
    ds = data.load("digits")
    test = jnp.asarray(ds.test_images)
    configs = [small_config(beta=1.0, latent_dim=k, seed=k) for k in (3, 6)]
    big = small_config(latent_dim=6)
    graphdef, template, tx = train.create(big, ds.image_shape)
    states, singles = [], []
    for c in configs:
        g, s, t = train.create(c, ds.image_shape)
        key = jax.random.fold_in(jax.random.key(c.seed), 3)
        singles.append(train.compile_fns(c, g, t, vmapped=False, dataset_size=1000).evaluate(
            s, test, train.hyperparameters(c), jnp.int32(0), key, None))
        states.append(train.pad_like(s, template))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    masks = jnp.asarray([np.arange(6) < c.latent_dim for c in configs], jnp.float32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 3) for c in configs])
    ev = train.compile_fns(big, graphdef, tx, dataset_size=1000).evaluate(
        stacked, test, train.stack_hyperparameters(configs), jnp.int32(0), keys, masks)
    for i, (c, single) in enumerate(zip(configs, singles)):
        for name in ("neg_elbo", "recon", "kl", "kl_trace", "kl_mahalanobis", "kl_log_det_ratio", "kl_dim",
                     "loss", "index_code_mi", "total_correlation", "dimwise_kl"):
            np.testing.assert_allclose(ev[name][i], single[name], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(ev["kl_per_dim"][i][: c.latent_dim], single["kl_per_dim"], rtol=2e-5, atol=1e-7)
        np.testing.assert_array_equal(ev["kl_per_dim"][i][c.latent_dim:], 0.0)
        assert int(ev["active_units"][i]) == int(single["active_units"])


# ---------------------------------------------------------------------------
# The launcher.

SMALL_FLAGS = ["--config=experiments/configs/digits_mlp.py", "--config.encoder_hidden=(16,)",
               "--config.decoder_hidden=(16,)", "--config.batch_size=16", "--config.eval_every=100",
               "--config.log_every=100", "--config.checkpoint_every=100", "--config.num_images=4"]


def launch(workdir, sweep_spec, *extra, backend="vmap", steps=200, check=None):
    out = subprocess.run([sys.executable, "-m", "launch.sweep", *SMALL_FLAGS, f"--config.num_steps={steps}",
                          f"--sweep={sweep_spec}", f"--backend={backend}", f"--workdir={workdir}", *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    if check is not None:
        assert out.returncode == check, out.stdout + out.stderr
    return out


def table_rows(stdout):
    """{run: (before, outcome, tries)} from the launcher's closing table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and "=" in parts[0] and parts[2] in ("completed", "resumed", "skipped", "failed"):
            rows[parts[0]] = (parts[1], parts[2], int(parts[3]))
    return rows


def assert_complete(run_dir, num_steps, every=100):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    keys = [(r["step"], r["split"]) for r in rows]
    want = [(s, sp) for s in range(0, num_steps + 1, every) for sp in ("train", "test")]
    want += [(s, "train_batch") for s in range(every, num_steps + 1, every)]  # training curves
    assert sorted(keys) == sorted(want)
    for name in ("config.json", "samples.png", "reconstructions.png"):
        assert os.path.exists(os.path.join(run_dir, name))


def test_vmap_launcher_failure_among_good_runs_then_idempotent_relaunch(tmp_path):
    workdir = str(tmp_path / "sweep")
    spec = "dataset=digits,npz latent_dim=2,4"
    out = launch(workdir, spec, check=1)
    rows = table_rows(out.stdout)
    assert rows["dataset=digits,latent_dim=2"][1] == "completed"
    assert rows["dataset=digits,latent_dim=4"][1] == "completed"
    assert rows["dataset=npz,latent_dim=2"][1:] == ("failed", 2)  # tried, then retried once
    assert "npz" in out.stdout and "0 failed" not in out.stdout
    assert not os.path.exists(os.path.join(workdir, "dataset=npz,latent_dim=2"))  # nothing half-written
    for k in (2, 4):
        assert_complete(os.path.join(workdir, f"dataset=digits,latent_dim={k}"), 200)
    # Only the good runs again: everything is skipped, nothing retrained.
    before = os.path.getmtime(os.path.join(workdir, "dataset=digits,latent_dim=2", "metrics.jsonl"))
    out = launch(workdir, "dataset=digits latent_dim=2,4", check=0)
    assert {v[1] for v in table_rows(out.stdout).values()} == {"skipped"}
    assert os.path.getmtime(os.path.join(workdir, "dataset=digits,latent_dim=2", "metrics.jsonl")) == before


def test_vmap_launcher_killed_mid_sweep_resumes(tmp_path):
    workdir = str(tmp_path / "sweep")
    spec = "beta=0.5,2 latent_dim=6"
    steps = 800  # killed at its first checkpoint (step 100): 7 evaluations and checkpoints still to go
    proc = subprocess.Popen([sys.executable, "-m", "launch.sweep", *SMALL_FLAGS, f"--config.num_steps={steps}",
                             f"--sweep={spec}", "--backend=vmap", f"--workdir={workdir}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(workdir, "beta=2,latent_dim=6", "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt) and any(d.isdigit() and 0 < int(d) < steps for d in os.listdir(ckpt)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = launch(workdir, spec, steps=steps, check=0)
    rows = table_rows(out.stdout)
    assert {v[0] for v in rows.values()} == {"partial"} and {v[1] for v in rows.values()} == {"resumed"}
    for run in rows:
        assert_complete(os.path.join(workdir, run), steps, every=100)


def test_local_backend_runs_processes_and_matches_vmap(tmp_path):
    out = launch(str(tmp_path / "local"), "beta=1,4 latent_dim=3", "--parallel=2", backend="local", check=0)
    assert {v[1] for v in table_rows(out.stdout).values()} == {"completed"}
    launch(str(tmp_path / "vmap"), "beta=1,4 latent_dim=3", check=0)
    for run in ("beta=1,latent_dim=3", "beta=4,latent_dim=3"):
        a = [json.loads(l) for l in open(tmp_path / "local" / run / "metrics.jsonl")]
        b = [json.loads(l) for l in open(tmp_path / "vmap" / run / "metrics.jsonl")]
        assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
        for ra, rb in zip(a, b):  # a standalone process and a vmapped member: same run
            np.testing.assert_allclose(ra["neg_elbo"], rb["neg_elbo"], rtol=2e-3)
