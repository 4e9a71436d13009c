"""`s2r tune`: run an Optuna study declared in params.yaml, every trial a nested MLflow run.

Storage: a journal file under data/tuning/<study>/ by default (safe for several local worker processes);
an RDB URL (`postgresql+psycopg2://...`, `sqlite:///...`) for workers on several machines, with heartbeats so
that a trial whose worker died is marked FAIL by a live worker and retried (RetryHeartbeatStaleTrialCallback).
Optuna 5's JournalStorage has no heartbeat (optuna/optuna#6615, PR #6622 not merged), so journal studies get a
worker registry instead (`<journal>.workers/<study>/`, one file per worker, its mtime a heartbeat): a RUNNING
trial whose worker is gone (same host: its pid/start time; other hosts: no heartbeat for grace_period seconds)
is failed and re-queued with its parameters by the next worker that looks (at start, after every trial, at exit).
`n_trials` counts finished (complete + pruned) trials of the whole study, across workers and resumes.
One MLflow parent run per study: created under the registry's lock by the first local worker; on an RDB the
worker whose create_study call made the study creates it and the others wait for its id.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2r.config import ConfigError, Params, SearchParam, StudySpec
from s2r.files import JsonDict, write_json, write_text
from s2r.params import load_params

if TYPE_CHECKING:  # optuna and MLflow stay lazy imports (the CLI starts without them)
    import optuna
    from optuna.trial import FrozenTrial

    from s2r.tracking import TrackedRun

TUNING_DIR = Path("data/tuning")


@dataclass
class TuneOptions:
    """Command-line choices of one tuning worker (the study itself is declared in params.yaml)."""

    study: str
    data_dir: Path
    params_path: Path = Path("params.yaml")
    storage: str | None = None  # None = journal file under out_dir
    study_name: str | None = None  # name in storage (default: the study's key)
    n_trials: int | None = None  # override of the spec's n_trials
    resume: bool = False  # create-or-continue; without it an existing study with trials is an error
    restart: bool = False  # delete a stored study of that name first (pipelines: params changed)
    heartbeat_interval: int = 10
    grace_period: int = 30
    max_retry: int = 2
    out_dir: Path | None = None  # default data/tuning/<study>


def build_sampler(spec: StudySpec) -> Any:
    """The sampler named in the spec, seeded."""
    import optuna

    # workers sharing a study must not draw the same points: worker k (`S2R_WORKER`, set by `s2r tune --workers`)
    spec = replace(spec, seed=spec.seed + int(os.environ.get("S2R_WORKER", "0")))

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.startup_trials())
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=spec.seed, n_startup_trials=spec.startup_trials())
    grid = {k: grid_values(k, p) for k, p in spec.search_space.items()}
    return optuna.samplers.GridSampler(grid, seed=spec.seed)


def grid_values(key: str, p: SearchParam) -> list[Any]:
    """Every value of one dimension for the grid sampler."""
    if p.type == "categorical":
        return list(p.choices or [])
    assert p.low is not None and p.high is not None
    step = p.step if p.step is not None else 1
    n = int(math.floor((p.high - p.low) / step + 1e-9)) + 1
    vals = [p.low + i * step for i in range(n)]
    return [int(round(v)) for v in vals] if p.type == "int" else [float(v) for v in vals]


def build_pruner(spec: StudySpec) -> Any:
    import optuna

    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    warmup = spec.warmup_epochs() + 1  # Optuna's earliest pruning step is n_warmup_steps / min_resource
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials(), n_warmup_steps=warmup)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup)


def journal_path(opts: TuneOptions, out_dir: Path) -> Path | None:
    """The journal file of a local study, None for an RDB URL."""
    if opts.storage is None or "://" not in opts.storage:
        return Path(opts.storage) if opts.storage else out_dir / "journal.log"
    return None


def build_storage(opts: TuneOptions, out_dir: Path) -> Any:
    """Journal file by default; RDB (with heartbeats and retries of dead workers' trials) for URLs."""
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(opts, out_dir)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    assert opts.storage is not None  # journal_path is None only for an RDB URL
    return RDBStorage(
        opts.storage,
        heartbeat_interval=opts.heartbeat_interval,
        grace_period=opts.grace_period,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=opts.max_retry),
        engine_kwargs={"pool_pre_ping": True},
    )


class Workers:
    """The workers of one study: a file per worker process, rewritten every heartbeat_interval seconds.

    Counts the live local workers (for `train.threads: auto`), tells whether a trial's worker is alive, and
    holds the lock under which workers create the study's parent run and settle dead workers' trials.
    """

    def __init__(self, folder: Path, heartbeat_interval: float) -> None:
        from s2r.tracking import process_identity

        self.folder, self.interval = folder, max(float(heartbeat_interval), 0.5)
        self.me = process_identity()
        self.file = folder / f"{self.me['host']}.{self.me['pid']}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Workers:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="s2r-worker-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.file.unlink(missing_ok=True)

    def _beat(self) -> None:
        write_text(self.file, json.dumps(self.me | {"beat": round(time.time(), 1)}))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self._beat()

    def _entries(self) -> list[dict[str, Any]]:
        out = []
        for f in self.folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(f.read_text()) | {"mtime": f.stat().st_mtime})
        return out

    def alive(self, worker: dict[str, Any], grace: float) -> bool:
        """A local worker: its process exists; a remote one: its file was rewritten within `grace` seconds."""
        from s2r.tracking import is_local, process_alive

        if is_local(worker):
            return process_alive(worker)
        for e in self._entries():
            if e.get("host") == worker.get("host") and e.get("pid") == worker.get("pid"):
                return time.time() - float(e["mtime"]) < grace
        return False

    def local_count(self) -> int:
        """Live worker processes of this study on this machine (this one included)."""
        from s2r.tracking import is_local, process_alive

        n = 0
        for e in self._entries():
            if is_local(e):
                if process_alive(e):
                    n += 1
                else:  # a dead worker's file
                    with contextlib.suppress(OSError):
                        (self.folder / f"{e['host']}.{e['pid']}.json").unlink()
        return max(n, 1)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock among the local workers (released by the kernel if its holder dies)."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def settle_dead_trials(study: Any, workers: Workers, opts: TuneOptions) -> tuple[list[int], int]:
    """Fail the RUNNING trials whose worker died and queue a retry of each with the same parameters.

    Returns (numbers of the trials failed now, trials still RUNNING whose worker cannot be judged yet: without
    a recorded worker, younger than grace_period). The retry is Optuna's RetryHeartbeatStaleTrialCallback, as
    on an RDB with heartbeats, so `max_retry` and the `failed_trial`/`retry_history` attrs mean the same.
    """
    import datetime

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    failed, undecided = [], 0
    with workers.lock():
        storage = study._storage
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker")
            if owner is None:
                age = (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0.0
                if age < opts.grace_period:
                    undecided += 1
                    continue
                why = f"no worker recorded {age:.0f} s after the trial started"
            elif workers.alive(owner, opts.grace_period):
                continue
            else:
                why = f"worker pid {owner.get('pid')} on {owner.get('host')} died during the trial"
            reason = f"{why}; failed by pid {workers.me['pid']} on {workers.me['host']}"
            try:
                storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                continue  # finished meanwhile (its worker was alive after all)
            dead = storage.get_trial(t._trial_id)
            retry = optuna.trial.FrozenTrial(  # the retry keeps params, not the dead run's bookkeeping
                number=dead.number, state=dead.state, value=None, values=dead.values,
                datetime_start=dead.datetime_start, datetime_complete=dead.datetime_complete, params=dead.params,
                distributions=dead.distributions, user_attrs={}, system_attrs=dead.system_attrs,
                intermediate_values={}, trial_id=dead._trial_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                RetryHeartbeatStaleTrialCallback(max_retry=opts.max_retry)(study, retry)
            failed.append(t.number)
    return failed, undecided


def _wait_for_parent(study: Any, seconds: float = 120.0) -> str | None:
    """The parent run id the study's creator (maybe on another host) is about to store; None if it never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = study.user_attrs.get(PARENT_ATTR)
        if found:
            return str(found)
        time.sleep(0.5)
    return None


PARENT_ATTR = "mlflow_parent_run_id"


def suggest(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """Draw one value per search dimension; keys are dotted params.yaml keys."""
    out: dict[str, Any] = {}
    for key, p in spec.search_space.items():
        if p.type == "categorical":
            out[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            assert p.low is not None and p.high is not None  # SearchParam.validate: int and float need both
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return out


def _metric(summary: dict[str, Any], name: str) -> float:
    if name not in summary:
        known = sorted(k for k, v in summary.items() if isinstance(v, (int, float)))
        raise ConfigError(f"objective metric {name!r} is not reported by the method; known: {known}")
    return float(summary[name])


def refine_chain(data_dir: Path, params: Any, work: Path, *, on_epoch: Callable[[int, dict[str, float]], None],
                 parent_run_id: str | None, run_name: str, tags: dict[str, str], method: str) -> dict[str, Any]:
    """One trial of a translator scored downstream (paper 5's cut_patch): train it, refine, train the downstream.

    Used by `run` instead of `stages.train` when `methods.<method>.downstream` names a params block; the downstream
    method's per-epoch validation metrics go to `on_epoch` (pruning on intermediate mIoU) and its summary is the
    trial's (cut_patch objective: median val mIoU of the last K epochs). All three steps are MLflow runs nested
    under the study's parent run.
    """
    from s2r import stages

    seg = params.methods[method].downstream
    if seg not in params.methods:
        raise ConfigError(f"methods.{method}.downstream: no params block methods.{seg}")
    work = Path(work)
    first = stages.train(stages.TrainRequest(method, data_dir, work / "translator", ckpt_dir=work / "translator-ckpt",
                                             parent_run_id=parent_run_id, run_name=f"{run_name}/train@{method}",
                                             tags=tags), params)
    stages.refine(method, work / "translator", data_dir, work / "refined", None, params)
    summary = stages.train(stages.TrainRequest(seg, work / "refined", work / "seg", ckpt_dir=work / "seg-ckpt",
                                               on_epoch=on_epoch, parent_run_id=parent_run_id,
                                               run_name=f"{run_name}/train@{seg}", tags=tags), params)
    return summary | {f"{method}_seconds": first["seconds"], f"{method}_mlflow_run_id": first["mlflow_run_id"]}


def run(opts: TuneOptions) -> dict[str, Any]:
    """Run (or continue) one study with this process as a worker; write best.yaml and metrics.json."""
    import yaml

    base = load_params(opts.params_path)
    spec = _study_spec(base, opts)
    out_dir = Path(opts.out_dir or TUNING_DIR / opts.study)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = opts.study_name or opts.study
    study, creator = _open_study(opts, spec, name, out_dir)
    journal = journal_path(opts, out_dir)
    workers_dir = (journal.with_name(journal.name + ".workers") if journal else out_dir / "workers") / name
    with contextlib.ExitStack() as stack:
        workers = stack.enter_context(Workers(workers_dir, opts.heartbeat_interval))
        stack.callback(os.environ.pop, "S2R_LOCAL_WORKERS", None)
        with workers.lock():  # one parent run per study, even for workers started at the same instant
            parent = stack.enter_context(_parent_run(study, creator, journal is not None, opts, spec, name, base))
            if study.user_attrs.get(PARENT_ATTR) is None:
                study.set_user_attr(PARENT_ATTR, parent.run_id)
        worker = _Worker(opts, spec, name, study, workers, parent, rdb=journal is None)
        worker.optimize()
        result = summarise(study, spec, opts.study)
        with workers.lock():  # workers finishing together would write the same tags and files at once
            _tag_trial_runs(study)
            _log_parent(parent, study, result, out_dir)
            write_text(out_dir / "best.yaml", yaml.safe_dump(result["best"], sort_keys=False))
            write_json(out_dir / "metrics.json", result["metrics"])
    return result


def _study_spec(base: Params, opts: TuneOptions) -> StudySpec:
    """The study `opts.study` declared under `studies` in params.yaml."""
    if opts.study not in base.studies:
        known = sorted(base.studies)
        raise ConfigError(f"{opts.params_path}: no study {opts.study!r} under 'studies' (known: {known})")
    return base.studies[opts.study]


def _open_study(opts: TuneOptions, spec: StudySpec, name: str, out_dir: Path) -> tuple[optuna.Study, bool]:
    """Create the study, or load it with --resume (--restart deletes it first); True if this worker created it.

    Creating a study is atomic in every storage: it elects the worker that creates the parent run."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = build_storage(opts, out_dir)
    if opts.restart:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
    kwargs = {"storage": storage, "study_name": name, "sampler": build_sampler(spec), "pruner": build_pruner(spec),
              "directions": [o.direction for o in spec.objectives]}
    try:
        study, creator = optuna.create_study(**kwargs, load_if_exists=False), True
    except optuna.exceptions.DuplicatedStudyError:
        if not opts.resume:
            raise ConfigError(f"study {name!r} already exists in {opts.storage or out_dir / 'journal.log'}; "
                              "pass --resume to continue it or --restart to start over") from None
        study, creator = optuna.create_study(**kwargs, load_if_exists=True), False
    study.set_user_attr("method", spec.method)
    return study, creator


def _parent_run(study: optuna.Study, creator: bool, journal: bool, opts: TuneOptions, spec: StudySpec, name: str,
                base: Params) -> TrackedRun:
    """The study's MLflow parent run (in the tuned paper's experiment): created once, joined by other workers."""
    from s2r.methods import registry
    from s2r.tracking import TrackedRun

    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None and not creator and not journal:  # an RDB study's creator may be elsewhere
        parent_id = _wait_for_parent(study)
    return TrackedRun(
        f"tune@{opts.study}", experiment=registry.experiment(base.tracking.experiment, spec.method),
        run_id=parent_id, section="tune",
        params={"study": {opts.study: _spec_dict(spec)}, "storage": opts.storage or "journal"},
        tags={"stage": "tune", "study": name, "method": spec.method})


class _Worker:
    """This process's share of one study: the objective (one training per trial) and the study callbacks."""

    def __init__(self, opts: TuneOptions, spec: StudySpec, name: str, study: optuna.Study, workers: Workers,
                 parent: TrackedRun, *, rdb: bool) -> None:
        self.opts, self.spec, self.name, self.study, self.workers, self.parent, self.rdb = (
            opts, spec, name, study, workers, parent, rdb)
        self.n_trials = opts.n_trials or spec.n_trials
        self.single = len(spec.objectives) == 1
        self.bar: Any = None

    def n_done(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    def optimize(self) -> None:
        """Trials until the study has n_trials finished ones, then the retries of dead workers' trials."""
        from tqdm import tqdm

        self.settle()
        self.bar = tqdm(total=self.n_trials, initial=min(self.n_done(), self.n_trials), desc=f"tune {self.opts.study}",
                        unit="trial")
        if self.n_done() < self.n_trials:
            self.study.optimize(self.objective, timeout=self.spec.timeout, catch=(Exception,),
                                callbacks=[self.settle_after, self.progress, self.stop_when_done])
        waiting = _settle_stale_trials(self.study, self.opts, self.settle, rdb=self.rdb)
        if waiting:  # retries of trials whose worker died: run them so every trial is accounted for
            self.study.optimize(self.objective, n_trials=waiting, catch=(Exception,),
                                callbacks=[self.settle_after, self.progress])
        self.bar.close()

    def settle(self) -> int:
        """Settle dead workers' trials; the number of RUNNING trials whose fate is not known yet."""
        import optuna

        from s2r.tracking import reconcile

        if self.rdb:
            optuna.storages.fail_stale_trials(self.study)  # RDB heartbeats
            return 0
        failed, undecided = settle_dead_trials(self.study, self.workers, self.opts)
        if failed:  # their MLflow runs too, now rather than when the next s2r process starts
            reconcile()
        return undecided

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        """Train with the trial's suggested params; its objective value(s), NaN (a FAIL) when not finite."""
        trial.set_user_attr("worker", self.workers.me)  # whoever finds it RUNNING with this process gone fails it
        trial.set_user_attr("worker_pid", os.getpid())
        os.environ["S2R_LOCAL_WORKERS"] = str(self.workers.local_count())  # train.threads: auto (s2r.stages)
        overrides = suggest(trial, self.spec) | {"train.progress": False}  # before the twin check: it compares them
        twin = _completed_twin(self.study, trial)
        if twin is not None:  # same params + same seed = same deterministic training: reuse its result
            trial.set_user_attr("duplicate_of", twin.number)
            trial.set_user_attr("mlflow_run_id", twin.user_attrs.get("mlflow_run_id"))
            return twin.values[0] if self.single else list(twin.values)
        summary = self.train(trial, overrides)
        trial.set_user_attr("mlflow_run_id", summary["mlflow_run_id"])
        for k in ("seconds", "tracking_seconds_total"):  # to measure the overhead around training
            if k in summary:
                trial.set_user_attr(f"train_{k}", summary[k])
        values = [_metric(summary, o.metric) for o in self.spec.objectives]
        if any(not math.isfinite(v) for v in values):
            trial.set_user_attr("fail_reason", f"objective is not finite: {values}")
            return float("nan")  # Optuna records a NaN objective as FAIL
        return values[0] if self.single else values

    def train(self, trial: optuna.Trial, overrides: dict[str, Any]) -> JsonDict:
        """One trial's training (a nested MLflow run); its failure is recorded on the trial."""
        import optuna

        from s2r import stages
        from s2r.methods import registry

        opts, spec = self.opts, self.spec
        try:
            params = load_params(opts.params_path, overrides)
            run_name, tags = f"trial@{opts.study}#{trial.number}", {"optuna_study": self.name,
                                                                   "optuna_trial": str(trial.number)}
            on_epoch = self.pruning(trial)
            with tempfile.TemporaryDirectory(prefix=f"s2r-trial{trial.number}-") as tmp:
                # A translator whose params block names a `downstream` method (paper 5's cut_patch: train CUT,
                # refine, train a segmenter) is scored by the chain `refine_chain`, not by its own training.
                if registry.entry(spec.method).downstream(params.methods[spec.method]):
                    return refine_chain(opts.data_dir, params, Path(tmp), on_epoch=on_epoch,
                                        parent_run_id=self.parent.run_id, run_name=run_name, tags=tags,
                                        method=spec.method)
                return stages.train(stages.TrainRequest(spec.method, opts.data_dir, Path(tmp) / "model",
                                                        ckpt_dir=Path(tmp) / "ckpt", on_epoch=on_epoch,
                                                        parent_run_id=self.parent.run_id, run_name=run_name,
                                                        tags=tags), params)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # recorded on the trial; the study goes on
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}"[:2000])
            raise

    def pruning(self, trial: optuna.Trial) -> Callable[[int, dict[str, float]], None]:
        """The per-epoch hook that reports the objective and prunes (single-objective studies only)."""
        import optuna

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if not self.single:
                return  # Optuna prunes single-objective studies only
            trial.report(_metric(metrics, self.spec.objectives[0].metric), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        return on_epoch

    def progress(self, st: optuna.Study, ft: FrozenTrial) -> None:
        """Study callback: the progress bar and `trials_finished` on the parent run."""
        from optuna.trial import TrialState

        self.bar.n = min(self.n_done(), self.n_trials)
        states = [t.state for t in st.get_trials(deepcopy=False)]
        post: dict[str, object] = {"trial": ft.number, "pruned": states.count(TrialState.PRUNED),
                                   "failed": states.count(TrialState.FAIL)}
        if self.single and any(s == TrialState.COMPLETE for s in states):
            post["best"] = f"{st.best_value:.4g}"
        self.bar.set_postfix(post)
        self.bar.refresh()
        self.parent.log_metrics({"trials_finished": self.n_done()}, step=ft.number)

    def stop_when_done(self, st: optuna.Study, ft: FrozenTrial) -> None:
        """Stop at n_trials finished trials (all workers), or when as many have failed (a broken setup)."""
        from optuna.trial import TrialState

        failed = len(st.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if self.n_done() >= self.n_trials or failed >= max(self.n_trials, 3):
            st.stop()

    def settle_after(self, st: optuna.Study, ft: FrozenTrial) -> None:
        self.settle()


def _completed_twin(study: Any, trial: Any) -> Any:
    """A completed trial with exactly this trial's params (TPE re-samples points of small discrete spaces)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.params == trial.params:
            return t
    return None


def _settle_stale_trials(study: Any, opts: TuneOptions, settle: Any, *, rdb: bool) -> int:
    """Before leaving, fail trials of dead workers; return how many retries now wait.

    A dead worker's trial is otherwise noticed only when a live worker finishes a trial, which never
    happens once the study has its n_trials. RDB: waits while RUNNING trials remain (their heartbeats decide);
    journal: waits only for trials whose worker is not recorded yet. At most grace_period + heartbeat_interval s.
    """
    from optuna.trial import TrialState

    deadline = time.monotonic() + opts.grace_period + opts.heartbeat_interval
    while True:
        undecided = settle()
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if (not running if rdb else not undecided) or time.monotonic() > deadline:
            break
        time.sleep(max(min(opts.heartbeat_interval, 5), 1))
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _spec_dict(spec: StudySpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def summarise(study: Any, spec: StudySpec, key: str) -> dict[str, Any]:
    """Best trial(s), counts per state, and the dict written to best.yaml."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in
              (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best: dict[str, Any] = {"study": key, "study_name": study.study_name, "method": spec.method,
                            "objectives": [{"metric": o.metric, "direction": o.direction} for o in spec.objectives]}
    metrics: dict[str, Any] = {f"n_{k}": v for k, v in counts.items()}
    if not complete:
        best["best_trials"] = []
        return {"best": best, "metrics": metrics}
    if len(spec.objectives) == 1:
        bt = study.best_trial
        best |= {"trial": bt.number, "value": bt.value, "params": dict(bt.params),
                 "mlflow_run_id": bt.user_attrs.get("mlflow_run_id")}
        metrics |= {"best_value": bt.value, "best_trial": bt.number}
    else:
        best["best_trials"] = [{"trial": t.number, "values": list(t.values), "params": dict(t.params),
                                "mlflow_run_id": t.user_attrs.get("mlflow_run_id")} for t in study.best_trials]
        best["mlflow_run_id"] = best["best_trials"][0]["mlflow_run_id"]
        metrics["n_pareto"] = len(study.best_trials)
    return {"best": best, "metrics": metrics}


def _tag_trial_runs(study: Any) -> None:
    """Write each trial's final Optuna state onto its MLflow run (pruned/failed runs end before it is known)."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.optuna_study = '{study.study_name}'")
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for r in runs:
        t = by_number.get(int(r.data.tags.get("optuna_trial", -1)))
        if t is None:
            continue
        tags = {"trial_state": t.state.name} | ({"fail_reason": t.user_attrs["fail_reason"]}
                                                if "fail_reason" in t.user_attrs else {})
        for k, v in tags.items():
            if r.data.tags.get(k) == v:
                continue
            try:
                client.set_tag(r.info.run_id, k, v)
            except mlflow.exceptions.MlflowException:  # a worker on another machine wrote it at the same time
                client.set_tag(r.info.run_id, k, v)  # now an update of the existing tag


def _log_parent(parent: Any, study: Any, result: dict[str, Any], out_dir: Path) -> None:
    """Best value/params and Optuna's plots on the study's parent run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    metrics = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    parent.log_metrics(metrics, step=0)
    best = result["best"]
    if "params" in best:
        parent.set_tags({f"best.{k}": v for k, v in best["params"].items()})
    parent.log_dict(best, "best.yaml")
    plots: dict[str, Callable[..., Any]] = {
        "optimization_history": vis.plot_optimization_history, "param_importances": vis.plot_param_importances,
        "parallel_coordinate": vis.plot_parallel_coordinate}
    for name, fn in plots.items():
        try:
            multi = len(study.directions) > 1
            kwargs = {"target": lambda t: t.values[0], "target_name": "objective 0"} if multi else {}
            with warnings.catch_warnings():  # experimental-API and degenerate-axis warnings are noise here
                warnings.simplefilter("ignore")
                ax = fn(study, **kwargs)
        except (ValueError, RuntimeError) as e:  # e.g. importances need >= 2 complete trials
            parent.set_tags({f"plot.{name}": f"not drawn: {e}"[:500]})
            continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.savefig(out_dir / f"{name}.png", bbox_inches="tight")
        parent.log_figure(fig, f"plots/{name}.png")
        plt.close(fig)
