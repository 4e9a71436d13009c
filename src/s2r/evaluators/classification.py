"""Classification metrics on the target domain: accuracy, per-class accuracy, confusion matrix (+ plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params
from s2r.evaluators.base import Evaluator, register
from s2r.files import JsonDict
from s2r.methods.base import Method
from s2r.tracking import TrackedRun


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class accuracy (recall) and the confusion matrix."""
    cm = confusion_matrix(y_true, y_pred, len(classes))
    support = cm.sum(1)
    per_class = np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "balanced_accuracy": float(np.nanmean(per_class)),
        # None (JSON null) for a class absent from the test split: not computable, and NaN is not valid JSON
        "per_class_accuracy": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, per_class)},
        "confusion_matrix": cm.tolist(),
        "n": int(cm.sum()),
    }


def plot_confusion(cm: np.ndarray, classes: list[str], title: str) -> Any:
    """A row-normalised confusion matrix figure with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k), dpi=120)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig


def write_confusion_csv(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> None:
    """One row per prediction (actual, predicted): the layout of DVC's confusion-matrix plot template."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"actual": [classes[i] for i in y_true], "predicted": [classes[i] for i in y_pred]}).to_csv(
        path, index=False
    )


class Classification(Evaluator[Method[object]]):
    """The evaluate stage for classifiers (`predict` -> class scores) on the target domain's test split."""

    capability = "predict"
    report_columns = ('accuracy', 'balanced_accuracy')

    def evaluate(self, method: Method[object], run: TrackedRun, plots_out: Path | None, params: Params) -> JsonDict:
        import matplotlib.pyplot as plt

        from s2r.data.benchmark import DataError
        from s2r.figures import sample_grid

        data = method.data
        test = data.get(data.spec.target, "test")
        probs = method.predict(test.images)
        if isinstance(probs, dict):
            raise DataError(f"method {method.name!r} predicts {sorted(probs)} maps, not class scores (N, K)")
        pred = probs.argmax(1)
        m = classification_metrics(test.labels, pred, data.spec.classes)
        flat = {f"test_{k}": v for k, v in m.items() if isinstance(v, float)}
        flat |= {f"test_accuracy_class_{c}": v for c, v in m["per_class_accuracy"].items() if v is not None}
        run.log_metrics(flat, step=0)
        fig = plot_confusion(np.asarray(m["confusion_matrix"]), data.spec.classes,
                             f"{method.name} on {data.spec.target}/test: accuracy {m['accuracy']:.3f}")
        if plots_out:
            fig.savefig(Path(plots_out) / "confusion.png")
            write_confusion_csv(Path(plots_out) / "confusion.csv", test.labels, pred, data.spec.classes)
        run.log_figure(fig, "plots/confusion.png")
        plt.close(fig)
        wrong = np.flatnonzero(pred != test.labels)[:32]
        if len(wrong):
            cls = data.spec.classes
            g = sample_grid(test.images[wrong], [f"{cls[test.labels[i]]}->{cls[pred[i]]}" for i in wrong],
                            title="misclassified (true->pred)")
            run.log_figure(g, "samples/misclassified.png")
            plt.close(g)
        return m


EVALUATOR = register(Classification())
