"""The package's import graph: no cycles, no upward imports, and DVC stages list every s2r module they run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from s2r import codegraph
from s2r.methods import registry

DVC_FILES = [REPO / "dvc.yaml", *sorted((REPO / "pipelines").rglob("dvc.yaml"))]


def test_no_import_cycles() -> None:
    """Module-level and function-level imports alike; the registry's discovery of method modules is the one
    two-way link by design (a method imports the `register` decorator, the registry imports the method)."""
    assert codegraph.cycles(codegraph.import_graph(dynamic=False)) == []
    with_discovery = codegraph.cycles(codegraph.import_graph())
    assert all(codegraph.REGISTRY in c and set(c) - {codegraph.REGISTRY} <= set(codegraph.method_modules())
               for c in with_discovery), with_discovery


def test_no_upward_imports_and_every_module_has_a_layer() -> None:
    graph = codegraph.import_graph(dynamic=False)
    assert all(codegraph.layer(m) >= 0 for m in graph)  # KeyError names a module in no layer
    assert codegraph.upward_imports(graph) == []


def test_cycle_and_upward_detection_on_a_toy_graph() -> None:
    toy = {"s2r.config": {"s2r.stages"}, "s2r.stages": {"s2r.config"}, "s2r.files": set()}
    assert codegraph.cycles(toy) == [["s2r.config", "s2r.stages"]]
    assert codegraph.upward_imports(toy) == [("s2r.config", "s2r.stages")]


def test_discovery_finds_every_method_module() -> None:
    """The AST graph's discovery edges are the modules the registry imports."""
    assert codegraph.method_modules() == registry.method_modules()
    assert sorted({e.module for e in registry.entries().values()}) == registry.method_modules()


@pytest.mark.parametrize("dvc_file", DVC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dvc_stages_list_the_code_they_run(dvc_file: Path) -> None:
    assert codegraph.check_dvc(dvc_file, REPO) == []


def test_train_deps_follow_imports() -> None:
    """CUT imports CycleGAN's networks; every train stage runs every method module (the registry imports them)."""
    train = codegraph.stage_code("train")
    assert "src/s2r/methods/cyclegan.py" in train and "src/s2r/methods/cut.py" in train
    assert "src/s2r/config.py" in train and "src/s2r/data/prepared.py" in train
    assert "src/s2r/evaluators/disentanglement.py" not in train  # evaluate runs it, train does not
    assert "src/s2r/evaluators/disentanglement.py" in codegraph.stage_code("evaluate", "disentanglement")
    assert "src/s2r/methods" in codegraph.dvc_deps("train")  # the whole folder: all of it runs


def test_removing_a_dep_fails_the_check(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())
    raw["stages"]["paper1"]["deps"].remove("src/s2r/config.py")
    bad = tmp_path / "dvc.yaml"
    bad.write_text(yaml.safe_dump(raw, sort_keys=False))
    problems = codegraph.check_dvc(bad, tmp_path, src=REPO / "src")
    assert problems and all("'paper1'" in p and "src/s2r/config.py" in p for p in problems)
    assert {p.split("(s2r ")[1].split(")")[0] for p in problems} == {"train", "evaluate"}  # both kinds it runs


def test_a_new_import_fails_the_check_until_the_dep_is_listed(tmp_path: Path) -> None:
    """Copy the package, make CUT import the digits generator: the root dvc.yaml misses it; listing it fixes it."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "s2r", src / "s2r", ignore=shutil.ignore_patterns("__pycache__"))
    cut = src / "s2r" / "methods" / "cut.py"
    cut.write_text(cut.read_text() + "\n\ndef _probe() -> None:\n    from s2r.data import digits  # noqa: F401\n")
    dvc = tmp_path / "dvc.yaml"
    shutil.copy(REPO / "dvc.yaml", dvc)
    problems = codegraph.check_dvc(dvc, tmp_path, src=src)
    assert problems and all("src/s2r/data/digits.py" in p for p in problems)
    stages = {"paper1", "paper2", "paper3", "paper4", "paper5"}
    assert {p.split("'")[1] for p in problems} == stages
    raw = yaml.safe_load(dvc.read_text())
    for stage in stages:
        raw["stages"][stage]["deps"].append("src/s2r/data/digits.py")
    dvc.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert codegraph.check_dvc(dvc, tmp_path, src=src) == []


def test_dvc_entries_match_the_registry() -> None:
    """dvc.yaml names methods only by key; what a method is, can do and is scored by comes from the registry."""
    import re

    for path in (REPO / "dvc.yaml", REPO / "pipelines" / "mixing-ratio-mrgan" / "dvc.yaml"):
        for name, stage in yaml.safe_load(path.read_text())["stages"].items():
            body = stage.get("do", stage)
            keys = list(stage["foreach"]) if isinstance(stage.get("foreach"), dict) else []
            cmd = " ".join(body["cmd"].split())
            runs = [(k, m) for k, m in re.findall(r"\bs2r (train|refine|evaluate) (\S+)", cmd)]
            runs = [(k, key) for k, m in runs for key in (keys if m == "${key}" else [m])]
            for kind, method in runs:
                entry = registry.entry(method, str(path))  # raises naming an unknown method
                if kind == "refine":
                    assert "translate" in entry.capabilities, (name, method)
                if kind == "evaluate":
                    assert entry.evaluator, f"{name}: s2r evaluate {method}: {entry.name} declares no evaluator"
            for item in (stage["foreach"].values() if keys else []):
                assert not {"module", "evaluator"} & set(item), f"{path} {name} repeats the registry"


def test_dvc_deps_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from s2r.cli import main

    res = CliRunner().invoke(main, ["dvc-deps", "train"])
    assert res.exit_code == 0 and "- src/s2r/methods\n" in res.output
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())
    raw["stages"]["paper5"]["deps"].remove("src/s2r/stages.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(raw))
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        shutil.copytree(REPO / "src", "src", ignore=shutil.ignore_patterns("__pycache__"))
        Path("dvc.yaml").write_text(yaml.safe_dump(raw))
        res = CliRunner().invoke(main, ["dvc-deps", "refine", "--check", "dvc.yaml"])
    assert res.exit_code == 1 and "src/s2r/stages.py" in res.output


def test_dvc_stages_list_the_params_blocks_they_read() -> None:
    """Every `s2r train BLOCK` stage lists methods.BLOCK, and every listed variant its `base:` chain (all dvc.yaml)."""
    assert codegraph.check_dvc_params(REPO) == []


def test_a_variant_without_its_base_in_params_fails_the_check(tmp_path: Path) -> None:
    """An edit of methods.mixing.batch_size must re-run train@mixing_realonly: the check names the missing base."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "params.yaml").write_text("methods:\n  mixing:\n    lr: 0.1\n  mixing_realonly:\n    base: mixing\n")
    stage = {"foreach": {"mixing_realonly": {"base": "mixing"}},
             "do": {"cmd": "s2r train ${key} --data d", "params": ["methods.${key}"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    problems = codegraph.check_dvc_params(tmp_path)
    assert len(problems) == 1 and "'train@mixing_realonly' lists methods.mixing_realonly but not methods.mixing" \
        in problems[0] and "dvc.yaml" in problems[0]
    stage["do"]["params"] = ["methods.${item.base}"]  # and now the block it trains is missing
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    assert [p for p in codegraph.check_dvc_params(tmp_path) if "does not list params.yaml:methods.mixing_realonly"]
    stage["do"]["params"] = ["methods.${key}", "methods.${item.base}"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    assert codegraph.check_dvc_params(tmp_path) == []


def test_dvc_deps_write_restores_the_code_deps_and_keeps_the_rest(tmp_path: Path) -> None:
    """`s2r dvc-deps --write`: code deps regenerated from the import graph, data deps, params and comments kept; a
    second write changes nothing (every dvc.yaml of the repository is in that state)."""
    (tmp_path / "src").symlink_to(REPO / "src")
    dvc = tmp_path / "dvc.yaml"
    text = (REPO / "dvc.yaml").read_text()
    dvc.write_text(text.replace("      - src/s2r/stages.py\n      - src/s2r/tracking.py\n",  # a generated list
                                "      - src/s2r/tracking.py\n", 1).replace("      - src/s2r/params.py\n", ""))
    assert codegraph.check_dvc(dvc, tmp_path, src=REPO / "src")
    assert codegraph.write_dvc(dvc, tmp_path, src=REPO / "src")
    assert dvc.read_text() == text and codegraph.check_dvc(dvc, tmp_path, src=REPO / "src") == []
    for f in DVC_FILES:
        changed = codegraph.write_dvc(f, REPO, dry_run=True)
        assert changed == [], f"`s2r dvc-deps --write {f.relative_to(REPO)}` would change {changed}"
