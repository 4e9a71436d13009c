"""Pipeline stages behind the CLI: generate, train, evaluate, refine (`s2r report` is s2r.report, so that a
verdict text edit re-runs no training stage: DVC lists this module as a code dep of every train stage).

Each stage reads hyperparameters from params.yaml and paths from its arguments, writes its outputs
atomically, and (train / evaluate / refine) is one MLflow run named `<stage>@<method>-seed<N>` in the experiment of
the method's paper; evaluate and refine runs are nested under the training run of their model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from s2r import health
from s2r.config import ConfigError, Params, need, to_dict
from s2r.data.benchmark import DataError
from s2r.figures import sample_grid
from s2r.files import JsonDict, write_json

if TYPE_CHECKING:  # heavy imports (torch) stay lazy: the CLI starts without them
    from s2r.data.prepared import PreparedBenchmark
    from s2r.distributed import Session
    from s2r.methods.base import Method, Schedule, State
    from s2r.tracking import TrackedRun
    from s2r.train import FitResult

# embedded benchmark -> its generator module; `scenes32` is `scenes` rendered at 32 px (paper 2's demo: a quarter of
# the pixels per training step, docs/demos.md), sizes from params.yaml benchmarks.<name>
GENERATORS = {"digits": "s2r.data.digits", "scenes": "s2r.data.scenes", "scenes32": "s2r.data.scenes"}


def generate(name: str, out: Path, params: Params) -> Path:
    """Generate an embedded benchmark from params.benchmarks.<name> and the global seed."""
    import importlib

    from s2r.data.benchmark import write_benchmark

    if name not in GENERATORS:
        raise DataError(f"unknown embedded benchmark {name!r}; known: {sorted(GENERATORS)}")
    gen = importlib.import_module(GENERATORS[name])
    settings = {"digits": params.benchmarks.digits, "scenes": params.benchmarks.scenes,
                "scenes32": params.benchmarks.scenes32}[name]  # as GENERATORS
    spec, samples = gen.generate(need(settings, f"benchmarks.{name}", params.source), params.seed)
    spec = dataclasses.replace(spec, name=name)
    return write_benchmark(out, spec, samples, progress=params.train.progress)


def _run_tags(data: Any, seed: int, device: str) -> dict[str, str]:
    import torch

    return {
        "data_version": data.data_version, "benchmark": data.spec.name, "seed": str(seed), "device": device,
        "torch": torch.__version__, "python": platform.python_version(),
        # the model's input contract, for users of the registered model (s2r registry)
        "image_size": str(data.spec.image_size), "channels": str(data.spec.channels),
        "classes": json.dumps(list(data.spec.classes)),
    }


@dataclass(frozen=True)
class TrainRequest:
    """One `s2r train`: which params block, on which prepared benchmark, writing where (values come from params)."""

    method: str  # a params block of methods (e.g. `mixing`, `segmenter_refined`)
    data_dir: Path  # a prepared benchmark
    out: Path  # the model folder (model.pt)
    metrics_out: Path | None = None  # train.json for `dvc metrics`
    plots_out: Path | None = None  # training curves for `dvc plots`
    ckpt_dir: Path | None = None  # checkpoints; default data/checkpoints/<method>
    resume: bool = False  # continue from the checkpoint (or the killed attempt's MLflow run)
    init: Path | None = None  # a trained model folder the method starts from (Method.init_from)
    on_epoch: Callable[[int, dict[str, float]], None] | None = None  # may raise to stop/prune (tuning)
    parent_run_id: str | None = None  # nest the MLflow run (tuning trials)
    run_name: str | None = None  # default train@<method>
    tags: Mapping[str, str] = field(default_factory=dict)  # extra MLflow tags

    @property
    def checkpoints(self) -> Path:
        return Path(self.ckpt_dir or Path("data/checkpoints") / self.method)


@dataclass
class _Resume:
    """Where a training starts: a checkpoint's state, the MLflow run to continue, and why (for the user)."""

    state: State | None = None
    run_id: str | None = None
    mode: str = ""
    finished: JsonDict | None = None  # the summary of a run that already finished: nothing left to do


def train(request: TrainRequest, params: Params) -> JsonDict:
    """Train one method (see `_train`) with torch's determinism and thread settings restored afterwards."""
    from s2r import distributed
    from s2r.train import torch_settings

    threads, why = choose_threads(params.train.threads)  # "auto": the cores per local worker
    t = params.train
    with torch_settings(deterministic=t.deterministic, threads=threads), \
            distributed.session(t.device, sync_batchnorm=t.sync_batchnorm, timeout_s=t.dist_timeout) as session:
        return _train(request, params, threads_choice=why, sess=session)


def _train(req: TrainRequest, params: Params, threads_choice: str, sess: Session) -> JsonDict:
    """Train one method on a prepared benchmark; write model, metrics and history; log it all to MLflow.

    `sess` (s2r.distributed, under torchrun): rank 0 plans the resume and alone opens the MLflow run, checkpoints
    and exports; the other ranks train their shards and return {}.
    """
    from s2r.data.prepared import PreparedBenchmark
    from s2r.tracking import log_interval
    from s2r.train import fit

    cfg = method_config(params, req.method)
    total = cfg.epochs * cfg.steps_per_epoch
    data = PreparedBenchmark(req.data_dir)
    fingerprint = _fingerprint(req.method, to_dict(cfg), params.seed, data.data_version)
    resume = sess.on_writer(lambda: _plan_resume(req, fingerprint, total))  # rank 0 reads, every rank gets it
    if resume.finished is not None:
        return resume.finished if sess.writer else {}
    method, init_tags = _build_method(req, cfg, data, params, sess)
    if not sess.writer:  # ranks > 0 train their shards; rank 0 logs, checkpoints and exports
        _train_shard(req, method, params, resume.state, sess)
        return {}
    logged = {"method": req.method, "seed": params.seed, "methods": {req.method: to_dict(cfg)},
              "train": asdict(params.train), "benchmark": data.spec.name}
    with _train_run(req, params, method, logged, init_tags | {"threads_choice": threads_choice} | sess.tags(),
                    resume, total) as run:
        write_json(req.checkpoints / RUN_FILE, {"run_id": run.run_id, "method": req.method, "steps": total,
                                                "fingerprint": fingerprint})
        sess.run_id = sess.broadcast(run.run_id)  # the other ranks settle it if rank 0 dies (_train_shard)
        if resume.state is None:
            _log_inputs(run, method, logged)
        result = fit(method, train=params.train, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch,
                     ckpt_dir=req.checkpoints, run=run, resume_state=resume.state, on_epoch=req.on_epoch,
                     log_every=log_interval(params.tracking.log_every, total), session=sess)
        summary = _save_outputs(req, method, result, run, params, cfg.epochs, total)
        if req.metrics_out:
            write_json(Path(req.metrics_out), summary)
            run.log_artifact(req.metrics_out, "metrics")
    return summary


def method_config(params: Params, name: str) -> Schedule:
    """The typed config of params block `methods.<name>` (every block has a training schedule)."""
    cfg: Schedule | None = params.methods.get(name)
    if cfg is None:
        raise DataError(f"params.yaml has no section methods.{name}")
    return cfg


def _plan_resume(req: TrainRequest, fingerprint: str, total: int) -> _Resume:
    """`--resume`: the checkpoint and MLflow run to continue (mode FINISHED: nothing left to do). Without it: a fresh
    start, and an older run's checkpoint is deleted so it can never be resumed into this one if it dies early."""
    from s2r.train import CHECKPOINT, load_checkpoint

    ckpt_dir = req.checkpoints
    if not req.resume:
        (ckpt_dir / CHECKPOINT).unlink(missing_ok=True)
        (ckpt_dir / RUN_FILE).unlink(missing_ok=True)
        return _Resume()
    state = load_checkpoint(ckpt_dir)
    _check_fingerprint(ckpt_dir, fingerprint)
    run_id, mode = _resume_plan(ckpt_dir, state, total)
    done = _finished_summary(state, run_id, Path(req.out), req.metrics_out, total)
    if done is not None:
        notice(f"--resume: run {run_id} already finished ({total} steps, model in {req.out}); nothing to do")
    else:
        notice(f"--resume: {mode}")
    return _Resume(state, run_id, mode, done)


def _build_method(req: TrainRequest, cfg: Schedule, data: PreparedBenchmark, params: Params, sess: Session
                  ) -> tuple[Method[Any], dict[str, str]]:
    """Seed, construct the method under its block's name, start it from `--init`, set it up on the device."""
    from s2r.methods import registry
    from s2r.train import amp_dtype, seed_everything, select_device

    seed_everything(params.seed)
    method = registry.method_class(req.method)(cfg, data, params.seed)
    method.name = req.method  # an instance of a method under another name (e.g. mrgan) keeps that name
    init_tags = method.init_from(Path(req.init)) if req.init is not None else {}
    device = sess.device if sess.active else select_device(params.train.device)  # cuda:<LOCAL_RANK> under torchrun
    method.setup(device, amp_dtype(device, params.train.amp), cfg.epochs * cfg.steps_per_epoch)
    return method, init_tags


def _train_run(req: TrainRequest, params: Params, method: Method[Any], logged: JsonDict, tags: dict[str, str],
               resume: _Resume, total: int) -> TrackedRun:
    """The MLflow run of the training (the resumed one with --resume) in its paper's experiment, tagged."""
    import torch

    from s2r.methods import registry
    from s2r.tracking import TrackedRun

    return TrackedRun(
        req.run_name or f"train@{req.method}-seed{params.seed}",
        experiment=registry.experiment(params.tracking.experiment, req.method), params=logged,
        tags=_run_tags(method.data, params.seed, str(method.device)) | {"stage": "train", "method": req.method}
        | dict(req.tags) | tags | {"threads": str(torch.get_num_threads()), "steps": str(total)}
        | ({"resume": resume.mode} if req.resume else {}),
        run_id=resume.run_id, parent_run_id=req.parent_run_id, system_metrics=params.tracking.system_metrics)


def _train_shard(req: TrainRequest, method: Method[Any], params: Params, state: State | None, sess: Session) -> None:
    """A rank > 0 of a distributed training: train its shards, log nothing. If the training fails (a peer died,
    torchrun's SIGTERM), settle rank 0's MLflow run when rank 0 is gone, so it is never left RUNNING."""
    from s2r import tracking
    from s2r.train import fit

    sess.run_id = sess.broadcast("")
    total = method.cfg.epochs * method.cfg.steps_per_epoch
    try:
        fit(method, train=params.train, epochs=method.cfg.epochs, steps_per_epoch=method.cfg.steps_per_epoch,
            ckpt_dir=req.checkpoints, resume_state=state, on_epoch=req.on_epoch, session=sess,
            log_every=tracking.log_interval(params.tracking.log_every, total))  # windows as rank 0's
    except BaseException:
        if sess.run_id:
            try:
                tracking.reconcile_deferring_interrupts()  # KILLED once every process holding it (rank 0) died
            except Exception as e:  # the training's own error is the one to report
                notice(f"rank {sess.rank}: could not check rank 0's MLflow run {sess.run_id}: {e}")
        raise


def _log_inputs(run: TrackedRun, method: Method[Any], logged: JsonDict) -> None:
    """A new run's inputs: the dataset, a grid of the first training minibatch, the resolved config."""
    import matplotlib.pyplot as plt

    data = method.data
    run.log_dataset(data, "training")
    batch = method.preview_batch()
    names = [data.spec.classes[i] for i in batch[1][:32]] if data.spec.classes else None
    fig = sample_grid(batch[0][:32], names, title=f"{method.name}: first training minibatch")
    run.log_figure(fig, "samples/train_batch.png")
    plt.close(fig)
    run.log_dict(logged, "config/resolved.yaml")


def _save_outputs(req: TrainRequest, method: Method[Any], result: FitResult, run: TrackedRun, params: Params,
                  epochs: int, steps: int) -> JsonDict:
    """Health verdict, model.pt, curves, the MLflow model; returns the summary (train.json)."""
    final = result.history[-1] if result.history else {}
    verdict = health.assess(result.history, method.health_checks())  # COLLAPSED reasons for `s2r report`
    run.set_tags({"health": verdict["health"], "health_reasons": "; ".join(verdict["health_reasons"])[:5000]})
    model = method.export_model()
    save_trained(Path(req.out), req.method, method, params.seed, run.run_id)
    _plot_history(result.history, req.method, run, req.plots_out)
    model_id = ""
    if params.tracking.log_model:  # a LoggedModel per trained model: the Models tab's row (s2r.tracking)
        model_uri, model_id = run.log_model(
            model.cpu(), method.example_input(), f"{req.method}-seed{params.seed}", step=steps,
            params={"seed": params.seed, **to_dict(method.cfg)}, tags={"method": req.method, "seed": str(params.seed)})
        run.set_tags({"model_uri": model_uri, "model_id": model_id})
        model.to(method.device)
    return {
        **{k: v for k, v in final.items() if k != "epoch"},
        "epochs": epochs, "steps": steps, "seconds": round(result.seconds_total, 2),
        "images_per_second": round(result.samples / max(result.seconds_step + result.seconds_data, 1e-9), 1),
        "data_share": round(result.seconds_data / max(result.seconds_total, 1e-9), 4),
        "tracking_share": round(result.seconds_tracking / max(result.seconds_total, 1e-9), 4),
        "tracking_seconds_total": round(run.log_seconds, 2),  # + run start, params, figures, model
        "mlflow_run_id": run.run_id, "mlflow_model_id": model_id, **verdict,
    }


def save_trained(out: Path, method_name: str, method: Method[Any], seed: int, run_id: str) -> Path:
    """Write `<out>/model.pt` (method, config, weights, seed, data version, MLflow run): what load_trained reads."""
    from s2r.train import save_checkpoint

    path = Path(out) / "model.pt"
    save_checkpoint(path, {
        "method": method_name, "config": to_dict(method.cfg), "state": method.state_dict(), "seed": seed,
        "data_version": method.data.data_version, "mlflow_run_id": run_id,
    })
    return path


RUN_FILE = "run.json"  # beside the checkpoints: the MLflow run of the training that writes them


def notice(msg: str) -> None:
    """A one-line message for the user on stderr (stdout carries the command's result)."""
    print(f"s2r: {msg}", file=sys.stderr, flush=True)


def _fingerprint(method: str, cfg: dict[str, Any], seed: int, data_version: str) -> str:
    """What a checkpoint belongs to: method, its config, seed and data (not threads or logging)."""
    import hashlib

    blob = json.dumps({"method": method, "config": cfg, "seed": seed, "data": data_version}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_fingerprint(ckpt_dir: Path, fingerprint: str) -> None:
    """`--resume` must not continue a checkpoint written for other params or data."""
    marker = ckpt_dir / RUN_FILE
    if not marker.is_file():
        return
    saved = json.loads(marker.read_text()).get("fingerprint")
    if saved and saved != fingerprint:
        raise DataError(f"--resume: the checkpoint in {ckpt_dir} was written for other params, seed or data "
                        f"than this run's; run without --resume to start over (or use another --checkpoints)")


def _resume_plan(ckpt_dir: Path, state: dict[str, Any] | None, total: int) -> tuple[str | None, str]:
    """Which MLflow run `--resume` continues and from where, in words for the user and the run's tags.

    With a checkpoint: its step and run. Without one (killed before the first checkpoint): step 0, in the run
    named by run.json if a killed attempt left one, else a new run.
    """
    marker = ckpt_dir / RUN_FILE
    known = json.loads(marker.read_text()).get("run_id") if marker.is_file() else None
    if state is not None:
        step = int(state["step"])
        return state.get("run_id") or known, f"continuing from the checkpoint at step {step}/{total} in {ckpt_dir}"
    if known:
        return known, f"no checkpoint in {ckpt_dir}: starting from step 0 in the same MLflow run {known}"
    return None, f"no checkpoint in {ckpt_dir} and no earlier run: starting from step 0 in a new MLflow run"


def _finished_summary(state: dict[str, Any] | None, run_id: str | None, out: Path, metrics_out: Path | None,
                      total: int) -> dict[str, Any] | None:
    """The summary of a run that already finished (checkpoint at the last step, model written, run FINISHED)."""
    import torch

    from s2r.tracking import run_status

    if state is None or run_id is None or int(state["step"]) < total or not (out / "model.pt").is_file():
        return None
    if torch.load(out / "model.pt", map_location="cpu", weights_only=False).get("mlflow_run_id") != run_id:
        return None
    if run_status(run_id) != "FINISHED":
        return None  # killed after the model was written (e.g. while logging it): finish the run's work
    if metrics_out and Path(metrics_out).is_file():
        summary: JsonDict = json.loads(Path(metrics_out).read_text())
        return summary | {"resume": "already finished"}
    final = state["history"][-1] if state["history"] else {}
    return {**{k: v for k, v in final.items() if k != "epoch"}, "steps": total, "mlflow_run_id": run_id,
            "resume": "already finished"}


def choose_threads(setting: int | str) -> tuple[int, str]:
    """torch CPU threads for this process and why (logged as tags `threads`, `threads_choice`).

    "auto": OMP_NUM_THREADS when the user set it, else the cores this process may use (its CPU affinity, at
    most the physical cores) divided by the local workers of its tuning study ($S2R_LOCAL_WORKERS, set by
    `s2r tune`; 1 otherwise): several processes each running torch's default (every core) oversubscribe a CPU.
    An integer N: exactly N; 0: torch's default (no call).
    """
    if setting != "auto":
        n = int(setting)
        return n, f"train.threads={n}" if n > 0 else "train.threads=0 (torch default)"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"auto: OMP_NUM_THREADS={omp}"
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(cores, psutil.cpu_count(logical=False) or cores)  # as torch: no second thread per physical core
    workers = max(1, int(os.environ.get("S2R_LOCAL_WORKERS", "1") or 1))
    n = max(1, cores // workers)
    return n, f"auto: {cores} cores / {workers} local worker{'s' if workers > 1 else ''}"


def _plot_history(history: list[dict[str, float]], name: str, run: Any, plots_out: Path | None) -> None:
    """Training curves: CSV for `dvc plots`, PNG for MLflow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    if not history:
        return
    df = pd.DataFrame(history)
    if plots_out:
        Path(plots_out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(plots_out) / "train_history.csv", index=False)
    cols = [c for c in df.columns if c not in ("epoch", "lr")]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.6), dpi=100, squeeze=False)
    for ax, c in zip(axes.flat, cols):
        ax.plot(df["epoch"], df[c], marker="o", ms=3)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("epoch")
    fig.suptitle(f"train@{name}", fontsize=10)
    fig.tight_layout()
    run.log_figure(fig, "plots/train_history.png")
    plt.close(fig)


def load_trained(model_dir: Path, data_dir: Path, params: Params) -> tuple[Method[Any], State]:
    """Rebuild a trained method from `<model_dir>/model.pt` with the config it was trained with."""
    import torch

    from s2r.config import from_dict
    from s2r.data.prepared import PreparedBenchmark
    from s2r.methods import registry
    from s2r.train import select_device

    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model; run `s2r train` first")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    name = saved["method"]
    try:  # the config the model was trained with, complete: a key it lacks is never filled in from params.yaml
        cfg = from_dict(registry.config_class(name), saved["config"], str(path), f"methods.{name}")
    except ConfigError as e:
        raise ConfigError(f"{e} (the model was saved by another version of s2r; retrain it)") from None
    data = PreparedBenchmark(data_dir)
    if saved["data_version"] != data.data_version:
        raise DataError(f"{path} was trained on data version {saved['data_version'][:12]}, "
                        f"{data_dir} is {data.data_version[:12]}")
    method = registry.method_class(name)(cfg, data, saved["seed"])
    method.name = name
    method.load_state_dict(saved["state"])
    method.device = select_device(params.train.device)
    method.to(method.device).eval()
    return method, saved


def _under_training(train_run_id: str | None, method_name: str, params: Params) -> dict[str, Any]:
    """Where a run about a trained model (evaluate, refine) goes: nested under its training run, in that run's
    experiment, when this store holds it; else in the method's paper's experiment. Also the training's LoggedModel
    id and step count (its test metrics are logged there, s2r.tracking.log_model_metrics)."""
    from s2r.methods import registry
    from s2r.tracking import run_info

    found = run_info(train_run_id) if train_run_id else None
    if found is None:
        return {"experiment": registry.experiment(params.tracking.experiment, method_name), "parent_run_id": None,
                "model_id": "", "steps": 0}
    experiment, tags = found
    return {"experiment": experiment, "parent_run_id": train_run_id, "model_id": tags.get("model_id", ""),
            "steps": int(tags.get("steps", "0") or 0)}


def evaluate(method_name: str, model_dir: Path, data_dir: Path, out: Path, plots_out: Path | None,
             params: Params) -> dict[str, Any]:
    """Score a trained method on the target domain's test split with the evaluator it declares.

    A method names its evaluator (`Method.evaluator`, a module of s2r.evaluators registering one
    `s2r.evaluators.base.Evaluator`): evaluators belong to the task, not the method.
    """
    from s2r.evaluators import base as evaluators
    from s2r.tracking import TrackedRun, log_model_metrics

    method, saved = load_trained(model_dir, data_dir, params)
    if saved["method"] != method_name:
        raise DataError(f"{model_dir}/model.pt holds method {saved['method']!r}, not {method_name!r}")
    evaluator_name = method.evaluator
    if not evaluator_name:
        raise DataError(f"method {method_name!r} declares no evaluator (Method.evaluator) to score it with")
    evaluator = evaluators.evaluator(evaluator_name)
    data = method.data
    train = _under_training(saved["mlflow_run_id"], method_name, params)
    with TrackedRun(
        f"evaluate@{method_name}-seed{saved['seed']}", experiment=train["experiment"], section="test",
        parent_run_id=train["parent_run_id"],
        params={"method": method_name, "model": str(model_dir), "data": str(data_dir)},
        tags=_run_tags(data, saved["seed"], str(method.device)) | {
            "stage": "evaluate", "method": method_name, "evaluator": evaluator_name,
            "train_run_id": saved["mlflow_run_id"]},
    ) as run:
        dataset = run.log_dataset(data, "evaluation")
        metrics = evaluator(method, run, plots_out, params)
        if train["parent_run_id"]:  # the training run's row (and its LoggedModel) shows the test metrics too
            log_model_metrics(train["parent_run_id"], train["model_id"], {k: m.value for k, m in run.latest.items()},
                              step=train["steps"], dataset=dataset)
        result = {"method": method_name, "seed": saved["seed"], "evaluator": evaluator_name,
                  "domain": data.spec.target, "split": "test",
                  **metrics,
                  "train_run_id": saved["mlflow_run_id"], "mlflow_run_id": run.run_id}
        write_json(Path(out), result)
        run.log_artifact(out, "metrics")
    return result


def refine(method_name: str, model_dir: Path, data_dir: Path, out: Path, plots_out: Path | None,
           params: Params, metrics_out: Path | None = None) -> dict[str, Any]:
    """Run a trained translator over every split: a new prepared benchmark with the refined domains added.

    Domain `<A>_<method>` holds A's images translated A->B and becomes the benchmark's source; `<B>_<method>`
    holds B translated B->A (MrGAN's second stage can pair any of them). Labels, ids and factors are kept.
    The target becomes B, the domain the synthetic side was mapped into: paper 4 (Section 4.4) tests the
    MrGAN classifier on stage-1 refined real images when stage 2 maps to them, and on original real images
    after a plain CycleGAN (B = real).
    """
    import hashlib

    import matplotlib.pyplot as plt

    from s2r.data.prepared import PreparedBenchmark, derive
    from s2r.tracking import TrackedRun

    method, saved = load_trained(model_dir, data_dir, params)
    if "translate" not in method.capabilities:
        raise DataError(f"method {method_name!r} has no 'translate' capability to refine with")
    data = method.data
    a, b = method.domain_a, method.domain_b  # resolved by the translator ("" = source / target)
    ra, rb = f"{a}_{method_name}", f"{b}_{method_name}"
    model_sha = hashlib.sha256((Path(model_dir) / "model.pt").read_bytes()).hexdigest()
    train = _under_training(saved["mlflow_run_id"], method_name, params)
    with TrackedRun(
        f"refine@{method_name}-seed{saved['seed']}", experiment=train["experiment"], section="test",
        parent_run_id=train["parent_run_id"],
        params={"method": method_name, "model": str(model_dir), "data": str(data_dir), "out": str(out),
                "domain_a": a, "domain_b": b},
        tags=_run_tags(data, saved["seed"], str(method.device)) | {
            "stage": "refine", "method": method_name, "train_run_id": saved["mlflow_run_id"]},
    ) as run:
        # one-sided translators (CUT, paper 5) declare `directions = ("a2b",)`: only <A>_<method> is written
        run.log_dataset(data, "refine")
        pairs = [(d, orig, new) for d, orig, new in (("a2b", a, ra), ("b2a", b, rb)) if d in method.directions]
        derive(data, Path(out), {new: (orig, functools.partial(method.translate, direction=d))
                                 for d, orig, new in pairs},
               source=ra, target=b, version_salt=model_sha)
        refined = PreparedBenchmark(out)
        run.set_tags({"refined_data_version": refined.data_version})
        result: dict[str, Any] = {"method": method_name, "source": ra, "target": b,
                                  "domains": [new for _, _, new in pairs],
                                  "data_version": refined.data_version, "mlflow_run_id": run.run_id}
        rows, names = [], []
        for _, orig, new in pairs:
            x, y = data.get(orig, "test").images[:8], refined.get(new, "test").images[:8]
            result[f"mean_abs_change_{orig}"] = float(np.abs(y.astype(np.float32) - x).mean() / 255.0)
            rows += [x, y]
            names += [orig] + [""] * (len(x) - 1) + [new] + [""] * (len(y) - 1)  # one title per row
        run.log_metrics({k: v for k, v in result.items() if k.startswith("mean_abs")}, step=0)
        fig = sample_grid(np.concatenate(rows), names, cols=8, title=f"refine@{method_name}: originals / refined")
        if plots_out:
            Path(plots_out).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(plots_out) / "refined.png")
        run.log_figure(fig, "samples/refined.png")
        plt.close(fig)
        if metrics_out:
            write_json(Path(metrics_out), result)
    return result
