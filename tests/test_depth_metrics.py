"""Known-value tests of the shared depth metrics (s2r.evaluators.depth) and the class-subset segmentation scores."""

from __future__ import annotations

import numpy as np
import pytest

from s2r.evaluators.depth import depth_metrics, median_scale, valid_mask
from s2r.evaluators.depth_segmentation import labelled_images, subset_metrics
from s2r.evaluators.segmentation import confusion, metrics_from_confusion, segmentation_metrics


def test_perfect_prediction() -> None:
    t = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    m = depth_metrics(t.copy(), t)
    assert m["abs_rel"] == 0 and m["sq_rel"] == 0 and m["rmse"] == 0 and m["log_rmse"] == 0
    assert m["a1"] == m["a2"] == m["a3"] == 1.0 and m["valid_pixels"] == 4


def test_hand_computed_values() -> None:
    t = np.array([1.0, 2.0, 4.0, 1.0])
    p = np.array([2.0, 2.0, 2.0, 1.2])
    m = depth_metrics(p.reshape(2, 2), t.reshape(2, 2))
    # |d|/t = 1, 0, 0.5, 0.2 ; d^2/t = 1, 0, 1, 0.04 ; d^2 = 1, 0, 4, 0.04 ; ratio = 2, 1, 2, 1.2
    assert m["abs_rel"] == pytest.approx((1 + 0 + 0.5 + 0.2) / 4)
    assert m["sq_rel"] == pytest.approx((1 + 0 + 1 + 0.04) / 4)
    assert m["rmse"] == pytest.approx(np.sqrt((1 + 0 + 4 + 0.04) / 4))
    assert m["log_rmse"] == pytest.approx(np.sqrt((np.log(2) ** 2 * 2 + np.log(1.2) ** 2) / 4))
    assert m["a1"] == pytest.approx(0.5)  # ratios 1 and 1.2 are < 1.25
    assert m["a2"] == pytest.approx(0.5)  # 2 > 1.5625
    assert m["a3"] == pytest.approx(0.5)  # 2 > 1.25^3 = 1.953 as well


def test_invalid_pixels_are_masked() -> None:
    t = np.array([[1.0, 0.0], [np.nan, 2.0]])
    p = np.array([[1.0, 100.0], [100.0, 2.0]])
    m = depth_metrics(p, t)
    assert m["valid_pixels"] == 2 and m["abs_rel"] == 0.0
    assert valid_mask(np.array([0.5, 5.0]), 1e-3, 4.0).tolist() == [True, False]
    with pytest.raises(ValueError, match="no valid"):
        depth_metrics(p, np.zeros_like(t))


def test_median_scaling_removes_global_scale() -> None:
    rng = np.random.default_rng(0)
    t = rng.uniform(1, 3, (2, 4, 4))
    p = t * np.array([2.0, 0.5])[:, None, None]  # each image off by its own scale
    assert depth_metrics(p, t)["abs_rel"] > 0.4
    m = depth_metrics(p, t, median_scaling=True)
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-12) and m["a1"] == 1.0
    np.testing.assert_allclose(median_scale(p, t, np.ones_like(t, bool)), t)


def test_miou_leaves_out_classes_absent_from_both() -> None:
    classes = ["bg", "a", "b", "c"]
    t = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 1, 1])
    m = segmentation_metrics(t, p, classes)
    # bg: 1/2, a: 2/3; b and c absent from truth and prediction -> None, not 0, and not in the mean
    assert m["per_class_iou"] == {"bg": 0.5, "a": pytest.approx(2 / 3), "b": None, "c": None}
    assert m["miou"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_subset_scoring_of_shared_classes() -> None:
    classes = ["bg", "a", "b"]
    t = np.array([0, 1, 2, 2])
    p = np.array([0, 2, 2, 1])
    cm = confusion(t, p, 3)
    full = subset_metrics(cm, classes, classes)
    ref = metrics_from_confusion(cm, classes)
    assert full["miou"] == pytest.approx(ref["miou"]) and full["pixel_accuracy"] == ref["pixel_accuracy"]
    sub = subset_metrics(cm, classes, ["bg", "a"])
    # truth-b pixels are left out; the truth-a pixel predicted b is a miss of a: a IoU 0/1, bg 1/1
    assert sub["per_class_iou"] == {"bg": 1.0, "a": 0.0} and sub["pixels"] == 2
    assert sub["miou"] == 0.5 and sub["pixel_accuracy"] == 0.5


class _Split:
    def __init__(self, images: np.ndarray, depth: np.ndarray, masks: np.ndarray) -> None:
        self.images, self.depth, self.masks = images, depth, masks

    def __len__(self) -> int:
        return len(self.images)


class _Run:
    def __init__(self) -> None:
        self.metrics: dict = {}

    def log_metrics(self, m: dict, step: int = 0) -> None:
        self.metrics |= m

    def log_figure(self, fig: object, name: str) -> None:
        pass


def _dense_method(depth: np.ndarray, masks: np.ndarray, pred_depth: np.ndarray, pred_mask: np.ndarray):
    """A stand-in dense predictor on a one-domain benchmark whose test split is (depth, masks)."""
    from types import SimpleNamespace

    images = np.zeros((*depth.shape, 3), np.uint8)
    spec = SimpleNamespace(target="kitti", seg_classes=["road", "sky", "car"])
    data = SimpleNamespace(spec=spec, root="bench", get=lambda d, s: _Split(images, depth, masks))
    return SimpleNamespace(name="stub", capabilities=frozenset({"predict"}), data=data,
                           predict=lambda x: {"depth": pred_depth, "mask": pred_mask})


def _params(**kw: object):
    from types import SimpleNamespace

    s = {"classes": [], "depth_classes": [], "median_scaling": False, "min_depth": 1e-3, "max_depth": 80.0,
         "panels": 2} | kw
    return SimpleNamespace(reports=SimpleNamespace(depth_segmentation=SimpleNamespace(**s)))


def test_evaluator_mixed_depth_only_and_mask_only_images(tmp_path) -> None:
    """KITTI-like test split: image 0 has sparse depth and no mask (all 255), image 1 a mask and no depth (all 0).
    Each metric uses only the labelled images / valid pixels; known values."""
    from s2r.evaluators.depth_segmentation import evaluate

    depth = np.zeros((2, 2, 2), np.float32)
    depth[0, 0, 0], depth[0, 1, 1] = 10.0, 20.0  # two LiDAR points, the rest invalid
    masks = np.full((2, 2, 2), 255, np.uint8)
    masks[1] = [[0, 1], [2, 255]]  # road, sky, car, unlabelled
    pred_depth = np.full((2, 2, 2), 20.0, np.float32)  # image 1's prediction must not count (no truth)
    pred_mask = np.zeros((2, 2, 2), np.int64)  # image 0's prediction must not count (no mask)
    assert [a.tolist() for a in labelled_images(depth, masks)] == [[True, False], [False, True]]
    run = _Run()
    r = evaluate(_dense_method(depth, masks, pred_depth, pred_mask), run, tmp_path, _params())
    assert r["abs_rel"] == pytest.approx((10 / 10 + 0 / 20) / 2) and r["depth_valid_pixels"] == 2
    assert r["rmse"] == pytest.approx(np.sqrt(100 / 2))
    assert r["pixel_accuracy"] == pytest.approx(1 / 3) and r["seg_pixels"] == 3  # road right; sky, car wrong
    assert r["miou"] == pytest.approx((1 / 3 + 0 + 0) / 3)  # road: 1 / (1 + 2 FP)
    assert (r["depth_images"], r["seg_images"], r["n"]) == (1, 1, 2)
    assert run.metrics["test_abs_rel"] == r["abs_rel"] and (tmp_path / "panels.png").is_file()


def test_evaluator_split_without_any_depth_or_mask(tmp_path) -> None:
    """A test split with no valid depth at all (or no labelled pixel) gives null metrics, not an error or 0."""
    import json

    from s2r.evaluators.depth_segmentation import evaluate

    depth = np.zeros((2, 2, 2), np.float32)
    masks = np.full((2, 2, 2), 255, np.uint8)
    masks[0, 0, 0] = 1
    pred = np.ones((2, 2, 2), np.float32), np.ones((2, 2, 2), np.int64)
    r = evaluate(_dense_method(depth, masks, *pred), _Run(), tmp_path, _params())
    assert r["abs_rel"] is None and r["depth_valid_pixels"] == 0 and r["depth_images"] == 0
    assert r["pixel_accuracy"] == 1.0 and r["seg_images"] == 1
    r = evaluate(_dense_method(depth + 5.0, np.full((2, 2, 2), 255, np.uint8), *pred), _Run(), None, _params())
    assert r["miou"] is None and r["pixel_accuracy"] is None and r["seg_pixels"] == 0
    assert r["abs_rel"] == pytest.approx(0.8)  # |1 - 5| / 5
    json.dumps(r, allow_nan=False)  # strict JSON (null, never NaN) for DVC metrics


def test_evaluator_depth_on_object_pixels_and_majority_reference(tmp_path) -> None:
    """depth_classes scores depth only on those classes' pixels; miou_majority_class is the mIoU of predicting the
    most frequent true class everywhere (the reference a segmenter must beat). Known values."""
    from s2r.data.benchmark import DataError
    from s2r.evaluators.depth_segmentation import evaluate

    depth = np.full((1, 2, 2), 10.0, np.float32)
    depth[0, 1, 1] = 2.0
    masks = np.array([[[0, 0], [0, 2]]], np.uint8)  # three road pixels, one car pixel
    pred_depth = np.full((1, 2, 2), 10.0, np.float32)  # right on the road, 4 m off on the car
    pred_mask = np.zeros((1, 2, 2), np.int64)
    m = _dense_method(depth, masks, pred_depth, pred_mask)
    assert evaluate(m, _Run(), None, _params())["abs_rel"] == pytest.approx((0 + 0 + 0 + 4.0) / 4)
    r = evaluate(m, _Run(), None, _params(depth_classes=["car"]))
    assert r["abs_rel"] == pytest.approx(4.0) and r["depth_valid_pixels"] == 1 and r["depth_classes"] == ["car"]
    assert r["miou_majority_class"] == pytest.approx((3 / 4 + 0) / 2)  # road IoU 3/4, car 0; sky absent
    assert r["miou"] == pytest.approx(r["miou_majority_class"])  # this prediction IS the majority predictor
    with pytest.raises(DataError, match="depth_classes"):
        evaluate(m, _Run(), None, _params(depth_classes=["boat"]))
