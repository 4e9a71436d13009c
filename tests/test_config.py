"""params.yaml is loaded strictly: unknown, missing and mistyped keys are errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params_dict
from s2r.config import ConfigError, flatten, load_yaml
from s2r.params import load_params


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repo_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.methods["mixing"].real_fraction == pytest.approx(0.125)
    assert "mixing_ratio" in params.studies
    assert params.studies["mixing_ratio"].search_space["methods.mixing.real_fraction"].choices[-1] == 1.0


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


# -- one source of values: params.yaml (strict loading, duplicate keys, defaults equal to the file) ----------------


def test_missing_key_is_an_error_even_with_a_dataclass_default(tmp_path: Path) -> None:
    raw = tiny_params_dict()
    del raw["methods"]["cut"]["lr"]  # cut.Config has a default for lr: the file must still give it
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"missing key 'methods.cut.lr'") as e:
        load_params(path)
    assert str(path) in str(e.value)
    raw = tiny_params_dict()
    del raw["train"]["amp"]
    with pytest.raises(ConfigError, match=r"missing key 'train.amp'"):
        load_params(_write(tmp_path, raw))


def test_a_whole_section_may_be_left_out(tmp_path: Path) -> None:
    """Recipes leave out the embedded benchmarks and the tables: a section, not a setting, may be absent."""
    raw = tiny_params_dict()
    raw["benchmarks"] = {}
    del raw["reports"], raw["studies"]
    params = load_params(_write(tmp_path, raw))
    assert params.benchmarks.digits.image_size == 32 and params.studies == {}


def test_duplicate_key_is_refused_naming_key_and_line(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text()
    i = text.index("    batch_size: 128")  # methods.mixing
    path = tmp_path / "params.yaml"
    path.write_text(text[:i] + "    batch_size: 64\n" + text[i:])
    line = text[:i].count("\n") + 2  # the second batch_size
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key 'batch_size' at line {line} "
                                          rf"\(first at line {line - 1}\)"):
        load_params(path)


def test_merge_keys_may_be_overridden_not_repeated(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nvariant: {<<: *b, y: 3}\n")
    assert load_yaml(path) == {"base": {"x": 1, "y": 2}, "variant": {"x": 1, "y": 3}}
    path.write_text("variant: {<<: {x: 1}, y: 3, y: 4}\n")
    with pytest.raises(ConfigError, match="duplicate key 'y' at line 1"):
        load_yaml(path)


def _dataclass_defaults(cls: type, block: dict, prefix: str) -> list[str]:
    """Fields whose dataclass default differs from the params block (nested sections recursively)."""
    import dataclasses
    from typing import get_type_hints

    hints, out = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(hints[f.name]):
            out += _dataclass_defaults(hints[f.name], block.get(f.name, {}), key)
        elif f.metadata.get("section"):
            continue
        elif f.name not in block:
            out.append(f"{key}: not in params.yaml")
        elif default != _typed(hints[f.name], block[f.name]):
            out.append(f"{key}: dataclass {default!r} != params.yaml {block[f.name]!r}")
    return out


def _typed(tp: object, value: object) -> object:
    return float(value) if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool) else value


def test_config_defaults_equal_params_yaml() -> None:
    """Dataclass defaults are a convenience for code and tests; params.yaml holds the values. Each method's base
    block (the block named as the method, else its first block) and every fixed section must agree with them."""
    from s2r.config import Params
    from s2r.methods import registry

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = _dataclass_defaults(Params, {k: v for k, v in raw.items() if k != "methods"}, "")
    for name, entry in registry.entries().items():
        blocks = [b for b in raw["methods"] if registry.entry(b) is entry]
        assert blocks, f"method {name} has no params.yaml block"
        base = name if name in blocks else blocks[0]
        bad += _dataclass_defaults(entry.config, raw["methods"][base], f"methods.{base}")
    assert bad == []


def test_the_defaults_check_sees_a_disagreement() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Toy:
        lr: float = 1e-3
        widths: list[int] = dataclasses.field(default_factory=lambda: [8, 16])

    assert _dataclass_defaults(Toy, {"lr": "1e-3", "widths": [8, 16]}, "m") == []
    assert _dataclass_defaults(Toy, {"lr": 1e-4, "widths": [8, 16]}, "m") == [
        "m.lr: dataclass 0.001 != params.yaml 0.0001"]
    assert _dataclass_defaults(Toy, {"lr": 1e-3}, "m") == ["m.widths: not in params.yaml"]
