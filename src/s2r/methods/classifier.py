"""Classification baselines of paper 1 (extractor-autoencoder-pirl-triplet: Section 4.7, Tables 2 and 9,
Figs. 6 and 11): the extractor's own torchvision model trained as a classifier, "Scratch" or "Pre-trained".

Section 4.7: "We froze the same layers of the pre-trained models for fine-tuning the later layers in case of
classification models or to train our autoencoder using it as an extractor", and appendix A.2: "those features
were used to fine-tune the rest of the pre-trained classification model". So, with the extractor cut at the
paper's layer "level -3" (the same cut as `methods.ae`, `s2r.methods.ae.build_extractor`):

- Pre-trained (`train_extractor: false`, `extractor_weights: imagenet`): the layers up to the cut stay frozen
  (ImageNet weights, eval mode), the rest of the torchvision model (VGG-11: features[18:], avgpool and the
  classifier; ResNet-50: layer4 and fc; DenseNet-121: transition3, denseblock4, norm5 and the classifier) is
  fine-tuned, with the last linear layer replaced by one of K outputs.
- Scratch (`train_extractor: true`, `extractor_weights: none`): the same network, every layer trained from a
  random initialisation (Table 9, Fig. 11).

Input as the autoencoders see it (A.2): grey copied to three channels, interpolated to `extractor_input_size`
(224), ImageNet normalisation. Training as A.2 ("the same hyperparameters ... for all classification models"):
AdamW lr 1e-4, weight decay 1e-5, batch 64, cross-entropy, random horizontal flip as the only augmentation with
the label mirrored through the benchmark's `mirror_classes` (a mirrored interior swaps left and right seats).
Scoring uses the classifier's own predictions on the target test split (evaluator `classification`, the same
split and images the autoencoders' latent classifiers are scored on); `validate` gives the target val accuracy
per epoch (Table 2 takes the best epoch, Fig. 6 plots the curve).
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
from s2r.data.benchmark import NO_LABEL, DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.methods.base import IndexPool, to_float
from s2r.methods.base import Method as BaseMethod
from s2r.methods.extractors import EXTRACTORS, IMAGENET_MEAN, IMAGENET_STD, cut_level3, load_torchvision_model
from s2r.methods.registry import register


@dataclass
class Config(Schema):
    """`methods.classifier` (and `methods.classifier_<suffix>`) in params.yaml."""

    extractor: Literal["vgg11", "resnet50", "densenet121"]
    extractor_weights: str  # none (Scratch) | imagenet (Pre-trained, torchvision cache) | path to a file
    extractor_seed: int  # random initialisation of the torchvision model (Scratch)
    train_extractor: bool  # Scratch: train every layer; false: freeze up to the cut, fine-tune the rest
    extractor_input_size: int  # the paper's 224 (A.2); 64 keeps CPU runs short
    hflip: bool  # A.2's only augmentation, labels through mirror_classes (off for digits)
    source_domain: str  # "" = the benchmark's source domain
    batch_size: int
    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float

    def validate(self) -> None:
        k = "methods.classifier"
        if self.extractor not in EXTRACTORS:
            raise ConfigError(f"key '{k}.extractor': {self.extractor!r} is not one of {sorted(EXTRACTORS)}")
        if self.extractor_input_size < 32:
            raise ConfigError(f"key '{k}.extractor_input_size' must be >= 32, got {self.extractor_input_size}")
        if not self.train_extractor and self.extractor_weights == "none":
            raise ConfigError(f"key '{k}.train_extractor' is false with extractor_weights none: a frozen random "
                              "extractor is neither baseline (Scratch trains it, Pre-trained loads weights)")
        if self.batch_size < 1 or self.epochs < 1 or self.steps_per_epoch < 1 or self.lr <= 0:
            raise ConfigError(f"keys '{k}.batch_size/epochs/steps_per_epoch' must be >= 1 and '{k}.lr' > 0")


def split_model(name: str, weights: str, seed: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(layers up to the paper's cut "level -3", the rest of the torchvision classifier with a K-way last layer)."""
    full: Any = load_torchvision_model(name, weights, seed)  # torchvision's layer names (an untyped library)
    cut = cut_level3(name, full)
    if name == "vgg11":
        last = full.classifier[-1]
        full.classifier[-1] = nn.Linear(last.in_features, num_classes)
        rest: nn.Module = nn.Sequential(full.features[18:], full.avgpool, nn.Flatten(1), full.classifier)
    elif name == "resnet50":
        full.fc = nn.Linear(full.fc.in_features, num_classes)
        rest = nn.Sequential(full.layer4, full.avgpool, nn.Flatten(1), full.fc)
    else:
        full.classifier = nn.Linear(full.classifier.in_features, num_classes)
        rest = nn.Sequential(full.features[-3:], nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                             full.classifier)  # torchvision's DenseNet.forward after `features`
    return cut, rest


class Network(nn.Module):
    """Exported classifier: (B, C, H, W) in [0, 1] -> (B, K) logits (resize, grey -> RGB, ImageNet norm inside)."""

    mean: torch.Tensor  # a buffer (register_buffer)
    std: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, cut: nn.Module, rest: nn.Module, input_size: int, frozen_cut: bool) -> None:
        super().__init__()
        self.cut, self.rest, self.input_size, self.frozen_cut = cut, rest, input_size, frozen_cut
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Network:
        super().train(mode)
        if self.frozen_cut:
            self.cut.eval()  # frozen layers keep their BatchNorm statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey copied to 3 channels (A.2)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self.frozen_cut:
            with torch.no_grad():
                h = self.cut(x)
        else:
            h = self.cut(x)
        out: torch.Tensor = self.rest(h)
        return out


@register(Config)
class Method(BaseMethod[Config]):
    """Scratch / Pre-trained classification baseline of paper 1 on the extractor's own network."""

    name = "classifier"
    paper = "extractor-autoencoder-pirl-triplet"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"predict"})
    evaluator: ClassVar[str] = "classification"

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        spec = data.spec
        if "classification" not in spec.tasks:
            raise DataError(f"{data.root}: method 'classifier' needs a classification benchmark, got {spec.tasks}")
        self.source = cfg.source_domain or spec.source
        self.target = spec.target
        self.train_split = data.get(self.source, "train")
        keep = np.flatnonzero(self.train_split.labels != NO_LABEL)
        if len(keep) == 0:
            raise DataError(f"{data.root}: {self.source}/train has no labelled images to train a classifier on")
        self.pool = self.sampler_part("pool", IndexPool(keep))
        self.mirror = np.asarray(spec.mirror_classes, np.int64) if spec.mirror_classes else None
        self.batch_size = cfg.batch_size
        cut, rest = split_model(cfg.extractor, cfg.extractor_weights, cfg.extractor_seed, len(spec.classes))
        frozen = not cfg.train_extractor
        for p in cut.parameters():
            p.requires_grad_(not frozen)
        self.net = Network(cut, rest, cfg.extractor_input_size, frozen)

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return {"net": torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)}  # A.2

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (uint8 (B, H, W, C) images, labels); flipped images carry mirrored labels."""
        while True:
            idx = np.sort(self.pool.draw(self.batch_size, self.rng))
            images = np.asarray(self.train_split.images[idx]).copy()
            labels = self.train_split.labels[idx].copy()
            if self.cfg.hflip:
                flip = self.rng.random(len(idx)) < 0.5
                images[flip] = images[flip][:, :, ::-1]
                if self.mirror is not None:
                    labels[flip] = self.mirror[labels[flip]]
            yield images, labels

    def train_step(self, batch: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        images, labels = batch
        x = to_float(images, self.device)
        y = torch.from_numpy(labels).to(self.device)
        with self.autocast():
            logits = self.net(x).float()
        loss = F.cross_entropy(logits, y)
        self.optimize(loss, "net")
        return {"loss": float(loss.detach()), "accuracy": float((logits.argmax(1) == y).float().mean())}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, C) -> (N, K) class probabilities."""
        was = self.net.training
        self.net.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = to_float(np.asarray(images[i : i + batch_size]), self.device)
            with self.autocast():
                out.append(torch.softmax(self.net(x).float(), 1).cpu())
        self.net.train(was)
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.data.spec.classes)), np.float32)

    def validate(self) -> dict[str, float]:
        """Accuracy on the target domain's val split, per epoch (Fig. 6's curves; never the test split)."""
        if not self.data.has(self.target, "val"):
            return {}
        val = self.data.get(self.target, "val")
        ok = val.labels != NO_LABEL
        if not ok.any():
            return {}
        p = self.predict(np.asarray(val.images)[ok])
        return {"val_accuracy": float((p.argmax(1) == val.labels[ok]).mean())}

    def example_input(self) -> np.ndarray:
        return to_float(np.asarray(self.data.get(self.target, "val").images[:2]), torch.device("cpu")).numpy()

    def export_model(self) -> nn.Module:
        return self.net

