"""Monocular depth metrics (Eigen et al. 2014, as reported in paper 2's Table 1 and by KITTI depth benchmarks).

Shared by every method that predicts depth. All metrics are computed over the valid pixels of every image
(truth finite and inside [min_depth, max_depth]; the benchmark stores 0 for invalid pixels) and pooled over
all valid pixels of the evaluated set (every valid pixel weighs the same, as the KITTI devkit's per-image
means would only if every image had the same number of valid pixels; the per-image mean is also returned):

    AbsRel  = mean |d - d*| / d*            SqRel = mean (d - d*)^2 / d*
    RMSE    = sqrt(mean (d - d*)^2)         logRMSE = sqrt(mean (log d - log d*)^2)
    a_k     = share of pixels with max(d / d*, d* / d) < 1.25^k   (k = 1, 2, 3)

d = prediction, d* = truth. Predictions are clipped to [min_depth, max_depth] (max_depth 0 = no upper clip),
so log and ratio are defined. Optional median scaling (for scale-ambiguous monocular models, Zhou et al. 2017)
multiplies each image's prediction by median(d*) / median(d) over its valid pixels before the metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLDS = (1.25, 1.25**2, 1.25**3)


def valid_mask(truth: np.ndarray, min_depth: float = 1e-3, max_depth: float = 0.0) -> np.ndarray:
    """Boolean mask of pixels with usable ground truth (finite, >= min_depth, <= max_depth if max_depth > 0)."""
    t = np.asarray(truth, np.float64)
    ok = np.isfinite(t) & (t >= min_depth)
    if max_depth > 0:
        ok &= t <= max_depth
    return ok


def median_scale(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per image: pred * median(truth) / median(pred) over the image's valid pixels ((N, H, W) arrays)."""
    out = np.array(pred, np.float64, copy=True)
    for i in range(out.shape[0]):
        m = mask[i]
        if m.any():
            med_p = float(np.median(out[i][m]))
            if med_p > 0:
                out[i] *= float(np.median(truth[i][m])) / med_p
    return out


def _terms(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """The seven metrics over 1-D arrays of valid predictions p and truths t."""
    ratio = np.maximum(p / t, t / p)
    d = p - t
    out = {
        "abs_rel": float(np.mean(np.abs(d) / t)),
        "sq_rel": float(np.mean(d**2 / t)),
        "rmse": float(np.sqrt(np.mean(d**2))),
        "log_rmse": float(np.sqrt(np.mean((np.log(p) - np.log(t)) ** 2))),
    }
    for k, thr in enumerate(THRESHOLDS, start=1):
        out[f"a{k}"] = float(np.mean(ratio < thr))
    return out


def depth_metrics(pred: np.ndarray, truth: np.ndarray, *, min_depth: float = 1e-3, max_depth: float = 0.0,
                  median_scaling: bool = False) -> dict[str, Any]:
    """AbsRel, SqRel, RMSE, logRMSE, a1..a3 of predicted vs true depth (metres), valid pixels only.

    `pred`, `truth`: (N, H, W) or (H, W). Returns the pooled metrics, `valid_pixels`, the per-image mean of
    each metric (`per_image_mean`), and the median-scaling ratios used (if any).
    """
    p = np.asarray(pred, np.float64)
    t = np.asarray(truth, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != truth shape {t.shape}")
    if p.ndim == 2:
        p, t = p[None], t[None]  # (H, W) -> (1, H, W)
    mask = valid_mask(t, min_depth, max_depth)
    if not mask.any():
        raise ValueError("no valid ground-truth depth pixel (all 0, non-finite or outside [min_depth, max_depth])")
    if median_scaling:
        p = median_scale(p, t, mask)
    p = np.clip(np.nan_to_num(p, nan=min_depth, posinf=max_depth or 1e6, neginf=min_depth), min_depth,
                max_depth if max_depth > 0 else np.inf)
    pooled = _terms(p[mask], t[mask])
    per_image = [_terms(p[i][mask[i]], t[i][mask[i]]) for i in range(p.shape[0]) if mask[i].any()]
    return {**pooled, "valid_pixels": int(mask.sum()),
            "per_image_mean": {k: float(np.mean([m[k] for m in per_image])) for k in pooled}}
