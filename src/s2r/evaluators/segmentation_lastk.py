"""Downstream segmentation scored as the paper does (paper `cut-patch-refinement.txt`, Section IV-A and IV-F).

- The score is the distribution of the target-TEST mIoU over the last K training epochs (paper: 50), recorded
  by the segmenter's per-epoch `validate()`; summarised by median and spread (IQR, std, min/max) and drawn as
  box and violin plots; per-class IoU of the final model and the per-class medians over the last K epochs.
- Analysis (Section IV-F): adaptive-average-pooled features of one segmenter layer (`tsne_layer`) for
  synthetic, refined synthetic and target test images (the same scenes in every domain), with the classes in
  `tsne_mask_classes` zeroed as the paper masks out backgrounds, embedded with t-SNE; one line joins one
  synthetic/refined/target triple. Pairing: a refined image is its synthetic image translated (same id); a
  target image pairs with them only where the benchmark has scene pairs (the same `scene_id` in both domains,
  e.g. the embedded `scenes` benchmark): then the sets are the first n shared scenes and the red line joins a
  true triple. Benchmarks without such pairs (YCB-Video, BOP: real frames unrelated to the renders) get
  unpaired sets (the first n images of each domain), no synthetic-target line, and the plot title and the
  `tsne_paired` metric (0) say so. Also the distance of the synthetic and refined feature means to the
  target mean (feature-space alignment, a number to go with the picture). The paper embeds features of a
  RefineNet trained on real images; here it is the evaluated segmenter (train one with `train_data: target`
  for the paper's setting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params
from s2r.evaluators.base import Evaluator, register
from s2r.evaluators.segmentation import segmentation_metrics
from s2r.files import JsonDict
from s2r.methods.segmenter import Method as SegmenterMethod
from s2r.tracking import TrackedRun


class SegmentationLastK(Evaluator[SegmenterMethod]):
    """Final-model test metrics, last-K distribution (box/violin), per-class IoU and the t-SNE analysis."""

    capability = "predict"
    report_columns = ('test_miou_lastk_median', 'test_miou_lastk_iqr', 'test_pixel_accuracy')

    def evaluate(self, method: SegmenterMethod, run: TrackedRun, plots_out: Path | None, params: Params) -> JsonDict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd

        from s2r.methods.segmenter import MIOU, lastk_summary

        cfg = method.cfg
        test = method.test
        final = segmentation_metrics(np.asarray(test.masks), method.predict(np.asarray(test.images)), method.classes,
                                     miou=MIOU)  # the segmenter's per-epoch convention (paper 5: classes present)
        done = int(method.epochs_done)
        hist = method.miou_history[:done].cpu().numpy()  # buffers live on the GPU: copy to host first
        per_class = method.class_history[:done].cpu().numpy()
        k = cfg.last_k
        result: dict[str, Any] = {
            "train_data": cfg.train_data, "test_miou": final["miou"], "test_pixel_accuracy": final["pixel_accuracy"],
            "per_class_iou": final["per_class_iou"], "last_k": k, "epochs": done,
            **lastk_summary(hist[:, 1], k, "test_miou"), **lastk_summary(hist[:, 0], k, "val_miou"),
            "per_class_iou_lastk_median": {c: _nanmedian(per_class[-k:, i]) for i, c in enumerate(method.classes)},
            "test_miou_lastk": [float(v) for v in hist[-k:, 1]],
        }
        out = Path(plots_out) if plots_out else None
        df = pd.DataFrame({"epoch": np.arange(1, done + 1), "val_miou": hist[:, 0], "test_miou": hist[:, 1]})
        if out:
            df.to_csv(out / "miou_history.csv", index=False)
        figs = {"plots/miou_lastk.png": plot_distributions({cfg.train_data: hist[-k:, 1]},
                                                           f"target-test mIoU, last {k} epochs"),
                "plots/per_class_iou.png": _plot_per_class(final["per_class_iou"],
                                                           result["per_class_iou_lastk_median"])}
        tsne = tsne_analysis(method)
        if tsne is not None:
            fig, stats = tsne
            figs["plots/tsne.png"] = fig
            result |= stats
        for name, fig in figs.items():
            if out:
                fig.savefig(out / Path(name).name, bbox_inches="tight")
            run.log_figure(fig, name)
            plt.close(fig)
        run.log_metrics({k2: float(v) for k2, v in result.items() if isinstance(v, (int, float))
                         and np.isfinite(v)}, step=0)
        return result


def _nanmedian(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def plot_distributions(groups: dict[str, np.ndarray], title: str) -> Any:
    """Box plot over violins of per-epoch mIoU values, one column per training setting (the paper's Fig. 5)."""
    import matplotlib.pyplot as plt

    names = list(groups)
    data = [np.asarray(groups[n], np.float64)[np.isfinite(groups[n])] for n in names]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.3 * len(names)), 3.2), dpi=110)
    pos = np.arange(1, len(names) + 1)
    usable = [i for i, d in enumerate(data) if len(d) > 1 and np.ptp(d) > 0]
    if usable:
        ax.violinplot([data[i] for i in usable], positions=pos[usable], showextrema=False)
    ax.boxplot([d if len(d) else [np.nan] for d in data], positions=pos, widths=0.25)
    ax.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mIoU")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _plot_per_class(final: dict[str, float | None], median: dict[str, float | None]) -> Any:
    import matplotlib.pyplot as plt

    names = list(final)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3), dpi=110)
    ax.bar(x - 0.2, [final[n] or 0.0 for n in names], 0.4, label="final model")
    ax.bar(x + 0.2, [median[n] or 0.0 for n in names], 0.4, label="median, last K epochs")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test IoU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def tsne_rows(parts: dict[str, Any], n: int) -> tuple[dict[str, np.ndarray], bool]:
    """Row indices per domain for the t-SNE sets and whether the target rows pair with the synthetic ones.

    Refined rows are their synthetic images' rows (matched by id). The target pairs by `scene_id` where both
    domains share scenes (>= 0): the first n shared scenes, one image each; otherwise the first n of each."""
    syn, tgt = parts.get("synthetic"), parts.get("target")
    if syn is not None and tgt is not None:
        s_ids, t_ids = np.asarray(syn.scene_ids), np.asarray(tgt.scene_ids)
        shared = np.intersect1d(s_ids[s_ids >= 0], t_ids[t_ids >= 0])[:n]
        if len(shared):
            rows = {"synthetic": np.array([np.flatnonzero(s_ids == sc)[0] for sc in shared]),
                    "target": np.array([np.flatnonzero(t_ids == sc)[0] for sc in shared])}
            if "refined" in parts:
                rows["refined"] = _same_ids(parts["refined"], syn, rows["synthetic"])
            return rows, True
    m = min(n, *(len(p.ids) for p in parts.values()))
    rows = {k: np.arange(m) for k in parts}
    if syn is not None and "refined" in parts:
        rows["refined"] = _same_ids(parts["refined"], syn, rows["synthetic"])
    return rows, False


def _same_ids(refined: Any, syn: Any, syn_rows: np.ndarray) -> np.ndarray:
    """Rows of `refined` holding the translations of syn's rows `syn_rows` (same sample id; else same row)."""
    pos = {str(i): r for r, i in enumerate(np.asarray(refined.ids))}
    ids = np.asarray(syn.ids)[syn_rows]
    if all(str(i) in pos for i in ids):
        return np.array([pos[str(i)] for i in ids])
    return syn_rows


def tsne_analysis(method: Any, n: int = 100) -> tuple[Any, dict[str, float]] | None:
    """Section IV-F: t-SNE of pooled segmenter features for synthetic / refined / target test triples."""
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    data, cfg = method.data, method.cfg
    domains = {"synthetic": method.synthetic_domain, "refined": method.refined_domain, "target": method.target_domain}
    present = {k: d for k, d in domains.items() if data.has(d, "test")}
    if len(present) < 2:
        return None
    parts = {k: data.get(d, "test") for k, d in present.items()}
    rows, paired = tsne_rows(parts, n)
    m = len(next(iter(rows.values())))
    drop = [method.classes.index(c) for c in cfg.tsne_mask_classes if c in method.classes]
    feats = {}
    for k, p in parts.items():
        idx = rows[k]
        imgs = np.array(p.images[idx])
        if drop and p.masks is not None:
            imgs[np.isin(np.asarray(p.masks[idx]), drop)] = 0  # mask out backgrounds (paper: Stillleben masks)
        feats[k] = method.features(imgs, cfg.tsne_layer)
    allf = np.concatenate(list(feats.values()))
    emb = TSNE(n_components=2, perplexity=float(min(30, max(2, len(allf) // 4))), random_state=0,
               init="pca").fit_transform(allf)
    fig, ax = plt.subplots(figsize=(4.5, 4.2), dpi=110)
    colours = {"synthetic": "tab:cyan", "refined": "tab:orange", "target": "tab:blue"}
    pts = {}
    for i, k in enumerate(feats):
        pts[k] = emb[i * m : (i + 1) * m]
        ax.scatter(pts[k][:, 0], pts[k][:, 1], s=8, c=colours[k], label=f"{k} ({present[k]})")
    line = [k for k in ("synthetic", "refined", "target") if k in pts and (k != "target" or paired)]
    if len(line) >= 2:  # one corresponding triple (the paper's red line); target only where scenes pair
        tri = np.stack([pts[k][0] for k in line])
        ax.plot(tri[:, 0], tri[:, 1], c="red", lw=1)
    ax.legend(fontsize=7)
    note = "paired by scene" if paired else "target UNPAIRED (no shared scenes)"
    ax.set_title(f"t-SNE of pooled '{cfg.tsne_layer}' features, {note}", fontsize=8)
    fig.tight_layout()
    stats: dict[str, float] = {"tsne_paired": float(paired), "tsne_images": float(m)}
    if "target" in feats:
        mu = feats["target"].mean(0)
        scale = float(np.linalg.norm(feats["target"].std(0))) or 1.0
        for k in ("synthetic", "refined"):
            if k in feats:
                stats[f"feature_gap_{k}"] = float(np.linalg.norm(feats[k].mean(0) - mu)) / scale
    return fig, stats


EVALUATOR = register(SegmentationLastK())
