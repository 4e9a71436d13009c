"""Paper 5's tables on our data: Table II (mIoU, vs target-trained, vs synthetic) and Table I (epoch time).

For every patch size in `reports.cut_tables.patch_sizes`: train CUT (`methods.cut` with that patch size), refine
the source domain, train the downstream segmenter on the refined images (`methods.segmenter_refined`). Baselines:
the segmenter on raw synthetic images and on target train images (the upper bound), and the Section IV-E mixes
(target + synthetic, target + refined at `mix_patch_size`). Every segmenter is scored by the target-TEST mIoU of
its last K epochs (median = the table's mIoU; IQR = the spread); "vs target" = median / target-trained median,
"vs synthetic" = relative change against the synthetic median. Table I: seconds per CUT epoch per patch size
on this machine (an epoch = `cut_steps_per_epoch` steps of `batch_size` patches; the paper's epoch is 10k images).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import need
from s2r.params import load_params
from s2r.tables import TablesRun

PAPER_HEIGHT = 480  # YCB-Video frames the paper's patch sizes refer to (640x480)


def _lastk(plots: Path, k: int) -> np.ndarray:
    """The last k per-epoch target-test mIoU values of a segmenter run (its train_history.csv)."""
    import pandas as pd

    df = pd.read_csv(plots / "train_history.csv")
    out: np.ndarray = df["test_miou"].to_numpy(np.float64)[-k:]
    return out


def cut_tables(data_dir: Path, out: Path, params_path: Path,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every cell; write table2/table1 markdown + CSV, metrics.json and the box/violin plot; log to MLflow.

    `overrides` ({"reports.cut_tables.lambda_nce": 2.0}, `s2r tables cut --set`) apply to every params load, e.g.
    one recipe params file serving several tables (paper 5's Table III per lambda_NCE).
    """
    import pandas as pd

    from s2r.evaluators.segmentation_lastk import plot_distributions

    cells = _Cells(data_dir, params_path, dict(overrides or {}))
    cfg = cells.cfg
    logged = {"reports": {"cut_tables": asdict(cfg)}, "data": str(data_dir)}
    with TablesRun("cut", out, cells.base, logged) as t:
        cells.segment(t, "synthetic", data_dir, "synthetic")
        refined = {p: cells.refine(t, p) for p in cfg.patch_sizes}  # + a segmenter on each refined benchmark
        cells.segment(t, "target", data_dir, "target")
        mix = refined.get(cfg.mix_patch_size) or refined[cfg.patch_sizes[0]]
        cells.segment(t, "target + synthetic", data_dir, "target+synthetic")
        cells.segment(t, "target + refined", mix, "target+refined")
        dists = cells.dists
        table2, table1 = table2_rows(dists), pd.DataFrame(cells.rows1)
        t.table(table2, "table2", f"Table II format: target-test mIoU (median of the last {cfg.last_k} epochs)")
        t.table(table1, "table1", "Table I format: CUT training epoch time per patch size")
        t.csv(pd.DataFrame({k: pd.Series(v) for k, v in dists.items()}), "miou_lastk.csv")
        t.figure(plot_distributions(dists, f"target-test mIoU over the last {cfg.last_k} epochs"), "miou_lastk.png")
        metrics = summary_metrics(dists)
        t.finish(metrics)
    return {"table2": table2, "table1": table1, "metrics": metrics}


class _Cells:
    """Paper 5's tables: one segmenter per training mode (last-K target-test mIoU), one CUT per patch size."""

    def __init__(self, data_dir: Path, params_path: Path, sets: dict[str, Any]) -> None:
        self.data_dir, self.params_path, self.sets = data_dir, params_path, sets
        self.base = load_params(params_path, sets)
        self.cfg = need(self.base.reports.cut_tables, "reports.cut_tables", self.base.source)
        self.size = (need(self.base.benchmarks.scenes, "benchmarks.scenes", self.base.source).image_size
                     if data_dir.name.startswith("scenes") else None)
        self.dists: dict[str, np.ndarray] = {}  # training mode -> last-K target-test mIoU
        self.rows1: list[dict[str, Any]] = []  # Table I

    def segment(self, t: TablesRun, label: str, data: Path, train_data: str) -> None:
        """Train the segmenter on `train_data` of `data`; keep its last-K target-test mIoU under `label`."""
        from s2r import stages

        c = self.cfg
        params = load_params(self.params_path, {
            **self.sets, "methods.segmenter_target.train_data": train_data,
            "methods.segmenter_target.epochs": c.seg_epochs, "methods.segmenter_target.steps_per_epoch":
            c.seg_steps_per_epoch, "methods.segmenter_target.last_k": c.last_k, "train.progress": False,
            "tracking.log_model": False})
        work = t.workdir()
        stages.train(stages.TrainRequest("segmenter_target", data, work / "model", ckpt_dir=work / "ckpt",
                                         plots_out=work / "plots", parent_run_id=t.run_id,
                                         run_name=f"table@cut[{label}]"), params)
        self.dists[label] = _lastk(work / "plots", c.last_k)

    def refine(self, t: TablesRun, p: int) -> Path:
        """CUT on p x p patches (a Table I row), the refined benchmark, a segmenter trained on it; its path."""
        from s2r import stages

        c, size = self.cfg, self.size
        cp = load_params(self.params_path, {
            **self.sets, "methods.cut.patch_size": p, "methods.cut.lambda_nce": c.lambda_nce,
            "methods.cut.epochs": c.cut_epochs, "methods.cut.steps_per_epoch": c.cut_steps_per_epoch,
            "train.progress": False, "tracking.log_model": False})
        work = t.workdir()
        summary = stages.train(stages.TrainRequest("cut", self.data_dir, work / "model", ckpt_dir=work / "ckpt",
                                                   parent_run_id=t.run_id, run_name=f"table@cut[CUT {p}px]"), cp)
        refined = work / "refined"
        stages.refine("cut", work / "model", self.data_dir, refined, None, cp)
        paper_px = f" (~{round(p * PAPER_HEIGHT / size)} px at 480)" if size else ""
        self.rows1.append({"patch size [px]": f"{p}x{p}{paper_px}", "trained on [px]": _trained_side(p, size),
                           "time [s]": round(summary["seconds"] / c.cut_epochs, 2),
                           "steps/epoch": c.cut_steps_per_epoch, "patches/step": cp.methods["cut"].batch_size})
        self.segment(t, f"CUT {p}px", refined, "refined")
        return refined


def summary_metrics(dists: dict[str, np.ndarray]) -> dict[str, Any]:
    """The headline numbers: synthetic / target / best refined median mIoU, and whether refining helped."""
    syn = float(np.median(dists["synthetic"]))
    best = max((k for k in dists if k.startswith("CUT")), key=lambda k: float(np.median(dists[k])))
    return {"synthetic_miou": syn, "target_miou": float(np.median(dists["target"])),
            "best_refined": best, "best_refined_miou": float(np.median(dists[best])),
            "refined_beats_synthetic": bool(float(np.median(dists[best])) > syn),
            "n_refined_beating_synthetic": int(sum(float(np.median(v)) > syn for k, v in dists.items()
                                                   if k.startswith("CUT")))}


def _trained_side(p: int, size: int | None) -> int:
    from s2r.methods.cut import round_to_4

    return size if size and p >= size else round_to_4(p)


def table2_rows(dists: dict[str, np.ndarray]) -> Any:
    """Table II: mIoU = median of the last-K test mIoU; vs target = ratio; vs synthetic = relative change."""
    import pandas as pd

    med = {k: float(np.median(v)) for k, v in dists.items()}
    real, syn = med.get("target"), med.get("synthetic")
    rows = []
    for k, v in dists.items():
        q1, q3 = np.percentile(v, [25, 75])
        rows.append({
            "Training mode": k, "mIoU": f"{med[k]:.3f}", "IQR": f"{q3 - q1:.3f}",
            "vs. target": f"{med[k] / real:.3f}" if real else "—",
            "vs. syn.": "—" if k == "synthetic" or not syn else f"{100 * (med[k] / syn - 1):+.1f}%",
        })
    return pd.DataFrame(rows)
