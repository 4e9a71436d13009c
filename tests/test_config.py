"""params.yaml is loaded strictly: unknown, missing and mistyped keys are errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params_dict
from s2r.config import ConfigError, flatten
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
