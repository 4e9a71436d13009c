"""End to end through the CLI on a tiny digits benchmark: generate, validate, prepare, train, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from s2r.cli import main


def invoke(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_cli_pipeline_tracks_everything(in_tmp: Path, tiny_params_file: Path) -> None:
    p = ["--params", str(tiny_params_file)]
    invoke("data", "generate", "digits", "--out", "data/benchmarks/digits", *p)
    invoke("data", "validate", "data/benchmarks/digits", "--report", "data/reports/digits/validation.json")
    assert json.loads(Path("data/reports/digits/validation.json").read_text())["success"] is True
    invoke("data", "prepare", "data/benchmarks/digits", "--out", "data/prepared/digits")
    invoke("train", "mixing", "--data", "data/prepared/digits", "--out", "data/models/mixing",
           "--metrics", "data/metrics/mixing/train.json", "--plots", "data/plots/mixing", *p)
    out = invoke("evaluate", "mixing", "--model", "data/models/mixing", "--data", "data/prepared/digits",
                 "--out", "data/metrics/mixing/evaluate.json", "--plots", "data/plots/mixing/evaluate", *p)
    assert "accuracy" in out

    train = json.loads(Path("data/metrics/mixing/train.json").read_text())
    ev = json.loads(Path("data/metrics/mixing/evaluate.json").read_text())
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["n"] == 359 and len(ev["confusion_matrix"]) == 10
    assert np.isfinite(train["train_loss"]) and train["steps"] == 6
    assert Path("data/plots/mixing/train_history.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert Path("data/plots/mixing/evaluate/confusion.png").stat().st_size > 1000

    client = mlflow.MlflowClient()
    run = client.get_run(train["mlflow_run_id"])
    assert run.info.run_name == "train@mixing-seed0" and run.info.status == "FINISHED"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "s2r/paper4-mixing-ratio-mrgan"  # one experiment per paper (Method.paper)
    assert run.data.params["methods.mixing.real_fraction"] == "0.25"
    assert run.data.tags["data_version"] == json.loads(Path("data/prepared/digits/prepared.json").read_text())[
        "manifest_sha256"]
    assert {"seed", "device", "git_commit"} <= set(run.data.tags)
    hist = client.get_metric_history(run.info.run_id, "val/accuracy")  # sectioned keys, at the global step
    assert [m.step for m in hist] == [3, 6]
    curve = client.get_metric_history(run.info.run_id, "train/loss")  # log_every auto: every step of 6
    assert [m.step for m in curve] == list(range(1, 7))
    assert not [k for k in run.data.metrics if "/" not in k], run.data.metrics  # every key in a section
    assert {k.split("/")[0] for k in run.data.metrics} >= {"train", "val", "health", "test"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("samples", "plots", "config") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"samples/train_batch.png", "plots/train_history.png", "config/resolved.yaml"} <= artifacts

    model = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    x = np.zeros((3, 1, 16, 16), np.float32)
    assert tuple(model(__import__("torch").from_numpy(x)).shape) == (3, 10)

    ev_run = client.get_run(ev["mlflow_run_id"])
    assert ev_run.info.run_name == "evaluate@mixing-seed0"
    assert ev_run.data.metrics["test/accuracy"] == pytest.approx(ev["accuracy"])
    assert ev_run.data.tags["train_run_id"] == run.info.run_id
    assert ev_run.data.tags["mlflow.parentRunId"] == run.info.run_id  # nested under its model's training run
    # one row per trained model: the training run and its LoggedModel hold the test metrics too
    run = client.get_run(run.info.run_id)
    assert run.data.metrics["test/accuracy"] == pytest.approx(ev["accuracy"])
    logged = client.get_logged_model(run.data.tags["model_id"])
    assert logged.name == "mixing-seed0" and logged.source_run_id == run.info.run_id
    assert logged.params["real_fraction"] == "0.25"
    by_key = {m.key: m for m in logged.metrics}
    assert by_key["test/accuracy"].value == pytest.approx(ev["accuracy"]) and "val/accuracy" in by_key
    assert by_key["test/accuracy"].dataset_digest == run.data.tags["data_version"][:36]

    table = invoke("report")
    line = next(x for x in table.splitlines() if x.startswith("mixing"))
    assert train["health"] in ("ok", "collapsed") and "health_pred_classes" in train  # s2r.health verdict
    if train["health"] == "ok":
        assert f"{ev['accuracy']:.4f}" in line
    else:  # 6 steps of a tiny net can give a constant classifier: marked, never printed as a result
        assert "COLLAPSED: " + train["health_reasons"][0] in line and f"{ev['accuracy']:.4f}" not in line
    assert "Paper verdicts" in table


def test_resume_continues_mlflow_run(in_tmp: Path, tiny_params_file: Path, tiny_prepared: Path) -> None:
    p = ["--params", str(tiny_params_file)]
    invoke("train", "mixing", "--data", str(tiny_prepared), "--out", "m", "--metrics", "t.json", *p)
    first = json.loads(Path("t.json").read_text())["mlflow_run_id"]
    invoke("train", "mixing", "--data", str(tiny_prepared), "--out", "m", "--metrics", "t.json", "--resume", *p)
    assert json.loads(Path("t.json").read_text())["mlflow_run_id"] == first


def test_user_errors_are_one_line(in_tmp: Path, tiny_params_file: Path, tiny_prepared: Path) -> None:
    r = CliRunner().invoke(main, ["train", "mixing", "--data", str(tiny_prepared), "--out", "m",
                                  "--params", str(tiny_params_file), "--set", "methods.mixing.nope=1"])
    assert r.exit_code == 2 and "methods.mixing.nope" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "mixing", "--data", str(tiny_prepared), "--out", "m",
                                  "--params", str(tiny_params_file), "--resume", "--checkpoints", "none"])
    assert r.exit_code == 0 and "no checkpoint in none" in r.output and "starting from step 0" in r.output
