"""Mixed-minibatch classifier (paper 4, "Learning image classifiers from (limited) real and (abundant) synthetic
data", Section 3.3 and appendix 3).

Every training minibatch holds a fixed share of real and synthetic images: with batch size B and
`real_fraction` f, round(f * B) images come from the (limited) labelled real training set and the rest
from the synthetic set. The paper writes the ratio as lambda = Real:Synthetic (1:1, 1:7, 1:15 are
f = 1/2, 1/8, 1/16); f = 0 is synthetic only and f = 1 is real only.

Network (appendix 3.1): C16-3-1-1, B16-3-1, B32-3-2, B64-3-2, AvgPooling, K-way softmax, where
Bk-r-s = r residual blocks without bottleneck (He et al. 2016), the first with stride s; BN + ReLU after
every convolution; Glorot initialisation (appendix 3.2). Training (appendix 3.2): SGD, learning rate 0.1,
weight decay 1e-4, batch 128, learning rate divided by 10 at epochs 221 and 348 of 500 (our milestones are
fractions of the run, 221/500 = 0.442 and 348/500 = 0.696, so short CPU runs keep the schedule's shape). Real-only
runs (`real_fraction: 1`) use the paper's real-only schedule instead, epochs 89 and 139 of 500
(`real_only_lr_milestones`: 0.178, 0.278; appendix 3.2 and Section 3.3).

The limited labelled real set (`real_per_class` images per class) is drawn once from `real_subset_seed`, not from
the run seed: every classifier seed and the label-aligned CycleGAN / MrGAN (`methods.cyclegan.real_per_class`,
same subset seed) use the same labelled real images, so no stage sees more real labels than the budget.
The paper's main text says ADAM while its appendix says SGD; SGD is the default, `optimizer: adam` the option.
2D augmentation = random crop (zero padding) + random horizontal flip; flips are off for digits by
default (`aug_hflip`), since a mirrored digit is not the same digit (the paper's objects are mirror-safe).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r.config import ConfigError, Schema
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.methods.base import IndexPool, limited_indices, to_device, to_float
from s2r.methods.base import Method as BaseMethod
from s2r.methods.common import area_resize
from s2r.methods.registry import register


@dataclass
class Config(Schema):
    """`methods.mixing` in params.yaml."""

    real_fraction: float  # share of real images in every minibatch (0 = synthetic only, 1 = real only)
    real_per_class: int  # labelled real training images per class ("limited real"); -1 = all
    real_subset_seed: int  # draws the labelled real subset (shared with the CycleGAN's; not the run seed)
    augment: bool  # 2D augmentation: random crop (+ flip if aug_hflip)
    aug_crop_padding: int
    aug_hflip: bool
    image_size: int  # model resolution (inputs area-downsampled, as methods.betavae); 0 = the benchmark's
    widths: list[int]
    blocks_per_stage: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    momentum: float
    weight_decay: float
    lr_milestones: list[float]
    real_only_lr_milestones: list[float]  # 89/500, 139/500
    lr_gamma: float

    def validate(self) -> None:
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ConfigError(f"key 'methods.mixing.real_fraction' must be in [0, 1], got {self.real_fraction}")
        if self.real_per_class == 0 or self.real_per_class < -1:
            raise ConfigError("key 'methods.mixing.real_per_class' must be > 0, or -1 for all")
        if self.image_size < 0:
            raise ConfigError("key 'methods.mixing.image_size' must be >= 0 (0 = the benchmark's size)")
        if self.batch_size < 1 or self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError("keys 'methods.mixing.batch_size/epochs/steps_per_epoch' must be >= 1")
        if len(self.widths) < 1 or self.blocks_per_stage < 1:
            raise ConfigError("key 'methods.mixing.widths' must be non-empty and blocks_per_stage >= 1")
        for key, fractions in (("lr_milestones", self.lr_milestones),
                               ("real_only_lr_milestones", self.real_only_lr_milestones)):
            if any(not 0.0 < m < 1.0 for m in fractions):
                raise ConfigError(f"key 'methods.mixing.{key}' are fractions of training in (0, 1)")

    def milestones(self) -> list[float]:
        """The lr milestones of this run: the real-only schedule when every image is real (appendix 3.2)."""
        return self.real_only_lr_milestones if self.real_fraction >= 1.0 else self.lr_milestones


class BasicBlock(nn.Module):
    """Rk-s: the ResNet building block without bottleneck (two 3x3 convs, identity or 1x1 shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Appendix 3.1: C16-3-1-1, B16-3-1, B32-3-2, B64-3-2, AvgPooling, K-way linear (softmax in the loss)."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(cin, w, stride)] + [BasicBlock(w, w, 1) for _ in range(blocks - 1)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():  # Glorot initialisation (appendix 3.2)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, K) logits."""
        h = self.stages(self.stem(x))
        out: torch.Tensor = self.head(h.mean(dim=(2, 3)))  # global average pooling: (B, C, h, w) -> (B, C)
        return out


class AtResolution(nn.Module):
    """The exported classifier: images at the benchmark's size (float (B, C, H, W) in [0, 1], as the registry feeds
    them) are area-resized to the model resolution first, as in training; -> logits (B, K)."""

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(area_resize(x, self.size))
        return out


@register(Config)
class Method(BaseMethod[Config]):
    """Classifier trained on minibatches mixed at a fixed real:synthetic ratio; predicts real labels."""

    name = "mixing"
    paper = "mixing-ratio-mrgan"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"predict"})
    evaluator: ClassVar[str] = "classification"  # s2r.evaluators.classification scores it

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        spec = data.spec
        if "classification" not in spec.tasks:
            raise DataError(f"{data.root}: method 'mixing' needs a classification benchmark, got tasks {spec.tasks}")
        self.classes = list(spec.classes)
        self.syn = data.get(spec.source, "train")
        self.real = data.get(spec.target, "train")
        self.real_val = data.get(spec.target, "val")
        self.batch_size = cfg.batch_size
        self.n_real = int(round(cfg.real_fraction * cfg.batch_size))
        self.n_syn = cfg.batch_size - self.n_real
        self.real_idx = limited_indices(self.real.labels, cfg.real_per_class,
                                        np.random.default_rng(cfg.real_subset_seed))
        self.pools = {"real": self.sampler_part("real", IndexPool(self.real_idx)),
                      "syn": self.sampler_part("syn", IndexPool(np.arange(len(self.syn))))}
        self.net = SmallResNet(spec.channels, len(self.classes), cfg.widths, cfg.blocks_per_stage)
        self.size = cfg.image_size or spec.image_size

    def _input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float (B, C, S, S) in [0, 1] at the model resolution (area downsampling)."""
        return area_resize(to_float(images, self.device), self.size)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        if c.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.net.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
            )
        else:
            opt = torch.optim.Adam(self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        return {"net": opt}

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        milestones = sorted({max(1, int(round(m * total_steps))) for m in self.cfg.milestones()})
        return {"net": torch.optim.lr_scheduler.MultiStepLR(self.optimizers["net"], milestones, self.cfg.lr_gamma)}

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless minibatches: n_real real + n_syn synthetic images, uint8 (B, H, W, C) and labels."""
        while True:
            ri = np.sort(self.pools["real"].draw(self.n_real, self.rng))
            si = np.sort(self.pools["syn"].draw(self.n_syn, self.rng))  # sorted reads are memmap-friendly
            images = np.concatenate([self.real.images[ri], self.syn.images[si]])
            labels = np.concatenate([self.real.labels[ri], self.syn.labels[si]])
            if self.cfg.augment:
                images = self._augment(images)
            yield images, labels

    def _augment(self, images: np.ndarray) -> np.ndarray:
        """Random crop after zero padding (+ optional horizontal flip), per image."""
        p = self.cfg.aug_crop_padding
        b, h, w, _ = images.shape
        padded: np.ndarray = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        dy = np.asarray(self.rng.integers(0, 2 * p + 1, b))
        dx = np.asarray(self.rng.integers(0, 2 * p + 1, b))
        flip = np.asarray(self.rng.random(b) < 0.5 if self.cfg.aug_hflip else np.zeros(b, bool))
        out = np.empty_like(images)
        for i in range(b):
            crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
            out[i] = crop[:, ::-1] if flip[i] else crop
        return out

    def train_step(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor | float]:
        images, labels = batch
        x = self._input(images)
        y = to_device(np.asarray(labels), self.device)
        with self.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimize(loss, "net")
        self.step_schedulers()
        acc = (logits.argmax(1) == y).float().mean()
        return {"loss": loss.detach(), "accuracy": acc}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """uint8 (N, H, W, C) -> (N, K) class probabilities."""
        self.net.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = self._input(images[i : i + batch_size])
            with self.autocast():
                out.append(torch.softmax(self.net(x).float(), 1).cpu())
        return torch.cat(out).numpy()

    def validate(self) -> dict[str, float]:
        """Accuracy and loss on the real validation split (the paper cross-validates ratios on it)."""
        p = self.predict(self.real_val.images)
        y = self.real_val.labels
        nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
        return {"val_accuracy": float((p.argmax(1) == y).mean()), "val_loss": nll}

    def health_signals(self) -> dict[str, float]:
        """s2r.health: classes predicted on the real validation split (a constant classifier uses one)."""
        from s2r import health

        return health.class_usage(self.predict(self.real_val.images).argmax(1), len(self.classes),
                                  self.real_val.labels)

    def health_checks(self) -> list[Any]:
        from s2r import health

        return [health.single_class_check("class predictions")]

    def example_input(self) -> np.ndarray:
        return to_float(self.real_val.images[:2], torch.device("cpu")).numpy()

    def export_model(self) -> nn.Module:
        return AtResolution(self.net, self.size)

