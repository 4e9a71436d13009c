"""`s2r tune`: trials, nested MLflow runs, best.yaml, pruning, failures, resume, spec errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner

from conftest import tiny_params_dict
from s2r import stages, tune
from s2r.cli import main
from s2r.config import ConfigError
from s2r.params import load_params


def study_params(tmp_path: Path, **study: Any) -> Path:
    raw = tiny_params_dict()
    raw["studies"] = {"t": {
        "method": "mixing", "objectives": [{"metric": "val_accuracy", "direction": "maximize"}],
        "search_space": {"methods.mixing.real_fraction": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
                         "methods.mixing.augment": {"type": "categorical", "choices": [False, True]}},
        "sampler": "random", "pruner": "none", "n_trials": 3, "seed": 0, **study}}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def opts(tmp_path: Path, prepared: Path, params: Path, **kw: Any) -> tune.TuneOptions:
    return tune.TuneOptions(study="t", data_dir=prepared, params_path=params, out_dir=tmp_path / "out",
                            study_name=f"t-{tmp_path.name}", **kw)


def trials(o: tune.TuneOptions) -> list[optuna.trial.FrozenTrial]:
    st = tune.build_storage(o, o.out_dir)
    return optuna.load_study(study_name=o.study_name, storage=st).get_trials()


def test_tiny_study_completes_with_nested_runs_and_best_yaml(tmp_path: Path, tiny_prepared: Path) -> None:
    o = opts(tmp_path, tiny_prepared, study_params(tmp_path))
    res = tune.run(o)
    ts = trials(o)
    assert [t.state.name for t in ts] == ["COMPLETE"] * 3
    assert all(len(t.intermediate_values) == 2 for t in ts)  # reported every epoch
    best = yaml.safe_load((o.out_dir / "best.yaml").read_text())
    assert best["value"] == max(t.value for t in ts) and set(best["params"]) == {
        "methods.mixing.real_fraction", "methods.mixing.augment"}
    assert json.loads((o.out_dir / "metrics.json").read_text())["n_complete"] == 3 == res["metrics"]["n_complete"]
    assert (o.out_dir / "optimization_history.png").is_file()

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.optuna_study = '{o.study_name}'")
    parent_id = ts[0].system_attrs.get("mlflow_parent_run_id") or optuna.load_study(
        study_name=o.study_name, storage=tune.build_storage(o, o.out_dir)).user_attrs["mlflow_parent_run_id"]
    assert len(runs) == 3 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent_id}
    assert {r.data.tags["trial_state"] for r in runs} == {"COMPLETE"}
    one = next(r for r in runs if r.info.run_id == best["mlflow_run_id"])
    assert one.data.params["methods.mixing.real_fraction"] == str(best["params"]["methods.mixing.real_fraction"])
    assert "model_uri" in one.data.tags  # the model of a completed trial is logged
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "tune@t" and parent.data.metrics["tune/best_value"] == pytest.approx(best["value"])
    # the study and its trials in the experiment of the paper they tune (paper 4: mixing)
    assert {client.get_experiment(r.info.experiment_id).name for r in [parent, *runs]} == {
        "s2r/paper4-mixing-ratio-mrgan"}
    arts = {a.path for a in client.list_artifacts(parent_id, "plots")}
    assert "plots/optimization_history.png" in arts


def test_resume_continues_and_fresh_start_is_refused(tmp_path: Path, tiny_prepared: Path) -> None:
    params = study_params(tmp_path, n_trials=2)
    tune.run(opts(tmp_path, tiny_prepared, params))
    with pytest.raises(ConfigError, match="already exists .*--resume"):
        tune.run(opts(tmp_path, tiny_prepared, params))
    o = opts(tmp_path, tiny_prepared, params, resume=True, n_trials=3)
    tune.run(o)
    assert len(trials(o)) == 3
    tune.run(opts(tmp_path, tiny_prepared, params, restart=True, n_trials=1))
    assert len(trials(o)) == 1


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch):
    """Replace training by a script: per trial number, the per-epoch values it reports (or an exception)."""
    script: dict[int, Any] = {}

    def train(request, params):  # stages.train(TrainRequest, Params)
        n, on_epoch = int(request.run_name.rsplit("#", 1)[1]), request.on_epoch
        plan = script[n]
        if isinstance(plan, Exception):
            raise plan
        for epoch, v in enumerate(plan, 1):
            on_epoch(epoch, {"val_accuracy": v, "val_loss": 1 - v})
        return {"val_accuracy": plan[-1], "val_loss": float(n), "mlflow_run_id": f"run{n}"}

    monkeypatch.setattr(stages, "train", train)
    return script


def test_pruner_prunes_bad_intermediate_value(tmp_path: Path, tiny_prepared: Path, fake_train) -> None:
    fake_train.update({0: [0.8, 0.9], 1: [0.8, 0.9], 2: [0.1, 0.9]})
    o = opts(tmp_path, tiny_prepared, study_params(tmp_path, pruner="median", n_startup_trials=2,
                                                   pruner_warmup_epochs=0))
    tune.run(o)
    ts = trials(o)
    assert [t.state.name for t in ts] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert ts[2].intermediate_values == {1: 0.1}


def test_failing_and_nan_trials_are_recorded_and_study_goes_on(tmp_path: Path, tiny_prepared: Path,
                                                                fake_train) -> None:
    fake_train.update({0: RuntimeError("boom"), 1: [float("nan")], 2: [0.5], 3: [0.6], 4: [0.7]})
    o = opts(tmp_path, tiny_prepared, study_params(tmp_path))
    res = tune.run(o)
    ts = trials(o)
    assert [t.state.name for t in ts] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert ts[0].user_attrs["fail_reason"] == "RuntimeError: boom"
    assert "not finite" in ts[1].user_attrs["fail_reason"]
    assert res["best"]["value"] == 0.7 and res["metrics"]["n_fail"] == 2


def test_cli_tune_and_unknown_study(tmp_path: Path, tiny_prepared: Path, fake_train) -> None:
    fake_train.update({0: [0.5], 1: [0.6]})
    params = study_params(tmp_path, n_trials=2)
    out = CliRunner().invoke(main, ["tune", "--study", "t", "--data", str(tiny_prepared), "--params", str(params),
                                    "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert out.exit_code == 0 and "n_complete=2" in out.output
    bad = CliRunner().invoke(main, ["tune", "--study", "nope", "--data", str(tiny_prepared), "--params", str(params)])
    assert bad.exit_code == 2 and "no study 'nope'" in bad.output


@pytest.mark.parametrize(("study", "key"), [
    ({"sampler": "grid"}, "search_space.methods.mixing.real_fraction"),
    ({"pruner": "median", "objectives": [{"metric": "val_accuracy", "direction": "maximize"},
                                         {"metric": "val_loss", "direction": "minimize"}]}, "pruner"),
    ({"search_space": {"methods.mixing.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
     "methods.mixing.lr"),
    ({"search_space": {"methods.mixing.epochs": {"type": "int", "low": 1, "high": 2.5}}}, "methods.mixing.epochs"),
    ({"n_trials": 0}, "n_trials"),
    ({"search_space": {"methods.mixing.nope": {"type": "int", "low": 1, "high": 2}}}, "methods.mixing.nope"),
    ({"sampler": "cmaes", "search_space": {"methods.mixing.augment": {"type": "categorical", "choices": [True]}}},
     "sampler"),
])
def test_invalid_study_spec_names_key(tmp_path: Path, study: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_params(study_params(tmp_path, **study))
    assert "studies" in str(e.value) and key in str(e.value)


def test_grid_values_and_samplers() -> None:
    from s2r.config import SearchParam, StudySpec

    assert tune.grid_values("k", SearchParam(type="int", low=1, high=7, step=3)) == [1, 4, 7]
    assert tune.grid_values("k", SearchParam(type="float", low=0.0, high=0.5, step=0.25)) == [0.0, 0.25, 0.5]
    spec = StudySpec(method="mixing", objectives=[], search_space={"a": SearchParam(type="float", low=0, high=1)},
                     sampler="tpe", pruner="median", n_trials=4, seed=0, n_startup_trials=3, pruner_warmup_epochs=1)
    for name, cls in [("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler")]:
        spec.sampler = name
        assert type(tune.build_sampler(spec)).__name__ == cls
    spec.sampler, spec.n_startup_trials = "cmaes", 1  # the CMA-ES path itself needs the `cmaes` package
    study = optuna.create_study(sampler=tune.build_sampler(spec))
    study.optimize(lambda t: (t.suggest_float("a", 0, 1) - 0.3) ** 2 + t.suggest_float("b", 0, 1), n_trials=4)
    assert any(k.startswith("cma:") for k in study.trials[-1].system_attrs)  # sampled by CMA-ES, no fallback
    for name, cls in [("median", "MedianPruner"), ("hyperband", "HyperbandPruner"),
                      ("successive_halving", "SuccessiveHalvingPruner"), ("none", "NopPruner")]:
        spec.pruner = name
        assert type(tune.build_pruner(spec)).__name__ == cls


def test_identical_params_reuse_completed_trial(tmp_path: Path, tiny_prepared: Path, fake_train) -> None:
    fake_train.update({0: [0.5], 1: [0.6], 2: [0.7]})
    params = study_params(tmp_path, n_trials=3, search_space={
        "methods.mixing.augment": {"type": "categorical", "choices": [False]}})
    o = opts(tmp_path, tiny_prepared, params)
    tune.run(o)
    ts = trials(o)
    assert [t.value for t in ts] == [0.5, 0.5, 0.5]  # trials 1 and 2 never trained
    assert [t.user_attrs.get("duplicate_of") for t in ts] == [None, 0, 0]


def test_pruner_waits_for_warmup(tmp_path: Path, tiny_prepared: Path, fake_train) -> None:
    fake_train.update({0: [0.8, 0.9, 0.9], 1: [0.8, 0.9, 0.9], 2: [0.1, 0.1, 0.95], 3: [0.1, 0.1, 0.2]})
    o = opts(tmp_path, tiny_prepared, study_params(tmp_path, pruner="median", n_startup_trials=2, n_trials=4,
                                                   pruner_warmup_epochs=2))
    tune.run(o)
    ts = trials(o)
    assert [t.state.name for t in ts] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert max(ts[3].intermediate_values) == 3  # judged only after the warm-up


def test_multi_objective_pareto_front(tmp_path: Path, tiny_prepared: Path, fake_train) -> None:
    # (accuracy up, loss = trial number down): trials 0 and 2 are Pareto-optimal, 1 is dominated by 0
    fake_train.update({0: [0.6], 1: [0.5], 2: [0.9]})
    o = opts(tmp_path, tiny_prepared, study_params(tmp_path, objectives=[
        {"metric": "val_accuracy", "direction": "maximize"}, {"metric": "val_loss", "direction": "minimize"}]))
    res = tune.run(o)
    front = sorted(t["trial"] for t in res["best"]["best_trials"])
    assert front == [0, 2] and res["metrics"]["n_pareto"] == 2
    assert yaml.safe_load((o.out_dir / "best.yaml").read_text())["best_trials"][0]["values"]


def test_two_local_workers_share_the_journal(tmp_path: Path, tiny_prepared: Path) -> None:
    import os
    import subprocess
    import sys

    params = study_params(tmp_path, n_trials=4)
    cmd = [sys.executable, "-m", "s2r.cli", "tune", "--study", "t", "--data", str(tiny_prepared), "--params",
           str(params), "--out", str(tmp_path / "out"), "--resume"]
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ml.db'}"}
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outs
    o = tune.TuneOptions(study="t", data_dir=tiny_prepared, params_path=params, out_dir=tmp_path / "out",
                         study_name="t")
    ts = trials(o)
    numbers = [t.number for t in ts]
    assert len(numbers) == len(set(numbers)) and sum(t.state.name == "COMPLETE" for t in ts) >= 4
    assert len({t.user_attrs["worker_pid"] for t in ts}) == 2  # both processes ran trials
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'tune'")
    assert len(runs) == 1  # one parent run although both workers started at the same instant


def test_threads_auto_divides_the_cores_among_local_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    monkeypatch.setattr("psutil.cpu_count", lambda logical=True: 8)
    monkeypatch.setenv("S2R_LOCAL_WORKERS", "2")
    assert stages.choose_threads("auto") == (2, "auto: 5 cores / 2 local workers")
    monkeypatch.setenv("S2R_LOCAL_WORKERS", "9")
    assert stages.choose_threads("auto")[0] == 1  # never 0
    monkeypatch.setattr("psutil.cpu_count", lambda logical=True: 2 if not logical else 4)  # 2 cores, 2 threads each
    monkeypatch.setenv("S2R_LOCAL_WORKERS", "1")
    assert stages.choose_threads("auto") == (2, "auto: 2 cores / 1 local worker")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's explicit choice wins
    assert stages.choose_threads("auto") == (3, "auto: OMP_NUM_THREADS=3")
    assert stages.choose_threads(4) == (4, "train.threads=4")
    assert stages.choose_threads(0)[0] == 0


@pytest.mark.parametrize("value", ["fast", -1])
def test_threads_setting_is_checked(tmp_path: Path, value: Any) -> None:
    raw = tiny_params_dict()
    raw["train"]["threads"] = value
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="threads"):
        load_params(p)


def test_worker_registry_counts_live_local_workers_and_judges_remote_ones(tmp_path: Path) -> None:
    import os
    import time

    from s2r.tracking import process_identity

    me = process_identity()
    folder = tmp_path / "workers"
    with tune.Workers(folder, heartbeat_interval=60) as w:
        (folder / "ghost.json").write_text(json.dumps(me | {"start": me["start"] - 500}))  # a dead local worker
        remote = {"host": "elsewhere", "pid": 5, "pidns": "", "boot": 0, "start": 1.0}
        (folder / "elsewhere.5.json").write_text(json.dumps(remote))
        assert w.local_count() == 1  # only this process; the remote one runs on its own cores
        assert w.alive(me, grace=30) and not w.alive(me | {"start": me["start"] - 500}, grace=30)
        assert w.alive(remote, grace=30)  # its file was just written
        old = time.time() - 100
        os.utime(folder / "elsewhere.5.json", (old, old))
        assert not w.alive(remote, grace=30)  # no heartbeat for longer than the grace period
    assert not w.file.exists()  # a worker that leaves normally removes its file
