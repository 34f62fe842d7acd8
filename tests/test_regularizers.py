"""The regularizer registry: every registered regularizer is picked up here automatically.

For each one: a finite objective with gradients where they belong, a vmapped group member whose
k and strengths differ from its neighbours' moving exactly as the standalone run, and its
README row. Plus grouping (strengths never split a sweep into programs) and the README's
"add a regularizer" example, executed as written.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaekl import data, objectives, regularizers, sweep, train
from vaekl import config as config_lib
from vaekl import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(regularizers.REGISTRY)


def small_config(**overrides):
    c = config_lib.defaults()
    c.encoder_hidden = (24,)
    c.decoder_hidden = (24,)
    c.batch_size = 16
    c.num_steps = 40
    c.eval_batch_size = 64
    c.num_eval_train = 64
    c.num_images = 4
    for k, v in overrides.items():
        c[k] = v
    return c


def strengths(name: str, scale: float) -> dict:
    """The regularizer's per-run fields, moved away from their defaults by ``scale``."""
    reg = regularizers.REGISTRY[name]
    out = {}
    for f in reg.fields:
        field = regularizers.FIELDS[f]
        if not field.per_run:
            continue
        v = field.default * scale if field.default else scale
        if field.high is not None:
            v = min(v, field.high * (0.9 if scale > 1 else 0.5))
        out[f] = type(field.default)(round(v)) if isinstance(field.default, int) else float(v)
    return out


def test_registry_is_complete_and_declared():
    assert set(NAMES) >= {"kl", "free_bits", "capacity", "tcvae", "dip_i", "dip_ii", "mmd", "factor"}
    defaults = config_lib.defaults()
    for name, reg in regularizers.REGISTRY.items():
        assert reg.paper and reg.formula and reg.fn.__doc__, name
        for f in reg.fields:
            assert f in regularizers.FIELDS and f in defaults, (name, f)
    per_run = set(train.per_run_fields())
    assert {"beta", "free_bits", "capacity_max", "capacity_gamma", "tc_alpha", "tc_gamma", "dip_lambda_od",
            "dip_lambda_d_factor", "mmd_alpha", "mmd_lambda", "factor_gamma", "learning_rate"} <= per_run
    assert not {"beta_schedule", "tc_estimator", "mmd_kernel", "capacity_per_example"} & per_run


def test_readme_table_lists_every_regularizer_as_the_code_says():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("<!-- regularizers:start -->"):readme.index("<!-- regularizers:end -->")]
    assert table.strip().endswith(regularizers.markdown_table().strip())
    for name, reg in regularizers.REGISTRY.items():
        assert f"`{name}`" in table and reg.formula.replace("|", "\\|") in table, name


@pytest.mark.parametrize("name", NAMES)
def test_objective_and_gradients(name):
    c = small_config(regularizer=name, latent_dim=4, **strengths(name, 2.0))
    config_lib.validate(c)
    ds = data.load("digits")
    graphdef, state, tx = train.create(c, ds.image_shape)
    x = data.binarize(jax.random.key(0), jnp.asarray(ds.train_images[:16]), "dynamic")
    static = objectives.Static.from_config(c, ds.train_images.shape[0])
    hp = train.hyperparameters(c)

    def f(params, aux):
        from flax import nnx
        model = nnx.merge(graphdef, params)
        loss, (m, aux_loss) = objectives.objective(model, x, jax.random.key(1), jnp.int32(5), hp, static,
                                                   None, aux)
        return loss, aux_loss, m

    @jax.jit
    def everything(params, aux):
        loss, aux_loss, m = f(params, aux)
        g_loss = jax.grad(lambda p, a: f(p, a)[0], argnums=(0, 1))(params, aux)
        g_aux_loss = jax.grad(lambda p, a: f(p, a)[1], argnums=(0, 1))(params, aux)
        return loss, m, g_loss, g_aux_loss

    loss, m, g_loss, g_aux_loss = everything(state.params, state.aux)
    assert np.isfinite(float(loss)) and np.isfinite(float(m["neg_elbo"]))
    np.testing.assert_allclose(float(loss), float(m["recon"] + m["penalty"]), rtol=1e-6)
    for k in objectives.TC_PARTS:
        assert np.isfinite(float(m[k])), k
    leaves = jax.tree.leaves(g_loss[0])
    assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.any(g != 0) for g in leaves)
    if state.aux is not None:
        # The VAE's loss does not move the discriminator; the discriminator's loss moves only it.
        assert all(np.all(g == 0) for g in jax.tree.leaves(g_loss[1]))
        assert any(np.any(g != 0) for g in jax.tree.leaves(g_aux_loss[1]))
        assert all(np.all(g == 0) for g in jax.tree.leaves(g_aux_loss[0]))


@pytest.mark.parametrize("name", NAMES)
def test_vmapped_member_with_other_k_and_strengths_equals_standalone(name):
    """Two runs differing in k, in the regularizer's strengths and in the learning rate train in
    one program; after 3 steps the narrower member (whose latent axes are padded and masked)
    equals its standalone run. (Two compilations per regularizer keep this affordable.)"""
    ds = data.load("digits")
    images = jnp.asarray(ds.train_images)
    configs = [small_config(regularizer=name, latent_dim=3, seed=0, learning_rate=1e-3, **strengths(name, 0.5)),
               small_config(regularizer=name, latent_dim=6, seed=1, learning_rate=3e-3, **strengths(name, 2.0))]
    assert len(sweep.groups(configs, max_size=8)) == 1
    n = ds.train_images.shape[0]
    standalone = []
    for c in configs[:1]:
        graphdef, state, tx = train.create(c, ds.image_shape)
        fns = train.compile_fns(c, graphdef, tx, vmapped=False, dataset_size=n)
        key = jax.random.fold_in(jax.random.key(c.seed), 2)
        new, metrics = fns.run_steps(jax.tree.map(jnp.copy, state), images, train.hyperparameters(c), key,
                                     None, num_steps=3)
        standalone.append((state, new, metrics))
    big = configs[1]
    graphdef, template, tx = train.create(big, ds.image_shape)
    wide = train.create(configs[1], ds.image_shape)[1]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), train.pad_like(standalone[0][0], template), wide)
    masks = jnp.asarray([np.arange(6) < c.latent_dim for c in configs], jnp.float32)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(c.seed), 2) for c in configs])
    fns = train.compile_fns(big, graphdef, tx, vmapped=True, dataset_size=n)
    new, metrics = fns.run_steps(stacked, images, train.stack_hyperparameters(configs), keys, masks,
                                 num_steps=3)
    for i, (init, want, want_metrics) in enumerate(standalone):
        got = train.slice_like(jax.tree.map(lambda a: a[i], new), init)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, want)
        for k in want_metrics:
            np.testing.assert_allclose(metrics[k][i], want_metrics[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # The two members really trained differently (not the same run twice).
    assert not np.allclose(metrics["loss"][0], metrics["loss"][1])


def test_strength_sweeps_group_into_one_program():
    base = small_config(regularizer="capacity")
    grid = sweep.parse("capacity_max=5,25,100 capacity_gamma=100,1000 learning_rate=1e-4,1e-3 seed=0,1",
                       base)
    configs = [sweep.apply(base, p) for p in grid]
    assert len(configs) == 24 and len(sweep.groups(configs, max_size=64)) == 1
    # A static field (the estimator, the schedule's kind) does split programs.
    tc = [sweep.apply(small_config(regularizer="tcvae"), p)
          for p in sweep.parse("tc_estimator=mws,mss beta=1,6", base)]
    assert len(sweep.groups(tc, max_size=64)) == 2


def test_readme_example_adds_a_regularizer_that_trains(tmp_path):
    """The README's example, executed as written: one function, one entry, its default."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### Adding a regularizer"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    registries = (regularizers.REGISTRY, regularizers.FIELDS, metrics_lib.REGISTRY)
    before, fields_before = [dict(reg) for reg in registries], set(config_lib.defaults())
    try:
        exec(code, namespace)  # noqa: S102
        name = [n for n in regularizers.REGISTRY if n not in NAMES][0]
        field = regularizers.REGISTRY[name].fields[0]
        c = small_config(regularizer=name, num_steps=10, eval_every=10, checkpoint_every=10, log_every=5)
        c[field] = 0.5
        rows = train.train_and_evaluate(c, str(tmp_path / "run"))
        assert all(np.isfinite(r["loss"]) for r in rows)
        assert all(m in rows[0] for m, _ in regularizers.REGISTRY[name].metrics)
    finally:  # the registries as they were: later tests (and their subprocesses) see no trace
        for reg, old in zip(registries, before):
            reg.clear()
            reg.update(old)
    assert set(config_lib.defaults()) == fields_before


def test_compile_fns_reuses_the_program_of_an_equal_key():
    """Runs that differ only in per-run values (strengths, learning rate, seed) get the same
    jitted functions, so nothing is traced or compiled again; a static field, another model
    or another registry entry under the same name gets new ones."""
    base = small_config(regularizer="capacity")
    graphdef, _, tx = train.create(base, (8, 8, 1))
    fns = train.compile_fns(base, graphdef, tx, vmapped=False, dataset_size=100)
    other = small_config(regularizer="capacity", capacity_max=50.0, learning_rate=3e-4, seed=7)
    g2, _, tx2 = train.create(other, (8, 8, 1))
    assert train.compile_fns(other, g2, tx2, vmapped=False, dataset_size=100) is fns
    assert train.compile_fns(base, graphdef, tx, vmapped=True, dataset_size=100) is not fns
    assert train.compile_fns(base, graphdef, tx, vmapped=False, dataset_size=101) is not fns
    static = small_config(regularizer="capacity", eval_batch_size=50)
    assert train.compile_fns(static, graphdef, tx, vmapped=False, dataset_size=100) is not fns
    wider = small_config(regularizer="capacity", latent_dim=5)
    g3, _, tx3 = train.create(wider, (8, 8, 1))
    assert train.compile_fns(wider, g3, tx3, vmapped=False, dataset_size=100) is not fns
    old = regularizers.REGISTRY["capacity"]
    try:
        regularizers.REGISTRY["capacity"] = dataclasses.replace(old, fn=lambda inp, hp, static: old.fn(inp, hp, static))
        assert train.compile_fns(base, graphdef, tx, vmapped=False, dataset_size=100) is not fns
    finally:
        regularizers.REGISTRY["capacity"] = old
    train.clear_compiled()
    assert train.compile_fns(base, graphdef, tx, vmapped=False, dataset_size=100) is not fns
