"""Disentanglement metrics (paper 3, Section 3 / Fig. 3) and the evaluate stage of representation learners.

Inputs everywhere: a representation `z` (N, d) (posterior means) and integer factor values `y` (N, F).
Definitions follow the original papers, as implemented in disentanglement_lib (Locatello et al. 2019b):

- DCI (Eastwood & Williams 2018): an importance matrix R (d x F) from one predictor per factor; disentanglement
  D = sum_i rho_i (1 - H_F(P_i.)), P_ij = R_ij / sum_k R_ik, rho_i = sum_j R_ij / sum R; completeness
  C = mean_j (1 - H_d(P_.j)), P_ij = R_ij / sum_k R_kj; entropies in base F (resp. d). Informativeness = mean
  test accuracy of the predictors. Estimator (`estimator`): "gbt" = LightGBM classifiers, R = total split gain
  (disentanglement_lib uses sklearn gradient boosting with impurity importances; LightGBM's gain is the same
  quantity, faster); "lasso" = sklearn Lasso on factors normalised to [0, 1], R = |coefficients| (the original
  paper's choice), informativeness then = 1 - mean absolute error.
- MIG (Chen et al. 2018): every latent discretised into `bins` = 20 equal-width bins over its range
  (disentanglement_lib's default); MIG = mean_j (I(z_a; v_j) - I(z_b; v_j)) / H(v_j), a, b the two latents
  with the largest mutual information with factor j.
- SAP (Kumar et al. 2018): a score matrix S (d x F) and SAP = mean_j (top1_j - top2_j) over latents. Kumar et al.
  define S_ij as the R^2 of a linear fit of factor j from latent i for continuous factors and as the accuracy of
  a threshold classifier for categorical ones. Our factors are grid indices of mostly ordinal quantities
  (position, size, rotation, hue angle), so the default is the R^2 form for all factors (`continuous=True`:
  S_ij = corr(z_i, v_j)^2, ceiling 1); `continuous=False` is disentanglement_lib's classification form (linear SVM,
  C = 0.01, balanced, on one latent; its ceiling is below 1 because the runner-up scores chance accuracy).
- Modularity (Ridgeway & Mozer 2018): discretised MI matrix m (d x F); per latent theta_i = max_j m_ij,
  delta_i = sum_{j != argmax} m_ij^2 / (theta_i^2 (F - 1)); modularity = mean_i (1 - delta_i), 0 for a latent
  with theta_i = 0 (constant).
- BetaVAE score (Higgins et al. 2017): a point = (factor k, mean over L pairs sharing the value of k of
  |z1 - z2|); a logistic regression predicts k; score = its accuracy on held-out points. Chance = 1/F.
- FactorVAE score (Kim & Mnih 2018): latents scaled by their std over the data; latents with variance < 0.05
  pruned; a vote = (argmin_i variance of z_i over L samples sharing the value of factor k, k); majority-vote
  classifier from latent to factor; score = its accuracy on held-out votes; 0 when every latent is pruned.

BetaVAE and FactorVAE need samples that share the value of one factor while the others vary as in the data. The
papers draw them from the generator; we draw them from the labelled set by conditioning on f_k = v. This equals
the generator's conditional when the factors are independent, as in the embedded `scenes` benchmark (settings
drawn uniformly from the full grid). It does NOT hold for correlated factors (the paper's robot dataset, Section
3: "not straightforward to evaluate on datasets that do not contain all possible combinations"); the evaluate
stage reports `factor_max_abs_corr` so a user sees how far their factors are from independent, and factor values
with fewer than 2 samples are never drawn.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

METRIC_KEYS = ("dci_disentanglement", "dci_completeness", "dci_informativeness", "mig", "sap", "modularity",
               "betavae_score", "factorvae_score")


def _split(n: int, rng: np.random.Generator, test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    cut = max(1, int(round(n * (1 - test_fraction))))
    return perm[:cut], perm[cut:]


def _entropy(p: np.ndarray, base: float, axis: int) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis) / np.log(base)


def dci_from_importance(r: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix R (d x F) (Eastwood & Williams 2018)."""
    r = np.abs(np.asarray(r, np.float64))
    d, f = r.shape
    if r.sum() <= 0:
        return 0.0, 0.0
    p_code = r / np.maximum(r.sum(1, keepdims=True), 1e-12)
    dis_per_code = 1.0 - _entropy(p_code, f, 1) if f > 1 else np.ones(d)
    rho = r.sum(1) / r.sum()
    dis = float((rho * dis_per_code).sum())
    p_fac = r / np.maximum(r.sum(0, keepdims=True), 1e-12)
    comp_per_factor = 1.0 - _entropy(p_fac, d, 0) if d > 1 else np.ones(f)
    comp_per_factor = np.where(r.sum(0) > 0, comp_per_factor, 0.0)
    return dis, float(comp_per_factor.mean())


def dci(z: np.ndarray, y: np.ndarray, estimator: str = "gbt", seed: int = 0) -> dict[str, float]:
    """DCI disentanglement, completeness and informativeness (see the module docstring for the estimators)."""
    z, y = np.asarray(z, np.float64), np.asarray(y)
    rng = np.random.default_rng(seed)
    tr, te = _split(len(z), rng)
    r = np.zeros((z.shape[1], y.shape[1]))
    info = []
    for j in range(y.shape[1]):
        if estimator == "gbt":
            from lightgbm import LGBMClassifier

            if len(np.unique(y[tr, j])) < 2:
                continue
            m = LGBMClassifier(n_estimators=50, learning_rate=0.1, num_leaves=15, min_child_samples=5,
                               importance_type="gain", n_jobs=1, deterministic=True, force_row_wise=True,
                               random_state=seed, verbose=-1)
            m.fit(z[tr], y[tr, j])
            r[:, j] = m.feature_importances_
            info.append(float((m.predict(z[te]) == y[te, j]).mean()))
        elif estimator == "lasso":
            from sklearn.linear_model import Lasso

            span = max(float(y[:, j].max() - y[:, j].min()), 1.0)
            t = (y[:, j] - y[:, j].min()) / span
            zs = (z - z[tr].mean(0)) / np.maximum(z[tr].std(0), 1e-8)
            m = Lasso(alpha=0.01, random_state=seed).fit(zs[tr], t[tr])
            r[:, j] = np.abs(m.coef_)
            info.append(1.0 - float(np.abs(m.predict(zs[te]) - t[te]).mean()))
        else:
            raise ValueError(f"unknown DCI estimator {estimator!r}; use 'gbt' or 'lasso'")
    d_score, c_score = dci_from_importance(r)
    return {"dci_disentanglement": d_score, "dci_completeness": c_score,
            "dci_informativeness": float(np.mean(info)) if info else 0.0}


def discretize(z: np.ndarray, bins: int = 20) -> np.ndarray:
    """Every column into `bins` equal-width bins over its range (constant columns -> one bin)."""
    z = np.asarray(z, np.float64)
    out = np.zeros(z.shape, np.int64)
    for i in range(z.shape[1]):
        lo, hi = z[:, i].min(), z[:, i].max()
        if hi > lo:
            out[:, i] = np.minimum(((z[:, i] - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    return out


def mutual_info_matrix(zd: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(d, F) mutual information (nats) between discretised latents and factors."""
    from sklearn.metrics import mutual_info_score

    return np.array([[mutual_info_score(y[:, j], zd[:, i]) for j in range(y.shape[1])] for i in range(zd.shape[1])])


def mig(z: np.ndarray, y: np.ndarray, bins: int = 20) -> float:
    """Mutual information gap (Chen et al. 2018), normalised by each factor's entropy."""
    from sklearn.metrics import mutual_info_score

    m = mutual_info_matrix(discretize(z, bins), y)
    if m.shape[0] < 2:
        return 0.0
    gaps = []
    for j in range(y.shape[1]):
        h = mutual_info_score(y[:, j], y[:, j])
        if h <= 0:
            continue
        top = np.sort(m[:, j])[::-1]
        gaps.append((top[0] - top[1]) / h)
    return float(np.mean(gaps)) if gaps else 0.0


def sap(z: np.ndarray, y: np.ndarray, seed: int = 0, continuous: bool = True) -> float:
    """Separated attribute predictability (Kumar et al. 2018): R^2 form (default) or classification form."""
    from sklearn.svm import LinearSVC

    z = np.asarray(z, np.float64)
    d, f = z.shape[1], y.shape[1]
    if d < 2:
        return 0.0
    s = np.zeros((d, f))
    if continuous:
        zc, yc = z - z.mean(0), np.asarray(y, np.float64) - np.mean(y, 0)
        cov = zc.T @ yc / len(z)  # (d, F)
        var = np.outer((zc**2).mean(0), (yc**2).mean(0))
        s = np.where(var > 0, cov**2 / np.maximum(var, 1e-300), 0.0)
        top = np.sort(s, axis=0)[::-1]
        return float((top[0] - top[1]).mean())
    rng = np.random.default_rng(seed)
    tr, te = _split(len(z), rng)
    for i in range(d):
        zi = z[:, i : i + 1]
        if zi[tr].std() == 0:
            continue  # a constant latent predicts nothing (score 0, as in disentanglement_lib)
        zi = (zi - zi[tr].mean()) / zi[tr].std()
        for j in range(f):
            if len(np.unique(y[tr, j])) < 2:
                continue
            clf = LinearSVC(C=0.01, class_weight="balanced", random_state=seed).fit(zi[tr], y[tr, j])
            s[i, j] = float((clf.predict(zi[te]) == y[te, j]).mean())
    top = np.sort(s, axis=0)[::-1]
    return float((top[0] - top[1]).mean())


def modularity(z: np.ndarray, y: np.ndarray, bins: int = 20) -> float:
    """Modularity (Ridgeway & Mozer 2018) on the discretised mutual information matrix."""
    m = mutual_info_matrix(discretize(z, bins), y)
    f = m.shape[1]
    if f < 2:
        return 1.0
    theta = m.max(1)
    template = np.zeros_like(m)
    template[np.arange(len(m)), m.argmax(1)] = theta
    delta = ((m - template) ** 2).sum(1) / np.maximum(theta**2 * (f - 1), 1e-12)
    mod = np.where(theta > 0, 1.0 - delta, 0.0)
    return float(mod.mean())


def _conditional_groups(y: np.ndarray, min_size: int = 2) -> list[list[np.ndarray]]:
    """Per factor, the index sets of each value with at least `min_size` samples."""
    out = []
    for j in range(y.shape[1]):
        groups = [np.flatnonzero(y[:, j] == v) for v in np.unique(y[:, j])]
        out.append([g for g in groups if len(g) >= min_size])
    return out


def betavae_score(z: np.ndarray, y: np.ndarray, n_train: int = 500, n_eval: int = 250, pairs: int = 16,
                  seed: int = 0) -> float:
    """BetaVAE score (Higgins et al. 2017) with pairs drawn by conditioning the labelled set (see docstring)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    z = np.asarray(z, np.float64)
    groups = _conditional_groups(y)
    usable = [j for j, g in enumerate(groups) if g and len(np.unique(y[:, j])) > 1]
    if len(usable) < 2:
        return 0.0

    def points(n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ks = [], []
        for _ in range(n):
            k = usable[int(rng.integers(len(usable)))]
            diffs = []
            for _ in range(pairs):
                g = groups[k][int(rng.integers(len(groups[k])))]
                a, b = rng.choice(g, 2, replace=False)
                diffs.append(np.abs(z[a] - z[b]))
            xs.append(np.mean(diffs, 0))
            ks.append(k)
        return np.array(xs), np.array(ks)

    xtr, ktr = points(n_train)
    xte, kte = points(n_eval)
    if xtr.std(0).max() == 0:  # a constant representation: every point identical, the classifier is at chance
        return float((kte == np.bincount(ktr).argmax()).mean())
    clf = LogisticRegression(max_iter=2000).fit(xtr, ktr)
    return float((clf.predict(xte) == kte).mean())


def factorvae_score(z: np.ndarray, y: np.ndarray, n_train: int = 500, n_eval: int = 250, batch: int = 32,
                    seed: int = 0, prune: float = 0.05) -> float:
    """FactorVAE score (Kim & Mnih 2018) with conditional samples drawn from the labelled set."""
    rng = np.random.default_rng(seed)
    z = np.asarray(z, np.float64)
    std = z.std(0)
    active = std**2 > 0
    zs = np.where(active, (z - z.mean(0)) / np.where(active, std, 1.0), 0.0)
    active &= zs.var(0) >= prune
    if not active.any():
        return 0.0
    groups = _conditional_groups(y)
    usable = [j for j, g in enumerate(groups) if g and len(np.unique(y[:, j])) > 1]
    if not usable:
        return 0.0
    idx_active = np.flatnonzero(active)

    def votes(n: int) -> np.ndarray:
        out = np.zeros((z.shape[1], y.shape[1]), np.int64)
        for _ in range(n):
            k = usable[int(rng.integers(len(usable)))]
            g = groups[k][int(rng.integers(len(groups[k])))]
            s = rng.choice(g, min(batch, len(g)), replace=len(g) < 2)
            var = zs[s][:, idx_active].var(0)
            out[idx_active[int(var.argmin())], k] += 1
        return out

    train_votes = votes(n_train)
    eval_votes = votes(n_eval)
    classifier = train_votes.argmax(1)  # latent -> factor
    correct = eval_votes[np.arange(z.shape[1]), classifier].sum()
    return float(correct / max(eval_votes.sum(), 1))


def all_metrics(z: np.ndarray, y: np.ndarray, estimator: str = "gbt", bins: int = 20, seed: int = 0
                ) -> dict[str, float]:
    """Every disentanglement metric of the paper's Fig. 3 on one representation."""
    keep = [j for j in range(y.shape[1]) if len(np.unique(y[:, j])) > 1]  # constant factors carry no signal
    y = np.asarray(y)[:, keep]
    out = dci(z, y, estimator, seed)
    out["mig"] = mig(z, y, bins)
    out["sap"] = sap(z, y, seed)
    out["modularity"] = modularity(z, y, bins)
    out["betavae_score"] = betavae_score(z, y, seed=seed)
    out["factorvae_score"] = factorvae_score(z, y, seed=seed)
    return out


def downstream_gbt_error(z: np.ndarray, y: np.ndarray, n_train: int = 10_000, n_test: int = 5_000, seed: int = 0
                         ) -> dict[str, float]:
    """Fig. 3 right's "GBT10000": test error of gradient-boosted classifiers (one per factor) trained on n_train
    labelled points (disentanglement_lib downstream_task: 1 - mean over factors of the test accuracy,
    num_test 5,000). Points are disjoint random subsets of the labelled set (no generator here); on a smaller set
    the train size shrinks (reported as `gbt_train_size`) and a fifth of the set, at most n_test, is the test set."""
    from lightgbm import LGBMClassifier

    z, y = np.asarray(z, np.float64), np.asarray(y)
    keep = [j for j in range(y.shape[1]) if len(np.unique(y[:, j])) > 1]
    idx = np.random.default_rng(seed).permutation(len(z))
    n_te = max(1, min(n_test, len(z) // 5))
    te, tr = idx[:n_te], idx[n_te : n_te + min(n_train, len(z) - n_te)]
    acc = []
    for j in keep:
        if len(np.unique(y[tr, j])) < 2:
            acc.append(float((y[te, j] == y[tr[0], j]).mean()))  # one class seen: the classifier predicts it
            continue
        m = LGBMClassifier(n_estimators=50, learning_rate=0.1, num_leaves=15, min_child_samples=5, n_jobs=1,
                           deterministic=True, force_row_wise=True, random_state=seed, verbose=-1)
        m.fit(z[tr], y[tr, j])
        acc.append(float((m.predict(z[te]) == y[te, j]).mean()))
    return {"gbt10000_error": 1.0 - float(np.mean(acc)) if acc else 0.0, "gbt_train_size": int(len(tr))}


def factor_max_abs_corr(y: np.ndarray) -> float:
    """Largest |Pearson correlation| between two factors: ~0 when conditioning the data is a valid intervention."""
    y = np.asarray(y, np.float64)
    y = y[:, y.std(0) > 0]
    if y.shape[1] < 2:
        return 0.0
    c = np.corrcoef(y.T)
    np.fill_diagonal(c, 0.0)
    return float(np.abs(c).max())


# ---------------------------------------------------------------------------------------------------------
# Plots


def traversal_grid(method: Any, image: np.ndarray, steps: int = 7, span: float = 2.0) -> np.ndarray:
    """Latent traversals (paper Fig. 2): row i varies latent i over [-span, span] around the image's code."""
    z0 = method.encode(image[None])[0]
    d = len(z0)
    vals = np.linspace(-span, span, steps)
    zs = np.repeat(z0[None], d * steps, 0)
    for i in range(d):
        zs[i * steps : (i + 1) * steps, i] = vals
    return method.decode(zs)  # (d*steps, S, S, C)


def recon_rows(method: Any, images: np.ndarray) -> np.ndarray:
    """Originals (at the model resolution) followed by their reconstructions."""
    x = method.to_input(images)
    orig = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)  # (B,C,H,W) -> (B,H,W,C)
    return np.concatenate([orig, method.reconstruct(images)])


def _save(fig: Any, run: Any, plots_out: Path | None, name: str) -> None:
    import matplotlib.pyplot as plt

    if plots_out:
        fig.savefig(Path(plots_out) / name)
    run.log_figure(fig, f"plots/{name}")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# The evaluate stage


def evaluation_sets(method: Any) -> dict[str, Any]:
    """The labelled sets of the study: source-domain in-distribution / held-out values, target domain."""
    from s2r.data.benchmark import SPLITS

    data = method.data
    cap = int(getattr(method.cfg, "eval_images", 0) or 0)  # methods.<name>.eval_images: 0 = every image
    sets: dict[str, Any] = {}
    for dom in (data.spec.source, data.spec.target):
        parts = [data.get(dom, s) for s in SPLITS if data.has(dom, s)]
        parts = [p for p in parts if len(p)]
        if not parts:
            continue
        lens = np.array([len(p) for p in parts])
        total, offsets = int(lens.sum()), np.r_[0, np.cumsum(lens)]
        # a fixed random subset (the same for every model: seed 0) so 1M-image domains (MPI3D) stay tractable;
        # sorted indices read the memory-mapped splits sequentially
        sel = (np.sort(np.random.default_rng(0).choice(total, cap, replace=False)) if 0 < cap < total
               else np.arange(total))
        idx = [sel[(sel >= offsets[i]) & (sel < offsets[i + 1])] - offsets[i] for i in range(len(parts))]
        imgs = np.concatenate([np.asarray(p.images[ix]) for p, ix in zip(parts, idx)])
        facs = np.concatenate([p.factors[ix] for p, ix in zip(parts, idx)])
        sets[dom] = (imgs, facs)
    return sets


def evaluate(method: Any, run: Any, plots_out: Path | None, params: Any) -> dict[str, Any]:
    """Disentanglement metrics + OOD transfer scores + traversals / reconstructions for an `encode` method."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    from s2r.data.benchmark import DataError
    from s2r.evaluators import ood_transfer
    from s2r.stages import sample_grid

    if "encode" not in method.capabilities:
        raise DataError(f"method {method.name!r} has no 'encode' capability to score disentanglement on")
    data = method.data
    sets = evaluation_sets(method)
    src, tgt = data.spec.source, data.spec.target
    if src not in sets:
        raise DataError(f"{data.root}: no labelled {src} images to evaluate on")
    imgs, facs = sets[src]
    ind = method.in_distribution(facs)
    t0 = time.perf_counter()
    z_src = method.encode(imgs)
    t_encode = time.perf_counter() - t0
    tgt_set = None
    if tgt in sets and tgt != src:
        tgt_set = (method.encode(sets[tgt][0]), sets[tgt][1])
    with threadpool_limits(1):  # one BLAS/OpenMP thread: small fits on a shared 2-core machine run faster
        t0 = time.perf_counter()
        metrics = all_metrics(z_src[ind], facs[ind], seed=method.seed)
        metrics |= downstream_gbt_error(z_src[ind], facs[ind], seed=method.seed)  # Fig. 3 right's GBT10000
        t_metrics = time.perf_counter() - t0
        t0 = time.perf_counter()
        transfer = ood_transfer.transfer_study(z_src, facs, method.factor_names, method.factor_sizes,
                                               method.cfg.ood_factor, method.holdout.get(method.cfg.ood_factor, []),
                                               tgt_set, seed=method.seed,
                                               order=list(getattr(method.cfg, "ood_order", [])))
        t_transfer = time.perf_counter() - t0
    elbo = method.elbo_terms(imgs[ind][:512])
    result: dict[str, Any] = {**metrics, "elbo": elbo["elbo"], "recon": elbo["recon"], "kl": elbo["kl"],
                              **transfer["scores"],
                              "factor_max_abs_corr": factor_max_abs_corr(facs[ind]),
                              "n_in_distribution": int(ind.sum()), "n_ood_values": int((~ind).sum()),
                              "n_target": int(len(tgt_set[0])) if tgt_set else 0,
                              "seconds_encode": round(t_encode, 2), "seconds_metrics": round(t_metrics, 2),
                              "seconds_transfer": round(t_transfer, 2), "per_factor": transfer["per_factor"]}
    run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))}, step=0)
    rows = [{"scenario": s, "regressor": r, "mae": v} for s, regs in transfer["table"].items() for r, v in regs.items()]
    if plots_out:
        pd.DataFrame(rows).to_csv(Path(plots_out) / "transfer.csv", index=False)
    # latent traversals (Fig. 2 / 13) and reconstructions of OOD images (Fig. 16-17)
    steps = 7
    grid = traversal_grid(method, imgs[np.flatnonzero(ind)[0]], steps)
    _save(sample_grid(grid, cols=steps, title=f"{method.name}: latent traversals (row = latent, +-2)"),
          run, plots_out, "traversals.png")
    if tgt_set is not None:
        x = sets[tgt][0][:8]
        _save(sample_grid(recon_rows(method, x), cols=8, title=f"{method.name}: {tgt} (OOD2-B) / reconstructions"),
              run, plots_out, "reconstructions_target.png")
    if (~ind).any():
        x = imgs[np.flatnonzero(~ind)[:8]]
        _save(sample_grid(recon_rows(method, x), cols=8,
                          title=f"{method.name}: held-out {method.cfg.ood_factor} (OOD2-A) / reconstructions"),
              run, plots_out, "reconstructions_ood2a.png")
    return result
