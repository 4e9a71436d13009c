"""Semantic segmentation metrics: per-class IoU, mIoU and pixel accuracy from one confusion matrix.

Shared by every method that predicts masks (twin-VAE heads, paper 2; the downstream segmenter, paper 5).
Counts are accumulated over the whole evaluated set (one confusion matrix), IoU_c = TP / (TP + FP + FN).
The mean over classes (`miou`):
  "all_classes" (default; CSAIL semantic-segmentation-pytorch `eval.py`, the code paper 2 scored with:
      `iou = intersection_sum / (union_sum + 1e-10); iou.mean()`): the mean over all K classes, a class absent
      from both the prediction and the truth of the set counting 0;
  "present_classes" (NOT paper 2's): the mean over the classes with a non-empty union (absent ones left out).
Either way `per_class_iou` reports an absent class as None (undefined, 0/0). Pixels whose truth is
`ignore_index` are left out of every count; pixel accuracy = correct / labelled pixels of the set.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(K, K) pixel counts, rows = true class, columns = predicted class (any shapes, flattened)."""
    t = np.asarray(y_true, np.int64).ravel()
    p = np.asarray(y_pred, np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"prediction has {p.size} pixels, truth {t.size}")
    keep = (t >= 0) & (t < num_classes) if ignore_index is None else (t != ignore_index) & (t >= 0) & (t < num_classes)
    t, p = t[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted class outside [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


MIOU_MODES = ("all_classes", "present_classes")


def mean_iou(iou: np.ndarray, miou: str = "all_classes") -> float:
    """Mean of per-class IoUs (NaN = class absent from truth and prediction) under the `miou` convention."""
    if miou not in MIOU_MODES:
        raise ValueError(f"unknown mIoU convention {miou!r}; use one of {MIOU_MODES}")
    iou = np.asarray(iou, np.float64)
    if miou == "all_classes":
        return float(np.nan_to_num(iou, nan=0.0).mean()) if iou.size else float("nan")
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def metrics_from_confusion(cm: np.ndarray, classes: list[str], miou: str = "all_classes") -> dict[str, Any]:
    """IoU_c = TP / (TP + FP + FN); mIoU under the `miou` convention (module docstring); pixel accuracy."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {
        "miou": mean_iou(iou, miou),
        "pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "per_class_iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou)},
        "pixels": int(cm.sum()),
    }


def segmentation_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                         ignore_index: int | None = None, miou: str = "all_classes") -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU and the confusion matrix of integer masks."""
    cm = confusion(y_true, y_pred, len(classes), ignore_index)
    return {**metrics_from_confusion(cm, classes, miou), "confusion_matrix": cm.tolist()}
