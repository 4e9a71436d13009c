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


def _ref_monodepth2(pred: np.ndarray, truth: np.ndarray, min_depth: float, max_depth: float) -> np.ndarray:
    """An independent implementation of monodepth2's evaluate_depth.py loop: per image, valid pixels strictly
    inside (min, max), prediction clipped, the seven errors, then the mean over images."""
    rows = []
    for p, t in zip(pred, truth):
        keep = (t > min_depth) & (t < max_depth)
        g, q = t[keep], np.clip(p[keep], min_depth, max_depth)
        thresh = np.maximum(g / q, q / g)
        rows.append([np.mean(np.abs(g - q) / g), np.mean((g - q) ** 2 / g), np.sqrt(np.mean((g - q) ** 2)),
                     np.sqrt(np.mean((np.log(g) - np.log(q)) ** 2)), (thresh < 1.25).mean(),
                     (thresh < 1.25**2).mean(), (thresh < 1.25**3).mean()])
    return np.array(rows).mean(0)


KEYS = ("abs_rel", "sq_rel", "rmse", "log_rmse", "a1", "a2", "a3")


def test_depth_is_averaged_per_image_as_monodepth2() -> None:
    rng = np.random.default_rng(0)
    t = rng.uniform(1.0, 60.0, (3, 6, 5))
    t[0, :4] = 0.0  # image 0 has few valid pixels: per-image and pooled means differ
    t[1, 0, 0] = 80.0  # exactly max_depth: invalid (strict, as monodepth2)
    p = t * rng.uniform(0.5, 1.6, t.shape) + rng.uniform(0, 2, t.shape)
    p[2, 0, 0] = 200.0  # clipped to max_depth
    m = depth_metrics(p, t, min_depth=1e-3, max_depth=80.0)
    ref = _ref_monodepth2(p, t, 1e-3, 80.0)
    assert [m[k] for k in KEYS] == pytest.approx(ref.tolist(), abs=1e-12)
    assert m["average"] == "images" and m["images"] == 3 and m["valid_pixels"] == 30 * 3 - 20 - 1
    pooled = depth_metrics(p, t, min_depth=1e-3, max_depth=80.0, average="pixels")
    assert [pooled[k] for k in KEYS] == pytest.approx([m["pixel_pooled"][k] for k in KEYS], abs=1e-15)
    assert abs(pooled["abs_rel"] - m["abs_rel"]) > 1e-3  # the two conventions differ on this set
    # pooled by hand: one image made of all valid pixels
    keep = (t > 1e-3) & (t < 80.0)
    assert pooled["rmse"] == pytest.approx(np.sqrt(np.mean((np.clip(p[keep], 1e-3, 80) - t[keep]) ** 2)), abs=1e-12)
    with pytest.raises(ValueError, match="average"):
        depth_metrics(p, t, average="batches")


def _ref_csail_miou(preds: list[np.ndarray], labels: list[np.ndarray], k: int) -> tuple[float, np.ndarray]:
    """An independent implementation of the CSAIL eval: per image the intersection / union areas of classes
    1..k (labels shifted by one, unlabelled = 0 and masked out of the prediction), summed over the set;
    iou = I / (U + 1e-10), mIoU = iou.mean() over all k classes."""
    inter, union = np.zeros(k), np.zeros(k)
    for p, t in zip(preds, labels):
        p, t = p.astype(np.int64) + 1, t.astype(np.int64) + 1
        p = p * (t > 0)
        i_area = np.histogram(p * (p == t), bins=k, range=(1, k))[0]
        p_area = np.histogram(p, bins=k, range=(1, k))[0]
        t_area = np.histogram(t, bins=k, range=(1, k))[0]
        inter += i_area
        union += p_area + t_area - i_area
    iou = inter / (union + 1e-10)
    return float(iou.mean()), iou


def test_miou_is_the_csail_mean_over_all_classes() -> None:
    classes = ["bg", "a", "b", "c", "d"]
    rng = np.random.default_rng(1)
    truth = [rng.integers(0, 3, (4, 4)) for _ in range(3)]  # classes 3, 4 never occur in truth
    preds = [rng.integers(0, 4, (4, 4)) for _ in range(3)]  # class 3 predicted (FP only), 4 never
    truth[0][0, :2] = -1  # unlabelled pixels (CSAIL: -1) are left out
    ref, ref_iou = _ref_csail_miou(preds, truth, 5)
    t = np.concatenate([x.ravel() for x in truth])
    p = np.concatenate([x.ravel() for x in preds])
    m = segmentation_metrics(np.where(t < 0, 255, t), p, classes, ignore_index=255)
    assert m["miou"] == pytest.approx(ref, abs=1e-9)
    assert [v or 0.0 for v in m["per_class_iou"].values()] == pytest.approx(ref_iou.tolist(), abs=1e-9)
    assert m["per_class_iou"]["d"] is None  # undefined (0/0), counted as 0 in the mean
    present = segmentation_metrics(np.where(t < 0, 255, t), p, classes, ignore_index=255, miou="present_classes")
    assert present["miou"] == pytest.approx(ref * 5 / 4, abs=1e-9)  # the mean over the 4 classes with a union
    with pytest.raises(ValueError, match="mIoU"):
        segmentation_metrics(t, p, classes, miou="some")


def test_miou_conventions_on_classes_absent_from_both() -> None:
    classes = ["bg", "a", "b", "c"]
    t = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 1, 1])
    m = segmentation_metrics(t, p, classes)
    # bg: 1/2, a: 2/3; b and c absent from truth and prediction -> None (undefined), 0 in the CSAIL mean
    assert m["per_class_iou"] == {"bg": 0.5, "a": pytest.approx(2 / 3), "b": None, "c": None}
    assert m["miou"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert segmentation_metrics(t, p, classes, miou="present_classes")["miou"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_subset_scoring_of_shared_classes() -> None:
    classes = ["bg", "a", "b"]
    t = np.array([0, 1, 2, 2])
    p = np.array([0, 2, 2, 1])
    cm = confusion(t, p, 3)
    full = subset_metrics(cm, classes, classes)
    ref = metrics_from_confusion(cm, classes)
    assert full["miou"] == pytest.approx(ref["miou"]) and full["pixel_accuracy"] == ref["pixel_accuracy"]
    cm_absent = confusion(np.array([0, 0]), np.array([0, 1]), 3)  # b absent from both
    assert subset_metrics(cm_absent, classes, classes)["miou"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert subset_metrics(cm_absent, classes, classes, "present_classes")["miou"] == pytest.approx(0.25)
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
                           predict=lambda x: {"depth": pred_depth, "mask": pred_mask},
                           trained_tasks=lambda: None)  # the base Method's default: tasks not distinguished


def _params(**kw: object):
    from types import SimpleNamespace

    s = {"classes": [], "depth_classes": [], "median_scaling": False, "min_depth": 1e-3, "max_depth": 80.0,
         "panels": 2, "depth_average": "images", "miou": "all_classes"} | kw
    return SimpleNamespace(reports=SimpleNamespace(depth_segmentation=SimpleNamespace(**s)), source="test params")


def test_evaluator_mixed_depth_only_and_mask_only_images(tmp_path) -> None:
    """KITTI-like test split: image 0 has sparse depth and no mask (all 255), image 1 a mask and no depth (all 0).
    Each metric uses only the labelled images / valid pixels; known values."""
    from s2r.evaluators.depth_segmentation import EVALUATOR

    evaluate = EVALUATOR.evaluate

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

    from s2r.evaluators.depth_segmentation import EVALUATOR

    evaluate = EVALUATOR.evaluate

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
    from s2r.evaluators.depth_segmentation import EVALUATOR

    evaluate = EVALUATOR.evaluate

    depth = np.full((1, 2, 2), 10.0, np.float32)
    depth[0, 1, 1] = 2.0
    masks = np.array([[[0, 0], [0, 2]]], np.uint8)  # three road pixels, one car pixel
    pred_depth = np.full((1, 2, 2), 10.0, np.float32)  # right on the road, 4 m off on the car
    pred_mask = np.zeros((1, 2, 2), np.int64)
    m = _dense_method(depth, masks, pred_depth, pred_mask)
    assert evaluate(m, _Run(), None, _params())["abs_rel"] == pytest.approx((0 + 0 + 0 + 4.0) / 4)
    r = evaluate(m, _Run(), None, _params(depth_classes=["car"]))
    assert r["abs_rel"] == pytest.approx(4.0) and r["depth_valid_pixels"] == 1 and r["depth_classes"] == ["car"]
    # road IoU 3/4, car 0, sky absent: 0 as well under the default all_classes convention (CSAIL eval)
    assert r["miou_majority_class"] == pytest.approx((3 / 4 + 0 + 0) / 3)
    assert r["miou"] == pytest.approx(r["miou_majority_class"])  # this prediction IS the majority predictor
    with pytest.raises(DataError, match="depth_classes"):
        evaluate(m, _Run(), None, _params(depth_classes=["boat"]))
