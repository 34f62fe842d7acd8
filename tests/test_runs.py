"""The run directory as an API: loading, status, torn metrics, the lock, verified checkpoints,
one-line CLI errors, and the launcher's handling of locked runs and signals."""

from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vaekl import checkpoints, cli, rundir, runs, sweep, train
from vaekl import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def tiny_config(**overrides):
    c = config_lib.defaults()
    c.encoder_hidden = (16,)
    c.decoder_hidden = (16,)
    c.latent_dim = 3
    c.batch_size = 16
    c.num_steps = 20
    c.eval_every = 10
    c.log_every = 10
    c.checkpoint_every = 10
    c.keep_checkpoints = 3
    c.eval_batch_size = 128
    c.num_eval_train = 128
    c.num_images = 0
    for k, v in overrides.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (checkpoints 0, 10, 20, 200 validation images) with meta.json;
    tests copy it to change it."""
    run_dir = str(tmp_path_factory.mktemp("trained") / "run")
    train.train_and_evaluate(tiny_config(**TRAINED), run_dir)
    if not os.path.exists(os.path.join(run_dir, rundir.META)):  # until the trainer writes it
        rundir.write_meta(run_dir, {"image_shape": [8, 8, 1], "train_size": 1437, **rundir.provenance()})
    return run_dir


def copy_run(trained, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns(rundir.LOCK))
    return dst


TRAINED = dict(validation_size=200)  # the `trained` fixture's config: tiny_config(**TRAINED)


def like_state(config=None):
    return train.create(config or tiny_config(), (8, 8, 1))[1]


# ---------------------------------------------------------------------------
# Loading and status.


def test_load_restores_the_checkpoint_without_the_training_set(trained, monkeypatch):
    from vaekl import data

    def no_data(*args, **kwargs):
        raise AssertionError("runs.load loaded the dataset although meta.json gives the shape")

    monkeypatch.setattr(data, "load", no_data)
    run = runs.load(trained, "latest")
    assert run.step == 20 and run.config.latent_dim == 3 and run.config.encoder_hidden == (16,)
    evals = run.metrics[run.metrics.split.isin(["train", "test"])]
    assert sorted(zip(evals.step, evals.split)) == sorted((s, sp) for s in (0, 10, 20) for sp in ("train", "test"))
    # Step 0 is the initial state, which the seed determines: an independent check of the restore.
    first = runs.load(trained, 0)
    jax.tree.map(np.testing.assert_array_equal, first.params, like_state().params)
    assert not np.array_equal(first.params["head"]["mean"]["kernel"], run.params["head"]["mean"]["kernel"])
    x = np.ones((2, 8, 8, 1), np.float32) * 0.5
    assert run.model.reconstruct(x).shape == (2, 8, 8, 1)
    # "best" is the kept checkpoint with the lowest logged validation −ELBO, never chosen on test.
    valid = run.metrics[run.metrics.split == "valid"].set_index("step").neg_elbo
    assert sorted(valid.index) == [0, 10, 20]
    assert runs.load(trained, "best").step == int(valid.idxmin())
    assert json.load(open(os.path.join(trained, rundir.META)))["train_size"] == 1438 - 200  # digits: 1797 images, 20 % test
    with pytest.raises(ValueError, match=r"no checkpoint at step 7 .*\[0, 10, 20\]"):
        runs.load(trained, 7)


def test_load_without_meta_falls_back_to_the_dataset(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    os.remove(os.path.join(run_dir, rundir.META))
    assert rundir.read_meta(run_dir) == {}
    assert runs.Run(run_dir).image_shape() == (8, 8, 1)
    assert runs.load(run_dir, "latest").step == 20


def test_status_config_and_meta(trained, tmp_path):
    assert rundir.status(trained, tiny_config()) == "done"
    assert rundir.status(trained, tiny_config(num_steps=40)) == "partial"
    assert rundir.status(str(tmp_path / "nothing"), tiny_config()) == "new"
    assert rundir.latest_checkpoint(trained) == 20
    assert sweep.status is rundir.status and sweep.latest_checkpoint is rundir.latest_checkpoint
    meta = rundir.read_meta(trained)
    assert meta["image_shape"] == [8, 8, 1] and "command" in meta
    # read_config: today's defaults under the saved fields, lists back to tuples.
    run_dir = copy_run(trained, tmp_path)
    with open(os.path.join(run_dir, rundir.CONFIG)) as f:
        saved = json.load(f)
    del saved["adam_eps"]
    rundir.atomic_write(os.path.join(run_dir, rundir.CONFIG), json.dumps(saved))
    config = rundir.read_config(run_dir)
    assert config.adam_eps == config_lib.defaults().adam_eps and config.decoder_hidden == (16,)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        rundir.read_config(str(tmp_path))


# ---------------------------------------------------------------------------
# metrics.jsonl.


def test_metrics_log_whole_lines_and_torn_last_line(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / rundir.METRICS)
    log = rundir.MetricsLog(path)
    writes, real_write = [], os.write
    monkeypatch.setattr(os, "write", lambda fd, b: writes.append(len(b)) or real_write(fd, b))
    log.append([{"step": s, "split": "test", "v": np.float32(s / 2)} for s in range(3)])
    monkeypatch.undo()
    assert len(writes) == 1  # one write() for the three lines
    assert [r["v"] for r in log.read()] == [0.0, 0.5, 1.0]

    with open(path, "a") as f:  # a crash in the middle of a line
        f.write('{"step": 3, "split": "te')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in log.read()] == [0, 1, 2]
    assert "torn last line" in caplog.text
    log.truncate(1)
    assert open(path).read().count("\n") == 2 and [r["step"] for r in log.read()] == [0, 1]

    with open(path, "a") as f:  # complete JSON without its newline is torn too
        f.write('{"step": 2, "split": "test"}')
    log.append([{"step": 2, "split": "test"}])  # cuts the fragment, then appends
    assert [r["step"] for r in log.read()] == [0, 1, 2] and open(path).read().endswith("}\n")

    with open(path, "a") as f:  # invalid JSON on the last, newline-terminated line
        f.write("{oops\n")
    assert [r["step"] for r in log.read()] == [0, 1, 2]
    lines = open(path).read().splitlines()
    with open(path, "w") as f:  # an invalid line elsewhere is an error naming file and line
        f.write("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: invalid metrics row"):
        log.read()


# ---------------------------------------------------------------------------
# The lock, with real processes.

HOLD = ("import sys; from vaekl import rundir; lock = rundir.RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); sys.stdin.readline()")


def hold(run_dir: str, tag: str = "HOLDER-TAG") -> subprocess.Popen:
    """A process holding run_dir's lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run_dir, tag], cwd=REPO, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_held_by_another_process_and_sigkill_leaves_no_stale_lock(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    holder = hold(run_dir)
    try:
        with pytest.raises(rundir.RunLocked, match=rf"in use by pid {holder.pid} on .*HOLDER-TAG"):
            rundir.RunLock(run_dir, grace=0.1).acquire()
        info = rundir.lock_holder(run_dir)
        assert info["pid"] == holder.pid and "HOLDER-TAG" in info["command"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert rundir.lock_holder(run_dir) is None  # the kernel dropped the lock with the process
    with rundir.RunLock(run_dir, grace=0.0) as lock:
        assert lock.held and rundir.lock_holder(run_dir)["pid"] == os.getpid()
        with rundir.RunLock(run_dir, grace=0.0):  # re-entrant within a process
            pass
        assert rundir.lock_holder(run_dir)["pid"] == os.getpid()  # the outer one still holds it
        other = subprocess.run([sys.executable, "-c", HOLD, run_dir], cwd=REPO, env=ENV, text=True,
                               capture_output=True, input="")
        assert other.returncode != 0 and f"in use by pid {os.getpid()}" in other.stderr
    assert rundir.lock_holder(run_dir) is None
    holder = hold(run_dir)  # released: another process can take it
    holder.stdin.close()
    assert holder.wait() == 0


# ---------------------------------------------------------------------------
# Verified checkpoints.


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["random_bytes", "flipped_bytes"])
def test_corrupt_checkpoint_falls_back_to_the_previous_good_one(trained, tmp_path, caplog, damage):
    run_dir = copy_run(trained, tmp_path)
    target = _largest_file(os.path.join(run_dir, "checkpoints", "20", "default"))
    data = bytearray(open(target, "rb").read())
    if damage == "random_bytes":
        data = os.urandom(len(data))
    else:  # same length, a few bytes changed: only the checksum can tell
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0x5A
    with open(target, "wb") as f:
        f.write(data)
    like = like_state()
    assert runs.load(run_dir, "latest").step == 10  # readers fall back and move nothing
    assert "20" in os.listdir(os.path.join(run_dir, "checkpoints"))
    mgr = checkpoints.manager(run_dir, 3)
    with pytest.raises(checkpoints.CorruptCheckpoint, match="step 20"):
        checkpoints.restore(mgr, 20, like)
    with caplog.at_level(logging.WARNING):
        step, state = checkpoints.restore_latest_good(mgr, like)
    assert step == 10 and "checkpoint step 20" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, state, checkpoints.restore(mgr, 10, like))
    assert mgr.all_steps() == [0, 10] and os.path.isdir(os.path.join(run_dir, "checkpoints", "20.corrupt"))
    checkpoints.save(mgr, 20, state, 1.0)  # saving goes on past the damaged step
    mgr.wait_until_finished()
    assert checkpoints.restore_latest_good(mgr, like)[0] == 20
    mgr.close()


def test_empty_or_all_damaged_checkpoints(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    ckpt = os.path.join(run_dir, "checkpoints")
    os.makedirs(os.path.join(ckpt, "999"))
    assert rundir.latest_checkpoint(run_dir) == 20  # an uncommitted step does not count
    like = like_state()
    mgr = checkpoints.manager(run_dir, 3)
    step, state = checkpoints.restore_latest_good(mgr, like)
    assert step == 20 and "999" not in os.listdir(ckpt) and mgr.latest_step() == 20
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(state))
    for s in (0, 10, 20):  # every checkpoint damaged: an error, and nothing is moved
        with open(os.path.join(ckpt, str(s), "_CHECKPOINT_METADATA"), "wb") as f:
            f.write(os.urandom(64))
    with pytest.raises(checkpoints.CorruptCheckpoint, match="no usable checkpoint.*step 20.*step 0"):
        checkpoints.restore_latest_good(mgr, like)
    assert {"0", "10", "20"} <= set(os.listdir(ckpt))
    mgr.close()


# ---------------------------------------------------------------------------
# The run's identity: the config inside every checkpoint, and metrics.jsonl.


def test_checkpoint_config_refuses_another_run_without_config_json(trained, tmp_path):
    assert rundir.checkpoint_config(trained) == (20, rundir.jsonable_config(tiny_config(**TRAINED).to_dict()))
    run_dir = copy_run(trained, tmp_path)
    os.remove(os.path.join(run_dir, rundir.CONFIG))
    metrics = open(os.path.join(run_dir, rundir.METRICS)).read()
    with pytest.raises(ValueError, match=r"checkpoint step 20 has a different config \(beta: 1.0 → 2.0\); "
                                         r"use a new --workdir") as e:
        train.train_and_evaluate(tiny_config(**TRAINED, beta=2.0), run_dir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(run_dir, rundir.CONFIG))  # refused before writing anything
    assert open(os.path.join(run_dir, rundir.METRICS)).read() == metrics
    # Changes that keep the run (RESUMABLE_CHANGES) are allowed; the same config resumes.
    rundir.check_config(run_dir, tiny_config(**TRAINED, eval_every=5, keep_checkpoints=4).to_dict())
    rows = train.train_and_evaluate(tiny_config(**TRAINED), run_dir)
    assert {r["split"] for r in rows} == {"train", "valid", "test"} and rundir.read_config(run_dir).beta == 1.0


def test_checkpoints_without_metrics_are_refused(trained, tmp_path):
    for damage in ("missing", "empty"):
        run_dir = copy_run(trained, tmp_path, damage)
        path = os.path.join(run_dir, rundir.METRICS)
        os.remove(path) if damage == "missing" else open(path, "w").close()
        steps = sorted(os.listdir(os.path.join(run_dir, rundir.CHECKPOINTS)))
        with pytest.raises(ValueError, match=rf"checkpoints up to step 20 but its metrics.jsonl is {damage}.*"
                                             rf"restore metrics.jsonl, or move .*checkpoints aside") as e:
            train.train_and_evaluate(tiny_config(**TRAINED), run_dir)
        assert "\n" not in str(e.value)
        assert sorted(os.listdir(os.path.join(run_dir, rundir.CHECKPOINTS))) == steps  # nothing touched
        assert os.path.exists(path) == (damage == "empty")
        with pytest.raises(ValueError, match=f"is {damage}"):  # what the launcher checks first
            rundir.check_config(run_dir, tiny_config(**TRAINED).to_dict())


# ---------------------------------------------------------------------------
# One-line errors of the command-line tools (several processes at once).

DIGITS = "--config=experiments/configs/digits_mlp.py"


def start(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env or ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_user_errors_are_one_line(tmp_path, trained):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    held = copy_run(trained, tmp_path, "held")
    holder = hold(held)
    try:
        procs = {
            "typo": start("experiments.train", DIGITS, "--config.bta=4", f"--workdir={tmp_path / 'r1'}"),
            "file": start("experiments.train", DIGITS, f"--workdir={a_file}"),
            "under_file": start("experiments.train", DIGITS, f"--workdir={a_file}/run"),
            "held": start("experiments.train", DIGITS, "--config.num_steps=20", f"--workdir={held}"),
            "traceback": start("experiments.train", DIGITS, "--config.bta=4", f"--workdir={tmp_path / 'r2'}",
                               env=dict(ENV, VAEKL_TRACEBACK="1")),
            "duplicate": start("launch.sweep", DIGITS, "--sweep=beta=1,1.0", f"--workdir={tmp_path / 's'}"),
        }
        out = {k: (p.wait(120), *p.communicate()) for k, p in procs.items()}
    finally:
        holder.stdin.close()
        holder.wait()
    for name, (rc, _, err) in out.items():
        assert rc == cli.EXIT_USER_ERROR, (name, err)
        if name != "traceback":
            assert err.strip().count("\n") == 0 and err.startswith("error: "), (name, err)
    assert out["typo"][2].strip() == "error: unknown config field 'bta' in --config.bta=4; did you mean beta?"
    assert "Traceback" in out["traceback"][2] and out["traceback"][2].strip().endswith("did you mean beta?")
    assert f"{a_file} exists and is not a directory" in out["file"][2]
    assert f"{a_file} is not a directory" in out["under_file"][2]
    assert f"in use by pid {holder.pid}" in out["held"][2]
    assert "beta=1 and beta=1.0 are the same run" in out["duplicate"][2]
    assert not any(os.path.exists(tmp_path / d) for d in ("r1", "r2", "s"))
    assert rundir.status(held, tiny_config()) == "done"  # untouched


# ---------------------------------------------------------------------------
# The launcher.

SMALL = [DIGITS, "--config.encoder_hidden=(16,)", "--config.decoder_hidden=(16,)", "--config.batch_size=16",
         "--config.eval_every=20", "--config.log_every=20", "--config.checkpoint_every=20",
         "--config.num_images=0", "--config.eval_batch_size=128", "--config.num_eval_train=128"]


def wait_for(path, text, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        assert proc.poll() is None, open(path).read()
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_launcher_waits_for_runs_held_by_another_process(tmp_path):
    """Both runs are held by another process: latent_dim=3 is finished by it, latent_dim=4 released."""
    workdir = tmp_path / "sweep"
    d3, d4 = str(workdir / "latent_dim=3"), str(workdir / "latent_dim=4")
    config = runpy.run_path(os.path.join(REPO, "experiments/configs/digits_mlp.py"))["get_config"]()
    config.update(dict(encoder_hidden=(16,), decoder_hidden=(16,), batch_size=16, eval_every=20, log_every=20,
                       checkpoint_every=20, num_images=0, eval_batch_size=128, num_eval_train=128, num_steps=20,
                       latent_dim=3))
    holder_code = (
        "import json, os, sys\n"
        "from vaekl import rundir, train, config as config_lib\n"
        "d3, d4 = sys.argv[1], sys.argv[2]\n"
        "os.makedirs(d3); os.makedirs(d4)\n"
        "l3, l4 = rundir.RunLock(d3).acquire(), rundir.RunLock(d4).acquire()\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "l4.release()\n"
        "c = config_lib.defaults(); c.update(json.loads(sys.argv[3]))\n"
        "train.train_and_evaluate(c, d3)\n"
        "l3.release()\n")
    holder_err_path = str(tmp_path / "holder.err")
    with open(holder_err_path, "w") as holder_err:
        holder = subprocess.Popen([sys.executable, "-c", holder_code, d3, d4, json.dumps(config.to_dict())],
                                  cwd=REPO, env=ENV, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=holder_err)
    assert holder.stdout.readline().strip() == "locked", open(holder_err_path).read()
    err_path = str(tmp_path / "launcher.err")
    with open(err_path, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "launch.sweep", *SMALL, "--config.num_steps=20",
                                     "--sweep=latent_dim=3,4", f"--workdir={workdir}",
                                     "--lock_poll_s=0.2"],
                                    cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=err)
    try:
        wait_for(err_path, "in use by other processes", launcher)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        stdout, _ = launcher.communicate(timeout=600)
        holder.communicate(timeout=120)
    finally:
        for proc in (launcher, holder):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = open(err_path).read()
    holder_log = open(holder_err_path).read()[-3000:]
    assert holder.returncode == 0, f"the holder failed:\n{holder_log}"
    assert launcher.returncode == 0, stdout + log
    assert f"pid {holder.pid}" in log and "latent_dim=4: released (new), training it" in log
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("latent_dim=")}
    assert rows["latent_dim=4"].split()[2] == "completed"
    assert rows["latent_dim=3"].split()[2] == "skipped" and "finished by another launch" in rows["latent_dim=3"], \
        f"{stdout}\nlauncher:\n{log}\nholder:\n{holder_log}"
    for d in (d3, d4):
        assert rundir.status(d, config) == "done"


def test_local_launcher_shows_child_errors_and_stops_children_on_sigterm(tmp_path):
    workdir = tmp_path / "sweep"
    err_path = str(tmp_path / "launcher.err")
    with open(err_path, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "launch.sweep", *SMALL, "--config.num_steps=100000",
                                     "--sweep=dataset=npz,digits", "--backend=local", "--parallel=2",
                                     "--retries=0", f"--workdir={workdir}"],
                                    cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=err)
    wait_for(err_path, "dataset=npz failed", launcher)
    wait_for(err_path, "progress: 1/2 runs done", launcher)
    log = open(err_path).read()
    child = int(log.split("started dataset=digits (attempt 1, pid ")[1].split(")")[0])
    os.kill(child, 0)  # running
    launcher.send_signal(signal.SIGTERM)
    stdout, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the launcher
        os.kill(child, 0)
    assert "SIGTERM: stopping 1 running run(s): dataset=digits" in open(err_path).read()
    npz = next(line for line in stdout.splitlines() if line.startswith("dataset=npz"))
    # The child's own one-line error, not only its exit status.
    assert "failed" in npz and "npz" in npz.split("(exit 2;")[0].split("failed", 1)[1]
