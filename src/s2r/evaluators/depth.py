"""Monocular depth metrics (Eigen et al. 2014, as reported in paper 2's Table 1 and by KITTI depth benchmarks).

Shared by every method that predicts depth. As monodepth2's `evaluate_depth.py` (`compute_errors`, the KITTI /
Eigen-split convention of paper 2's baselines): per image, over its valid pixels (truth finite and strictly
inside (min_depth, max_depth); the benchmark stores 0 for invalid pixels), with d = prediction, d* = truth,

    AbsRel  = mean |d - d*| / d*            SqRel = mean (d - d*)^2 / d*
    RMSE    = sqrt(mean (d - d*)^2)         logRMSE = sqrt(mean (log d - log d*)^2)
    a_k     = share of pixels with max(d / d*, d* / d) < 1.25^k   (k = 1, 2, 3)

then the mean over the images that have a valid pixel (`average="images"`, the default; RMSE is the mean of the
per-image RMSEs). `average="pixels"` (NOT the papers' convention; `reports.depth_segmentation.depth_average`)
pools every valid pixel of the set into one computation instead, so images with many valid pixels weigh more.
Both are returned (`per_image_mean`, `pixel_pooled`); the top-level keys are the chosen one.
Predictions are clipped to [min_depth, max_depth] (max_depth 0 = no upper clip), so log and ratio are defined.
Optional median scaling (for scale-ambiguous monocular models, Zhou et al. 2017) multiplies each image's
prediction by median(d*) / median(d) over its valid pixels before the clipping, as monodepth2 does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLDS = (1.25, 1.25**2, 1.25**3)


def valid_mask(truth: np.ndarray, min_depth: float = 1e-3, max_depth: float = 0.0) -> np.ndarray:
    """Boolean mask of pixels with usable ground truth (finite, > min_depth, < max_depth if max_depth > 0), as
    monodepth2's `gt_depth > MIN_DEPTH & gt_depth < MAX_DEPTH`."""
    t = np.asarray(truth, np.float64)
    ok = np.isfinite(t) & (t > min_depth)
    if max_depth > 0:
        ok &= t < max_depth
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


AVERAGES = ("images", "pixels")


def depth_metrics(pred: np.ndarray, truth: np.ndarray, *, min_depth: float = 1e-3, max_depth: float = 0.0,
                  median_scaling: bool = False, average: str = "images") -> dict[str, Any]:
    """AbsRel, SqRel, RMSE, logRMSE, a1..a3 of predicted vs true depth (metres), valid pixels only.

    `pred`, `truth`: (N, H, W) or (H, W). `average`: "images" (per-image metrics, then their mean: monodepth2 /
    KITTI) or "pixels" (pooled over all valid pixels). Returns the chosen metrics, `average`, `valid_pixels`,
    `images` (with a valid pixel), and both forms: `per_image_mean` and `pixel_pooled`.
    """
    if average not in AVERAGES:
        raise ValueError(f"unknown depth average {average!r}; use one of {AVERAGES}")
    p = np.asarray(pred, np.float64)
    t = np.asarray(truth, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != truth shape {t.shape}")
    if p.ndim == 2:
        p, t = p[None], t[None]  # (H, W) -> (1, H, W)
    mask = valid_mask(t, min_depth, max_depth)
    if not mask.any():
        raise ValueError("no valid ground-truth depth pixel (all 0, non-finite or outside (min_depth, max_depth))")
    if median_scaling:
        p = median_scale(p, t, mask)
    p = np.clip(np.nan_to_num(p, nan=min_depth, posinf=max_depth or 1e6, neginf=min_depth), min_depth,
                max_depth if max_depth > 0 else np.inf)
    pooled = _terms(p[mask], t[mask])
    per_image = [_terms(p[i][mask[i]], t[i][mask[i]]) for i in range(p.shape[0]) if mask[i].any()]
    image_mean = {k: float(np.mean([m[k] for m in per_image])) for k in pooled}
    return {**(image_mean if average == "images" else pooled), "average": average, "valid_pixels": int(mask.sum()),
            "images": len(per_image), "per_image_mean": image_mean, "pixel_pooled": pooled}
