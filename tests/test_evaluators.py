"""Known values of the classification evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_section
from s2r.evaluators.classification import classification_metrics, confusion_matrix, plot_confusion


def test_perfect_prediction_scores_one() -> None:
    y = np.array([0, 1, 2, 2, 1])
    m = classification_metrics(y, y, ["a", "b", "c"])
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_known_confusion_and_per_class() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    p = np.array([0, 0, 0, 1, 0, 0])
    m = classification_metrics(y, p, ["a", "b"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 0.0}
    assert m["balanced_accuracy"] == pytest.approx(0.375)
    assert confusion_matrix(y, p, 2).tolist() == [[3, 1], [2, 0]]


def test_absent_class_is_none_not_zero() -> None:
    m = classification_metrics(np.array([0, 0]), np.array([0, 1]), ["a", "b", "c"])
    assert m["per_class_accuracy"]["c"] is None and m["balanced_accuracy"] == pytest.approx(0.5)


def test_confusion_plot_has_counts() -> None:
    fig = plot_confusion(np.array([[3, 1], [2, 0]]), ["a", "b"], "t")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"3", "1", "2"}


def test_report_has_one_table_per_evaluator_and_survives_missing_values(tmp_path) -> None:
    """`s2r report` (the last line of `make run`) reads every evaluator's evaluate.json without crashing."""
    import json

    from conftest import tiny_section
    from s2r.config import VerdictsParams
    from s2r.report import report

    rule = tiny_section(VerdictsParams, "reports.verdicts")
    files = {
        "mixing": {"evaluator": "classification", "domain": "real", "accuracy": 0.9, "balanced_accuracy": 0.8},
        "ae": {"evaluator": "latent", "domain": "real", "accuracy": 0.2, "knn_accuracy": 0.2, "rf_accuracy": 0.1,
               "svm_accuracy": None},
        "twinvae_heads": {"evaluator": "depth_segmentation", "domain": "pseudo_real", "abs_rel": None, "miou": 0.5},
        "other": {"evaluator": "unknown", "domain": "x", "score": 0.25},
    }
    for name, m in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "evaluate.json").write_text(json.dumps(m))
    text = report(tmp_path, rule)
    assert sum(line.startswith("method ") for line in text.splitlines()) == 4  # one table each (then the verdicts)
    assert "knn_accuracy" in text and "abs_rel" in text and "score" in text
    assert "n/a" in text and "0.9000" in text and "0.2500" in text
    assert "no results yet" in report(tmp_path / "empty", rule)


# ---- the disentanglement evaluator's settings (reports.disentanglement) and the tables it feeds -----------------


class _Run:
    def __init__(self) -> None:
        self.metrics: dict = {}

    def log_metrics(self, m: dict, step: int = 0) -> None:
        self.metrics |= m

    def log_figure(self, fig: object, name: str) -> None:
        pass


def _encoder_stub(n: int = 90, seed: int = 0):
    """A stand-in `encode` method on one source domain: the code is the factors plus a little noise."""
    from types import SimpleNamespace

    import torch

    rng = np.random.default_rng(seed)
    f = np.c_[rng.integers(0, 6, n), rng.integers(0, 3, n), rng.integers(0, 3, n)]  # hue, pos, size
    images = np.repeat(f[:, :, None, None].astype(np.uint8), 2, 2).transpose(0, 2, 3, 1)  # (n, 2, 2, 3) uint8
    part = type("Part", (), {"images": images, "factors": f, "__len__": lambda self: n})()
    spec = SimpleNamespace(source="sim", target="sim")
    data = SimpleNamespace(spec=spec, root="bench", has=lambda d, s: s == "train", get=lambda d, s: part)

    def enc(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64)[:, 0, 0, :] + 0.05 * np.random.default_rng(1).normal(size=(len(x), 3))

    holdout = [1, 4]
    return SimpleNamespace(
        name="stub", capabilities=frozenset({"encode"}), data=data, seed=0,
        cfg=SimpleNamespace(eval_images=0, ood_factor="hue", ood_order=[]), factor_names=["hue", "pos", "size"],
        factor_sizes={"hue": 6, "pos": 3, "size": 3}, holdout={"hue": holdout},
        in_distribution=lambda fs: ~np.isin(fs[:, 0], holdout), encode=enc,
        elbo_terms=lambda x: {"elbo": -1.0, "recon": 1.0, "kl": 0.0},
        decode=lambda z: np.zeros((len(z), 2, 2, 3), np.uint8),
        to_input=lambda x: torch.zeros(len(x), 3, 2, 2), reconstruct=lambda x: np.zeros((len(x), 2, 2, 3), np.uint8))


def _dis_params(**kw):
    from types import SimpleNamespace

    from s2r.config import DisentanglementParams

    return SimpleNamespace(reports=SimpleNamespace(
        disentanglement=tiny_section(DisentanglementParams, "reports.disentanglement", **kw)), source="tiny params")


def test_disentanglement_evaluator_uses_the_configured_split_estimator_and_forms() -> None:
    from s2r.evaluators.disentanglement import EVALUATOR

    evaluate = EVALUATOR.evaluate

    method = _encoder_stub()
    run = _Run()
    r = evaluate(method, run, None, _dis_params(estimator="lightgbm", sap_form="continuous", num_train=30,
                                                num_test=15, ood_clip=True))
    assert (r["metric_points_train"], r["metric_points_test"]) == (30, 15)
    assert (r["dci_estimator"], r["sap_form"], r["ood_clip"]) == ("lightgbm", "continuous", True)
    assert r["sap"] > 0.8 and r["dci_informativeness"] > 0.8  # the code is the factors: R^2 form near 1
    assert set(r["per_factor"]["OOD2-A"]["gbt"]) == {"pos", "size"}  # per-factor errors, OOD factor left out
    assert run.metrics["metric_points_train"] == 30


def test_per_factor_table_is_the_fig15_decomposition() -> None:
    import pandas as pd

    from s2r.tables.betavae import per_factor_table

    cells = [("a", 0, "pos", 0.1), ("b", 0, "pos", 0.3), ("c", 1, "pos", 0.05), ("a", 0, "size", 0.2),
             ("c", 1, "size", 0.4)]
    rows = [{"model": m, "input_noise": n, "weak_supervision": 0, "scenario": "OOD2-A", "regressor": "gbt",
             "factor": f, "mae": v} for m, n, f, v in cells]
    t = per_factor_table(pd.DataFrame(rows))
    assert list(t.columns) == ["scenario", "regressor", "factor", "noise=0", "noise=1"]
    t = t.set_index("factor")
    assert (t.loc["pos", "noise=0"], t.loc["pos", "noise=1"], t.loc["size", "noise=1"]) == ("0.2000", "0.0500",
                                                                                             "0.4000")


def test_twinvae_table_names_its_conventions_and_refuses_mixed_ones() -> None:
    from s2r.tables.twinvae import conventions

    new = {"depth_average": "images", "miou_convention": "all_classes"}
    assert "per image" in conventions({"ours": new, "lower": new, "upper": new})
    assert "pooled" in conventions({"ours": {}, "lower": {}})  # evaluate JSONs from before the options: pooled
    with pytest.raises(ValueError, match="conventions"):
        conventions({"ours": new, "lower": {}})
