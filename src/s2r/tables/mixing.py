"""Paper 4's comparison tables on our data: Table 3 (synthetic / refined / real mixes), Table 2 (ratio x aug) and
Fig. 7 (the three MrGAN stage-2 mappings, Fig. 5B: RR-RS, R-RS, RR-S, each trained on its refined synthetic
images only and tested on its target: refined real for RR-RS / RR-S, original real for R-RS).

Table 3 needs the CycleGAN- and MrGAN-refined benchmarks; without them (the CIFAR-DA9 run of Table 2) only Table 2
is computed. "Real only" rows train with the paper's real-only lr schedule (`methods.mixing.real_only_lr_milestones`,
epochs 89 / 139 of 500) because their real_fraction is 1.

Every cell is the real-test accuracy of the mixed-minibatch classifier, mean +- std over seeds. For settings
that mix real with (refined) synthetic images the mixing ratio is cross-validated per seed on the real
validation split, as the paper did ("we cross-validate the mixing ratio", Section 4.3). The refined datasets
come from one CycleGAN / MrGAN training each; the seeds vary the classifier (initialisation, batches).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params, need
from s2r.params import load_params
from s2r.tables import TablesRun
from s2r.tables import fmt_percent as _fmt


def train_and_test(method: str, data_dir: Path, params: Params, tmp: Path, run_name: str,
                   parent_run_id: str | None = None) -> dict[str, float]:
    """Train the classifier once (a tracked run) and score it on the target test split."""
    from s2r import stages
    from s2r.evaluators.classification import classification_metrics

    summary = stages.train(stages.TrainRequest(method, data_dir, tmp / "model", ckpt_dir=tmp / "ckpt",
                                               run_name=run_name, parent_run_id=parent_run_id), params)
    trained, _ = stages.load_trained(tmp / "model", data_dir, params)
    test = trained.data.get(trained.data.spec.target, "test")
    probs = trained.predict(test.images)
    assert not isinstance(probs, dict)  # the mixing classifier predicts class probabilities (N, K)
    m = classification_metrics(test.labels, probs.argmax(1), trained.data.spec.classes)
    return {"val_accuracy": float(summary["val_accuracy"]), "test_accuracy": float(m["accuracy"]),
            "train_seconds": float(summary["seconds"]), "tracking_share": float(summary["tracking_share"])}


TABLE3 = ["Synthetic only", "Refined by MrGAN", "Refined by CycleGAN", "Real + Synthetic", "Real + Refined by MrGAN",
          "Real + Refined by CycleGAN", "Real only"]


def table_cells(ratios: list[float], table3: bool, stage2: list[str]) -> list[tuple[str, str, list[float], bool]]:
    """(setting, dataset key, candidate real fractions, augment) of every cell: Table 3 (if asked), Table 2, Fig. 7."""
    cells: list[tuple[str, str, list[float], bool]] = []
    if table3:
        cells += [
            ("Synthetic only", "synthetic", [0.0], False),
            ("Refined by MrGAN", "mrgan", [0.0], False),
            ("Refined by CycleGAN", "cyclegan", [0.0], False),
            ("Real + Synthetic", "synthetic", ratios, False),
            ("Real + Refined by MrGAN", "mrgan", ratios, False),
            ("Real + Refined by CycleGAN", "cyclegan", ratios, False),
            ("Real only", "synthetic", [1.0], False),
        ]
    cells += [("Real + Synthetic", "synthetic", ratios, False), ("Real only", "synthetic", [1.0], False),
              ("Real + Synthetic", "synthetic", ratios, True), ("Real only", "synthetic", [1.0], True)]
    cells += [(f"Stage 2 {k}", k, [0.0], False) for k in stage2]  # Fig. 7: refined synthetic only
    out, seen = [], set()
    for c in cells:  # Table 3 and Table 2 share their no-augmentation cells
        key = (c[0], c[1], tuple(c[2]), c[3])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def mixing_tables(datasets: dict[str, Path], out: Path, params_path: Path,
                  stage2: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run every cell of Tables 3 and 2 (and Fig. 7); write markdown/CSV/JSON + a plot, log on a `tables@mixing` run.

    `datasets`: `synthetic` (required), `cyclegan` and `mrgan` (both, for Table 3). `stage2`: label -> benchmark
    refined by one MrGAN stage-2 mapping (Fig. 7), e.g. {"RR-RS": ..., "R-RS": ..., "RR-S": ...}.
    """
    base = load_params(params_path)
    cfg = need(base.reports.mixing_tables, "reports.mixing_tables", base.source)
    stage2 = dict(stage2 or {})
    table3_on = _check_datasets(datasets, stage2)
    datasets = {**datasets, **stage2}
    logged = {"reports": {"mixing_tables": asdict(cfg)}, "datasets": {k: str(v) for k, v in datasets.items()}}
    with TablesRun("mixing", out, base, logged) as t:
        runs, n_trained = _train_cells(t, datasets, table_cells(list(cfg.ratios), table3_on, list(stage2)),
                                       params_path)
        t.csv(runs, "runs.csv")
        summary: dict[str, float] = {}
        result: dict[str, Any] = {}
        if table3_on:
            result["table3"] = table3 = _table(runs[~runs["augment"]], TABLE3)
            t.table(table3, "table3", "Table 3 format: real-test accuracy, no 2D augmentation")
            summary |= {f"table3.{r['setting']}": r["mean"] for r in table3.to_dict("records")}
        if stage2:
            result["fig7"] = fig7 = _table(runs, [f"Stage 2 {k}" for k in stage2])
            t.table(fig7, "fig7", "Fig. 7 format: real-test accuracy of each MrGAN stage-2 mapping (refined "
                                  "synthetic only)")
            summary |= {f"fig7.{r['setting'][len('Stage 2 '):]}": r["mean"] for r in fig7.to_dict("records")}
        table2 = _ratio_table(runs[runs["setting"].isin(["Real + Synthetic", "Real only"])])
        t.table(table2, "table2", "Table 2 format: real-test accuracy vs mixing ratio")
        for r in table2.to_dict("records"):
            suffix = " aug" if r["augmentation"].startswith("with") else ""
            summary[f"table2.{r['setting']} {r['mixing_ratio']}{suffix}"] = r["mean"]
        t.figure(_plot_ratio(runs), "table2.png")
        metrics = {"n_runs": n_trained, **summary}
        t.finish(metrics)
    return {**result, "table2": table2, "metrics": metrics}


def _check_datasets(datasets: dict[str, Path], stage2: dict[str, Path]) -> bool:
    """The inputs are consistent; True when Table 3 can be computed (both refined benchmarks given)."""
    if "synthetic" not in datasets:
        raise FileNotFoundError("mixing tables need the prepared benchmark with the original synthetic domain")
    half = sorted({"cyclegan", "mrgan"} & set(datasets))
    if len(half) == 1:
        raise FileNotFoundError(f"Table 3 needs both the CycleGAN and MrGAN refined benchmarks; got only {half}")
    clash = sorted(set(stage2) & {"synthetic", "cyclegan", "mrgan"})
    if clash:
        raise ValueError(f"stage-2 labels {clash} clash with the Table 3 dataset keys")
    return len(half) == 2


def _train_cells(t: TablesRun, datasets: dict[str, Path], cells: list[tuple[str, str, list[float], bool]],
                 params_path: Path) -> tuple[Any, int]:
    """One classifier per (dataset, ratio, augmentation, seed), shared by the cells that ask for the same one
    (RR-RS is Table 3's MrGAN); one row per cell and seed. Returns (runs DataFrame, classifiers trained)."""
    import pandas as pd

    cfg = need(t.params.reports.mixing_tables, "reports.mixing_tables", t.params.source)
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, float, bool, int], dict[str, float]] = {}
    for setting, key, fractions, aug in cells:
        for seed in cfg.seeds:
            for f in fractions:
                ident = (str(datasets[key]), f, aug, seed)
                if ident not in done:
                    p = load_params(params_path, {
                        "seed": seed, "methods.mixing.real_fraction": f, "methods.mixing.augment": aug,
                        "methods.mixing.epochs": cfg.epochs, "methods.mixing.steps_per_epoch": cfg.steps_per_epoch,
                        "train.progress": False, "tracking.log_model": False})
                    done[ident] = train_and_test("mixing", datasets[key], p, t.workdir(),
                                                 f"table@mixing[{key},f={f},aug={aug},seed={seed}]", t.run_id)
                rows.append({"setting": setting, "dataset": key, "augment": aug, "seed": seed,
                             "real_fraction": f, **done[ident]})
    return pd.DataFrame(rows), len(done)


def _table(runs: Any, order: list[str]) -> Any:
    """One row per setting: the per-seed selected ratio (best real val accuracy) and test mean +- std."""
    import pandas as pd

    out = []
    for setting in order:
        sub = runs[runs["setting"] == setting]
        picks = [g.loc[g["val_accuracy"].idxmax()] for _, g in sub.groupby("seed")]
        accs = [float(p["test_accuracy"]) for p in picks]
        chosen = sorted({_ratio(float(p["real_fraction"])) for p in picks})
        out.append({"setting": setting, "mixing_ratio": ", ".join(chosen), "mean": float(np.mean(accs)),
                    "std": float(np.std(accs)), "accuracy": _fmt(accs), "seeds": len(accs)})
    return pd.DataFrame(out)


def _ratio_table(runs: Any) -> Any:
    import pandas as pd

    out = []
    for (aug, setting, f), g in runs.groupby(["augment", "setting", "real_fraction"], sort=True):
        accs = g["test_accuracy"].tolist()
        out.append({"augmentation": "with 2D augmentation" if aug else "no 2D augmentation", "setting": setting,
                    "mixing_ratio": _ratio(f), "real_fraction": f, "mean": float(np.mean(accs)),
                    "std": float(np.std(accs)), "accuracy": _fmt(accs), "seeds": len(accs)})
    return pd.DataFrame(out)


def _ratio(f: float) -> str:
    """real_fraction -> the paper's Real:Synthetic notation (0.125 -> 1:7)."""
    if f <= 0:
        return "0:1"
    if f >= 1:
        return "1:0"
    return f"1:{(1 - f) / f:.3g}"


def _plot_ratio(runs: Any) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    sub = runs[runs["setting"].isin(["Real + Synthetic", "Real only"])]
    for aug, g in sub.groupby("augment"):
        stats = g.groupby("real_fraction")["test_accuracy"].agg(["mean", "std"]).reset_index()
        ax.errorbar(stats["real_fraction"], stats["mean"], yerr=stats["std"], marker="o", capsize=3,
                    label="with 2D augmentation" if aug else "no 2D augmentation")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real fraction of every minibatch (1 = real only)")
    ax.set_ylabel("real-test accuracy")
    ax.set_title("accuracy vs mixing ratio (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
