"""Sweeps over several devices: run-axis sharding, data parallelism, two processes.

The multi-device checks run in subprocesses, since the number of CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``) must be set before jax starts; they run
at the same time (one fixture), and compare with a one-device launch of the same sweep.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import checkpoints, rundir, runs, sharding, sweep
from vaekl import config as config_lib

from test_sweep import REPO, table_rows

SPEC = "beta=0.5,2 latent_dim=2,3,4"  # 6 runs: on 4 devices, 8 rows (2 padding)
SPEC_2X2 = "beta=0.5,2 latent_dim=3,4"  # 4 of them, in 2 processes of 2 devices
SPEC_1 = "beta=2 latent_dim=4"  # 1 run: its batch sharded over 4 devices
OVERRIDES = {"encoder_hidden": (16,), "decoder_hidden": (16,), "batch_size": 16, "num_steps": 20,
             "eval_every": 20, "log_every": 10, "checkpoint_every": 20, "num_images": 4,
             "eval_batch_size": 120, "num_eval_train": 360}  # 360 = the test set: one evaluation program
CONFIG = "experiments/configs/digits_mlp.py"


def _env(devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


def _launcher(workdir: str, spec: str, *extra: str) -> subprocess.Popen:
    flags = [f"--config.{k}={'(' + ','.join(map(str, v)) + ',)' if isinstance(v, tuple) else v}"
             for k, v in OVERRIDES.items()]
    return subprocess.Popen([sys.executable, "-m", "launch.sweep", f"--config={CONFIG}", *flags, f"--sweep={spec}",
                             "--backend=vmap", f"--workdir={workdir}", *extra], cwd=REPO, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# One process of a two-process sweep: jax.distributed on localhost, 2 CPU devices each. It trains
# to step 10, then resumes from the checkpoints its process saved and trains to step 20.
PROCESS = r"""
import json, runpy, sys
import jax
port, pid, workdir, spec, overrides = sys.argv[1:]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(pid))
from vaekl import sweep
base = runpy.run_path("experiments/configs/digits_mlp.py")["get_config"]()
for k, v in json.loads(overrides).items():
    base[k] = tuple(v) if isinstance(v, list) else v
for num_steps in (10, base.num_steps):
    base.num_steps = num_steps
    points = sweep.points(spec, base)
    reports = sweep.run_groups([c.to_dict() for _, _, c in points], [f"{workdir}/{n}" for n, _, _ in points],
                               max_group=4, report=True)
    print("REPORT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                                  "num_steps": num_steps, "names": [n for n, _, _ in points],
                                  "reports": reports}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Every multi-device sweep at once: {name: (workdir, stdout, stderr)}."""
    tmp = tmp_path_factory.mktemp("sharding")
    procs = {"d4": _launcher(f"{tmp}/d4", SPEC),  # every visible device (4)
             "d1": _launcher(f"{tmp}/d1", SPEC, "--devices=1"),
             "dp4": _launcher(f"{tmp}/dp4", SPEC_1)}  # 1 run < 4 devices: data parallel
    port = _free_port()
    for i in range(2):
        procs[f"p{i}"] = subprocess.Popen(
            [sys.executable, "-c", PROCESS, str(port), str(i), f"{tmp}/mp", SPEC_2X2, json.dumps(OVERRIDES)],
            cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{name}:\n{stdout}\n{stderr[-3000:]}"
        workdir = f"{tmp}/mp" if name.startswith("p") else f"{tmp}/{name}"
        out[name] = (workdir, stdout, stderr)
    return out


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(got_dir: str, want_dir: str, rtol: float, extra: frozenset = frozenset()) -> None:
    """Same metrics.jsonl rows (keys, order, values) and final parameters, to ``rtol``; the
    (step, split) rows in ``extra`` are only in ``got_dir`` (and must be there)."""
    got, want = _rows(got_dir), _rows(want_dir)
    assert extra <= {(r["step"], r["split"]) for r in got}
    got = [r for r in got if (r["step"], r["split"]) not in extra]
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    assert len({(r["step"], r["split"]) for r in got}) == len(got)  # each row written once
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("step", "split"):
                np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=f"{got_dir} {a['step']} "
                                                                                    f"{a['split']} {k}")
    pa, pb = _final_params(got_dir), _final_params(want_dir)
    assert pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=rtol, atol=1e-6, err_msg=f"{got_dir} {k}")


def _final_params(run_dir: str) -> dict[str, np.ndarray]:
    """{'.params[...]': array} of the run's checkpoint at the last step."""
    run = runs.load(run_dir, step="latest")
    assert run.step == OVERRIDES["num_steps"]
    return {".params" + jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(run.params)[0]}


# ---------------------------------------------------------------------------
# Layout (no devices needed).


def test_layout_assign_and_groups():
    assert sharding.layout(6, 4) == (4, 1)  # runs only
    assert sharding.layout(2, 4) == (2, 2)  # fewer runs than devices: the batch shares the rest
    assert sharding.layout(1, 4) == (1, 4)
    assert sharding.layout(3, 4) == (2, 2)
    assert sharding.layout(6, 4, data_parallel=True) == (1, 4)
    assert sharding.layout(1, 4, data_parallel=False) == (4, 1)
    assert sharding.layout(1, 4, batch_size=6) == (2, 2)  # the data axis divides the batch
    assert sharding.layout(1, 4, per_process=2) == (2, 2)  # and stays within a process
    rows, fill = sharding.assign(6, 4)
    assert rows == (0, 1, 2, 3, 4, 6) and fill == (0, 1, 2, 3, 4, 4, 5, 5)
    assert [fill[r] for r in rows] == list(range(6))  # a run's row holds it
    rows, fill = sharding.assign(2, 4)
    assert rows == (0, 1) and fill == (0, 1, 0, 0)
    assert sharding.assign(5, 1) == ((0, 1, 2, 3, 4), (0, 1, 2, 3, 4))
    # Split grids come in multiples of the devices: 10 runs, at most 8 → 8 + 2, not 5 + 5.
    base = config_lib.defaults()
    configs = [sweep.apply(base, o) for o in sweep.parse("beta=1,2,3,4,5 latent_dim=2,3", base)]
    assert sorted(len(g) for g in sweep.groups(configs, 8, multiple=4)) == [2, 8]
    assert sorted(len(g) for g in sweep.groups(configs, 8)) == [5, 5]
    assert [len(g) for g in sweep.groups(configs, 10, multiple=4)] == [10]


def test_placement_puts_and_gets_each_run():
    placement = sharding.plan(3)  # this process's devices (1 CPU device under pytest)
    assert placement.local_runs == (0, 1, 2) and placement.num_runs == 3
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.arange(3, dtype=np.int32)}
    placed = placement.put_runs(tree)
    assert placed["w"].shape == (placement.padded, 4) and placed["w"].sharding == placement.runs_sharding
    jax.tree.map(np.testing.assert_array_equal, placement.to_host(placed), tree)
    keys = jnp.stack([jax.random.key(i) for i in range(3)])
    got = placement.put_runs(keys)
    assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(got))[list(placement.rows)], jax.random.key_data(keys))
    with pytest.raises(ValueError, match="3 local run"):
        placement.put_runs(np.zeros((2, 4)))
    assert "3 runs on 1 device" in placement.describe()


def test_process_local_checkpoints(tmp_path):
    """The format each process of a jax.distributed job writes, forced here in one process."""
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    rundir.write_config(run_dir, {"beta": 2.0})
    states = {s: {"w": np.full((2, 3), s, np.float32), "b": jnp.arange(3.0) + s, "step": np.int32(s)}
              for s in (0, 10, 20, 30)}
    # A run begun with orbax (one process) goes on in the process-local format.
    first = checkpoints.manager(run_dir, keep=1, process_local=False)
    checkpoints.save(first, 0, states[0], 5.0)
    first.wait_until_finished()
    first.close()
    mgr = checkpoints.manager(run_dir, keep=1, process_local=True)
    assert isinstance(mgr, checkpoints.LocalManager)
    for s, metric in ((10, 3.0), (20, 4.0)):
        checkpoints.save(mgr, s, states[s], metric)
    assert mgr.all_steps() == [10, 20] and mgr.best_step() == 10  # the latest 1 and the best
    ckpt = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(f"{ckpt}/20")) == ["_CHECKPOINT_METADATA", checkpoints.LOCAL_STATE]
    assert rundir.latest_checkpoint(run_dir) == 20 and rundir.checkpoint_config(run_dir) == (20, {"beta": 2.0})
    reader = checkpoints.manager(run_dir, keep=1, read_only=True)  # its marker says which format
    assert isinstance(reader, checkpoints.LocalManager)
    step, got = checkpoints.restore_step(reader, "best", states[0])
    assert step == 10 and isinstance(got["b"], jax.Array)
    jax.tree.map(np.testing.assert_array_equal, got, states[10])
    with pytest.raises(checkpoints.CorruptCheckpoint, match="step 20.*unreadable"):  # another tree
        checkpoints.restore(mgr, 20, {"w": states[0]["w"]})
    # Damaged bytes fail the restore, and the previous good checkpoint is used.
    path = f"{ckpt}/20/{checkpoints.LOCAL_STATE}"
    data = open(path, "rb").read()
    w = states[20]["w"].tobytes()
    assert data.count(w) == 1
    open(path, "wb").write(data.replace(w, bytes(b ^ 0x5A for b in w)))
    with pytest.raises(checkpoints.CorruptCheckpoint, match="step 20"):
        checkpoints.restore(mgr, 20, states[0])
    step, got = checkpoints.restore_latest_good(mgr, states[0])
    assert step == 10 and os.path.isdir(f"{ckpt}/20.corrupt")
    # A save cut short leaves only its temporary directory, which the next writer removes.
    os.makedirs(f"{ckpt}/30.vaekl-tmp1")
    assert rundir.latest_checkpoint(run_dir) == 10
    mgr = checkpoints.manager(run_dir, keep=1)
    assert isinstance(mgr, checkpoints.LocalManager) and "30.vaekl-tmp1" not in os.listdir(ckpt)
    checkpoints.save(mgr, 30, states[30], None)
    jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_latest_good(mgr, states[0])[1], states[30])
    with pytest.raises(ValueError, match="step 30 already exists"):
        checkpoints.save(mgr, 30, states[30], None)


# ---------------------------------------------------------------------------
# Four devices, one process: the launcher's vmap backend.


def test_runs_sharded_over_four_devices_equal_one_device(sweeps):
    d4, out4, err4 = sweeps["d4"]
    d1, out1, _ = sweeps["d1"]
    names = [n for n, _, _ in sweep.points(SPEC, config_lib.defaults())]
    assert sorted(os.listdir(d4)) == sorted(names)  # the padding runs wrote nothing
    rows = table_rows(out4)
    assert set(rows) == set(names) and {v[1] for v in rows.values()} == {"completed"}
    # The table and the progress line say what each program used.
    assert all(line.split()[5] == "6r/4d" for line in out4.splitlines() if line.split()[:1] and line.split()[0] in names)
    assert "program ×1: 6 runs (+2 padding) on 4 devices (runs 4 × data 1)" in out4
    assert "program ×1: 6 runs on 1 device (runs 1 × data 1)" in out1
    assert "progress: 6/6 runs done" in err4 and "last program: 6 runs (+2 padding) on 4 devices" in err4
    for name in names:
        assert_same_run(f"{d4}/{name}", f"{d1}/{name}", rtol=2e-5)


def test_single_run_shards_its_batch_and_equals_one_device(sweeps):
    dp4, out, _ = sweeps["dp4"]
    d1, _, _ = sweeps["d1"]
    assert "program ×1: 1 run on 4 devices (runs 1 × data 4)" in out
    assert_same_run(f"{dp4}/beta=2,latent_dim=4", f"{d1}/beta=2,latent_dim=4", rtol=2e-5)


# ---------------------------------------------------------------------------
# Two processes (jax.distributed on localhost), 2 devices each.


def test_two_processes_share_one_program_and_write_their_own_runs(sweeps):
    d1, _, _ = sweeps["d1"]
    mp = sweeps["p0"][0]
    phases = []  # [process][phase]: trained to step 10, then resumed to 20
    for i in range(2):
        lines = [l for l in sweeps[f"p{i}"][1].splitlines() if l.startswith("REPORT ")]
        phases.append([json.loads(l[len("REPORT "):]) for l in lines])
    assert [[p["num_steps"] for p in ps] for ps in phases] == [[10, 20]] * 2
    reports = [ps[1] for ps in phases]
    names = reports[0]["names"]
    assert len(names) == 4 and sorted(os.listdir(mp)) == sorted(names)
    written = [{n for n, r in zip(names, rep["reports"]) if r["written"]} for rep in reports]
    assert written[0] and written[1] and not written[0] & written[1] and written[0] | written[1] == set(names)
    for ps, own in zip(phases, written):
        assert {n for n, r in zip(names, ps[0]["reports"]) if r["written"]} == own  # same owner both times
    for rep in (p for ps in phases for p in ps):
        assert rep["devices"] == 4
        for r in rep["reports"]:
            assert r["error"] is None
            assert r["program"] == {"runs": 4, "padded": 4, "devices": 4, "runs_axis": 4, "data_axis": 1,
                                    "processes": 2}
    for name in names:
        owner = next(i for i in range(2) if name in written[i])
        with open(f"{mp}/{name}/meta.json") as f:
            argv = shlex.split(json.load(f)["command"])  # python -c PORT PID ...
        assert argv[3] == str(owner)  # written by the process that holds it
        # Each process saved its own runs' checkpoints, in the process-local format.
        ckpt = f"{mp}/{name}/checkpoints"
        assert os.path.exists(f"{ckpt}/{checkpoints.LOCAL_FORMAT}")
        steps = runs_steps(ckpt)
        assert {10, 20} <= set(steps)
        for s in steps:
            assert sorted(os.listdir(f"{ckpt}/{s}")) == ["_CHECKPOINT_METADATA", checkpoints.LOCAL_STATE]
        # The resumed run equals an uninterrupted one; the step-10 evaluation rows of the first
        # phase were kept (a restart from scratch would have cut them).
        assert_same_run(f"{mp}/{name}", f"{d1}/{name}", rtol=2e-5, extra=frozenset({(10, "train"), (10, "test")}))


def runs_steps(ckpt: str) -> list[int]:
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
