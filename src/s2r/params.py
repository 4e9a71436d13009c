"""params.yaml -> typed `Params`: the fixed sections (s2r.config) and each method's block typed by its registered
Config (s2r.methods.registry). Strict: an unknown, missing, mistyped or duplicated key is an error naming the key
and the file (and the line, for a duplicate); the file is the only place a value lives.

A variant block names the block it starts from and writes only what differs:

    methods:
      mixing: {...every key...}
      mixing_realonly:
        base: mixing          # every key of methods.mixing ...
        real_fraction: 1.0    # ... but this one

s2r resolves it (a deep merge: mappings merge key by key, lists and scalars replace) instead of YAML anchors and
merge keys, because DVC's `dvc exp run -S` rewrites params.yaml and would expand those into copies, after which an
edit of `methods.mixing.batch_size` would no longer reach `mixing_realonly`. A DVC stage of a variant lists every
block of its chain (`chain`) as params, so that edit re-runs it (tests/test_import_graph.py checks every dvc.yaml).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from s2r.config import ConfigError, Params, from_dict, load_yaml, set_dotted
from s2r.methods import registry

BASE = "base"  # the key of a variant block naming the block it starts from


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read params.yaml strictly; `overrides` ({"methods.mixing.lr": 0.01}) apply to existing keys only."""
    path = Path(path)
    raw = load_yaml(path) or {}
    apply_overrides(raw, overrides or {}, f"{path} (override)")
    return parse_params(raw, str(path))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """Set dotted keys in a raw params dict as an edit of the file would: a key of a base block reaches its variants;
    a key a variant inherits is written into the variant (it then differs from its base there)."""
    for key, value in overrides.items():
        try:
            set_dotted(raw, key, value, where)
            continue
        except ConfigError:
            parts = key.split(".")
            if len(parts) < 3 or parts[0] != "methods" or not isinstance(raw.get("methods"), dict):
                raise
        block = raw["methods"].get(parts[1])
        if not isinstance(block, dict) or BASE not in block:
            raise ConfigError(f"{where}: key {key!r} does not exist") from None
        resolved = resolve_methods(raw["methods"], where)[parts[1]]
        set_dotted({"methods": {parts[1]: resolved}}, key, value, where)  # the variant has it through its base
        node = block
        for p in parts[2:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value


def chain(methods: dict[str, Any], name: str, where: str = "params.yaml") -> list[str]:
    """`name` and the blocks it is based on, nearest first (`[mixing_realonly, mixing]`); cycles and unknown bases
    are errors naming the key."""
    out = [name]
    while True:
        block = methods.get(out[-1])
        if not isinstance(block, dict) or BASE not in block:
            return out
        base = block[BASE]
        key = f"methods.{out[-1]}.{BASE}"
        if not isinstance(base, str) or base not in methods:
            raise ConfigError(f"{where}: key {key!r}: {base!r} is not a block under methods "
                              f"(known: {sorted(methods)})")
        if base in out:
            raise ConfigError(f"{where}: key {key!r}: a cycle of bases {' -> '.join([*out, base])}")
        out.append(base)


def resolve_methods(methods: dict[str, Any], where: str = "params.yaml") -> dict[str, Any]:
    """Every method block with its `base` chain merged in (the raw dict is left as it is)."""
    out = {}
    for name, block in methods.items():
        if not isinstance(block, dict):
            out[name] = copy.deepcopy(block)  # from_dict names the key that is not a mapping
            continue
        merged: dict[str, Any] = {}
        for link in reversed(chain(methods, name, where)):
            merged = _deep_merge(merged, {k: v for k, v in methods[link].items() if k != BASE})
        out[name] = merged
    return out


def _deep_merge(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`own` over `base`: mappings merge key by key, anything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for k, v in own.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def parse_params(raw: dict[str, Any], where: str) -> Params:
    """Validate a params dict: the fixed sections and each method section against its method's Config."""
    raw_methods = raw.get("methods")
    resolved = dict(raw)
    if isinstance(raw_methods, dict):
        resolved["methods"] = resolve_methods(raw_methods, where)
        for name in raw_methods:
            _check_same_method(raw_methods, name, where)
    params = from_dict(Params, resolved, where)
    methods: dict[str, Any] = {}
    for name, section in params.methods.items():
        cfg_cls = registry.config_class(name, where)
        methods[name] = from_dict(cfg_cls, section, where, f"methods.{name}")
    params.methods = methods
    params.source = where
    for sname, study in params.studies.items():
        if study.method not in methods:
            raise ConfigError(f"{where}: key 'studies.{sname}.method': unknown method {study.method!r}")
        for key in study.search_space:
            try:
                set_dotted(copy.deepcopy(resolved), key, None)
            except ConfigError:
                raise ConfigError(
                    f"{where}: key 'studies.{sname}.search_space.{key}': no such key in params (use full "
                    f"dotted keys, e.g. methods.{study.method}.lr)"
                ) from None
    return params


def _check_same_method(methods: dict[str, Any], name: str, where: str) -> None:
    """A variant's base is a block of the same method (its Config types the merged keys)."""
    links = chain(methods, name, where)
    if len(links) > 1 and registry.entry(links[1], where).module != registry.entry(name, where).module:
        raise ConfigError(f"{where}: key 'methods.{name}.{BASE}': block {links[1]!r} is method "
                          f"{registry.entry(links[1], where).name!r}, not {registry.entry(name, where).name!r}")
