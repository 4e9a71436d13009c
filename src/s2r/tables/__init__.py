"""Results tables in the format of the papers' tables, one module per method (`s2r tables <method>`).

Shared here: the mean ± std cell format and the markdown writer, so every table reads the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fmt_percent(values: list[float]) -> str:
    """Fractions -> "mean ± std%" over seeds (population std, as numpy's default)."""
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}%"


def markdown(df: Any, title: str) -> str:
    """A titled markdown table of a DataFrame (numeric mean/std columns left out: the formatted cell says it)."""
    cols = [c for c in df.columns if c not in ("mean", "std", "real_fraction")]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in df.to_dict("records")]
    return "\n".join(lines) + "\n"
