"""What every method provides to the shared training loop (s2r.train.fit)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from s2r import distributed
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array or tensor -> a tensor on `device`, without making the host wait for the GPU.

    On CUDA the copy comes from pinned (page-locked) memory with non_blocking=True: a copy from ordinary memory
    would wait for every queued kernel first (a hidden sync per batch). Arrays already in pinned memory (the
    loop's prefetcher puts batches there) are not copied again. Other devices: a plain `.to(device)`.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif device.type == "cuda" and _pinned_base(x) is not None:
        t = _pinned_base(x)  # the prefetcher's pinned tensor itself: the host allocator tracks its copies
    else:
        t = torch.from_numpy(x if x.flags.writeable else np.array(x, copy=True))
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def _pinned_base(x: np.ndarray) -> torch.Tensor | None:
    """The pinned tensor an array is a whole view of (train.pin_batch makes such arrays), else None."""
    b = x.base
    if (isinstance(b, torch.Tensor) and b.is_pinned() and tuple(b.shape) == x.shape and x.flags.c_contiguous
            and b.data_ptr() == x.ctypes.data and b.dtype == torch.from_numpy(x[:0]).dtype):
        return b
    return None


def to_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, C) array -> float (B, C, H, W) in [0, 1] on `device` (decode-free hot path).

    The result is NCHW-contiguous on purpose. A plain `permute(0, 3, 1, 2)` of an HWC array has channels_last
    strides, so every convolution would run oneDNN's NHWC kernels; on CPUs without AVX-512 (oneDNN's AVX2 code
    path, torch 2.14.1 / oneDNN 3.12) the weight gradient of a 1x1 stride-2 NHWC convolution is
    nondeterministic and can corrupt the heap ("malloc(): unaligned tcache chunk detected", SIGABRT/SIGSEGV
    inside autograd backward). See `tests/test_determinism.py`; channels_last stays a GPU-only choice
    (`train.channels_last`).
    """
    t = to_device(np.asarray(images), device)  # the uint8 bytes travel, the float conversion runs on the device
    # (B, H, W, C) -> (B, C, H, W), copied into fresh NCHW strides (also for C = 1, where strides are ambiguous)
    return t.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255.0)


class IndexPool:
    """Cycles through shuffled epochs of one index set, so every image is seen once per pool epoch."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = indices
        self.order = np.empty(0, np.int64)
        self.pos = 0

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        while n > 0:
            if self.pos >= len(self.order):
                self.order, self.pos = rng.permutation(self.indices), 0
            take = min(n, len(self.order) - self.pos)
            out.append(self.order[self.pos : self.pos + take])
            self.pos += take
            n -= take
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def state(self) -> dict[str, Any]:
        return {"order": self.order.copy(), "pos": self.pos}

    def load(self, s: dict[str, Any]) -> None:
        self.order, self.pos = np.asarray(s["order"], np.int64), int(s["pos"])


def limited_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Pick `per_class` samples of every class (all if -1), sorted, reproducibly from `rng`.

    The classifier and the label-aligned CycleGAN call it with the same labels and `default_rng(real_subset_seed)`,
    so both get the same images (refined benchmarks keep the real domain's order and labels).
    """
    if per_class == -1:
        return np.arange(len(labels))
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise DataError(f"class {c} has only {len(idx)} real training images; real_per_class={per_class}")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


class Method(nn.Module):
    """Base class: owns networks, optimisers, schedulers and the batch sampler of one method.

    Subclasses implement `train_step` (one optimisation step, GANs alternate D/G inside it) returning a
    dict of losses as detached 0-dim tensors on the device (or Python numbers; never `float(tensor)`, which
    makes the host wait for the GPU every step: the loop syncs only when it logs), `validate` (per-epoch
    metrics on the validation split), and `predict`/`encode`/`translate` for the capabilities they declare.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    evaluator: ClassVar[str] = ""  # module of s2r.evaluators run by `s2r evaluate` ("" = none)
    paper: ClassVar[str] = ""  # the paper it implements (registry.PAPERS), its MLflow experiment; "" = none

    def __init__(self, cfg: Any, data: PreparedBenchmark, seed: int) -> None:
        super().__init__()
        self.cfg, self.data, self.seed = cfg, data, seed
        self.rng = np.random.default_rng(seed)  # drives batch sampling; its state is checkpointed
        self.device = torch.device("cpu")
        self.amp_dtype: torch.dtype | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.batch_size = 0  # the global batch per step (methods set it); ranks of a distributed run split it

    # -- set up by the loop ------------------------------------------------------------------------------
    def setup(self, device: torch.device, amp_dtype: torch.dtype | None, total_steps: int) -> None:
        """Move to the device and build optimisers/schedulers (before any checkpoint is restored)."""
        self.device, self.amp_dtype = device, amp_dtype
        self.to(device)
        self.optimizers = self.configure_optimizers()
        self.schedulers = self.configure_schedulers(total_steps)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        return {}

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision where the loop enabled it (GPU only)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def optimize(self, loss: torch.Tensor, opt: str) -> None:
        """zero_grad / backward / step for one optimiser, then its scheduler."""
        o = self.optimizers[opt]
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    def step_schedulers(self) -> None:
        for s in self.schedulers.values():
            s.step()

    # -- implemented by methods --------------------------------------------------------------------------
    def batches(self) -> Iterator[Any]:
        """An endless iterator of training batches (drawn with self.rng)."""
        raise NotImplementedError

    def before_training(self) -> None:
        """Work the loop runs once before it draws the first batch (e.g. GAN pretraining on its own batches).

        It may use the sampler (self.rng): the loop calls it before the prefetch thread starts drawing."""

    def train_step(self, batch: Any) -> dict[str, torch.Tensor | float]:
        raise NotImplementedError

    # -- distributed training (s2r.distributed; docs/distributed.md) --------------------------------------
    def distributed_networks(self) -> list[nn.Module]:
        """The networks DDP wraps: modules whose forward train_step calls, together holding every optimised
        parameter, pairwise disjoint. Default: the method's direct submodules that an optimiser updates."""
        optimised = {id(p) for o in self.optimizers.values() for g in o.param_groups for p in g["params"]}
        return [m for m in self.children() if any(id(p) in optimised for p in m.parameters())]

    def shard_batch(self, batch: Any, shard: distributed.Shard) -> Any:
        """This rank's rows of one global batch (every array of k * batch_size rows, k groups; see
        s2r.distributed.shard_batch); methods whose batches hold other arrays override it."""
        return distributed.shard_batch(batch, shard, self.batch_size)

    def validate(self) -> dict[str, float]:
        return {}

    def health_signals(self) -> dict[str, float]:
        """Signals of this method's failure modes on validation data (s2r.health), computed once per epoch."""
        return {}

    def health_checks(self) -> list[Any]:
        """The s2r.health.Check list whose failure marks a trained model COLLAPSED (plus frozen losses)."""
        return []

    def example_input(self) -> np.ndarray:
        """A small input for MLflow's model signature."""
        raise NotImplementedError

    def export_model(self) -> nn.Module:
        """The module logged to MLflow and saved as the stage output."""
        return self

    # -- state for checkpoints ---------------------------------------------------------------------------
    def sampler_state(self) -> dict[str, Any]:
        """Everything that decides the next batches (methods with extra sampler state extend it)."""
        return {"rng": copy.deepcopy(self.rng.bit_generator.state)}

    def load_sampler_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])

    def preview_batch(self) -> Any:
        """One training batch for a sample grid, leaving the sampler exactly where it was."""
        saved = self.sampler_state()
        batch = next(self.batches())
        self.load_sampler_state(saved)
        return batch

    def train_state(self) -> dict[str, Any]:
        return {
            "model": self.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "sampler": self.sampler_state(),
        }

    def load_train_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.load_sampler_state(state["sampler"])
