"""Fault injection (issue 13): kills, broken files and bad inputs never lose, duplicate or hang.

Each class of the issue has a case here or, where one already exists, in another module:

  never hang            test_orbax_save_failure_exits_within_seconds_with_one_line
  torn metrics line     test_broken_members_fail_alone_and_the_launcher_prints_its_table (a member
                        whose metrics.jsonl has a bad line); test_runs.py's
                        test_metrics_log_whole_lines_and_torn_last_line (the log itself)
  one broken member     test_broken_members_fail_alone_and_the_launcher_prints_its_table
  vmapped kill/resume   test_group_killed_at_every_phase_resumes_exactly
  corrupt checkpoints   test_broken_members_… (a member without a usable checkpoint fails alone);
                        test_runs.py's test_corrupt_checkpoint_falls_back_to_the_previous_good_one
                        and test_empty_or_all_damaged_checkpoints
  config mismatch       test_broken_members_… (a member holding another config);
                        test_train.py's test_workdir_with_a_different_run_is_refused
  bad values            test_bad_values_are_refused_before_anything_is_written; test_train.py's
                        test_bad_config_fails_before_writing_anything
  run names             test_sweep.py's test_parse_and_names (names stay in the sweep directory)
  smaller (item 9)      TensorBoard without duplicate steps and pruned checkpoints after a resume
                        (test_group_killed_…), a failed run in the report
                        (test_report_marks_unfinished_runs), the local backend's error column
                        (test_child_error_carries_the_reason; test_runs.py's
                        test_local_launcher_shows_child_errors_and_stops_children_on_sigterm)

Runs are tiny MLPs on the embedded 8×8 digits; kills are injected in-process through
``vaekl.train.groups.fault_hook`` (deterministic, no timing).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from test_report import fake_run
from test_runs import ENV, REPO, SMALL, tiny_config
from vaekl import checkpoints, cli, report, rundir, runs, sweep, train

pytestmark = pytest.mark.slow


class Killed(BaseException):
    """What the fault hook raises: like a kill, nothing in vaekl catches it."""


def grid(**overrides):
    """A 4-member vmapped sweep (β and k vary): (names, configs)."""
    base = tiny_config(num_steps=10, eval_every=5, log_every=5, checkpoint_every=5, keep_checkpoints=2,
                       num_eval_train=359, **overrides)  # as many as the test split: one program
    points = sweep.points("beta=0.5,2 latent_dim=2,4", base)
    return [n for n, _, _ in points], [c for _, _, c in points]


def train_sweep(root, configs, names, kill=None):
    """run_groups over the sweep in ``root``; ``kill=(phase, step, member)`` raises Killed there."""
    dirs = [os.path.join(root, n) for n in names]

    def hook(phase, step, member):
        if (phase, step, member) == kill:
            raise Killed(kill)

    train.groups.fault_hook = hook if kill else None
    try:
        return sweep.run_groups([c.to_dict() for c in configs], dirs, max_group=4)
    finally:
        train.groups.fault_hook = None


def read_rows(run_dir):
    return rundir.MetricsLog(os.path.join(run_dir, rundir.METRICS)).read()


def event_steps(run_dir) -> dict[str, list[int]]:
    """{tag: steps, in file order} of every scalar in the run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    out: dict[str, list[int]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, rundir.TENSORBOARD, "*tfevents*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: length, its CRC, the record, its CRC
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append(event.step)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    names, configs = grid()
    root = str(tmp_path_factory.mktemp("clean"))
    assert train_sweep(root, configs, names) == [None] * 4
    return root


# ---------------------------------------------------------------------------
# A vmapped sweep resumes exactly (13.4), with TensorBoard and checkpoints as they should be (13.9).


@pytest.mark.parametrize("kill", [("member_saved", 5, 1),   # between the members' saves
                                  ("saved", 10, -1),        # all saved, before the commit
                                  ("committed", 5, -1)])    # just after the commit
def test_group_killed_at_every_phase_resumes_exactly(uninterrupted, tmp_path, kill):
    names, configs = grid()
    root = str(tmp_path)
    with pytest.raises(Killed):
        train_sweep(root, configs, names, kill)
    order = train.read_group_commit(os.path.join(root, names[0]))["members"]  # the program's runs
    assert sorted(order) == sorted(names)
    steps = [rundir.latest_checkpoint(os.path.join(root, n)) for n in order]
    committed = {train.read_group_commit(os.path.join(root, n))["step"] for n in names}
    phase, step, member = kill
    if phase == "member_saved":  # the members stand at different steps
        assert steps == [step] * (member + 1) + [step - 5] * (3 - member) and committed == {step - 5}
    elif phase == "saved":
        assert steps == [step] * 4 and committed == {step - 5}
    else:
        assert steps == [step] * 4 and committed == {step}
    starts, together = sweep.resume_plan([os.path.join(root, n) for n in names])
    assert together == [[names.index(n) for n in order]] and len(set(starts)) == 1  # one group again

    assert train_sweep(root, configs, names) == [None] * 4
    for name, config in zip(names, configs):
        killed, clean = os.path.join(root, name), os.path.join(uninterrupted, name)
        assert read_rows(killed) == read_rows(clean), name
        a, b = runs.load(killed, "latest"), runs.load(clean, "latest")
        assert a.step == b.step == 10
        jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
        tb = event_steps(killed)
        assert tb == event_steps(clean) and tb["test/neg_elbo"] == [0, 5, 10], tb.get("test/neg_elbo")
        assert train.read_group_commit(killed) == {"step": 10, "members": order}
        assert len(os.listdir(os.path.join(killed, rundir.CHECKPOINTS))) <= config.keep_checkpoints + 1


def test_resume_prunes_checkpoints_beyond_keep(uninterrupted, tmp_path):
    """A kill right after the last save leaves more than keep_checkpoints; a relaunch prunes them."""
    names, configs = grid()
    root = str(tmp_path / "sweep")
    shutil.copytree(uninterrupted, root, ignore=shutil.ignore_patterns(rundir.LOCK))
    run_dir = os.path.join(root, names[0])
    ckpt = os.path.join(run_dir, rundir.CHECKPOINTS)
    shutil.copytree(os.path.join(ckpt, "10"), os.path.join(ckpt, "3"))  # an extra, older step
    assert "3" in os.listdir(ckpt)
    assert train_sweep(root, configs, names) == [None] * 4
    kept = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
    assert 3 not in kept and len(kept) <= configs[0].keep_checkpoints + 1
    assert read_rows(run_dir) == read_rows(os.path.join(uninterrupted, names[0]))


def test_grouping_does_not_depend_on_free_memory(monkeypatch):
    from vaekl import data

    names, configs = grid()
    ds = data.load("digits")
    sizes = set()
    for pages in (10, 10**9):  # a nearly full host and an empty one
        real = os.sysconf
        monkeypatch.setattr(os, "sysconf", lambda k, p=pages: p if "PAGES" in str(k) else real(k))
        sizes.add(sweep.fitting_group_size(configs, ds))
    monkeypatch.undo()
    assert len(sizes) == 1 and sizes.pop() >= 4
    # A group that a kill interrupted is planned again as it was, even if another fits better.
    gs = sweep.groups(configs, max_size=4, starts=[5] * 4, together=[[3, 0, 2, 1]])
    assert gs == [[3, 0, 2, 1]]


# ---------------------------------------------------------------------------
# One broken member never stops the others (13.3).


def _truncate_checkpoints(run_dir):
    for step in os.listdir(os.path.join(run_dir, rundir.CHECKPOINTS)):
        files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(run_dir, rundir.CHECKPOINTS, step))
                 for f in fs]
        big = max(files, key=os.path.getsize)
        with open(big, "r+b") as f:
            f.truncate(os.path.getsize(big) // 2)


def test_broken_members_fail_alone_and_the_launcher_prints_its_table(uninterrupted, tmp_path):
    names, configs = grid()
    root = str(tmp_path / "sweep")
    shutil.copytree(uninterrupted, root, ignore=shutil.ignore_patterns(rundir.LOCK))
    garbage, torn, truncated, good = (os.path.join(root, n) for n in names)
    with open(os.path.join(garbage, rundir.CONFIG), "w") as f:
        f.write("{not json")
    lines = open(os.path.join(torn, rundir.METRICS)).read().splitlines(keepends=True)
    with open(os.path.join(torn, rundir.METRICS), "w") as f:  # a torn line that is not the last
        f.write("".join(lines[:2]) + lines[2][: len(lines[2]) // 2] + "\n" + "".join(lines[3:]))
    _truncate_checkpoints(truncated)
    longer = [sweep.apply(c, {"num_steps": 15}) for c in configs]
    errors = train_sweep(root, longer, names)
    assert errors[3] is None, errors  # the good one trains on ...
    assert rundir.latest_checkpoint(good) == 15 and max(r["step"] for r in read_rows(good)) == 15
    assert garbage in errors[0] and rundir.CONFIG in errors[0]  # ... the others fail, saying why
    assert f"{torn}/{rundir.METRICS}, line 3: invalid metrics row" in errors[1], errors[1]
    assert "unusable" in errors[2] and truncated in errors[2], errors[2]
    assert all(e.count("\n") == 0 for e in errors[:3])
    assert max(r["step"] for r in read_rows(truncated)) == 10  # nothing of it was cut or rewritten

    # The launcher: broken runs are failed rows of its table, never a crash before it.
    config_file = tmp_path / "tiny.py"
    base = {k: (list(v) if isinstance(v, tuple) else v) for k, v in configs[0].to_dict().items()}
    config_file.write_text(
        "import json\nfrom vaekl import config as config_lib\n\ndef get_config():\n"
        "    c = config_lib.defaults()\n"
        f"    for k, v in json.loads({json.dumps(json.dumps(base))}).items():\n"
        "        c[k] = tuple(v) if isinstance(v, list) else v\n    return c\n")
    out = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={config_file}",
                          "--sweep=beta=0.5 latent_dim=2,4", f"--workdir={root}"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("beta=")}
    assert set(rows) == {names[0], names[1]}, out.stdout
    assert "broken" in rows[names[0]] and "failed" in rows[names[0]] and rundir.CONFIG in rows[names[0]]
    assert "invalid metrics row" in rows[names[1]] and "0 completed, 0 resumed, 0 skipped, 2 failed" in out.stdout


# ---------------------------------------------------------------------------
# Never hang; bad values are refused before anything is written.


def test_orbax_save_failure_exits_within_seconds_with_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / rundir.CHECKPOINTS).write_text("a file where the checkpoints go")
    err_path = tmp_path / "err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *SMALL, "--config.num_steps=20",
                                 f"--workdir={workdir}"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        deadline = time.monotonic() + 300  # startup and the first compile on a busy CPU
        while "error: " not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "error: " in err_path.read_text(), err_path.read_text()[-3000:]
        rc = proc.wait(timeout=20)  # then it exits within seconds
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = err_path.read_text().strip().splitlines()[-1]
    assert rc == cli.EXIT_USER_ERROR and last.startswith("error: ") and rundir.CHECKPOINTS in last
    # orbax logs its failed thread's exception itself (a log record); the command's own
    # traceback is not printed.
    assert "experiments/train.py" not in err_path.read_text()


@pytest.mark.parametrize("field,value", [("beta", float("inf")), ("learning_rate", float("inf")),
                                         ("likelihood_sigma", float("inf")), ("free_bits", float("inf")),
                                         ("capacity_max", float("inf")), ("adam_eps", float("inf")),
                                         ("seed", 2**32), ("seed", 2**70)])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, field, value):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=field):
        train.train_and_evaluate(tiny_config(**{field: value}), str(workdir))
    assert not workdir.exists()
    with pytest.raises(ValueError, match="beta"):
        sweep.points("beta=1,1e400", tiny_config())


# ---------------------------------------------------------------------------
# Smaller (item 9): the report and the local backend's error column.


def test_report_marks_unfinished_runs(tmp_path):
    root = str(tmp_path)
    for beta in (1.0, 4.0):
        fake_run(root, {"beta": beta})
    fake_run(root, {"beta": 16.0, "num_steps": 100}, steps=(0,), name="beta=16")  # failed at step 1
    df = __import__("vaekl.analysis", fromlist=["x"]).load_sweep(root)
    assert report.unfinished_runs(df) == {"beta=16": "stopped at step 0 of 100"}
    path = report.write_report(root, term_runs=1, factor_runs=0)
    summary = open(os.path.join(root, "summary.csv")).read()
    assert summary.count("\n") == 3 and "16" not in summary.split("\n", 1)[1].split(",")[0]
    per_run = {line.split(",")[0]: line for line in open(os.path.join(root, "runs.csv")).read().splitlines()[1:]}
    assert "stopped at step 0 of 100" in per_run["beta=16"] and ",done," in per_run["beta=1"]
    page = open(path).read()
    assert "Left out, unfinished" in page and "stopped at step 0 of 100" in page


def test_child_error_carries_the_reason():
    log = "I1 starting\nW1 a warning\nerror: dataset 'npz' needs --config.data_dir\n"
    line = cli.child_error(log, cli.EXIT_USER_ERROR, "/x/run.1.log")
    assert line == "dataset 'npz' needs --config.data_dir (exit 2; log /x/run.1.log)"
    crash = "Traceback (most recent call last):\n  File x\nRuntimeError: out of memory\nI1 cleanup\n"
    assert cli.child_error(crash, -9, "l").startswith("RuntimeError: out of memory (killed by SIGKILL")
