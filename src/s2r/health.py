"""Training-health checks, written once (health before results).

A collapsed model is not a result. Each method declares the signals that reveal its failure modes
(`Method.health_signals()`, computed on validation data once per epoch) and the checks that turn them into a
verdict (`Method.health_checks()`); the training loop logs the signals to MLflow with the epoch's metrics
(`epoch_signals`), `s2r train` writes the verdict into train.json (`assess`), and `s2r report` prints
COLLAPSED with the reason instead of the model's numbers.

Failure modes and the measures shared by every method:
- constant / single-class predictions: `class_usage` (classes predicted on at least `MIN_CLASS_SHARE` of the
  outputs, the majority share, classes present in the truth but never predicted);
- posterior collapse: `active_units` (latent dimensions whose mean KL to the prior exceeds `ACTIVE_KL` nats,
  Burda et al. 2016 use the variance of the posterior mean; the KL form is the issue's definition);
- a discriminator that wins or loses outright: `gan_balance` from the epoch means of D's scores on real and
  generated images (`train_d_real`, `train_d_fake`);
- NaN-free but frozen losses: `frozen_losses` over the epoch history (the loop already stops on NaN).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

PREFIX = "health_"
ACTIVE_KL = 0.01  # nats: a latent dimension is active when its mean KL to the prior exceeds this
MIN_CLASS_SHARE = 1e-3  # a class counts as predicted when it takes at least this share of the outputs
FROZEN_RTOL = 1e-6  # a loss is frozen when its epoch means vary by less than this (relative)
GAN_WIN_GAP = 0.9  # D's mean score on real minus on fake above this: D wins outright (labels 1 / 0)
GAN_LOSE_GAP = -0.25  # below this: D scores generated images above real ones (loses outright)

_OPS = {"<": operator.lt, ">": operator.gt, "<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Check:
    """Collapsed when `metrics[signal] op threshold` at the last epoch; `reason` is formatted with value/threshold."""

    signal: str  # key of the epoch metrics (health_* signals or train_* / val_* metrics)
    op: Literal["<", ">", "<=", ">="]
    threshold: float
    reason: str  # e.g. "posterior collapse: {value:g} active latent dims (< {threshold:g})"

    def failed(self, metrics: dict[str, Any]) -> str | None:
        v = metrics.get(self.signal)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return self.reason.format(value=v, threshold=self.threshold) if _OPS[self.op](v, self.threshold) else None


# -- measures shared by the methods ----------------------------------------------------------------------------
def kl_per_dim(mu: Any, logvar: Any) -> np.ndarray:
    """Mean over samples of KL(N(mu, exp(logvar)) || N(0, 1)) per latent dimension: (N, D, ...) -> (D,) nats."""
    mu = np.asarray(mu, np.float64)
    lv = np.asarray(logvar, np.float64)
    kl = 0.5 * (mu**2 + np.exp(lv) - lv - 1.0)
    per_dim: np.ndarray = kl.reshape(kl.shape[0], kl.shape[1], -1).mean(axis=(0, 2))  # (N, D, ...) -> (D,)
    return per_dim


def active_units(mu: Any, logvar: Any, threshold: float = ACTIVE_KL) -> dict[str, float]:
    """Posterior-collapse signals: latent dims with mean KL > threshold nats, and the total KL per sample."""
    kl = kl_per_dim(mu, logvar)
    return {"active_units": float((kl > threshold).sum()), "kl_total": float(kl.sum())}


def class_usage(pred: Any, num_classes: int, truth: Any = None, ignore_index: int | None = None) -> dict[str, float]:
    """Single-class signals of integer predictions (labels or pixels): classes used, majority share, missed."""
    p = np.asarray(pred).ravel().astype(np.int64)
    keep = np.ones(len(p), bool)
    t = None
    if truth is not None:
        t = np.asarray(truth).ravel().astype(np.int64)
        if ignore_index is not None:
            keep = t != ignore_index
        t = t[keep]
    p = p[keep]
    if len(p) == 0:
        return {}
    share = np.bincount(np.clip(p, 0, num_classes - 1), minlength=num_classes) / len(p)
    out = {"pred_classes": float((share >= MIN_CLASS_SHARE).sum()), "majority_share": float(share.max())}
    if t is not None:
        present = np.bincount(np.clip(t, 0, num_classes - 1), minlength=num_classes) > 0
        out["missed_classes"] = float((present & (share == 0)).sum())
    return out


def gan_balance(metrics: dict[str, Any]) -> dict[str, float]:
    """D's mean score on real minus on generated images over the epoch (from train_d_real / train_d_fake)."""
    r, f = metrics.get("train_d_real"), metrics.get("train_d_fake")
    if not isinstance(r, (int, float)) or not isinstance(f, (int, float)):
        return {}
    return {"d_gap": float(r) - float(f)}


GAN_CHECKS = (
    Check(PREFIX + "d_gap", ">", GAN_WIN_GAP, "discriminator wins outright (mean D(real) - D(fake) = {value:.3f})"),
    Check(PREFIX + "d_gap", "<", GAN_LOSE_GAP, "discriminator loses outright (mean D(real) - D(fake) = {value:.3f})"),
)


def single_class_check(what: str = "predictions") -> Check:
    """The shared check of classifiers and dense predictors: fewer than two classes ever predicted."""
    return Check(PREFIX + "pred_classes", "<", 2, "single-class " + what + " ({value:g} class predicted on val)")


# -- the loop's hook and the verdict ---------------------------------------------------------------------------
class Monitored(Protocol):
    """What the loop's health hook needs of a method (s2r.methods.base.Method; this layer cannot import it)."""

    training: bool

    def eval(self) -> object: ...

    def train(self, mode: bool = True) -> object: ...

    def health_signals(self) -> dict[str, float]: ...


def epoch_signals(method: Monitored, metrics: dict[str, Any]) -> dict[str, float]:
    """The method's declared health signals for this epoch (eval mode, no grad), prefixed `health_`."""
    import torch

    sig = dict(gan_balance(metrics))
    was = method.training
    method.eval()
    try:
        with torch.no_grad():
            sig |= method.health_signals()
    finally:
        method.train(was)
    return {PREFIX + k: float(v) for k, v in sig.items()}


def frozen_losses(history: Sequence[dict[str, Any]], rtol: float = FROZEN_RTOL) -> list[str]:
    """Training losses (train_*loss* keys, else every train_* key) whose epoch means never moved."""
    if len(history) < 2:
        return []
    keys = [k for k in history[-1] if k.startswith("train_") and all(k in h for h in history)]
    losses = [k for k in keys if "loss" in k] or keys
    frozen = []
    for k in losses:
        v = np.array([h[k] for h in history], np.float64)
        if np.isfinite(v).all() and np.ptp(v) <= rtol * max(float(np.abs(v).max()), 1e-12):
            frozen.append(k)
    return frozen if frozen and len(frozen) == len(losses) else []


def assess(history: Sequence[dict[str, Any]], checks: Sequence[Check]) -> dict[str, Any]:
    """Verdict of one training run: {"health": "ok" | "collapsed", "health_reasons": [...]} (final epoch)."""
    reasons: list[str] = []
    if history:
        last = history[-1]
        reasons = [r for c in checks if (r := c.failed(last)) is not None]
        frozen = frozen_losses(history)
        if frozen:
            reasons.append(f"frozen losses: {', '.join(frozen)} did not change over {len(history)} epochs")
    return {"health": "collapsed" if reasons else "ok", "health_reasons": reasons}


def evaluation_reasons(result: dict[str, Any]) -> list[str]:
    """Collapse visible in an evaluate.json itself: a confusion matrix with one predicted class (columns)."""
    cm = result.get("confusion_matrix")
    if not cm:
        return []
    cols = np.asarray(cm, np.float64).sum(0)
    if cols.sum() > 0 and (cols > 0).sum() < 2:
        names = result.get("classes") or []
        c = int(np.argmax(cols))
        name = names[c] if c < len(names) else str(c)
        return [f"single-class predictions on {result.get('domain', 'target')}/test (every pixel or image is "
                f"{name!r})"]
    return []


def reasons_for(train: dict[str, Any] | None, evaluate: dict[str, Any] | None) -> list[str]:
    """Every collapse reason of one model: the training verdict (train.json) and its evaluation (evaluate.json)."""
    out = list((train or {}).get("health_reasons") or [])
    out += [r for r in evaluation_reasons(evaluate or {}) if r not in out]
    return out
