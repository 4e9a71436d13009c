"""Method registry: a method's module name is its name everywhere (params.yaml, CLI, DVC, MLflow)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from s2r.config import ConfigError

# name -> module path. Adding a method = one module (with `Config` and `Method`) + one line + a params block.
METHODS: dict[str, str] = {
    "mixing": "s2r.methods.mixing",
}


def names() -> list[str]:
    return sorted(METHODS)


def module(name: str) -> ModuleType:
    """Import the method's module, failing with the known names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {names()}")
    return importlib.import_module(METHODS[name])


def config_class(name: str, where: str = "params.yaml") -> type[Any]:
    if name not in METHODS:
        raise ConfigError(f"{where}: key 'methods.{name}': unknown method; known: {names()}")
    return module(name).Config  # type: ignore[no-any-return]


def method_class(name: str) -> type[Any]:
    return module(name).Method  # type: ignore[no-any-return]
