"""Pieces several methods share, written once: LSGAN losses (CycleGAN, MrGAN, CUT), an EMA of a network's weights
(CUT's refiner, the downstream segmenter), a fixed validation subset and the image-statistics gap of a translation
(CycleGAN, CUT, twin VAE), translating a set of images batch by batch. Holds no method (the registry skips it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r.data.benchmark import DataError
from s2r.methods.base import Method, to_float, to_uint8

M = TypeVar("M", bound=nn.Module)


def area_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """float (B, C, H, W) -> (B, C, size, size) by area averaging (unchanged when already that size): the model
    resolution of mixing and betavae."""
    return x if x.shape[-2:] == (size, size) else F.interpolate(x, size=(size, size), mode="area")


# -- losses --------------------------------------------------------------------------------------------------
def lsgan_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, real_targets: torch.Tensor,
                 fake_targets: torch.Tensor) -> torch.Tensor:
    """Mao et al. 2017, eq. (2): 1/2 E[(D(x) - b)^2] + 1/2 E[(D(G(z)) - a)^2], with per-image targets b, a."""
    return 0.5 * (F.mse_loss(real_scores.float(), real_targets.expand_as(real_scores))
                  + F.mse_loss(fake_scores.float(), fake_targets.expand_as(fake_scores)))


def lsgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Mao et al. 2017, eq. (2) with c = 1 (as CycleGAN, without the 1/2): E[(D(G(z)) - 1)^2]."""
    return F.mse_loss(fake_scores.float(), torch.ones_like(fake_scores, dtype=torch.float32))


class EMA(nn.Module, Generic[M]):
    """Exponential moving average of a module's weights (copies buffers): avg <- d * avg + (1 - d) * current."""

    def __init__(self, module: M, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False)

    @torch.no_grad()
    def update(self, current: nn.Module) -> None:
        for a, c in zip(self.module.parameters(), current.parameters()):
            a.lerp_(c.detach(), 1.0 - self.decay)
        for b, cb in zip(self.module.buffers(), current.buffers()):
            b.copy_(cb)


@torch.no_grad()
def translate_images(method: Method[Any], images: np.ndarray, refine: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, H, W, C) through `refine` ([0, 1] (B, C, H, W) -> [0, 1]), batch by batch
    in eval mode (the method's mode is restored)."""
    was_training = method.training
    method.eval()
    try:
        out = np.empty((len(images), *images.shape[1:]), np.uint8)
        for i in range(0, len(images), batch_size):
            out[i : i + batch_size] = to_uint8(refine(to_float(images[i : i + batch_size], method.device)))
        return out
    finally:
        method.train(was_training)


def translation_domains(method: Method[Any], domain_a: str, domain_b: str) -> tuple[str, str]:
    """A translator's (A, B) domains: the configured ones ("" = the benchmark's source / target), each with a
    prepared train split."""
    data = method.data
    a, b = domain_a or data.spec.source, domain_b or data.spec.target
    for d in (a, b):
        if not data.has(d, "train"):
            known = sorted(p.parent.name for p in data.root.glob("*/train/images.npy"))
            raise DataError(f"{data.root}: {method.name} needs a train split of domain {d!r}; prepared domains: "
                            f"{known}")
    return a, b


def spread(n: int, k: int) -> np.ndarray:
    """min(n, k) indices spread evenly over 0..n-1 (a fixed, class-covering validation subset)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


def stat_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean |per-pixel mean difference| + mean |per-pixel std difference| of two (B, C, H, W) sets in [0, 1]."""
    gap = (x.mean(0) - y.mean(0)).abs().mean() + (x.std(0, correction=0) - y.std(0, correction=0)).abs().mean()
    return float(gap)
