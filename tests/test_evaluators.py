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
