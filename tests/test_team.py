"""The team setup end to end: `s2r team up` on 127.0.0.1, a DVC remote, two tuning workers in two working
directories (as two machines), one killed mid-trial, `s2r team down`.

The end-to-end test is marked `postgres` and runs where `$S2R_TEST_POSTGRES_URL` is set, as in CI (`.ci/run`
installs PostgreSQL through tests/services/postgres.sh); it starts its own throwaway cluster and MLflow server
on free ports with those binaries.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from s2r import team


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri() -> object:
    """These tests point mlflow at a team server or a private store; later tests must get the suite's store back
    (a leaked URI of a stopped server makes every later MLflow call retry against it for minutes)."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)

# as tests/test_tune_postgres.py: runs where `.ci/run` / `make test-postgres` brought PostgreSQL up (which also
# means its binaries are installed); this test starts a cluster of its own with them
requires_postgres = pytest.mark.skipif(
    not os.environ.get("S2R_TEST_POSTGRES_URL"),
    reason="S2R_TEST_POSTGRES_URL is not set: PostgreSQL was not set up (make test-postgres or .ci/run do it)")

STUDY = "teamtest"
N_TRIALS = 3
HEARTBEAT, GRACE = 1, 4
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 240) -> str:
    r = subprocess.run([PY, "-m", "s2r.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"s2r {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run([PY, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"dvc {' '.join(args)} in {cwd} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    if filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1:] != ([], []):
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def _tail(p: Path, n: int = 40) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<{e}>"


@pytest.mark.postgres
@requires_postgres
def test_team_two_machines_one_killed(tiny_prepared: Path, tiny_params_file: Path, tmp_path: Path) -> None:
    import mlflow
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the cluster folder must be reachable by the `postgres` user when the tests run as root: not under
    # pytest's tmp_path (mode 700), but a folder of its own under /tmp
    team_dir = Path(tempfile.mkdtemp(prefix="s2r-team-test-"))
    os.chmod(team_dir, 0o711)
    pg_port, ml_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_ROOT", "S2R_TEST_POSTGRES_URL", "MLFLOW_TRACKING_URI")}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "DVC_NO_ANALYTICS": "1", "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    src = str(Path(team.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])

    # the study: the tiny mixing classifier, trials of a few seconds so one can be killed in the middle
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["train"]["threads"] = 1
    raw["methods"]["mixing"].update(epochs=3, steps_per_epoch=60)
    raw["studies"] = {STUDY: {
        "method": "mixing",
        "objectives": [{"metric": "val_accuracy", "direction": "maximize"}],
        "search_space": {"methods.mixing.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
        "sampler": "random", "pruner": "none", "n_trials": N_TRIALS, "seed": 0,
    }}
    up = [PY, "-m", "s2r.cli", "team", "up", "--dir", str(team_dir), "--pg-port", str(pg_port),
          "--mlflow-port", str(ml_port), "--mlflow-workers", "1"]
    workers: dict[str, subprocess.Popen] = {}
    upp = None
    try:
        # --- team up, in the background while DVC works ------------------------------------------------------
        up_out = open(tmp_path / "team-up.out", "w+")
        upp = subprocess.Popen(up, env=env, stdout=up_out, stderr=subprocess.STDOUT, text=True)
        # --- DVC: machine A prepares the data and pushes it; machine B pulls it (no regeneration) -------------
        remote = tmp_path / "dvc-remote"
        a, b = tmp_path / "machine-a", tmp_path / "machine-b"
        for m in (a, b):
            m.mkdir()
            (m / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            _dvc("init", "--no-scm", "-q", cwd=m, env=env)
            _dvc("config", "core.analytics", "false", cwd=m, env=env)
        _dvc("remote", "add", "-d", "shared", str(remote), cwd=a, env=env)
        shutil.copytree(tiny_prepared, a / "data" / "prepared" / "tiny")
        _dvc("add", "-q", "data/prepared/tiny", cwd=a, env=env)
        _dvc("push", "-q", cwd=a, env=env)
        # what `git clone` gives machine B: the remote's config and the .dvc pointer file, no data
        shutil.copy(a / ".dvc" / "config", b / ".dvc" / "config")
        (b / "data" / "prepared").mkdir(parents=True)
        shutil.copy(a / "data" / "prepared" / "tiny.dvc", b / "data" / "prepared" / "tiny.dvc")
        assert not (b / "data" / "prepared" / "tiny").exists()
        _dvc("pull", "-q", cwd=b, env=env)
        assert _same_tree(tiny_prepared, b / "data" / "prepared" / "tiny"), "dvc pull did not restore the data"

        # --- team up done: both services on loopback only, the password in a private file --------------------
        try:
            rc_up = upp.wait(timeout=300)
        finally:
            if upp.poll() is None:
                upp.kill()
        up_out.seek(0)
        up_text = up_out.read()
        up_out.close()
        assert rc_up == 0, f"s2r team up failed\n{up_text}\n{_tail(team_dir / 'mlflow.log')}"
        printed = dict(line.split("=", 1) for line in up_text.splitlines() if "=" in line and line[0] != "#")
        tracking, storage = printed["MLFLOW_TRACKING_URI"], printed["S2R_OPTUNA_STORAGE"]
        assert tracking == f"http://127.0.0.1:{ml_port}"
        password = (team_dir / "password").read_text().strip()
        assert len(password) >= 24 and password in storage
        for private in ("password", "team.json", "env"):
            mode = (team_dir / private).stat().st_mode & 0o777
            assert mode == 0o600, f"{private} has mode {oct(mode)}"
        for port in (pg_port, ml_port):
            assert team.listening_addresses(port) == ["127.0.0.1"], (
                f"port {port} listens on {team.listening_addresses(port)}, expected loopback only")

        # --- two workers of one study, one per "machine"; A is killed in the middle of a trial -----------------
        name = f"s2r-teamtest-{uuid.uuid4().hex[:10]}"
        wenv = env | {"MLFLOW_TRACKING_URI": tracking}
        cmd = [PY, "-m", "s2r.cli", "tune", "--study", STUDY, "--data", "data/prepared/tiny", "--storage", storage,
               "--resume", "--n-trials", str(N_TRIALS), "--heartbeat-interval", str(HEARTBEAT),
               "--grace-period", str(GRACE), "--study-name", name]
        logs = {"A": a / "worker.log", "B": b / "worker.log"}

        def start(label: str, cwd: Path) -> subprocess.Popen:
            with open(logs[label], "wb") as f:  # S2R_WORKER: each worker its own sampler seed
                workers[label] = subprocess.Popen(cmd, cwd=cwd, env=wenv | {"S2R_WORKER": str(len(workers))},
                                                  stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            return workers[label]

        rdb = optuna.storages.RDBStorage(storage)

        def trials() -> list:
            try:
                return optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False)
            except KeyError:
                return []

        def report() -> str:
            return "\n".join(f"--- worker {k} (exit {p.poll()}):\n{_tail(logs[k])}" for k, p in workers.items())

        def wait_for(what: str, cond, alive: tuple[str, ...], timeout: float = 150):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for k in alive:
                    if workers[k].poll() is not None:
                        pytest.fail(f"worker {k} exited early while waiting for {what}\n{report()}")
                got = cond()
                if got:
                    return got
                time.sleep(0.2)
            pytest.fail(f"timed out waiting for {what}\n{report()}")

        def running_of(pid: int) -> list:
            return [t for t in trials() if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid") == pid]

        pa = start("A", a)
        wait_for("worker A to run a trial", lambda: running_of(pa.pid), ("A",))
        pb = start("B", b)
        wait_for("worker B to run a trial", lambda: any(t.user_attrs.get("worker_pid") == pb.pid for t in trials()),
                 ("A", "B"))

        def a_mid_trial():
            return next((t for t in running_of(pa.pid) if t.datetime_start is not None
                         and time.time() - t.datetime_start.timestamp() >= 1.5 * HEARTBEAT), None)

        victim = wait_for("worker A in the middle of a trial", a_mid_trial, ("A", "B"))
        pa.send_signal(signal.SIGKILL)
        pa.wait(timeout=30)
        assert {t.number: t.state for t in trials()}[victim.number] == TrialState.RUNNING, (
            f"trial {victim.number} finished before worker A was killed\n{report()}")
        try:
            rc = pb.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker B did not finish\n{report()}")
        assert rc == 0, f"worker B exited {rc}\n{report()}"

        # --- every trial settled; the killed one FAIL and retried ----------------------------------------------
        final = trials()
        table = "\n".join(f"  #{t.number} {t.state.name} pid={t.user_attrs.get('worker_pid')} "
                          f"retry_of={t.system_attrs.get('failed_trial')}" for t in final)
        info = f"victim #{victim.number}, trials:\n{table}\n{report()}"
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in final), info
        by_number = {t.number: t for t in final}
        assert by_number[victim.number].state == TrialState.FAIL, info
        retries = [t for t in final if t.system_attrs.get("failed_trial") == victim.number]
        assert any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in retries), info
        done = [t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) >= N_TRIALS, info

        # --- through the server: one parent run, every trial's run nested under it, artifacts readable ---------
        mlflow.set_tracking_uri(tracking)
        client = mlflow.MlflowClient(tracking)
        parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                     filter_string=f"tags.study = '{name}' and tags.stage = 'tune'")
        assert len(parents) == 1, f"{len(parents)} parent runs for study {name}\n{info}"
        parent = parents[0]
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.optuna_study = '{name}'")
        by_trial = {int(r.data.tags["optuna_trial"]): r for r in runs}
        for t in final:
            if "duplicate_of" in t.user_attrs:  # same params as a finished trial: its result (and run) reused
                assert t.user_attrs["mlflow_run_id"] == by_trial[t.user_attrs["duplicate_of"]].info.run_id, info
                continue
            run = by_trial.get(t.number)
            assert run is not None, f"trial #{t.number} has no MLflow run\n{info}"
            assert run.data.tags.get("mlflow.parentRunId") == parent.info.run_id, f"trial #{t.number} not nested"
            assert run.data.tags.get("trial_state") == t.state.name, f"trial #{t.number}: {run.data.tags}"
            # artifacts go through the server's proxy (mlflow-artifacts:), not to a path of the worker's machine
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
            if t.state == TrialState.COMPLETE:
                assert run.info.run_id == t.user_attrs["mlflow_run_id"]
                listed = [f.path for f in client.list_artifacts(run.info.run_id)]
                assert listed, f"trial #{t.number}: no artifacts listed through the server"
                got = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                               dst_path=str(tmp_path / f"dl{t.number}")))
                files = [p for p in got.rglob("*") if p.is_file()]
                assert files and any(p.stat().st_size > 0 for p in files), f"trial #{t.number}: empty download"
        best = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
            run_id=parent.info.run_id, artifact_path="best.yaml", dst_path=str(tmp_path / "parent"))).read_text())
        assert best["study_name"] == name and best["trial"] in by_trial
        # the artifacts live on the server's disk (DIR/artifacts), nowhere in the workers' folders
        assert any((team_dir / "artifacts").rglob("best.yaml"))
    finally:
        if upp is not None and upp.poll() is None:
            upp.kill()
            upp.wait(timeout=30)
        for p in workers.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        down = subprocess.run([PY, "-m", "s2r.cli", "team", "down", "--dir", str(team_dir)], env=env,
                              capture_output=True, text=True, timeout=120)
        left = {port: team.listening_addresses(port) for port in (pg_port, ml_port)}
        shutil.rmtree(team_dir, ignore_errors=True)
    assert down.returncode == 0, f"s2r team down failed\n{down.stdout}\n{down.stderr}"
    assert "MLflow server" in down.stdout and "PostgreSQL" in down.stdout, down.stdout
    assert left == {pg_port: [], ml_port: []}, f"still listening after team down: {left}"
    for port in (pg_port, ml_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still accepts connections"


def test_plan_workers_and_worker_env() -> None:
    """GPU slots round-robin with CUDA_VISIBLE_DEVICES; threads = cores // workers; CPU workers keep the env's GPUs."""
    plan = team.plan_workers(workers=None, gpus="0,1,2,3", workers_per_gpu=2, cores=16)
    assert [s.gpu for s in plan] == ["0", "1", "2", "3", "0", "1", "2", "3"] and {s.threads for s in plan} == {2}
    env = team.worker_env(plan[5], base={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "2" and env["S2R_WORKER"] == "5"
    cpu = team.plan_workers(workers=2, gpus=None, cores=2)
    assert [(s.gpu, s.threads) for s in cpu] == [(None, 1), (None, 1)]
    assert team.worker_env(cpu[1], base={"CUDA_VISIBLE_DEVICES": "7"})["CUDA_VISIBLE_DEVICES"] == "7"
    assert team.plan_workers(workers=3, gpus=None, cores=2)[0].threads == 1
    import click

    with pytest.raises(click.UsageError, match="disagrees"):
        team.plan_workers(workers=3, gpus="0,1", workers_per_gpu=1, cores=4)
    with pytest.raises(click.UsageError, match="distinct"):
        team.plan_workers(workers=None, gpus="0,0", cores=4)


def test_worker_command_line_round_trips() -> None:
    """The launcher rebuilds each worker's `s2r tune` command line from the parsed options, minus its own."""
    from s2r.cli import tune_cmd

    ctx = tune_cmd.make_context("tune", ["--study", "s", "--data", ".", "--storage", "postgresql+psycopg2://u@h/d",
                                         "--restart", "--grace-period", "7", "--gpus", "0,1", "--workers-per-gpu",
                                         "2"])
    args = team.cli_args(tune_cmd, ctx.params, skip=(*team.LAUNCHER_OPTS, "restart"))
    assert args[:4] == ["--study", "s", "--data", "."]
    assert "--grace-period" in args and args[args.index("--grace-period") + 1] == "7"
    assert not {"--restart", "--gpus", "--workers-per-gpu", "--resume"} & set(args)
    again = tune_cmd.make_context("tune", args).params
    assert {k: again[k] for k in ("study", "storage", "grace_period", "restart")} == {
        "study": "s", "storage": "postgresql+psycopg2://u@h/d", "grace_period": 7, "restart": False}
    assert json.dumps(again, default=str)


@pytest.mark.slow  # three processes importing torch + MLflow: ~15 s on a quiet 2-core machine, ~50 s loaded
def test_tune_workers_launches_processes_of_one_study(tmp_path: Path, tiny_prepared: Path,
                                                      tiny_params_file: Path) -> None:
    """`s2r tune --workers 2` (journal storage, one machine): two worker processes, one parent run, own seeds."""
    import mlflow
    import optuna

    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["studies"] = {"w": {
        "method": "mixing", "objectives": [{"metric": "val_accuracy", "direction": "maximize"}],
        "search_space": {"methods.mixing.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
        "sampler": "random", "pruner": "none", "n_trials": 4, "seed": 0}}
    tiny_params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    db = f"sqlite:///{tmp_path / 'ml.db'}"
    env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"} | {"MLFLOW_TRACKING_URI": db}
    src = str(Path(team.__file__).resolve().parents[1])  # this checkout's package, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    out = tmp_path / "out"
    r = subprocess.run([PY, "-m", "s2r.cli", "tune", "--study", "w", "--data", str(tiny_prepared), "--params",
                        str(tiny_params_file), "--out", str(out), "--workers", "2"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    logs = "\n".join(f"--- {p.name}:\n{_tail(p)}" for p in sorted((out / "workers").glob("*.log")))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{logs}"
    assert "worker 0: pid" in r.stdout and "worker 1: pid" in r.stdout and "n_complete=" in r.stdout, r.stdout
    for i in (0, 1):  # each worker ran the study to its end (worker 1 joined with --resume)
        assert "n_complete=" in (out / "workers" / f"worker-{i}.log").read_text(), logs
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="w", storage=JournalStorage(JournalFileBackend(str(out / "journal.log"))))
    ts = study.get_trials()
    assert sum(t.state.name == "COMPLETE" for t in ts) >= 4, logs
    drawn = [t.params["methods.mixing.lr"] for t in ts]
    assert len(set(drawn)) == len(drawn), f"workers drew the same points (same sampler seed?): {drawn}"
    mlflow.set_tracking_uri(db)
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.study = 'w' and tags.stage = 'tune'")
    assert len(parents) == 1, f"{len(parents)} parent runs"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.optuna_study = 'w'")
    assert runs and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
