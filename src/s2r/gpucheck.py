"""`s2r gpu-check` (`make gpu-check`): on a CUDA machine, verify and time s2r where the papers run it.

1. every method block of params.yaml: a few bf16 training steps, an interruption + checkpoint resume, and its
   evaluation (or refinement), each an MLflow run, on small generated benchmarks (pass / fail + error per method);
2. the CUT step at paper 5's settings (batch 40; 60, 90 and 160 px patches; CUT's default networks), bf16 and
   fp32, bare step and whole loop (data share), side by side with the official CUT
   (taesungp/contrastive-unpaired-translation, driven through its own option parser) when `--reference DIR`
   names a checkout of it (never part of s2r);
3. one JSON with step times, images/s, peak memory and the official / s2r ratios;
4. (with the methods) one training under `torchrun --nproc-per-node <GPUs>` (nccl, DDP) against one process.

Without CUDA it says so in one line and exits 0. The timing helpers also run on the CPU (the CPU comparison).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2r.config import ConfigError, to_dict
from s2r.data.benchmark import DataError

# CUT's default networks (Park et al. 2020, options/: ngf 64, resnet_9blocks, basic D n_layers 3, netF_nc 256,
# num_patches 256, nce_layers 0,4,8,12,16) in s2r's cut Config; paper 5 Section IV-A: batch 40.
CUT_DEFAULT_NETS: dict[str, Any] = {
    "gen_width": 64, "gen_blocks": 9, "disc_channels": [64, 128, 256], "nce_layers": [0, 4, 7, 10, 14],
    "nce_mlp_dim": 256, "num_patches": 256, "batch_size": 40, "nce_idt": True, "flip": False,
}
PAPER_PATCHES = (60, 90, 160)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def median_step(step: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Median wall time of `step` (synchronised before and after each), after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "steps": steps}


def patch_benchmark(root: Path, size: int, n: int = 48, seed: int = 0) -> Path:
    """A prepared benchmark of `n` random RGB images per domain and split at `size` px (timing data only)."""
    from s2r.data.benchmark import BenchmarkSpec, DomainSpec, Sample, write_benchmark
    from s2r.data.prepared import prepare

    spec = BenchmarkSpec(name="gpucheck", tasks=["classification"],
                         domains=[DomainSpec("syn", "source", "synthetic"), DomainSpec("real", "target", "real")],
                         source="syn", target="real", image_size=size, channels=3, classes=["c0", "c1"])
    rng = np.random.default_rng(seed)
    samples = [Sample(id=f"{d}-{s}-{i}", domain=d, split=s, image=rng.integers(0, 256, (size, size, 3), np.uint8),
                      label=i % 2)
               for d in ("syn", "real") for s in ("train", "val", "test") for i in range(n if s == "train" else 4)]
    return prepare(write_benchmark(root / f"bench{size}", spec, samples, progress=False), root / f"prep{size}",
                   progress=False)


def cut_method(data: Path, patch: int, device: torch.device, amp: torch.dtype | None, batch: int = 40,
               **overrides: Any) -> Any:
    from s2r.config import from_dict
    from s2r.data.prepared import PreparedBenchmark
    from s2r.methods import cut
    from s2r.params import load_params

    raw = vars(load_params(_params_path()).methods["cut"]) | CUT_DEFAULT_NETS | {"patch_size": patch,
                                                                                "batch_size": batch} | overrides
    cfg = from_dict(cut.Config, raw, "gpu-check", "methods.cut")
    torch.manual_seed(0)
    m = cut.Method(cfg, PreparedBenchmark(data), 0)
    m.name = "cut"
    m.setup(device, amp, 1000)
    m.train()
    return m


def time_s2r_cut(data: Path, patch: int, device: torch.device, amp: torch.dtype | None, batch: int = 40,
                 steps: int = 12, warmup: int = 3, **overrides: Any) -> dict[str, Any]:
    """s2r's CUT train_step on prepared batches (drawn before timing): the bare step."""
    m = cut_method(data, patch, device, amp, batch, **overrides)
    it = m.batches()
    batches = [next(it) for _ in range(steps + warmup)]
    pos = iter(batches)
    _reset_peak(device)
    res = median_step(lambda: m.train_step(next(pos)), device, steps, warmup)
    return res | {"images_per_s": batch / res["median_s"], "peak_gb": _peak_gb(device)}


def time_s2r_loop(data: Path, patch: int, device: torch.device, amp: torch.dtype | None, batch: int = 40,
                  steps: int = 12, **overrides: Any) -> dict[str, Any]:
    """The whole loop (s2r.train.fit) per step vs the bare step, fixed costs cancelled (bench.loop_vs_step)."""
    from dataclasses import replace

    from s2r.bench import loop_vs_step
    from s2r.params import load_params

    train = replace(load_params(_params_path()).train, device="cuda" if device.type == "cuda" else "cpu",
                    progress=False, checkpoint_every=10**6)
    return loop_vs_step(lambda: cut_method(data, patch, device, amp, batch, **overrides), train,
                        (max(steps // 3, 2), steps))


@contextlib.contextmanager
def _reference_imports(ref: Path) -> Iterator[None]:
    """Import the official CUT's packages (models, options, data, util) from `ref`, then forget them again."""
    names = ("models", "options", "data", "util")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(ref))
    try:
        yield
    finally:
        sys.path.remove(str(ref))
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[k]
        sys.modules.update(saved)


def time_reference_cut(ref: Path, data: Path, patch: int, device: torch.device, batch: int = 40, steps: int = 12,
                       warmup: int = 3, extra: str = "") -> dict[str, Any]:
    """The official CUT's optimize_parameters() as its train.py drives it (fp32, its defaults), same patches."""
    import io

    from s2r.methods.base import to_float

    m = cut_method(data, patch, torch.device("cpu"), None, batch)  # only its sampler: the same random patches
    it = m.batches()
    patches = [next(it) for _ in range(steps + warmup)]
    gpu = str(device.index or 0) if device.type == "cuda" else "-1"
    with _reference_imports(ref), tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        from models import create_model  # type: ignore[import-not-found]
        from options.train_options import TrainOptions  # type: ignore[import-not-found]

        cmd = (f"--dataroot {tmp} --name gpucheck --checkpoints_dir {tmp} --model cut --batch_size {batch} "
               f"--load_size {patch} --crop_size {patch} --gpu_ids {gpu} --display_id 0 {extra}")
        opt = TrainOptions(cmd_line=cmd).parse()
        torch.manual_seed(0)
        model = create_model(opt)

        def as_input(b: Any) -> dict[str, Any]:
            a, y = (to_float(x, torch.device("cpu")) * 2 - 1 for x in (b.a, b.b))  # CUT's [-1, 1] tensors
            return {"A": a, "B": y, "A_paths": [""] * len(a), "B_paths": [""] * len(y)}

        inputs = iter([as_input(b) for b in patches])
        first = as_input(patches[0])
        model.data_dependent_initialize(first)
        model.setup(opt)
        model.parallelize()
        _reset_peak(device)

        def step() -> None:
            model.set_input(next(inputs))
            model.optimize_parameters()

        res = median_step(step, device, steps, warmup)
    return res | {"images_per_s": batch / res["median_s"], "peak_gb": _peak_gb(device), "options": cmd.split(" ", 6)[6]}


def _params_path() -> str:
    from s2r.tracking import project_root

    return str(project_root() / "params.yaml")


# -- 1. every method on the GPU --------------------------------------------------------------------------------
def check_params(names: list[str] | None, steps: int = 2, device: str = "cuda", path: str | None = None) -> Any:
    """params.yaml shrunk for the check: 2 epochs of `steps` steps, GAN pretraining and last-K windows that fit,
    small generated benchmarks, bf16 on CUDA, runs in experiment s2r-gpu-check."""

    from s2r.params import load_params

    path = path or _params_path()
    base = load_params(path)
    over: dict[str, Any] = {
        "train.device": device, "train.amp": True, "train.progress": False, "train.checkpoint_every": steps,
        "benchmarks.digits.scenes_per_class": {"train": 4, "val": 2, "test": 2},
        "benchmarks.scenes.samples": {"train": 16, "val": 8, "test": 8},
        "tracking.experiment": "s2r-gpu-check",  # its runs apart from the project's
    }
    for n in names or list(base.methods):
        cfg = base.methods[n]
        over |= {f"methods.{n}.epochs": 2, f"methods.{n}.steps_per_epoch": steps}
        settings = to_dict(cfg)
        for key, value in (("pretrain_g_steps", 1), ("pretrain_d_steps", 1), ("last_k", 2)):
            if key in settings:
                over[f"methods.{n}.{key}"] = min(settings[key], value)
    return load_params(path, over)


def check_methods(workdir: Path, names: list[str] | None, steps: int = 2, device: str = "cuda",
                  params_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Each method block (the registry's, in params order): train (interrupted after epoch 1, resumed from its
    checkpoint), then evaluate with its declared evaluator and refine where the block translates.

    Where a block trains comes from the blocks themselves, not from a list of names: the first benchmark it can be
    built on among the generated ones (scenes, digits) and the refined benchmarks the blocks before it wrote; a
    block of a method with a trained model of the method's own block starts from it where its `init_from` accepts
    it (`--init`, e.g. twin-VAE stage 2). Blocks named like their method run first, so the refined benchmarks and
    the models others start from exist."""
    from s2r import stages
    from s2r.data.prepared import prepare
    from s2r.methods import registry

    params = check_params(names, steps, device, params_path)
    names = names or list(params.methods)
    benchmarks = [prepare(stages.generate(b, workdir / f"{b}_raw", params), workdir / b, progress=False)
                  for b in ("scenes", "digits")]
    trained: dict[str, Path] = {}
    results: dict[str, dict[str, Any]] = {}
    pending = sorted(names, key=lambda n: registry.entry(n).name != n)  # stable: params order otherwise
    while pending:
        placed = {n: _placement(n, params, benchmarks) for n in pending}
        ready = [n for n in pending if placed[n][0] is not None]
        for name in ready if ready else pending:
            data, errors = placed[name]
            if data is None:  # no benchmark fits, and no block is left that could write one
                results[name] = {"status": "failed", "error": f"no benchmark fits: {errors}"}
            else:
                results[name] = _check_one(name, params, data, workdir, torch.device(device), trained, benchmarks)
            print(f"gpu-check {name:<22} {results[name]['status']}"
                  + (f"  {results[name].get('error', '')[:150]}" if results[name]["status"] != "passed" else ""),
                  flush=True)
        pending = [n for n in pending if n not in results]
    return results


def _placement(name: str, params: Any, benchmarks: list[Path]) -> tuple[Path | None, list[str]]:
    """The first benchmark the block's method can be built on (its domains blanked where the benchmark lacks them,
    as the contract tests do), or None and why each refused."""
    from s2r.data.prepared import PreparedBenchmark
    from s2r.methods import registry

    errors: list[str] = []
    for path in benchmarks:
        data = PreparedBenchmark(path)
        try:
            registry.method_class(name)(_fit_domains(params.methods[name], data), data, 0)
            return path, errors
        except (DataError, ConfigError) as e:
            errors.append(f"{path.name}: {e}")
    return None, errors


def _fit_domains(cfg: Any, data: Any) -> Any:
    """`cfg` with the domains it names (domain_a / domain_b) blanked where `data` lacks them (source / target)."""
    import dataclasses

    domains = {d.name for d in data.spec.domains}
    named = {k: v for k, v in to_dict(cfg).items() if k in ("domain_a", "domain_b")}
    return dataclasses.replace(cfg, **{k: "" for k, v in named.items() if v and v not in domains})


class _Interrupt(Exception):
    pass


def _check_one(name: str, params: Any, data: Path, workdir: Path, device: torch.device, trained: dict[str, Path],
               benchmarks: list[Path]) -> dict[str, Any]:
    """Train (interrupt + resume), evaluate, refine one block; adds its model to `trained` and a refined benchmark
    to `benchmarks`."""
    import dataclasses

    from s2r import stages
    from s2r.data.prepared import PreparedBenchmark
    from s2r.evaluators import base as evaluators
    from s2r.methods import registry

    entry = registry.entry(name)
    cfg = _fit_domains(params.methods[name], PreparedBenchmark(data))
    params = dataclasses.replace(params, methods={**params.methods, name: cfg})
    init = _init_model(name, cfg, data, trained)
    out, ck = workdir / f"model_{name}", workdir / f"ck_{name}"
    _reset_peak(device)
    t = time.perf_counter()
    try:
        def interrupt(epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 1:
                raise _Interrupt

        try:
            stages.train(stages.TrainRequest(name, data, out, ckpt_dir=ck, on_epoch=interrupt, init=init), params)
        except _Interrupt:
            pass
        summary = stages.train(stages.TrainRequest(name, data, out, ckpt_dir=ck, resume=True, init=init), params)
        trained[name] = out
        caps = entry.capabilities_for(cfg)
        done = []
        needs = evaluators.evaluator(entry.evaluator).capability if entry.evaluator else None
        if needs is not None and (not needs or needs in caps):
            stages.evaluate(name, out, data, workdir / f"eval_{name}.json", None, params)
            done.append(entry.evaluator)
        if "translate" in caps:
            benchmarks.append(_refine(name, out, data, workdir, params))
            done.append("refine")
        return {"status": "passed", "seconds": round(time.perf_counter() - t, 2), "evaluated": " ".join(done),
                "data": data.name, "init": str(init or ""),
                "final": {k: v for k, v in summary.items() if isinstance(v, float)},
                "peak_gb": _peak_gb(device), "mlflow_run_id": summary.get("mlflow_run_id")}
    except Exception as e:  # reported per method; the check goes on
        return {"status": "failed", "error": f"{type(e).__name__}: {e}",
                "where": "".join(traceback.format_exception(e)[-3:])[-1500:],
                "seconds": round(time.perf_counter() - t, 2)}


# -- one model on the GPUs: torchrun + nccl (docs/distributed.md) ---------------------------------------------------
def check_ddp(workdir: Path, method: str = "mixing", steps: int = 4, device: str = "cuda") -> dict[str, Any]:
    """`s2r train METHOD` at one process and under `torchrun --standalone --nproc-per-node <GPUs>` (nccl, DDP):
    both finish; the distributed run's logged losses match the single process's (the same global batch).
    device "cpu": the same with 2 gloo processes (a dry run of this check without a GPU)."""
    import json
    import subprocess

    from s2r import stages
    from s2r.data.prepared import prepare

    params = check_params([method], steps, device)
    data = prepare(stages.generate("digits", workdir / "digits_raw", params), workdir / "digits", progress=False)
    sets = {"train.device": device, "train.amp": True, "train.progress": False, "train.checkpoint_every": steps,
            "tracking.experiment": "s2r-gpu-check", "tracking.log_model": False,
            f"methods.{method}.epochs": 2, f"methods.{method}.steps_per_epoch": steps}
    gpus = 2 ** (torch.cuda.device_count().bit_length() - 1) if device == "cuda" else 2  # divides the batch
    launchers = {"one_process": [sys.executable, "-m", "s2r"],
                 f"torchrun_{gpus}": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={gpus}", "-m", "s2r"]}
    out: dict[str, Any] = {"method": method, "gpus": gpus}
    for name, launcher in launchers.items():
        w = workdir / name
        args = ["train", method, "--data", str(data), "--out", str(w / "model"), "--metrics", str(w / "train.json"),
                "--checkpoints", str(w / "ckpt"), "--params", _params_path(),
                *(a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}"))]
        t = time.perf_counter()
        done = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=1800)
        out[name] = {"returncode": done.returncode, "seconds": round(time.perf_counter() - t, 2),
                     **({"output": (done.stdout + done.stderr)[-2000:]} if done.returncode else {})}
        if done.returncode == 0:
            out[name]["final"] = {k: v for k, v in json.loads((w / "train.json").read_text()).items()
                                  if k.startswith("train_") and isinstance(v, float)}
    one, ddp = out["one_process"].get("final"), out[f"torchrun_{gpus}"].get("final")
    if one and ddp:
        out["max_rel_loss_diff"] = max(abs(one[k] - ddp[k]) / max(1.0, abs(one[k])) for k in one)
    # one GPU: DDP at world 1 changes no number; several: float and bf16 rounding of the split batch
    bound = 1e-5 if gpus == 1 else 5e-2
    out["status"] = "passed" if out.get("max_rel_loss_diff", 1.0) <= bound else "failed"
    print(f"gpu-check DDP {method} on {gpus} GPU(s): {out['status']} (max rel loss diff "
          f"{out.get('max_rel_loss_diff')})", flush=True)
    return out


def _refine(name: str, model: Path, data: Path, workdir: Path, params: Any) -> Path:
    from s2r import stages

    out = workdir / f"refined_{name}"
    stages.refine(name, model, data, out, None, params)
    return out


def _init_model(name: str, cfg: Any, data: Path, trained: dict[str, Path]) -> Path | None:
    """The trained model of the method's own block when this block starts from it (`--init`), else None."""
    from s2r.data.prepared import PreparedBenchmark
    from s2r.methods import registry

    entry = registry.entry(name)
    base = trained.get(entry.name)
    if name == entry.name or base is None:
        return None
    try:  # Method.init_from raises DataError where the method cannot start from a trained model
        entry.method(cfg, PreparedBenchmark(data), 0).init_from(base)
    except (ConfigError, DataError):
        return None  # this block trains from scratch
    return base


# -- 2. CUT timing --------------------------------------------------------------------------------------------------
def time_cut(workdir: Path, reference: Path | None, patches: tuple[int, ...] = PAPER_PATCHES, batch: int = 40,
             steps: int = 12, device: torch.device | None = None) -> list[dict[str, Any]]:
    device = device or torch.device("cuda")
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    rows = []
    for p in patches:
        data = patch_benchmark(workdir, max(p + 8, 64))
        row: dict[str, Any] = {"patch_px": p, "batch": batch}
        row["s2r_bf16"] = time_s2r_cut(data, p, device, amp, batch, steps) if amp else None
        row["s2r_fp32"] = time_s2r_cut(data, p, device, None, batch, steps)
        row["s2r_loop_bf16"] = time_s2r_loop(data, p, device, amp, batch, steps) if amp else None
        if reference is not None:
            row["official_fp32"] = time_reference_cut(reference, data, p, device, batch, steps)
            off = row["official_fp32"]["median_s"]
            row["official_over_s2r_fp32"] = off / row["s2r_fp32"]["median_s"]
            if amp:
                row["official_over_s2r_bf16"] = off / row["s2r_bf16"]["median_s"]
        rows.append(row)
        print(f"gpu-check CUT {p} px: " + ", ".join(f"{k} {v['median_s']:.4f} s" for k, v in row.items()
                                                     if isinstance(v, dict) and "median_s" in v), flush=True)
    return rows


def run(out: Path, reference: Path | None, methods: list[str] | None, skip_methods: bool, skip_timing: bool,
        steps: int) -> int:
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); nothing to check")
        return 0
    if reference is not None and not (Path(reference) / "models" / "cut_model.py").is_file():
        raise FileNotFoundError(f"--reference {reference}: not a checkout of taesungp/contrastive-unpaired-"
                                "translation (no models/cut_model.py)")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    dev = torch.device("cuda")
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
        "bf16": torch.cuda.is_bf16_supported(), "reference": str(reference) if reference else None,
    }
    with tempfile.TemporaryDirectory(prefix="s2r-gpu-check-") as tmp:
        if not skip_methods:
            res = check_methods(Path(tmp) / "methods", methods, steps)
            report["methods"] = res
            report["methods_passed"] = sorted(k for k, v in res.items() if v["status"] == "passed")
            report["methods_failed"] = sorted(k for k, v in res.items() if v["status"] != "passed")
            report["ddp"] = check_ddp(Path(tmp) / "ddp")
        if not skip_timing:
            report["cut"] = time_cut(Path(tmp) / "cut", reference)
    from s2r.files import write_json

    write_json(out, report)
    print(f"gpu-check: wrote {out}")
    return 1 if report.get("methods_failed") or report.get("ddp", {}).get("status") == "failed" else 0
