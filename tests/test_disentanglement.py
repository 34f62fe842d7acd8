"""Disentanglement metrics on oracle representations that need no training.

The ground truth is a toy whose observations are its factors (disentanglement_lib's
``IdentityObservationsData``), so the representation is any function of the factors:
identity (also permuted and rescaled/shifted) scores near the top of every metric, noise
independent of the factors scores near 0 or chance, a duplicated code behaves as each
definition says, and hand-built codes have closed-form MIG. The estimators are also
checked entry by entry against scikit-learn / NumPy references and exact formulas.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import sklearn.metrics

from vaekl import disentanglement as dis

SIZES = (4, 6, 8)  # distinct sizes catch factor/axis mix-ups
SMALL = dict(num_train=1000, encode_batch=500)
SMALL_TEST = dict(SMALL, num_test=1000)


class Toy:
    """Uniform independent factors; the observation is the factor vector itself (float32)."""

    def __init__(self, sizes=SIZES):
        self.factor_sizes = tuple(sizes)

    def sample_factors(self, n, rng):
        return rng.integers(0, self.factor_sizes, size=(n, len(self.factor_sizes)))

    def sample_observations_from_factors(self, factors, rng):
        return np.asarray(factors, np.float32)


def identity(x):
    return x


def permuted_affine(x):
    """Factors permuted, rescaled (one flipped) and shifted: still one code per factor."""
    return np.asarray(x)[:, [2, 0, 1]] * np.array([2.0, -3.0, 0.5]) + np.array([1.0, -7.0, 0.25])


def duplicated(x):
    return np.hstack([x, x])


def noise_fn(seed=7):
    rng = np.random.default_rng(seed)
    return lambda x: rng.standard_normal((len(x), 3))


def row_permuted_fn(seed=3):
    """disentanglement_lib's "bad" code: each row's factors shuffled, so every code carries
    the same information about every factor."""
    rng = np.random.default_rng(seed)
    return lambda x: rng.permuted(np.asarray(x, np.float64), axis=1)


def all_metrics(gt, rep, seed=0, dci_model="random_forest"):
    rng = np.random.default_rng(seed)
    return {
        "mig": dis.mig(gt, rep, rng, num_train=5000),
        "factor_vae_score": dis.factor_vae_score(gt, rep, rng, num_train=500, num_eval=500,
                                                 num_variance_estimate=1000),
        "beta_vae_score": dis.beta_vae_score(gt, rep, rng, num_train=500, num_eval=500),
        "dci": dis.dci(gt, rep, rng, model=dci_model, **SMALL_TEST),
        "sap_continuous": dis.sap(gt, rep, rng, continuous_factors=True, **SMALL_TEST),
        "sap": dis.sap(gt, rep, rng, **SMALL_TEST),
        "modularity_explicitness": dis.modularity_explicitness(gt, rep, rng, **SMALL_TEST),
    }


# --------------------------------------------------------------------------------------
# Estimators against references.


def test_histogram_discretize_is_disentanglement_libs():
    codes = np.random.default_rng(0).standard_normal((997, 4)) * [1.0, 10.0, 1e-3, 5.0]
    got = dis.histogram_discretize(codes, 20)
    for j in range(4):
        want = np.digitize(codes[:, j], np.histogram(codes[:, j], 20)[1][:-1])
        np.testing.assert_array_equal(got[:, j], want)
    assert got.min() == 1 and got.max() == 20
    np.testing.assert_array_equal(got[np.argmax(codes, axis=0), np.arange(4)], 20)


def test_mutual_info_matrix_equals_sklearn_mutual_info_score():
    rng = np.random.default_rng(1)
    factors = rng.integers(0, [3, 7, 5], size=(2000, 3)) * [1, 10, -2]  # arbitrary labels
    codes = np.stack([factors[:, 0] + 0.3 * rng.standard_normal(2000),
                      np.sin(factors[:, 1]) + rng.standard_normal(2000),
                      rng.standard_normal(2000), factors[:, 2] * 1.0], axis=1)
    m = dis.mutual_info_matrix(codes, factors, num_bins=20)
    binned = dis.histogram_discretize(codes, 20)
    want = np.array([[sklearn.metrics.mutual_info_score(factors[:, k], binned[:, j]) for k in range(3)]
                     for j in range(4)])
    assert m.shape == (4, 3)
    np.testing.assert_allclose(m, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dis.discrete_entropy(factors),
                               [sklearn.metrics.mutual_info_score(f, f) for f in factors.T], rtol=1e-12)


def test_log_mixture_density_matches_direct_sum():
    rng = np.random.default_rng(2)
    mean, log_var = rng.standard_normal((1001, 3)), rng.uniform(-3, 1, (1001, 3))
    z = rng.standard_normal((2000, 3)) * 2  # 699-component blocks: 1001 is not a multiple
    got = np.asarray(dis.log_mixture_density(jnp.asarray(z, jnp.float32), jnp.asarray(mean, jnp.float32),
                                             jnp.asarray(log_var, jnp.float32)))
    sq = (z[:, None] - mean[None]) ** 2 / np.exp(log_var[None])
    lp = -0.5 * (math.log(2 * math.pi) + log_var[None] + sq)
    want = scipy.special.logsumexp(lp, axis=1) - math.log(1001)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Closed-form pieces: DCI, modularity, Gaussian TC (disentanglement_lib's unit cases).


@pytest.mark.parametrize("r, d_want, c_want", [
    (np.diag(5.0 * np.ones(5)), 1.0, 1.0),
    (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), 1.0, 1.0),  # an unused code
    (np.zeros((10, 10)), 0.0, 0.0),
    (np.vstack([np.diag(5.0 * np.ones(5))] * 2), 1.0, 1.0 - math.log(2) / math.log(10)),  # redundant
    (np.diag(5.0 * np.ones(5))[:2], 1.0, 1.0),  # missed factors
    (np.hstack([np.diag(5.0 * np.ones(5))] * 2), 1.0 - math.log(2) / math.log(10), 1.0),  # code: 2 factors
])
def test_dci_disentanglement_and_completeness(r, d_want, c_want):
    assert dis.dci_disentanglement(r) == pytest.approx(d_want, abs=1e-7)
    assert dis.dci_completeness(r) == pytest.approx(c_want, abs=1e-7)


@pytest.mark.parametrize("m, want", [
    (np.diag(5.0 * np.ones(5)), 1.0),
    (np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), 2.0 / 3.0),
    (np.zeros((10, 10)), 0.0),
    (np.hstack([np.diag(5.0 * np.ones(5))] * 2), 1.0 - 1.0 / 9.0),
    (np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]), 0.5),  # (1 − 1) and 1, averaged
])
def test_modularity_formula(m, want):
    assert dis.modularity(m) == pytest.approx(want, abs=1e-12)


def test_gaussian_total_correlation_closed_form_and_scale_free():
    a = np.random.default_rng(3).standard_normal((4, 4))
    cov = a @ a.T + 0.1 * np.eye(4)
    want = 0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1])
    assert dis.gaussian_total_correlation(cov) == pytest.approx(want, rel=1e-10)
    s = np.array([1e-4, 1.0, 1e3, 1e6])  # TC is invariant to rescaling each dimension
    assert dis.gaussian_total_correlation(cov * np.outer(s, s)) == pytest.approx(want, rel=1e-9)
    # Two dimensions with correlation ρ: TC = −½ log(1 − ρ²).
    assert dis.gaussian_total_correlation(np.array([[1.0, 0.9], [0.9, 1.0]])) == pytest.approx(
        -0.5 * math.log(1 - 0.81), rel=1e-12)
    assert dis.gaussian_total_correlation(np.diag([1.0, 2.0, 3.0])) == pytest.approx(0.0, abs=1e-15)
    assert dis.gaussian_total_correlation(np.ones((2, 2))) == math.inf
    sqrtm = scipy.linalg.sqrtm(cov * np.diag(cov)[:, None])  # disentanglement_lib's formula
    assert dis.gaussian_wasserstein_correlation(cov) == pytest.approx(
        2 * np.trace(cov) - 2 * np.trace(sqrtm).real, rel=1e-8, abs=1e-10)


def test_gaussian_total_correlation_score_of_known_gaussian():
    cov = np.array([[1.0, 0.6, 0.0], [0.6, 2.0, -0.5], [0.0, -0.5, 0.5]])
    chol = np.linalg.cholesky(cov)
    rng = np.random.default_rng(4)
    correlated = lambda x: rng.standard_normal((len(x), 3)) @ chol.T + 5.0  # noqa: E731
    got = dis.gaussian_total_correlation_score(Toy(), correlated, np.random.default_rng(0),
                                               num_train=200_000, encode_batch=10_000)
    want = 0.5 * (np.sum(np.log(np.diag(cov))) - np.linalg.slogdet(cov)[1])
    assert want > 0.25  # clearly correlated
    assert got["gaussian_total_correlation"] == pytest.approx(want, abs=0.01)
    independent = dis.gaussian_total_correlation_score(Toy(), noise_fn(), np.random.default_rng(0),
                                                       num_train=200_000, encode_batch=10_000)
    assert abs(independent["gaussian_total_correlation"]) < 1e-3
    assert abs(independent["gaussian_wasserstein_correlation_norm"]) < 1e-3


# --------------------------------------------------------------------------------------
# Oracle representations.


@pytest.mark.parametrize("rep", [identity, permuted_affine], ids=["identity", "permuted_affine"])
def test_one_code_per_factor_scores_top(rep):
    s = all_metrics(Toy(), rep)
    assert s["mig"]["mig"] > 0.97
    assert s["factor_vae_score"]["eval_accuracy"] == 1.0
    assert s["factor_vae_score"]["train_accuracy"] == 1.0
    assert s["factor_vae_score"]["num_active_dims"] == 3
    assert s["beta_vae_score"]["eval_accuracy"] > 0.98
    for key in ("disentanglement", "completeness", "informativeness"):
        assert s["dci"][key] > 0.97, key
    assert s["sap_continuous"]["sap"] > 0.97
    # Discrete SAP: runner-up ≈ chance 1/K and a 1-D linear SVM cannot isolate middle values.
    assert 0.2 < s["sap"]["sap"] < 1.0 - 1.0 / max(SIZES)
    assert s["modularity_explicitness"]["modularity"] > 0.97
    assert s["modularity_explicitness"]["explicitness"] > 0.97


def test_noise_scores_zero_or_chance():
    s = all_metrics(Toy(), noise_fn())
    chance_factor = 1.0 / len(SIZES)
    assert s["mig"]["mig"] < 0.02
    assert s["factor_vae_score"]["eval_accuracy"] == pytest.approx(chance_factor, abs=0.07)
    assert s["beta_vae_score"]["eval_accuracy"] == pytest.approx(chance_factor, abs=0.07)
    assert s["dci"]["disentanglement"] < 0.1 and s["dci"]["completeness"] < 0.1
    assert s["dci"]["informativeness"] == pytest.approx(np.mean([1 / k for k in SIZES]), abs=0.05)
    assert s["sap_continuous"]["sap"] < 0.02
    assert s["sap"]["sap"] < 0.05
    assert s["modularity_explicitness"]["explicitness"] == pytest.approx(0.5, abs=0.04)


def test_row_permuted_code_is_not_modular():
    """Every code informs every factor equally (disentanglement_lib's bad-metric oracle)."""
    gt = Toy((6, 6, 6))
    rep = row_permuted_fn()
    rng = np.random.default_rng(0)
    assert dis.modularity_explicitness(gt, rep, rng, num_train=20_000, num_test=500)["modularity"] < 0.2
    d = dis.dci(gt, rep, rng, model="random_forest", **SMALL_TEST)
    assert d["disentanglement"] < 0.2 and d["completeness"] < 0.2


def test_duplicated_code():
    s = all_metrics(Toy(), duplicated)
    assert s["mig"]["mig"] < 0.01  # the two best codes tie
    assert s["dci"]["disentanglement"] > 0.97
    d = 2 * len(SIZES)  # importance split evenly over two of d codes: 1 − log_d 2
    assert s["dci"]["completeness"] == pytest.approx(1 - math.log(2) / math.log(d), abs=0.03)
    assert s["modularity_explicitness"]["modularity"] > 0.97
    assert s["factor_vae_score"]["eval_accuracy"] == 1.0
    assert s["factor_vae_score"]["num_active_dims"] == 6
    assert s["sap"]["sap"] < 0.02 and s["sap_continuous"]["sap"] < 0.02
    tc = dis.gaussian_total_correlation_score(Toy(), duplicated, np.random.default_rng(0), num_train=1000)
    assert tc["gaussian_total_correlation"] == math.inf


def test_dci_gbt_matches_disentanglement_lib_oracles():
    rng = np.random.default_rng(0)
    small = dict(num_train=400, num_test=400, model="gbt")
    ident = dis.dci(Toy(), identity, rng, **small)
    assert ident["disentanglement"] > 0.95 and ident["completeness"] > 0.95
    assert ident["informativeness"] > 0.95
    dup = dis.dci(Toy(), duplicated, rng, **small)
    assert dup["disentanglement"] > 0.95
    assert dup["completeness"] == pytest.approx(1 - math.log(2) / math.log(6), abs=0.1)
    with pytest.raises(ValueError, match="dci model"):
        dis.dci(Toy(), identity, rng, num_train=10, num_test=10, model="lasso")


def test_mig_of_hand_built_code_is_closed_form():
    """Codes (A, A//2, B, B//5, C%2, C): each factor's top two MIs are entropies of functions
    of it, I(v; f(v)) = H(f(v)); with uniform (10, 10, 4) factors MIG = (log 2/log 10 +
    log 5/log 10 + ½)/3 = ½ in the population, and exactly the plug-in value on a sample."""
    gt = Toy((10, 10, 4))
    def rep(x):
        a, b, c = np.asarray(x, np.int64).T
        return np.stack([a, a // 2, b, b // 5, c % 2, c], axis=1).astype(np.float64)
    factors = gt.sample_factors(10_000, np.random.default_rng(5))
    h = lambda v: dis.discrete_entropy(v[:, None])[0]  # noqa: E731
    a, b, c = factors.T
    exact = np.mean([(h(a) - h(a // 2)) / h(a), (h(b) - h(b // 5)) / h(b), (h(c) - h(c % 2)) / h(c)])
    assert dis.mig_from_codes(rep(factors), factors)["mig"] == pytest.approx(exact, rel=1e-12)
    assert exact == pytest.approx(0.5, abs=0.01)
    population = (math.log(2) / math.log(10) + math.log(5) / math.log(10) + 0.5) / 3
    assert dis.mig(gt, rep, np.random.default_rng(0))["mig"] == pytest.approx(population, abs=0.01)


# --------------------------------------------------------------------------------------
# Chen et al.'s sampling MIG.


def _mixture_mi(k: int, sigma: float) -> float:
    """I(z; v) for v uniform on 0..k−1, z | v ~ N(v, σ²): h(mixture) by quadrature − h(N(0, σ²))."""
    z = np.linspace(-10 * sigma, k - 1 + 10 * sigma, 200_001)
    p = np.mean(np.exp(-0.5 * ((z[:, None] - np.arange(k)) / sigma) ** 2), axis=1)
    p /= sigma * math.sqrt(2 * math.pi)
    h = -np.trapezoid(p * np.log(np.maximum(p, 1e-300)), z)
    return h - 0.5 * math.log(2 * math.pi * math.e * sigma ** 2)


def test_mutual_info_sampling_matches_quadrature():
    gt = Toy((6, 8, 10))
    sigma = np.array([0.3, 0.6, 1.0])
    def posterior(x):  # z_j | x ~ N(v_j, σ_j²), returned as JAX arrays
        x = jnp.asarray(x)
        return x, jnp.broadcast_to(jnp.asarray(2 * np.log(sigma), jnp.float32), x.shape)
    mi, log_k = dis.mutual_info_sampling(gt, posterior, np.random.default_rng(0), samples_per_point=16,
                                         num_samples=10_000, encode_batch=256)
    want = np.diag([_mixture_mi(k, s) for k, s in zip((6, 8, 10), sigma)])
    np.testing.assert_allclose(log_k, np.log([6, 8, 10]))
    np.testing.assert_allclose(mi, want, atol=0.04)
    got = dis.mig_sampling(gt, posterior, np.random.default_rng(1), exclude=(), samples_per_point=16)
    assert got["mig_sampling"] == pytest.approx(np.mean(np.diag(want) / log_k), abs=0.02)
    no_first = dis.mig_sampling(gt, posterior, np.random.default_rng(1), samples_per_point=16)  # exclude=(0,)
    assert no_first["mig_sampling"] == pytest.approx(np.mean(np.diag(want)[1:] / log_k[1:]), abs=0.02)
    # A sub-grid: every other value of the last factor (5 values at spacing 2).
    mi2, log_k2 = dis.mutual_info_sampling(gt, posterior, np.random.default_rng(2), factors=[2],
                                           samples_per_point=16, grid_stride=(1, 1, 2))
    assert log_k2[2] == pytest.approx(math.log(5)) and np.isnan(mi2[:, :2]).all()
    assert mi2[2, 2] == pytest.approx(_mixture_mi(5, 0.5), abs=0.04)  # spacing 2, σ 1 ≡ spacing 1, σ ½


# --------------------------------------------------------------------------------------
# Mechanics: batching, the fixed-factor batches, collapsed codes, constant factors, evaluate_all.


class Recording(Toy):
    """Records the factor batches it is asked to observe."""

    def __init__(self, sizes=SIZES):
        super().__init__(sizes)
        self.batches = []

    def sample_observations_from_factors(self, factors, rng):
        self.batches.append(np.array(factors))
        return super().sample_observations_from_factors(factors, rng)


def test_vote_batches_share_the_fixed_factor_and_encoding_is_chunked():
    gt = Recording()
    calls = []
    def rep(x):
        calls.append(len(x))
        return jnp.asarray(x) * 2.0  # JAX output is accepted
    dis.factor_vae_score(gt, rep, np.random.default_rng(0), num_train=40, num_eval=10,
                         num_variance_estimate=300, encode_batch=256)
    assert max(calls) <= 256
    groups = np.concatenate([b.reshape(-1, 64, 3) for b in gt.batches[2:]])  # after the variance batches
    assert len(groups) == 50
    assert all((g == g[0]).all(axis=0).any() for g in groups), "a factor fixed in every batch"
    gt.batches.clear()
    dis.beta_vae_score(gt, rep, np.random.default_rng(0), num_train=20, num_eval=10, encode_batch=256)
    pairs = np.concatenate([b.reshape(2, -1, 64, 3).transpose(1, 0, 2, 3) for b in gt.batches])
    assert len(pairs) == 30 and max(calls) <= 256
    assert all((p[0] == p[1]).all(axis=0).any() for p in pairs), "a factor shared row by row"


def test_factor_vae_prunes_collapsed_dimensions():
    rng = np.random.default_rng(0)
    kw = dict(num_train=200, num_eval=100, num_variance_estimate=500)
    collapsed = dis.factor_vae_score(Toy(), lambda x: 0.01 * np.asarray(x), rng, **kw)
    assert collapsed == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}
    # A near-constant extra dimension would win every argmin if it were not pruned.
    extra = lambda x: np.hstack([x, 1e-3 * np.asarray(x)[:, :1]])  # noqa: E731
    s = dis.factor_vae_score(Toy(), extra, rng, **kw)
    assert s["num_active_dims"] == 3 and s["eval_accuracy"] == 1.0


def test_single_valued_factors_are_left_out():
    gt = Toy((1, 4, 6))  # like dSprites' colour
    rep = lambda x: np.asarray(x)[:, 1:]  # noqa: E731
    rng = np.random.default_rng(0)
    assert dis.mig(gt, rep, rng, num_train=2000)["mig"] > 0.97
    assert dis.factor_vae_score(gt, rep, rng, num_train=200, num_eval=200, num_variance_estimate=500)[
        "eval_accuracy"] == 1.0
    assert dis.sap(gt, rep, rng, num_train=500, num_test=500, continuous_factors=True)["sap"] > 0.97
    codes, factors = dis.sample_codes_and_factors(gt, rep, 10, rng)
    assert codes.shape == (10, 2) and factors.shape == (10, 2)


def test_bad_representation_shape_is_named():
    with pytest.raises(ValueError, match=r"representation_fn .* got shape \(500,\)"):
        dis.mig(Toy(), lambda x: np.asarray(x)[:, 0], np.random.default_rng(0), num_train=500)


def test_evaluate_all_returns_every_metric_and_is_subset_invariant():
    sigma = 0.5
    posterior = lambda x: (np.asarray(x), np.full(np.shape(x), 2 * math.log(sigma)))  # noqa: E731
    options = {"mig": {"num_train": 1000}, "factor_vae_score": dict(num_train=200, num_eval=200,
                                                                     num_variance_estimate=500),
               "beta_vae_score": dict(num_train=300, num_eval=200),
               "dci": dict(SMALL_TEST, model="random_forest"), "sap": SMALL_TEST,
               "modularity_explicitness": SMALL_TEST, "gaussian_total_correlation_score": SMALL,
               "mig_sampling": dict(exclude=(), num_samples=500)}
    out = dis.evaluate_all(Toy(), identity, np.random.default_rng(0), posterior_fn=posterior, options=options)
    assert set(out) == set(dis.METRICS) | {"mig_sampling"}
    assert {"mig"} <= set(out["mig"])
    assert {"eval_accuracy", "train_accuracy", "num_active_dims"} <= set(out["factor_vae_score"])
    assert {"eval_accuracy", "train_accuracy"} <= set(out["beta_vae_score"])
    assert {"disentanglement", "completeness", "informativeness", "informativeness_train"} <= set(out["dci"])
    assert {"sap"} <= set(out["sap"])
    assert {"modularity", "explicitness"} <= set(out["modularity_explicitness"])
    assert {"gaussian_total_correlation"} <= set(out["gaussian_total_correlation_score"])
    assert all(isinstance(v, float) for d in out.values() for v in d.values())
    alone = dis.evaluate_all(Toy(), identity, np.random.default_rng(0), metrics=["sap"], options=options)
    assert alone == {"sap": out["sap"]}
    with pytest.raises(ValueError, match="unknown metrics"):
        dis.evaluate_all(Toy(), identity, np.random.default_rng(0), metrics=["irs"])


def test_jitted_encoder_codes():
    w = jax.random.normal(jax.random.key(0), (3, 10))
    enc = jax.jit(lambda x: jnp.tanh(x @ w / 4.0))
    out = dis.mig(Toy(), enc, np.random.default_rng(0), num_train=2000, encode_batch=1000)
    assert 0.0 <= out["mig"] <= 1.0


def test_constant_code_has_exactly_zero_mutual_information():
    """Issue 23: a constant (padded or collapsed) code dimension carries exactly 0 nats, as in
    scikit-learn's mutual_info_score; a rounding residue (~1e-16) made modularity score it as
    an informative code (0.907 instead of disentanglement_lib's 0.772)."""
    from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(0)
    n = 10_000
    factors = rng.integers(0, 5, size=(n, 2))
    codes = np.stack([factors[:, 0] + 0.1 * rng.standard_normal(n), rng.standard_normal(n),
                      np.zeros(n)], axis=1)  # informative, noise, constant
    for constant in (np.zeros(n), np.full(n, 3.0)):
        for k in range(2):
            assert dis._discrete_mi_1d(constant, factors[:, k]) == 0.0
            assert dis._discrete_mi_1d(factors[:, k], constant) == 0.0
    m = dis.mutual_info_matrix(codes, factors)
    assert np.all(m[2] == 0.0)
    binned = dis.histogram_discretize(codes, 20)
    want = np.array([[skm.mutual_info_score(factors[:, k], binned[:, j]) for k in range(2)]
                     for j in range(3)])
    np.testing.assert_allclose(m, want, rtol=1e-12, atol=1e-15)
    assert dis.modularity(m) == pytest.approx(dis.modularity(want), abs=1e-12)
