"""Downstream semantic segmentation trained from scratch (paper 5, cut-patch-refinement: Section IV).

The paper trains RefineNet (Lin et al. 2017) from scratch on synthetic, CUT-refined synthetic or real images
and scores each run by the distribution of the test mIoU over the last 50 epochs (Fig. 4/5: single epochs vary
a lot), optionally evaluating an EMA of the weights (decay 0.995, Section IV-C). Here:

- Network: a small U-Net (two 2x2 poolings, `widths` channels, BatchNorm, skip connections). RefineNet needs an
  ImageNet ResNet backbone and is far too slow for CPU budgets; a U-Net keeps what matters for this comparison
  (from-scratch training, full-resolution multi-path refinement of coarse features by skip connections) at
  ~100k parameters, so many runs fit a CPU pipeline.
- `train_data` picks the training images (the masks are those of the rendered scene in every case):
  (a) `synthetic`: the raw source domain; (b) `refined`: `<synthetic>_<refiner>` written by `s2r refine cut`;
  (c) `target`: the target domain's train split (the upper bound, possible because the benchmark labels it);
  (d) `target+synthetic` / `target+refined`: Section IV-E, "randomly choosing the mini-batches from both
  datasets": each minibatch comes entirely from the target set with probability `target_fraction`, else from
  the (refined) synthetic set.
- `validate()` (every epoch) computes mIoU on the target VAL split (the tuning / pruning signal) and on the
  target TEST split (the score the paper reports), plus per-class test IoU, using the shared
  `s2r.evaluators.segmentation` metrics (absent classes left out of the mean). The per-epoch values are kept in
  buffers (saved with the model) and summarised over the last `last_k` epochs as median and spread (IQR).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r import distributed
from s2r.config import ConfigError, Schema
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, PreparedSplit
from s2r.evaluators.segmentation import confusion, metrics_from_confusion
from s2r.methods.base import IndexPool, to_device, to_float
from s2r.methods.base import Method as BaseMethod
from s2r.methods.common import EMA
from s2r.methods.registry import register

TRAIN_DATA = ("synthetic", "refined", "target", "target+synthetic", "target+refined")
MIOU = "present_classes"  # paper 5's mIoU convention (s2r.evaluators.segmentation), see Method.score


@dataclass
class Config(Schema):
    """`methods.segmenter` (variants `segmenter_<suffix>`, e.g. one per training set)."""

    train_data: Literal["synthetic", "refined", "target", "target+synthetic", "target+refined"]
    refiner: str  # the refined domain is <synthetic>_<refiner> (written by `s2r refine <refiner>`)
    synthetic_domain: str  # "" = the benchmark's source (or, in a refined benchmark, what was refined)
    target_fraction: float  # (d): probability that a minibatch is drawn from the target set
    widths: list[int]
    batch_size: int
    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    ema_decay: float  # > 0: evaluate an EMA of the weights (paper Section IV-C: 0.995)
    last_k: int  # epochs summarised (paper 50)
    eval_images: int  # val/test images scored per epoch (0 = all)
    tsne_layer: Literal["enc1", "enc2", "bottleneck"]  # Section IV-F (paper: early RefineNet layer)
    tsne_mask_classes: list[str]  # zeroed for t-SNE

    def validate(self) -> None:
        if self.train_data not in TRAIN_DATA:
            raise ConfigError(f"key 'train_data' must be one of {list(TRAIN_DATA)}, got {self.train_data!r}")
        if not 0.0 < self.target_fraction < 1.0:
            raise ConfigError(f"key 'target_fraction' must be in (0, 1), got {self.target_fraction}")
        if len(self.widths) != 3 or any(w < 1 for w in self.widths):
            raise ConfigError(f"key 'widths' must be 3 positive widths (enc1, enc2, bottleneck), got {self.widths}")
        if self.batch_size < 1 or self.epochs < 1 or self.steps_per_epoch < 1 or self.last_k < 1:
            raise ConfigError("keys 'batch_size', 'epochs', 'steps_per_epoch' and 'last_k' must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or not 0.0 <= self.ema_decay < 1.0 or self.eval_images < 0:
            raise ConfigError("keys 'lr' > 0, 'weight_decay' >= 0, 'ema_decay' in [0, 1), 'eval_images' >= 0")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """enc1 (w0) -> pool -> enc2 (w1) -> pool -> bottleneck (w2) -> up+skip dec2 -> up+skip dec1 -> 1x1 to K."""

    def __init__(self, channels: int, num_classes: int, widths: list[int]) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.enc1, self.enc2, self.bottleneck = _block(channels, w0), _block(w0, w1), _block(w1, w2)
        self.up2, self.dec2 = nn.ConvTranspose2d(w2, w1, 2, 2), _block(2 * w1, w1)
        self.up1, self.dec1 = nn.ConvTranspose2d(w1, w0, 2, 2), _block(2 * w0, w0)
        self.head = nn.Conv2d(w0, num_classes, 1)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder feature maps by name (the layers t-SNE can look at)."""
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        return {"enc1": e1, "enc2": e2, "bottleneck": self.bottleneck(F.max_pool2d(e2, 2))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], any H, W (padded to a multiple of 4) -> (B, K, H, W) logits."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        f = self.features(x)
        d2 = self.dec2(torch.cat([self.up2(f["bottleneck"]), f["enc2"]], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), f["enc1"]], 1))
        out: torch.Tensor = self.head(d1)[..., :h, :w]
        return out


def pixel_cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise CE, mean over labelled pixels (255 = no class); in a distributed step over the global batch's."""
    shard = distributed.shard()
    if shard.world == 1:
        return F.cross_entropy(logits, masks, ignore_index=255)
    return shard.ratio(F.cross_entropy(logits, masks, ignore_index=255, reduction="sum"), (masks != 255).sum())


def lastk_summary(values: np.ndarray, k: int, prefix: str) -> dict[str, float]:
    """Median and spread of the last k finite values (paper: the distribution over the last 50 epochs)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)][-k:]
    if not len(v):
        return {}
    q1, q3 = np.percentile(v, [25, 75])
    return {f"{prefix}_lastk_median": float(np.median(v)), f"{prefix}_lastk_iqr": float(q3 - q1),
            f"{prefix}_lastk_mean": float(v.mean()), f"{prefix}_lastk_std": float(v.std()),
            f"{prefix}_lastk_min": float(v.min()), f"{prefix}_lastk_max": float(v.max()), f"{prefix}_lastk_n": len(v)}


def _masks(part: PreparedSplit) -> np.ndarray:
    """A split's masks (Method._split refuses a split without them)."""
    assert part.masks is not None
    return part.masks


class SegBatch(NamedTuple):
    """Fields 0 and 1 are (images, class labels) like other methods' batches (sample grids)."""

    images: np.ndarray  # (B, H, W, C) uint8
    labels: np.ndarray  # (B,) image-level class (the scene's object) or 0 where a domain has none
    masks: np.ndarray  # (B, H, W) uint8 class ids of seg_classes


@register(Config)
class Method(BaseMethod[Config]):
    """From-scratch segmentation network; predicts masks of target-domain images."""

    name = "segmenter"
    paper = "cut-patch-refinement"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"predict"})
    evaluator: ClassVar[str] = "segmentation_lastk"

    miou_history: torch.Tensor  # a buffer (register_buffer)
    class_history: torch.Tensor  # a buffer (register_buffer)
    epochs_done: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        cfg.validate()
        spec = data.spec
        if not spec.seg_classes:
            raise DataError(f"{data.root}: benchmark {spec.name!r} has no segmentation masks (seg_classes)")
        self.classes = list(spec.seg_classes)
        suffix = f"_{cfg.refiner}"
        source = spec.source
        self.synthetic_domain = cfg.synthetic_domain or (source[: -len(suffix)] if source.endswith(suffix) else source)
        self.refined_domain = f"{self.synthetic_domain}{suffix}"
        self.target_domain = spec.target
        sets = {"synthetic": [self.synthetic_domain], "refined": [self.refined_domain], "target": [self.target_domain],
                "target+synthetic": [self.target_domain, self.synthetic_domain],
                "target+refined": [self.target_domain, self.refined_domain]}[cfg.train_data]
        self.train_sets = [self._split(d, "train", f"train_data={cfg.train_data!r}") for d in sets]
        self.val = self._split(self.target_domain, "val", "validation")
        self.test = self._split(self.target_domain, "test", "the reported score")
        self.pools = [self.sampler_part(str(i), IndexPool(np.arange(len(s)))) for i, s in enumerate(self.train_sets)]
        self.batch_size = cfg.batch_size
        self.net = UNet(int(self.val.images.shape[-1]), len(self.classes), cfg.widths)
        self.ema = EMA(self.net, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # Per-epoch val/test mIoU and per-class test IoU, saved with the model for the last-K summary.
        self.register_buffer("miou_history", torch.full((cfg.epochs, 2), float("nan"), dtype=torch.float64))
        self.register_buffer("class_history", torch.full((cfg.epochs, len(self.classes)), float("nan"),
                                                         dtype=torch.float64))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))

    def _split(self, domain: str, split: str, why: str) -> PreparedSplit:
        if not self.data.has(domain, split):
            known = sorted(p.parent.name for p in self.data.root.glob(f"*/{split}/images.npy"))
            raise DataError(f"{self.data.root}: segmenter needs the {split} split of domain {domain!r} ({why}); "
                            f"domains with it: {known}")
        part = self.data.get(domain, split)
        if part.masks is None:
            raise DataError(f"{self.data.root}/{domain}/{split}: no masks.npy; the segmenter needs masks")
        return part

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"net": torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)}

    def batches(self) -> Iterator[SegBatch]:
        """Endless minibatches of images and masks; mixed sets draw each minibatch from one set."""
        while True:
            s = 0
            if len(self.train_sets) == 2:
                s = 0 if self.rng.random() < self.cfg.target_fraction else 1
            idx = self.pools[s].draw(self.cfg.batch_size, self.rng)
            part = self.train_sets[s]
            labels = np.asarray(part.labels[idx]) if len(part.labels) else np.zeros(len(idx), np.int64)
            yield SegBatch(np.asarray(part.images[idx]), np.maximum(labels, 0), np.asarray(_masks(part)[idx]))

    def train_step(self, batch: SegBatch) -> dict[str, torch.Tensor]:
        x = to_float(batch.images, self.device)
        y = to_device(np.asarray(batch.masks), self.device).long()  # uint8 bytes travel, int64 on the device
        with self.autocast():
            logits = self.net(x)
        loss = pixel_cross_entropy(logits.float(), y)
        self.optimize(loss, "net")
        if self.ema is not None:
            self.ema.update(self.net)
        return {"loss": loss.detach()}

    # -- use -----------------------------------------------------------------------------------------------
    def model(self) -> UNet:
        """The network that is evaluated: the EMA weights when enabled (Section IV-C)."""
        return self.ema.module if self.ema is not None else self.net

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W, C) -> class ids uint8 (N, H, W)."""
        net = self.model()
        was = net.training
        net.eval()
        out = np.empty(images.shape[:3], np.uint8)
        for i in range(0, len(images), batch_size):
            with self.autocast():
                logits = net(to_float(images[i : i + batch_size], self.device))
            out[i : i + batch_size] = logits.float().argmax(1).to(torch.uint8).cpu().numpy()
        net.train(was)
        return out

    @torch.no_grad()
    def features(self, images: np.ndarray, layer: str, batch_size: int = 64) -> np.ndarray:
        """Adaptive-average-pooled (1x1) feature maps of `layer`: (N, C) (Section IV-F)."""
        net = self.model()
        was = net.training
        net.eval()
        out = []
        for i in range(0, len(images), batch_size):
            f = net.features(to_float(images[i : i + batch_size], self.device))[layer]
            out.append(F.adaptive_avg_pool2d(f.float(), 1).flatten(1).cpu().numpy())  # (B, C, 1, 1) -> (B, C)
        net.train(was)
        return np.concatenate(out)

    def score(self, part: PreparedSplit) -> dict[str, Any]:
        """mIoU / per-class IoU / pixel accuracy on (the first eval_images of) a split."""
        n = self.cfg.eval_images or len(part)
        cm = confusion(np.asarray(_masks(part)[:n]), self.predict(np.asarray(part.images[:n])), len(self.classes))
        # paper 5 (Sec. IV-A): "mean IoU ... over all classes present in the dataset": absent classes left out
        return metrics_from_confusion(cm, self.classes, miou=MIOU)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Target val mIoU (tuning signal) and target test mIoU + per-class IoU, with last-K summaries."""
        val, test = self.score(self.val), self.score(self.test)
        e = int(self.epochs_done)
        if e < len(self.miou_history):
            self.miou_history[e] = torch.tensor([val["miou"], test["miou"]], dtype=torch.float64)
            self.class_history[e] = torch.tensor([np.nan if v is None else v for v in test["per_class_iou"].values()],
                                                 dtype=torch.float64)
        self.epochs_done += 1
        hist = self.miou_history[: int(self.epochs_done)].cpu().numpy()  # a GPU buffer: copy to host first
        out = {"val_miou": val["miou"], "test_miou": test["miou"], "test_pixel_accuracy": test["pixel_accuracy"]}
        out |= {f"test_iou_{c}": (float("nan") if v is None else v) for c, v in test["per_class_iou"].items()}
        return out | lastk_summary(hist[:, 0], self.cfg.last_k, "val_miou") | \
            lastk_summary(hist[:, 1], self.cfg.last_k, "test_miou")

    def health_signals(self) -> dict[str, float]:
        """s2r.health: classes predicted on (up to 64) target validation images."""
        from s2r import health

        n = min(self.cfg.eval_images or len(self.val), 64)
        return health.class_usage(self.predict(np.asarray(self.val.images[:n])), len(self.classes),
                                  np.asarray(_masks(self.val)[:n]), 255)

    def health_checks(self) -> list[Any]:
        from s2r import health

        return [health.single_class_check("segmentation masks")]

    def example_input(self) -> np.ndarray:
        return to_float(self.val.images[:2], torch.device("cpu")).numpy()

    def export_model(self) -> nn.Module:
        return self.model()

