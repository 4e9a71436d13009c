"""`s2r report`: a results table per evaluator over every evaluate.json, COLLAPSED models marked (s2r.health),
then the paper verdicts (s2r.verdicts).

Kept apart from s2r.stages on purpose: the DVC train / evaluate stages list the code they run as deps
(`s2r dvc-deps`), so a change to a verdict's wording must not sit in a module they import.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2r import health
from s2r.config import VerdictsParams
from s2r.files import write_json


def report_columns(evaluator: str) -> list[str] | None:
    """The headline numbers an evaluator declares (`Evaluator.report_columns`), None if it declares none."""
    from s2r.evaluators import base as evaluators

    if not evaluators.exists(evaluator):
        return None
    return list(evaluators.evaluator(evaluator).report_columns) or None


def report(metrics_dir: Path, rule: VerdictsParams, verdicts_out: Path | None = None,
           readme: Path | None = None, compare: Path | None = None) -> str:
    """A results table per evaluator of every evaluate.json under metrics_dir, then the paper verdicts.

    A model whose training verdict (train.json, s2r.health) or evaluation shows a collapse is printed as
    COLLAPSED with the reason instead of its numbers. `verdicts_out`: the verdicts as a metrics JSON;
    `readme`: rewrite its generated results block (s2r.verdicts); `rule`: params.reports.verdicts (level, power);
    `compare`: another run's verdicts JSON, whose differing verdicts are listed at the end.
    """
    from s2r import verdicts

    groups: dict[tuple[str, ...], list[str]] = {}
    for p in sorted(Path(metrics_dir).rglob("evaluate.json")):
        m = json.loads(p.read_text())
        cols = report_columns(m.get("evaluator", "classification" if "balanced_accuracy" in m else ""))
        if cols is None:  # an evaluator without declared columns: its first top-level numbers
            cols = [k for k, v in m.items() if isinstance(v, float)][:5]
        train_path = p.parent / "train.json"
        reasons = health.reasons_for(json.loads(train_path.read_text()) if train_path.is_file() else None, m)
        name = str(p.parent.relative_to(metrics_dir))
        if reasons:
            row = f"{name:<20} {str(m.get('domain', '?')):<12} COLLAPSED: " + "; ".join(reasons)
        else:
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "n/a" for k in cols]
            row = f"{name:<20} {str(m.get('domain', '?')):<12} " + " ".join(f"{c:>14}" for c in cells)
        groups.setdefault(tuple(cols), []).append(row)
    if not groups:
        return f"no results yet under {metrics_dir} (run `dvc repro`)"
    lines: list[str] = []
    for columns, rows in groups.items():
        head = f"{'method':<20} {'target':<12} " + " ".join(f"{c[:14]:>14}" for c in columns)
        lines += ([""] if lines else []) + [head, "-" * len(head), *rows]
    rows_v = verdicts.verdicts(Path(metrics_dir), level=rule.level, power=rule.power)
    lines += ["", f"Paper verdicts (mean ± sample std over independent seeds; Welch's t-test, {100 * rule.level:g} % "
              "interval of the difference; s2r.verdicts)", verdicts.text(rows_v)]
    if compare:
        diff = verdicts.differences(rows_v, json.loads(Path(compare).read_text()))
        lines += ["", f"Verdicts that differ from {compare}: " + (f"{len(diff)}" if diff else "none"), *diff]
    if verdicts_out:
        write_json(Path(verdicts_out), verdicts.metrics_json(rows_v))
    if readme:
        verdicts.rewrite_readme(Path(readme), verdicts.markdown(rows_v))
    return "\n".join(lines)
