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

from s2r.config import DepthSegmentationParams, Params, need
from s2r.evaluators.base import Evaluator, register
from s2r.evaluators.depth import depth_metrics, valid_mask
from s2r.evaluators.segmentation import confusion, mean_iou, metrics_from_confusion
from s2r.files import JsonDict
from s2r.methods.base import Method
from s2r.tracking import TrackedRun

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
    has_d = np.asarray(valid_mask(depth, min_depth, max_depth).reshape(n, -1).any(1))
    has_m = np.asarray((np.asarray(masks) != IGNORE).reshape(n, -1).any(1))
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

    tab10: Any = matplotlib.colormaps["tab10"]  # a ListedColormap (matplotlib types it as any Colormap)
    pal = (np.asarray(tab10.colors)[: max(k, 1)] * 255).astype(np.uint8)
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


DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "log_rmse", "a1", "a2", "a3")


class DepthSegmentation(Evaluator[Method[object]]):
    """The evaluate stage for dense predictors (`predict` -> depth + mask) on the target domain's test split."""

    capability = "predict"
    report_columns = ('abs_rel', 'rmse', 'a1', 'miou', 'miou_majority_class', 'pixel_accuracy')

    def evaluate(self, method: Method[object], run: TrackedRun, plots_out: Path | None, params: Params) -> JsonDict:
        from s2r.data.benchmark import DataError

        s = need(params.reports.depth_segmentation, "reports.depth_segmentation", params.source)
        spec = method.data.spec
        test = method.data.get(spec.target, "test")
        classes, keep = _classes(method, s)
        pred = method.predict(test.images)
        if not isinstance(pred, dict):
            raise DataError(f"method {method.name!r} predicts one array, not the depth and mask maps to score")
        truth_d, truth_m = np.asarray(test.depth), np.asarray(test.masks)
        if s.depth_classes:  # depth scored where it varies between images (e.g. the objects), other pixels invalid
            truth_d = np.where(np.isin(truth_m, [classes.index(c) for c in s.depth_classes]), truth_d, 0.0)
        # Images may carry only one of the labels (KITTI: sparse-LiDAR depth frames have an all-255 mask, the 200
        # semantic images all-0 depth): each metric uses the images that have its label, only their valid pixels.
        has_d, has_m = labelled_images(truth_d, truth_m, s.min_depth, s.max_depth)
        if has_d.any():
            dm = depth_metrics(pred["depth"][has_d], truth_d[has_d], min_depth=s.min_depth, max_depth=s.max_depth,
                               median_scaling=s.median_scaling, average=s.depth_average)
        else:  # no valid depth anywhere in the split: depth metrics are absent (null), not an error
            dm = {k: None for k in DEPTH_KEYS} | {"valid_pixels": 0}
        cm = confusion(truth_m[has_m], pred["mask"][has_m], len(classes), ignore_index=IGNORE)
        sm, sm_major = _segmentation(cm, classes, keep, s.miou, bool(has_m.any()))
        _log(run, dm, sm)
        _plot(method, pred, truth_d, truth_m, classes, sm, run, plots_out, s.panels)
        tasks = method.trained_tasks()
        return {
            **{k: dm[k] for k in DEPTH_KEYS}, "miou": sm["miou"], "pixel_accuracy": sm["pixel_accuracy"],
            "per_class_iou": sm["per_class_iou"], "miou_majority_class": sm_major["miou"],
            "depth_classes": list(s.depth_classes), "depth_valid_pixels": dm["valid_pixels"],
            "seg_pixels": sm["pixels"], "median_scaling": s.median_scaling, "classes": keep, "n": len(test),
            "depth_average": s.depth_average, "miou_convention": s.miou,
            "depth_images": int(has_d.sum()), "seg_images": int(has_m.sum()),
            "confusion_matrix": cm.tolist(),
            **({"trained_tasks": tasks} if tasks is not None else {}),
        }


def _classes(method: Method[object], s: DepthSegmentationParams) -> tuple[list[str], list[str]]:
    """(the benchmark's seg_classes, the ones scored); errors name the params key or the benchmark at fault."""
    from s2r.data.benchmark import DataError

    data, spec = method.data, method.data.spec
    test = data.get(spec.target, "test")
    if test.depth is None or test.masks is None or not spec.seg_classes:
        raise DataError(f"{data.root}: target {spec.target!r} test split has no depth/masks/seg_classes to score")
    classes = list(spec.seg_classes)
    keep = list(s.classes) or classes
    for key, names in (("classes", keep), ("depth_classes", list(s.depth_classes))):
        unknown = [c for c in names if c not in classes]
        if unknown:
            raise DataError(f"params.yaml: key 'reports.depth_segmentation.{key}': {unknown} not in the "
                            f"benchmark's seg_classes {classes}")
    return classes, keep


def _segmentation(cm: np.ndarray, classes: list[str], keep: list[str], miou: str, labelled: bool
                  ) -> tuple[JsonDict, JsonDict]:
    """Metrics of the confusion matrix and of the reference a segmenter must beat: the test split's majority
    class predicted on every pixel (mIoU / accuracy absent (null), not 0, without a labelled pixel)."""
    sm = subset_metrics(cm, classes, keep, miou) if keep != classes else metrics_from_confusion(cm, classes, miou)
    majority = np.zeros_like(cm)
    majority[:, int(np.argmax(cm.sum(1)))] = cm.sum(1)
    sm_major = (subset_metrics(majority, classes, keep, miou) if keep != classes
                else metrics_from_confusion(majority, classes, miou))
    if not labelled:
        sm = {**sm, "miou": None, "pixel_accuracy": None}
        sm_major = {**sm_major, "miou": None}
    return sm, sm_major


def _log(run: TrackedRun, dm: JsonDict, sm: JsonDict) -> None:
    """The test metrics that exist (not null) and the per-class IoU."""
    flat = {f"test_{k}": dm[k] for k in DEPTH_KEYS} | {"test_miou": sm["miou"],
                                                       "test_pixel_accuracy": sm["pixel_accuracy"]}
    flat = {k: v for k, v in flat.items() if v is not None}
    flat |= {f"test_iou_{c}": v for c, v in sm["per_class_iou"].items() if v is not None}
    run.log_metrics(flat, step=0)


def _plot(method: Method[object], pred: dict[str, np.ndarray], truth_d: np.ndarray, truth_m: np.ndarray,
          classes: list[str], sm: JsonDict, run: TrackedRun, plots_out: Path | None, n_panels: int) -> None:
    """Panels of evenly spread test images (input, predicted / true depth and mask), per-class IoU JSON."""
    import matplotlib.pyplot as plt

    from s2r.files import write_json

    spec = method.data.spec
    test = method.data.get(spec.target, "test")
    idx = np.unique(np.linspace(0, len(test) - 1, min(n_panels, len(test))).round().astype(np.int64))
    fig = panels(test.images[idx], {k: v[idx] for k, v in pred.items()}, truth_d[idx], truth_m[idx], classes,
                 f"{method.name} on {spec.target}/test")
    if plots_out:
        fig.savefig(Path(plots_out) / "panels.png")
        write_json(Path(plots_out) / "per_class_iou.json", {"per_class_iou": sm["per_class_iou"]})
    run.log_figure(fig, "samples/panels.png")
    plt.close(fig)


EVALUATOR = register(DepthSegmentation())
