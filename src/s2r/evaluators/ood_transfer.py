"""Out-of-distribution transfer of a representation (paper 3, Section 4 and 5).

One regressor per factor of variation is trained on the representation z of a training subset and tested on a
set that differs in distribution. Regressors (Section 5): gradient-boosted trees (LightGBM; n_jobs <= 2,
deterministic, row-wise: bit-identical predictions) and an MLP with two hidden layers of 256 units (sklearn,
inputs standardised on the training subset). Targets are factor indices normalised to [0, 1]
(value / (n_values - 1)); the transfer score of a scenario is the mean absolute error averaged over the factors
except the one that is out of distribution (lower is better). The error is the plain MAE of the regressor's
prediction, as paper 3 reports it (Section 4: "normalize the ground truth factor values to the range [0, 1], and
compute the mean absolute error"); `clip=True` (`reports.disentanglement.ood_clip`, NOT the paper's) clips
predictions to [0, 1] first, which hides part of the extrapolation failures OOD1-B measures. The per-factor
errors (paper 3 Fig. 15) are returned in "per_factor" and written by `s2r tables betavae` to per_factor.csv.

Scenarios, with V = the values of the OOD factor (hue) the encoder trained on, in `order`, and H = the held-out
ones:
    OOD1-A  train on 1 value (V[0], red in the scenes benchmark), test on the other values of V
    OOD1-B  train on the upper half of V (high hue), test on the lower half (extrapolation)
    OOD1-C  train on V[0::2], test on V[1::2] (alternating along hue: interpolation)
    OOD2-A  train on all of V, test on images with values in H (out of the encoder's training distribution)
    OOD2-B  train on all of V in the source domain, test on the target domain (pseudo_real: a simulated camera),
            restricted to values in V so that only the domain is out of distribution; every factor is scored.
The paper has 8 training colours; V and H come from `methods.<name>.ood_holdout` (scenes: 8 and 4 of 12 hues).
`order` (`methods.<name>.ood_order`) is the explicit order of the factor's values along which OOD1-A/B/C split:
empty = index order, which is hue order for the scenes benchmark and TriFinger's cube hue; MPI3D's
object_color indices (white, green, red, blue, brown, olive) are not, so the paper-3 recipe gives its hue order.
A scenario with no training or no test rows is an error naming it (never a silent skip).
"""

from __future__ import annotations

from typing import Any

import numpy as np

REGRESSORS = ("gbt", "mlp")


def hue_scenarios(values: np.ndarray, train_values: list[int], holdout: list[int], order: list[int] | None = None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Boolean (train, test) masks over `values` (the OOD factor of every row) for OOD1-A/B/C and OOD2-A.

    V = `train_values` in `order` (empty / None: ascending index order)."""
    if order:
        missing = sorted(set(int(x) for x in train_values) - set(order))
        if missing:
            raise ValueError(f"ood_order {list(order)} does not list the in-distribution value(s) {missing}")
        v = [int(x) for x in order if x in set(int(t) for t in train_values)]
    else:
        v = sorted(int(x) for x in train_values)
    if len(v) < 2:
        raise ValueError(f"OOD1 scenarios need >= 2 in-distribution values of the OOD factor, got {v}")
    half = len(v) // 2
    splits = {
        "OOD1-A": (v[:1], v[1:]),
        "OOD1-B": (v[len(v) - half:], v[:half]),  # train high hue, test low hue
        "OOD1-C": (v[0::2], v[1::2]),
    }
    out = {k: (np.isin(values, a), np.isin(values, b)) for k, (a, b) in splits.items()}
    if holdout:
        out["OOD2-A"] = (np.isin(values, v), np.isin(values, holdout))
    return out


def normalise(y: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Factor indices -> [0, 1] per factor (value / (n_values - 1))."""
    return np.asarray(y, np.float64) / np.maximum(np.asarray(sizes, np.float64) - 1, 1)


def make_regressor(kind: str, seed: int = 0) -> Any:
    """LightGBM GBT or a (256, 256) MLP on standardised inputs."""
    if kind == "gbt":
        from lightgbm import LGBMRegressor

        return LGBMRegressor(n_estimators=100, learning_rate=0.1, num_leaves=15, min_child_samples=5, n_jobs=1,
                             deterministic=True, force_row_wise=True, random_state=seed, verbose=-1)
    if kind == "mlp":
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(256, 256), max_iter=200,
                                                            random_state=seed))
    raise ValueError(f"unknown regressor {kind!r}; known: {REGRESSORS}")


def factor_mae(kind: str, z_tr: np.ndarray, y_tr: np.ndarray, z_te: np.ndarray, y_te: np.ndarray,
               seed: int = 0, clip: bool = False) -> np.ndarray:
    """One regressor per factor column (targets already in [0, 1]); MAE per factor on the test set.

    clip=False: the paper's plain error; clip=True: predictions clipped to [0, 1] first."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    out = np.zeros(y_tr.shape[1])
    with threadpool_limits(1):  # small fits: one BLAS thread is fastest (and far faster on a shared CPU)
        for j in range(y_tr.shape[1]):
            m = make_regressor(kind, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                m.fit(z_tr, y_tr[:, j])
            pred = m.predict(z_te)
            out[j] = float(np.abs((np.clip(pred, 0.0, 1.0) if clip else pred) - y_te[:, j]).mean())
    return out


def transfer_study(z: np.ndarray, factors: np.ndarray, names: list[str], sizes: dict[str, int], ood_factor: str,
                   holdout: list[int], target: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0,
                   regressors: tuple[str, ...] = REGRESSORS, clip: bool = False, order: list[int] | None = None
                   ) -> dict[str, Any]:
    """Every scenario x regressor: {"scores": {ood1a_gbt: mae, ...}, "table": {...}, "per_factor": {...}}.

    Raises DataError naming the scenario when its training or test set is empty (e.g. an evaluation subset that
    holds no image of a held-out value, or a target domain whose images all have held-out values)."""
    from s2r.data.benchmark import DataError

    size_list = [sizes[n] for n in names]
    y = normalise(factors, size_list)
    varying = [j for j, n in enumerate(names) if sizes[n] > 1]
    jo = names.index(ood_factor) if ood_factor else None
    ind = ~np.isin(factors[:, jo], holdout) if jo is not None else np.ones(len(z), bool)
    cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]] = {}
    if jo is not None:
        cols = [j for j in varying if j != jo]
        train_values = sorted(np.unique(factors[ind, jo]).tolist())
        for name, (tr, te) in hue_scenarios(factors[:, jo], train_values, holdout, order).items():
            for side, mask in (("training", tr), ("test", te)):
                if not mask.any():
                    raise DataError(f"OOD scenario {name}: no {side} images ({ood_factor} values in the evaluated "
                                    f"set: {sorted(np.unique(factors[:, jo]).tolist())}, held out: {holdout}); "
                                    "evaluate more images (eval_images) or change ood_holdout / ood_order")
            cases[name] = (z[tr], y[tr], z[te], y[te], cols)
    if target is not None and len(target[0]):
        zt, ft = target
        keep = ~np.isin(ft[:, jo], holdout) if jo is not None else np.ones(len(zt), bool)
        if not keep.any():
            raise DataError(f"OOD scenario OOD2-B: all {len(zt)} target images have held-out {ood_factor} values "
                            f"{holdout}: nothing in distribution to test on")
        cases["OOD2-B"] = (z[ind], y[ind], zt[keep], normalise(ft[keep], size_list), varying)
    scores: dict[str, float] = {}
    table: dict[str, dict[str, float]] = {}
    per_factor: dict[str, dict[str, dict[str, float]]] = {}
    for name, (ztr, ytr, zte, yte, cols) in cases.items():
        for kind in regressors:
            mae = factor_mae(kind, ztr, ytr[:, cols], zte, yte[:, cols], seed, clip)
            key = f"{name.replace('-', '').lower()}_{kind}"  # OOD1-A + gbt -> ood1a_gbt
            scores[key] = float(mae.mean())
            table.setdefault(name, {})[kind] = float(mae.mean())
            per_factor.setdefault(name, {})[kind] = {names[c]: float(m) for c, m in zip(cols, mae)}
    return {"scores": scores, "table": table, "per_factor": per_factor}
