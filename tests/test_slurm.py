"""The Slurm backend against a real Slurm: a one-node cluster on this machine.

`.ci/run` installs Debian's slurmctld, slurmd and munge and starts the cluster with
tests/slurm/start_cluster.sh; without a cluster these tests are skipped with a message.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vaekl import runs

from test_sweep import assert_complete, launch, table_rows


def _cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:  # without a controller sinfo retries for ~10 s
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster():
    """Skips the module without a cluster; asked when its tests run, not when the suite is
    collected (a test run that deselects them does not wait for sinfo)."""
    if not _cluster_up():
        pytest.skip("no Slurm cluster here: install slurmctld, slurmd, slurm-client and munge, then run "
                    "tests/slurm/start_cluster.sh as root (.ci/run does both)")


def test_slurm_backend_runs_a_job_array_and_relaunch_skips(tmp_path):
    workdir = str(tmp_path / "sweep")
    spec = "beta=1,4 latent_dim=2,3"
    out = launch(workdir, spec, "--max_group=2", "--slurm_cpus_per_task=1", backend="slurm", check=0)
    rows = table_rows(out.stdout)
    assert len(rows) == 4 and {v[1] for v in rows.values()} == {"completed"}
    for run in rows:
        assert_complete(f"{workdir}/{run}", 200)
    # Two tasks of two runs each went through sbatch as one array.
    assert "submitted 2 Slurm task(s)" in out.stderr
    out = launch(workdir, spec, backend="slurm", check=0)
    assert {v[1] for v in table_rows(out.stdout).values()} == {"skipped"}


def test_slurm_task_of_two_processes_shares_each_program(tmp_path):
    workdir = str(tmp_path / "sweep")
    spec = "beta=1,4 latent_dim=2,3"
    out = launch(workdir, spec, "--max_group=2", "--slurm_cpus_per_task=1", "--slurm_tasks_per_node=2",
                 backend="slurm", check=0)
    rows = table_rows(out.stdout)
    assert len(rows) == 4 and {v[1] for v in rows.values()} == {"completed"}
    assert "submitted 2 Slurm task(s) of 2 process(es) each" in out.stderr
    # Each task's two processes (jax.distributed, one CPU device each) shared one program.
    assert "program ×2: 2 runs on 2 devices (runs 2 × data 1, 2 processes)" in out.stdout
    for run in rows:
        assert_complete(f"{workdir}/{run}", 200)  # one row per (step, split): one writer
        assert len(os.listdir(f"{workdir}/{run}/tensorboard")) == 1
        # Each process saved its own runs' checkpoints (process-local format, no collective).
        assert os.path.exists(f"{workdir}/{run}/checkpoints/VAEKL_FORMAT")
        assert runs.load(f"{workdir}/{run}", "latest").step == 200
