"""Crash consistency: SIGKILL at chosen points, then resume; the model must equal an uninterrupted run's.

Processes kill themselves at deterministic points (tests/crash_driver.py), so nothing races with a timer.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
import torch._dynamo  # noqa: F401 - imported once here, not in every forked child (seed_everything needs it)
import yaml

from conftest import tiny_params_dict
from crash_driver import run_cli, spawn_cli, wait
from s2r import tracking

DRIVER = Path(__file__).with_name("crash_driver.py")


def _params(tmp_path: Path, method: str) -> Path:
    raw = tiny_params_dict()
    raw["train"].update(threads=1, checkpoint_every=2)
    raw["tracking"]["log_model"] = False  # seconds per attempt; the after_model point covers that window
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _env(uri: str, kill: str = "") -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": uri, "S2R_TEST_KILL": kill, "OMP_NUM_THREADS": "1", "S2R_TEST_WAIT_FOR": "",
            "S2R_TEST_DEAD_MARK": ""}


def _alias(uri: str) -> str:
    """The same store under another spelling, for this process only: children never inherit its connections."""
    path = Path(uri.removeprefix("sqlite:///"))
    return f"sqlite:///{path.parent}/./{path.name}"


def _train(folder: Path, method: str, prepared: Path, params: Path, uri: str, *, kill: str = "",
           resume: bool = False) -> tuple[int, str]:
    """`s2r train` in a forked child that dies at `kill`; (exit status, its output)."""
    argv = ["train", method, "--data", str(prepared), "--out", str(folder / "model"), "--checkpoints",
            str(folder / "ckpt"), "--metrics", str(folder / "metrics.json"), "--params", str(params)]
    log = folder / "log.txt"
    rc = run_cli(argv + (["--resume"] if resume else []), _env(uri, kill), log)
    return rc, log.read_text()


def _state(folder: Path) -> dict[str, torch.Tensor]:
    """Every model number: the flattened tensors of the method's saved state."""
    saved = torch.load(folder / "model" / "model.pt", map_location="cpu", weights_only=False)
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, v: object) -> None:
        if isinstance(v, torch.Tensor):
            out[prefix] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)

    walk("", saved["state"])
    return out


# (kill point of each attempt, what the next --resume must say); steps: 2 epochs x 3, a checkpoint every 2 steps
CHAIN = [
    ("step:2", "no checkpoint in"),  # dies after step 1, before the first checkpoint
    ("checkpoint_tmp:2", "continuing from the checkpoint at step 2/6"),  # dies mid-write of the step-4 checkpoint
    ("step:3", "continuing from the checkpoint at step 4/6"),  # from step 2 it runs 3, 4 (checkpoint), dies at 5
    ("after_fit", "continuing from the checkpoint at step 6/6"),  # trained to the end, model not written
    ("after_model", "continuing from the checkpoint at step 6/6"),  # model.pt written, run not finished
]


def _kill_resume_chain(tmp_path: Path, prepared: Path, method: str) -> None:
    params = _params(tmp_path, method)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    base, crash = tmp_path / "base", tmp_path / "crash"
    base.mkdir()
    crash.mkdir()
    rc, log = _train(base, method, prepared, params, uri)
    assert rc == 0, log[-3000:]

    here = _alias(uri)
    client = mlflow.MlflowClient(tracking_uri=here)
    run_id = None
    for i, (kill, _) in enumerate(CHAIN):
        rc, log = _train(crash, method, prepared, params, uri, kill=kill, resume=i > 0)
        assert rc == -9, (kill, rc, log[-3000:])  # died by SIGKILL where asked
        if i > 0:
            assert CHAIN[i - 1][1] in log, log[-2000:]
        this = json.loads((crash / "ckpt" / "run.json").read_text())["run_id"]
        assert run_id in (None, this)  # every attempt continues the one MLflow run
        run_id = this
        assert client.get_run(run_id).info.status == "RUNNING"
        assert run_id in tracking.reconcile(here)  # what the next s2r command does first
        r = client.get_run(run_id)
        assert r.info.status == "KILLED" and "is gone" in r.data.tags[tracking.RECONCILED_TAG]
        assert (crash / "model" / "model.pt").is_file() == (kill == "after_model")

    rc, log = _train(crash, method, prepared, params, uri, resume=True)
    assert rc == 0 and CHAIN[-1][1] in log, log[-3000:]
    rc, log = _train(crash, method, prepared, params, uri, resume=True)  # a finished run: a no-op that says so
    assert rc == 0 and "already finished" in log, log[-3000:]

    a, b = _state(base), _state(crash)
    assert a.keys() == b.keys() and len(a) > 0
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after kill+resume, e.g. {differ[:5]}"
    ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (base, crash))
    for k, v in ma.items():  # the logged training metrics too (timings aside)
        if k.startswith(("train_", "val_")):
            assert mb[k] == v, k
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and mb["mlflow_run_id"] == run_id
    assert run.data.tags["resumed"] == "true" and run.data.tags["resumed_from_status"] == "KILLED"
    assert run.data.tags["threads"] == "1" and run.data.tags["torch"] == torch.__version__
    assert run.data.tags["device"] == "cpu"
    runs = client.search_runs([run.info.experiment_id], filter_string="tags.stage = 'train'")
    assert len(runs) == 2  # the uninterrupted run and the one run of all the attempts


def test_sigkill_anywhere_then_resume_gives_identical_model(tmp_path: Path, tiny_prepared: Path) -> None:
    _kill_resume_chain(tmp_path, tiny_prepared, "mixing")


@pytest.mark.slow
def test_sigkill_gan_anywhere_then_resume_gives_identical_model(tmp_path: Path, tiny_prepared: Path) -> None:
    _kill_resume_chain(tmp_path, tiny_prepared, "cyclegan")


def test_sigkilled_tuning_worker_trial_is_failed_and_retried_with_one_parent_run(tmp_path: Path,
                                                                                 tiny_prepared: Path) -> None:
    """Two workers start at the same instant; one dies by SIGKILL mid-trial; a worker started later settles it."""
    from optuna.trial import TrialState

    from s2r import tune
    from test_tune import study_params, trials

    params = study_params(tmp_path, n_trials=3)
    raw = yaml.safe_load(params.read_text())
    raw["tracking"]["log_model"] = False
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    argv = ["tune", "--study", "t", "--data", str(tiny_prepared), "--params", str(params), "--out",
            str(tmp_path / "out"), "--study-name", "crash", "--resume"]
    # trials train 2 epochs x 3 steps: step 4 is in the second epoch of the worker's first trial
    mark = str(tmp_path / "a-died")  # b's first trial waits for a's death, so a surely gets a trial to die in
    a = spawn_cli(argv, _env(uri, "step:4") | {"S2R_TEST_DEAD_MARK": mark}, tmp_path / "a.txt")
    b = spawn_cli(argv, _env(uri) | {"S2R_TEST_WAIT_FOR": mark}, tmp_path / "b.txt")
    assert wait(a) == -9, (tmp_path / "a.txt").read_text()[-3000:]
    assert wait(b) == 0, (tmp_path / "b.txt").read_text()[-3000:]
    c = run_cli(argv, _env(uri), tmp_path / "c.txt")  # e.g. a retry loop or the next `dvc repro`
    assert c == 0, (tmp_path / "c.txt").read_text()[-3000:]

    o = tune.TuneOptions(study="t", data_dir=tiny_prepared, params_path=params, out_dir=tmp_path / "out",
                         study_name="crash")
    ts = trials(o)
    assert {t.state for t in ts} <= {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}, ts
    dead = [t for t in ts if t.state == TrialState.FAIL]
    assert len(dead) == 1 and "died during the trial" in dead[0].user_attrs["fail_reason"]
    assert f"failed by pid {b} " in dead[0].user_attrs["fail_reason"]  # the live worker, right after its trial
    retries = [t for t in ts if t.system_attrs.get("failed_trial") == dead[0].number]
    assert len(retries) == 1 and retries[0].params == dead[0].params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert sum(t.state == TrialState.COMPLETE for t in ts) >= 3

    client = mlflow.MlflowClient(tracking_uri=_alias(uri))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parents) == 1, [r.info.run_id for r in parents]  # one parent run although both started together
    kids = [r for r in runs if r.data.tags.get("optuna_study") == "crash"]
    assert {r.data.tags["mlflow.parentRunId"] for r in kids} == {parents[0].info.run_id}
    killed = [r for r in kids if r.data.tags["optuna_trial"] == str(dead[0].number)]
    assert len(killed) == 1 and killed[0].info.status == "KILLED"  # reconciled by a later process
    assert f"KILLED by s2r (pid {b} " in killed[0].data.tags[tracking.RECONCILED_TAG]  # by that worker, too
    assert all(r.info.status != "RUNNING" for r in runs)


def test_resume_refuses_a_checkpoint_of_other_params(tmp_path: Path, tiny_prepared: Path,
                                                     tiny_params_file: Path) -> None:
    from s2r import stages
    from s2r.data.benchmark import DataError
    from s2r.params import load_params

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / stages.RUN_FILE).write_text(json.dumps({"run_id": "x", "fingerprint": "other"}))
    with pytest.raises(DataError, match="written for other params"):
        stages.train(stages.TrainRequest("mixing", tiny_prepared, tmp_path / "m", ckpt_dir=ckpt, resume=True),
                     load_params(tiny_params_file))
