"""Disentanglement metrics (paper 3, Section 3 / Fig. 3) and the evaluate stage of representation learners.

Every metric computes what disentanglement_lib (Locatello et al. 2019b; the code behind paper 3) computes, from
sample-major arrays: codes z (N, d) (posterior means) and integer factor values y (N, F). The evaluator chooses
the points and the train/test split (`reports.disentanglement`); the functions take them explicitly, as the
reference does (disentanglement_lib samples `num_train` and `num_test` points per metric: 10,000 and 5,000 in its
metric configs).

- DCI (Eastwood & Williams 2018; disentanglement_lib `evaluation/metrics/dci.py`): an importance matrix R (d x F),
  one classifier per factor fitted on the train points. Disentanglement D = sum_i rho_i (1 - H_F(P_i.)),
  P_ij = R_ij / sum_k R_ik, rho_i = sum_j R_ij / sum R; completeness C = sum_j tau_j (1 - H_d(P_.j)),
  P_ij = R_ij / sum_k R_kj, tau_j = sum_i R_ij / sum R (each factor weighted by its share of the total
  importance, as `completeness()` in dci.py; a factor that gets no importance weighs nothing); entropies in base
  F (resp. d) of R + 1e-11 (dci.py's offset), uniform weights when R is all zero. Informativeness = mean test
  accuracy of the classifiers (`dci_informativeness`; train accuracy in `dci_informativeness_train`).
  `estimator` chooses R:
    "gbt" (default, the reference): sklearn `GradientBoostingClassifier()` with its defaults (100 trees of depth
        3, learning rate 0.1) per factor, R[:, j] = |feature_importances_| (impurity importances, normalised per
        factor); `random_state = seed` fixes sklearn's feature-order tie-breaking, which the reference leaves free.
    "lightgbm" (NOT the paper's): LightGBM classifiers, R = total split gain (unnormalised). Faster, but not the
        same quantity: on the same split D and C differ by up to ~0.17 and pure noise scores D ~0.04, not ~0.
    "lasso" (NOT the paper's; Eastwood & Williams' own choice): sklearn Lasso on factors scaled to [0, 1],
        R = |coefficients|, informativeness = 1 - mean absolute error.
- SAP (Kumar et al. 2018; `sap_score.py`): a score matrix S (d x F), SAP = mean_j (top1_j - top2_j) over codes.
  `continuous=False` (default; disentanglement_lib's metric config `sap_score.continuous_factors=False`):
  S_ij = test accuracy of `LinearSVC(C=0.01, class_weight="balanced")` fitted on the raw code i (no
  standardisation) to predict factor j; its ceiling is below 1 because the runner-up scores about chance.
  `continuous=True` (NOT the paper's config): S_ij = cov(z_i, y_j)^2 / (var z_i var y_j) on the train points,
  0 where var z_i <= 1e-12.
- MIG (Chen et al. 2018; `mig.py`): codes discretised by disentanglement_lib's histogram discretizer (`bins` = 20
  equal-width bins over each code's range, `np.digitize` on `np.histogram` edges); MIG = mean_j (I(z_a; v_j) -
  I(z_b; v_j)) / H(v_j), a, b the two codes with the largest mutual information with factor j (sklearn
  `mutual_info_score`, nats). Factors with one value (H = 0, a division by zero in the reference) are skipped.
- Modularity (Ridgeway & Mozer 2018; `modularity_explicitness.py`): discretised MI matrix m (d x F); per code
  delta_i = (sum_j m_ij^2 - max_j m_ij^2) / (max_j m_ij^2 (F - 1)); modularity = mean_i (1 - delta_i), 0 for a
  code whose MI is all zero.
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
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params, need
from s2r.evaluators.base import Evaluator, register
from s2r.files import JsonDict
from s2r.methods.base import to_uint8
from s2r.methods.betavae import Method as BetavaeMethod
from s2r.tracking import TrackedRun

METRIC_KEYS = ("dci_disentanglement", "dci_completeness", "dci_informativeness", "mig", "sap", "modularity",
               "betavae_score", "factorvae_score")
ESTIMATORS = ("gbt", "lightgbm", "lasso")
SAP_FORMS = ("classification", "continuous")


def split_points(n: int, num_train: int, num_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random (train, test) indices into n points: `num_train` and `num_test` of them.

    disentanglement_lib samples num_train and num_test fresh points from the generator; a labelled set has n. When
    n < num_train + num_test both shrink in the same proportion (at least one point each)."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}")
    if n < 2:
        raise ValueError(f"need at least 2 points to split into train and test, got {n}")
    if n < num_train + num_test:
        n_tr = min(max(1, int(round(n * num_train / (num_train + num_test)))), n - 1)
        num_train, num_test = n_tr, n - n_tr
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:num_train], perm[num_train : num_train + num_test]


def _norm_entropy(p: np.ndarray, base: int, axis: int) -> np.ndarray:
    """scipy.stats.entropy(p, base=base) along `axis`: p is normalised to sum 1 along it first."""
    p = p / p.sum(axis, keepdims=True)
    out: np.ndarray = -(p * np.log(p)).sum(axis) / np.log(base)
    return out


def dci_from_importance(r: np.ndarray) -> tuple[float, float]:
    """(disentanglement, completeness) of an importance matrix R (codes x factors), as disentanglement_lib dci.py.

    Completeness weights each factor by its share of the total importance (a factor with no importance counts
    nothing); disentanglement weights each code likewise. Entropies of R + 1e-11 (the reference's offset)."""
    r = np.abs(np.asarray(r, np.float64))
    if r.ndim != 2 or min(r.shape) < 1:
        raise ValueError(f"importance matrix must be 2-D (codes x factors), got shape {r.shape}")
    d, f = r.shape
    per_code = 1.0 - _norm_entropy(r + 1e-11, f, 1) if f > 1 else np.ones(d)
    per_factor = 1.0 - _norm_entropy(r + 1e-11, d, 0) if d > 1 else np.ones(f)
    w = r if r.sum() > 0 else np.ones_like(r)
    dis = float(np.sum(per_code * w.sum(1) / w.sum()))
    comp = float(np.sum(per_factor * w.sum(0) / w.sum()))
    return dis, comp


def importance_matrix(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
                      estimator: str = "gbt", seed: int = 0) -> tuple[np.ndarray, float, float]:
    """(R (codes x factors), train informativeness, test informativeness): one predictor per factor.

    A factor with a single value in the train points gets a zero column and no informativeness term."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown DCI estimator {estimator!r}; use one of {ESTIMATORS}")
    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    r = np.zeros((z_train.shape[1], y_train.shape[1]))
    info_tr, info_te = [], []
    for j in range(y_train.shape[1]):
        if len(np.unique(y_train[:, j])) < 2:
            continue
        if estimator == "lasso":
            from sklearn.linear_model import Lasso

            lo = float(y_train[:, j].min())
            span = max(float(y_train[:, j].max()) - lo, 1.0)
            mu, sd = z_train.mean(0), np.maximum(z_train.std(0), 1e-8)
            m = Lasso(alpha=0.01, random_state=seed).fit((z_train - mu) / sd, (y_train[:, j] - lo) / span)
            r[:, j] = np.abs(m.coef_)
            info_tr.append(1.0 - float(np.abs(m.predict((z_train - mu) / sd) - (y_train[:, j] - lo) / span).mean()))
            info_te.append(1.0 - float(np.abs(m.predict((z_test - mu) / sd) - (y_test[:, j] - lo) / span).mean()))
            continue
        if estimator == "gbt":
            from sklearn.ensemble import GradientBoostingClassifier

            m = GradientBoostingClassifier(random_state=seed)
        else:
            from lightgbm import LGBMClassifier

            m = LGBMClassifier(n_estimators=50, learning_rate=0.1, num_leaves=15, min_child_samples=5,
                               importance_type="gain", n_jobs=1, deterministic=True, force_row_wise=True,
                               random_state=seed, verbose=-1)
        m.fit(z_train, y_train[:, j])
        r[:, j] = np.abs(m.feature_importances_)
        info_tr.append(float((m.predict(z_train) == y_train[:, j]).mean()))
        info_te.append(float((m.predict(z_test) == y_test[:, j]).mean()))
    return r, float(np.mean(info_tr)) if info_tr else 0.0, float(np.mean(info_te)) if info_te else 0.0


def dci(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, estimator: str = "gbt",
        seed: int = 0) -> dict[str, float]:
    """DCI disentanglement, completeness and informativeness (train and test) (see the module docstring)."""
    r, info_tr, info_te = importance_matrix(z_train, y_train, z_test, y_test, estimator, seed)
    d_score, c_score = dci_from_importance(r)
    return {"dci_disentanglement": d_score, "dci_completeness": c_score, "dci_informativeness": info_te,
            "dci_informativeness_train": info_tr}


def discretize(z: np.ndarray, bins: int = 20) -> np.ndarray:
    """disentanglement_lib's histogram discretizer: per column, np.digitize on np.histogram's bin edges (1..bins)."""
    z = np.asarray(z, np.float64)
    out = np.zeros(z.shape, np.int64)
    for i in range(z.shape[1]):
        out[:, i] = np.digitize(z[:, i], np.histogram(z[:, i], bins)[1][:-1])
    return out


def mutual_info_matrix(zd: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(d, F) mutual information (nats) between discretised codes and factors (sklearn mutual_info_score)."""
    from sklearn.metrics import mutual_info_score

    return np.array([[mutual_info_score(y[:, j], zd[:, i]) for j in range(y.shape[1])] for i in range(zd.shape[1])])


def mig(z: np.ndarray, y: np.ndarray, bins: int = 20) -> float:
    """Mutual information gap (Chen et al. 2018), normalised by each factor's entropy (disentanglement_lib mig.py)."""
    from sklearn.metrics import mutual_info_score

    y = np.asarray(y)
    if np.asarray(z).shape[1] < 2:
        return 0.0
    m = mutual_info_matrix(discretize(z, bins), y)
    gaps = []
    for j in range(y.shape[1]):
        h = mutual_info_score(y[:, j], y[:, j])
        if h <= 0:
            continue
        top = np.sort(m[:, j])[::-1]
        gaps.append((top[0] - top[1]) / h)
    return float(np.mean(gaps)) if gaps else 0.0


def sap(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
        continuous: bool = False, seed: int = 0) -> float:
    """Separated attribute predictability (Kumar et al. 2018) as disentanglement_lib sap_score.py computes it.

    continuous=False: S_ij = test accuracy of LinearSVC(C=0.01, class_weight="balanced") on the raw code i;
    continuous=True: S_ij = squared correlation of code i and factor j on the train points."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    d, f = z_train.shape[1], y_train.shape[1]
    if d < 2:
        return 0.0
    s = np.zeros((d, f))
    for i in range(d):
        for j in range(f):
            if continuous:
                c = np.cov(z_train[:, i], y_train[:, j].astype(np.float64), ddof=1)
                if c[0, 0] > 1e-12 and c[1, 1] > 0:
                    s[i, j] = c[0, 1] ** 2 / (c[0, 0] * c[1, 1])
                continue
            if len(np.unique(y_train[:, j])) < 2:
                continue  # a one-valued factor cannot train a classifier (and carries no signal)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LinearSVC(C=0.01, class_weight="balanced", random_state=seed)
                clf.fit(z_train[:, i : i + 1], y_train[:, j])
            s[i, j] = float(np.mean(clf.predict(z_test[:, i : i + 1]) == y_test[:, j]))
    top = np.sort(s, axis=0)
    return float(np.mean(top[-1] - top[-2]))


def modularity(z: np.ndarray, y: np.ndarray, bins: int = 20) -> float:
    """Modularity (Ridgeway & Mozer 2018) on the discretised mutual information matrix (modularity_explicitness.py)."""
    m2 = np.square(mutual_info_matrix(discretize(z, bins), np.asarray(y)))
    f = m2.shape[1]
    if f < 2:
        return 1.0
    top = m2.max(1)
    delta = (m2.sum(1) - top) / np.where(top > 0, top * (f - 1.0), 1.0)
    return float(np.where(top > 0, 1.0 - delta, 0.0).mean())


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


def all_metrics(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
                estimator: str = "gbt", sap_form: str = "classification", bins: int = 20, seed: int = 0
                ) -> dict[str, float]:
    """Every disentanglement metric of the paper's Fig. 3 on one representation, given the evaluator's split.

    As disentanglement_lib: DCI and SAP fit on the train points and score the test points; MIG and Modularity use
    the train points; the BetaVAE / FactorVAE scores draw their own samples from all points. Factors with one
    value over all points carry no signal and are dropped."""
    if sap_form not in SAP_FORMS:
        raise ValueError(f"unknown SAP form {sap_form!r}; use one of {SAP_FORMS}")
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    y_all = np.concatenate([y_train, y_test])
    keep = [j for j in range(y_all.shape[1]) if len(np.unique(y_all[:, j])) > 1]
    y_train, y_test, y_all = y_train[:, keep], y_test[:, keep], y_all[:, keep]
    z_all = np.concatenate([np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)])
    out = dci(z_train, y_train, z_test, y_test, estimator, seed)
    out["mig"] = mig(z_train, y_train, bins)
    out["sap"] = sap(z_train, y_train, z_test, y_test, continuous=sap_form == "continuous", seed=seed)
    out["modularity"] = modularity(z_train, y_train, bins)
    out["betavae_score"] = betavae_score(z_all, y_all, seed=seed)
    out["factorvae_score"] = factorvae_score(z_all, y_all, seed=seed)
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


def traversal_grid(method: BetavaeMethod, image: np.ndarray, steps: int = 7, span: float = 2.0) -> np.ndarray:
    """Latent traversals (paper Fig. 2): row i varies latent i over [-span, span] around the image's code."""
    z0 = method.encode(image[None])[0]
    d = len(z0)
    vals = np.linspace(-span, span, steps)
    zs = np.repeat(z0[None], d * steps, 0)
    for i in range(d):
        zs[i * steps : (i + 1) * steps, i] = vals
    return method.decode(zs)  # (d*steps, S, S, C)


def recon_rows(method: BetavaeMethod, images: np.ndarray) -> np.ndarray:
    """Originals (at the model resolution) followed by their reconstructions."""
    x = method.to_input(images)
    return np.concatenate([to_uint8(x), method.reconstruct(images)])


def _save(fig: Any, run: Any, plots_out: Path | None, name: str) -> None:
    import matplotlib.pyplot as plt

    if plots_out:
        fig.savefig(Path(plots_out) / name)
    run.log_figure(fig, f"plots/{name}")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# The evaluate stage


def evaluation_sets(method: BetavaeMethod) -> dict[str, Any]:
    """The labelled sets of the study: source-domain in-distribution / held-out values, target domain."""
    from s2r.config import SPLITS

    data = method.data
    cap = method.cfg.eval_images  # methods.<name>.eval_images: 0 = every image
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


Sets = dict[str, tuple[np.ndarray, np.ndarray]]  # domain -> (images, factors)


class Disentanglement(Evaluator[BetavaeMethod]):
    """Disentanglement metrics + OOD transfer scores + traversals / reconstructions for an `encode` method."""

    capability = "encode"
    report_columns = ('dci_disentanglement', 'mig', 'sap', 'elbo', 'ood2a_gbt', 'ood2b_gbt')

    def evaluate(self, method: BetavaeMethod, run: TrackedRun, plots_out: Path | None, params: Params) -> JsonDict:
        from s2r.data.benchmark import DataError

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
        tgt_set = (method.encode(sets[tgt][0]), sets[tgt][1]) if tgt in sets and tgt != src else None
        metrics, transfer, info = scores(method, z_src, facs, ind, tgt_set, params)
        elbo = method.elbo_terms(imgs[ind][:512])
        seconds = {"seconds_encode": round(t_encode, 2), "seconds_metrics": info.pop("seconds_metrics"),
                   "seconds_transfer": info.pop("seconds_transfer")}
        result: JsonDict = {**metrics, "elbo": elbo["elbo"], "recon": elbo["recon"], "kl": elbo["kl"],
                            **transfer["scores"], "factor_max_abs_corr": factor_max_abs_corr(facs[ind]),
                            "n_in_distribution": int(ind.sum()), "n_ood_values": int((~ind).sum()),
                            "n_target": int(len(tgt_set[0])) if tgt_set else 0, **info, **seconds,
                            "per_factor": transfer["per_factor"]}
        run.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))}, step=0)
        if plots_out:
            import pandas as pd

            rows = [{"scenario": s, "regressor": r, "mae": v} for s, regs in transfer["table"].items()
                    for r, v in regs.items()]
            pd.DataFrame(rows).to_csv(Path(plots_out) / "transfer.csv", index=False)
        _figures(method, sets, ind, run, plots_out)
        return result


def scores(method: BetavaeMethod, z_src: np.ndarray, facs: np.ndarray, ind: np.ndarray,
           tgt_set: tuple[np.ndarray, np.ndarray] | None, params: Params) -> tuple[JsonDict, JsonDict, JsonDict]:
    """(disentanglement metrics on in-distribution latents, the OOD transfer study, the settings and timings),
    computed with one BLAS thread."""
    from threadpoolctl import threadpool_limits

    from s2r.evaluators import ood_transfer

    cfg = need(params.reports.disentanglement, "reports.disentanglement", params.source)
    z_ind, f_ind = z_src[ind], facs[ind]
    tr, te = split_points(len(z_ind), cfg.num_train, cfg.num_test, seed=method.seed)
    with threadpool_limits(1):  # one BLAS/OpenMP thread: small fits on a shared 2-core machine run faster
        t0 = time.perf_counter()
        metrics = all_metrics(z_ind[tr], f_ind[tr], z_ind[te], f_ind[te], estimator=cfg.estimator,
                              sap_form=cfg.sap_form, bins=cfg.bins, seed=method.seed)
        metrics |= downstream_gbt_error(z_ind, f_ind, seed=method.seed)  # Fig. 3 right's GBT10000
        t_metrics = time.perf_counter() - t0
        t0 = time.perf_counter()
        transfer = ood_transfer.transfer_study(z_src, facs, method.factor_names, method.factor_sizes,
                                               method.cfg.ood_factor, method.holdout.get(method.cfg.ood_factor, []),
                                               tgt_set, seed=method.seed, clip=cfg.ood_clip,
                                               order=list(method.cfg.ood_order))
        t_transfer = time.perf_counter() - t0
    info = {"metric_points_train": int(len(tr)), "metric_points_test": int(len(te)), "dci_estimator": cfg.estimator,
            "sap_form": cfg.sap_form, "ood_clip": cfg.ood_clip, "seconds_metrics": round(t_metrics, 2),
            "seconds_transfer": round(t_transfer, 2)}
    return metrics, transfer, info

def _figures(method: BetavaeMethod, sets: Sets, ind: np.ndarray, run: TrackedRun, plots_out: Path | None) -> None:
    """Latent traversals (Fig. 2 / 13) and reconstructions of OOD images (Fig. 16-17)."""
    from s2r.figures import sample_grid

    src, tgt = method.data.spec.source, method.data.spec.target
    imgs = sets[src][0]
    steps = 7
    grid = traversal_grid(method, imgs[np.flatnonzero(ind)[0]], steps)
    _save(sample_grid(grid, cols=steps, title=f"{method.name}: latent traversals (row = latent, +-2)"),
          run, plots_out, "traversals.png")
    if tgt in sets and tgt != src:
        x = sets[tgt][0][:8]
        _save(sample_grid(recon_rows(method, x), cols=8, title=f"{method.name}: {tgt} (OOD2-B) / reconstructions"),
              run, plots_out, "reconstructions_target.png")
    if (~ind).any():
        x = imgs[np.flatnonzero(~ind)[:8]]
        _save(sample_grid(recon_rows(method, x), cols=8,
                          title=f"{method.name}: held-out {method.cfg.ood_factor} (OOD2-A) / reconstructions"),
              run, plots_out, "reconstructions_ood2a.png")


EVALUATOR = register(Disentanglement())
