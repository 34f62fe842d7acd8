"""Lucas et al. (2019): a linear VAE's per-dimension KL and collapse match pPCA theory."""

from __future__ import annotations

import numpy as np

from experiments.reproduce import linear_vae


def test_theory_formulas():
    lam = np.array([0.04, 0.01, 0.0025])
    th = linear_vae.theory(lam, beta=2.0, sigma2=0.0025, k=3)  # βσ² = 0.005
    np.testing.assert_allclose(th["kl_per_dim"], [0.5 * np.log(8), 0.5 * np.log(2), 0.0])
    np.testing.assert_array_equal(th["active"], [True, True, False])
    np.testing.assert_allclose(th["posterior_var"], [0.125, 0.5, 1.0])
    np.testing.assert_allclose(th["au_variance"], [0.875, 0.5, 0.0])
    assert linear_vae.theory(lam, 2.0, 0.0025, k=2)["kl_per_dim"].shape == (2,)


def test_learned_linear_vae_matches_theory(tmp_path):
    records = linear_vae.run(str(tmp_path), betas=[2.0, 4.0], ks=[3, 6], steps=30000)
    for r in records:
        kl, th = np.asarray(r["kl_per_dim"]), np.asarray(r["kl_per_dim_theory"])
        auv, auv_th = np.asarray(r["au_variance"]), np.asarray(r["au_variance_theory"])
        # λᵢ / βσ² for each sorted dimension; near 1 the optimum is approached very slowly.
        ratio = np.exp(2 * th)
        clear = (ratio >= 2) | (th == 0)
        np.testing.assert_allclose(kl[clear], th[clear], atol=0.05, err_msg=str(r))
        np.testing.assert_allclose(auv[clear], auv_th[clear], atol=0.05, err_msg=str(r))
        assert np.all(kl <= th + 0.05), r
        assert abs(r["collapsed"] - r["collapsed_theory"]) <= int(np.sum(~clear)), r
    assert (tmp_path / "results.json").exists() and (tmp_path / "linear_vae.png").exists()
