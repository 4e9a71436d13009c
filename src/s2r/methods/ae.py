"""Extractor autoencoders and their baselines (paper 1, "Autoencoder for Synthetic to Real Generalization: From
Simple to More Complex Scenes").

One module, every variant of the paper as a configuration (params blocks `ae`, `ae_<suffix>`):

- model (`model`): convolutional AE (Table 4), VAE / beta-VAE (Table 4 with a (mu, logvar) head, `beta`),
  FactorVAE (the VAE plus the discriminator of Table 5, `gamma`; Kim & Mnih 2018).
- extractor (`extractor`): none (the Table 4 conv encoder on raw pixels) or a frozen torchvision backbone cut
  at the paper's layer "level -3" (appendix A.2.1): VGG-11 after its 7th conv + ReLU (`features[:18]`),
  ResNet-50 after `layer3` (its Bottleneck (5)), DenseNet-121 after `denseblock3` (its `denselayer24`).
  Input resized to `extractor_input_size` (224 in the paper), grey repeated to 3 channels, ImageNet
  normalisation; then the summariser (avg-pool to 7x7 = the paper's 2x2/2 avg-pool of the 14x14 map at 224,
  conv 4x4 -> 256x4x4, ReLU) and the MLP encoder (FC 256, FC latent) of Tables 6-7 (E-AE).
  The extractor is frozen (eval mode, no gradients) and its pooled output is computed once per image and
  cached (in memory, and on disk under `feature_cache_dir` when set), never recomputed per step.
- sampling (`sampling`), a dataset-level choice of the reconstruction target: `vanilla` (target = input,
  Eq. 1), `I` (partially impossible: another variation of the same scene, Eq. 2), `II` (impossible class
  instance: a variation of another scene of the same class, Eq. 3).
- triplet (`triplet`): Eq. 4 (margin 0.2, PyTorch's `swap`), anchor / positive (another scene, same class) /
  negative, each with its own sampled target, total loss Eq. 5:
  alpha * L_T + beta * (L_r(anchor) + L_r(positive) + L_r(negative)). Negatives (`triplet_negatives`): `any`
  other class, or `one_part` (appendix A.2: "a scenery which differs in a single seat position", from the
  benchmark's `class_parts`); `triplet_exclude_empty` never picks an all-empty scene as a negative (A.2: "we
  did not allow sceneries with empty seats only", read as a rule on the negative it follows).
- flips (`hflip`, the paper's only augmentation): the image and its target are mirrored together, and the
  label follows the benchmark's `mirror_classes` (left and right seats swap); a triplet is flipped as a
  whole (anchor, positive and negative share the flip), so the classes it relates stay consistent.
- reconstruction loss (`recon_loss`): SSIM (pytorch-msssim, as the paper), BCE or MSE.

Names follow the paper: prefix I- / II- for the sampling, E- for an extractor, T for the triplet loss
(II-E-TAE = sampling II + extractor + triplet).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r import distributed
from s2r.config import ConfigError, Schema
from s2r.data.benchmark import NO_LABEL, DataError
from s2r.data.prepared import PreparedBenchmark, PreparedSplit, one_per_scene
from s2r.evaluators.latent import knn_default_k
from s2r.files import atomic_path
from s2r.methods.base import IndexPool, to_device, to_float, to_uint8
from s2r.methods.base import Method as BaseMethod
from s2r.methods.extractors import EXTRACTOR_CHANNELS, IMAGENET_MEAN, IMAGENET_STD, build_extractor
from s2r.methods.registry import register

log = logging.getLogger(__name__)

POOLED = 7  # the summariser's avg-pool output: 14x14 -> 7x7 at the paper's 224 input


@dataclass
class Config(Schema):
    """`methods.ae` (and every `methods.ae_<suffix>` variant) in params.yaml."""

    model: Literal["ae", "vae", "factorvae"]
    beta_kl: float  # KL weight: 1 = VAE, > 1 = beta-VAE (paper: 4, 8)
    gamma_tc: float  # FactorVAE total-correlation weight (paper: 10, 30, 50)
    extractor: Literal["none", "vgg11", "resnet50", "densenet121"]
    extractor_weights: str  # none (random init, logged) | imagenet (torchvision cache) | path to a file
    extractor_seed: int  # random-init extractor: fixed across training seeds, like pretrained weights
    extractor_input_size: int  # the paper's 224 (appendix A.2); 64 keeps CPU runs short
    feature_cache_dir: str  # "" = cache extractor outputs in memory only
    feature_standardise: bool  # summariser inputs: (features - mean) / std per channel, fixed from the
    # source training features (a fixed affine its first conv could absorb); false = the paper's raw features
    sampling: Literal["vanilla", "I", "II"]
    triplet: bool
    triplet_margin: float  # Eq. 4
    triplet_swap: bool  # Balntas et al. 2016 (PyTorch's swap), appendix A.2
    alpha: float  # Eq. 5: weight of the triplet loss
    beta: float  # Eq. 5: weight of the reconstruction losses
    recon_loss: Literal["ssim", "bce", "mse"]
    ssim_win_size: int  # pytorch-msssim's default Gaussian window (clipped to the image size)
    latent_dim: int  # Table 10: 64 (MPI3D: 10)
    conv_channels: list[int] | None  # Table 4 encoder convs; None = [32, 32, 64, 64] cut to the size
    decoder_fc_channels: int  # decoder FC -> (channels, 4, 4): 64 (Tables 4 / 6), 256 (Table 7)
    hflip: bool  # the paper's only augmentation; off for digits (a mirrored digit is another glyph)
    triplet_negatives: Literal["any", "one_part"]  # one_part: differs in one seat (A.2; class_parts)
    triplet_exclude_empty: bool  # A.2: no all-empty scene as a negative (needs class_parts)
    source_domain: str  # "" = the benchmark's source domain (scenes Table 1 also trains on `toy`)
    batch_size: int
    epochs: int
    steps_per_epoch: int
    lr: float  # paper 1e-4 over ~19k steps; CPU runs are ~100x shorter
    weight_decay: float
    lr_disc: float  # FactorVAE discriminator (Kim & Mnih 2018: Adam 1e-4, betas 0.5, 0.9)
    knn_k: int  # latent KNN: 0 = floor(sqrt(N)) (paper Section 4.7: N = 13,356 -> 115)
    rf_trees: int
    svm_c: float
    fit_one_per_scene: bool  # paper 4.7: classifiers see a single image per scene
    val_max_source: int  # source latents for the per-epoch validation KNN (subsampled beyond)

    def validate(self) -> None:
        k = "methods.ae"
        if self.extractor == "none" and self.extractor_weights != "none":
            raise ConfigError(f"key '{k}.extractor_weights' is set but '{k}.extractor' is none")
        if self.extractor_input_size < 32:
            raise ConfigError(f"key '{k}.extractor_input_size' must be >= 32, got {self.extractor_input_size}")
        if self.beta_kl < 0 or self.gamma_tc < 0 or self.alpha < 0 or self.beta <= 0:
            raise ConfigError(f"keys '{k}.beta_kl/gamma_tc/alpha' must be >= 0 and '{k}.beta' > 0")
        if self.triplet_margin < 0:
            raise ConfigError(f"key '{k}.triplet_margin' must be >= 0")
        if self.latent_dim < 1 or self.batch_size < 2 or self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError(f"keys '{k}.latent_dim/epochs/steps_per_epoch' must be >= 1, batch_size >= 2")
        if self.ssim_win_size < 3 or self.ssim_win_size % 2 == 0:
            raise ConfigError(f"key '{k}.ssim_win_size' must be odd and >= 3")
        if self.knn_k < 0 or self.rf_trees < 1 or self.svm_c <= 0:
            raise ConfigError(f"keys '{k}.knn_k' >= 0 (0 = sqrt(N)), rf_trees >= 1, svm_c > 0")
        if self.triplet_negatives not in ("any", "one_part"):
            raise ConfigError(f"key '{k}.triplet_negatives' must be 'any' or 'one_part', "
                              f"got {self.triplet_negatives!r}")


# ------------------------------------------------------------------------------------------------ losses


def recon_loss(kind: str, logits: torch.Tensor, target: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """r(., .) of Eq. 1-3 per image, (B,): 1 - SSIM (pytorch-msssim), BCE or MSE (means over pixels).

    The decoder returns logits; the reconstruction is sigmoid(logits) (Tables 4, 6, 7 end in a Sigmoid).
    """
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    recon = torch.sigmoid(logits)
    if kind == "mse":
        return (recon - target).pow(2).flatten(1).mean(1)
    if kind == "ssim":
        from pytorch_msssim import ssim

        win = min(win_size, min(target.shape[-2:]) - (1 - min(target.shape[-2:]) % 2))  # odd, <= image size
        out: torch.Tensor = 1.0 - ssim(recon.float(), target.float(), data_range=1.0, size_average=False,
                                       win_size=max(win, 3))
        return out
    raise ValueError(f"unknown reconstruction loss {kind!r}; known: ssim, bce, mse")


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample, (B,) (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2,
                 swap: bool = True) -> torch.Tensor:
    """Eq. 4: max(0, ||e(Xa) - e(Xp)||_2 - ||e(Xa) - e(Xn)||_2 + margin), mean over the batch.

    With `swap` (Balntas et al. 2016) the negative distance is min(d(a, n), d(p, n)): the harder of the two.
    """
    return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=2.0, swap=swap)


def permute_dims(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of the product of marginals q(z_1)...q(z_d): each latent dimension shuffled independently."""
    b, d = z.shape
    idx = to_device(torch.stack([torch.randperm(b, generator=generator, device="cpu") for _ in range(d)], 1), z.device)
    return torch.gather(z, 0, idx)  # (B, D): column j permuted by idx[:, j]


def total_correlation(disc_logits: torch.Tensor) -> torch.Tensor:
    """FactorVAE's density-ratio estimate of TC(z) = E[log D(z) / (1 - D(z))] (Kim & Mnih 2018, Eq. 3).

    The discriminator (Table 5) has 2 logits, class 0 = "from q(z)", class 1 = "from the permuted product".
    """
    return (disc_logits[:, 0] - disc_logits[:, 1]).mean()


# ------------------------------------------------------------------------------------------------ networks


def _n_ups(size: int) -> int:
    n = int(round(math.log2(size / 4)))
    if size < 8 or 4 * 2**n != size:
        raise DataError(f"method 'ae' needs an image size of 4 * 2^k >= 8 (Table 4 decoder from 4x4), got {size}")
    return n


class ConvEncoder(nn.Module):
    """Table 4 encoder: stride-2 4x4 convs (32, 32, 64, 64) down to 4x4, FC 256, FC latent (x2 for a VAE)."""

    def __init__(self, channels: int, size: int, out_dim: int, conv_channels: list[int] | None) -> None:
        super().__init__()
        n = _n_ups(size)
        chans = list(conv_channels or [32, 32, 64, 64, 64, 64][:n])
        if len(chans) != n:
            raise ConfigError(f"key 'methods.ae.conv_channels' needs {n} entries for {size}px images, got {chans}")
        layers: list[nn.Module] = []
        cin = channels
        for c in chans:
            layers += [nn.Conv2d(cin, c, 4, 2, 1), nn.ReLU(inplace=True)]
            cin = c
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(cin * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.convs(x).flatten(1))  # (B, C, 4, 4) -> (B, 16C)
        return out


class Summariser(nn.Module):
    """Tables 6-7: avg-pool (to 7x7), conv 4x4 -> 256x4x4 + ReLU, FC 256 + ReLU, FC latent (x2 for a VAE).

    `in_mean` / `in_std` (buffers, saved with the model) standardise the features per channel when
    `feature_standardise` is on (Method.before_training sets them once); identity otherwise. The offline default
    extractor is a randomly initialised VGG-11 whose level -3 features are small (0.06 +- 0.03 on digits): the
    conv's pre-activations were then so small that Adam's first bias updates switched every ReLU off (seed 1 of
    II-E-TAE: 0 of 4,096 conv units alive, constant latent codes, marked COLLAPSED by s2r.health).
    """

    in_mean: torch.Tensor  # a buffer (register_buffer)
    in_std: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, in_channels: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, 256, 4, 1, 0), nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(nn.Linear(256 * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, out_dim))
        self.register_buffer("in_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("in_std", torch.ones(1, in_channels, 1, 1))

    @torch.no_grad()
    def standardise_with(self, features: torch.Tensor) -> None:
        """Fix in_mean / in_std to the per-channel statistics of (N, C, 7, 7) features."""
        f = features.float()
        self.in_mean.copy_(f.mean(dim=(0, 2, 3)).view_as(self.in_mean))
        self.in_std.copy_(f.std(dim=(0, 2, 3)).clamp_min(1e-6).view_as(self.in_std))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C, 7, 7) pooled extractor features -> (B, out_dim)."""
        h = (pooled - self.in_mean) / self.in_std
        out: torch.Tensor = self.mlp(self.conv(h).flatten(1))  # (B, 256, 4, 4) -> (B, 4096)
        return out


class Decoder(nn.Module):
    """Tables 4, 6, 7 decoder: FC 256, FC (c*4*4), transposed 4x4 convs (64, 32, 32, ...) to C channels."""

    def __init__(self, latent_dim: int, channels: int, size: int, fc_channels: int) -> None:
        super().__init__()
        n = _n_ups(size)
        self.fc_channels = fc_channels
        self.mlp = nn.Sequential(nn.Linear(latent_dim, 256), nn.ReLU(inplace=True),
                                 nn.Linear(256, fc_channels * 16), nn.ReLU(inplace=True))
        widths = ([64, 32] + [32] * max(0, n - 2))[: n - 1] + [channels]
        layers: list[nn.Module] = []
        cin = fc_channels
        for i, c in enumerate(widths):
            layers.append(nn.ConvTranspose2d(cin, c, 4, 2, 1))
            if i < len(widths) - 1:
                layers.append(nn.ReLU(inplace=True))
            cin = c
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent) -> (B, C, H, W) logits (the Sigmoid of the tables is applied by the loss / reconstruct)."""
        h = self.mlp(z).view(z.shape[0], self.fc_channels, 4, 4)  # (B, 16c) -> (B, c, 4, 4)
        out: torch.Tensor = self.deconvs(h)
        return out


class Discriminator(nn.Module):
    """Table 5: FactorVAE's discriminator, 5 x (FC 1000, LeakyReLU 0.2), FC 2."""

    def __init__(self, latent_dim: int, width: int = 1000, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(cin, width), nn.LeakyReLU(0.2, inplace=True)]
            cin = width
        layers.append(nn.Linear(cin, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(z)
        return out


class FrozenExtractor(nn.Module):
    """Resize to the extractor's input, grey -> 3 channels, ImageNet normalisation, backbone, avg-pool to 7x7."""

    mean: torch.Tensor  # a buffer (register_buffer)
    std: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, backbone: nn.Module, input_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> FrozenExtractor:
        """Always eval: the backbone is frozen, BatchNorm statistics never move."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, K, 7, 7) pooled features."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey copied to 3 channels (appendix A.2)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        f = self.backbone((x - self.mean) / self.std)
        return F.adaptive_avg_pool2d(f, POOLED)  # 14x14 -> 7x7 at 224 (the paper's avg-pool 2x2, stride 2)


class EncoderModule(nn.Module):
    """The exported encoder: (B, C, H, W) in [0, 1] -> (B, latent) (the mean for VAEs)."""

    def __init__(self, extractor: FrozenExtractor | None, encoder: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.extractor, self.encoder, self.latent_dim = extractor, encoder, latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.extractor(x) if self.extractor is not None else x
        out: torch.Tensor = self.encoder(h)[:, : self.latent_dim]
        return out


# ------------------------------------------------------------------------------------------------ sampling


class TargetSampler:
    """Picks reconstruction targets (Eq. 1-3) and triplet partners (appendix A.2) within one split."""

    def __init__(self, split: PreparedSplit, sampling: str, where: str, class_parts: list[list[int]] | None = None,
                 negatives: str = "any", exclude_empty: bool = False) -> None:
        self.sampling = sampling
        self.negative_rule, self.exclude_empty = negatives, exclude_empty
        if (negatives != "any" or exclude_empty) and not class_parts:
            raise DataError(f"{where}: triplet_negatives 'one_part' / triplet_exclude_empty need the benchmark's "
                            "class_parts (benchmark.yaml; the SVIRO / TICaM adapters write them)")
        self.parts = np.asarray(class_parts) if class_parts else None  # (K, positions)
        self.labels = np.asarray(split.labels)
        self.scenes = np.asarray(split.scene_ids)
        n = len(self.labels)
        if sampling == "I":
            if (self.scenes < 0).any():
                raise DataError(f"{where}: sampling 'I' needs scene ids (the source has none)")
            _, inv, counts = np.unique(self.scenes, return_inverse=True, return_counts=True)
            if (counts < 2).any():
                raise DataError(f"{where}: sampling 'I' needs >= 2 variations of every scene; "
                                f"{int((counts < 2).sum())} scenes have one")
            self.by_scene = [np.flatnonzero(inv == s) for s in range(len(counts))]
            self.scene_of = inv
        self.by_class: dict[int, np.ndarray] = {}
        if (self.labels == NO_LABEL).any() and sampling == "II":
            raise DataError(f"{where}: sampling 'II' needs class labels on every source image")
        for c in np.unique(self.labels):
            self.by_class[int(c)] = np.flatnonzero(self.labels == c)
        self.classes = np.array(sorted(self.by_class))
        self.n = n
        if sampling == "II" or sampling == "I":
            single = [c for c, ix in self.by_class.items() if c != NO_LABEL and len(np.unique(self.scenes[ix])) < 2]
            if single and sampling == "II":
                log.warning("%s: %d class(es) %s have a single scene: sampling II / triplet positives use another "
                            "image of that scene (or the image itself) for them", where, len(single), single[:8])

    def _other_scene_same_class(self, i: int, rng: np.random.Generator) -> int:
        pool = self.by_class[int(self.labels[i])]
        sc = self.scenes[i]
        for _ in range(16):  # rejection: a different scene (any image when the source has no scenes)
            j = int(pool[rng.integers(len(pool))])
            if j != i and (sc < 0 or self.scenes[j] != sc):
                return j
        cand = pool[(pool != i) & ((self.scenes[pool] != sc) if sc >= 0 else True)]
        if len(cand) == 0:
            # a class with a single scene (rare seat combinations of a real dataset): no other scene exists, so
            # fall back to another image of the same class (another variation of the same scene), else itself
            cand = pool[pool != i]
            return int(cand[rng.integers(len(cand))]) if len(cand) else i
        return int(cand[rng.integers(len(cand))])

    def targets(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Eq. 1 (vanilla): the input; Eq. 2 (I): other variation, same scene; Eq. 3 (II): other scene, same class."""
        if self.sampling == "vanilla":
            result: np.ndarray = idx.copy()
            return result
        out = np.empty_like(idx)
        for k, i in enumerate(idx):
            if self.sampling == "I":
                pool = self.by_scene[self.scene_of[i]]
                pool = pool[pool != i]
                out[k] = pool[rng.integers(len(pool))]
            else:
                out[k] = self._other_scene_same_class(int(i), rng)
        return out

    def positives(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Appendix A.2: a different scene of the same class."""
        return np.array([self._other_scene_same_class(int(i), rng) for i in idx], np.int64)

    def negative_classes(self, c: int) -> np.ndarray:
        """Classes a negative of an anchor of class `c` may have (appendix A.2), among those in the split."""
        others: np.ndarray = self.classes[self.classes != c]
        if self.parts is None:
            return others
        if self.exclude_empty:
            others = others[(self.parts[others] != 0).any(1)]  # no scene with every seat empty
        if self.negative_rule == "one_part":
            hard: np.ndarray = others[(self.parts[others] != self.parts[c]).sum(1) == 1]  # one seat differs
            if len(hard):
                return hard
        return others  # no class one seat away in this split: any other allowed class

    def negatives(self, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Appendix A.2: a scene of another class (`one_part`: one seat differs; no all-empty scene if asked)."""
        if len(self.classes) < 2:
            raise DataError("triplet loss needs at least two classes in the source domain")
        out = np.empty_like(idx)
        cache: dict[int, np.ndarray] = {}
        for k, i in enumerate(idx):
            c = int(self.labels[i])
            if c not in cache:
                cache[c] = self.negative_classes(c)
                if len(cache[c]) == 0:
                    raise DataError(f"class {c}: no class is allowed as its triplet negative "
                                    "(triplet_exclude_empty leaves none)")
            others = cache[c]
            pool = self.by_class[int(others[rng.integers(len(others))])]
            out[k] = pool[rng.integers(len(pool))]
        return out


# ------------------------------------------------------------------------------------------------ method


@register(Config)
class Method(BaseMethod[Config]):
    """Autoencoder family of paper 1 (AE / VAE / beta-VAE / FactorVAE, E-, I-, II-, T- variants)."""

    name = "ae"
    paper = "extractor-autoencoder-pirl-triplet"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"encode"})
    evaluator: ClassVar[str] = "latent"  # s2r.evaluators.latent: latent classifiers + reconstruction metrics

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        spec = data.spec
        self.source = cfg.source_domain or spec.source
        if self.source not in [d.name for d in spec.domains]:
            raise DataError(f"key 'methods.ae.source_domain': {self.source!r} is not a domain of {data.root}")
        self.target = spec.target
        self.channels, self.size = spec.channels, spec.image_size
        self.train_split = data.get(self.source, "train")
        where = f"{data.root} ({self.source}/train)"
        if cfg.triplet or cfg.sampling == "II":
            if (self.train_split.labels == NO_LABEL).any():
                raise DataError(f"{where}: triplet loss and sampling II need class labels")
        self.sampler = TargetSampler(self.train_split, cfg.sampling, where, spec.class_parts, cfg.triplet_negatives,
                                     cfg.triplet_exclude_empty)
        self.mirror = np.asarray(spec.mirror_classes, np.int64) if spec.mirror_classes else None
        self.pool = self.sampler_part("pool", IndexPool(np.arange(len(self.train_split))))
        self.batch_size = cfg.batch_size
        self.is_vae = cfg.model in ("vae", "factorvae")
        out_dim = 2 * cfg.latent_dim if self.is_vae else cfg.latent_dim
        self.extractor: FrozenExtractor | None = None
        if cfg.extractor != "none":
            backbone = build_extractor(cfg.extractor, cfg.extractor_weights, cfg.extractor_seed)
            self.extractor = FrozenExtractor(backbone, cfg.extractor_input_size)
            self.encoder: nn.Module = Summariser(EXTRACTOR_CHANNELS[cfg.extractor], out_dim)
        else:
            self.encoder = ConvEncoder(self.channels, self.size, out_dim, cfg.conv_channels)
        self.decoder = Decoder(cfg.latent_dim, self.channels, self.size, cfg.decoder_fc_channels)
        self.discriminator = Discriminator(cfg.latent_dim) if cfg.model == "factorvae" else None
        self._features: dict[tuple[str, str, bool], torch.Tensor] = {}
        self._extractor_key = ""

    # -- extractor cache ------------------------------------------------------------------------------
    def extractor_key(self) -> str:
        """Identifies the frozen extractor's function: backbone, its weights, input size."""
        if not self._extractor_key and self.extractor is not None:
            h = hashlib.sha256(f"{self.cfg.extractor}|{self.cfg.extractor_input_size}|{POOLED}".encode())
            for k, v in self.extractor.backbone.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            self._extractor_key = h.hexdigest()[:16]
        return self._extractor_key

    @torch.no_grad()
    def extract(self, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
        """uint8 (N, H, W, C) -> (N, K, 7, 7) float16 pooled features on the CPU (the frozen extractor)."""
        assert self.extractor is not None
        out = []
        for i in range(0, len(images), batch_size):
            x = to_float(np.asarray(images[i : i + batch_size]), self.device)
            out.append(self.extractor(x).half().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def features(self, domain: str, split: str, flipped: bool = False) -> torch.Tensor:
        """Cached pooled extractor features of one (domain, split): computed once, then read (memory / disk)."""
        key = (domain, split, flipped)
        if key in self._features:
            return self._features[key]
        path = None
        if self.cfg.feature_cache_dir:
            name = f"{self.data.data_version[:16]}-{self.extractor_key()}-{domain}-{split}{'-flip' if flipped else ''}"
            path = Path(self.cfg.feature_cache_dir) / f"{name}.pt"
            if path.is_file():
                self._features[key] = torch.load(path, map_location="cpu", weights_only=True)
                return self._features[key]
        images = np.asarray(self.data.get(domain, split).images)
        if flipped:
            images = images[:, :, ::-1].copy()
        from tqdm import tqdm

        log.info("extracting %s features of %s/%s (%d images)", self.cfg.extractor, domain, split, len(images))
        starts = tqdm(range(0, len(images), 512), desc=f"extract {domain}/{split}", disable=len(images) <= 512,
                      mininterval=5.0)
        chunks = [self.extract(images[i : i + 512]) for i in starts]
        feats = torch.cat(chunks)
        self._features[key] = feats
        if path is not None:
            with atomic_path(path) as tmp:
                torch.save(feats, tmp)
        return feats

    def before_training(self) -> None:
        """E- models with feature_standardise: fix the summariser's input statistics from the training features."""
        if self.extractor is not None and self.cfg.feature_standardise:
            assert isinstance(self.encoder, Summariser)
            self.encoder.standardise_with(self.features(self.source, "train"))

    # -- optimisation -----------------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        return [p for m in (self.encoder, self.decoder) for p in m.parameters()]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        opts: dict[str, torch.optim.Optimizer] = {
            "ae": torch.optim.AdamW(self.trainable(), lr=c.lr, weight_decay=c.weight_decay)}  # appendix A.2
        if self.discriminator is not None:
            opts["disc"] = torch.optim.Adam(self.discriminator.parameters(), lr=c.lr_disc, betas=(0.5, 0.9))
        return opts

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Endless batches: input images (uint8, for previews), their labels, and the source indices of the
        inputs (anchors, then positives and negatives with a triplet loss), their targets and flips."""
        while True:
            a = np.sort(self.pool.draw(self.batch_size, self.rng))
            groups = [a]
            if self.cfg.triplet:
                groups += [self.sampler.positives(a, self.rng), self.sampler.negatives(a, self.rng)]
            idx = np.concatenate(groups)
            tgt = self.sampler.targets(idx, self.rng)
            flip_a = self.rng.random(len(a)) < 0.5 if self.cfg.hflip else np.zeros(len(a), bool)
            flip = np.tile(flip_a, len(groups))  # a triplet is mirrored as a whole: its classes stay related
            images = self._read(self.train_split, idx)
            labels = self.train_split.labels[idx].copy()
            if self.mirror is not None and flip.any():
                ok = flip & (labels >= 0)
                labels[ok] = self.mirror[labels[ok]]  # a mirrored interior swaps its left and right seats
            yield images, labels, {"input": idx, "target": tgt, "flip": flip}

    def _inputs(self, images: np.ndarray, idx: np.ndarray, flip: np.ndarray) -> torch.Tensor:
        """Encoder inputs: cached extractor features (E- models) or the images."""
        if self.extractor is not None:
            f = self.features(self.source, "train")[torch.from_numpy(idx)]
            if flip.any():
                ff = self.features(self.source, "train", flipped=True)[torch.from_numpy(idx[flip])]
                f[torch.from_numpy(flip)] = ff
            return f.to(self.device).float()
        return self._flipped(images.copy(), flip)

    @staticmethod
    def _read(split: PreparedSplit, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx)
        imgs = np.empty((len(idx), *split.images.shape[1:]), np.uint8)
        imgs[order] = split.images[idx[order]]  # sorted reads are memmap-friendly
        return imgs

    def _images(self, split: PreparedSplit, idx: np.ndarray, flip: np.ndarray) -> torch.Tensor:
        return self._flipped(self._read(split, idx), flip)

    def _flipped(self, imgs: np.ndarray, flip: np.ndarray) -> torch.Tensor:
        if flip.any():
            imgs[flip] = imgs[flip][:, :, ::-1]
        return to_float(imgs, self.device)

    def encode_tensor(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder output -> (z mean or code, logvar or None)."""
        out = self.encoder(h)
        if self.is_vae:
            return out[:, : self.cfg.latent_dim], out[:, self.cfg.latent_dim :].clamp(-20.0, 20.0)
        return out, None

    def train_step(
        self, batch: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]
    ) -> dict[str, torch.Tensor | float]:
        c = self.cfg
        batch_idx = batch[2]
        groups = 3 if c.triplet else 1  # anchors, positives, negatives (s2r.distributed.Shard)
        shard = distributed.shard()  # this process's rows of the global batch (all of it at one process)
        x = self._inputs(batch[0], batch_idx["input"], batch_idx["flip"])
        target = self._images(self.train_split, batch_idx["target"], batch_idx["flip"])
        with self.autocast():
            mu, logvar = self.encode_tensor(x)
            if logvar is not None:
                z = mu + shard.randn_like(mu, groups) * (0.5 * logvar).exp()  # reparameterisation
            else:
                z = mu
            logits = self.decoder(z).float()
        rec = recon_loss(c.recon_loss, logits, target, c.ssim_win_size)  # (3B,) with triplets
        b = len(batch_idx["input"]) // groups  # this process's batch (batch_size at one process)
        if c.triplet:
            # Eq. 5: beta * (L_r(anchor) + L_r(positive) + L_r(negative)): the per-group means summed
            l_rec = rec.view(3, b).mean(1).sum()
            l_tri = triplet_loss(mu[:b].float(), mu[b : 2 * b].float(), mu[2 * b :].float(), c.triplet_margin,
                                 c.triplet_swap)
        else:
            l_rec = rec.mean()
            l_tri = torch.zeros((), device=rec.device)
        loss = c.alpha * l_tri + c.beta * l_rec
        out: dict[str, torch.Tensor | float] = {"recon": l_rec.detach()}  # on the device: the loop syncs when it logs
        if c.triplet:
            out["triplet"] = l_tri.detach()
        if logvar is not None:
            # the reconstruction term is a mean over the D = C*H*W pixels, so the KL is divided by D too:
            # the same balance as the ELBO with a per-image sum (beta-VAE's beta keeps its meaning)
            d = float(target[0].numel())
            kl = kl_standard_normal(mu.float(), logvar.float()).mean()
            loss = loss + c.beta_kl * kl / d
            out["kl"] = kl.detach()
            if self.discriminator is not None:
                tc = total_correlation(self.discriminator(z.float()))
                loss = loss + c.gamma_tc * tc / d
                out["tc"] = tc.detach()
        self.optimize(loss, "ae")
        if self.discriminator is not None:
            # discriminator: z (class 0) vs dimension-wise permuted z (class 1), Kim & Mnih 2018 Algorithm 2
            zd = z.detach().float()
            zp = shard.local(permute_dims(shard.gather(zd, groups)), groups)  # permuted over the global batch
            logits_d = torch.cat([self.discriminator(zd), self.discriminator(zp)])
            labels = torch.cat([torch.zeros(len(zd), dtype=torch.long, device=zd.device),
                                torch.ones(len(zp), dtype=torch.long, device=zd.device)])
            d_loss = F.cross_entropy(logits_d, labels)
            self.optimize(d_loss, "disc")
            out["disc"] = d_loss.detach()
        out["loss"] = loss.detach()
        return out

    # -- capabilities ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, C) -> (N, latent) codes (the posterior mean for VAEs)."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = to_float(np.asarray(images[i : i + batch_size]), self.device)
            h = self.extractor(x).float() if self.extractor is not None else x
            out.append(self.encode_tensor(h)[0].float().cpu())
        self.train(was)
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.latent_dim), np.float32)

    @torch.no_grad()
    def encode_split(self, domain: str, split: str, flipped: bool = False, batch_size: int = 512) -> np.ndarray:
        """Latents of a whole (domain, split), reading cached extractor features for E- models."""
        if self.extractor is None:
            images = np.asarray(self.data.get(domain, split).images)
            return self.encode(images[:, :, ::-1].copy() if flipped else images, batch_size)
        was = self.training
        self.eval()
        feats = self.features(domain, split, flipped)
        out = [self.encode_tensor(feats[i : i + batch_size].to(self.device).float())[0].float().cpu()
               for i in range(0, len(feats), batch_size)]
        self.train(was)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """(N, latent) -> uint8 (N, H, W, C) reconstructions."""
        x = torch.sigmoid(self.decoder(torch.from_numpy(np.asarray(z, np.float32)).to(self.device)).float())
        return to_uint8(x)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> uint8 reconstructions through the posterior mean."""
        return self.decode(self.encode(images))

    def validate(self) -> dict[str, float]:
        """KNN (k = floor(sqrt(N))) accuracy on the target domain's val split: the study objective (never test)."""
        from sklearn.neighbors import KNeighborsClassifier

        if not self.data.has(self.target, "val"):
            return {}
        src = self.data.get(self.source, "train")
        val = self.data.get(self.target, "val")
        keep = one_per_scene(src) if self.cfg.fit_one_per_scene else np.arange(len(src))
        if len(keep) > self.cfg.val_max_source:
            keep = np.sort(np.random.default_rng(0).choice(keep, self.cfg.val_max_source, replace=False))
        z_src = self.encode_split(self.source, "train")[keep]
        z_val = self.encode_split(self.target, "val")
        y_src = src.labels[keep]
        if self.cfg.hflip:  # as the evaluator (Section 4.7): + flipped latents, labels through the mirror map
            z_src = np.concatenate([z_src, self.encode_split(self.source, "train", flipped=True)[keep]])
            mirrored = np.where(y_src >= 0, self.mirror[np.maximum(y_src, 0)], y_src) if self.mirror is not None \
                else y_src
            y_src = np.concatenate([y_src, mirrored])
        labelled = (y_src != NO_LABEL)
        if labelled.sum() < 2 or (val.labels == NO_LABEL).all():
            return {}
        k = self.cfg.knn_k or knn_default_k(int(labelled.sum()))
        knn = KNeighborsClassifier(n_neighbors=min(k, int(labelled.sum()))).fit(z_src[labelled], y_src[labelled])
        ok = val.labels != NO_LABEL
        acc = float((knn.predict(z_val[ok]) == val.labels[ok]).mean())
        return {"val_knn_accuracy": acc}

    def example_input(self) -> np.ndarray:
        return to_float(np.asarray(self.data.get(self.target, "val").images[:2]), torch.device("cpu")).numpy()

    def health_signals(self) -> dict[str, float]:
        """s2r.health: spread of the latent codes of real val images (a collapsed encoder maps all to one point)."""
        if not self.data.has(self.target, "val"):
            return {}
        z = self.encode_split(self.target, "val")
        return {"latent_std": float(np.asarray(z, np.float64).std(0).mean())}

    def health_checks(self) -> list[Any]:
        from s2r import health

        return [health.Check(health.PREFIX + "latent_std", "<", 1e-4,
                             "constant latent codes (mean per-dim std {value:.2g} on real val)")]

    def export_model(self) -> nn.Module:
        return EncoderModule(self.extractor, self.encoder, self.cfg.latent_dim)


    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """Trainable modules only: the frozen extractor is rebuilt from its config (and fixed seed/weights)."""
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if k.startswith("extractor.")]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        missing_ok = {k for k in super().state_dict() if k.startswith("extractor.")}
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            bad = [k for k in result.missing_keys if k not in missing_ok] + list(result.unexpected_keys)
            if bad:
                raise RuntimeError(f"ae: state dict mismatch: {bad[:8]}")
        return result
