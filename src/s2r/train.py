"""The training loop, written once: seeding, device/AMP, progress, checkpoints, resume, NaN guard, logging."""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2r import health
from s2r.config import TrainParams
from s2r.methods.base import Method
from s2r.tracking import TrackedRun

CHECKPOINT = "last.pt"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops instead of writing garbage."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def select_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it; none on CPU (slow there) or older GPUs."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    path = Path(ckpt_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class FitResult:
    """What fit() returns: per-epoch history and where the time went."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds_total: float = 0.0
    seconds_data: float = 0.0
    seconds_step: float = 0.0
    seconds_validate: float = 0.0
    seconds_tracking: float = 0.0
    samples: int = 0


def fit(
    method: Method,
    *,
    train: TrainParams,
    epochs: int,
    steps_per_epoch: int,
    ckpt_dir: Path,
    run: TrackedRun | None = None,
    resume_state: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `method` for epochs x steps_per_epoch steps, validating and logging once per epoch.

    `method.setup()` must have been called. With `resume_state` (from load_checkpoint) training continues at
    the saved step with the saved optimiser, scheduler and sampler states, so the result matches an
    uninterrupted run.
    """
    from tqdm import tqdm

    total = epochs * steps_per_epoch
    result = FitResult()
    start = 0
    if resume_state is not None:
        method.load_train_state(resume_state["method"])
        torch.set_rng_state(resume_state["torch_rng"])
        start = int(resume_state["step"])
        result.history = list(resume_state["history"])
        sums_restored = dict(resume_state.get("epoch_sums", {}))
    else:
        sums_restored = {}
    ckpt_path = Path(ckpt_dir) / CHECKPOINT

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "method": method.train_state(), "torch_rng": torch.get_rng_state(), "step": step,
            "history": result.history, "run_id": run.run_id if run else None, "epoch_sums": sums,
        })

    tracking_before = run.log_seconds if run else 0.0
    batches = method.batches()
    sums: dict[str, float] = sums_restored
    t_start = time.perf_counter()
    method.train()
    bar = tqdm(total=total, initial=start, desc=f"train {method.name}", unit="step", disable=not train.progress,
               mininterval=0.2 if sys.stderr.isatty() else 10.0)  # logs (dvc repro, CI) get a line per 10 s
    for step in range(start, total):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        losses = method.train_step(batch)
        result.seconds_data += t1 - t0
        result.seconds_step += time.perf_counter() - t1
        result.samples += int(getattr(method, "batch_size", 0))
        for k, v in losses.items():
            if not math.isfinite(v):
                raise NonFiniteLossError(
                    f"{method.name}: loss {k!r} is {v} at step {step + 1} (epoch {step // steps_per_epoch + 1}); "
                    f"lower the learning rate or check the data. Last checkpoint: {ckpt_path}"
                )
            sums[k] = sums.get(k, 0.0) + v
        result.steps += 1
        bar.update(1)
        if (step + 1) % steps_per_epoch == 0:
            epoch = (step + 1) // steps_per_epoch
            n = steps_per_epoch
            tv = time.perf_counter()
            method.eval()
            with torch.no_grad():
                val = method.validate()
            method.train()
            result.seconds_validate += time.perf_counter() - tv
            metrics = {f"train_{k}": v / max(n, 1) for k, v in sums.items()} | val
            metrics["lr"] = _first_lr(method)
            metrics |= health.epoch_signals(method, metrics)  # declared failure-mode signals (s2r.health)
            result.history.append({"epoch": epoch, **metrics})
            sums = {}
            if run is not None:
                run.log_metrics(metrics, step=epoch)
                run.flush()
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]})
        if (step + 1) % train.checkpoint_every == 0 or step + 1 == total:
            checkpoint(step + 1)
        if on_epoch is not None and (step + 1) % steps_per_epoch == 0:
            on_epoch((step + 1) // steps_per_epoch, result.history[-1])  # may raise to stop/prune
    bar.close()
    result.seconds_total = time.perf_counter() - t_start
    result.seconds_tracking = (run.log_seconds - tracking_before) if run else 0.0  # logging during training only
    return result


def _first_lr(method: Method) -> float:
    for o in method.optimizers.values():
        return float(o.param_groups[0]["lr"])
    return 0.0
