"""The params files' layout: `base:` variants resolved by s2r, files that DVC's own rewrite (`dvc exp run -S`) leaves
as written apart from the value it sets, and the suite's own params (tests/params.yaml) mirroring params.yaml."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TEST_PARAMS, layout_differences, tiny_params_dict
from s2r.config import ConfigError, load_yaml
from s2r.params import chain, load_params, resolve_methods

PARAMS_FILES = [REPO / "params.yaml", TEST_PARAMS, *sorted((REPO / "pipelines" / "recipes").glob("*/params.yaml"))]


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def test_a_variant_is_its_base_deep_merged_with_its_own_keys() -> None:
    methods = {"a": {"x": 1, "lst": [1, 2], "d": {"p": 1, "q": 2}},
               "b": {"base": "a", "lst": [3], "d": {"q": 5}},
               "c": {"base": "b", "x": 7}}
    out = resolve_methods(methods)
    assert out["b"] == {"x": 1, "lst": [3], "d": {"p": 1, "q": 5}}  # lists replace, mappings merge
    assert out["c"] == {"x": 7, "lst": [3], "d": {"p": 1, "q": 5}}
    assert chain(methods, "c") == ["c", "b", "a"] and methods["b"] == {"base": "a", "lst": [3], "d": {"q": 5}}


@pytest.mark.parametrize(("blocks", "expected"), [
    ({"mixing_realonly": {"base": "mixng"}}, r"key 'methods.mixing_realonly.base': 'mixng' is not a block"),
    ({"mixing": {"base": "mixing_realonly"}, "mixing_realonly": {"base": "mixing"}},
     r"key 'methods.mixing_realonly.base': a cycle of bases mixing -> mixing_realonly -> mixing"),
    ({"mixing_realonly": {"base": "cut"}}, r"key 'methods.mixing_realonly.base': block 'cut' is method 'cut', "
                                           r"not 'mixing'"),
    ({"mixing_realonly": {"base": ["mixing"]}}, r"key 'methods.mixing_realonly.base': \['mixing'\] is not a block"),
])
def test_bad_bases_are_errors_naming_the_key_and_file(tmp_path: Path, blocks: dict, expected: str) -> None:
    raw = tiny_params_dict()
    for name, block in blocks.items():
        raw["methods"][name] = block
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=expected) as e:
        load_params(path)
    assert str(path) in str(e.value)


def test_an_unknown_key_in_a_variant_is_named(tmp_path: Path) -> None:
    raw = tiny_params_dict()
    raw["methods"]["mixing_realonly"]["real_fracton"] = 0.5
    with pytest.raises(ConfigError, match=r"unknown key 'methods.mixing_realonly.real_fracton'"):
        load_params(_write(tmp_path, raw))


def test_overrides_act_as_edits_of_the_file(tmp_path: Path) -> None:
    """A base key reaches its variants (as editing params.yaml would); a key a variant inherits is set on the variant
    alone; a key that exists nowhere is refused."""
    path = _write(tmp_path, tiny_params_dict())
    p = load_params(path, {"methods.mixing.batch_size": 5})
    assert p.methods["mixing"].batch_size == 5 and p.methods["mixing_realonly"].batch_size == 5
    p = load_params(path, {"methods.mixing_realonly.batch_size": 6})
    assert p.methods["mixing_realonly"].batch_size == 6 and p.methods["mixing"].batch_size != 6
    assert p.methods["mixing_realonly"].real_fraction == 1.0  # its own key kept
    with pytest.raises(ConfigError, match=r"methods.mixing_realonly.nope"):
        load_params(path, {"methods.mixing_realonly.nope": 1})


def _dvc_rewrite(src: Path, dst: Path, overrides: list[str]) -> list[str]:
    """What `dvc exp run -S` does to a params file (DVC's own code); the lines that changed."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(src, dst)
    apply_overrides(str(dst), overrides)
    before, after = src.read_text().splitlines(), dst.read_text().splitlines()
    return [d for d in difflib.unified_diff(before, after, lineterm="", n=0)
            if d[:1] in "+-" and not d.startswith(("+++", "---"))]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dvc_rewrites_one_line_per_value_set(tmp_path: Path, path: Path) -> None:
    """`dvc exp run -S KEY=VALUE` re-dumps the whole file: flow lists become block lists, anchors are expanded, long
    flow mappings wrap, comments after a list item vanish. Written as DVC writes YAML, every params file comes back
    with exactly the one line of the value changed (and stays valid: a user's -S keeps this check green)."""
    raw = load_yaml(path)
    key, value = ("methods.mixing.real_fraction", 0.375) if "mixing" in raw["methods"] else ("seed", raw["seed"] + 1)
    changed = _dvc_rewrite(path, tmp_path / "p.yaml", [f"{key}={value}"])
    assert len(changed) == 2 and changed[0].startswith("-") and changed[1].startswith("+"), "\n".join(changed)
    assert str(value) in changed[1]
    assert load_params(tmp_path / "p.yaml") is not None


def test_the_rewrite_check_sees_a_layout_dvc_changes(tmp_path: Path) -> None:
    src = tmp_path / "src.yaml"
    src.write_text("a:\n  x: 1\n  widths: [8, 16]   # inline\n")
    assert len(_dvc_rewrite(src, tmp_path / "dst.yaml", ["a.x=2"])) > 2


def test_the_suite_params_mirror_the_project_layout() -> None:
    """tests/params.yaml has the sections, method blocks, bases and studies of params.yaml (values are its own):
    every block of the project is contract-tested, and a user's edit of a value keeps this true."""
    assert layout_differences(load_yaml(REPO / "params.yaml"), load_yaml(TEST_PARAMS)) == []
    load_params(TEST_PARAMS)  # complete and typed, as strictly as the project's file


def test_the_layout_check_names_a_missing_block_and_a_changed_base() -> None:
    project, suite = load_yaml(REPO / "params.yaml"), load_yaml(TEST_PARAMS)
    project["methods"]["mixing_extra"] = {"base": "mixing"}
    suite["methods"]["mrgan"]["base"] = "mixing"
    assert layout_differences(project, suite) == [
        "methods.mixing_extra: in params.yaml, not in tests/params.yaml",
        "methods.mrgan.base: 'mixing' in tests/params.yaml, 'cyclegan' in params.yaml"]
