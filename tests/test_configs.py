"""Every experiment and reproduction config loads and validates; none computes a data path from
where the checkout sits; the Locatello study declares the published grid."""

from __future__ import annotations

import glob
import inspect
import os
import runpy

import pytest

from experiments.reproduce import locatello_dsprites, paths
from vaekl import config as config_lib
from vaekl import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "**", "*.py"), recursive=True)
                 if "def get_config" in open(p).read())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_validates_and_takes_data_paths_from_flags_or_env(path, monkeypatch):
    monkeypatch.delenv(paths.MNIST_ENV, raising=False)
    module = runpy.run_path(path)
    args = list(locatello_dsprites.METHODS) if "locatello" in path else [None]
    for arg in args:
        c = module["get_config"](arg) if arg else module["get_config"]()
        config_lib.validate(c)
        assert "shared" not in str(c.data_dir) and REPO not in str(c.data_dir), (path, c.data_dir)
        if "get_sweep" in module:
            fn = module["get_sweep"]
            spec = fn(c) if inspect.signature(fn).parameters else fn()
            for point in sweep.parse(spec, c)[:3]:
                config_lib.validate(sweep.apply(c, point))
    monkeypatch.setenv(paths.MNIST_ENV, "/some/mnist.npz")
    c = module["get_config"](*args[:1]) if args[0] else module["get_config"]()
    if c.dataset == "npz":
        assert c.data_dir == "/some/mnist.npz"


def test_locatello_grid_is_the_published_one():
    expected = {"beta_vae": ("beta", (1, 2, 4, 6, 8, 16)), "annealed_vae": ("capacity_max", (5, 10, 25, 50, 75, 100)),
                "factor_vae": ("factor_gamma", (10, 20, 30, 40, 50, 100)),
                "dip_vae_i": ("dip_lambda_od", (1, 2, 5, 10, 20, 50)),
                "dip_vae_ii": ("dip_lambda_od", (1, 2, 5, 10, 20, 50)),
                "beta_tc_vae": ("beta", (1, 2, 4, 6, 8, 10))}
    for method, (field, values) in expected.items():
        c = locatello_dsprites.get_config(method)
        assert locatello_dsprites.method_of(c) == method
        assert (c.latent_dim, c.batch_size, c.learning_rate, c.num_steps) == (10, 64, 1e-4, 300_000)
        assert c.conv_channels == (32, 32, 64, 64) and c.conv_hidden == 256 and c.dataset == "dsprites"
        points = sweep.parse(locatello_dsprites.get_sweep(c), c)
        assert len(points) == 6 * 50
        assert sorted({p[field] for p in points}) == sorted(float(v) for v in values)
    assert locatello_dsprites.get_config("dip_vae_i").dip_lambda_d_factor == 10
    assert locatello_dsprites.get_config("dip_vae_ii").dip_lambda_d_factor == 1
    assert locatello_dsprites.get_config("annealed_vae").capacity_gamma == 1000
