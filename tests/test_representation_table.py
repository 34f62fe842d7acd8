"""The representation table (issue 20 item 5): every metric reads codes of the whole factor
grid, encoded once, and scores exactly as encoding on demand with the same random draws;
random sources (noise, random colour) refuse a table; progress lines are rate-limited."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vaekl import disentanglement as dis
from vaekl import dsprites, progress, trajectory

SMALL = {"mig": {"num_train": 300}, "dci": {"num_train": 300, "num_test": 150, "model": "random_forest"},
         "sap": {"num_train": 200, "num_test": 100}, "modularity_explicitness": {"num_train": 300, "num_test": 150},
         "gaussian_total_correlation_score": {"num_train": 300},
         "factor_vae_score": {"num_train": 40, "num_eval": 20, "num_variance_estimate": 300, "batch_size": 16},
         "beta_vae_score": {"num_train": 40, "num_eval": 20, "batch_size": 16}}


def tiny_rendered(sizes=(3, 2, 3, 4, 4)) -> dsprites.ArrayGroundTruth:
    """dSprites rendered on a small grid (the first values of each factor), as stored images."""
    factors = np.stack(np.unravel_index(np.arange(math.prod(sizes)), sizes), axis=1)
    return dsprites.ArrayGroundTruth(np.asarray(dsprites.render(factors))[..., 0] > 0, factors)


class Encoder(nnx.Module):
    """A small random conv + dense encoder: observations [B, 64, 64, 1] → codes [B, 4]."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (4, 4), strides=(4, 4), rngs=rngs)
        self.dense = nnx.Linear(16 * 16 * 4, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))


def encoder_fn():
    model = Encoder(nnx.Rngs(0))
    f = jax.jit(lambda x: model(x))
    return lambda x: np.asarray(f(jnp.asarray(x, jnp.float32)))


def rowwise(x):
    """A representation whose row i depends on observation i alone, bit for bit whatever the
    batch (integer weights on {0, 1} pixels: exact sums in any order)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    w = np.random.default_rng(1).integers(-3, 4, (x.shape[1], 5)).astype(np.float64)
    return np.tanh((x @ w) / 40.0)


@pytest.mark.parametrize("rep", [rowwise, encoder_fn()], ids=["rowwise", "conv_encoder"])
def test_table_scores_equal_encoding_on_demand(rep):
    gt = tiny_rendered()
    table = dis.representation_table(gt, rep, batch_size=64, progress_every=None)
    assert table.table.shape == (gt.num_observations, 5 if rep is rowwise else 4)
    factors = gt.sample_factors(50, np.random.default_rng(0))  # the table is the codes of the grid
    np.testing.assert_allclose(table.codes(gt, factors, None), rep(gt.sample_observations_from_factors(factors)),
                               rtol=1e-6, atol=1e-6)
    on_demand = dis.evaluate_all(gt, rep, np.random.default_rng(5), options=SMALL)
    from_table = dis.evaluate_all(gt, table, np.random.default_rng(5), options=SMALL)
    assert set(on_demand) == set(dis.representation_metrics())
    if rep is rowwise:
        assert from_table == on_demand  # exactly: same draws, same codes
    else:  # batch size may change the last float32 bits of a compiled encoder
        for name in on_demand:
            for k, v in on_demand[name].items():
                assert from_table[name][k] == pytest.approx(v, abs=1e-6), (name, k)


def test_evaluate_representation_picks_the_table_when_it_pays():
    gt = tiny_rendered()  # 288 grid points: cheaper than any metric's samples
    r = dis.evaluate_representation(gt, rowwise, np.random.default_rng(2), options=SMALL, progress_every=None)
    assert r["representation"] == "table" and r["table_seconds"] > 0
    s = dis.evaluate_representation(gt, rowwise, np.random.default_rng(2), options=SMALL, table=False,
                                    progress_every=None)
    assert s["representation"] == "on_demand" and s["scores"] == r["scores"]
    assert r["sample_sizes"]["mig"]["num_train"] == 300 and r["sample_sizes"]["dci"]["num_test"] == 150
    assert r["sample_sizes"]["beta_vae_score"]["num_train"] == 40


def test_random_sources_encode_on_demand():
    assert dsprites.DSprites("dsprites").deterministic_observations
    assert dsprites.ArrayGroundTruth(np.zeros((4, 8, 8)), np.indices((2, 2)).reshape(2, -1).T,
                                     ("a", "b")).deterministic_observations
    for variant in ("dsprites_color", "dsprites_noisy"):
        gt = dsprites.DSprites(variant)
        assert not gt.deterministic_observations and not dis.table_pays_off(gt)
        with pytest.raises(ValueError, match="deterministic_observations is False"):
            dis.representation_table(gt, rowwise)
        table = dis.RepresentationTable(np.zeros((gt.num_observations, 1), np.float32), gt.factor_sizes)
        with pytest.raises(ValueError, match="encode on demand"):
            dis.mig(gt, table, np.random.default_rng(0), num_train=10)


def test_default_sizes_need_a_table_on_dsprites():
    gt = dsprites.DSprites()
    need = {m: dis.encodings_needed(m, gt.factor_sizes) for m in dis.representation_metrics()}
    assert need == {"mig": 10_000, "factor_vae_score": 10_000 + 64 * 15_000, "beta_vae_score": 2 * 64 * 15_000,
                    "dci": 15_000, "sap": 15_000, "modularity_explicitness": 15_000,
                    "gaussian_total_correlation_score": 10_000}
    assert sum(need.values()) == 2_955_000 > gt.num_observations == 737_280
    assert dis.table_pays_off(gt)
    assert not dis.table_pays_off(gt, options=SMALL)  # reduced sizes: on demand is cheaper
    assert dis.encodings_needed("mig_sampling", gt.factor_sizes, {"grid_stride": 2}) == 2 * 3 * 20 * 16 * 16
    with pytest.raises(ValueError, match=r"mig: unknown options \['num_tran'\]"):
        dis.sample_sizes("mig", {"num_tran": 5})
    with pytest.raises(ValueError, match="unknown metric 'irs'"):
        dis.sample_sizes("irs")


def test_table_shape_and_grid_are_checked():
    with pytest.raises(ValueError, match=r"need codes \[6, d\]"):
        dis.RepresentationTable(np.zeros((5, 2)), (2, 3))
    gt = tiny_rendered()
    table = dis.RepresentationTable(np.zeros((6, 2)), (2, 3))
    with pytest.raises(ValueError, match="factor_sizes"):
        table.codes(gt, np.zeros((1, 5), np.int64), None)


def test_progress_lines_are_rate_limited_with_an_eta():
    lines, now = [], [0.0]
    bar = progress.Progress("mig", 1000, "codes", every=10.0, log=lambda fmt, *a: lines.append(fmt % a),
                            clock=lambda: now[0])
    for _ in range(10):  # 100 codes per second
        now[0] += 1.0
        bar.update(100)
    assert len(lines) == 1 and lines[0] == "mig: 1,000/1,000 codes (100 codes/s), elapsed 10 s, ETA 0 s"
    bar2 = progress.Progress("t", 1000, every=10.0, log=lambda fmt, *a: lines.append(fmt % a), clock=lambda: now[0])
    now[0] += 10.0
    bar2.update(250)
    assert lines[-1].endswith("(25 images/s), elapsed 10 s, ETA 30 s")
    assert bar2.finish() == 10.0 and lines[-1] == "t: done in 10 s (250 images)"
    assert progress.format_seconds(3725) == "1 h 02 min" and progress.format_seconds(185) == "3 min 05 s"


def test_evaluate_all_logs_each_metric(monkeypatch):
    lines = []
    for module in (progress, dis):  # vaekl's named loggers
        monkeypatch.setattr(module.LOG, "info", lambda fmt, *a: lines.append(fmt % a))
    gt = tiny_rendered()
    dis.evaluate_all(gt, rowwise, np.random.default_rng(0), metrics=["mig", "dci"], options=SMALL,
                     progress_every=1e9)
    assert lines[0] == "[1/2] mig: 300 codes (encoded on demand)"
    assert lines[2] == "[2/2] dci: 450 codes (encoded on demand)"
    assert lines[1].startswith("[1/2] mig: done in") and lines[1].endswith("(300 codes)")


def test_trajectory_options_are_checked():
    assert trajectory.parse_options("") == {}
    assert trajectory.parse_options('{"mig": {"num_train": 5}}') == {"mig": {"num_train": 5}}
    with pytest.raises(ValueError, match="is not JSON"):
        trajectory.parse_options("{mig")
    with pytest.raises(ValueError, match="unknown metric 'migg'"):
        trajectory.parse_options('{"migg": {}}')
