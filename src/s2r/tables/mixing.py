"""Paper 4's comparison tables on our data: Table 3 (synthetic / refined / real mixes) and Table 2 (ratio x aug).

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


def mixing_tables(datasets: dict[str, Path], out: Path, params_path: Path) -> dict[str, Any]:
    """Run every cell of Tables 3 and 2; write markdown/CSV/JSON + a plot, log them on a `tables@mixing` run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from s2r.files import write_json
    from s2r.tracking import TrackedRun

    base = load_params(params_path)
    cfg = base.reports.mixing_tables
    ratios = list(cfg.ratios)
    # (setting, dataset key, candidate real fractions, augment)
    cells: list[tuple[str, str, list[float], bool]] = [
        ("Synthetic only", "synthetic", [0.0], False),
        ("Refined by MrGAN", "mrgan", [0.0], False),
        ("Refined by CycleGAN", "cyclegan", [0.0], False),
        ("Real + Synthetic", "synthetic", ratios, False),
        ("Real + Refined by MrGAN", "mrgan", ratios, False),
        ("Real + Refined by CycleGAN", "cyclegan", ratios, False),
        ("Real only", "synthetic", [1.0], False),
    ]
    cells += [("Real + Synthetic", "synthetic", ratios, True), ("Real only", "synthetic", [1.0], True)]
    missing = sorted({k for _, k, _, _ in cells} - set(datasets))
    if missing:
        raise FileNotFoundError(f"mixing tables need prepared datasets for {missing}")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    done: dict[tuple[str, float, bool, int], dict[str, float]] = {}
    logged = {"reports": {"mixing_tables": asdict(cfg)}, "datasets": {k: str(v) for k, v in datasets.items()}}
    with TrackedRun("tables@mixing", experiment=base.tracking.experiment, params=logged,
                    tags={"stage": "tables", "method": "mixing"}) as parent, tempfile.TemporaryDirectory() as tmpd:
        for setting, key, fractions, aug in cells:
            for seed in cfg.seeds:
                for f in fractions:
                    ident = (key, f, aug, seed)
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
        table3 = _table(runs[~runs["augment"]], [c[0] for c in cells[:7]])
        table2 = _ratio_table(runs[runs["setting"].isin(["Real + Synthetic", "Real only"])])
        (out / "table3.md").write_text(_markdown(table3, "Table 3 format: real-test accuracy, no 2D augmentation"))
        (out / "table2.md").write_text(_markdown(table2, "Table 2 format: real-test accuracy vs mixing ratio"))
        table3.to_csv(out / "table3.csv", index=False)
        table2.to_csv(out / "table2.csv", index=False)
        fig = _plot_ratio(runs)
        fig.savefig(out / "table2.png", bbox_inches="tight")
        parent.log_figure(fig, "tables/table2.png")
        plt.close(fig)
        summary = {r["setting"]: r["mean"] for r in table3.to_dict("records")}
        metrics = {"n_runs": len(done), **{f"table3.{k}": v for k, v in summary.items()}}
        write_json(out / "metrics.json", metrics)
        parent.log_metrics({k.replace("+", "plus").replace(" ", "_"): v for k, v in metrics.items()}, step=0)
        for name in ("table3.md", "table2.md", "table3.csv", "table2.csv", "runs.csv", "metrics.json"):
            parent.log_artifact(out / name, "tables")
    return {"table3": table3, "table2": table2, "metrics": metrics}


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
