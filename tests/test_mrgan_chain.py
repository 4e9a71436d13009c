"""MrGAN as configuration: CycleGAN stage 1 -> refine -> stage 2 on refined domains -> refine -> classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, tiny_params_dict
from s2r.cli import main
from s2r.data.prepared import PreparedBenchmark


def invoke(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_two_stage_chain_through_cli(in_tmp: Path, tiny_prepared: Path) -> None:
    raw = tiny_params_dict()
    raw["methods"]["mrgan"].update(domain_a="syn_cyclegan", domain_b="real_cyclegan")  # pair (1) of Fig. 5B
    params = in_tmp / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    p = ["--params", str(params)]
    invoke("train", "cyclegan", "--data", str(tiny_prepared), "--out", "m/cyclegan", *p)
    invoke("refine", "cyclegan", "--model", "m/cyclegan", "--data", str(tiny_prepared), "--out", "d-cyclegan",
           "--metrics", "r1.json", "--plots", "plots1", *p)
    stage1 = PreparedBenchmark("d-cyclegan")
    assert stage1.spec.source == "syn_cyclegan"
    assert {d.name for d in stage1.spec.domains} == {"syn", "real", "syn_cyclegan", "real_cyclegan"}
    src, ref = PreparedBenchmark(tiny_prepared).get("syn", "test"), stage1.get("syn_cyclegan", "test")
    assert np.array_equal(src.labels, ref.labels) and not np.array_equal(np.asarray(src.images), ref.images)
    assert Path("plots1/refined.png").stat().st_size > 0

    invoke("train", "mrgan", "--data", "d-cyclegan", "--out", "m/mrgan", *p)
    invoke("refine", "mrgan", "--model", "m/mrgan", "--data", "d-cyclegan", "--out", "d-mrgan", *p)
    stage2 = PreparedBenchmark("d-mrgan")
    assert stage2.spec.source == "syn_cyclegan_mrgan" and stage2.has("real_cyclegan_mrgan", "val")
    # paper 4, Section 4.4: after stage 2 maps to refined real images, the classifier is tested on those
    assert stage1.spec.target == "real" and stage2.spec.target == "real_cyclegan"
    assert {d.name: d.role for d in stage2.spec.domains}["real"] == "auxiliary"
    assert stage2.meta["parent"] == stage1.data_version

    invoke("train", "mixing", "--data", "d-mrgan", "--out", "m/mixing", "--metrics", "t.json", *p)
    assert np.isfinite(json.loads(Path("t.json").read_text())["val_accuracy"])
    assert json.loads(Path("r1.json").read_text())["source"] == "syn_cyclegan"


def test_stage_two_reads_stage_one_through_dvc() -> None:
    """train@mrgan's data is refine@cyclegan's DVC output, and its domains are the ones that stage writes."""
    dvc = yaml.safe_load((REPO / "pipelines" / "mixing-ratio-mrgan" / "dvc.yaml").read_text())
    train, refine = dvc["stages"]["train"], dvc["stages"]["refine"]
    stage1_out = f"data/prepared/{refine['foreach']['cyclegan']['benchmark']}-cyclegan"
    mrgan_data = f"data/prepared/{train['foreach']['mrgan']['benchmark']}"
    assert mrgan_data == stage1_out
    assert "data/prepared/${item.benchmark}-${key}" in refine["do"]["outs"]
    assert "data/prepared/${item.benchmark}" in train["do"]["deps"] and "--data data/prepared/${item.benchmark}" in \
        train["do"]["cmd"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())["methods"]["mrgan"]
    refined = {"synthetic_cyclegan", "real_cyclegan", "synthetic", "real"}
    assert {params["domain_a"], params["domain_b"]} <= refined and "cyclegan" in params["domain_a"] + params["domain_b"]


def test_more_stages_are_configuration(tmp_path: Path) -> None:
    from s2r.config import ConfigError
    from s2r.methods import registry
    from s2r.methods.cyclegan import Config
    from s2r.params import load_params

    raw = tiny_params_dict()
    raw["methods"]["mrgan_3"] = dict(raw["methods"]["mrgan"], domain_a="synthetic_cyclegan_mrgan",
                                     domain_b="real_cyclegan_mrgan")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_params(path).methods["mrgan_3"]
    assert isinstance(cfg, Config) and cfg.domain_a == "synthetic_cyclegan_mrgan"
    assert registry.method_class("mrgan_3") is registry.method_class("cyclegan")
    raw["methods"]["nomethod_3"] = {}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="methods.nomethod_3"):
        load_params(path)
