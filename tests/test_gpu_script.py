"""benchmarks/gpu/run.sh, the one call a lent GPU gets, in its --tiny mode on the CPU: every
part runs and writes its results, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_script_tiny_mode_writes_every_result(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PY=sys.executable, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               VAEKL_MNIST_NPZ=str(tmp_path / "absent.npz"))  # the MNIST part is skipped without data
    proc = subprocess.run(["bash", "benchmarks/gpu/run.sh", str(out), "--tiny"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing) == {"env", "tests", "conv_step", "sweep", "slice"}, timing
    failed = {k: v for k, v in timing.items() if v["exit"] != 0}
    assert not failed, (failed, {k: (out / f"{k}.log").read_text()[-2000:] for k in failed})

    assert json.loads((out / "env.json").read_text())["backend"] == "cpu"
    assert 'failures="0"' in (out / "tests.xml").read_text()
    step = json.loads((out / "conv_step.json").read_text())
    assert step["seconds_per_step"]["vaekl"] > 0 and step["group"]["sequential"] > 0
    assert "runs" in (out / "sweep.log").read_text()

    sl = json.loads((out / "slice.json").read_text())
    assert sl["tiny"] and sl["models"] == 4 and sl["backend"] == "cpu"
    for rec in sl["records"]:  # metrics along training at several steps, with their sample sizes
        steps = [r["step"] for r in rec["along_training"]]
        assert steps == sorted(steps) and len(steps) >= 2 and steps[0] == 0, steps
        assert rec["sample_sizes"]["mig"]["num_train"] == 200
    with tarfile.open(out / "runs.tgz") as tgz:
        names = tgz.getnames()
    assert any(n.endswith("disentanglement.jsonl") for n in names)
    assert not any("/checkpoints/" in n for n in names)
