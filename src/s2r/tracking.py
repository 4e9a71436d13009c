"""The one module that owns MLflow: store location, runs with proper end states, batched metrics, models.

Default store: `sqlite:///<project>/mlruns/mlflow.db` with artifacts in `<project>/mlruns/artifacts`
(MLflow 3 refuses a bare folder store). `MLFLOW_TRACKING_URI` overrides it (a team's tracking server).
Metrics are buffered and sent with one `log_batch` per flush: per-call `log_metric` on SQLite is fsync-bound.
Metric keys have sections, which the MLflow UI's chart view groups: `train/`, `val/`, `test/`, `health/` (and
MLflow's own `system/`); s2r's internal name `val_accuracy` (history, metrics JSON, Optuna objectives) is the
MLflow key `val/accuracy` (metric_key: one rule, so a concept keeps one name).

Crash consistency: every run records the processes that hold it open (tag `s2r.proc.<host>.<pid>`: host, pid,
pid namespace, boot time, process start time, last heartbeat). The first time a process opens a store it
reconciles it: a RUNNING run none of whose processes is alive is marked KILLED with tag `s2r.reconciled`
saying why. A process on this host (same pid namespace) is alive when its pid exists with the recorded start
time; a process elsewhere is alive while its heartbeat (rewritten every S2R_HEARTBEAT_SECONDS, default 60)
is younger than S2R_STALE_SECONDS (default 900). Runs without such tags (other tools) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from s2r.config import flatten

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
PROC_TAG = "s2r.proc."  # + <host>.<pid>: one tag per process that has the run open
RECONCILED_TAG = "s2r.reconciled"
SECTIONS = ("train", "val", "test", "health")  # MLflow key prefixes of s2r's metrics (MLflow adds system/)
POINTS_PER_CURVE = 100  # tracking.log_every: auto -> about this many points per training curve


def metric_key(name: str, section: str = "train") -> str:
    """The MLflow key of s2r metric `name`: `val_accuracy` -> `val/accuracy`; a name without a section prefix
    goes to `section` (`lr` -> `train/lr`, an evaluator's `dci_disentanglement` -> `test/dci_disentanglement`)."""
    if "/" in name:
        return name  # already sectioned
    head, sep, rest = name.partition("_")
    if sep and rest and head in SECTIONS:
        return f"{head}/{rest}"
    return f"{section}/{name}"


def log_interval(setting: int | str, total_steps: int) -> int:
    """Steps per logged training-loss mean: tracking.log_every (auto = about POINTS_PER_CURVE points per run)."""
    if setting == "auto":
        return max(1, total_steps // POINTS_PER_CURVE)
    return int(setting)


def heartbeat_seconds() -> float:
    """Seconds between heartbeats of open runs (S2R_HEARTBEAT_SECONDS; 0 = no heartbeat thread)."""
    return float(os.environ.get("S2R_HEARTBEAT_SECONDS", "60"))


def stale_seconds() -> float:
    """A run held only by processes of other hosts is orphaned once their heartbeats are this old."""
    return float(os.environ.get("S2R_STALE_SECONDS", "900"))


def project_root() -> Path:
    """The project folder: $DVC_ROOT (set by `dvc exp run`), else the nearest parent holding params.yaml."""
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "params.yaml").is_file() or (p / "dvc.yaml").is_file():
            return p
    return here


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI or the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def artifact_root() -> Path:
    return project_root() / "mlruns" / "artifacts"


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment id, creating it with artifacts under mlruns/."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock(uri):  # MLflow creates/migrates SQLite tables on first use; not safe from two processes
        exp_id = _experiment_id(mlflow, uri, experiment)
        reconcile_once(uri)
        return exp_id


_reconciled: set[str] = set()


def reconcile_once(uri: str | None = None) -> list[str]:
    """Reconcile the store the first time this process opens it (see reconcile)."""
    uri = uri or tracking_uri()
    if uri in _reconciled:
        return []
    _reconciled.add(uri)
    return reconcile(uri)


def process_identity() -> dict[str, Any]:
    """What tells this process apart from any other, even after a reboot or a reused pid."""
    import psutil

    me = psutil.Process()
    return {"host": platform.node(), "pidns": _pid_namespace(), "boot": round(psutil.boot_time(), 1),
            "pid": me.pid, "start": round(me.create_time(), 2)}


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers on one host name see different pids
    except OSError:
        return ""


def is_local(entry: dict[str, Any]) -> bool:
    """Whether the process of `entry` is visible from here (same host name and pid namespace)."""
    return entry.get("host") == platform.node() and entry.get("pidns", "") == _pid_namespace()


def process_alive(entry: dict[str, Any], *, beat: float | None = None, stale_after: float | None = None) -> bool:
    """Alive: a local process with that pid and start time; a remote one whose last heartbeat is fresh."""
    import psutil

    if is_local(entry):
        if abs(float(entry.get("boot", 0)) - psutil.boot_time()) > 2:
            return False  # the host rebooted since
        try:
            proc = psutil.Process(int(entry["pid"]))
            started = proc.create_time()
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False  # dead, not yet reaped (e.g. a torchrun rank while the agent stops the others)
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            return False
        return abs(started - float(entry.get("start", started))) < 1.0  # else the pid was reused
    last = float(beat if beat is not None else entry.get("beat", 0))
    return time.time() - last < (stale_after if stale_after is not None else stale_seconds())


def _proc_key(entry: dict[str, Any]) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", str(entry["host"]))[:200]
    return f"{PROC_TAG}{host}.{entry['pid']}"


def reconcile(uri: str | None = None) -> list[str]:
    """Mark RUNNING runs whose processes are all gone as KILLED (tag s2r.reconciled says why); return their ids."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri or tracking_uri())
    try:
        runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()],
                                  filter_string="attributes.status = 'RUNNING'", max_results=5000)
    except mlflow.exceptions.MlflowException:
        return []
    me = process_identity()
    killed = []
    for r in runs:
        entries = []
        for k, v in r.data.tags.items():
            if k.startswith(PROC_TAG):
                with contextlib.suppress(ValueError, TypeError):
                    entries.append(json.loads(v))
        if not entries or any(process_alive(e) for e in entries):
            continue  # not an s2r run, or still held by a live process
        why = "; ".join(
            f"pid {e.get('pid')} on {e.get('host')} is gone" if is_local(e)
            else f"pid {e.get('pid')} on {e.get('host')}: no heartbeat since "
                 f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(float(e.get('beat', 0))))}"
            for e in entries)
        try:
            client.set_tag(r.info.run_id, RECONCILED_TAG,
                           f"KILLED by s2r (pid {me['pid']} on {me['host']}, "
                           f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}): {why}"[:MAX_PARAM_LEN])
            last = max(float(e.get("beat", 0)) for e in entries)
            client.set_terminated(r.info.run_id, status="KILLED",
                                  end_time=int(1000 * last) if last else None)
        except mlflow.exceptions.MlflowException:
            continue  # e.g. deleted meanwhile
        killed.append(r.info.run_id)
    return killed


def reconcile_deferring_interrupts(uri: str | None = None) -> list[str]:
    """reconcile() that a SIGTERM cannot cut short (e.g. a torchrun rank settling a dead rank 0's run while torchrun
    stops it); the interrupt is raised once the store is settled."""
    with _interrupts_deferred():
        return reconcile(uri)


def run_status(run_id: str) -> str | None:
    """The MLflow status of a run in the current store, or None if the store does not hold it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    try:
        return str(mlflow.MlflowClient(tracking_uri=tracking_uri()).get_run(run_id).info.status)
    except mlflow.exceptions.MlflowException:
        return None


def run_info(run_id: str) -> tuple[str, dict[str, str]] | None:
    """(experiment name, tags) of a run in the current store, or None if the store does not hold it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    try:
        run = client.get_run(run_id)
        return client.get_experiment(run.info.experiment_id).name, dict(run.data.tags)
    except mlflow.exceptions.MlflowException:
        return None


class _Heartbeat:
    """One daemon thread per process that rewrites this process's tag on every open run."""

    def __init__(self) -> None:
        self.runs: dict[str, str] = {}  # run id -> tracking uri
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, run_id: str, uri: str) -> None:
        with self.lock:
            self.runs[run_id] = uri
            if self.thread is None and heartbeat_seconds() > 0:
                self.thread = threading.Thread(target=self._loop, name="s2r-heartbeat", daemon=True)
                self.thread.start()

    def remove(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def _loop(self) -> None:
        import mlflow

        while not self.wake.wait(heartbeat_seconds()):
            with self.lock:
                runs = dict(self.runs)
            for run_id, uri in runs.items():
                with contextlib.suppress(Exception):  # a missed beat must never stop training
                    entry = process_identity() | {"beat": round(time.time(), 1)}
                    mlflow.MlflowClient(tracking_uri=uri).set_tag(run_id, _proc_key(entry), json.dumps(entry))


    def reset_in_child(self) -> None:
        """A forked child has none of its parent's threads or open runs."""
        self.runs, self.lock, self.wake, self.thread = {}, threading.Lock(), threading.Event(), None


HEARTBEAT = _Heartbeat()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=HEARTBEAT.reset_in_child)
    os.register_at_fork(after_in_child=_reconciled.clear)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock beside a SQLite store (other stores handle concurrency themselves)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _experiment_id(mlflow: Any, uri: str, experiment: str) -> str:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            artifact_root().mkdir(parents=True, exist_ok=True)
            location = (artifact_root() / experiment).as_uri()
        try:
            exp_id = mlflow.create_experiment(experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # another worker created it in the meantime
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                raise
            exp_id = found.experiment_id
    else:
        exp_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND[0] not in (exp.tags or {}):  # a kind chosen in the UI is kept
        mlflow.MlflowClient().set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    out: str = exp_id
    return out


# MLflow 3's UI shows an experiment as GenAI (traces overview) or as classic ML (training runs). The tag is what
# its kind selector writes; the 3.17 UI decides by its workflow switch (default GenAI, `?workflowType=` in the
# URL), so `s2r ui` prints the runs URL with workflowType=machine_learning (ui_url).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ui_url(host: str, port: int, experiment: str | None = None) -> str:
    """The MLflow UI address of `experiment`'s training runs (not the GenAI overview), or of the experiment list."""
    import mlflow

    base = f"http://{host}:{port}"
    exp = None
    if experiment is not None:
        try:
            mlflow.set_tracking_uri(tracking_uri())
            exp = mlflow.get_experiment_by_name(experiment)
        except Exception:  # no store yet: the experiment list
            exp = None
    where = f"/#/experiments/{exp.experiment_id}/runs" if exp is not None else "/#/experiments"
    return f"{base}{where}?workflowType=machine_learning"


def experiment_links(host: str, port: int) -> list[tuple[str, str]]:
    """(name, runs URL) of every experiment in the store that holds runs, by name: what `s2r ui` prints."""
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri())
        exps = [e for e in client.search_experiments(max_results=1000)
                if client.search_runs([e.experiment_id], max_results=1)]
    except Exception:  # no store yet
        return []
    base = f"http://{host}:{port}/#/experiments"
    return [(e.name, f"{base}/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in sorted(exps, key=lambda e: e.name)]


def run_server(cmd: list[str], grace: float = 10.0) -> int:
    """Run a server command in its own process group; SIGTERM/SIGINT/SIGHUP stop the whole group.

    `mlflow ui` starts uvicorn worker processes: stopping only the parent left them holding the port.
    """
    import signal

    proc = subprocess.Popen(cmd, start_new_session=True)  # pgid = proc.pid

    def stop(signum: int, frame: Any) -> None:
        _stop_group(proc, grace)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        return proc.wait()
    finally:
        _stop_group(proc, grace)


def _stop_group(proc: subprocess.Popen[Any], grace: float) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the group is gone
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class PreparedDataset:
    """Builds the MLflow dataset of a prepared benchmark: name, digest = data version, source path, profile =
    split sizes per domain (the runs table's Dataset column and the run's inputs)."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def sizes(self) -> dict[str, dict[str, int]]:
        import numpy as np

        out: dict[str, dict[str, int]] = {}
        for dom in self.data.spec.domains:
            for split in ("train", "val", "test"):
                if self.data.has(dom.name, split):
                    n = len(np.load(self.data.root / dom.name / split / "images.npy", mmap_mode="r"))
                    out.setdefault(dom.name, {})[split] = n
        return out

    def build(self) -> Any:
        import json

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        profile = json.dumps({"data_version": self.data.data_version, "splits": self.sizes()})

        class _WithProfile(MetaDataset):
            @property
            def profile(self) -> Any:
                return profile

            def to_dict(self) -> dict[str, str]:
                return super().to_dict() | {"profile": profile}

        import warnings

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are local files
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(self.data.root).resolve()))
        return _WithProfile(source=source, name=f"{self.data.spec.name}@{Path(self.data.root).name}",
                            digest=self.data.data_version[:36])  # MLflow's digest limit: 36 characters


# Changed files that do not make a run's code differ from its commit: DVC's own bookkeeping (`dvc repro` rewrites
# dvc.lock while it runs), what the pipeline and DVC's tools write into the checkout (`dvc plots show`,
# `s2r report --readme`), and documentation, which changes no number.
NOT_SOURCE = ("dvc.lock", "*/dvc.lock", "*.dvc", ".dvc/*", ".dvcignore", "dvc_plots/*", "*.md", "docs/*")


def git_state(root: Path | None = None) -> tuple[str, list[str]]:
    """HEAD commit and the tracked source files that differ from it (NOT_SOURCE left out); ('unknown', []) without
    git. Untracked files do not count: a run's code is what the commit tracks."""
    import fnmatch

    root = root or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown", []
        diff = subprocess.run(["git", "diff", "--name-only", "-z", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown", []
    changed = [p for p in diff.stdout.split("\0") if p]
    return sha.stdout.strip(), [p for p in changed if not any(fnmatch.fnmatch(p, pat) for pat in NOT_SOURCE)]


def git_tags(root: Path | None = None) -> dict[str, str]:
    """`git_commit`, plus `git_dirty` naming the changed source files only when there are any."""
    sha, dirty = git_state(root)
    tags = {"git_commit": sha}
    if dirty:
        tags["git_dirty"] = f"{len(dirty)} changed: {', '.join(dirty)}"[:MAX_PARAM_LEN]
    return tags


def _torch_tags() -> dict[str, str]:
    """What a run's numbers depend on besides code, data and params (if torch is in use at all)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    return {"torch": str(torch.__version__), "threads": str(torch.get_num_threads())}


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGTERM / SIGINT held back until the block is done, then raised as KeyboardInterrupt (main thread only).

    Ending a run takes a few store writes; an interrupt between them would leave the run RUNNING, and MLflow's
    atexit hook would then end it as FINISHED.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    saved = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        if caught:
            raise KeyboardInterrupt(f"signal {caught[0]}")


class TrackedRun:
    """An MLflow run as a context manager: FINISHED on success, FAILED on error, KILLED on interrupt.

    `section`: where metrics without a section prefix go (metric_key): train for training, test for evaluations.
    """

    def __init__(
        self,
        name: str,
        *,
        experiment: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        system_metrics: bool = False,
        section: str = "train",
    ) -> None:
        self.system_metrics = system_metrics  # MLflow's CPU / memory / GPU sampler thread for this run
        self.section = section
        self.latest: dict[str, Any] = {}  # MLflow key -> the last Metric logged under it (linked to the model)
        self.name, self.experiment = name, experiment
        self.params, self.tags = params or {}, tags or {}
        self.resume_id, self.parent_run_id = run_id, parent_run_id
        self.run_id: str = ""
        self._buffer: list[Any] = []
        self.log_seconds = 0.0  # time spent talking to MLflow (reported as overhead)

    def __enter__(self) -> TrackedRun:
        import mlflow

        t = time.perf_counter()
        setup(self.experiment)
        me = process_identity() | {"beat": round(time.time(), 1)}
        tags = {
            **git_tags(),
            "host": platform.node(),
            "pid": str(me["pid"]),
            _proc_key(me): json.dumps(me),
            **_torch_tags(),
            **self.tags,
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        nested = mlflow.active_run() is not None  # e.g. a tuning trial inside its study's parent run
        if self.resume_id:
            before = run_status(self.resume_id)
            run = mlflow.start_run(run_id=self.resume_id, nested=nested, log_system_metrics=self.system_metrics)
            mlflow.set_tags({"resumed": "true", "resumed_from_status": str(before), "host": me["host"],
                             "pid": str(me["pid"]), _proc_key(me): json.dumps(me)} | self.tags)
        else:
            run = mlflow.start_run(run_name=self.name, tags=tags, nested=nested,
                                   log_system_metrics=self.system_metrics)
            self.run_id = run.info.run_id
            self.log_params(self.params)
        self.run_id = run.info.run_id
        HEARTBEAT.add(self.run_id, tracking_uri())
        self.log_seconds += time.perf_counter() - t
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        import mlflow

        HEARTBEAT.remove(self.run_id)
        with _interrupts_deferred():  # a SIGTERM now (torchrun stopping the ranks) must not leave the run unended
            self._end(mlflow, exc_type, exc)

    def _end(self, mlflow: Any, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Flush the buffered metrics and end the run: FINISHED, KILLED (interrupt, pruned trial) or FAILED."""
        try:
            self.flush()
        finally:
            optuna = sys.modules.get("optuna")  # a pruned trial is stopped on purpose, not crashed
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "KILLED"
            elif optuna is not None and issubclass(exc_type, optuna.TrialPruned):
                status = "KILLED"
                mlflow.set_tag("trial_state", "PRUNED")
            else:
                status = "FAILED"
                if exc is not None:
                    mlflow.set_tag("error", f"{exc_type.__name__}: {exc}"[:MAX_PARAM_LEN])
            mlflow.end_run(status=status)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log a (nested) dict as flattened params in one batch."""
        import mlflow
        from mlflow.entities import Param

        t = time.perf_counter()
        flat = flatten(params)
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flat.items()]
        client = mlflow.MlflowClient()
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            client.log_batch(self.run_id, params=items[i : i + 100])
        self.log_seconds += time.perf_counter() - t

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics under their sectioned keys (metric_key; sent by flush(), e.g. once per epoch)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            m = Metric(metric_key(k, self.section), float(v), ts, step)
            self._buffer.append(m)
            self.latest[m.key] = m

    def flush(self) -> None:
        """Send buffered metrics with as few calls as possible."""
        import mlflow

        if not self._buffer or not self.run_id:
            return
        t = time.perf_counter()
        client = mlflow.MlflowClient()
        for i in range(0, len(self._buffer), 1000):
            client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
        self._buffer.clear()
        self.log_seconds += time.perf_counter() - t

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        t = time.perf_counter()
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
        self.log_seconds += time.perf_counter() - t

    def log_dataset(self, data: Any, context: str) -> Any:
        """Record a prepared benchmark as an input of this run (context: training / evaluation / refine); returns
        the MLflow dataset (metrics measured on it can name it)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        t = time.perf_counter()
        dataset = PreparedDataset(data).build()
        for attempt in range(3):
            try:
                mlflow.log_input(dataset, context=context, tags={"data_version": data.data_version})
                break
            except MlflowException as e:
                # Workers of one study starting together insert the same (experiment, name, digest) dataset at
                # once; the store keeps one and refuses the other: log again, it then links the existing one.
                if "unique constraint" not in str(e).lower() or attempt == 2:
                    raise
        self.log_seconds += time.perf_counter() - t
        return dataset

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        import mlflow

        mlflow.log_dict(data, name)

    def log_figure(self, fig: Any, name: str) -> None:
        import mlflow

        t = time.perf_counter()
        mlflow.log_figure(fig, name)
        self.log_seconds += time.perf_counter() - t

    def log_model(self, model: Any, example: Any, name: str = "model", *, params: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None, step: int = 0) -> tuple[str, str]:
        """Log a torch module in the pickle format (reloads as the eager module with dynamic shapes) as a LoggedModel
        named `name` with `params` (flattened) and `tags`; returns (model URI, model id).

        The run's latest metrics (final losses, validation, health) are linked to the model, so MLflow's Models
        tab compares models; `log_model_metrics` adds the test metrics of its evaluation later.
        """
        import mlflow
        import torch

        t = time.perf_counter()
        was_training = model.training
        model.eval()  # MLflow runs the example through the model: in train mode it would move BatchNorm stats
        try:
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                serialization_format="pickle",
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "s2r"],
                params={k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(params or {}).items()},
                tags=tags,
                step=step,
            )
        finally:
            model.train(was_training)
        self.flush()
        if self.latest:  # the same Metric rows again with the model's id: the run's history gains nothing twice
            from mlflow.entities import Metric

            linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=info.model_id)
                      for m in self.latest.values()]
            mlflow.MlflowClient().log_batch(self.run_id, metrics=linked)
        self.log_seconds += time.perf_counter() - t
        return str(info.model_uri), str(info.model_id)


def log_model_metrics(run_id: str, model_id: str | None, metrics: dict[str, float], *, step: int,
                      section: str = "test", dataset: Any = None) -> None:
    """Log an evaluation's metrics onto the training run `run_id` and its LoggedModel `model_id` (if any), so one
    row per trained model holds its params, curves and test metrics (runs table and Models tab alike)."""
    import mlflow
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    ds = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset is not None else {}
    rows = [Metric(metric_key(k, section), float(v), ts, step, model_id=model_id or None, **ds)
            for k, v in metrics.items()]
    client = mlflow.MlflowClient()
    for i in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[i : i + 1000])
