"""Results tables in the format of the papers' tables, one module per method (`s2r tables <method>`).

Shared here: the mean ± std cell format, the markdown writer and `TablesRun`, the run-collect-format loop every
table shares, so every table reads and is logged the same.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import Params
from s2r.files import JsonDict, write_json


def fmt_percent(values: list[float]) -> str:
    """Fractions -> "mean ± std%" over seeds (population std, as numpy's default)."""
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}%"


def markdown(df: Any, title: str) -> str:
    """A titled markdown table of a DataFrame (numeric mean/std columns left out: the formatted cell says it)."""
    cols = [c for c in df.columns if c not in ("mean", "std", "real_fraction")]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in df.to_dict("records")]
    return "\n".join(lines) + "\n"


def metric_key(k: str) -> str:
    """An MLflow-safe metric name (letters, digits, _ - . / are allowed; ':' '+' '=' and Greek letters are not)."""
    for a, b in (("+", "plus"), (":", "to"), (" ", "_"), ("β", "beta"), ("γ", "gamma"), ("=", "")):
        k = k.replace(a, b)
    return k


class TablesRun:
    """One `s2r tables <method>`, written once for every paper: the `tables@<method>` MLflow run (in the paper's
    experiment) that each trained model's run nests under, a scratch folder per model, and the files written to
    `out`, logged as the run's `tables` artifacts by `finish`.

    The loop every table shares: `with TablesRun(...) as t:` -> train one model per cell (`t.workdir()`,
    `t.run_id` as the parent) -> collect the rows -> `t.table(...)` / `t.figure(...)` -> `t.finish(metrics)`.
    """

    def __init__(self, method: str, out: Path, params: Params, logged: JsonDict) -> None:
        self.method, self.out, self.params, self.logged = method, Path(out), params, logged
        self.files: list[str] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TablesRun:
        from s2r.methods import registry
        from s2r.tracking import TrackedRun

        self.out.mkdir(parents=True, exist_ok=True)
        self.run = self._stack.enter_context(TrackedRun(
            f"tables@{self.method}", experiment=registry.experiment(self.params.tracking.experiment, self.method),
            section="test", params=self.logged, tags={"stage": "tables", "method": self.method}))
        self.tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory()))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def workdir(self) -> Path:
        """A fresh scratch folder for one trained model (removed with the run's temporary directory)."""
        return Path(tempfile.mkdtemp(dir=self.tmp))

    def csv(self, df: Any, name: str) -> None:
        df.to_csv(self.out / name, index=False)
        self.files.append(name)

    def text(self, name: str, text: str) -> None:
        (self.out / name).write_text(text)
        self.files.append(name)

    def json(self, name: str, data: Any) -> None:
        write_json(self.out / name, data)
        self.files.append(name)

    def table(self, df: Any, stem: str, title: str, shown: Any = None) -> None:
        """`<stem>.md` (a titled markdown table of `shown`, default `df`) and `<stem>.csv` (all of `df`)."""
        self.text(f"{stem}.md", markdown(df if shown is None else shown, title))
        self.csv(df, f"{stem}.csv")

    def figure(self, fig: Any, name: str) -> None:
        """Saved to `out` and logged on the run as `tables/<name>` (not an artifact of `finish`)."""
        import matplotlib.pyplot as plt

        fig.savefig(self.out / name, bbox_inches="tight")
        self.run.log_figure(fig, f"tables/{name}")
        plt.close(fig)

    def finish(self, metrics: JsonDict) -> None:
        """metrics.json, its finite numbers as MLflow metrics, and every file written as a `tables` artifact."""
        self.json("metrics.json", metrics)
        numbers = {metric_key(k): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and np.isfinite(v)}
        self.run.log_metrics(numbers, step=0)
        for name in self.files:
            self.run.log_artifact(self.out / name, "tables")
