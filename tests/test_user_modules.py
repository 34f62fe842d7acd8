"""User code outside the package, end to end: a module on PYTHONPATH (not under vaekl) defines a
regularizer (the README's example), a metric and a dataset; a run trained with --import
records it, and evaluation, reports and runs.load import it again from config.json."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from vaekl import cli, config as config_lib, user_modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "my_vae_extras"

# Appended to the README's regularizer: a metric of its own and a dataset of 8×8 images.
EXTRAS = '''
import numpy as np
from vaekl import data, metrics

metrics.declare("mean_abs_mu", "E|μ(x)|, the mean absolute posterior mean (a user metric)")


def l2_means_and_abs(inp, hp, static):
    out = l2_means(inp, hp, static)
    return Output(out.penalty, {**out.metrics, "mean_abs_mu": jnp.abs(inp.q.mean).mean()})


regularizers.register(Regularizer("l2_abs", l2_means_and_abs, ("l2_lambda",), "a user test"))


def stripes(data_dir, test_fraction, seed):
    """Horizontal or vertical 8×8 stripes, 300 train and 100 test images."""
    rng = np.random.default_rng(seed)
    def images(n):
        x = np.zeros((n, 8, 8, 1), np.uint8)
        for i, (axis, k) in enumerate(zip(rng.integers(0, 2, n), rng.integers(0, 8, n))):
            if axis:
                x[i, k] = 255
            else:
                x[i, :, k] = 255
        return x
    return data.Dataset("stripes", images(300), np.full(300, -1, np.int32), images(100),
                        np.full(100, -1, np.int32))


data.register_source("stripes", stripes)
'''

TINY = ["--config=experiments/configs/digits_mlp.py", "--config.dataset=stripes", "--config.regularizer=l2_abs",
        "--config.l2_lambda=0.5", "--config.encoder_hidden=(16,)", "--config.decoder_hidden=(16,)",
        "--config.latent_dim=3", "--config.batch_size=20", "--config.num_steps=10", "--config.eval_every=10",
        "--config.log_every=5", "--config.checkpoint_every=10", "--config.eval_batch_size=100",
        "--config.num_eval_train=100", "--config.num_images=4"]


def readme_regularizer() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("### Adding a regularizer", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(args: list[str], pythonpath: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(pythonpath))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=600)


def test_train_evaluate_report_and_load_a_run_of_a_user_module(tmp_path):
    plugin_dir = tmp_path / "user_code"
    plugin_dir.mkdir()
    (plugin_dir / f"{MODULE}.py").write_text(readme_regularizer() + EXTRAS)
    path = [REPO, str(plugin_dir)]
    workdir = str(tmp_path / "run")

    out = run(["-m", "experiments.train", f"--import={MODULE}", *TINY, f"--workdir={workdir}"], path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["imports"] == [MODULE] and saved["dataset"] == "stripes" and saved["l2_lambda"] == 0.5
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert {"l2_means", "mean_abs_mu"} <= set(rows[-1]), rows[-1]

    # Neither command names the module: config.json does.
    out = run(["-m", "experiments.evaluate", f"--workdir={workdir}", "--num_samples=4", "--chunk=4",
               "--num_draws=2", "--nodisentanglement"], path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        ev = json.load(f)
    assert ev["step"] == 10 and "mean_abs_mu" in json.dumps(ev)

    code = ("import sys; from vaekl import runs; r = runs.load(sys.argv[1]); "
            "print(r.step, r.config.regularizer, r.config.dataset, r.model.encoder is not None)")
    out = run(["-c", code, workdir], path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["10", "l2_abs", "stripes", "True"]

    out = run(["-m", "experiments.report", f"--workdir={workdir}"], path)
    assert out.returncode == 0, out.stderr[-3000:]

    # Without the module's directory on PYTHONPATH: one line naming the module and the hint.
    out = run(["-m", "experiments.evaluate", f"--workdir={workdir}", "--num_samples=4", "--chunk=4",
               "--num_draws=2", "--nodisentanglement"], [REPO])
    assert out.returncode == cli.EXIT_USER_ERROR, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot import user module 'my_vae_extras'") and "PYTHONPATH" in error
    out = run(["-m", "experiments.train", f"--import={MODULE}", *TINY, f"--workdir={tmp_path / 'r2'}"], [REPO])
    assert out.returncode == cli.EXIT_USER_ERROR and "PYTHONPATH" in out.stderr.strip().splitlines()[-1]


def test_module_names_and_import_errors():
    assert user_modules.names(["a,b", " c ", "a", ""]) == ("a", "b", "c")
    assert user_modules.merge(("a",), ["b,a"], None) == ("a", "b")
    assert cli.import_flag_values(["--import=a,b", "--x=1", "--import", "c", "--", "--import=d"]) == ("a", "b", "c")
    assert user_modules.import_all("json,os.path") == ("json", "os.path")
    with pytest.raises(user_modules.UserModuleError, match=r"'no_such_module_xyz'.*PYTHONPATH"):
        user_modules.import_all(["no_such_module_xyz"])
    with pytest.raises(user_modules.UserModuleError, match="not a module name"):
        user_modules.import_all(["../evil"])
    c = config_lib.defaults()
    c.imports = ("no_such_module_xyz",)
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        config_lib.validate(c)
    c.imports = ("",)
    with pytest.raises(ValueError, match="config.imports"):
        config_lib.validate(c)


def test_local_sweep_children_get_the_modules_as_flags():
    """(In a child process: launch.sweep is an absl main whose flags clash with other mains'.)"""
    code = textwrap.dedent("""
        import ml_collections
        from launch import sweep as launch_sweep
        from vaekl import config as config_lib
        base = config_lib.defaults()
        c = ml_collections.ConfigDict(base.to_dict())
        c.imports = ("json",)
        c.beta = 2.0
        cmd = launch_sweep.train_command("cfg.py", base, launch_sweep.Run("b", c, {}, "/w/b"))
        assert "--import=json" in cmd and "--config.beta=2.0" in cmd, cmd
        assert not any(a.startswith("--config.imports") for a in cmd), cmd
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# The README's "Adding a dataset, a model or a disentanglement metric", made concrete: a dataset
# with ground-truth factors (stripes: axis × position), an architecture with a config field of
# its own, and a metric; each one declaration.
REGISTRIES = '''
import numpy as np
from vaekl import data, disentanglement, dsprites
from vaekl.models import architectures, networks


def _grid():
    factors = np.array([(a, k) for a in range(2) for k in range(8)])
    images = np.zeros((16, 8, 8), np.uint8)
    for i, (a, k) in enumerate(factors):
        if a:
            images[i, k] = 1
        else:
            images[i, :, k] = 1
    return images, factors


@data.source("stripes_gt", factors=True, files="none")
def stripes_gt(data_dir, test_fraction, seed):
    images, factors = _grid()
    truth = dsprites.ArrayGroundTruth(images, factors, factor_names=("axis", "position"))
    return data.ground_truth_dataset("stripes_gt", truth, seed, n_train=64, n_test=64)


@architectures.register("one_layer", fields={"one_layer_width": 24})
def one_layer(config, image_shape, rngs):
    enc = networks.MLPEncoder(image_shape, (config.one_layer_width,), config.activation, rngs=rngs)
    dec = networks.MLPDecoder(config.latent_dim, (config.one_layer_width,), image_shape, config.activation,
                              rngs=rngs)
    return enc, dec


@disentanglement.metric("axis_spread", encodings=lambda sizes, _: sizes["num_train"],
                        titles={"axis_spread": "axis spread"})
def axis_spread(ground_truth_data, representation, rng, *, num_train=32):
    codes, factors = disentanglement.sample_codes_and_factors(ground_truth_data, representation, num_train, rng)
    axis = factors[:, 0] == 1
    if axis.all() or not axis.any():
        return {"axis_spread": 0.0}
    return {"axis_spread": float(np.abs(codes[axis].mean(0) - codes[~axis].mean(0)).max())}
'''


def test_a_user_dataset_architecture_and_metric_train_score_evaluate_and_load(tmp_path):
    plugin_dir = tmp_path / "user_code"
    plugin_dir.mkdir()
    (plugin_dir / "my_registries.py").write_text(REGISTRIES)
    path = [REPO, str(plugin_dir)]
    workdir = str(tmp_path / "run")
    small = json.dumps({"mig": {"num_train": 64}, "axis_spread": {"num_train": 16}})
    args = ["--config=experiments/configs/digits_mlp.py", "--config.dataset=stripes_gt",
            "--config.model=one_layer", "--config.one_layer_width=12", "--config.latent_dim=2",
            "--config.batch_size=16", "--config.num_steps=6", "--config.eval_every=6", "--config.log_every=3",
            "--config.checkpoint_every=3", "--config.metric_every=3", "--config.eval_batch_size=16",
            "--config.num_eval_train=64", "--config.num_images=4", "--config.metric_names=('mig','axis_spread')",
            f"--config.metric_options={small}"]
    out = run(["-m", "experiments.train", "--import=my_registries", *args, f"--workdir={workdir}"], path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["model"] == "one_layer" and saved["one_layer_width"] == 12
    with open(os.path.join(workdir, "disentanglement.jsonl")) as f:
        along = [json.loads(line) for line in f]
    assert [r["step"] for r in along] == [0, 3, 6] and all(0 <= r["axis_spread"] for r in along)
    assert along[0]["sample_sizes"]["axis_spread"] == {"num_train": 16}

    # Evaluation scores every registered metric of the means, the user's included.
    sizes = {"factor_vae_score": {"num_train": 10, "num_eval": 5, "num_variance_estimate": 64, "batch_size": 8},
             "beta_vae_score": {"num_train": 10, "num_eval": 5, "batch_size": 8},
             "dci": {"num_train": 64, "num_test": 32}, "sap": {"num_train": 64, "num_test": 32},
             "modularity_explicitness": {"num_train": 64, "num_test": 32},
             "gaussian_total_correlation_score": {"num_train": 64}, "mig": {"num_train": 64}}
    evaluate = ["-m", "experiments.evaluate", f"--workdir={workdir}", "--num_samples=4", "--chunk=4",
                "--num_draws=2", "--batch_size=16", f"--metric_options={json.dumps(sizes)}"]
    out = run(evaluate, path)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        scores = json.load(f)["disentanglement"]
    assert "axis_spread" in scores and "mig" in scores

    code = ("import sys; from vaekl import runs; r = runs.load(sys.argv[1], 'latest'); "
            "print(r.step, r.config.model, r.model.encoder.features)")
    out = run(["-c", code, workdir], path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["6", "one_layer", "12"]
