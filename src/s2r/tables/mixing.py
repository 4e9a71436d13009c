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

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params
from s2r.params import load_params
from s2r.tables import fmt_percent as _fmt
from s2r.tables import markdown as _markdown


def train_and_test(method: str, data_dir: Path, params: Params, tmp: Path, run_name: str,
                   parent_run_id: str | None = None) -> dict[str, float]:
    """Train the classifier once (a tracked run) and score it on the target test split."""
    from s2r import stages
    from s2r.evaluators.classification import classification_metrics

    summary = stages.train(method, data_dir, tmp / "model", params, ckpt_dir=tmp / "ckpt", run_name=run_name,
                           parent_run_id=parent_run_id)
    trained, _ = stages.load_trained(tmp / "model", data_dir, params)
    test = trained.data.get(trained.data.spec.target, "test")
    m = classification_metrics(test.labels, trained.predict(test.images).argmax(1), trained.data.spec.classes)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from s2r.files import write_json
    from s2r.methods import registry
    from s2r.tracking import TrackedRun

    base = load_params(params_path)
    cfg = base.reports.mixing_tables
    ratios = list(cfg.ratios)
    stage2 = dict(stage2 or {})
    if "synthetic" not in datasets:
        raise FileNotFoundError("mixing tables need the prepared benchmark with the original synthetic domain")
    half = sorted({"cyclegan", "mrgan"} & set(datasets))
    if len(half) == 1:
        raise FileNotFoundError(f"Table 3 needs both the CycleGAN and MrGAN refined benchmarks; got only {half}")
    table3_on = len(half) == 2
    clash = sorted(set(stage2) & {"synthetic", "cyclegan", "mrgan"})
    if clash:
        raise ValueError(f"stage-2 labels {clash} clash with the Table 3 dataset keys")
    datasets = {**datasets, **stage2}
    cells = table_cells(ratios, table3_on, list(stage2))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, float, bool, int], dict[str, float]] = {}  # by dataset path: RR-RS is Table 3's MrGAN
    logged = {"reports": {"mixing_tables": asdict(cfg)}, "datasets": {k: str(v) for k, v in datasets.items()}}
    with TrackedRun("tables@mixing", experiment=registry.experiment(base.tracking.experiment, "mixing"),
                    section="test", params=logged,
                    tags={"stage": "tables", "method": "mixing"}) as parent, tempfile.TemporaryDirectory() as tmpd:
        for setting, key, fractions, aug in cells:
            for seed in cfg.seeds:
                for f in fractions:
                    ident = (str(datasets[key]), f, aug, seed)
                    if ident not in done:
                        p = load_params(params_path, {
                            "seed": seed, "methods.mixing.real_fraction": f, "methods.mixing.augment": aug,
                            "methods.mixing.epochs": cfg.epochs, "methods.mixing.steps_per_epoch": cfg.steps_per_epoch,
                            "train.progress": False, "tracking.log_model": False})
                        tmp = Path(tempfile.mkdtemp(dir=tmpd))
                        done[ident] = train_and_test("mixing", datasets[key], p, tmp,
                                                     f"table@mixing[{key},f={f},aug={aug},seed={seed}]", parent.run_id)
                    rows.append({"setting": setting, "dataset": key, "augment": aug, "seed": seed,
                                 "real_fraction": f, **done[ident]})
        runs = pd.DataFrame(rows)
        runs.to_csv(out / "runs.csv", index=False)
        names = ["table2.md", "table2.csv"]
        summary: dict[str, float] = {}
        result: dict[str, Any] = {}
        if table3_on:
            table3 = _table(runs[~runs["augment"]], TABLE3)
            (out / "table3.md").write_text(_markdown(table3, "Table 3 format: real-test accuracy, no 2D augmentation"))
            table3.to_csv(out / "table3.csv", index=False)
            names += ["table3.md", "table3.csv"]
            summary |= {f"table3.{r['setting']}": r["mean"] for r in table3.to_dict("records")}
            result["table3"] = table3
        if stage2:
            fig7 = _table(runs, [f"Stage 2 {k}" for k in stage2])
            (out / "fig7.md").write_text(_markdown(
                fig7, "Fig. 7 format: real-test accuracy of each MrGAN stage-2 mapping (refined synthetic only)"))
            fig7.to_csv(out / "fig7.csv", index=False)
            names += ["fig7.md", "fig7.csv"]
            summary |= {f"fig7.{r['setting'][len('Stage 2 '):]}": r["mean"] for r in fig7.to_dict("records")}
            result["fig7"] = fig7
        table2 = _ratio_table(runs[runs["setting"].isin(["Real + Synthetic", "Real only"])])
        (out / "table2.md").write_text(_markdown(table2, "Table 2 format: real-test accuracy vs mixing ratio"))
        table2.to_csv(out / "table2.csv", index=False)
        for r in table2.to_dict("records"):
            aug = " aug" if r["augmentation"].startswith("with") else ""
            summary[f"table2.{r['setting']} {r['mixing_ratio']}{aug}"] = r["mean"]
        fig = _plot_ratio(runs)
        fig.savefig(out / "table2.png", bbox_inches="tight")
        parent.log_figure(fig, "tables/table2.png")
        plt.close(fig)
        metrics = {"n_runs": len(done), **summary}
        write_json(out / "metrics.json", metrics)
        parent.log_metrics({_metric_key(k): v for k, v in metrics.items()}, step=0)
        for name in (*names, "runs.csv", "metrics.json"):
            parent.log_artifact(out / name, "tables")
    return {**result, "table2": table2, "metrics": metrics}


def _metric_key(k: str) -> str:
    """An MLflow-safe metric name (letters, digits, _ - . / and spaces are allowed; ':' and '+' are not)."""
    return k.replace("+", "plus").replace(":", "to").replace(" ", "_")


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
