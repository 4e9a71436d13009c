"""`s2r tune` with a PostgreSQL Optuna storage: two workers share one study; one dies mid-trial.

Needs $S2R_TEST_POSTGRES_URL (`.ci/run` and `make test-postgres` start a throwaway server with
tests/services/postgres.sh and set it); skipped without it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import service_missing

URL = os.environ.get("S2R_TEST_POSTGRES_URL", "")

pytestmark = pytest.mark.postgres


@pytest.fixture(autouse=True)
def _postgres() -> None:
    if not URL:
        service_missing("S2R_TEST_POSTGRES_URL is not set: start a server with tests/services/postgres.sh and export "
                        "its URL (make test-postgres does both)")

STUDY = "pgtest"
N_TRIALS = 6
HEARTBEAT, GRACE = 1, 4
WORKER_TIMEOUT = 180  # seconds for the surviving worker to finish the study


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_postgres_reachable() -> None:
    """The service answers with the driver the tuner uses, and Optuna can create/use/delete a study there."""
    import optuna
    import psycopg2
    import sqlalchemy as sa

    url = sa.engine.make_url(URL)
    assert url.drivername == "postgresql+psycopg2", f"expected a postgresql+psycopg2 URL, got {url.drivername}"
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                            dbname=url.database, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database()")
            assert cur.fetchone() == (url.username, url.database)
    finally:
        conn.close()

    engine = sa.create_engine(URL)
    try:
        with engine.connect() as c:
            assert c.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = _unique("s2r-sanity")
    study = optuna.create_study(storage=URL, study_name=name, sampler=optuna.samplers.RandomSampler(seed=0))
    try:
        study.optimize(lambda t: (t.suggest_float("x", -1.0, 1.0) - 0.5) ** 2, n_trials=3)
        again = optuna.load_study(study_name=name, storage=URL)
        states = [t.state for t in again.get_trials()]
        assert states == [optuna.trial.TrialState.COMPLETE] * 3, f"reloaded study has trial states {states}"
    finally:
        optuna.delete_study(study_name=name, storage=URL)
    assert name not in [s.study_name for s in optuna.get_all_study_summaries(URL, include_best_trial=False)]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<{e}>"


class Workers:
    """The tuning worker processes of one test; their outputs go to files (no pipe can fill up)."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.cmd, self.env, self.cwd = cmd, env, cwd
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, label: str) -> subprocess.Popen:
        log = self.cwd / f"worker-{label}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        self.procs[label], self.logs[label] = p, log
        return p

    def report(self) -> str:
        parts = []
        for label, p in self.procs.items():
            parts.append(f"--- worker {label} (pid {p.pid}, exit code {p.poll()}), last lines of output:\n"
                         f"{_tail(self.logs[label])}")
        return "\n".join(parts)

    def check_alive(self, *labels: str) -> None:
        for label in labels:
            rc = self.procs[label].poll()
            if rc is not None:
                pytest.fail(f"worker {label} exited early with code {rc}\n{self.report()}")

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


_storage = None


def _trials(name: str) -> list:
    """The study's trials as stored now (one storage object, so polling does not open a connection pool per call)."""
    import optuna

    global _storage
    if _storage is None:
        _storage = optuna.storages.RDBStorage(URL)
    try:
        return optuna.load_study(study_name=name, storage=_storage).get_trials(deepcopy=False)
    except KeyError:  # the first worker has not created the study yet
        return []


def _running_of(trials: list, pid: int) -> list:
    from optuna.trial import TrialState

    return [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid") == pid]


def _wait_for(what: str, cond, workers: Workers, alive: tuple[str, ...], timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers.check_alive(*alive)
        got = cond()
        if got:
            return got
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{workers.report()}")


def test_tune_two_workers_one_killed(tiny_prepared: Path, tiny_params_file: Path, tmp_path: Path) -> None:
    """Worker A is SIGKILLed mid-trial; worker B marks that trial FAIL (stale heartbeat), retries it, finishes."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["train"]["threads"] = 1  # two workers on a 2-core machine
    # ~90 steps/s on one core here: a trial trains ~3-4 s, so worker B still has several trials to start after
    # the kill (stale trials are only found when a trial starts) and the victim is killed mid-training
    raw["methods"]["mixing"].update(epochs=4, steps_per_epoch=120)
    raw["studies"] = {STUDY: {
        "method": "mixing",
        "objectives": [{"metric": "val_accuracy", "direction": "maximize"}],
        "search_space": {"methods.mixing.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}},
        "sampler": "random", "pruner": "none", "n_trials": N_TRIALS, "seed": 0,
    }}
    tiny_params_file.write_text(yaml.safe_dump(raw, sort_keys=False))

    name = _unique("s2r-pgtest")
    cmd = [sys.executable, "-m", "s2r.cli", "tune", "--study", STUDY, "--data", str(tiny_prepared),
           "--params", str(tiny_params_file), "--resume", "--n-trials", str(N_TRIALS),
           "--heartbeat-interval", str(HEARTBEAT), "--grace-period", str(GRACE), "--study-name", name]
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "S2R_TEST_POSTGRES_URL")}
    env["S2R_OPTUNA_STORAGE"] = URL  # by environment, as the README says: argv shows in `ps`
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1"}
    workers = Workers(cmd, env, cwd=tmp_path)  # cwd: data/tuning/ and mlruns/ land in tmp_path
    try:
        # A first: it creates the study (and the MLflow store); B joins once A is inside a trial.
        a = workers.start("A")
        _wait_for("worker A to run a trial", lambda: _running_of(_trials(name), a.pid), workers, ("A",), 120)
        b = workers.start("B")
        _wait_for("worker B to run a trial",
                  lambda: any(t.user_attrs.get("worker_pid") == b.pid for t in _trials(name)),
                  workers, ("A", "B"), 120)

        # Kill A in the middle of one of its trials, after that trial's first heartbeat (a trial that never
        # sent one is never considered stale).
        def a_mid_trial():
            for t in _running_of(_trials(name), a.pid):
                if t.datetime_start is not None and time.time() - t.datetime_start.timestamp() >= 1.5 * HEARTBEAT:
                    return t
            return None

        victim = _wait_for("worker A to be in the middle of a trial", a_mid_trial, workers, ("A", "B"), 120, 0.1)
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in _trials(name))
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        assert {t.number: t.state for t in _trials(name)}[victim.number] == TrialState.RUNNING, (
            f"trial {victim.number} finished before worker A was killed; the test lost its victim\n"
            f"{workers.report()}")
        # B finds the stale trial only when it starts a trial > GRACE s after A's last heartbeat: it needs work left
        assert done <= N_TRIALS - 3, (
            f"{done} of {N_TRIALS} trials had already finished when worker A was killed: trials are too short for "
            f"this test\n{workers.report()}")

        try:
            rc = b.wait(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            workers.kill_all()
            pytest.fail(f"worker B did not finish within {WORKER_TIMEOUT} s\n{workers.report()}")
        assert rc == 0, f"worker B exited with code {rc}\n{workers.report()}"
    finally:
        workers.kill_all()

    trials = _trials(name)
    table = "\n".join(
        f"  #{t.number} {t.state.name:8} pid={t.user_attrs.get('worker_pid')} "
        f"failed_trial={t.system_attrs.get('failed_trial')} value={t.value}"
        for t in trials)
    info = f"killed worker A pid {a.pid} during trial #{victim.number}; worker B pid {b.pid}; trials:\n{table}"

    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers\n{info}"
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL, (
        f"the killed trial was not marked FAIL (stale heartbeat)\n{info}")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retries, f"no trial has system attr failed_trial={victim.number}: the killed trial was not retried\n{info}"
    assert all(t.number > victim.number for t in retries), f"a retry precedes the trial it retries\n{info}"
    assert any(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in retries), (
        f"the retry of trial #{victim.number} did not finish\n{info}")
    assert any(t.user_attrs.get("worker_pid") == b.pid for t in retries), (
        f"the retry did not record the pid of the worker that ran it (worker_pid)\n{info}")
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    assert not running, f"trials left RUNNING: {running}\n{info}"
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert finished >= N_TRIALS, f"only {finished} finished trials, wanted >= {N_TRIALS}\n{info}"

    optuna.delete_study(study_name=name, storage=URL)
