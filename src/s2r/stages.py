"""Pipeline stages behind the CLI: generate, validate, prepare, train, evaluate, report.

Each stage reads hyperparameters from params.yaml and paths from its arguments, writes its outputs
atomically, and (train / evaluate / refine) is one MLflow run named `<stage>@<method>-seed<N>` in the experiment of
the method's paper; evaluate and refine runs are nested under the training run of their model.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from s2r import health
from s2r.config import Params
from s2r.data.benchmark import DataError
from s2r.figures import sample_grid
from s2r.files import write_json

GENERATORS = {"digits": "s2r.data.digits", "scenes": "s2r.data.scenes"}


def generate(name: str, out: Path, params: Params) -> Path:
    """Generate an embedded benchmark from params.benchmarks.<name> and the global seed."""
    import importlib

    from s2r.data.benchmark import write_benchmark

    if name not in GENERATORS:
        raise DataError(f"unknown embedded benchmark {name!r}; known: {sorted(GENERATORS)}")
    gen = importlib.import_module(GENERATORS[name])
    spec, samples = gen.generate(getattr(params.benchmarks, name), params.seed)
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


def train(method_name: str, data_dir: Path, out: Path, params: Params, **kwargs: Any) -> dict[str, Any]:
    """Train one method (see `_train`) with torch's determinism and thread settings restored afterwards."""
    from s2r import distributed
    from s2r.train import torch_settings

    threads, why = choose_threads(params.train.threads)  # "auto": the cores per local worker
    t = params.train
    with torch_settings(deterministic=t.deterministic, threads=threads), \
            distributed.session(t.device, sync_batchnorm=t.sync_batchnorm, timeout_s=t.dist_timeout) as session:
        return _train(method_name, data_dir, out, params, threads_choice=why, session=session, **kwargs)


def _train(
    method_name: str,
    data_dir: Path,
    out: Path,
    params: Params,
    *,
    metrics_out: Path | None = None,
    plots_out: Path | None = None,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    init: Path | None = None,
    threads_choice: str = "",
    session: Any = None,
) -> dict[str, Any]:
    """Train one method on a prepared benchmark; write model, metrics and history; log it all to MLflow.

    `init`: a trained model folder the method starts from (e.g. twin-VAE stage 2 from stage 1); only methods
    with an `init_from(model_dir) -> tags` method accept it. `session` (s2r.distributed, under torchrun): rank 0
    plans the resume and alone opens the MLflow run, checkpoints, exports; the other ranks train and return {}.
    """
    import matplotlib.pyplot as plt
    import torch

    from s2r import distributed
    from s2r.data.prepared import PreparedBenchmark
    from s2r.methods import registry
    from s2r.tracking import TrackedRun, log_interval
    from s2r.train import CHECKPOINT, amp_dtype, fit, load_checkpoint, seed_everything, select_device

    cfg = params.methods.get(method_name)
    if cfg is None:
        raise DataError(f"params.yaml has no section methods.{method_name}")
    ckpt_dir = Path(ckpt_dir or Path("data/checkpoints") / method_name)
    total = cfg.epochs * cfg.steps_per_epoch
    data = PreparedBenchmark(data_dir)
    fingerprint = _fingerprint(method_name, asdict(cfg), params.seed, data.data_version)
    sess = session or distributed.Session()

    def plan() -> tuple[dict[str, Any] | None, str | None, str, dict[str, Any] | None]:
        """(checkpoint state, MLflow run to continue, what --resume does, summary of a finished run)."""
        resume_state = load_checkpoint(ckpt_dir) if resume else None
        resume_run_id, resume_mode = None, ""
        if resume:
            _check_fingerprint(ckpt_dir, fingerprint)
            resume_run_id, resume_mode = _resume_plan(ckpt_dir, resume_state, total)
            done = _finished_summary(resume_state, resume_run_id, Path(out), metrics_out, total)
            if done is not None:
                notice(f"--resume: run {resume_run_id} already finished ({total} steps, model in {out}); nothing to do")
                return resume_state, resume_run_id, resume_mode, done
            notice(f"--resume: {resume_mode}")
        else:  # a fresh start: an older run's checkpoint must not be resumed into this one if it dies early
            (ckpt_dir / CHECKPOINT).unlink(missing_ok=True)
            (ckpt_dir / RUN_FILE).unlink(missing_ok=True)
        return resume_state, resume_run_id, resume_mode, None

    resume_state, resume_run_id, resume_mode, done = sess.on_writer(plan)  # rank 0 reads, every rank gets it
    if done is not None:
        return done if sess.writer else {}
    seed_everything(params.seed)
    method = registry.method_class(method_name)(cfg, data, params.seed)
    method.name = method_name  # an instance of a method under another name (e.g. mrgan) keeps that name
    init_tags: dict[str, str] = {}
    if init is not None:
        if not hasattr(method, "init_from"):
            raise DataError(f"method {method_name!r} cannot start from a trained model (--init {init})")
        init_tags = method.init_from(Path(init))
    device = sess.device if sess.active else select_device(params.train.device)
    method.setup(device, amp_dtype(device, params.train.amp), total)
    logged = {"method": method_name, "seed": params.seed, "methods": {method_name: asdict(cfg)},
              "train": asdict(params.train), "benchmark": data.spec.name}
    if not sess.writer:  # ranks > 0 train their shards; rank 0 logs, checkpoints and exports
        _train_shard(method, cfg, params, ckpt_dir, resume_state, on_epoch, sess)
        return {}
    with TrackedRun(
        run_name or f"train@{method_name}-seed{params.seed}",
        experiment=registry.experiment(params.tracking.experiment, method_name), params=logged,
        tags=_run_tags(data, params.seed, str(device)) | {"stage": "train", "method": method_name} | (tags or {})
        | init_tags | {"threads": str(torch.get_num_threads()), "threads_choice": threads_choice, "steps": str(total)}
        | ({"resume": resume_mode} if resume else {}) | sess.tags(),
        run_id=resume_run_id, parent_run_id=parent_run_id,
        system_metrics=params.tracking.system_metrics,
    ) as run:
        write_json(ckpt_dir / RUN_FILE, {"run_id": run.run_id, "method": method_name, "steps": total,
                                         "fingerprint": fingerprint})
        sess.run_id = sess.broadcast(run.run_id)  # the others settle it if rank 0 dies (Session.settle_on_failure)
        if resume_state is None:
            run.log_dataset(data, "training")
            batch = method.preview_batch()
            names = [data.spec.classes[i] for i in batch[1][:32]] if data.spec.classes else None
            fig = sample_grid(batch[0][:32], names, title=f"{method_name}: first training minibatch")
            run.log_figure(fig, "samples/train_batch.png")
            plt.close(fig)
            run.log_dict(logged, "config/resolved.yaml")
        result = fit(method, train=params.train, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch,
                     ckpt_dir=ckpt_dir, run=run, resume_state=resume_state, on_epoch=on_epoch,
                     log_every=log_interval(params.tracking.log_every, total), session=sess)
        final = result.history[-1] if result.history else {}
        verdict = health.assess(result.history, method.health_checks())  # COLLAPSED reasons for `s2r report`
        run.set_tags({"health": verdict["health"], "health_reasons": "; ".join(verdict["health_reasons"])[:5000]})
        model = method.export_model()
        out = Path(out)
        save_trained(out, method_name, method, params.seed, run.run_id)
        _plot_history(result.history, method_name, run, plots_out)
        model_id = ""
        if params.tracking.log_model:  # a LoggedModel per trained model: the Models tab's row (s2r.tracking)
            model_uri, model_id = run.log_model(
                model.cpu(), method.example_input(), f"{method_name}-seed{params.seed}", step=total,
                params={"seed": params.seed, **asdict(cfg)}, tags={"method": method_name, "seed": str(params.seed)})
            run.set_tags({"model_uri": model_uri, "model_id": model_id})
            model.to(device)
        summary = {
            **{k: v for k, v in final.items() if k != "epoch"},
            "epochs": cfg.epochs, "steps": total, "seconds": round(result.seconds_total, 2),
            "images_per_second": round(result.samples / max(result.seconds_step + result.seconds_data, 1e-9), 1),
            "data_share": round(result.seconds_data / max(result.seconds_total, 1e-9), 4),
            "tracking_share": round(result.seconds_tracking / max(result.seconds_total, 1e-9), 4),
            "tracking_seconds_total": round(run.log_seconds, 2),  # + run start, params, figures, model
            "mlflow_run_id": run.run_id, "mlflow_model_id": model_id, **verdict,
        }
        if metrics_out:
            write_json(Path(metrics_out), summary)
            run.log_artifact(metrics_out, "metrics")
    return summary


def _train_shard(method: Any, cfg: Any, params: Params, ckpt_dir: Path, resume_state: dict[str, Any] | None,
                 on_epoch: Callable[[int, dict[str, float]], None] | None, sess: Any) -> None:
    """A rank > 0 of a distributed training: train its shards, log nothing. If the training fails (a peer died,
    torchrun's SIGTERM), settle rank 0's MLflow run when rank 0 is gone, so it is never left RUNNING."""
    from s2r import tracking
    from s2r.train import fit

    sess.run_id = sess.broadcast("")
    try:
        fit(method, train=params.train, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, ckpt_dir=ckpt_dir,
            resume_state=resume_state, on_epoch=on_epoch, session=sess,
            log_every=tracking.log_interval(params.tracking.log_every, cfg.epochs * cfg.steps_per_epoch))  # as rank 0
    except BaseException:
        if sess.run_id:
            try:
                tracking.reconcile_deferring_interrupts()  # KILLED once every process holding it (rank 0) died
            except Exception as e:  # the training's own error is the one to report
                notice(f"rank {sess.rank}: could not check rank 0's MLflow run {sess.run_id}: {e}")
        raise


def save_trained(out: Path, method_name: str, method: Any, seed: int, run_id: str) -> Path:
    """Write `<out>/model.pt` (method, config, weights, seed, data version, MLflow run): what load_trained reads."""
    from s2r.train import save_checkpoint

    path = Path(out) / "model.pt"
    save_checkpoint(path, {
        "method": method_name, "config": asdict(method.cfg), "state": method.state_dict(), "seed": seed,
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
        return json.loads(Path(metrics_out).read_text()) | {"resume": "already finished"}
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


def load_trained(model_dir: Path, data_dir: Path, params: Params) -> Any:
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
    cfg = from_dict(registry.config_class(name), saved["config"], str(path), f"methods.{name}")
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

    A method names its evaluator (`Method.evaluator`, a module of s2r.evaluators providing
    `evaluate(method, run, plots_out, params) -> dict`): evaluators belong to the task, not the method.
    """
    import importlib

    from s2r.tracking import TrackedRun, log_model_metrics

    method, saved = load_trained(model_dir, data_dir, params)
    if saved["method"] != method_name:
        raise DataError(f"{model_dir}/model.pt holds method {saved['method']!r}, not {method_name!r}")
    evaluator_name = getattr(method, "evaluator", "")
    if not evaluator_name:
        raise DataError(f"method {method_name!r} declares no evaluator (Method.evaluator) to score it with")
    evaluator = importlib.import_module(f"s2r.evaluators.{evaluator_name}")
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
        if plots_out:
            Path(plots_out).mkdir(parents=True, exist_ok=True)
        metrics = evaluator.evaluate(method, run, plots_out, params)
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


def report_columns(evaluator: str) -> list[str] | None:
    """The headline numbers an evaluator declares (`REPORT_COLUMNS` in its module), None if it declares none."""
    import importlib
    import importlib.util

    if not evaluator or importlib.util.find_spec(f"s2r.evaluators.{evaluator}") is None:
        return None
    return getattr(importlib.import_module(f"s2r.evaluators.{evaluator}"), "REPORT_COLUMNS", None)


def report(metrics_dir: Path, verdicts_out: Path | None = None, readme: Path | None = None) -> str:
    """A results table per evaluator of every evaluate.json under metrics_dir, then the paper verdicts.

    A model whose training verdict (train.json, s2r.health) or evaluation shows a collapse is printed as
    COLLAPSED with the reason instead of its numbers. `verdicts_out`: the verdicts as a metrics JSON;
    `readme`: rewrite its generated results block (s2r.verdicts).
    """
    from s2r import verdicts

    groups: dict[tuple[str, ...], list[str]] = {}
    for p in sorted(Path(metrics_dir).rglob("evaluate.json")):
        m = json.loads(p.read_text())
        cols = report_columns(m.get("evaluator", "classification" if "balanced_accuracy" in m else ""))
        if cols is None:  # an evaluator without declared columns: its first top-level numbers
            cols = [k for k, v in m.items() if isinstance(v, float)][:5]
        train_path = p.parent / "train.json"
        reasons = health.reasons_for(json.loads(train_path.read_text()) if train_path.is_file() else None, m)
        name = str(p.parent.relative_to(metrics_dir))
        if reasons:
            row = f"{name:<20} {str(m.get('domain', '?')):<12} COLLAPSED: " + "; ".join(reasons)
        else:
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "n/a" for k in cols]
            row = f"{name:<20} {str(m.get('domain', '?')):<12} " + " ".join(f"{c:>14}" for c in cells)
        groups.setdefault(tuple(cols), []).append(row)
    if not groups:
        return f"no results yet under {metrics_dir} (run `dvc repro`)"
    lines: list[str] = []
    for cols, rows in groups.items():
        head = f"{'method':<20} {'target':<12} " + " ".join(f"{c[:14]:>14}" for c in cols)
        lines += ([""] if lines else []) + [head, "-" * len(head), *rows]
    rows_v = verdicts.verdicts(Path(metrics_dir))
    lines += ["", "Paper verdicts (mean ± sample std over the seeds that ran; s2r.verdicts)", verdicts.text(rows_v)]
    if verdicts_out:
        write_json(Path(verdicts_out), verdicts.metrics_json(rows_v))
    if readme:
        verdicts.rewrite_readme(Path(readme), verdicts.markdown(rows_v))
    return "\n".join(lines)


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
        directions = getattr(method, "directions", ("a2b", "b2a"))
        pairs = [(d, orig, new) for d, orig, new in (("a2b", a, ra), ("b2a", b, rb)) if d in directions]
        derive(data, Path(out), {new: (orig, lambda x, d=d: method.translate(x, d)) for d, orig, new in pairs},
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
