"""Paper 2's Table 1 on our data: depth and segmentation on the target test split, our twin VAE vs the bounds.

Rows: the sim-only lower bound (same encoder + heads, no twin VAE, sim labels), ours (twin VAE + heads, sim
labels only) and the target-supervised upper bound (the role of the supervised networks of the paper's
Table 1). Columns as the paper: AbsRel, SqRel, RMSE, logRMSE (+ a1..a3) and mIoU, pixel accuracy. The
"gap closed" row says which share of the lower-to-upper gap our method recovers per metric:
(lower - ours) / (lower - upper) for lower-is-better metrics, (ours - lower) / (upper - lower) otherwise;
1 = as good as target supervision, 0 = no better than sim only, < 0 = worse than sim only; "n/a" when the
upper bound is not better than the lower bound (no gap to close on that metric), and "n/a" for a whole task
(depth or segmentation) unless BOTH bounds were trained on it: each evaluate JSON names the tasks its model's
heads were trained on (`trained_tasks`, from w_depth / w_seg > 0); a bound whose head never trained (the
recipe's upper bound has `w_seg: 0`, KITTI having no segmentation training labels) or a JSON without the key
gives "n/a (bound not trained on <task>)", and that bound's row is marked "(head not trained)".
Inputs: the evaluate JSONs of `s2r evaluate` (s2r.evaluators.depth_segmentation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from s2r.tables import markdown

DEPTH = (("abs_rel", "Abs. Rel.", False), ("sq_rel", "Sq. Rel.", False), ("rmse", "RMSE", False),
         ("log_rmse", "log RMSE", False), ("a1", "a1", True), ("a2", "a2", True), ("a3", "a3", True))
SEG = (("miou", "mIoU", True), ("pixel_accuracy", "Accuracy", True))
ROWS = (("lower", "Sim only (lower bound)"), ("ours", "Ours (twin VAE, sim labels only)"),
        ("upper", "Target-supervised (upper bound)"))


def gap_closed(lower: float | None, ours: float | None, upper: float | None, higher_better: bool) -> float | None:
    """Share of the lower->upper gap recovered by ours; None when there is no gap (upper not better than lower)."""
    if lower is None or ours is None or upper is None:  # a metric without labels in the test split
        return None
    gap = (upper - lower) if higher_better else (lower - upper)
    if gap <= 1e-12:
        return None
    return ((ours - lower) if higher_better else (lower - ours)) / gap


CONVENTIONS = {"images": "depth metrics per image, then the mean (monodepth2 / KITTI)",
               "pixels": "depth metrics pooled over all valid pixels (not the papers' convention)",
               "all_classes": "mIoU = mean over all scored classes, absent ones 0 (CSAIL eval)",
               "present_classes": "mIoU = mean over classes present in truth or prediction (not paper 2's)"}


def conventions(results: dict[str, dict[str, Any]]) -> str:
    """One line naming the depth averaging and mIoU conventions of the rows (an error if the rows differ)."""
    seen = {(r.get("depth_average", "pixels"), r.get("miou_convention", "present_classes")) for r in results.values()}
    if len(seen) > 1:
        raise ValueError(f"twinvae table rows were scored with different conventions {sorted(seen)}; re-evaluate "
                         "them with the same reports.depth_segmentation.depth_average / miou")
    depth, miou = seen.pop()
    return f"Conventions: {CONVENTIONS.get(depth, depth)}; {CONVENTIONS.get(miou, miou)}."


def trained_on(result: dict[str, Any], task: str) -> bool:
    """Whether the evaluated model's head for `task` ("depth" / "segmentation") was trained (evaluate JSON
    `trained_tasks`); a JSON that does not say counts as not trained (no gap is claimed on an unknown bound)."""
    return task in result.get("trained_tasks", [])


def build(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Depth and segmentation tables (pandas) + gap-closed metrics from {lower, ours, upper} evaluate results."""
    import pandas as pd

    missing = [k for k, _ in ROWS if k not in results]
    if missing:
        raise FileNotFoundError(f"twinvae table needs evaluate results for {missing}")
    tables: dict[str, Any] = {}
    gaps: dict[str, float | None] = {}
    for part, cols in (("depth", DEPTH), ("segmentation", SEG)):
        rows = []
        untrained = [key for key in ("lower", "upper") if not trained_on(results[key], part)]
        for key, label in ROWS:
            r = results[key]
            mark = " (head not trained)" if key in untrained or (key == "ours" and not trained_on(r, part)) else ""
            row: dict[str, Any] = {"Network": label + mark, "method": r.get("method", key)}
            for m, title, _ in cols:
                v = r[m]
                row[title] = "n/a" if v is None else f"{100 * v:.1f}%" if m == "pixel_accuracy" else f"{v:.4f}"
            rows.append(row)
        gap_row: dict[str, Any] = {"Network": "Gap closed by ours", "method": ""}
        for m, title, higher in cols:
            if untrained:
                gaps[m] = None
                gap_row[title] = f"n/a (bound not trained on {part})"
                continue
            g = gap_closed(results["lower"][m], results["ours"][m], results["upper"][m], higher)
            gaps[m] = g
            gap_row[title] = "n/a (no gap)" if g is None else f"{100 * g:.0f}%"
        rows.append(gap_row)
        tables[part] = pd.DataFrame(rows)
    return {"tables": tables, "gap_closed": gaps}


def twinvae_table(ours: Path, lower: Path, upper: Path, out: Path, experiment: str = "s2r") -> dict[str, Any]:
    """Read three evaluate JSONs, write table1.md / CSV / metrics.json, log them on an MLflow run tables@twinvae."""
    from s2r.files import write_json
    from s2r.tracking import TrackedRun

    paths = {"ours": Path(ours), "lower": Path(lower), "upper": Path(upper)}
    results = {}
    for k, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no evaluate results; run `s2r evaluate` first")
        results[k] = json.loads(p.read_text())
    res = build(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    domain = results["ours"].get("domain", "?")
    text = ("## Table 1 format (paper 2): target domain "
            f"`{domain}` test split, {results['ours'].get('n', '?')} images"
            + (f" ({results['ours']['depth_images']} with depth, {results['ours']['seg_images']} with masks)"
               if "depth_images" in results["ours"] else "") + "\n\n"
            + conventions(results) + "\n\n"
            + markdown(res["tables"]["depth"], "Depth (lower is better, a1..a3 higher is better)") + "\n"
            + markdown(res["tables"]["segmentation"], "Semantic segmentation (higher is better)"))
    (out / "table1.md").write_text(text)
    res["tables"]["depth"].to_csv(out / "table1_depth.csv", index=False)
    res["tables"]["segmentation"].to_csv(out / "table1_segmentation.csv", index=False)
    metrics = {f"{k}.{m}": results[k][m] for k, _ in ROWS for m, _, _ in (*DEPTH, *SEG)}
    metrics |= {f"gap_closed.{m}": g for m, g in res["gap_closed"].items()}
    write_json(out / "metrics.json", metrics)
    with TrackedRun("tables@twinvae", experiment=experiment, section="test",
                    params={k: str(v) for k, v in paths.items()},
                    tags={"stage": "tables", "method": "twinvae"}) as run:
        run.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=0)
        for name in ("table1.md", "table1_depth.csv", "table1_segmentation.csv", "metrics.json"):
            run.log_artifact(out / name, "tables")
    return {"text": text, "metrics": metrics, **res}
