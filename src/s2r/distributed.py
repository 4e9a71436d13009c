"""One model on many processes: torch.distributed data parallelism (DDP) under torchrun (docs/distributed.md).

`torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m s2r train METHOD ...` starts N processes
per node; each finds its rank in torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and `session` joins the
process group: `nccl` with `cuda:<LOCAL_RANK>` when the run uses CUDA, `gloo` on the CPU. Without torchrun there
is no process group and nothing here changes a number (every helper is the identity at one process).

Semantics (what a user can predict):
- `batch_size` is the GLOBAL batch. Every rank runs the method's seeded sampler with the same state, so all ranks
  draw the same global batch, and each keeps its own contiguous rows (`Shard`, `Method.shard_batch`): N ranks see
  the same examples per step as one process. Sampler state is identical on every rank, so a checkpoint (written by
  rank 0) resumes at any number of ranks.
- Every optimised network is wrapped in DistributedDataParallel (`Training`): gradients are averaged over ranks,
  which for a loss that is a mean over the batch is the single-process gradient. Learning rates are unchanged.
- Terms that couple samples across the batch are computed on the global batch: BatchNorm statistics
  (`GlobalBatchNorm`, `train.sync_batchnorm`), MMD and permutations (`Shard.gather`, differentiable), ratios of
  sums such as a mean over labelled pixels (`Shard.ratio`). Random draws inside a training step whose shape
  depends on the batch (reparameterisation noise, input noise, dropout masks, per-image GAN targets) are drawn
  at the global shape on every rank and sliced (`Shard.randn_like`, `Shard.rows`), so each rank uses the numbers
  one process would have drawn for its rows.
- Rank 0 alone writes (MLflow run, checkpoints, model); metrics are means over ranks (`Session.mean`).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from s2r.config import ConfigError

T = TypeVar("T")
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


# -- the shard of the global batch this process trains on ---------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This process's part of every global batch: rank `rank` of `world` equal, contiguous shards.

    A batch field of G rows laid out in `groups` consecutive groups (e.g. an autoencoder's anchors, positives,
    negatives: groups = 3) gives this rank rows [r*g/N, (r+1)*g/N) of each group of g = G/groups rows. At one
    process (world 1) every method is the identity, so nothing changes a number.
    """

    rank: int = 0
    world: int = 1

    def rows(self, n_global: int, groups: int = 1) -> np.ndarray:
        """Indices of this rank's rows among n_global rows (groups consecutive groups)."""
        if n_global % (groups * self.world):
            raise ValueError(f"{n_global} rows in {groups} group(s) do not split into {self.world} equal shards")
        g = n_global // groups
        part = g // self.world
        return np.concatenate([np.arange(k * g + self.rank * part, k * g + (self.rank + 1) * part)
                               for k in range(groups)])

    def local(self, x: ArrayT, groups: int = 1) -> ArrayT:
        """This rank's rows of a global array or tensor (dim 0)."""
        if self.world == 1:
            return x
        idx = self.rows(len(x), groups)
        if isinstance(x, torch.Tensor):
            return x[torch.from_numpy(idx).to(x.device)]
        picked: ArrayT = x[idx]
        return picked

    def global_n(self, n_local: int) -> int:
        return n_local * self.world

    def randn_like(self, t: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """N(0, 1) noise for this rank's rows of `t`: the rows of one draw at the global shape (as one process)."""
        if self.world == 1:
            return torch.randn_like(t)
        noise = torch.randn((self.global_n(t.shape[0]), *t.shape[1:]), dtype=t.dtype, device=t.device)
        return self.local(noise, groups)

    def randn(self, shape: tuple[int, ...], generator: torch.Generator | None = None, groups: int = 1
              ) -> torch.Tensor:
        """N(0, 1) CPU noise of local `shape` drawn from `generator` at the global shape, sliced to this rank."""
        if self.world == 1:
            return torch.randn(shape, generator=generator, device="cpu")
        noise = torch.randn((self.global_n(shape[0]), *shape[1:]), generator=generator, device="cpu")
        return self.local(noise, groups)

    def gather(self, t: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The global batch from every rank's rows, in the global row order; gradients flow back to each rank's rows.

        For batch-coupled terms (MMD, permutations, history pools): every rank computes the term on the same global
        tensor. The backward sums each rank's gradient of the global rows (DDP then averages parameter gradients),
        which is the single-process gradient of the term.
        """
        if self.world == 1:
            return t
        if t.requires_grad:
            gathered: torch.Tensor = _Gather.apply(t, self, groups)
            return gathered
        return _gather(t.detach(), self, groups)

    def ratio(self, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        """sum / count over the global batch (e.g. a loss over labelled pixels): num / max(den, 1) at one process.

        With N ranks each returns N * num / (global den): their mean (what DDP's averaging optimises and the loop
        logs) is the global ratio, which a mean of per-rank ratios is not when counts differ between shards.
        """
        if self.world == 1:
            return num / den.clamp(min=1)
        total = den.detach().clone()
        dist.all_reduce(total)
        return num * self.world / total.clamp(min=1)


ONE_PROCESS = Shard()
_SHARD: contextvars.ContextVar[Shard | None] = contextvars.ContextVar("s2r_shard", default=None)


def shard() -> Shard:
    """The shard of the training step running now (world 1 outside a distributed training step)."""
    return _SHARD.get() or ONE_PROCESS


@contextlib.contextmanager
def sharded(s: Shard) -> Iterator[Shard]:
    token = _SHARD.set(s)
    try:
        yield s
    finally:
        _SHARD.reset(token)


def _order(s: Shard, groups: int, n_local: int) -> torch.Tensor:
    """Permutation from rank-major concatenation (rank 0's rows, rank 1's, ...) to the global row order."""
    idx = np.empty(n_local * s.world, np.int64)
    for r in range(s.world):
        idx[Shard(r, s.world).rows(n_local * s.world, groups)] = np.arange(r * n_local, (r + 1) * n_local)
    return torch.from_numpy(idx)


def _gather(t: torch.Tensor, s: Shard, groups: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(s.world)]
    dist.all_gather(parts, t.contiguous())
    out = torch.cat(parts)
    return out if groups == 1 else out[_order(s, groups, len(t)).to(t.device)]


class _Gather(torch.autograd.Function):
    """all_gather forward; backward: the sum over ranks of the gradient of this rank's rows."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, s: Shard, groups: int) -> torch.Tensor:
        ctx.shard, ctx.groups = s, groups
        return _gather(t, s, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        return ctx.shard.local(g, ctx.groups), None, None


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: backward sums the ranks' gradients (the global statistics' derivative)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.contiguous().clone()
        dist.all_reduce(g)
        return g


# -- batch-coupled layers ----------------------------------------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks), with their gradient.

    torch's nn.SyncBatchNorm runs on GPUs only; this computes the same statistics on any device with two
    all_reduce calls per forward (sum, then the centred sum of squares). It shares the parameters and running
    buffers of the BatchNorm it stands in for (state_dict keys and the optimiser's tensors are unchanged), and in
    eval mode it is that BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    @classmethod
    def standing_in_for(cls, bn: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
        g = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        g.weight, g.bias = bn.weight, bn.bias
        g.running_mean, g.running_var, g.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        g.train(bn.training)
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if not (self.training or (self.running_mean is None and self.running_var is None)):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, factor, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)  # per-channel (C,) -> broadcastable (1, C, 1, ...)
        xf = x.float()
        n = xf.numel() // xf.shape[1] * dist.get_world_size()
        # sums accumulated in float64 (no float64 copy of x): statistics as exact as one process's BatchNorm kernel
        mean: torch.Tensor = (_SumOverRanks.apply(xf.sum(dims, dtype=torch.float64)) / n).float()
        centred = xf - mean.view(shape)
        # biased variance, as BatchNorm normalises with
        var: torch.Tensor = (_SumOverRanks.apply(centred.pow(2).sum(dims, dtype=torch.float64)) / n).float()
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():  # running variance unbiased, as BatchNorm keeps it
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


class GlobalDropout(nn.Dropout):
    """Dropout whose mask is drawn at the global batch shape and sliced: each rank drops what one process would.

    On the CPU this reproduces F.dropout's draw exactly (bernoulli_(1 - p) on a tensor of the input's shape, then
    / (1 - p)); CUDA's fused dropout kernel draws its mask differently, so there the masks are a valid, disjoint
    draw but not the single-process one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        s = shard()
        noise = torch.empty((s.global_n(x.shape[0]), *x.shape[1:]), dtype=x.dtype, device=x.device)
        noise.bernoulli_(1 - self.p).div_(1 - self.p)
        return x * s.local(noise)


# -- process group -------------------------------------------------------------------------------------------
def launched() -> bool:
    """Started by torchrun (or another launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Session:
    """This process's place in a (possibly one-process) training: rank, world, device, backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""  # "" = no process group (one process, not launched by torchrun)
    sync_batchnorm: bool = True
    run_id: str = ""  # rank 0's MLflow run (known to every rank once it is open)

    @property
    def active(self) -> bool:
        """A process group exists: networks are wrapped in DDP (also at world 1 under torchrun)."""
        return bool(self.backend)

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that logs, checkpoints, exports and registers."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled; for plans and small states, not for tensors in the loop)."""
        if not self.active or self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def on_writer(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone (e.g. reading a checkpoint, deciding what --resume does); its result, or the
        user error it raised, reaches every rank (a checkpoint on rank 0's disk resumes a run on any nodes)."""
        if self.world == 1:
            return fn()
        result: Any = None
        error: Exception | None = None
        if self.writer:
            try:
                result = fn()
            except Exception as e:  # handed to every rank, raised there (the others would wait for rank 0)
                error = e
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def tags(self) -> dict[str, str]:
        """MLflow tags of a distributed training (none for a plain one-process run)."""
        if not self.active:
            return {}
        return {"distributed.world_size": str(self.world), "distributed.backend": self.backend,
                "distributed.nodes": str(max(1, self.world // max(self.local_world, 1))),
                "distributed.sync_batchnorm": str(self.sync_batchnorm).lower()}

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Per-key means over ranks (every rank passes the same keys in the same order)."""
        if self.world == 1 or not values:
            return values
        keys = list(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()


def device_for(pref: str, local_rank: int) -> torch.device:
    """cuda:<local_rank> where the run uses CUDA (train.device auto with a GPU, or cuda), else the CPU."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if pref in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextlib.contextmanager
def session(device_pref: str, *, sync_batchnorm: bool = True, timeout_s: float = 1800.0) -> Iterator[Session]:
    """Join torchrun's process group for one training (nccl on CUDA, gloo on the CPU); a one-process Session without
    torchrun. The group is destroyed on the way out, also when the training fails."""
    if not launched():
        yield Session(sync_batchnorm=sync_batchnorm)
        return
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    device = device_for(device_pref, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":  # bound to this rank's GPU at once (eager NCCL init)
        dist.init_process_group(backend, timeout=timeout, device_id=device)
    else:
        dist.init_process_group(backend, timeout=timeout)
    try:
        yield Session(rank, world, local_rank, int(env.get("LOCAL_WORLD_SIZE", "1")), device, backend, sync_batchnorm)
    finally:
        dist.destroy_process_group()


# -- DDP wrapping of a method's networks ---------------------------------------------------------------------
def _swaps(root: nn.Module, sync_batchnorm: bool) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, name, original, stand-in) for every BatchNorm (global statistics) and Dropout (global masks)."""
    out: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    for m in root.modules():
        for name, child in m._modules.items():
            if sync_batchnorm and isinstance(child, nn.modules.batchnorm._BatchNorm) \
                    and not isinstance(child, GlobalBatchNorm):
                out.append((m, name, child, GlobalBatchNorm.standing_in_for(child)))
            elif type(child) is nn.Dropout:
                stand_in = GlobalDropout(child.p, child.inplace)
                stand_in.train(child.training)
                out.append((m, name, child, stand_in))
    return out


class _Routed:
    """A network's `forward` during a distributed step: a call from the method goes through the network's DDP
    wrapper, whose own call of the network (re-entrant) runs the network's real forward."""

    def __init__(self, ddp: DistributedDataParallel, forward: Callable[..., Any]) -> None:
        self.ddp, self.forward, self.inside, self.calls = ddp, forward, False, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.inside:
            return self.forward(*args, **kwargs)
        self.inside, self.calls = True, self.calls + 1
        try:
            return self.ddp(*args, **kwargs)
        finally:
            self.inside = False


class Training:
    """A method's networks wrapped for one distributed training (`Session.active`).

    `networks` (Method.distributed_networks) are the modules whose forward the training step calls; each with a
    trainable parameter gets one DistributedDataParallel wrapper. During `step()` a call of such a network goes
    through its wrapper (its `forward` is routed there: the method's code, attributes and isinstance checks are
    unchanged, and a module shared by several parents needs one wrapper), BatchNorm / Dropout layers are replaced
    by their global-batch stand-ins (when the world has more than one rank), and `shard()` is this rank's. Outside
    `step()` the method is untouched: state_dict keys, checkpoints, validation and exported models never see DDP
    (no `module.` prefixes).
    """

    def __init__(self, method: nn.Module, networks: list[nn.Module], optimised: list[nn.Parameter],
                 sess: Session) -> None:
        self.method, self.session = method, sess
        self.units = [n for n in dict.fromkeys(networks) if any(p.requires_grad for p in n.parameters())]
        _check_cover(method, self.units, optimised)
        many = sess.world > 1
        kwargs: dict[str, Any] = {"forward_sync_buffers": many and not sess.sync_batchnorm}
        if sess.device.type == "cuda":
            kwargs["device_ids"] = [sess.device.index]
        self.wrappers = [DistributedDataParallel(u, **kwargs) for u in self.units]
        self.swaps = _swaps(method, sess.sync_batchnorm) if many else []
        self.checked = False

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """The scope of one training step (or of pretraining): wrappers, stand-ins and the shard in place."""
        for parent, name, _, stand_in in self.swaps:
            parent._modules[name] = stand_in
        routes = [_Routed(w, u.forward) for u, w in zip(self.units, self.wrappers)]
        for unit, route in zip(self.units, routes):
            unit.__dict__["forward"] = route
        try:
            with sharded(self.session.shard):
                yield
        finally:
            for unit in self.units:
                unit.__dict__.pop("forward", None)
            for parent, name, original, stand_in in self.swaps:
                original.train(stand_in.training)
                parent._modules[name] = original
        if not self.checked:
            self._check_calls([r.calls for r in routes])

    def _check_calls(self, calls: list[int]) -> None:
        """First step: a network whose parameters got gradients without a call of its forward would train
        unsynchronised on every rank (silently different models): refuse it."""
        graded = [any(p.grad is not None for p in unit.parameters()) for unit in self.units]
        for unit, n, g in zip(self.units, calls, graded):
            if g and n == 0:
                raise RuntimeError(f"{type(self.method).__name__}: network {type(unit).__name__} got gradients but "
                                   "its forward was never called (its DDP wrapper never ran); list the modules "
                                   "whose forward the training step calls in Method.distributed_networks()")
        self.checked = any(graded)  # checked once a scope trained (before_training may not)


def _check_cover(method: nn.Module, units: list[nn.Module], optimised: list[nn.Parameter]) -> None:
    """Every optimised parameter in exactly one DDP unit (units disjoint, none missing)."""
    owner: dict[int, int] = {}
    for i, u in enumerate(units):
        for p in u.parameters():
            if id(p) in owner and owner[id(p)] != i:
                raise RuntimeError(f"{type(method).__name__}.distributed_networks(): {type(u).__name__} shares "
                                   f"parameters with {type(units[owner[id(p)]]).__name__}; list disjoint modules")
            owner[id(p)] = i
    names = {id(p): n for n, p in method.named_parameters()}
    missing = [names.get(id(p), "?") for p in optimised if p.requires_grad and id(p) not in owner]
    if missing:
        raise RuntimeError(f"{type(method).__name__}.distributed_networks() leaves optimised parameters outside "
                           f"every DDP wrapper (their gradients would not be averaged): {missing[:6]}")


# -- sharding a batch -----------------------------------------------------------------------------------------
def shard_batch(batch: Any, s: Shard, global_batch: int) -> Any:
    """This rank's rows of every array in a batch structure (tuples, named tuples, lists, dicts, dataclasses).

    An array of k * global_batch rows holds k consecutive groups of samples (e.g. anchors, positives, negatives)
    and is sharded group by group; an empty array or a non-array leaf stays as it is. Any other length is an
    error: such a batch needs its own Method.shard_batch.
    """
    import dataclasses

    if s.world == 1:
        return batch
    if isinstance(batch, (np.ndarray, torch.Tensor)):
        n = len(batch) if batch.ndim else 0
        if n == 0:
            return batch
        if n % global_batch:
            raise ValueError(f"a batch field has {n} rows, not a multiple of the global batch size {global_batch}: "
                             "the method must shard its batches itself (Method.shard_batch)")
        if isinstance(batch, torch.Tensor):
            return s.local(batch, n // global_batch)
        return s.local(batch, n // global_batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(x, s, global_batch) for x in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(x, s, global_batch) for x in batch)
    if isinstance(batch, dict):
        return {k: shard_batch(v, s, global_batch) for k, v in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: shard_batch(getattr(batch, f.name), s, global_batch)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def check_batch_size(batch_size: int, world: int, where: str) -> None:
    """The global batch must split into equal shards (equal shards make the mean of rank means the global mean)."""
    if world > 1 and (batch_size < world or batch_size % world):
        raise ConfigError(f"key '{where}.batch_size' ({batch_size}) is the global batch: it must be a multiple of "
                          f"the {world} ranks (each trains on batch_size / ranks samples)")
