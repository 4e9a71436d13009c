"""What every method provides to the shared training loop (s2r.train.fit)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from s2r import distributed
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.health import Check

C = TypeVar("C", covariant=True)  # a method's Config dataclass (read-only after construction)
State = dict[str, Any]  # a torch.save/torch.load checkpoint payload (an I/O edge: tensors, arrays, numbers)
Prediction = np.ndarray | dict[str, np.ndarray]  # class probabilities, one per-pixel map, or named maps


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array or tensor -> a tensor on `device`, without making the host wait for the GPU.

    On CUDA the copy comes from pinned (page-locked) memory with non_blocking=True: a copy from ordinary memory
    would wait for every queued kernel first (a hidden sync per batch). Arrays already in pinned memory (the
    loop's prefetcher puts batches there) are not copied again. Other devices: a plain `.to(device)`.
    """
    pinned = _pinned_base(x) if isinstance(x, np.ndarray) and device.type == "cuda" else None
    if isinstance(x, torch.Tensor):
        t = x
    elif pinned is not None:
        t = pinned  # the prefetcher's pinned tensor itself: the host allocator tracks its copies
    else:
        t = torch.from_numpy(x if x.flags.writeable else np.array(x, copy=True))
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def _pinned_base(x: np.ndarray) -> torch.Tensor | None:
    """The pinned tensor an array is a whole view of (train.pin_batch makes such arrays), else None."""
    b: object = x.base  # numpy types it as an array; a pinned tensor's .numpy() view has the tensor here
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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in [0, 1] (any device) -> uint8 (B, H, W, C) host array, rounded: to_float's inverse."""
    # (B, C, H, W) -> (B, H, W, C); the uint8 bytes travel to the host, not the floats
    out: np.ndarray = (x.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


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

    def state(self) -> State:
        return {"order": self.order.copy(), "pos": self.pos}

    def load(self, s: State) -> None:
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


class Schedule(Protocol):
    """What every method's Config has: its training schedule (`methods.<name>.epochs`, `.steps_per_epoch`)."""

    @property
    def epochs(self) -> int: ...

    @property
    def steps_per_epoch(self) -> int: ...


class Sampler(Protocol):
    """Part of a method's batch sampler whose position is checkpointed (an IndexPool, a pair sampler)."""

    def state(self) -> State: ...

    def load(self, s: State) -> None: ...


S = TypeVar("S", bound=Sampler)


class Method(nn.Module, Generic[C]):
    """Base class: owns networks, optimisers, schedulers and the batch sampler of one method.

    Subclasses implement `train_step` (one optimisation step, GANs alternate D/G inside it) returning a
    dict of losses as detached 0-dim tensors on the device (or Python numbers; never `float(tensor)`, which
    makes the host wait for the GPU every step: the loop syncs only when it logs), `validate` (per-epoch
    metrics on the validation split), and `predict`/`encode`/`translate` for the capabilities they declare.
    Every optional hook the loop, the stages or an evaluator calls is declared here with its default.
    """

    name: str = ""  # = the module's name; an instance trained under another block name (mrgan) carries that
    capabilities: ClassVar[frozenset[str]] = frozenset()
    evaluator: ClassVar[str] = ""  # module of s2r.evaluators run by `s2r evaluate` ("" = none)
    paper: ClassVar[str] = ""  # the paper it implements (registry.PAPERS), its MLflow experiment; "" = none
    directions: ClassVar[tuple[str, ...]] = ("a2b", "b2a")  # translations `s2r refine` writes (one-sided: a2b)

    def __init__(self, cfg: C, data: PreparedBenchmark, seed: int) -> None:
        super().__init__()
        self.cfg, self.data, self.seed = cfg, data, seed
        self.rng = np.random.default_rng(seed)  # drives batch sampling; its state is checkpointed
        self._sampler_parts: dict[str, Sampler] = {}  # checkpointed parts of the batch sampler (sampler_part)
        self.batch_size = 0  # samples per training step: the global batch, split over the ranks of a DDP run
        self.source = data.spec.source  # the domain the method learns from (latent classifiers fit on it)
        self.domain_a, self.domain_b = "", ""  # translators: the domains they map between ("" = none)
        self.device = torch.device("cpu")
        self.amp_dtype: torch.dtype | None = None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}

    # -- set up by the loop ------------------------------------------------------------------------------
    def setup(self, device: torch.device, amp_dtype: torch.dtype | None, total_steps: int) -> None:
        """Move to the device and build optimisers/schedulers (before any checkpoint is restored)."""
        self.device, self.amp_dtype = device, amp_dtype
        self.to(device)
        self.optimizers = self.configure_optimizers()
        self.schedulers = self.configure_schedulers(total_steps)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def configure_schedulers(self, total_steps: int) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
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
    def batches(self) -> Iterator[Any]:  # a method's own batch type (a tuple or NamedTuple of arrays)
        """An endless iterator of training batches (drawn with self.rng)."""
        raise NotImplementedError

    def before_training(self) -> None:
        """Work the loop runs once before it draws the first batch (e.g. GAN pretraining on its own batches).

        It may use the sampler (self.rng): the loop calls it before the prefetch thread starts drawing."""

    def train_step(self, batch: Any) -> Mapping[str, torch.Tensor | float]:  # batch: what batches() yields
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

    def health_checks(self) -> list[Check]:
        """The s2r.health.Check list whose failure marks a trained model COLLAPSED (plus frozen losses)."""
        return []

    def example_input(self) -> np.ndarray:
        """A small input for MLflow's model signature."""
        raise NotImplementedError

    def export_model(self) -> nn.Module:
        """The module logged to MLflow and saved as the stage output."""
        return self

    # -- capabilities (declared in `capabilities`; the registry checks the class overrides each one) ----------
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, C) -> float latents (N, D)."""
        raise NotImplementedError(f"method {self.name!r} has no 'encode' capability")

    def translate(self, images: np.ndarray, direction: str = "a2b") -> np.ndarray:
        """uint8 images (N, H, W, C) of domain_a (a2b) or domain_b (b2a) -> uint8 images of the other domain."""
        raise NotImplementedError(f"method {self.name!r} has no 'translate' capability")

    def predict(self, images: np.ndarray) -> Prediction:
        """uint8 images (N, H, W, C) -> class probabilities (N, K), a per-pixel map or named maps."""
        raise NotImplementedError(f"method {self.name!r} has no 'predict' capability")

    # -- optional hooks, with their defaults -----------------------------------------------------------------
    def init_from(self, model_dir: Path) -> dict[str, str]:
        """Start from a trained model (`s2r train --init`, e.g. twin-VAE stage 2 from stage 1); returns run tags."""
        raise DataError(f"method {self.name!r} cannot start from a trained model (--init {model_dir})")

    def encode_split(self, domain: str, split: str, flipped: bool = False) -> np.ndarray:
        """Latents of a whole prepared split (methods with a feature cache override it)."""
        images = np.asarray(self.data.get(domain, split).images)
        return self.encode(images[:, :, ::-1].copy() if flipped else images)  # (N, H, W, C), W mirrored

    def reconstruct(self, images: np.ndarray) -> np.ndarray | None:
        """uint8 images -> their uint8 reconstructions; None for a method without a decoder."""
        return None

    def trained_tasks(self) -> list[str] | None:
        """The dense tasks whose heads this model trained; None where the method does not distinguish them."""
        return None

    # -- state for checkpoints ---------------------------------------------------------------------------
    def sampler_part(self, key: str, part: S) -> S:
        """Register a part of the batch sampler (an IndexPool, ...) whose position checkpoints save; returns it."""
        self._sampler_parts[key] = part
        return part

    def sampler_state(self) -> State:
        """Everything that decides the next batches: the sampling rng and every registered sampler part."""
        return {"rng": copy.deepcopy(self.rng.bit_generator.state),
                "parts": {k: p.state() for k, p in self._sampler_parts.items()}}

    def load_sampler_state(self, state: State) -> None:
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        for k, p in self._sampler_parts.items():
            p.load(state["parts"][k])

    def preview_batch(self) -> Any:
        """One training batch for a sample grid, leaving the sampler exactly where it was."""
        saved = self.sampler_state()
        batch = next(self.batches())
        self.load_sampler_state(saved)
        return batch

    def train_state(self) -> State:
        return {
            "model": self.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "sampler": self.sampler_state(),
        }

    def load_train_state(self, state: State) -> None:
        self.load_state_dict(state["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.load_sampler_state(state["sampler"])
