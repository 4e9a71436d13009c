"""Depth + semantic segmentation on the target domain's test split (paper 2's protocol, Table 1).

For any method whose `predict(images)` returns {"depth": (N, H, W) metres, "mask": (N, H, W) class ids}: depth
AbsRel, SqRel, RMSE, logRMSE, a1..a3 over valid pixels (s2r.evaluators.depth, optional median scaling; per image,
then the mean, as monodepth2: `depth_average`) and segmentation mIoU, per-class IoU and pixel accuracy
(s2r.evaluators.segmentation; mean over all scored classes, as the CSAIL eval paper 2 used: `miou`) over the
classes both domains share. The class map is the benchmark description's `seg_classes` (one list for every
domain: class id i means seg_classes[i] in sim and target alike); `reports.depth_segmentation.classes`
restricts scoring to a subset (the paper scored 12 classes common to VKITTI, KITTI and CityScapes), pixels of
other true classes are left out and predictions of other classes count as errors. Settings:
`reports.depth_segmentation` in params.yaml. Sample panels (input / predicted depth / true depth / predicted
mask / true mask) go to MLflow and plots_out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import need
from s2r.evaluators.depth import depth_metrics, valid_mask
from s2r.evaluators.segmentation import confusion, mean_iou, metrics_from_confusion

# the headline numbers of evaluate.json, in the order `s2r report` prints them
REPORT_COLUMNS = ["abs_rel", "rmse", "a1", "miou", "miou_majority_class", "pixel_accuracy"]
REQUIRES = "predict"  # the capability of a method (its params block) this evaluator scores

IGNORE = 255  # mask value of unlabelled pixels (benchmark layout)


def subset_metrics(cm: np.ndarray, classes: list[str], keep: list[str], miou: str = "all_classes") -> dict[str, Any]:
    """mIoU / per-class IoU / pixel accuracy over the classes `keep` of a (K, K) confusion (rows = truth).

    Pixels whose truth is outside `keep` are left out; a prediction outside `keep` on a kept pixel is a false
    negative of its true class. With keep = classes this equals metrics_from_confusion; `miou` as there.
    """
    idx = [classes.index(c) for c in keep]
    cm = np.asarray(cm, np.float64)
    rows = cm[idx]  # truth in keep: (k, K)
    tp = rows[:, idx].diagonal()
    fn = rows.sum(1) - tp
    fp = rows[:, idx].sum(0) - tp  # predicted c on pixels whose truth is another kept class
    union = tp + fn + fp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {
        "miou": mean_iou(iou, miou),
        "pixel_accuracy": float(tp.sum() / max(rows.sum(), 1)),
        "per_class_iou": {c: (None if np.isnan(v) else float(v)) for c, v in zip(keep, iou)},
        "pixels": int(rows.sum()),
    }


def labelled_images(depth: np.ndarray, masks: np.ndarray, min_depth: float = 1e-3,
                    max_depth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per image of (N, H, W) depth / masks: (has a valid depth pixel, has a labelled mask pixel) boolean (N,)."""
    n = len(depth)
    has_d = valid_mask(depth, min_depth, max_depth).reshape(n, -1).any(1)
    has_m = (np.asarray(masks) != IGNORE).reshape(n, -1).any(1)
    return has_d, has_m


def colorize_depth(depth: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 with matplotlib's viridis (near = dark)."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    x = np.clip((np.asarray(depth, np.float64) - vmin) / max(vmax - vmin, 1e-9), 0, 1)
    return (cmap(x)[..., :3] * 255).astype(np.uint8)


def colorize_mask(mask: np.ndarray, k: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 with a fixed qualitative palette (ignore = black)."""
    import matplotlib

    pal = (np.asarray(matplotlib.colormaps["tab10"].colors)[: max(k, 1)] * 255).astype(np.uint8)
    m = np.asarray(mask, np.int64)
    out = np.zeros((*m.shape, 3), np.uint8)
    ok = (m >= 0) & (m < k)
    out[ok] = pal[m[ok] % len(pal)]
    return out


def panels(images: np.ndarray, pred: dict[str, np.ndarray], depth: np.ndarray, masks: np.ndarray,
           classes: list[str], title: str) -> Any:
    """A figure with one row per sample: input / predicted depth / true depth / predicted mask / true mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    valid = depth[depth > 0]
    vmin, vmax = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
    cols = ["input", "predicted depth", "true depth", "predicted mask", "true mask"]
    fig, axes = plt.subplots(n, 5, figsize=(7.5, 1.6 * n + 0.5), dpi=100, squeeze=False)
    for i in range(n):
        img = images[i]
        row = [img[..., 0] if img.shape[-1] == 1 else img, colorize_depth(pred["depth"][i], vmin, vmax),
               colorize_depth(depth[i], vmin, vmax), colorize_mask(pred["mask"][i], len(classes)),
               colorize_mask(masks[i], len(classes))]
        for j, (ax, im) in enumerate(zip(axes[i], row)):
            ax.imshow(im, cmap="gray" if im.ndim == 2 else None)
            ax.axis("off")
            if i == 0:
                ax.set_title(cols[j], fontsize=7)
    fig.suptitle(f"{title}  (depth {vmin:.2f}-{vmax:.2f} m, viridis)", fontsize=8)
    fig.tight_layout()
    return fig


def evaluate(method: Any, run: Any, plots_out: Path | None, params: Any) -> dict[str, Any]:
    """The evaluate stage for dense predictors (`predict` -> depth + mask) on the target domain's test split."""
    import matplotlib.pyplot as plt

    from s2r.data.benchmark import DataError
    from s2r.files import write_json

    if REQUIRES not in method.capabilities:
        raise DataError(f"method {method.name!r} has no 'predict' capability to evaluate depth/segmentation")
    s = need(params.reports.depth_segmentation, "reports.depth_segmentation", params.source)
    data = method.data
    spec = data.spec
    test = data.get(spec.target, "test")
    if test.depth is None or test.masks is None or not spec.seg_classes:
        raise DataError(f"{data.root}: target {spec.target!r} test split has no depth/masks/seg_classes to score")
    classes = list(spec.seg_classes)
    keep = list(s.classes) or classes
    unknown = [c for c in keep if c not in classes]
    if unknown:
        raise DataError(f"params.yaml: key 'reports.depth_segmentation.classes': {unknown} not in the benchmark's "
                        f"seg_classes {classes}")
    unknown = [c for c in s.depth_classes if c not in classes]
    if unknown:
        raise DataError(f"params.yaml: key 'reports.depth_segmentation.depth_classes': {unknown} not in the "
                        f"benchmark's seg_classes {classes}")
    pred = method.predict(test.images)
    truth_d, truth_m = np.asarray(test.depth), np.asarray(test.masks)
    if s.depth_classes:  # depth scored where it varies between images (e.g. the objects), other pixels invalid
        truth_d = np.where(np.isin(truth_m, [classes.index(c) for c in s.depth_classes]), truth_d, 0.0)
    # Images may carry only one of the labels (KITTI: sparse-LiDAR depth frames have an all-255 mask, the 200
    # semantic images all-0 depth): each metric uses the images that have its label, only their valid pixels.
    has_d, has_m = labelled_images(truth_d, truth_m, s.min_depth, s.max_depth)
    depth_keys = ("abs_rel", "sq_rel", "rmse", "log_rmse", "a1", "a2", "a3")
    if has_d.any():
        dm = depth_metrics(pred["depth"][has_d], truth_d[has_d], min_depth=s.min_depth, max_depth=s.max_depth,
                           median_scaling=s.median_scaling, average=s.depth_average)
    else:  # no valid depth anywhere in the split: depth metrics are absent (null), not an error
        dm = {k: None for k in depth_keys} | {"valid_pixels": 0}
    cm = confusion(truth_m[has_m], pred["mask"][has_m], len(classes), ignore_index=IGNORE)
    sm = (subset_metrics(cm, classes, keep, s.miou) if keep != classes
          else metrics_from_confusion(cm, classes, s.miou))
    # the reference a segmenter must beat: the test split's majority class predicted on every pixel
    majority = np.zeros_like(cm)
    majority[:, int(np.argmax(cm.sum(1)))] = cm.sum(1)
    sm_major = (subset_metrics(majority, classes, keep, s.miou) if keep != classes
                else metrics_from_confusion(majority, classes, s.miou))
    if not has_m.any():  # no labelled pixel: mIoU / accuracy are absent (null), not 0
        sm = {**sm, "miou": None, "pixel_accuracy": None}
        sm_major = {**sm_major, "miou": None}
    flat = {f"test_{k}": dm[k] for k in depth_keys} | {"test_miou": sm["miou"],
                                                       "test_pixel_accuracy": sm["pixel_accuracy"]}
    flat = {k: v for k, v in flat.items() if v is not None}
    flat |= {f"test_iou_{c}": v for c, v in sm["per_class_iou"].items() if v is not None}
    run.log_metrics(flat, step=0)
    idx = np.unique(np.linspace(0, len(test) - 1, min(s.panels, len(test))).round().astype(np.int64))
    fig = panels(test.images[idx], {k: v[idx] for k, v in pred.items()}, truth_d[idx], truth_m[idx], classes,
                 f"{method.name} on {spec.target}/test")
    if plots_out:
        fig.savefig(Path(plots_out) / "panels.png")
        write_json(Path(plots_out) / "per_class_iou.json", {"per_class_iou": sm["per_class_iou"]})
    run.log_figure(fig, "samples/panels.png")
    plt.close(fig)
    return {
        **{k: dm[k] for k in depth_keys}, "miou": sm["miou"], "pixel_accuracy": sm["pixel_accuracy"],
        "per_class_iou": sm["per_class_iou"], "miou_majority_class": sm_major["miou"],
        "depth_classes": list(s.depth_classes), "depth_valid_pixels": dm["valid_pixels"],
        "seg_pixels": sm["pixels"], "median_scaling": s.median_scaling, "classes": keep, "n": len(test),
        "depth_average": s.depth_average, "miou_convention": s.miou,
        "depth_images": int(has_d.sum()), "seg_images": int(has_m.sum()),
        "confusion_matrix": cm.tolist(),
        **({"trained_tasks": list(method.trained_tasks())} if hasattr(method, "trained_tasks") else {}),
    }
