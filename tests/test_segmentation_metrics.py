"""Known-value tests of the shared segmentation metrics."""

import numpy as np
import pytest

from s2r.evaluators.segmentation import confusion, segmentation_metrics

CLASSES = ["bg", "a", "b", "c"]


def test_perfect_prediction_scores_one() -> None:
    y = np.array([[0, 1], [2, 2]])
    m = segmentation_metrics(y, y, CLASSES)
    assert m["pixel_accuracy"] == 1.0
    assert m["per_class_iou"]["c"] is None  # absent from both: undefined
    assert m["miou"] == 0.75  # CSAIL convention: the absent class counts 0 in the mean over all 4 classes
    assert segmentation_metrics(y, y, CLASSES, miou="present_classes")["miou"] == 1.0  # left out


def test_hand_computed_iou() -> None:
    t = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 2, 2])
    m = segmentation_metrics(t, p, CLASSES)
    # class 0: TP1 FP0 FN1 -> 1/2; class 1: TP2 FP1 FN1 -> 2/4; class 2: TP1 FP1 FN0 -> 1/2
    assert m["per_class_iou"] == {"bg": 0.5, "a": 0.5, "b": 0.5, "c": None}
    assert m["miou"] == pytest.approx(1.5 / 4)
    assert segmentation_metrics(t, p, CLASSES, miou="present_classes")["miou"] == pytest.approx(0.5)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)


def test_class_only_predicted_counts_as_zero() -> None:
    t = np.array([0, 0])
    p = np.array([0, 3])
    m = segmentation_metrics(t, p, CLASSES)
    assert m["per_class_iou"]["c"] == 0.0  # a false positive class is in the union, IoU 0
    assert m["miou"] == pytest.approx((0.5 + 0.0) / 4)
    assert segmentation_metrics(t, p, CLASSES, miou="present_classes")["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_ignore_index_and_errors() -> None:
    t = np.array([0, 255, 1])
    p = np.array([0, 3, 1])
    assert confusion(t, p, 4, ignore_index=255).sum() == 2
    with pytest.raises(ValueError, match="pixels"):
        confusion(np.zeros(3), np.zeros(2), 4)
