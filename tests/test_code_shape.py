"""The shape of the code the team agreed on, checked so it stays: functions that fit a screen, hooks declared on
the Method base class (never probed with hasattr/getattr), every method's evaluator a registered Evaluator."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from s2r.evaluators import base as evaluators
from s2r.methods import registry
from s2r.methods.base import Method

SRC = Path(__file__).resolve().parents[1] / "src" / "s2r"
MAX_LINES = 60


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(SRC.rglob("*.py"))]


def test_no_function_over_60_lines() -> None:
    long = [f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p, tree in _trees() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno is not None
            and n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert long == [], "split these into named steps"


def hook_probes(tree: ast.Module) -> list[tuple[int, str]]:
    """hasattr(x, "hook") / getattr(x, "hook", default) calls naming a member of the Method base class."""
    members = {m for m in dir(Method) if not m.startswith("__")}
    found = []
    for n in ast.walk(tree):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
                and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and n.args[1].value in members
                and (n.func.id == "hasattr" or len(n.args) == 3)):
            found.append((n.lineno, ast.unparse(n)))
    return found


def test_no_hook_is_probed_with_hasattr() -> None:
    probes = [f"{p.relative_to(SRC)}:{line} {call}" for p, tree in _trees() for line, call in hook_probes(tree)]
    assert probes == [], "declare the hook on s2r.methods.base.Method with its default and call it"


def test_the_probe_check_catches_a_probe() -> None:
    tree = ast.parse('if hasattr(method, "init_from"):\n    tags = getattr(method, "directions", ("a2b",))\n')
    assert [line for line, _ in hook_probes(tree)] == [1, 2]


@pytest.mark.parametrize("name", sorted(registry.entries()))
def test_every_evaluator_a_method_names_is_registered(name: str) -> None:
    entry = registry.entry(name)
    if entry.evaluator:
        ev = evaluators.evaluator(entry.evaluator)
        assert isinstance(ev, evaluators.Evaluator) and ev.report_columns
        assert not ev.capability or ev.capability in entry.capabilities
