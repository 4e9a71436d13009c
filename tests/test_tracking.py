"""MLflow ownership: run end states, batched metrics, params flattening, the store location."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from s2r import tracking
from s2r.tracking import TrackedRun


def _run(run_id: str):
    return mlflow.MlflowClient().get_run(run_id)


def test_finished_run_has_params_tags_and_batched_metrics() -> None:
    with TrackedRun("train@x", experiment="t", params={"a": {"b": 1, "c": [1, 2]}}, tags={"seed": "3"}) as run:
        for epoch in range(1, 4):
            run.log_metrics({"loss": 1.0 / epoch}, step=epoch)
        assert run._buffer  # buffered, not yet sent
    r = _run(run.run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "train@x"
    assert r.data.params == {"a.b": "1", "a.c": "[1, 2]"}
    assert r.data.tags["seed"] == "3" and "git_commit" in r.data.tags
    hist = mlflow.MlflowClient().get_metric_history(run.run_id, "loss")
    assert [(m.step, round(m.value, 3)) for m in hist] == [(1, 1.0), (2, 0.5), (3, 0.333)]


def test_crash_marks_failed_with_reason() -> None:
    with pytest.raises(ValueError), TrackedRun("train@x", experiment="t") as run:
        raise ValueError("boom")
    r = _run(run.run_id)
    assert r.info.status == "FAILED" and "boom" in r.data.tags["error"]


def test_interrupt_marks_killed() -> None:
    with pytest.raises(KeyboardInterrupt), TrackedRun("train@x", experiment="t") as run:
        raise KeyboardInterrupt
    assert _run(run.run_id).info.status == "KILLED"


def test_resume_continues_same_run() -> None:
    with TrackedRun("train@x", experiment="t") as first:
        first.log_metrics({"m": 1}, step=1)
    with TrackedRun("train@x", experiment="t", run_id=first.run_id) as second:
        second.log_metrics({"m": 2}, step=2)
    assert second.run_id == first.run_id
    assert len(mlflow.MlflowClient().get_metric_history(first.run_id, "m")) == 2


def test_default_store_is_sqlite_under_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    exp_id = tracking.setup("e")
    exp = mlflow.get_experiment(exp_id)
    assert exp.artifact_location.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
