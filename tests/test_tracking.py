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
    hist = mlflow.MlflowClient().get_metric_history(run.run_id, "train/loss")  # a training run's default section
    assert [(m.step, round(m.value, 3)) for m in hist] == [(1, 1.0), (2, 0.5), (3, 0.333)]


def test_metric_keys_get_sections_by_one_rule() -> None:
    """The MLflow chart view groups charts by the prefix before `/`; s2r's names map onto it by one rule."""
    key = tracking.metric_key
    assert [key(k) for k in ("train_loss", "val_accuracy", "health_majority_share", "test_miou")] == [
        "train/loss", "val/accuracy", "health/majority_share", "test/miou"]
    assert key("lr") == "train/lr" and key("pretrain_l1") == "train/pretrain_l1"  # no section: the run's
    assert key("dci_disentanglement", "test") == "test/dci_disentanglement" and key("val_", "test") == "test/val_"
    assert key("system/cpu_utilization_percentage") == "system/cpu_utilization_percentage"  # already sectioned
    assert tracking.log_interval("auto", 160) == 1 and tracking.log_interval("auto", 500) == 5
    assert tracking.log_interval("auto", 400_000) == 4000 and tracking.log_interval(7, 160) == 7
    assert all(total // tracking.log_interval("auto", total) >= min(total, 50)
               for total in (1, 49, 99, 120, 160, 199, 10**6))


def test_git_dirty_names_changed_source_files_only(tmp_path: Path) -> None:
    """DVC's own files, what the pipeline writes and docs are no code change; untracked files are not the code."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("dvc.lock", "pipelines/x/dvc.lock", "data.dvc", "README.md", "docs/index.md", "params.yaml",
                 "src/a.py", "dvc_plots/p.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "v1")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    for name in ("dvc.lock", "pipelines/x/dvc.lock", "data.dvc", "README.md", "docs/index.md", "dvc_plots/p.png"):
        (tmp_path / name).write_text("v2\n")
    (tmp_path / "untracked.py").write_text("x\n")
    assert tracking.git_tags(tmp_path) == {"git_commit": sha}  # clean: no git_dirty tag at all
    (tmp_path / "src/a.py").write_text("v2\n")
    (tmp_path / "params.yaml").write_text("v2\n")
    assert tracking.git_state(tmp_path) == (sha, ["params.yaml", "src/a.py"])
    assert tracking.git_tags(tmp_path)["git_dirty"] == "2 changed: params.yaml, src/a.py"
    assert tracking.git_state(tmp_path / "nowhere") == ("unknown", [])


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
    assert len(mlflow.MlflowClient().get_metric_history(first.run_id, "train/m")) == 2


def test_default_store_is_sqlite_under_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    exp_id = tracking.setup("e")
    exp = mlflow.get_experiment(exp_id)
    assert exp.artifact_location.startswith((tmp_path / "mlruns" / "artifacts").as_uri())


def _orphan(tags: dict[str, str]) -> str:
    """A RUNNING run with the given tags, as a process that died would leave it."""
    exp = tracking.setup("t")  # first: it points MLflow at the store (an earlier test may have moved it)
    return mlflow.MlflowClient(tracking_uri=tracking.tracking_uri()).create_run(exp, tags=tags).info.run_id


def _proc_tag(**entry: object) -> dict[str, str]:
    import json

    e = tracking.process_identity() | {"beat": 0.0} | entry
    return {tracking._proc_key(e): json.dumps(e)}


def test_reconcile_marks_runs_of_dead_processes_killed_and_leaves_live_ones() -> None:
    import time

    me = tracking.process_identity()
    dead_local = _orphan(_proc_tag(start=me["start"] - 1000))  # this pid, another start time: a reused pid
    stale_remote = _orphan(_proc_tag(host="elsewhere", pid=7, beat=time.time() - 2 * tracking.stale_seconds()))
    fresh_remote = _orphan(_proc_tag(host="elsewhere", pid=8, beat=time.time()))
    live = _orphan(_proc_tag())  # this very process
    foreign = _orphan({})  # not an s2r run: nothing says who holds it
    shared = _orphan(_proc_tag(start=me["start"] - 1000) | _proc_tag(host="elsewhere", pid=9, beat=time.time()))
    killed = tracking.reconcile()
    assert dead_local in killed and stale_remote in killed
    assert not {fresh_remote, live, foreign, shared} & set(killed)  # one live holder keeps a run RUNNING
    assert _run(dead_local).info.status == "KILLED" and "is gone" in _run(dead_local).data.tags["s2r.reconciled"]
    assert "no heartbeat since" in _run(stale_remote).data.tags["s2r.reconciled"]
    assert {_run(r).info.status for r in (fresh_remote, live, foreign, shared)} == {"RUNNING"}
    assert dead_local not in tracking.reconcile()  # settled once
    for r in (fresh_remote, live, foreign, shared):
        mlflow.MlflowClient().set_terminated(r)


def test_every_run_records_its_process_and_resume_reopens_a_killed_run() -> None:
    import json

    with TrackedRun("train@x", experiment="t") as first:
        pass
    tags = _run(first.run_id).data.tags
    entry = json.loads(next(v for k, v in tags.items() if k.startswith(tracking.PROC_TAG)))
    assert tags["pid"] == str(entry["pid"]) and entry["host"] == tags["host"] and entry["start"] > 0
    mlflow.MlflowClient().set_terminated(first.run_id, status="KILLED")
    with TrackedRun("train@x", experiment="t", run_id=first.run_id) as again:
        assert _run(again.run_id).info.status == "RUNNING"
    r = _run(first.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["resumed_from_status"] == "KILLED"
