"""The gradient-variance analysis (issue 21, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vaekl import gradient_variance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variance_with_se_on_known_draws():
    """tr Cov of Gaussian draws with known per-coordinate variances, within 4 standard errors, and
    the standard error itself close to the spread over repetitions."""
    rng = np.random.default_rng(0)
    sd = np.array([0.5, 1.0, 2.0])
    estimates, ses = [], []
    for _ in range(200):
        g = rng.normal(size=(50, 3)) * sd + 7.0
        d = np.sum(np.square(g - g.mean(0)), -1)
        v, se = gradient_variance.variance_with_se(d)
        estimates.append(v)
        ses.append(se)
    estimates = np.array(estimates)
    truth = np.sum(sd**2)
    assert abs(estimates.mean() - truth) < 4 * estimates.std() / np.sqrt(len(estimates))
    np.testing.assert_allclose(np.mean(ses), estimates.std(), rtol=0.2)
    with pytest.raises(ValueError, match="at least 2 draws"):
        gradient_variance.variance_with_se(np.ones(1))


def test_groups_cover_every_parameter():
    with pytest.raises(ValueError, match="'mystery'"):
        gradient_variance.group_of("mystery")
    import jax.numpy as jnp  # noqa: PLC0415
    g = gradient_variance.flatten_groups({"encoder": {"w": jnp.ones((2, 3))}, "head": {"b": jnp.ones(2)},
                                          "decoder": {"w": jnp.ones(4)}, "likelihood": {}})
    assert g["encoder"].shape == (8,) and g["decoder"].shape == (4,) and g["total"].shape == (12,)


def test_analysis_of_a_tiny_digits_run(tmp_path):
    """Train 40 steps on digits keeping every checkpoint, run the entry point, read the JSON and the
    PNG: the decoder's gradient is the same under every estimator (same draws, the KL does not reach
    it), and the MC estimator's encoder variance is above the analytic one's."""
    from test_train import small_config  # noqa: PLC0415
    from vaekl import train  # noqa: PLC0415

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(small_config(num_steps=40, eval_every=20, checkpoint_every=20,
                                          keep_checkpoints=5), workdir)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "experiments.gradient_variance", f"--workdir={workdir}",
                          "--num_draws=24", "--batch_size=32", "--chunk=8"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(workdir, "gradient_variance.json")) as f:
        result = json.load(f)
    assert os.path.getsize(os.path.join(workdir, "gradient_variance.png")) > 1000
    rows = result["checkpoints"]
    assert [r["step"] for r in rows] == [0, 20, 40]
    for r in rows:
        a, mc, stl = r["analytic"], r["mc"], r["stl"]
        np.testing.assert_allclose(mc["decoder"]["variance"], a["decoder"]["variance"], rtol=1e-4)
        np.testing.assert_allclose(stl["decoder"]["variance"], a["decoder"]["variance"], rtol=1e-4)
        assert mc["encoder"]["variance"] - a["encoder"]["variance"] > 2 * mc["encoder"]["variance_se"]
        assert a["kl_variance"] == 0.0 and mc["kl_variance"] > 0 and mc["kl_variance_se"] > 0
        np.testing.assert_allclose(r["ratio"]["mc"]["encoder"],
                                   mc["encoder"]["variance"] / a["encoder"]["variance"])
        assert np.isclose(mc["kl_variance"], stl["kl_variance"], rtol=1e-5)  # same values
