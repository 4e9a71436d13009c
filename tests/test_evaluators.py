"""Known values of the classification evaluator."""

from __future__ import annotations

import numpy as np
import pytest

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

    from s2r.stages import report

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
    text = report(tmp_path)
    assert text.count("method") == 4  # one table each
    assert "knn_accuracy" in text and "abs_rel" in text and "score" in text
    assert "n/a" in text and "0.9000" in text and "0.2500" in text
    assert "no results yet" in report(tmp_path / "empty")
