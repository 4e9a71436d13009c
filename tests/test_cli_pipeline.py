"""The CLI surface and dvc.yaml agree: every stage calls s2r, every params key it names exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import REPO
from s2r.cli import main
from s2r.config import flatten


def test_help_lists_every_command_with_example() -> None:
    top = CliRunner().invoke(main, ["--help"]).output
    for name in ("data", "train", "evaluate", "refine", "tables", "tune", "registry", "report", "benchmark", "ui"):
        assert name in top
    commands = [
        ["data", "generate"], ["data", "validate"], ["data", "prepare"], ["data", "import-folder"],
        ["data", "import-manifest"], ["train"], ["evaluate"], ["refine"], ["tune"],
        ["registry", "register"], ["registry", "list"], ["registry", "promote"], ["registry", "predict"],
        ["report"], ["benchmark"], ["ui"], ["parallel"],
        ["tables"],
        ["tables", "mixing"],
        ["data", "add"], ["data", "sources"], ["data", "merge"], ["data", "fixture"], ["recipe"], ["recipe", "standin"],
        ["tables", "cut"],
        ["tables", "twinvae"],
        ["tables", "betavae"],
        ["tables", "ae"],
    ]
    for cmd in commands:
        assert "Example: s2r" in CliRunner().invoke(main, [*cmd, "--help"]).output, cmd


def test_train_help_and_unknown_method_list_the_methods_and_variants(tiny_params_file: Path) -> None:
    """`s2r train --help` and a typo in METHOD both show what can be trained: methods, papers, variants."""
    from s2r.methods import registry

    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for name, entry in registry.entries().items():
        number = registry.PAPERS.index(entry.paper) + 1
        assert f"  {name} " in help_text and f"paper {number}: {entry.paper}" in help_text
    assert "mixing, mixing_realonly" in help_text and "cyclegan, mrgan" in help_text  # variants = params blocks
    res = CliRunner().invoke(main, ["train", "mixng", "--data", str(REPO / "src"), "--out", "m",
                                    "--params", str(tiny_params_file)])
    assert res.exit_code == 2 and "no params block methods.mixng" in res.output
    assert "mixing, mixing_realonly" in res.output and "twinvae_heads" in res.output


def test_import_is_light() -> None:
    code = "import sys, s2r.cli; print(any(m in sys.modules for m in ('torch', 'mlflow', 'great_expectations')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dvc_stages_call_cli_and_name_existing_params() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = set(flatten(params)) | {k for k in _prefixes(flatten(params))}
    for name, stage in dvc["stages"].items():
        do = stage.get("do", stage)
        assert do["cmd"].startswith("s2r "), name
        items = stage["foreach"] if isinstance(stage.get("foreach"), list) else list(stage.get("foreach", {"": 0}))
        for item in items:
            fields = stage["foreach"][item] if isinstance(stage.get("foreach"), dict) else {}
            for p in do.get("params", []):
                key = p.replace("${item}", str(item)).replace("${key}", str(item))
                for f, v in (fields.items() if isinstance(fields, dict) else []):  # ${item.method} of dict items
                    key = key.replace("${item." + f + "}", str(v))
                assert key in keys, f"stage {name}: params key {key!r} not in params.yaml"
        assert "mlruns" not in str(do.get("outs", [])), name


def _prefixes(flat: dict) -> set[str]:
    out = set()
    for k in flat:
        parts = k.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out


def test_torchvision_model_runs() -> None:
    """A broken torch/torchvision pairing (e.g. the local 2.13 CPU wheel) must fail loudly here."""
    import torch
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 64)).shape == (1, 4)
    boxes = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]


def _declared(dvc_file: Path) -> list[str]:
    """What a dvc.yaml declares as DVC metrics or plots (stage-level and top-level)."""
    raw = yaml.safe_load(dvc_file.read_text())
    found = [str(p) for key in ("metrics", "plots") for p in raw.get(key, []) or []]
    for stage in (raw.get("stages") or {}).values():
        body = stage.get("do", stage)
        found += [str(p) for key in ("metrics", "plots") for p in body.get(key, []) or []]
    return found


def test_dvc_metrics_and_plots_show_the_default_pipeline_only() -> None:
    """DVC collects metrics and plots from every dvc.yaml it finds: the opt-in pipelines declare theirs as outs, so
    `dvc metrics show` lists no file of a pipeline that never ran; the default pipeline's training curves are all
    plotted, seeds overlaid (top-level plots with one y per train_history.csv)."""
    opt_in = sorted((REPO / "pipelines").rglob("dvc.yaml"))
    assert opt_in and {str(f.relative_to(REPO)): _declared(f) for f in opt_in} == {
        str(f.relative_to(REPO)): [] for f in opt_in}
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())
    histories = set()
    for stage in raw["stages"].values():
        body, keys = stage.get("do", stage), list(stage.get("foreach", {"": 0}))
        for out in body.get("outs", []):
            if str(out).endswith("train_history.csv"):
                histories |= {str(out).replace("${key}", str(k)) for k in keys}
    plotted = {f for p in raw["plots"] if isinstance(p, dict) for spec in p.values()
               if isinstance(spec, dict) and isinstance(spec.get("y"), dict) for f in spec["y"]}
    assert len(histories) >= 20 and histories == plotted, histories ^ plotted
    assert {f for f in plotted if "seed2" in f} >= {"data/plots/ae-seed2/train_history.csv",
                                                   "data/plots/betavae_weak-seed2/train_history.csv"}
