"""The training loop, written once: seeding, device/AMP, progress, checkpoints, resume, NaN guard, logging."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import queue
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import nn

from s2r import distributed, health
from s2r.config import TrainParams
from s2r.files import atomic_path
from s2r.methods.base import Method, State
from s2r.tracking import TrackedRun

if TYPE_CHECKING:
    from tqdm import tqdm

CHECKPOINT = "last.pt"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops instead of writing garbage."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


TorchState = tuple[bool, bool, bool, int]


def torch_state() -> TorchState:
    """torch's process-global settings a training changes: deterministic mode, warn-only, cudnn benchmark, threads."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            bool(torch.backends.cudnn.benchmark), torch.get_num_threads())


def restore_torch_state(state: TorchState) -> None:
    deterministic, warn_only, benchmark, threads = state
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_settings(*, deterministic: bool, threads: int) -> Iterator[None]:
    """Deterministic kernels and the thread count for one training, restored afterwards.

    These are process-global: without the restore, a training inside a longer-lived process (`s2r tables`, the
    trials of one `s2r tune` worker, the test suite) would change the numerics of everything that runs after it.
    """
    saved = torch_state()
    try:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.use_deterministic_algorithms(False)
            torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per input shape, keeps the fastest
        if threads > 0:
            torch.set_num_threads(threads)
        yield
    finally:
        restore_torch_state(saved)


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


def save_checkpoint(path: Path, state: State) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(ckpt_dir: Path) -> State | None:
    path = Path(ckpt_dir) / CHECKPOINT
    if not path.is_file():
        return None
    state: State = torch.load(path, map_location="cpu", weights_only=False)
    return state


@dataclass
class FitResult:
    """What fit() returns: per-epoch history and where the time went."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds_total: float = 0.0
    seconds_data: float = 0.0  # waiting for the next batch (with prefetching: only the stalls)
    seconds_step: float = 0.0  # train_step + waiting for the GPU where losses are read (the syncs)
    seconds_validate: float = 0.0
    seconds_tracking: float = 0.0
    samples: int = 0


class LossSums:
    """Running per-key sums of what train_step returns, kept on the device: no host/device sync per step.

    Tensors are added in float64 on their device, Python numbers in Python. float32 -> float64 is exact and the
    additions happen in the same order as the former `sums[k] += float(v)`, so the means are bit-identical to
    summing Python floats. `read()` syncs once (one stacked copy) and returns Python floats.
    """

    def __init__(self, start: dict[str, float] | None = None) -> None:
        self.host: dict[str, float] = dict(start or {})
        self.dev: dict[str, torch.Tensor] = {}
        self.order: list[str] = list(self.host)  # keys in first-seen order (the metric order of the history)

    def add(self, losses: Mapping[str, torch.Tensor | float]) -> None:
        for k, v in losses.items():
            if k not in self.host and k not in self.dev:
                self.order.append(k)
            if isinstance(v, torch.Tensor):
                v = v.detach().reshape(())
                if k in self.dev:
                    self.dev[k] += v
                else:
                    self.dev[k] = self.host.pop(k, 0.0) + v.to(torch.float64)
            elif k in self.dev:
                self.dev[k] += float(v)
            else:
                self.host[k] = self.host.get(k, 0.0) + float(v)

    def read(self) -> dict[str, float]:
        """Python floats (one device sync for all tensor sums)."""
        out = dict(self.host)
        if self.dev:
            keys = list(self.dev)
            out |= dict(zip(keys, torch.stack([self.dev[k] for k in keys]).cpu().tolist()))
        return {k: out[k] for k in self.order if k in out}

    def __bool__(self) -> bool:
        return bool(self.host or self.dev)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher:
    """Draws the next batches in a background thread while the current step runs (`train.prefetch` ahead).

    The sampler (method.batches(), driven by method.rng) runs ahead of training, so before drawing the batch
    that follows a checkpoint the thread waits until that checkpoint is written (`release`): a checkpoint's
    sampler state is always the one after exactly the steps it holds, and resuming gives the same batches.
    On CUDA the batch's arrays are copied into pinned memory here, so to_device's copies are non-blocking.
    """

    def __init__(self, batches: Iterator[Any], first: int, total: int, pause_before: Callable[[int], bool],
                 depth: int, pin: bool) -> None:
        self.q: queue.Queue[Any] = queue.Queue(maxsize=max(depth, 1))
        self.released = first
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, args=(batches, first, total, pause_before, pin),
                                       name="s2r-prefetch", daemon=True)
        self.thread.start()

    def _run(self, batches: Iterator[Any], first: int, total: int, pause_before: Callable[[int], bool],
             pin: bool) -> None:
        try:
            for j in range(first, total):  # j = steps done before the batch being drawn is used
                if j > first and pause_before(j):
                    with self.cond:
                        self.cond.wait_for(functools.partial(self._may_draw, j))
                if self.stopped:
                    return
                batch = next(batches)
                self._put(pin_batch(batch) if pin else batch)
        except BaseException as e:  # handed to the training thread, raised there
            self._put(_Failed(e))

    def _may_draw(self, steps_done: int) -> bool:
        """The checkpoint before this batch is written (or the loop stopped)."""
        return self.released >= steps_done or self.stopped

    def _put(self, item: Any) -> None:
        while not self.stopped:
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        item = self.q.get()
        if isinstance(item, _Failed):
            raise item.exc
        return item

    def release(self, steps_done: int) -> None:
        with self.cond:
            self.released = steps_done
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=10)


class _Serial:
    """No prefetching (train.prefetch: 0): batches drawn in the training thread."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches

    def get(self) -> Any:
        return next(self.batches)

    def release(self, steps_done: int) -> None:
        pass

    def close(self) -> None:
        pass


def pin_batch(batch: Any) -> Any:
    """The batch with every numpy array copied into pinned memory (a view of a pinned tensor; to_device uses
    that tensor, whose copy the CUDA caching host allocator tracks). Tuples, named tuples, lists, dicts and
    dataclasses are rebuilt with the same types."""
    if isinstance(batch, np.ndarray):
        if batch.dtype == object:
            return batch
        return torch.from_numpy(np.ascontiguousarray(batch)).pin_memory().numpy()
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(pin_batch(x) for x in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(pin_batch(x) for x in batch)
    if isinstance(batch, dict):
        return {k: pin_batch(v) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: pin_batch(getattr(batch, f.name))
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def resolve_auto(value: bool | str, device: torch.device) -> bool:
    """`auto` for train.channels_last / train.compile: off until measured on a GPU (no GPU measurement yet)."""
    return value is True


def use_channels_last(train: TrainParams, device: torch.device) -> bool:
    """NHWC only on CUDA: on CPUs oneDNN's AVX2 NHWC weight gradient is broken (issue 22, tests/test_determinism)."""
    return device.type == "cuda" and resolve_auto(train.channels_last, device)


def apply_train_options(method: Method[Any], train: TrainParams) -> Callable[[], None]:
    """channels_last and torch.compile on the method's networks; returns the undo (before export/pickling)."""
    compiled: list[nn.Module] = []
    if use_channels_last(train, method.device):
        method.to(memory_format=torch.channels_last)  # 4-D weights NHWC (convolutions then run NHWC)
    if resolve_auto(train.compile, method.device):
        for child in method.children():  # each network (G, D, heads, ...) in place: state_dict keys unchanged
            if any(True for _ in child.parameters()):
                child.compile(dynamic=False)
                compiled.append(child)

    def undo() -> None:  # a compiled module cannot be pickled (MLflow's model format): back to eager
        for c in compiled:
            c._compiled_call_impl = None

    return undo


def fit(
    method: Method[Any],
    *,
    train: TrainParams,
    epochs: int,
    steps_per_epoch: int,
    ckpt_dir: Path,
    run: TrackedRun | None = None,
    resume_state: State | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 0,
    session: distributed.Session | None = None,
) -> FitResult:
    """Train `method` for epochs x steps_per_epoch steps, validating and logging once per epoch.

    `method.setup()` must have been called. With `resume_state` (from load_checkpoint) training continues at
    the saved step with the saved optimiser, scheduler and sampler states, so the result matches an
    uninterrupted run.

    Losses stay on the device (LossSums) and are read (one sync), checked for NaN/inf and logged only at epoch
    ends and checkpoints. Every metric is logged at the global step. `log_every` > 0: the training curves
    (`train_<loss>`, MLflow `train/<loss>`) are the loss means over every `log_every` steps, kept on the device
    until the next read; 0: the epoch means. Validation, health and lr are logged once per epoch. A non-finite
    loss stops training naming the steps since the last check, and no checkpoint is written after it.

    `session` (s2r.distributed, under torchrun): this rank trains its shard of every global batch with the
    networks wrapped in DDP; losses are means over ranks; only rank 0 writes checkpoints (pass `run` there only).
    """
    loop = _Loop(method, train, epochs * steps_per_epoch, steps_per_epoch, Path(ckpt_dir) / CHECKPOINT, run,
                 log_every, session or distributed.Session())
    source = loop.prepare(resume_state)
    bar = loop.progress_bar()
    t_start = time.perf_counter()
    method.train()
    try:
        for step in range(loop.start, loop.total):
            loop.train_step(source)
            bar.update(1)
            done = step + 1
            if log_every > 0 and done % log_every == 0:
                loop.end_window(done)
            if done % steps_per_epoch == 0:
                metrics = loop.end_epoch(done)
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]})
            if loop.is_checkpoint(done):
                loop.checkpoint(done)
                source.release(done)
            if on_epoch is not None and done % steps_per_epoch == 0:
                on_epoch(done // steps_per_epoch, loop.result.history[-1])  # may raise to stop/prune
        loop.log_windows()  # a last window that ended between the last epoch end and the last step
        if run is not None:
            run.flush()
    finally:
        source.close()
        loop.undo_options()
        bar.close()
    return loop.finish(time.perf_counter() - t_start)


class _Loop:
    """The state of one `fit`: step counters, loss sums, timings; each step of the loop is a method."""

    def __init__(self, method: Method[Any], train: TrainParams, total: int, steps_per_epoch: int, ckpt_path: Path,
                 run: TrackedRun | None, log_every: int, sess: distributed.Session) -> None:
        self.method, self.train, self.run, self.log_every, self.sess = method, train, run, log_every, sess
        self.scope: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.undo_options: Callable[[], None] = lambda: None
        self.total, self.steps_per_epoch, self.ckpt_path = total, steps_per_epoch, ckpt_path
        self.result = FitResult()
        self.start = 0
        self.sums, self.window = LossSums(), LossSums()  # per epoch; per `log_every` window
        self.pending: list[tuple[int, LossSums]] = []  # finished windows, read at the next epoch end/checkpoint
        self.verified = 0  # every step up to here had finite losses
        self.tracking_before = run.log_seconds if run else 0.0

    def restore(self, state: State | None) -> None:
        """Continue from a checkpoint: method, RNGs, step, history and the partial loss sums."""
        if state is None:
            return
        self.method.load_train_state(state["method"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])  # randn_like etc. on the GPU resume exactly
        self.start = self.verified = int(state["step"])
        self.result.history = list(state["history"])
        self.sums = LossSums(state.get("epoch_sums", {}))
        self.window = LossSums(state.get("window_sums", {}))

    def prepare(self, state: State | None) -> Prefetcher | _Serial:
        """Restore a checkpoint, apply the train options, wrap the networks in DDP (under torchrun), run the
        method's before_training; returns the batch source."""
        self.restore(state)
        self.undo_options = apply_train_options(self.method, self.train)
        try:
            self.scope = _step_scope(self.method, self.sess)
            with self.scope():  # e.g. GAN pretraining: it draws from the sampler, so before the prefetch thread does
                self.method.before_training()
            return self.batch_source()
        except BaseException:
            self.undo_options()
            raise

    def is_checkpoint(self, done: int) -> bool:
        return done % self.train.checkpoint_every == 0 or done == self.total

    def batch_source(self) -> Prefetcher | _Serial:
        """The method's batches, drawn ahead in a thread (`train.prefetch`) or in this one."""
        batches = self.method.batches()
        if self.train.prefetch <= 0:
            return _Serial(batches)
        return Prefetcher(batches, self.start, self.total, self.is_checkpoint, self.train.prefetch,
                          pin=self.method.device.type == "cuda")

    def progress_bar(self) -> tqdm[NoReturn]:
        from tqdm import tqdm

        return tqdm(total=self.total, initial=self.start, desc=f"train {self.method.name}", unit="step",
                    disable=not (self.train.progress and self.sess.writer),
                    mininterval=0.2 if sys.stderr.isatty() else 10.0)  # logs (dvc repro, CI) get a line per 10 s

    def train_step(self, source: Prefetcher | _Serial) -> None:
        """One optimisation step on the next batch (this rank's shard of it under torchrun); its losses are added
        on the device (no sync)."""
        t0 = time.perf_counter()
        batch = source.get()
        if self.sess.world > 1:
            batch = self.method.shard_batch(batch, self.sess.shard)  # this rank's rows of the global batch
        t1 = time.perf_counter()
        with self.scope():
            losses = self.method.train_step(batch)
        self.result.seconds_data += t1 - t0
        self.result.seconds_step += time.perf_counter() - t1
        self.result.samples += self.method.batch_size  # the global batch
        self.sums.add(losses)
        if self.log_every > 0:
            self.window.add(losses)
        self.result.steps += 1

    def checked(self, sums: LossSums, step: int) -> dict[str, float]:
        """Read (the one sync: waiting for queued GPU work counts as step time), average over ranks, check NaN/inf."""
        t = time.perf_counter()
        values = self.sess.mean(sums.read())
        self.result.seconds_step += time.perf_counter() - t
        for k, v in values.items():
            if not math.isfinite(v):
                first, n = self.verified + 1, self.steps_per_epoch
                e0, e1 = (first - 1) // n + 1, (step - 1) // n + 1
                raise NonFiniteLossError(
                    f"{self.method.name}: loss {k!r} is {v} in steps {first}-{step} (epoch {e0}"
                    f"{f'-{e1}' if e1 != e0 else ''}; losses are checked where they are logged and checkpointed); "
                    f"lower the learning rate or check the data. Last checkpoint (before these steps): "
                    f"{self.ckpt_path}")
        self.verified = step
        return values

    def end_window(self, done: int) -> None:
        """A `log_every` window ended: keep its sums (read at the epoch end: the device runs on meanwhile)."""
        self.pending.append((done, self.window))
        self.window = LossSums()

    def log_windows(self) -> None:
        """Log the loss means of the finished windows at their global steps (read now: no sync when they ended)."""
        while self.pending:
            at, finished = self.pending.pop(0)
            means = {f"train_{k}": v / self.log_every for k, v in self.checked(finished, at).items()}
            if self.run is not None:
                self.run.log_metrics(means, step=at)

    def end_epoch(self, done: int) -> dict[str, float]:
        """Mean training losses, validation metrics, learning rate and health signals of the epoch; logged."""
        method, n = self.method, self.steps_per_epoch
        self.log_windows()
        train_sums = self.checked(self.sums, done)
        tv = time.perf_counter()
        method.eval()
        with torch.no_grad():
            val = method.validate()
        method.train()
        self.result.seconds_validate += time.perf_counter() - tv
        metrics = {f"train_{k}": v / max(n, 1) for k, v in train_sums.items()} | val
        metrics["lr"] = _first_lr(method)
        metrics |= health.epoch_signals(method, metrics)  # declared failure-mode signals (s2r.health)
        self.result.history.append({"epoch": done // n, **metrics})
        self.sums = LossSums()
        if self.run is not None:  # the training curves are the windows' means when log_every > 0
            self.run.log_metrics({k: v for k, v in metrics.items()
                                  if not (self.log_every and k.startswith("train_"))}, step=done)
            self.run.flush()
        return metrics

    def checkpoint(self, step: int) -> None:
        """Method, RNGs, history and partial sums, atomically; never weights that a NaN already reached."""
        self.log_windows()
        epoch_sums = self.checked(self.sums, step)
        window_sums = self.checked(self.window, step)
        if not self.sess.writer:  # rank 0 alone writes (every rank holds the same state)
            return
        if self.run is not None:
            self.run.flush()  # what the checkpoint covers is in MLflow before it: a resumed run logs nothing twice
        method = self.method
        save_checkpoint(self.ckpt_path, {
            "method": method.train_state(), "torch_rng": torch.get_rng_state(), "step": step,
            "cuda_rng": torch.cuda.get_rng_state_all() if method.device.type == "cuda" else None,
            "history": self.result.history, "run_id": self.run.run_id if self.run else None,
            "epoch_sums": epoch_sums, "window_sums": window_sums,
        })

    def finish(self, seconds: float) -> FitResult:
        self.result.seconds_total = seconds
        run = self.run  # logging during training only:
        self.result.seconds_tracking = (run.log_seconds - self.tracking_before) if run else 0.0
        return self.result


def _step_scope(method: Method[Any], sess: distributed.Session
                ) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """What every training step runs inside: under torchrun, the method's networks wrapped in DDP (s2r.distributed);
    otherwise nothing."""
    if not sess.active:
        return contextlib.nullcontext
    distributed.check_batch_size(method.batch_size, sess.world, f"methods.{method.name}")
    optimised = [p for o in method.optimizers.values() for g in o.param_groups for p in g["params"]]
    return distributed.Training(method, method.distributed_networks(), optimised, sess).step


def _first_lr(method: Method[Any]) -> float:
    for o in method.optimizers.values():
        return float(o.param_groups[0]["lr"])
    return 0.0
