"""Lucas et al. (2019): a linear VAE's per-dimension KL and collapse match pPCA theory."""

from __future__ import annotations

import json

import numpy as np

from experiments.reproduce import linear_vae


def test_theory_formulas():
    lam = np.array([0.04, 0.01, 0.0025])
    th = linear_vae.theory(lam, beta=2.0, sigma2=0.0025, k=3)  # βσ² = 0.005
    np.testing.assert_allclose(th["ratio"], [8, 2, 0.5])
    np.testing.assert_allclose(th["kl_per_dim"], [0.5 * np.log(8), 0.5 * np.log(2), 0.0])
    np.testing.assert_array_equal(th["active"], [True, True, False])
    np.testing.assert_allclose(th["posterior_var"], [0.125, 0.5, 1.0])
    np.testing.assert_allclose(th["au_variance"], [0.875, 0.5, 0.0])
    assert linear_vae.theory(lam, 2.0, 0.0025, k=2)["kl_per_dim"].shape == (2,)


def test_near_threshold_is_the_open_interval_from_1_to_2():
    """The dimensions left out of the "clear" error (and the README's label) are λᵢ/βσ² ∈ (1, 2)."""
    np.testing.assert_array_equal(linear_vae.near_threshold([0.5, 0.99, 1.0, 1.41, 1.99, 2.0, 8.0]),
                                  [False, False, False, True, True, False, False])


def _record(beta, k, seed, kl, ratio):
    th = np.where(np.asarray(ratio) > 1, 0.5 * np.log(ratio), 0.0)
    row = {"kl_per_dim": kl, "au_variance": [0.0] * k, "kl": float(np.sum(kl))}
    return {**linear_vae.compare(np.asarray(ratio) * beta * 0.01, 0.01, beta, k, row), "seed": seed}, th


def test_compare_and_summary_spread():
    ratio = [4.0, np.sqrt(2), 0.5]  # clear, near threshold, collapsed
    good, th = _record(1.0, 3, 0, [0.0, 0.5 * np.log(4) + 0.01, 0.1], ratio)   # learned order is sorted
    bad, _ = _record(1.0, 3, 1, [0.5 * np.log(4) - 0.03, 0.005, 0.001], ratio)
    np.testing.assert_allclose(good["kl_per_dim"], [0.5 * np.log(4) + 0.01, 0.1, 0.0])
    np.testing.assert_allclose(good["kl_per_dim_theory"], th)
    assert good["collapsed_exact"] and good["collapsed"] == 1 == good["collapsed_theory"]
    np.testing.assert_allclose(good["max_abs_err_clear"], 0.01, atol=1e-9)  # the √2 dim left out
    np.testing.assert_allclose(good["max_abs_err"], 0.5 * np.log(np.sqrt(2)) - 0.1, atol=1e-9)
    assert not bad["collapsed_exact"] and bad["collapsed"] == 2  # the √2 dim collapsed too
    s = linear_vae.summary([good, bad])
    assert s["runs"] == 2 and s["seeds"] == [0, 1] and s["collapsed_exact"] == 1
    (row,) = s["per_beta_k"]
    assert row["collapsed_exact"] == 1 and row["seeds"] == [0, 1]
    np.testing.assert_allclose([row["max_abs_err_clear"][m] for m in ("mean", "min", "max")], [0.02, 0.01, 0.03])
    np.testing.assert_allclose(s["max_abs_err_clear"], 0.03)


# A smaller problem than the reproduction's, so that it trains in seconds: D = 4 eigenvalues a
# factor 8 apart and σ² = λ₁/40, so that every λᵢ/βσ² is well away from the open interval (1, 2)
# at both β (β = 1: 40, 5, 0.62; β = 2: 20, 2.5, 0.31). At both β two dimensions are active and one
# collapses. 30,000 steps of the reproduction's schedule (Adam, 5e-2, cosine to 0).
SMALL_EIGENVALUES = 0.01 * 8.0 ** -np.arange(4.0)
SMALL_SIGMA2 = 0.01 / 40


def test_learned_linear_vae_matches_theory_at_beta_1_and_2(tmp_path):
    records = linear_vae.run(str(tmp_path), betas=[1.0, 2.0], ks=[3], steps=30000, seeds=[0],
                             eigenvalues=SMALL_EIGENVALUES, sigma2=SMALL_SIGMA2)
    assert [(r["beta"], r["latent_dim"]) for r in records] == [(1.0, 3), (2.0, 3)]
    for r in records:
        kl, th = np.asarray(r["kl_per_dim"]), np.asarray(r["kl_per_dim_theory"])
        assert not linear_vae.near_threshold(r["ratio"]).any()
        np.testing.assert_allclose(kl, th, atol=0.05, err_msg=str(r))
        np.testing.assert_allclose(r["au_variance"], r["au_variance_theory"], atol=0.06, err_msg=str(r))
        assert r["collapsed_exact"] and r["collapsed_theory"] == 1, r
    assert records[0]["collapsed"] == 1 and np.sum(np.asarray(records[0]["kl_per_dim_theory"]) > 0) == 2
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["summary"]["runs"] == 2 and res["summary"]["collapsed_exact"] == 2
    assert res["wall_minutes"] > 0 and res["settings"]["steps"] == 30000
    assert (tmp_path / "linear_vae.png").exists()
