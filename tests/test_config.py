"""params.yaml is loaded strictly: unknown, missing and mistyped keys are errors naming key and file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_PARAMS, tiny_params_dict
from s2r.config import ConfigError, Schema, flatten, from_dict, load_yaml, need
from s2r.params import load_params


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repo_params_load() -> None:
    """The project's params.yaml and every recipe's load strictly. No value is asserted: a user's `dvc exp run -S`
    may change any of them (the suite's own values are tests/params.yaml)."""
    from s2r.methods import registry

    for path in [REPO / "params.yaml", *sorted((REPO / "pipelines" / "recipes").glob("*/params.yaml"))]:
        params = load_params(path)
        for name, cfg in params.methods.items():
            assert isinstance(cfg, registry.config_class(name)), (path, name)
    studies = load_params(REPO / "params.yaml").studies
    assert "methods.mixing.real_fraction" in studies["mixing_ratio"].search_space


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["methods"]["mixing"].update(real_fracton=0.5), "methods.mixing.real_fracton"),
        (lambda r: r["train"].update(devise="cpu"), "train.devise"),
        (lambda r: r.update(extra=1), "extra"),
        (lambda r: r["methods"]["mixing"].update(lr="fast"), "methods.mixing.lr"),
        (lambda r: r["methods"]["mixing"].update(epochs=2.5), "methods.mixing.epochs"),
        (lambda r: r["train"].update(amp="yes"), "train.amp"),
        (lambda r: r["train"].update(device="tpu"), "train.device"),
        (lambda r: r["methods"]["mixing"].update(widths=[16, "x"]), "methods.mixing.widths[1]"),
        (lambda r: r.pop("seed"), "seed"),
        (lambda r: r["methods"]["mixing"].update(real_fraction=1.5), "real_fraction"),
        (lambda r: r["methods"].update(nosuch={}), "methods.nosuch"),
        (lambda r: r["benchmarks"]["digits"].update(real_split={"train": 0.5, "test": 0.5}), "real_split"),
        (
            lambda r: r["studies"]["mixing_ratio"]["search_space"].update(
                {"methods.mixing.nope": {"type": "int", "low": 1, "high": 2}}
            ),
            "methods.mixing.nope",
        ),
        (lambda r: r["studies"]["mixing_ratio"].update(sampler="bayes"), "studies.mixing_ratio.sampler"),
        (
            lambda r: r["studies"]["mixing_ratio"]["search_space"]["methods.mixing.augment"].pop("choices"),
            "choices",
        ),
    ],
)
def test_bad_key_named(tmp_path: Path, mutate, expected: str) -> None:
    raw = tiny_params_dict()
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert expected in str(e.value)
    assert str(path) in str(e.value)


def test_overrides_apply_and_reject_new_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, tiny_params_dict())
    assert load_params(path, {"methods.mixing.real_fraction": 1.0}).methods["mixing"].real_fraction == 1.0
    with pytest.raises(ConfigError, match="methods.mixing.bogus"):
        load_params(path, {"methods.mixing.bogus": 1})


def test_float_accepts_ints_and_yaml_exponents(tmp_path: Path) -> None:
    raw = tiny_params_dict()
    raw["methods"]["mixing"]["lr"] = 1
    raw["methods"]["mixing"]["weight_decay"] = "1e-4"  # YAML 1.1 reads 1e-4 as a string
    params = load_params(_write(tmp_path, raw))
    assert params.methods["mixing"].lr == 1.0 and params.methods["mixing"].weight_decay == pytest.approx(1e-4)


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


# -- one source of values: params.yaml (strict loading, duplicate keys, no values in the schema) --------------------


def test_missing_key_is_an_error(tmp_path: Path) -> None:
    raw = tiny_params_dict()
    del raw["methods"]["cut"]["lr"]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"missing key 'methods.cut.lr'") as e:
        load_params(path)
    assert str(path) in str(e.value)
    raw = tiny_params_dict()
    del raw["train"]["amp"]
    with pytest.raises(ConfigError, match=r"missing key 'train.amp'"):
        load_params(_write(tmp_path, raw))


def test_a_whole_section_may_be_left_out(tmp_path: Path) -> None:
    """Recipes leave out the embedded benchmarks and the tables: a section, not a setting, may be absent; the
    command that needs it names it and the file."""
    from s2r import stages

    raw = tiny_params_dict()
    raw["benchmarks"] = {}
    del raw["reports"], raw["studies"]
    path = _write(tmp_path, raw)
    params = load_params(path)
    assert params.benchmarks.digits is None and params.studies == {} and params.reports.mixing_tables is None
    with pytest.raises(ConfigError, match=rf"{path}: missing section 'reports.mixing_tables'"):
        need(params.reports.mixing_tables, "reports.mixing_tables", params.source)
    with pytest.raises(ConfigError, match=rf"{path}: missing section 'benchmarks.digits'"):
        stages.generate("digits", tmp_path / "out", params)


def test_duplicate_key_is_refused_naming_key_and_line(tmp_path: Path) -> None:
    text = TEST_PARAMS.read_text()
    i = text.index("    batch_size: ")  # the first method block's (methods.mixing)
    path = tmp_path / "params.yaml"
    path.write_text(text[:i] + "    batch_size: 64\n" + text[i:])
    line = text[:i].count("\n") + 2  # the second batch_size
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key 'batch_size' at line {line} "
                                          rf"\(first at line {line - 1}\)"):
        load_params(path)


def test_anchors_and_merge_keys_are_refused(tmp_path: Path) -> None:
    """DVC's `dvc exp run -S` rewrite expands them into copies; a variant says `base: <block>` instead."""
    path = tmp_path / "a.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nvariant: {<<: *b, y: 3}\n")
    with pytest.raises(ConfigError, match=r"a.yaml: line 1: YAML anchor/alias 'b'.*base: <block>"):
        load_yaml(path)
    path.write_text("a: {x: 1}\nvariant:\n  <<: {x: 1}\n  y: 3\n")
    with pytest.raises(ConfigError, match=r"line 3: YAML merge key '<<'.*base: <block>"):
        load_yaml(path)
    path.write_text("variant: {y: 3, y: 4}\n")
    with pytest.raises(ConfigError, match="duplicate key 'y' at line 1"):
        load_yaml(path)


def _defaults(cls: type, prefix: str) -> list[str]:
    """Fields of a schema dataclass (nested sections recursively) that carry a value of their own."""
    import types
    from typing import get_args, get_origin, get_type_hints

    hints, out = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        optional = get_args(hints[f.name]) if get_origin(hints[f.name]) is types.UnionType else ()
        inner = [a for a in (hints[f.name], *optional) if dataclasses.is_dataclass(a)]
        if inner:
            out += _defaults(inner[0], key)
        if f.metadata.get("section") or f.metadata.get("internal"):
            continue  # a section left out is None / empty: no value
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            out.append(key)
    return out


def test_the_schema_holds_no_values() -> None:
    """params.yaml is the one home of every value: the fixed sections and every method's Config declare types,
    docs and validation, never a default that could disagree with the file. (A study declaration, `studies.<name>`,
    is a format whose sampler / pruner options are read only where used: StudySpec requires them exactly there.)"""
    from s2r.config import Params
    from s2r.methods import registry

    found = _defaults(Params, "")
    for name, entry in registry.entries().items():
        found += _defaults(entry.config, f"methods.{name}")
    assert found == []


@dataclasses.dataclass
class _Inner(Schema):
    lr: float = 1e-3

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("key 'lr' must be > 0")


@dataclasses.dataclass
class _Toy(Schema):
    inner: _Inner
    widths: list[int] = dataclasses.field(default_factory=lambda: [8, 16])
    section: _Inner | None = dataclasses.field(default=None, metadata={"section": True})


def test_the_no_values_check_sees_a_default() -> None:
    assert _defaults(_Toy, "m") == ["m.inner.lr", "m.widths", "m.section.lr"]


def test_every_schema_is_validated_and_a_plain_dataclass_is_refused() -> None:
    """from_dict calls Schema.validate on every section it builds (no probing for the hook); a dataclass that is not
    a Schema is a programming error named at the first load."""
    with pytest.raises(ConfigError, match=r"f.yaml: in 'inner': key 'lr' must be > 0"):
        from_dict(_Toy, {"inner": {"lr": -1.0}}, "f.yaml")

    @dataclasses.dataclass
    class Plain:
        x: int

    with pytest.raises(TypeError, match="Schema"):
        from_dict(Plain, {"x": 1}, "f.yaml")  # type: ignore[type-var]
