"""Paper 3's correlation study (Figures 3-6) on our data: a grid of beta-VAE / Ada-GVAE models.

Every model of the grid beta x supervision x input noise x seed (`reports.betavae_tables`) is trained (a nested
MLflow run), then scored by the disentanglement evaluator (metrics, ELBO, reconstruction loss, GBT10000 test
error, OOD transfer scores, traversals; another nested run). Across all models we compute Spearman rank
correlations between every disentanglement metric / ELBO / reconstruction loss / presence of input noise / weak
supervision and every transfer score (Fig. 4 right, 5 right, 6 top), write them as a heatmap PNG and JSON, and
write the per-model transfer table (markdown + CSV) and the per-factor transfer errors (per_factor.csv: one row
per model x scenario x regressor x factor; per_factor.md: their mean by input noise, the decomposition of
Fig. 15). Fig. 3 right is its own output (`fig3_right.json` / `.png`): Spearman correlations of ELBO,
reconstruction loss and the GBT10000 test error with every disentanglement metric, computed separately over the
unsupervised models (the paper's upper block) and the weakly supervised ones (lower block). Two findings of the
paper are checked and written to metrics.json: weak supervision raises DCI / MIG (Fig. 3 left) and input noise
lowers the OOD2 transfer error (Fig. 6).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params, need
from s2r.evaluators.disentanglement import METRIC_KEYS
from s2r.files import JsonDict
from s2r.params import load_params
from s2r.tables import TablesRun, markdown

ROW_KEYS = (*METRIC_KEYS, "elbo", "recon", "input_noise", "weak_supervision")
FIG3_ROWS = ("elbo", "recon", "gbt10000_error")  # Fig. 3 right: unsupervised scores vs disentanglement metrics
TRANSFER_PREFIXES = ("ood1a", "ood1b", "ood1c", "ood2a", "ood2b")


def train_and_score(data_dir: Path, params: Params, tmp: Path, name: str, parent_run_id: str | None = None,
                    plots_out: Path | None = None) -> dict[str, Any]:
    """Train one betavae model and score it with the disentanglement evaluator (two nested runs)."""
    from s2r import stages
    from s2r.evaluators import disentanglement
    from s2r.methods import registry
    from s2r.methods.betavae import Method as BetavaeMethod
    from s2r.tracking import TrackedRun

    summary = stages.train(stages.TrainRequest("betavae", data_dir, tmp / "model", ckpt_dir=tmp / "ckpt",
                                               run_name=f"table@betavae[{name}]", parent_run_id=parent_run_id), params)
    method, saved = stages.load_trained(tmp / "model", data_dir, params)
    assert isinstance(method, BetavaeMethod)  # trained as "betavae" just above
    if plots_out:
        plots_out.mkdir(parents=True, exist_ok=True)
    with TrackedRun(f"table-evaluate@betavae[{name}]", section="test",
                    experiment=registry.experiment(params.tracking.experiment, "betavae"),
                    params={"model": name}, parent_run_id=parent_run_id,
                    tags={"stage": "tables", "method": "betavae", "train_run_id": saved["mlflow_run_id"]}) as run:
        res = disentanglement.EVALUATOR.evaluate(method, run, plots_out, params)
    return res | {"train_seconds": float(summary["seconds"]), "val_elbo": float(summary["val_elbo"])}


def spearman_table(runs: Any, rows: list[str], cols: list[str]) -> dict[str, dict[str, float | None]]:
    """Spearman rho between each row column and each transfer column across models (None where undefined)."""
    from scipy.stats import spearmanr

    out: dict[str, dict[str, float | None]] = {}
    for r in rows:
        out[r] = {}
        for c in cols:
            a, b = runs[r].to_numpy(float), runs[c].to_numpy(float)
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
                out[r][c] = None  # a constant column has no rank correlation
                continue
            rho = float(spearmanr(a[ok], b[ok]).statistic)
            out[r][c] = rho if np.isfinite(rho) else None
    return out


def fig3_right(runs: Any) -> dict[str, dict[str, dict[str, float | None]]]:
    """Fig. 3 right: per supervision ("unsupervised" upper, "weak" lower), Spearman rho of ELBO, reconstruction
    loss and GBT10000 test error (rows) with each disentanglement metric (columns), across that group's models."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for sup in ("unsupervised", "weak"):
        sub = runs[runs["supervision"] == sup]
        if len(sub):
            out[sup] = spearman_table(sub, [r for r in FIG3_ROWS if r in sub.columns],
                                      [m for m in METRIC_KEYS if m in sub.columns])
    return out


def findings(runs: Any) -> dict[str, Any]:
    """The paper's two claims checked on our models: weak > unsupervised on DCI/MIG; noise lowers OOD2 error."""
    out: dict[str, Any] = {}
    weak, unsup = runs[runs["weak_supervision"] == 1], runs[runs["weak_supervision"] == 0]
    for k in ("dci_disentanglement", "mig"):
        if len(weak) and len(unsup):
            out[f"{k}_weak_mean"] = float(weak[k].mean())
            out[f"{k}_unsupervised_mean"] = float(unsup[k].mean())
            out[f"weak_raises_{k}"] = bool(weak[k].mean() > unsup[k].mean())
    noisy, clean = runs[runs["input_noise"] == 1], runs[runs["input_noise"] == 0]
    for k in [c for c in runs.columns if c.startswith("ood2")]:
        if len(noisy) and len(clean):
            out[f"{k}_noise_mean"] = float(noisy[k].mean())
            out[f"{k}_no_noise_mean"] = float(clean[k].mean())
            out[f"noise_lowers_{k}"] = bool(noisy[k].mean() < clean[k].mean())
    return out


def per_factor_table(per_factor: Any) -> Any:
    """Fig. 15's decomposition: mean per-factor MAE over models, one row per scenario x regressor x factor,
    one column per input-noise setting ("noise=0", "noise=1")."""
    import pandas as pd

    if per_factor.empty:
        return pd.DataFrame(columns=["scenario", "regressor", "factor"])
    t = per_factor.pivot_table(index=["scenario", "regressor", "factor"], columns="input_noise", values="mae",
                               aggfunc="mean")
    t.columns = [f"noise={int(c)}" for c in t.columns]
    t = t.reset_index()
    for c in t.columns[3:]:
        t[c] = t[c].map(lambda v: f"{v:.4f}")
    return t


def _draw_heatmap(ax: Any, corr: dict[str, dict[str, float | None]], title: str) -> None:
    rows = list(corr)
    cols = list(next(iter(corr.values()))) if corr else []
    m = np.array([[np.nan if corr[r][c] is None else corr[r][c] for c in cols] for r in rows], float)
    ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, "-" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=8)


def plot_heatmap(corr: dict[str, dict[str, float | None]], title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(corr)
    cols = list(next(iter(corr.values()))) if corr else []
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.4 * len(rows)), dpi=120)
    _draw_heatmap(ax, corr, title)
    fig.tight_layout()
    return fig


def plot_fig3_right(f3: dict[str, dict[str, dict[str, float | None]]]) -> Any:
    """Fig. 3 right: one heatmap per supervision, unsupervised above, weakly supervised below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(max(len(f3), 1), 1, figsize=(7, 2.6 * max(len(f3), 1)), dpi=120, squeeze=False)
    for ax, (sup, corr) in zip(axes[:, 0], f3.items()):
        _draw_heatmap(ax, corr, f"Fig. 3 right, {sup} models: Spearman rank correlation")
    fig.tight_layout()
    return fig


def model_grid(cfg: Any) -> list[dict[str, Any]]:
    """The models of `reports.betavae_tables`: beta x supervision x noise x seed, and, when listed, latent
    dimensionality x KL warm-up (paper 3: 2 x 3 x 3 x 3 x 2 = 108 configurations x 10 seeds = 1,080 models).

    Each entry: the params overrides of the model, its display name and its slug (folder name)."""
    dims: list[int | None] = list(cfg.latent_dims) or [None]
    warms: list[float | None] = list(cfg.warmup_fractions) or [None]
    out = []
    for sup in cfg.supervisions:
        for noise in cfg.noises:
            for beta in cfg.betas:
                for dim in dims:
                    for warm in warms:
                        for seed in cfg.seeds:
                            ov: dict[str, Any] = {"seed": seed, "methods.betavae.beta": beta,
                                                  "methods.betavae.supervision": sup,
                                                  "methods.betavae.input_noise": noise}
                            extra, name_extra = "", ""
                            if dim is not None:
                                ov["methods.betavae.latent_dim"] = dim
                                extra, name_extra = f"{extra}_d{dim}", f"{name_extra},d={dim}"
                            if warm is not None:
                                ov["methods.betavae.warmup_fraction"] = warm
                                extra, name_extra = f"{extra}_warm{warm:g}", f"{name_extra},warmup={warm:g}"
                            out.append({"overrides": ov, "beta": beta, "supervision": sup, "noise": noise,
                                        "seed": seed, "latent_dim": dim, "warmup_fraction": warm,
                                        "name": f"beta={beta:g},{sup},noise={int(noise)}{name_extra},seed={seed}",
                                        "slug": f"beta{beta:g}_{sup}_noise{int(noise)}{extra}_seed{seed}"})
    return out


def betavae_tables(data_dir: Path, out: Path, params_path: Path,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the grid; write runs.csv, transfer.md/csv, spearman.json/png, metrics.json; log them to MLflow.

    `overrides` (dotted params keys, e.g. {"methods.betavae.ood_factor": "object_color"}) apply to every model:
    one params file can serve several benchmarks (the paper-3 recipe: MPI3D and TriFinger)."""
    import pandas as pd

    overrides = dict(overrides or {})
    base = load_params(params_path, overrides)
    cfg = need(base.reports.betavae_tables, "reports.betavae_tables", base.source)
    logged = {"reports": {"betavae_tables": asdict(cfg)}, "data": str(data_dir), "overrides": overrides}
    with TablesRun("betavae", out, base, logged) as t:
        rows: list[dict[str, Any]] = []
        factor_rows: list[dict[str, Any]] = []  # per-factor transfer errors (paper 3 Fig. 15)
        for g in model_grid(cfg):
            p = load_params(params_path, {
                **overrides, **g["overrides"], "methods.betavae.epochs": cfg.epochs,
                "methods.betavae.steps_per_epoch": cfg.steps_per_epoch, "train.threads": cfg.threads,
                "train.progress": False, "tracking.log_model": False})
            res = train_and_score(data_dir, p, t.workdir(), g["name"], t.run_id, t.out / "models" / g["slug"])
            rows.append(_grid_row(g, res))
            factor_rows += _factor_rows(g, res)
        runs = pd.DataFrame(rows)
        t.csv(runs, "runs.csv")
        transfer_cols = [c for c in runs.columns if c.startswith(TRANSFER_PREFIXES)]
        corr = _write_correlations(t, runs, transfer_cols)
        _write_transfer_tables(t, runs, transfer_cols, factor_rows)
        metrics = {"n_models": len(runs), **findings(runs),
                   "train_seconds_mean": float(runs["train_seconds"].mean()),
                   "evaluate_seconds_mean": float((runs["seconds_encode"] + runs["seconds_metrics"]
                                                   + runs["seconds_transfer"]).mean())}
        t.finish(metrics)
    return {"runs": runs, "spearman": corr, "metrics": metrics}


def _grid_row(g: dict[str, Any], res: JsonDict) -> dict[str, Any]:
    """One model's row of runs.csv: its grid settings and its numeric scores."""
    sup = g["supervision"]
    dims = {"latent_dim": g["latent_dim"]} if g["latent_dim"] is not None else {}
    warm = {"warmup_fraction": g["warmup_fraction"]} if g["warmup_fraction"] is not None else {}
    return {"model": g["slug"], "beta": g["beta"], "supervision": sup, "input_noise": int(g["noise"]),
            "seed": g["seed"], **dims, **warm, "weak_supervision": int(sup == "weak"),
            **{k: v for k, v in res.items() if isinstance(v, (int, float))}}


def _factor_rows(g: dict[str, Any], res: JsonDict) -> list[dict[str, Any]]:
    """One model's per-factor transfer errors (Fig. 15), one row per scenario, regressor and factor."""
    return [{"model": g["slug"], "input_noise": int(g["noise"]), "weak_supervision": int(g["supervision"] == "weak"),
             "scenario": sc, "regressor": kind, "factor": f, "mae": v}
            for sc, regs in res.get("per_factor", {}).items() for kind, fs in regs.items() for f, v in fs.items()]


def _write_correlations(t: TablesRun, runs: Any, transfer_cols: list[str]) -> Any:
    """Spearman correlations of the scores with transfer (heat map) and paper 3's Fig. 3 right."""
    corr = spearman_table(runs, [r for r in ROW_KEYS if r in runs.columns], transfer_cols)
    t.json("spearman.json", {"n_models": len(runs), "rows": list(corr), "columns": transfer_cols, "spearman": corr})
    t.figure(plot_heatmap(corr, f"Spearman rank correlation across {len(runs)} models (transfer = MAE, lower "
                                "is better)"), "spearman.png")
    f3 = fig3_right(runs)
    t.json("fig3_right.json", {"n_models": {k: int((runs["supervision"] == k).sum()) for k in f3}, "spearman": f3})
    t.figure(plot_fig3_right(f3), "fig3_right.png")
    return corr


def _write_transfer_tables(t: TablesRun, runs: Any, transfer_cols: list[str], factor_rows: list[dict[str, Any]]
                           ) -> None:
    """The OOD transfer table (one row per model) and the per-factor errors (Fig. 15)."""
    import pandas as pd

    table = runs[["model", "beta", "supervision", "input_noise", "seed", "dci_disentanglement", "mig", "elbo",
                  *transfer_cols]].copy()
    fmt = table.copy()
    for c in fmt.columns[5:]:
        fmt[c] = fmt[c].map(lambda v: f"{v:.4g}")
    t.table(table, "transfer", "OOD transfer scores (mean absolute error over factors, normalised to [0, 1]; lower "
                               "is better)", shown=fmt)
    per_factor = pd.DataFrame(factor_rows, columns=["model", "input_noise", "weak_supervision", "scenario",
                                                    "regressor", "factor", "mae"])
    t.csv(per_factor, "per_factor.csv")
    t.text("per_factor.md", markdown(per_factor_table(per_factor), (
        "Per-factor transfer error (Fig. 15): mean absolute error per factor, mean over models, by input noise")))
