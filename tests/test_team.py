"""The team setup end to end, as a lab runs it across machines.

`s2r team up --host 127.0.0.2` (a second loopback address standing in for the server's LAN address, so login and
TLS are on), a DVC remote, two tuning workers in two working directories (as two machines) with the credentials
`team up` handed out in DIR/env, one killed mid-trial, one training; then every place a password could leak is
searched. The same team folder is then served on 127.0.0.1 (open, no TLS), and `s2r team down` stops everything.

Marked `postgres`: runs where `$S2R_TEST_POSTGRES_URL` is set, as in CI (`.ci/run` installs PostgreSQL through
tests/services/postgres.sh and adds 127.0.0.2/32 to `lo` with tests/services/loopback.sh); it starts its own
throwaway cluster and MLflow server on free ports with those binaries.
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
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import REPO, service_missing
from s2r import team
from s2r import team_security as sec


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri() -> object:
    """These tests point mlflow at a team server or a private store; later tests must get the suite's store back
    (a leaked URI of a stopped server makes every later MLflow call retry against it for minutes)."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


@pytest.fixture
def postgres_installed() -> None:
    """As tests/test_tune_postgres.py: `.ci/run` / `make test-postgres` brought PostgreSQL up, so its binaries are
    installed; this test starts a cluster of its own with them."""
    if not os.environ.get("S2R_TEST_POSTGRES_URL"):
        service_missing("S2R_TEST_POSTGRES_URL is not set: PostgreSQL was not set up (make test-postgres or .ci/run)")


SECOND = "127.0.0.2"  # "another machine": the team server's address


def _source_address(addr: str) -> str:
    """The source address Linux picks for a TCP connection to `addr`."""
    with socket.socket() as srv, socket.socket() as cli:
        srv.bind((addr, 0))
        srv.listen(1)
        cli.connect(srv.getsockname())
        return str(cli.getsockname()[0])


@pytest.fixture
def second_loopback() -> Iterator[str]:
    """127.0.0.2 as both ends of connections to it (tests/services/loopback.sh; removed again if added here)."""
    script = [str(REPO / "tests" / "services" / "loopback.sh")]
    added = False
    if _source_address(SECOND) != SECOND:
        r = subprocess.run(["bash", *script, "add"], capture_output=True, text=True)
        added = r.returncode == 0
        if _source_address(SECOND) != SECOND:
            service_missing(f"cannot make {SECOND} a source address on lo: {r.stderr.strip()}")
    yield SECOND
    if added:
        subprocess.run(["bash", *script, "del"], capture_output=True)


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
    return r.stdout + r.stderr


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


class ArgvWatch(threading.Thread):
    """Samples the command line of every process (/proc/*/cmdline) every 0.1 s while the team runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[str] = set()
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            for f in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    self.seen.add(f.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                except OSError:
                    pass
            self.samples += 1

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


def _dvc_two_machines(tiny_prepared: Path, raw: dict, tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """Machine A prepares the data and pushes it to a DVC remote; machine B pulls it (no regeneration)."""
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
    return a, b


def _check_handed_out(up_text: str, team_dir: Path, pg_port: int, ml_port: int) -> dict[str, str]:
    """`team up` prints the server's https URL and where the credentials are; DIR/env (mode 600) holds them."""
    printed = dict(line.split("=", 1) for line in up_text.splitlines() if "=" in line and line[0] != "#")
    assert printed == {"MLFLOW_TRACKING_URI": f"https://{SECOND}:{ml_port}"}, up_text
    creds = team.read_env(team_dir / "env")
    assert creds["MLFLOW_TRACKING_URI"] == printed["MLFLOW_TRACKING_URI"]
    assert creds["MLFLOW_TRACKING_USERNAME"] == sec.WORKER_USER and len(creds["MLFLOW_TRACKING_PASSWORD"]) >= 24
    assert creds["MLFLOW_TRACKING_SERVER_CERT_PATH"] == str(team_dir / "tls" / "server.crt")
    assert creds["S2R_OPTUNA_STORAGE"].endswith(f"@{SECOND}:{pg_port}/s2r_optuna?{team.PG_SSL}")
    for private in ["env", "team.json", "mlflow.log", *(f"secrets/{p.name}" for p in (team_dir / "secrets").iterdir())]:
        mode = (team_dir / private).stat().st_mode & 0o777
        assert mode == 0o600, f"{private} has mode {oct(mode)}"
    for port in (pg_port, ml_port):
        assert team.listening_addresses(port) == [SECOND], f"port {port}: {team.listening_addresses(port)}"
    return creds


def _check_postgres_tls(creds: dict[str, str], pg_port: int) -> list[str]:
    """From 127.0.0.2 (not the loopback 127.0.0.1): a login without TLS is refused, the workers' URL gets TLS, and
    the workers' role cannot reach MLflow's database."""
    import psycopg2
    import sqlalchemy as sa

    url = sa.engine.make_url(creds["S2R_OPTUNA_STORAGE"])
    login = {"host": SECOND, "port": pg_port, "user": url.username, "password": url.password, "connect_timeout": 20}
    with pytest.raises(psycopg2.OperationalError) as plain:
        psycopg2.connect(dbname="s2r_optuna", sslmode="disable", **login)
    assert f'host "{SECOND}"' in str(plain.value) and "no encryption" in str(plain.value), str(plain.value)
    conn = psycopg2.connect(dbname="s2r_optuna", sslmode="require", channel_binding="require", **login)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT ssl, version, host(inet_client_addr()) FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        tls_on, version, client = cur.fetchone()
    conn.close()
    assert tls_on and client == SECOND, (tls_on, client)
    with pytest.raises(psycopg2.OperationalError) as other_db:
        psycopg2.connect(dbname="s2r_mlflow", sslmode="require", **login)
    assert "no pg_hba.conf entry" in str(other_db.value), str(other_db.value)
    return [f"psql {SECOND}:{pg_port} sslmode=disable -> refused: {str(plain.value).strip()}",
            f"psql {SECOND}:{pg_port} sslmode=require channel_binding=require -> {version}, client {client}",
            f"psql {SECOND}:{pg_port} dbname=s2r_mlflow as s2r -> refused: {str(other_db.value).strip()}"]


def _check_mlflow_login(team_dir: Path, creds: dict[str, str], env: dict[str, str]) -> tuple[list[str], str]:
    """Without a login or with a wrong one: 401; a read-only user (`s2r team user`): reads, 403 on create-run; the
    worker user logs a run and an artifact; an unknown Host header: 403; plain http on the TLS port: no answer."""
    import requests

    uri, cert = creds["MLFLOW_TRACKING_URI"], creds["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    user_out = _cli("team", "user", "reader", "--dir", str(team_dir), cwd=team_dir, env=env)
    reader = team.read_env(team_dir / "users" / "reader.env")
    assert (team_dir / "users" / "reader.env").stat().st_mode & 0o777 == 0o600
    worker = (creds["MLFLOW_TRACKING_USERNAME"], creds["MLFLOW_TRACKING_PASSWORD"])
    run_id, exp_id = _worker_logs_run_and_artifact(uri, cert, worker)
    search, create = "/api/2.0/mlflow/experiments/search", "/api/2.0/mlflow/runs/create"
    cases = [("POST", search, None, {}, 401), ("POST", search, (worker[0], "wrong-password"), {}, 401),
             ("POST", search, (reader["MLFLOW_TRACKING_USERNAME"], reader["MLFLOW_TRACKING_PASSWORD"]), {}, 200),
             ("POST", create, (reader["MLFLOW_TRACKING_USERNAME"], reader["MLFLOW_TRACKING_PASSWORD"]), {}, 403),
             ("POST", create, worker, {}, 200), ("POST", search, worker, {"Host": "evil.example"}, 403)]
    lines = []
    for method, path, auth, headers, want in cases:
        body = {"experiment_id": exp_id} if path == create else {"max_results": 1}
        r = requests.request(method, uri + path, json=body, auth=auth, headers=headers, verify=cert, timeout=120)
        who = "no login" if auth is None else f"user {auth[0]}" + (" (wrong password)" if "wrong" in auth[1] else "")
        lines.append(f"{method} {path} [{who}{', Host: evil.example' if headers else ''}] -> {r.status_code} "
                     f"{r.text.strip()[:60]!r}")
        assert r.status_code == want, lines[-1]
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(uri.replace("https://", "http://") + "/health", timeout=30)
    lines.append(f"GET {uri.replace('https://', 'http://')}/health (plain http) -> connection refused by TLS")
    return [f"worker {worker[0]}: run {run_id} with an artifact, listed back", *lines], user_out


def _worker_logs_run_and_artifact(uri: str, cert: str, login: tuple[str, str]) -> tuple[str, str]:
    """As the worker user, through the Python client: a run with a param and an artifact, read back."""
    env = {"MLFLOW_TRACKING_USERNAME": login[0], "MLFLOW_TRACKING_PASSWORD": login[1],
           "MLFLOW_TRACKING_SERVER_CERT_PATH": cert}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import mlflow

        client = mlflow.MlflowClient(uri)
        exp_id = client.create_experiment(f"login-check-{uuid.uuid4().hex[:8]}")
        run = client.create_run(exp_id)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "note.txt").write_text("written by the worker user")
            client.log_artifact(run.info.run_id, str(Path(tmp) / "note.txt"))
        client.log_param(run.info.run_id, "who", login[0])
        client.set_terminated(run.info.run_id)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    return run.info.run_id, exp_id


def _tune_workers(a: Path, b: Path, wenv: dict[str, str], name: str) -> tuple[list, dict[str, Path], int]:
    """Workers A and B share the study (storage URL by environment); A is SIGKILLed mid-trial, B finishes it."""
    import optuna
    from optuna.trial import TrialState

    cmd = [PY, "-m", "s2r.cli", "tune", "--study", STUDY, "--data", "data/prepared/tiny", "--resume", "--n-trials",
           str(N_TRIALS), "--heartbeat-interval", str(HEARTBEAT), "--grace-period", str(GRACE), "--study-name", name]
    logs, workers = {"A": a / "worker.log", "B": b / "worker.log"}, {}
    rdb = optuna.storages.RDBStorage(wenv["S2R_OPTUNA_STORAGE"])

    def start(label: str, cwd: Path) -> subprocess.Popen:
        with open(logs[label], "wb") as f:  # S2R_WORKER: each worker its own sampler seed
            workers[label] = subprocess.Popen(cmd, cwd=cwd, env=wenv | {"S2R_WORKER": str(len(workers))},
                                              stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return workers[label]

    def trials() -> list:
        try:
            return optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False)
        except KeyError:
            return []

    def report() -> str:
        return "\n".join(f"--- worker {k} (exit {p.poll()}):\n{_tail(logs[k])}" for k, p in workers.items())

    def wait_for(what: str, cond, alive: tuple[str, ...], timeout: float = 240):
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

    try:
        pa = start("A", a)
        wait_for("worker A to run a trial", lambda: running_of(pa.pid), ("A",))
        pb = start("B", b)
        wait_for("worker B to run a trial", lambda: any(t.user_attrs.get("worker_pid") == pb.pid for t in trials()),
                 ("A", "B"))
        victim = wait_for("worker A in the middle of a trial", lambda: next(
            (t for t in running_of(pa.pid) if t.datetime_start is not None
             and time.time() - t.datetime_start.timestamp() >= 1.5 * HEARTBEAT), None), ("A", "B"))
        pa.send_signal(signal.SIGKILL)
        pa.wait(timeout=30)
        assert {t.number: t.state for t in trials()}[victim.number] == TrialState.RUNNING, (
            f"trial {victim.number} finished before worker A was killed\n{report()}")
        try:
            rc = pb.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker B did not finish\n{report()}")
        assert rc == 0, f"worker B exited {rc}\n{report()}"
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return trials(), logs, victim.number


def _check_trials(final: list, victim: int, logs: dict[str, Path]) -> str:
    """Every trial settled; the killed one FAIL and retried; enough finished."""
    from optuna.trial import TrialState

    table = "\n".join(f"  #{t.number} {t.state.name} pid={t.user_attrs.get('worker_pid')} "
                      f"retry_of={t.system_attrs.get('failed_trial')}" for t in final)
    info = f"victim #{victim}, trials:\n{table}\n" + "\n".join(f"--- {k}:\n{_tail(p)}" for k, p in logs.items())
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in final), info
    assert {t.number: t for t in final}[victim].state == TrialState.FAIL, info
    retries = [t for t in final if t.system_attrs.get("failed_trial") == victim]
    assert any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in retries), info
    assert len([t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) >= N_TRIALS, info
    return info


def _check_runs_through_server(tracking: str, name: str, final: list, info: str, team_dir: Path,
                               tmp_path: Path) -> None:
    """One parent run, every trial's run nested under it, artifacts proxied by the server and readable."""
    import mlflow
    from optuna.trial import TrialState

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
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        if t.state == TrialState.COMPLETE:
            assert run.info.run_id == t.user_attrs["mlflow_run_id"]
            assert [f.path for f in client.list_artifacts(run.info.run_id)], f"trial #{t.number}: no artifacts"
    best = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="best.yaml", dst_path=str(tmp_path / "parent"))).read_text())
    assert best["study_name"] == name and best["trial"] in by_trial
    assert parent.data.params["storage"].startswith("postgresql+psycopg2://s2r:***@"), parent.data.params
    # the artifacts live on the server's disk (DIR/artifacts), nowhere in the workers' folders
    assert any((team_dir / "artifacts").rglob("best.yaml"))


def _files_text(*roots: Path) -> str:
    """The contents of these files and of every file under these folders."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return "\n".join(p.read_bytes().decode(errors="replace") for p in files)


def _mlflow_text(tracking: str) -> str:
    """Every experiment tag, run name, param and tag (descriptions are the tag mlflow.note.content), as admin."""
    import mlflow

    client = mlflow.MlflowClient(tracking)
    exps = client.search_experiments(view_type=mlflow.entities.ViewType.ALL)
    out = [json.dumps(e.tags) for e in exps]
    for r in client.search_runs([e.experiment_id for e in exps], run_view_type=mlflow.entities.ViewType.ALL,
                                max_results=5000):
        out.append(json.dumps([r.info.run_name, r.data.params, r.data.tags]))
    assert len(out) > len(exps), "no runs read back"
    return "\n".join(out)


def _pg_dump(team_dir: Path, port: int, db: str) -> str:
    bindir = team.pg_bindir()
    assert bindir is not None
    cmd = team._as_owner([str(bindir / "pg_dump"), "-h", str(team_dir / "pg"), "-p", str(port), "-U", "postgres", db])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "CREATE TABLE" in r.stdout, r.stderr
    return r.stdout


def _leaks(secrets: dict[str, str], places: dict[str, str]) -> list[str]:
    """One line per place: how many of the team's secrets occur in it."""
    lines = []
    for place, text in places.items():
        hits = [name for name, value in secrets.items() if value in text]
        lines.append(f"{len(hits)} hits  {place} ({len(text)} characters){': ' + ', '.join(hits) if hits else ''}")
    return lines


def _check_loopback_mode(team_dir: Path, env: dict[str, str], pg_port: int, ml_port: int) -> list[str]:
    """The same folder served on 127.0.0.1: open (no login, no TLS), and says so; loopback-only listeners."""
    import requests

    _cli("team", "down", "--dir", str(team_dir), cwd=team_dir, env=env)
    _cli("team", "up", "--dir", str(team_dir), "--pg-port", str(pg_port), "--mlflow-port", str(ml_port),
         "--mlflow-workers", "1", cwd=team_dir, env=env, timeout=300)
    creds = team.read_env(team_dir / "env")
    assert creds.keys() == {"MLFLOW_TRACKING_URI", "S2R_OPTUNA_STORAGE"}, creds.keys()
    assert creds["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ml_port}"
    r = requests.post(f"http://127.0.0.1:{ml_port}/api/2.0/mlflow/experiments/search", json={"max_results": 1},
                      timeout=60)
    assert r.status_code == 200, r.text
    status = _cli("team", "status", "--dir", str(team_dir), cwd=team_dir, env=env)
    assert "auth: off (loopback only" in status and "tls: off (loopback only)" in status, status
    for port in (pg_port, ml_port):
        assert team.listening_addresses(port) == ["127.0.0.1"], f"port {port}: {team.listening_addresses(port)}"
    return [f"loopback mode: POST /api/2.0/mlflow/experiments/search [no login] -> {r.status_code}", status]


def _team_env(tmp_path: Path) -> dict[str, str]:
    """The environment of the test's `s2r` processes: this checkout's package, no credentials of the caller."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DVC_ROOT", "S2R_TEST_POSTGRES_URL") and not k.startswith("MLFLOW_TRACKING_")}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "DVC_NO_ANALYTICS": "1", "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    src = str(Path(team.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _study_params(tiny_params_file: Path) -> dict:
    """The tiny mixing classifier, trials of a few seconds so one can be killed in the middle."""
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["train"]["threads"] = 1
    raw["methods"]["mixing"].update(epochs=3, steps_per_epoch=60)
    raw["studies"] = {STUDY: {
        "method": "mixing", "objectives": [{"metric": "val_accuracy", "direction": "maximize"}],
        "search_space": {"methods.mixing.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
        "sampler": "random", "pruner": "none", "n_trials": N_TRIALS, "seed": 0}}
    return raw


def _places(team_dir: Path, pg_port: int, tracking: str, machines: tuple[Path, Path], logs: dict[str, Path],
            outputs: dict[str, str], watch: ArgvWatch) -> dict[str, str]:
    """Every place a password could have leaked to, read back (MLflow as admin)."""
    a, b = machines
    return {
        "MLflow: every experiment tag, run name, param, tag and description (as admin)": _mlflow_text(tracking),
        "MLflow artifacts on the server (DIR/artifacts/**)": _files_text(team_dir / "artifacts"),
        "database s2r_mlflow (pg_dump)": _pg_dump(team_dir, pg_port, "s2r_mlflow"),
        "database s2r_optuna (pg_dump)": _pg_dump(team_dir, pg_port, "s2r_optuna"),
        "data/tuning/** of both machines": _files_text(a / "data" / "tuning", b / "data" / "tuning"),
        "output of s2r tune (worker logs A, B)": _files_text(*logs.values()),
        "data/models, data/checkpoints of machine B": _files_text(b / "data" / "models", b / "data" / "checkpoints"),
        **outputs,
        f"argv of every process (/proc/*/cmdline, {watch.samples} samples every 0.1 s)": "\n".join(watch.seen),
        "DIR/team.json, MLflow server log, PostgreSQL server log":
            _files_text(team_dir / "team.json", team_dir / "mlflow.log", team_dir / "pg" / "server.log"),
    }


@pytest.mark.postgres
def test_team_login_tls_two_machines_one_killed_no_secret_leaks(
        postgres_installed: None, second_loopback: str, tiny_prepared: Path, tiny_params_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the cluster folder must be reachable by the `postgres` user when the tests run as root: not under
    # pytest's tmp_path (mode 700), but a folder of its own under /tmp
    team_dir = Path(tempfile.mkdtemp(prefix="s2r-team-test-"))
    os.chmod(team_dir, 0o711)
    pg_port, ml_port, env = _free_port(), _free_port(), _team_env(tmp_path)
    watch, upp, report, phases, t0 = ArgvWatch(), None, [], [], time.monotonic()
    watch.start()
    try:
        with open(tmp_path / "team-up.out", "w+") as up_out:  # team up in the background while DVC works
            upp = subprocess.Popen([PY, "-m", "s2r.cli", "team", "up", "--dir", str(team_dir), "--host", SECOND,
                                    "--pg-port", str(pg_port), "--mlflow-port", str(ml_port), "--mlflow-workers", "1"],
                                   env=env, stdout=up_out, stderr=subprocess.STDOUT, text=True)
            a, b = _dvc_two_machines(tiny_prepared, _study_params(tiny_params_file), tmp_path, env)
            rc_up = upp.wait(timeout=400)
            up_out.seek(0)
            up_text = up_out.read()
        assert rc_up == 0, f"s2r team up failed\n{up_text}\n{_tail(team_dir / 'mlflow.log')}"
        phases.append(f"team up (DVC push/pull meanwhile): {time.monotonic() - t0:.0f} s")
        creds = _check_handed_out(up_text, team_dir, pg_port, ml_port)
        report += _check_postgres_tls(creds, pg_port)
        login_lines, user_out = _check_mlflow_login(team_dir, creds, env)
        report += login_lines
        phases.append(f"TLS and login checks: {time.monotonic() - t0:.0f} s")
        # --- two workers of one study, one per "machine", with DIR/env's credentials; A killed mid-trial; a training
        name, wenv = f"s2r-teamtest-{uuid.uuid4().hex[:10]}", env | creds
        final, logs, victim = _tune_workers(a, b, wenv, name)
        info = _check_trials(final, victim, logs)
        phases.append(f"two tuning workers: {time.monotonic() - t0:.0f} s")
        train_out = _cli("train", "mixing", "--data", "data/prepared/tiny", "--out", "data/models/mixing", "--set",
                         "methods.mixing.epochs=1", cwd=b, env=wenv)
        status_out = _cli("team", "status", "--dir", str(team_dir), cwd=team_dir, env=env)
        phases.append(f"training and team status: {time.monotonic() - t0:.0f} s")
    finally:
        watch.stop()
        if upp is not None and upp.poll() is None:
            upp.kill()
            upp.wait(timeout=30)
    for line in ("auth: on (MLflow basic-auth: a request without login gets HTTP 401", "tls: on (verified handshake",
                 "postgresql_tls: on (ssl = on; a login without TLS is refused", "up: True"):
        assert line in status_out, status_out
    try:  # --- read back as admin: runs, artifacts; then every place a secret could be -----------------------------
        for k, v in {**creds, "MLFLOW_TRACKING_USERNAME": sec.ADMIN_USER,
                     "MLFLOW_TRACKING_PASSWORD": sec.secret(team_dir, "mlflow-admin")}.items():
            monkeypatch.setenv(k, v)
        _check_runs_through_server(creds["MLFLOW_TRACKING_URI"], name, final, info, team_dir, tmp_path)
        secrets = {p.name: p.read_text().strip() for p in (team_dir / "secrets").iterdir()}
        assert {"pg-optuna", "pg-tracking", "mlflow-admin", "mlflow-worker", "user-reader"} <= secrets.keys()
        assert any("mlflow server" in c for c in watch.seen) and any("s2r.cli tune" in c for c in watch.seen)
        outputs = {"output of s2r train (machine B)": train_out,
                   "output of s2r team up / status / user": up_text + status_out + user_out}
        leaks = _leaks(secrets, _places(team_dir, pg_port, creds["MLFLOW_TRACKING_URI"], (a, b), logs, outputs,
                                        watch))
        report += ["secrets searched: " + ", ".join(sorted(secrets)), *leaks, status_out]
        phases.append(f"secret search: {time.monotonic() - t0:.0f} s")
        report += _check_loopback_mode(team_dir, env, pg_port, ml_port)
        phases.append(f"loopback mode: {time.monotonic() - t0:.0f} s")
        print("\n".join(report + phases))
        assert all(line.startswith("0 hits") for line in leaks), "\n".join(leaks)
    finally:
        down = subprocess.run([PY, "-m", "s2r.cli", "team", "down", "--dir", str(team_dir)], env=env,
                              capture_output=True, text=True, timeout=120)
        left = {port: team.listening_addresses(port) for port in (pg_port, ml_port)}
        shutil.rmtree(team_dir, ignore_errors=True)
    assert down.returncode == 0, f"s2r team down failed\n{down.stdout}\n{down.stderr}"
    assert "MLflow server" in down.stdout and "PostgreSQL" in down.stdout, down.stdout
    assert left == {pg_port: [], ml_port: []}, f"still listening after team down: {left}"


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


def test_workers_get_the_storage_url_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`s2r tune --workers N` with $S2R_OPTUNA_STORAGE: no worker's command line holds the URL (its password would
    show in `ps`); each worker's environment does."""
    from s2r.cli import tune_cmd

    url = "postgresql+psycopg2://s2r:pw-0123456789abcdef@10.0.0.5:54330/s2r_optuna?sslmode=require"
    monkeypatch.setenv("S2R_OPTUNA_STORAGE", url)
    params = tune_cmd.make_context("tune", ["--study", "s", "--data", ".", "--workers", "2"]).params
    argv, storage = team.worker_command(tune_cmd, params)
    assert storage == url and not any("pw-0123456789abcdef" in a for a in argv) and "--storage" not in argv
    slot = team.plan_workers(workers=2, gpus=None, cores=2)[1]
    assert team.worker_env(slot, base={}, storage=storage)["S2R_OPTUNA_STORAGE"] == url


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
