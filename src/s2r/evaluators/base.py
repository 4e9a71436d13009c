"""The one interface every evaluator implements, and the lookup by name that `s2r evaluate` and `s2r report` use.

Evaluators belong to the task, not the method: a method names its evaluator (`Method.evaluator`, a module of
s2r.evaluators), and that module registers one `Evaluator` instance. The type parameter `M` is what the evaluator
needs from the method: `Method[object]` for the task-level evaluators (anything with the capability), a
method's own class where the scoring is that method's protocol (paper 3's disentanglement study, paper 5's
last-K segmentation).
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from s2r.config import Params
from s2r.data.benchmark import DataError
from s2r.files import JsonDict
from s2r.methods.base import Method
from s2r.tracking import TrackedRun

M = TypeVar("M", bound="Method[Any]", contravariant=True)
E = TypeVar("E", bound="Evaluator[Any]")


class Evaluator(ABC, Generic[M]):
    """Scores a trained method on its benchmark's target test split; logs metrics and plots to the run."""

    capability: ClassVar[str] = ""  # what the method must provide (encode | translate | predict; "" = nothing)
    report_columns: ClassVar[tuple[str, ...]] = ()  # the headline numbers, in the order `s2r report` prints them

    def __call__(self, method: M, run: TrackedRun, plots_out: Path | None, params: Params) -> JsonDict:
        """Check the capability, then evaluate: the metrics become evaluate.json."""
        if self.capability and self.capability not in method.capabilities:
            raise DataError(f"method {method.name!r} has no {self.capability!r} capability for evaluator "
                            f"{type(self).__module__}")
        if plots_out:
            Path(plots_out).mkdir(parents=True, exist_ok=True)
        return self.evaluate(method, run, plots_out, params)

    @abstractmethod
    def evaluate(self, method: M, run: TrackedRun, plots_out: Path | None, params: Params) -> JsonDict:
        """The metrics of `method` (a JSON object) after logging them and the plots to `run`."""


# Registered evaluators of any method type: looked up by the name a method declares (a string edge).
_EVALUATORS: dict[str, Evaluator[Any]] = {}


def register(evaluator: E) -> E:
    """Register a module's evaluator under the module's name (= `Method.evaluator`); returns it."""
    _EVALUATORS[type(evaluator).__module__.rsplit(".", 1)[-1]] = evaluator
    return evaluator


def exists(name: str) -> bool:
    """Whether `name` is a module of s2r.evaluators (checked when a method registers)."""
    return bool(name) and importlib.util.find_spec(f"s2r.evaluators.{name}") is not None


def evaluator(name: str) -> Evaluator[Any]:
    """The evaluator module `name` registers (importing it)."""
    if not exists(name):
        raise DataError(f"no evaluator {name!r} (a module of s2r.evaluators)")
    importlib.import_module(f"s2r.evaluators.{name}")
    if name not in _EVALUATORS:
        raise DataError(f"s2r.evaluators.{name} registers no Evaluator (`EVALUATOR = register(...)`)")
    return _EVALUATORS[name]
