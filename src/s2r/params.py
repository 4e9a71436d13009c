"""params.yaml -> typed `Params`: the fixed sections (s2r.config) and each method's block typed by its registered
Config (s2r.methods.registry). Strict: an unknown, missing, mistyped or duplicated key is an error naming the key
and the file (and the line, for a duplicate); the file is the only place a value lives.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from s2r.config import ConfigError, Params, from_dict, load_yaml, set_dotted
from s2r.methods import registry


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml strictly; `overrides` ({"methods.mixing.lr": 0.01}) apply to existing keys only."""
    path = Path(path)
    raw = load_yaml(path) or {}
    for k, v in (overrides or {}).items():
        set_dotted(raw, k, v, where=f"{path} (override)")
    return parse_params(raw, str(path))


def parse_params(raw: dict[str, Any], where: str) -> Params:
    """Validate a params dict: the fixed sections and each method section against its method's Config."""
    params = from_dict(Params, raw, where, strict=True)
    methods: dict[str, Any] = {}
    for name, section in params.methods.items():
        cfg_cls = registry.config_class(name, where)
        methods[name] = from_dict(cfg_cls, section, where, f"methods.{name}", strict=True)
    params.methods = methods
    for sname, study in params.studies.items():
        if study.method not in methods:
            raise ConfigError(f"{where}: key 'studies.{sname}.method': unknown method {study.method!r}")
        for key in study.search_space:
            try:
                set_dotted(copy.deepcopy(raw), key, None)
            except ConfigError:
                raise ConfigError(
                    f"{where}: key 'studies.{sname}.search_space.{key}': no such key in params (use full "
                    f"dotted keys, e.g. methods.{study.method}.lr)"
                ) from None
    return params
