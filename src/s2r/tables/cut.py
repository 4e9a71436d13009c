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

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s2r.params import load_params
from s2r.tables import markdown as _markdown

PAPER_HEIGHT = 480  # YCB-Video frames the paper's patch sizes refer to (640x480)


def _lastk(plots: Path, k: int) -> np.ndarray:
    """The last k per-epoch target-test mIoU values of a segmenter run (its train_history.csv)."""
    import pandas as pd

    df = pd.read_csv(plots / "train_history.csv")
    return df["test_miou"].to_numpy(np.float64)[-k:]


def cut_tables(data_dir: Path, out: Path, params_path: Path,
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every cell; write table2/table1 markdown + CSV, metrics.json and the box/violin plot; log to MLflow.

    `overrides` ({"reports.cut_tables.lambda_nce": 2.0}, `s2r tables cut --set`) apply to every params load, e.g.
    one recipe params file serving several tables (paper 5's Table III per lambda_NCE).
    """
    sets = dict(overrides or {})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from s2r import stages
    from s2r.evaluators.segmentation_lastk import plot_distributions
    from s2r.files import write_json
    from s2r.methods import registry
    from s2r.tracking import TrackedRun

    base = load_params(params_path, sets)
    cfg = base.reports.cut_tables
    size = base.benchmarks.scenes.image_size if data_dir.name.startswith("scenes") else None
    out.mkdir(parents=True, exist_ok=True)

    def seg_params(train_data: str) -> Any:
        return load_params(params_path, {**sets,
            "methods.segmenter_target.train_data": train_data, "methods.segmenter_target.epochs": cfg.seg_epochs,
            "methods.segmenter_target.steps_per_epoch": cfg.seg_steps_per_epoch,
            "methods.segmenter_target.last_k": cfg.last_k, "train.progress": False, "tracking.log_model": False})

    dists: dict[str, np.ndarray] = {}
    rows1: list[dict[str, Any]] = []
    logged = {"reports": {"cut_tables": asdict(cfg)}, "data": str(data_dir)}
    with TrackedRun("tables@cut", experiment=registry.experiment(base.tracking.experiment, "cut"),
                    section="test", params=logged,
                    tags={"stage": "tables", "method": "cut"}) as parent, tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)

        def segment(label: str, data: Path, train_data: str) -> None:
            work = tmp / f"seg-{len(dists)}"
            stages.train("segmenter_target", data, work / "model", seg_params(train_data), ckpt_dir=work / "ckpt",
                         plots_out=work / "plots", parent_run_id=parent.run_id, run_name=f"table@cut[{label}]")
            dists[label] = _lastk(work / "plots", cfg.last_k)

        segment("synthetic", data_dir, "synthetic")
        refined: dict[int, Path] = {}
        for p in cfg.patch_sizes:
            cp = load_params(params_path, {**sets, "methods.cut.patch_size": p,
                                           "methods.cut.lambda_nce": cfg.lambda_nce,
                                           "methods.cut.epochs": cfg.cut_epochs,
                                           "methods.cut.steps_per_epoch": cfg.cut_steps_per_epoch,
                                           "train.progress": False, "tracking.log_model": False})
            work = tmp / f"cut-{p}"
            summary = stages.train("cut", data_dir, work / "model", cp, ckpt_dir=work / "ckpt",
                                   parent_run_id=parent.run_id, run_name=f"table@cut[CUT {p}px]")
            refined[p] = work / "refined"
            stages.refine("cut", work / "model", data_dir, refined[p], None, cp)
            paper_px = f" (~{round(p * PAPER_HEIGHT / size)} px at 480)" if size else ""
            rows1.append({"patch size [px]": f"{p}x{p}{paper_px}", "trained on [px]": _trained_side(p, size),
                          "time [s]": round(summary["seconds"] / cfg.cut_epochs, 2),
                          "steps/epoch": cfg.cut_steps_per_epoch, "patches/step": cp.methods["cut"].batch_size})
            segment(f"CUT {p}px", refined[p], "refined")
        segment("target", data_dir, "target")
        mix = refined.get(cfg.mix_patch_size) or refined[cfg.patch_sizes[0]]
        segment("target + synthetic", data_dir, "target+synthetic")
        segment("target + refined", mix, "target+refined")

        table2 = table2_rows(dists)
        table1 = pd.DataFrame(rows1)
        (out / "table2.md").write_text(_markdown(table2, "Table II format: target-test mIoU (median of the last "
                                                         f"{cfg.last_k} epochs)"))
        (out / "table1.md").write_text(_markdown(table1, "Table I format: CUT training epoch time per patch size"))
        table2.to_csv(out / "table2.csv", index=False)
        table1.to_csv(out / "table1.csv", index=False)
        pd.DataFrame({k: pd.Series(v) for k, v in dists.items()}).to_csv(out / "miou_lastk.csv", index=False)
        fig = plot_distributions(dists, f"target-test mIoU over the last {cfg.last_k} epochs")
        fig.savefig(out / "miou_lastk.png", bbox_inches="tight")
        parent.log_figure(fig, "tables/miou_lastk.png")
        plt.close(fig)
        syn = float(np.median(dists["synthetic"]))
        best = max((k for k in dists if k.startswith("CUT")), key=lambda k: float(np.median(dists[k])))
        metrics = {"synthetic_miou": syn, "target_miou": float(np.median(dists["target"])),
                   "best_refined": best, "best_refined_miou": float(np.median(dists[best])),
                   "refined_beats_synthetic": bool(float(np.median(dists[best])) > syn),
                   "n_refined_beating_synthetic": int(sum(float(np.median(v)) > syn for k, v in dists.items()
                                                          if k.startswith("CUT")))}
        write_json(out / "metrics.json", metrics)
        parent.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
        for name in ("table2.md", "table1.md", "table2.csv", "table1.csv", "miou_lastk.csv", "metrics.json"):
            parent.log_artifact(out / name, "tables")
    return {"table2": table2, "table1": table1, "metrics": metrics}


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
