"""Paper recipes (pipelines/recipes/<paper>): their dvc.yaml, recipe vars and params (with the stand-in
overrides) load strictly and agree with each other; `dvc repro` completes on the stand-ins (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from s2r import recipes
from s2r.config import ConfigError, parse_params
from s2r.data import sources


def _benchmarks(rec: dict) -> list[str]:
    """The prepared benchmarks of a recipe: vars `benchmarks`, or `datasets` where the recipe has a params.yaml
    (DVC loads a params.yaml next to dvc.yaml as vars, so its `benchmarks` key would clash)."""
    return list(rec["recipe"].get("benchmarks") or rec["recipe"].get("datasets") or [])


PAPERS = sorted(p.name for p in (REPO / "pipelines" / "recipes").iterdir() if (p / "dvc.yaml").is_file())


def test_one_recipe_per_paper() -> None:
    assert PAPERS == sorted({"extractor-autoencoder-pirl-triplet", "twin-vae-depth-segmentation",
                             "disentanglement-transfer-ood", "mixing-ratio-mrgan", "cut-patch-refinement"})


@pytest.mark.parametrize("paper", PAPERS)
@pytest.mark.parametrize("fixture", [False, True], ids=["full", "standin"])
def test_recipe_loads_strictly(paper: str, fixture: bool) -> None:
    rec = recipes.load(paper, REPO, fixture=fixture)
    assert (rec["dir"] / "README.md").is_file()
    if "params" in rec:
        parse_params(rec["params"], f"{paper}/params.yaml")  # strict: every key typed and known
    raw, srcs = rec["recipe"]["raw"], rec["recipe"].get("sources", {})
    assert set(raw) <= set(sources.SOURCES)
    for name, s in srcs.items():
        kind = s.get("kind", name)
        if "from" in s:  # data-side recipes: the path is templated into the add stage
            assert kind in sources.SOURCES and s["from"] == raw[kind], name
    stages = rec["dvc"]["stages"]
    for name, stage in stages.items():
        do = stage.get("do", stage)
        assert do["cmd"].startswith("s2r "), name
        assert do.get("wdir") == "../../..", name
    text = (rec["dir"] / "dvc.yaml").read_text()
    assert "--no-dvc" in text  # stage outputs are tracked by DVC itself, not by `dvc add`
    built = set(srcs) | set(rec["recipe"].get("merges") or {})
    assert set(_benchmarks(rec)) <= built


def test_fixture_override_must_name_existing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        recipes.overridden({"a": {"b": 1}}, {"a.c": 2}, "fixture.yaml")
    assert recipes.overridden({"a": {"b": 1}}, {"a.b": 2}, "x") == {"a": {"b": 2}}
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        recipes.load("nope", REPO)


def test_paper4_recipe_uses_existing_cli_and_paper_scale() -> None:
    rec = recipes.load("mixing-ratio-mrgan", REPO)
    p = rec["params"]["methods"]
    assert p["mixing"]["epochs"] == 500 and p["cyclegan"]["epochs"] * p["cyclegan"]["steps_per_epoch"] == 40_000
    assert p["cyclegan"]["disc_channels"] == [64, 128] and p["cyclegan"]["batch_size"] == 144
    cmds = " ".join(s.get("do", s)["cmd"] for s in rec["dvc"]["stages"].values())
    for cmd in ("s2r data add", "s2r data validate", "s2r data prepare", "s2r train", "s2r refine",
                "s2r tables mixing"):
        assert cmd in cmds



@pytest.mark.parametrize("fixture", [False, True], ids=["full", "standin"])
def test_paper5_recipe_uses_existing_cli_and_paper_scale(fixture: bool) -> None:
    import re

    from s2r.methods import registry

    rec = recipes.load("cut-patch-refinement", REPO, fixture=fixture)
    stages, r = rec["dvc"]["stages"], rec["recipe"]
    cmds = " ".join(s.get("do", s)["cmd"] for s in stages.values())
    for cmd in ("s2r data add", "s2r data validate", "s2r data prepare", "s2r train cut", "s2r refine cut",
                "s2r train segmenter_", "s2r evaluate segmenter_", "s2r tables cut"):
        assert cmd in cmds
    for seg in r["segmenters"]:  # every segmenter the matrix names is a params block of a registered method
        assert f"segmenter_{seg}" in rec["params"]["methods"] and registry.resolve(f"segmenter_{seg}")
    assert set(r["experiments"]) == set(_benchmarks(rec)) and {t["benchmark"] for t in r["tables"].values()} <= set(
        _benchmarks(rec))
    # the --set overrides of the templated commands name existing keys, with values the strict loader accepts
    for key, entries in (("cut", r["experiments"]), ("tables", r["tables"])):
        cmd = stages[key]["do"]["cmd"]
        for name, item in entries.items():
            sets = dict(kv.split("=", 1) for kv in re.findall(r"--set '?([^ ']+)'?", cmd))
            assert len(sets) >= 2, cmd
            over = {k: yaml.safe_load(re.sub(r"\$\{item\.(\w+)\}", lambda m, it=item: str(it[m.group(1)]), v))
                    for k, v in sets.items()}
            params = dict(rec["params"])
            for k, v in over.items():
                params = recipes.overridden(params, {k: v}, f"{key}@{name}")
            parsed = parse_params(params, f"{key}@{name}")
            size = r["sources"][item.get("benchmark", name)]["options"]["image_size"]
            sizes = parsed.reports.cut_tables.patch_sizes if key == "tables" else [parsed.methods["cut"].patch_size]
            assert max(sizes) <= size, (name, sizes, size)
    if not fixture:  # Section IV-A/B/D at the paper's scale
        m, t = rec["params"]["methods"], rec["params"]["reports"]["cut_tables"]
        assert m["cut"]["batch_size"] == 40 and m["cut"]["epochs"] == 400 and not m["cut"]["flip"]
        assert sorted(t["patch_sizes"]) == [60, 70, 90, 100, 120, 160] and t["last_k"] == 50
        assert t["seg_epochs"] == 300 and t["seg_steps_per_epoch"] * m["segmenter_target"]["batch_size"] == 1500
        assert all(m[f"segmenter_{s}"]["ema_decay"] == 0.995 for s in r["segmenters"])
        assert r["experiments"]["hb"] == {"patch_size": 70, "lambda_nce": 2.0}
        assert sorted(t["lambda_nce"] for k, t in r["tables"].items() if k.startswith("hb")) == [2.0, 5.0, 7.0]
        assert rec["params"]["train"]["device"] == "cuda"


def test_tables_cut_set_must_be_key_value(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from s2r.cli import main

    res = CliRunner().invoke(main, ["tables", "cut", "--data", str(tmp_path), "--set", "reports.cut_tables.lambda_nce"])
    assert res.exit_code != 0 and "expected KEY=VALUE" in (res.output + str(res.exception))


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_recipe_runs_end_to_end_on_standins(paper: str, tmp_path: Path) -> None:
    root = recipes.standin(paper, tmp_path / "proj", REPO)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO / "src"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    r = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro", f"pipelines/recipes/{paper}/dvc.yaml"],
                       cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = recipes.load(paper, REPO, fixture=True)
    for b in _benchmarks(rec) or ["cifar_da4"]:
        report = yaml.safe_load((root / "data" / "reports" / b / "validation.json").read_text())
        assert report["success"] and (root / "data" / "prepared" / b / "prepared.json").is_file()
    if paper == "mixing-ratio-mrgan":
        assert "Real + Refined by MrGAN" in (root / "data" / "tables" / "cifar_da4" / "table3.md").read_text()
