"""Disentanglement metrics (paper 3) against the reference definitions, and the OOD transfer framework.

The `_ref_*` functions below are a small, independent implementation of the definitions in disentanglement_lib
(`evaluation/metrics/dci.py`, `sap_score.py`, `mig.py`, `modularity_explicitness.py`, `utils.py`): code-major
arrays (codes x points) as the reference uses them, explicit loops, scipy's entropy. s2r's sample-major functions
must reproduce them to 1e-9 on fixed, seeded inputs (the sklearn fits are deterministic given their seeds).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import mutual_info_score
from sklearn.svm import LinearSVC

from s2r.evaluators import disentanglement as dm
from s2r.evaluators import ood_transfer as ot

# ---- the reference definitions (code-major: mus (codes, points), ys (factors, points)) ---------------------------


def _ref_importance_gbt(mus_tr, ys_tr, mus_te, ys_te, seed=0):
    r = np.zeros((mus_tr.shape[0], ys_tr.shape[0]))
    acc_tr, acc_te = [], []
    for j in range(ys_tr.shape[0]):
        model = GradientBoostingClassifier(random_state=seed).fit(mus_tr.T, ys_tr[j])
        r[:, j] = np.abs(model.feature_importances_)
        acc_tr.append(np.mean(model.predict(mus_tr.T) == ys_tr[j]))
        acc_te.append(np.mean(model.predict(mus_te.T) == ys_te[j]))
    return r, np.mean(acc_tr), np.mean(acc_te)


def _ref_dci(r):
    """(disentanglement, completeness): per-code / per-factor 1 - entropy of R + 1e-11, importance-weighted."""
    n_codes, n_factors = r.shape
    d_code = np.array([1 - scipy.stats.entropy(r[i] + 1e-11, base=n_factors) for i in range(n_codes)])
    c_factor = np.array([1 - scipy.stats.entropy(r[:, j] + 1e-11, base=n_codes) for j in range(n_factors)])
    w = np.ones_like(r) if r.sum() == 0 else r
    return float(d_code @ (w.sum(1) / w.sum())), float(c_factor @ (w.sum(0) / w.sum()))


def _ref_sap(mus, ys, mus_te, ys_te, continuous):
    s = np.zeros((mus.shape[0], ys.shape[0]))
    for i in range(mus.shape[0]):
        for j in range(ys.shape[0]):
            if continuous:
                c = np.cov(mus[i], ys[j], ddof=1)
                s[i, j] = c[0, 1] ** 2 / (c[0, 0] * c[1, 1]) if c[0, 0] > 1e-12 else 0.0
            else:
                clf = LinearSVC(C=0.01, class_weight="balanced").fit(mus[i][:, None], ys[j])
                s[i, j] = np.mean(clf.predict(mus_te[i][:, None]) == ys_te[j])
    srt = np.sort(s, axis=0)
    return float(np.mean(srt[-1] - srt[-2]))


def _ref_discretize(mus, bins=20):
    return np.stack([np.digitize(m, np.histogram(m, bins)[1][:-1]) for m in mus])


def _ref_mi(mus_d, ys):
    return np.array([[mutual_info_score(ys[j], mus_d[i]) for j in range(len(ys))] for i in range(len(mus_d))])


def _ref_mig(mus, ys):
    m = _ref_mi(_ref_discretize(mus), ys)
    h = np.array([mutual_info_score(y, y) for y in ys])
    srt = np.sort(m, axis=0)[::-1]
    return float(np.mean((srt[0] - srt[1]) / h))


def _ref_modularity(mus, ys):
    sq = np.square(_ref_mi(_ref_discretize(mus), ys))
    top = sq.max(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = 1.0 - (sq.sum(1) - top) / (top * (sq.shape[1] - 1.0))
    score[top == 0] = 0.0
    return float(np.mean(score))


# ---- seeded cases -----------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 100, 50


def _factors(n: int = N_TRAIN + N_TEST, seed: int = 0) -> np.ndarray:
    """Three binary factors: one boosting tree per round keeps sklearn's GBT fast enough for the default suite."""
    return np.random.default_rng(seed).integers(0, 2, (n, 3))


def _codes(case: str, y: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)
    base = y + 0.05 * rng.normal(size=y.shape)
    if case == "identity":
        return base
    if case == "permuted":
        return base[:, [2, 0, 1]]
    if case == "noisy":
        return y + 0.6 * rng.normal(size=y.shape)
    if case == "mixed":
        return base @ np.array([[1.0, 0.5, 0.0], [0.3, 1.0, 0.4], [0.0, 0.6, 1.0]])
    if case == "duplicated":
        return np.c_[base[:, :1], base[:, :1] + 0.05 * rng.normal(size=(len(y), 1)), base[:, 1:]]
    if case == "noise":
        return rng.normal(size=(len(y), 4))
    raise ValueError(case)


CASES = ("identity", "permuted", "noisy", "mixed", "duplicated", "noise")


@pytest.mark.parametrize("case", CASES)
def test_every_matrix_metric_equals_the_reference_definition(case: str) -> None:
    y = _factors()
    z = _codes(case, y)
    zt, yt, ze, ye = z[:N_TRAIN], y[:N_TRAIN], z[N_TRAIN:], y[N_TRAIN:]
    r_ref, _, info_ref = _ref_importance_gbt(zt.T, yt.T, ze.T, ye.T)
    d_ref, c_ref = _ref_dci(r_ref)
    got = dm.dci(zt, yt, ze, ye)
    assert got["dci_disentanglement"] == pytest.approx(d_ref, abs=1e-9)
    assert got["dci_completeness"] == pytest.approx(c_ref, abs=1e-9)
    assert got["dci_informativeness"] == pytest.approx(info_ref, abs=1e-9)
    for continuous in (False, True):
        assert dm.sap(zt, yt, ze, ye, continuous=continuous) == pytest.approx(
            _ref_sap(zt.T, yt.T, ze.T, ye.T, continuous), abs=1e-9), continuous
    assert dm.mig(zt, yt) == pytest.approx(_ref_mig(zt.T, yt.T), abs=1e-9)
    assert dm.modularity(zt, yt) == pytest.approx(_ref_modularity(zt.T, yt.T), abs=1e-9)


def test_reference_values_order_the_cases_as_the_definitions_say() -> None:
    """Sanity of the cases themselves: the identity code is (nearly) perfectly disentangled, noise is not."""
    y = _factors()
    scores = {case: dm.dci(z[:N_TRAIN], y[:N_TRAIN], z[N_TRAIN:], y[N_TRAIN:])
              for case in ("identity", "noise") for z in [_codes(case, y)]}
    assert scores["identity"]["dci_disentanglement"] > 0.95 and scores["identity"]["dci_completeness"] > 0.95
    assert scores["identity"]["dci_informativeness"] > 0.95
    assert scores["noise"]["dci_disentanglement"] < 0.2 and scores["noise"]["dci_informativeness"] < 0.7


def test_dci_from_importance_known_values() -> None:
    assert dm.dci_from_importance(np.eye(3)) == pytest.approx((1.0, 1.0), abs=1e-9)
    d, c = dm.dci_from_importance(np.ones((3, 3)))  # every code explains every factor equally
    assert d == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(0.0, abs=1e-9)
    # one factor spread over two codes: disentanglement stays 1; completeness of that factor 1 - log_4(2) = 0.5,
    # weighted by its share of the importance (2 of 6), the others 1: C = (2 * 0.5 + 2 + 2) / 6
    r = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    assert dm.dci_from_importance(r) == pytest.approx((1.0, 5 / 6), abs=1e-9)
    assert dm.dci_from_importance(r) == pytest.approx(_ref_dci(r), abs=1e-12)
    assert dm.dci_from_importance(np.zeros((3, 2))) == pytest.approx(_ref_dci(np.zeros((3, 2))), abs=1e-12)


def test_completeness_weights_factors_by_importance_not_a_plain_mean() -> None:
    """A factor that gets no importance weighs nothing (reference); a plain mean over factors counts it as 0."""
    r = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # factor 2 gets nothing
    d, c = dm.dci_from_importance(r)
    assert (d, c) == pytest.approx(_ref_dci(r), abs=1e-12)
    assert (d, c) == pytest.approx((1.0, 1.0), abs=1e-9)  # by hand: two perfect factors, weights 1/2, 1/2, 0
    per_factor = [1 - scipy.stats.entropy(r[:, j] + 1e-11, base=3) for j in range(3)]
    assert np.mean(per_factor) == pytest.approx(2 / 3, abs=1e-9)  # the plain mean (s2r before issue 14)
    r = np.array([[0.9, 0.0, 0.0], [0.0, 0.6, 0.0], [0.1, 0.4, 0.0]])
    per_factor = [1 - scipy.stats.entropy(r[:, j] + 1e-11, base=3) for j in range(3)]
    assert dm.dci_from_importance(r)[1] == pytest.approx((per_factor[0] + per_factor[1]) / 2, abs=1e-9)


def test_sap_classification_form_uses_raw_codes() -> None:
    """The reference fits LinearSVC(C=0.01) on the raw code; standardising first (s2r before issue 14) changes S."""
    y = np.random.default_rng(0).integers(0, 6, (N_TRAIN + N_TEST, 3))  # 6 values: one-vs-rest, C matters
    z = _codes("identity", y)
    zt, yt, ze, ye = z[:N_TRAIN], y[:N_TRAIN], z[N_TRAIN:], y[N_TRAIN:]
    raw = dm.sap(zt, yt, ze, ye)
    assert raw == pytest.approx(_ref_sap(zt.T, yt.T, ze.T, ye.T, False), abs=1e-9)
    mu, sd = zt.mean(0), zt.std(0)
    standardised = dm.sap((zt - mu) / sd, yt, (ze - mu) / sd, ye)
    assert abs(raw - standardised) > 0.02, (raw, standardised)


def test_lightgbm_and_lasso_are_named_alternatives() -> None:
    y = _factors()
    z = _codes("noise", y)
    args = (z[:N_TRAIN], y[:N_TRAIN], z[N_TRAIN:], y[N_TRAIN:])
    gbt, lgb = dm.dci(*args), dm.dci(*args, estimator="lightgbm")
    assert gbt["dci_disentanglement"] != pytest.approx(lgb["dci_disentanglement"], abs=1e-3)  # not the same quantity
    z = _codes("identity", y)
    m = dm.dci(z[:N_TRAIN], y[:N_TRAIN], z[N_TRAIN:], y[N_TRAIN:], estimator="lasso")
    assert m["dci_disentanglement"] > 0.9 and m["dci_informativeness"] > 0.9
    with pytest.raises(ValueError, match="estimator"):
        dm.dci(*args, estimator="forest")


def test_discretize_is_the_histogram_discretizer() -> None:
    z = np.random.default_rng(0).normal(size=(200, 3))
    z[:, 2] = 1.5  # a constant code: one bin
    np.testing.assert_array_equal(dm.discretize(z, 20), _ref_discretize(z.T).T)
    assert dm.discretize(z, 20)[:, 0].min() == 1 and dm.discretize(z, 20)[:, 0].max() == 20


def test_split_points_is_disjoint_and_shrinks_proportionally() -> None:
    tr, te = dm.split_points(30, 2000, 1000, seed=0)
    assert (len(tr), len(te)) == (20, 10) and not set(tr) & set(te)
    tr, te = dm.split_points(5000, 100, 50, seed=1)
    assert (len(tr), len(te)) == (100, 50)
    with pytest.raises(ValueError, match="at least 2"):
        dm.split_points(1, 10, 5)


@pytest.fixture(scope="module")
def factors() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4, (300, 3))


def _identity(y: np.ndarray, seed: int = 1) -> np.ndarray:
    return y + 0.05 * np.random.default_rng(seed).normal(size=y.shape)


def _all(z: np.ndarray, y: np.ndarray, **kw) -> dict[str, float]:
    return dm.all_metrics(z[:200], y[:200], z[200:], y[200:], **kw)


def test_identity_scores_close_to_one(factors: np.ndarray) -> None:
    z = _identity(factors)
    m = _all(z, factors)
    for k in dm.METRIC_KEYS:
        assert k == "sap" or m[k] > 0.9, (k, m[k])
    # the classification form's ceiling is below 1: the runner-up code scores about chance (1/4 here)
    assert 0.25 < m["sap"] < 0.8
    assert dm.sap(z[:200], factors[:200], z[200:], factors[200:], continuous=True) > 0.9


def test_constant_representation_scores_zero_or_chance(factors: np.ndarray) -> None:
    m = _all(np.zeros((len(factors), 3)), factors)
    for k in ("dci_disentanglement", "dci_completeness", "mig", "sap", "modularity", "factorvae_score"):
        assert m[k] == pytest.approx(0.0, abs=1e-9), k
    assert m["betavae_score"] < 0.5  # chance = 1/3: the classifier sees identical points
    assert m["dci_informativeness"] < 0.4  # chance = 1/4


def test_shuffled_representation_scores_near_zero(factors: np.ndarray) -> None:
    z = _identity(factors)[np.random.default_rng(2).permutation(len(factors))]
    m = _all(z, factors)
    for k in ("dci_disentanglement", "dci_completeness", "mig", "sap"):
        assert m[k] < 0.15, (k, m[k])
    assert m["betavae_score"] < 0.6 and m["factorvae_score"] < 0.6 and m["dci_informativeness"] < 0.4
    with pytest.raises(ValueError, match="SAP form"):
        _all(z, factors, sap_form="r2")


def test_mig_of_exact_duplicate_loses_that_factors_gap(factors: np.ndarray) -> None:
    z = factors.astype(float)
    assert dm.mig(z, factors) > 0.95  # below 1 only by the plug-in MI estimate of independent pairs
    ent = [dm.mutual_info_matrix(factors[:, j : j + 1], factors[:, j : j + 1])[0, 0] for j in range(3)]
    gap0 = (ent[0] - np.sort(dm.mutual_info_matrix(dm.discretize(z), factors)[:, 0])[-2]) / ent[0]
    # factor 0's gap becomes exactly 0, the other two gaps are unchanged: MIG drops by gap0 / 3
    assert dm.mig(np.c_[z[:, :1], z], factors) == pytest.approx(dm.mig(z, factors) - gap0 / 3)


def test_modularity_mixed_code_is_lower(factors: np.ndarray) -> None:
    z = _identity(factors)
    mixed = np.c_[z[:, 0] + z[:, 1], z[:, 2]]
    assert dm.modularity(mixed, factors) < dm.modularity(z, factors) - 0.1


def test_factor_correlation_check() -> None:
    y = np.random.default_rng(0).integers(0, 4, (300, 2))
    assert dm.factor_max_abs_corr(y) < 0.2
    assert dm.factor_max_abs_corr(np.c_[y[:, :1], y[:, :1]]) == pytest.approx(1.0)


# ---- OOD transfer -----------------------------------------------------------------------------------------------


def test_hue_scenarios_are_the_papers_splits() -> None:
    holdout = [1, 4, 7, 10]
    train_values = [0, 2, 3, 5, 6, 8, 9, 11]
    hue = np.arange(12)
    sc = ot.hue_scenarios(hue, train_values, holdout)

    def vals(mask: np.ndarray) -> list[int]:
        return hue[mask].tolist()

    assert (vals(sc["OOD1-A"][0]), vals(sc["OOD1-A"][1])) == ([0], [2, 3, 5, 6, 8, 9, 11])
    assert (vals(sc["OOD1-B"][0]), vals(sc["OOD1-B"][1])) == ([6, 8, 9, 11], [0, 2, 3, 5])  # high -> low hue
    assert (vals(sc["OOD1-C"][0]), vals(sc["OOD1-C"][1])) == ([0, 3, 6, 9], [2, 5, 8, 11])  # alternating
    assert (vals(sc["OOD2-A"][0]), vals(sc["OOD2-A"][1])) == (train_values, holdout)
    assert "OOD2-A" not in ot.hue_scenarios(hue, list(range(12)), [])


@pytest.mark.parametrize("kind", ["gbt", "mlp"])
def test_regressors_recover_a_function_of_one_latent_and_fail_on_noise(kind: str) -> None:
    rng = np.random.default_rng(0)
    n = 400
    target = rng.random(n)
    z = np.c_[rng.normal(size=(n, 3)), np.sqrt(target)]  # target = latent_3 ** 2, an exact function
    y = target[:, None]
    assert ot.factor_mae(kind, z[:300], y[:300], z[300:], y[300:])[0] < 0.05
    noise = rng.normal(size=(n, 4))
    assert ot.factor_mae(kind, noise[:300], y[:300], noise[300:], y[300:])[0] > 0.2  # ~ the mean's 0.25


def test_transfer_study_scores_every_scenario_and_skips_the_ood_factor() -> None:
    rng = np.random.default_rng(0)
    names, sizes = ["hue", "pos"], {"hue": 12, "pos": 8}
    f = np.c_[rng.integers(0, 12, 300), rng.integers(0, 8, 300)]
    z = f + 0.01 * rng.normal(size=f.shape)
    ft = np.c_[rng.integers(0, 12, 60), rng.integers(0, 8, 60)]
    res = ot.transfer_study(z, f, names, sizes, "hue", [1, 4, 7, 10], (ft + 0.01, ft), regressors=("gbt",))
    assert set(res["scores"]) == {"ood1a_gbt", "ood1b_gbt", "ood1c_gbt", "ood2a_gbt", "ood2b_gbt"}
    assert list(res["per_factor"]["OOD1-A"]["gbt"]) == ["pos"]  # the OOD factor is not scored
    assert list(res["per_factor"]["OOD2-B"]["gbt"]) == ["hue", "pos"]  # only the domain is OOD there
    assert res["scores"]["ood1c_gbt"] < 0.05
    assert ot.normalise(np.array([[0, 7]]), [12, 8]).tolist() == [[0.0, 1.0]]


def test_ood_mae_is_unclipped_by_default_and_clipping_is_an_option() -> None:
    """An MLP extrapolating past the training range predicts outside [0, 1]; the paper's MAE counts that error."""
    rng = np.random.default_rng(0)
    t_tr = rng.uniform(0.0, 0.6, 300)
    z_tr = np.c_[t_tr, 0.1 * rng.normal(size=300)]
    t_te = np.full(50, 1.0)
    z_te = np.c_[np.full(50, 2.0), 0.1 * rng.normal(size=50)]  # the code says "far beyond 1"
    plain = ot.factor_mae("mlp", z_tr, t_tr[:, None], z_te, t_te[:, None])[0]
    clipped = ot.factor_mae("mlp", z_tr, t_tr[:, None], z_te, t_te[:, None], clip=True)[0]
    assert clipped < plain - 0.1, (plain, clipped)  # clipping to 1 hides the overshoot
