"""Issue 21's reproduction rows (3: KL estimators, 4: priors, 5: IWAE objective) run end to end on
tiny digits settings: the config's documented sweep is valid, two of its points train and are
evaluated, and the summary reads them into the row."""

from __future__ import annotations

import json
import math

import pytest

from experiments.reproduce import (closed_vs_mc, mnist_iwae_objective, mnist_kl_estimators,
                                   mnist_priors, summarize)
from vaekl import evaluate, sweep, train

TINY = dict(dataset="digits", data_dir="", validation_size=0, encoder_hidden=(16,), decoder_hidden=(16,),
            latent_dim=4, batch_size=32, num_steps=20, eval_every=10, log_every=10, checkpoint_every=20,
            eval_batch_size=128, num_eval_train=100, num_images=4, output_bias_from_data=False,
            keep_checkpoints=2)


def _tiny(config, **more):
    for k, v in {**TINY, **more}.items():
        config[k] = v
    return config


@pytest.mark.parametrize("module,row,extra", [
    (mnist_kl_estimators, "kl_estimators", {}),
    (mnist_priors, "priors", dict(prior_components=3)),
    (mnist_iwae_objective, "iwae_objective", {}),
])
def test_row_runs_on_tiny_settings(tmp_path, module, row, extra):
    full = sweep.points(module.get_sweep(), module.get_config())  # the documented grid is valid
    assert len({p[1]["seed"] for p in full}) >= 2
    if row == "priors":  # the second documented command: N(0, I) with one component
        sweep.points("prior=std_normal seed=0,1", _tiny(module.get_config(), prior_components=1))
    base = _tiny(module.get_config(), **extra)
    values = [p for p in sweep.points(module.get_sweep(), base) if p[1]["seed"] == 0][:2]
    sweep_dir = tmp_path / row
    for name, _, config in values:
        train.train_and_evaluate(config, str(sweep_dir / name))
        evaluate.evaluate_run(str(sweep_dir / name), num_samples=4, chunk=4, batch_size=64, num_draws=2,
                              disentanglement=False)
    result = closed_vs_mc.summarize(str(sweep_dir), row)
    assert len(result["groups"]) == 2
    for g in result["groups"].values():
        assert g["seeds"] == [0]
        for m in ("neg_elbo", "nll", "active_units"):
            assert math.isfinite(g[m]["mean"])
        assert g["steps_to_target"]["mean"] in (10.0, 20.0)  # every run reaches the worst final −ELBO
    json.dumps(result)
    assert closed_vs_mc.table(result).count("\n") == 3
    v = closed_vs_mc.verdict(result)
    assert v["claim"] == closed_vs_mc.PUBLISHED[row]
    assert v["holds"] in (None, True, False) and v["detail"]  # one seed: no spread, so a difference is "beyond" it
    assert closed_vs_mc.figure(result).axes[0].get_ylabel() == "test −ELBO [nats]"
    # the README row, from the summary that experiments.reproduce.summarize writes
    out = tmp_path / "out"
    out.mkdir()
    made = summarize.closed_vs_mc_row(str(tmp_path), str(out), row)
    assert (out / f"closed_vs_mc_{row}.json").exists() and (out / f"closed_vs_mc_{row}.png").stat().st_size > 1000
    line = summarize.table({row: made})
    assert line.count("\n") == 2 and f"Direction holds: {dict([(True, 'yes'), (False, 'no')]).get(v['holds'], 'not resolved')}" in line and "NLL with K = 4" in line


def _gv_file(path, ratios_mc, ratios_stl):
    rows = [{"step": s, "analytic": {"kl_variance": 0.0}, "mc": {"kl_variance": 2.0 + s},
             "stl": {"kl_variance": 2.0 + s},
             "ratio": {"mc": {"total": m, "encoder": m, "decoder": 1.0},
                       "stl": {"total": t, "encoder": t, "decoder": 1.0}}}
            for s, m, t in zip((0, 10), ratios_mc, ratios_stl)]
    path.write_text(json.dumps({"run_dir": str(path.parent), "num_draws": 8, "batch_size": 4,
                                "estimators": ["analytic", "mc", "stl"], "checkpoints": rows}))
    return str(path)


def _row(groups):
    stat = lambda m, sd, n: {"mean": m, "sd": sd, "n": n, "min": m, "max": m}  # noqa: E731
    return {g: {"nll": stat(*v), "active_units": stat(a, 0.0, v[2])} for g, (v, a) in groups.items()}


def test_verdicts_weigh_the_spread_over_seeds():
    kl = {"row": "kl_estimators", "groups": _row({"analytic": ((92.9, 0.3, 3), 23), "mc": ((92.86, 0.3, 3), 23)})}
    v = closed_vs_mc.verdict(kl)
    assert v["holds"] is True and "+0.04 ± 0.24" in v["detail"]  # a tie is "at least as well"
    kl["groups"]["analytic"]["nll"]["mean"] = 94.0  # worse by 1.14 ± 0.24
    assert closed_vs_mc.verdict(kl)["holds"] is False
    pri = {"row": "priors", "groups": _row({"std_normal": ((93.0, 0.1, 2), 20), "vamp": ((92.0, 0.1, 2), 25)})}
    assert closed_vs_mc.verdict(pri)["holds"] is True
    pri["groups"]["vamp"]["nll"]["mean"] = 92.9  # −0.1 ± 0.1: noise
    assert closed_vs_mc.verdict(pri)["holds"] is None and "within seed noise" in closed_vs_mc.verdict(pri)["detail"]
    iw = {"row": "iwae_objective", "groups": _row({"1": ((95.0, 0.1, 2), 20), "5": ((94.0, 0.1, 2), 21),
                                                   "50": ((93.0, 0.1, 2), 22)})}
    assert closed_vs_mc.verdict(iw)["holds"] is True
    iw["groups"]["50"]["active_units"]["mean"] = 19
    assert closed_vs_mc.verdict(iw)["holds"] is False


def test_gradient_variance_over_seeds(tmp_path):
    a = _gv_file(tmp_path / "a.json", (2.0, 3.0), (1.5, 0.5))
    b = _gv_file(tmp_path / "b.json", (4.0, 1.5), (2.5, 0.2))
    r = closed_vs_mc.gradient_variance([a, b])
    assert r["steps"] == [0, 10]
    assert r["ratios"][0]["mc"]["encoder"] == {"mean": 3.0, "min": 2.0, "max": 4.0}
    assert r["ratios"][1]["stl"]["total"] == {"mean": 0.35, "min": 0.2, "max": 0.5}
    assert r["ratios"][1]["mc"]["kl_estimate_variance"]["mean"] == 12.0
    assert r["claims"] == {"mc_encoder_variance_above_analytic_at_every_step_every_seed": True,
                           "stl_encoder_variance_below_analytic_at_the_last_step_every_seed": True}
    c = _gv_file(tmp_path / "c.json", (0.9, 3.0), (1.5, 1.1))  # one seed breaks each claim
    r = closed_vs_mc.gradient_variance([a, b, c])
    assert r["claims"] == {"mc_encoder_variance_above_analytic_at_every_step_every_seed": False,
                           "stl_encoder_variance_below_analytic_at_the_last_step_every_seed": False}
    assert len(closed_vs_mc.gradient_variance_figure(r).axes) == 3
    line = summarize.table({"gradient_variance": r})
    assert "MC above analytic at every step and seed: False" in line and "3 seeds, S = 8 draws" in line
