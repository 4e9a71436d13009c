"""Known values of the disentanglement metrics (paper 3) and of the OOD transfer framework on hand-built codes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from s2r.evaluators import disentanglement as dm
from s2r.evaluators import ood_transfer as ot


@pytest.fixture(scope="module")
def factors() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 6, (400, 3))


def _identity(y: np.ndarray, seed: int = 1) -> np.ndarray:
    return y + 0.05 * np.random.default_rng(seed).normal(size=y.shape)


def test_dci_from_importance_known_values() -> None:
    assert dm.dci_from_importance(np.eye(3)) == pytest.approx((1.0, 1.0))
    d, c = dm.dci_from_importance(np.ones((3, 3)))  # every code explains every factor equally
    assert d == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(0.0, abs=1e-9)
    # one factor spread over two codes: disentanglement stays 1, that factor's completeness = 1 - log_3(2)
    d, c = dm.dci_from_importance(np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]]))
    assert d == pytest.approx(1.0) and c == pytest.approx((1 - math.log(2, 4) + 2) / 3)


def test_identity_scores_close_to_one(factors: np.ndarray) -> None:
    m = dm.all_metrics(_identity(factors), factors)
    for k in dm.METRIC_KEYS:
        assert m[k] > 0.9, (k, m[k])


def test_constant_representation_scores_zero_or_chance(factors: np.ndarray) -> None:
    m = dm.all_metrics(np.zeros((len(factors), 3)), factors)
    for k in ("dci_disentanglement", "dci_completeness", "mig", "sap", "modularity", "factorvae_score"):
        assert m[k] == pytest.approx(0.0, abs=1e-9), k
    assert m["betavae_score"] < 0.5  # chance = 1/3: the classifier sees identical points
    assert m["dci_informativeness"] < 0.35  # chance = 1/6


def test_shuffled_representation_scores_near_zero(factors: np.ndarray) -> None:
    z = _identity(factors)[np.random.default_rng(2).permutation(len(factors))]
    m = dm.all_metrics(z, factors)
    for k in ("dci_disentanglement", "dci_completeness", "mig", "sap"):
        assert m[k] < 0.1, (k, m[k])
    assert m["betavae_score"] < 0.6 and m["factorvae_score"] < 0.6 and m["dci_informativeness"] < 0.35


def test_duplicated_latent_lowers_completeness_mig_and_sap(factors: np.ndarray) -> None:
    z = _identity(factors)
    dup = np.c_[z[:, :1], z[:, :1] + 0.05 * np.random.default_rng(3).normal(size=(len(z), 1)), z[:, 1:]]
    base, m = dm.all_metrics(z, factors), dm.all_metrics(dup, factors)
    assert m["dci_completeness"] < base["dci_completeness"] - 0.03
    assert m["mig"] < base["mig"] - 0.2  # factor 0's gap collapses: two codes carry it
    assert m["sap"] < base["sap"] - 0.2
    assert m["dci_disentanglement"] > 0.9  # each code still explains one factor


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


def test_sap_classification_form_and_lasso_dci(factors: np.ndarray) -> None:
    y = factors % 2  # binary factors: the classification form's ceiling is 1 - chance = 0.5
    z = _identity(y)
    assert dm.sap(z, y, continuous=False) == pytest.approx(0.5, abs=0.1)
    assert dm.sap(np.zeros_like(z), y, continuous=False) == 0.0
    m = dm.dci(_identity(factors), factors, estimator="lasso")
    assert m["dci_disentanglement"] > 0.9 and m["dci_informativeness"] > 0.9
    with pytest.raises(ValueError, match="estimator"):
        dm.dci(z, y, estimator="forest")


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
