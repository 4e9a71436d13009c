"""CycleGAN refiner, the building block of MrGAN (paper 4, mixing-ratio-mrgan: Section 4, appendix 5-7).

Two generators translate between domain A (the synthetic side) and domain B (the real side): G_AB refines
synthetic images, G_BA maps real images back. Two discriminators, D_B (real B vs G_AB(a)) and D_A (real A vs
G_BA(b)), give least-squares adversarial losses (Mao et al. 2017), and cycle-consistency ties the two
mappings together (Zhu et al. 2017). The same class serves MrGAN's second stage (`methods.mrgan`): only the
two domains change (refined synthetic and/or refined real images written by stage 1).

Networks (appendix 6.1, in CycleGAN notation), widths scaled from `gen_width` (paper 32):
  generator     c7s1-32, d64, d128, R128 x 9, u64, u32, c7s1-C (tanh)
  discriminator C64, C128, C256, C512 (appendix 6) or C64, C128 (appendix 7, the default), then a 4x4 conv to 1
  channel (PatchGAN). Ck = 4x4 conv stride 2 + InstanceNorm + LeakyReLU(0.2), no norm on the first.
Images are uint8 in the prepared arrays, [0, 1] floats at the method's edges and [-1, 1] inside the networks.

Objective (appendix 6.1 and 7): L = L_GAN + lambda_cycle L_cycle + lambda_l1 L_L1 (+ lambda_identity L_id),
lambda_cycle = 10, lambda_l1 = 0.1 (CIFAR-DA4, appendix 7; the airplane-bicycle setting of appendix 6 has
lambda_l1 = 0).

Training (appendix 6.2): Adam, lr 2e-4 for G and 1e-5 for D, betas (0.5, 0.999) (CycleGAN's, the paper names
none); the lr stays constant, then decays linearly to 0 over the last (1 - decay_start) of all steps (40k
iterations, decay after 20k). One step ("iteration") = one update of both discriminators followed by
`g_steps_per_d` (5) generator updates, all on the same batch (the paper does not say whether the G updates
draw fresh images; reusing the batch keeps one batch per loop step). Discriminator targets are smoothed per
image: real in U[0.7, 1.2], fake in U[0.0, 0.3].

Label flips: the paper says "randomly flip the labels (source vs target domain) with the probability 0.9".
Taken literally that inverts the discriminators' objective 90% of the time, so we read it as keeping each
label with probability 0.9, i.e. flipping it with probability `d_label_flip_prob` = 0.1 (per image).

Pretraining (appendix 6.2): before the first adversarial iteration, `pretrain_g_steps` iterations update only
the generators with L1(original, refined), then `pretrain_d_steps` iterations update only the discriminators
with the adversarial loss. They run inside the first training step, on top of `epochs * steps_per_epoch`: the
paper's 40,000 iterations (and the lr schedule, decay after 20,000) count adversarial iterations only.

Label-aligned pairs (appendix 5): with `label_aligned` and labels in both domains, position i of a batch holds
an A image and a B image of the same class; otherwise A and B batches are drawn independently. Aligned pairs
use B's labels, so B (the real side) is limited to the labelled budget: `real_per_class` images per class drawn
with `real_subset_seed`, the same images the mixed-minibatch classifier uses (`methods.mixing`, same keys). The
paper labels every real training image (500 per class), so its recipe sets -1; unaligned training
(`label_aligned: false`) uses every real image, since it reads no labels.

Discriminators see fakes through a history pool (Shrivastava et al. 2017, CycleGAN: 50 images, each incoming
fake swapped for a stored one with probability 0.5); the pool contents are part of the checkpoint.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r import distributed
from s2r.config import ConfigError, Schema
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, PreparedSplit
from s2r.methods.base import IndexPool, limited_indices, to_device, to_float
from s2r.methods.base import Method as BaseMethod
from s2r.methods.common import lsgan_d_loss, lsgan_g_loss, spread, stat_gap, translate_images, translation_domains
from s2r.methods.registry import register

INIT_STD = 0.02  # appendix 6.2 says "variance 0.02"; like CycleGAN's code we use it as the standard deviation


@dataclass
class Config(Schema):
    """`methods.cyclegan` (and `methods.mrgan`, MrGAN's second stage) in params.yaml."""

    domain_a: str  # synthetic side; "" = the benchmark's source domain
    domain_b: str  # real side; "" = the benchmark's target domain
    label_aligned: bool  # appendix 5: pair A and B images of the same class (when both have labels)
    real_per_class: int  # labelled B images per class that aligned pairs may use (= methods.mixing's); -1 = all
    real_subset_seed: int  # draws them (= methods.mixing.real_subset_seed: the same images)
    gen_width: int  # width of c7s1-k (paper 32); d/R/u layers use 2x and 4x
    gen_blocks: int  # residual blocks Rk (paper 9)
    disc_channels: list[int]  # Ck layers (paper [64, 128] or 64..512)
    lambda_cycle: float
    lambda_identity: float  # absolute weight of ||G_AB(b) - b|| + ||G_BA(a) - a|| (CycleGAN: 0.5 * 10)
    lambda_l1: float  # L1 between original and refined image (appendix 7)
    lr_g: float
    lr_d: float  # paper 1e-5 (40,000 iterations); at 200 CPU iterations D then never learns
    beta1: float
    beta2: float
    g_steps_per_d: int
    d_label_flip_prob: float  # paper: "flip ... with the probability 0.9", read as keep with 0.9 (docstring)
    real_label_range: list[float]
    fake_label_range: list[float]
    pool_size: int  # history of fakes per discriminator; 0 = none
    pretrain_g_steps: int  # paper 1000, before (not within) the adversarial iterations
    pretrain_d_steps: int  # paper 500
    batch_size: int  # paper 32 (appendix 6) / 144 (appendix 7)
    epochs: int
    steps_per_epoch: int  # a step = 1 D update + g_steps_per_d G updates (paper: 40000 iterations)
    decay_start: float  # fraction of the adversarial steps after which lr decays linearly to 0

    def validate(self) -> None:
        if self.gen_width < 1 or self.gen_blocks < 0:
            raise ConfigError("key 'gen_width' must be >= 1 and 'gen_blocks' >= 0")
        if not self.disc_channels or any(c < 1 for c in self.disc_channels):
            raise ConfigError(f"key 'disc_channels' must be non-empty positive widths, got {self.disc_channels}")
        for key, value in (("lambda_cycle", self.lambda_cycle), ("lambda_identity", self.lambda_identity),
                           ("lambda_l1", self.lambda_l1)):
            if value < 0:
                raise ConfigError(f"key {key!r} must be >= 0, got {value}")
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ConfigError("keys 'lr_g' and 'lr_d' must be > 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError("keys 'beta1' and 'beta2' must be in [0, 1)")
        if self.g_steps_per_d < 1:
            raise ConfigError("key 'g_steps_per_d' must be >= 1")
        if not 0.0 <= self.d_label_flip_prob <= 1.0:
            raise ConfigError(f"key 'd_label_flip_prob' must be in [0, 1], got {self.d_label_flip_prob}")
        for key, r in (("real_label_range", self.real_label_range), ("fake_label_range", self.fake_label_range)):
            if len(r) != 2 or r[0] > r[1]:
                raise ConfigError(f"key {key!r} must be [low, high] with low <= high, got {r}")
        if self.pool_size < 0 or self.pretrain_g_steps < 0 or self.pretrain_d_steps < 0:
            raise ConfigError("keys 'pool_size', 'pretrain_g_steps' and 'pretrain_d_steps' must be >= 0")
        if self.real_per_class == 0 or self.real_per_class < -1:
            raise ConfigError(f"key 'real_per_class' must be > 0, or -1 for all, got {self.real_per_class}")
        if self.batch_size < 1 or self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError("keys 'batch_size', 'epochs' and 'steps_per_epoch' must be >= 1")
        if not 0.0 <= self.decay_start <= 1.0:
            raise ConfigError(f"key 'decay_start' must be in [0, 1], got {self.decay_start}")


# -- networks ------------------------------------------------------------------------------------------------
def _norm(k: int, affine: bool = True) -> nn.Module:
    """InstanceNorm; affine = with a scale and shift (the "scaling correction terms" appendix 6.2 initialises).

    CUT's instance norm has no affine parameters (networks.get_norm_layer: affine=False).
    """
    return nn.InstanceNorm2d(k, affine=affine)


def _blur_filter(size: int) -> torch.Tensor:
    """CUT networks.get_filter: the normalised outer product of a binomial row ([1, 2, 1] or [1, 3, 3, 1])."""
    rows = {3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0]}
    a = torch.tensor(rows[size])
    f = a[:, None] * a[None, :]
    return f / f.sum()


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 downsampling (Zhang 2019; CUT networks.Downsample: reflect pad 1, 3x3 binomial)."""

    filt: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", _blur_filter(3)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, ceil(H / 2), ceil(W / 2))."""
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt.to(x.dtype), stride=2, groups=x.shape[1])


class BlurUpsample(nn.Module):
    """Anti-aliased x2 upsampling (CUT networks.Upsample: replicate pad 1, 4x4 binomial transposed conv x 4)."""

    filt: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", (_blur_filter(4) * 4)[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt.to(x.dtype), stride=2, padding=2,
                               groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]  # CUT: [1:, 1:] then (even filter) [:-1, :-1]


class ResidualBlock(nn.Module):
    """Rk: two 3x3 convs with reflection padding and InstanceNorm, plus the identity shortcut."""

    def __init__(self, k: int, affine: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(k, k, 3), _norm(k, affine), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(k, k, 3), _norm(k, affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class Generator(nn.Module):
    """ResNet generator c7s1-w, d2w, d4w, R4w x n, u2w, uw, c7s1-C (tanh); (B, C, H, W) in [-1, 1] both ways.

    Defaults are CycleGAN's (appendix 6.1: strided convs, affine instance norm, N(0, 0.02) init). CUT's
    ResnetGenerator is `antialias=True, affine=False, init="xavier"`: each downsampler is a stride-1 conv, norm,
    ReLU and a blur-pool (BlurDownsample), each upsampler a BlurUpsample followed by a stride-1 conv, norm, ReLU,
    so `net` has the same layer indices as CUT's `model` (its nce_layers 0, 4, 8, 12, 16 mean the same layers).
    """

    def __init__(self, channels: int, width: int, blocks: int, *, antialias: bool = False, affine: bool = True,
                 init: str = "normal") -> None:
        super().__init__()
        w1, w2, w4 = width, 2 * width, 4 * width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, w1, 7), _norm(w1, affine),
                                   nn.ReLU(inplace=True)]  # c7s1-w
        for cin, cout in ((w1, w2), (w2, w4)):  # d2w, d4w
            if antialias:
                layers += [nn.Conv2d(cin, cout, 3, 1, 1), _norm(cout, affine), nn.ReLU(inplace=True),
                           BlurDownsample(cout)]
            else:
                layers += [nn.Conv2d(cin, cout, 3, 2, 1), _norm(cout, affine), nn.ReLU(inplace=True)]
        layers += [ResidualBlock(w4, affine) for _ in range(blocks)]  # R4w x blocks
        for cin, cout in ((w4, w2), (w2, w1)):  # u2w, uw
            if antialias:
                layers += [BlurUpsample(cin), nn.Conv2d(cin, cout, 3, 1, 1), _norm(cout, affine), nn.ReLU(inplace=True)]
            else:
                layers += [nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1), _norm(cout, affine),
                           nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(w1, channels, 7), nn.Tanh()]  # c7s1-C
        self.net = nn.Sequential(*layers)
        self.first_block = 12 if antialias else 10  # index of the first residual block in `net`
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any H, W: pad (replicate) to a multiple of 4 for the two stride-2 stages, crop back afterwards."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        out: torch.Tensor = self.net(x)[..., :h, :w]
        return out


class Discriminator(nn.Module):
    """PatchGAN: Ck (4x4 conv stride 2, InstanceNorm except on the first, LeakyReLU 0.2) ..., 4x4 conv to 1.

    Defaults are CycleGAN's appendix 6.1 layout (every Ck stride 2). `last_stride1=True` is pix2pix / CUT's
    NLayerDiscriminator: the last width is a stride-1 Ck, so CUT's basic D (n_layers 3) is widths
    [64, 128, 256, 512] (C64, C128, C256 stride 2, C512 stride 1, output conv stride 1: 70 px receptive field).
    `antialias=True` (CUT's default) replaces each stride-2 conv by a stride-1 conv + LeakyReLU + BlurDownsample.
    """

    def __init__(self, channels: int, widths: list[int], *, last_stride1: bool = False, antialias: bool = False,
                 affine: bool = True, init: str = "normal") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        self.last_stride1 = last_stride1
        for i, k in enumerate(widths):
            norm = [] if i == 0 else [_norm(k, affine)]
            if last_stride1 and i == len(widths) - 1:
                layers += [nn.Conv2d(cin, k, 4, 1, 1), *norm, nn.LeakyReLU(0.2, True)]
            elif antialias:
                layers += [nn.Conv2d(cin, k, 4, 1, 1), *norm, nn.LeakyReLU(0.2, True), BlurDownsample(k)]
            else:
                layers += [nn.Conv2d(cin, k, 4, 2, 1), *norm, nn.LeakyReLU(0.2, True)]
            cin = k
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_strided = len(widths) - (1 if last_stride1 else 0)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 1, h, w) patch scores."""
        out: torch.Tensor = self.net(x)
        return out

    @staticmethod
    def out_size(size: int, n_layers: int, n_stride1: int = 0) -> int:
        """Side of the patch map for a size x size input (each strided Ck halves, each stride-1 4x4 conv removes 1).

        A blur-pooled Ck (stride-1 4x4 conv, then BlurDownsample) also maps s to s // 2.
        """
        for _ in range(n_layers):
            size //= 2
        return size - 1 - n_stride1


def init_weights(module: nn.Module, init: str = "normal") -> None:
    """Appendix 6.2: conv weights N(0, 0.02), norm scales N(1, 0.02), every other parameter 0.

    The paper says the norm scales are zero-mean; a scale near 0 would silence every normalised layer, so we
    follow CycleGAN's code (mean 1) and read "zero mean" as describing the weights. `init="xavier"` is CUT's
    (`--init_type xavier --init_gain 0.02`: conv weights xavier_normal with gain 0.02, biases 0).
    """
    if init not in ("normal", "xavier"):
        raise ConfigError(f"init must be 'normal' or 'xavier', got {init!r}")
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if init == "xavier":
                nn.init.xavier_normal_(m.weight, gain=INIT_STD)
            else:
                nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)


class Refiner(nn.Module):
    """Exported model: a generator with [0, 1] images in and out, so users need not know the [-1, 1] scaling."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> refined (B, C, H, W) in [0, 1]."""
        out: torch.Tensor = (self.generator(x * 2 - 1) + 1) / 2
        return out


# -- losses (LSGAN: s2r.methods.common) ----------------------------------------------------------------------
def d_targets(n: int, real: bool, cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """Smoothed, occasionally flipped discriminator targets for n images (appendix 6.2), float32 (n,)."""
    flip = rng.random(n) < cfg.d_label_flip_prob
    (real_lo, real_hi), (fake_lo, fake_hi) = cfg.real_label_range, cfg.fake_label_range
    real_t = rng.uniform(real_lo, real_hi, size=n)
    fake_t = rng.uniform(fake_lo, fake_hi, size=n)
    is_real = ~flip if real else flip  # a flipped real image gets a fake target and vice versa
    out: np.ndarray = np.where(is_real, real_t, fake_t).astype(np.float32)
    return out


class ImagePool:
    """History of generated images for the discriminator (Shrivastava et al. 2017; CycleGAN's ImagePool).

    Until `size` images are stored every incoming image is stored and returned; afterwards each incoming image
    is, with probability 0.5, swapped for a random stored one (which is returned) and otherwise returned as is.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []  # each (C, H, W), detached

    def query(self, batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(B, C, H, W) fakes -> (B, C, H, W) fakes for the discriminator."""
        if self.size == 0:
            return batch
        out = []
        for img in batch.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif rng.random() < 0.5:
                i = int(rng.integers(len(self.images)))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state(self) -> torch.Tensor | None:
        return torch.stack(self.images).cpu() if self.images else None

    def load(self, state: torch.Tensor | None, device: torch.device) -> None:
        self.images = [] if state is None else list(state.to(device).unbind(0))


# -- sampler -------------------------------------------------------------------------------------------------
class CycleBatch(NamedTuple):
    """One training batch. Fields 0 and 1 are (images, labels) like other methods' batches (sample grids)."""

    a: np.ndarray  # (B, H, W, C) uint8, domain A
    a_labels: np.ndarray  # (B,) int64
    b: np.ndarray  # (B, H, W, C) uint8, domain B; b[i] has class a_labels[i] when label-aligned
    b_labels: np.ndarray  # (B,) int64


class PairSampler:
    """Draws index pairs (A, B): same class position by position when aligned (appendix 5), else independent.

    A images are drawn in shuffled epochs; when aligned each class of B has its own shuffled cycle, and A images
    of classes absent from B are left out.
    """

    def __init__(self, a_labels: np.ndarray, b_labels: np.ndarray, aligned: bool,
                 b_subset: np.ndarray | None = None) -> None:
        """`b_subset`: the B indices whose labels aligned pairs may use (the labelled budget); None = all."""
        self.aligned = aligned
        self.a_labels = a_labels
        if aligned:
            b_idx = np.arange(len(b_labels)) if b_subset is None else np.asarray(b_subset, np.int64)
            shared = np.intersect1d(np.unique(a_labels), np.unique(b_labels[b_idx]))
            if len(shared) == 0:
                raise DataError("label-aligned CycleGAN: the two domains share no class; set label_aligned: false")
            self.a_pool = IndexPool(np.flatnonzero(np.isin(a_labels, shared)))
            self.b_pools = {int(c): IndexPool(b_idx[b_labels[b_idx] == c]) for c in shared}
        else:
            self.a_pool = IndexPool(np.arange(len(a_labels)))
            self.b_pools = {-1: IndexPool(np.arange(len(b_labels)))}

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n A indices and n B indices (paired by position)."""
        ai = self.a_pool.draw(n, rng)
        if not self.aligned:
            return ai, self.b_pools[-1].draw(n, rng)
        la = self.a_labels[ai]
        bi = np.empty(n, np.int64)
        for c in np.unique(la):
            pos = np.flatnonzero(la == c)
            bi[pos] = self.b_pools[int(c)].draw(len(pos), rng)
        return ai, bi

    def state(self) -> dict[str, Any]:
        return {"a": self.a_pool.state(), "b": {k: p.state() for k, p in self.b_pools.items()}}

    def load(self, s: dict[str, Any]) -> None:
        self.a_pool.load(s["a"])
        for k, p in self.b_pools.items():
            p.load(s["b"][k])


# -- method --------------------------------------------------------------------------------------------------
@register(Config, aliases=("mrgan",))  # mrgan: MrGAN's later stages between refined domains (paper 4 Fig. 5B)
class Method(BaseMethod[Config]):
    """CycleGAN between domain A (synthetic) and B (real) with MrGAN's training recipe; translates A -> B."""

    name = "cyclegan"
    paper = "mixing-ratio-mrgan"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"translate"})

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        self.domain_a, self.domain_b = translation_domains(self, cfg.domain_a, cfg.domain_b)
        self.a = data.get(self.domain_a, "train")
        self.b = data.get(self.domain_b, "train")
        self.a_val = self._val_split(self.domain_a)
        self.b_val = self._val_split(self.domain_b)
        channels, size = int(self.a.images.shape[-1]), int(self.a.images.shape[1])
        if int(self.b.images.shape[-1]) != channels:
            raise DataError(f"domains {self.domain_a!r} and {self.domain_b!r} have different channel counts")
        if Discriminator.out_size(min(self.a.images.shape[1:3]), len(cfg.disc_channels)) < 1:
            raise ConfigError(
                f"key 'disc_channels': {len(cfg.disc_channels)} stride-2 layers leave no patch for {size}px images"
            )
        usable = self._labels_usable(self.domain_a, self.a) and self._labels_usable(self.domain_b, self.b)
        self.aligned = bool(cfg.label_aligned and usable)  # else independent A and B batches
        # aligned pairs read B's labels: only the labelled budget (the classifier's images, appendix 5 + Section 3.3)
        subset_rng = np.random.default_rng(cfg.real_subset_seed)
        self.b_labelled = limited_indices(self.b.labels, cfg.real_per_class, subset_rng) if self.aligned else None
        self.sampler = self.sampler_part("pairs", PairSampler(self.a.labels, self.b.labels, self.aligned,
                                                              self.b_labelled))
        self.batch_size = cfg.batch_size  # samples per step = (A, B) pairs
        self.g_ab = Generator(channels, cfg.gen_width, cfg.gen_blocks)
        self.g_ba = Generator(channels, cfg.gen_width, cfg.gen_blocks)
        self.d_a = Discriminator(channels, cfg.disc_channels)  # real A vs G_BA(b)
        self.d_b = Discriminator(channels, cfg.disc_channels)  # real B vs G_AB(a)
        self.pool_a, self.pool_b = ImagePool(cfg.pool_size), ImagePool(cfg.pool_size)
        # Label smoothing/flips and pool swaps; separate from self.rng so they never shift the batch sampler.
        self.noise_rng = np.random.default_rng([seed, 0xC7C1E])
        self.step_count = 0  # adversarial iterations done; checkpointed
        self.pretrained = cfg.pretrain_g_steps + cfg.pretrain_d_steps == 0  # pretraining done; checkpointed
        self.pretrain_losses: dict[str, float] = {}  # last pretraining losses, reported by validate()

    def _val_split(self, domain: str) -> PreparedSplit:
        return self.data.get(domain, "val" if self.data.has(domain, "val") else "train")

    def _labels_usable(self, domain: str, part: PreparedSplit) -> bool:
        """Labels exist for every image and the benchmark allows training on them."""
        declared = {d.name: d for d in self.data.spec.domains}
        allowed = declared[domain].labelled if domain in declared else True
        return allowed and len(part.labels) > 0 and bool((part.labels >= 0).all())

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        betas = (c.beta1, c.beta2)
        g_params = [*self.g_ab.parameters(), *self.g_ba.parameters()]
        d_params = [*self.d_a.parameters(), *self.d_b.parameters()]
        return {"g": torch.optim.Adam(g_params, lr=c.lr_g, betas=betas),
                "d": torch.optim.Adam(d_params, lr=c.lr_d, betas=betas)}

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        """Constant lr, then linear decay to 0 at the last step (appendix 6.2); adversarial steps only."""
        start = int(round(self.cfg.decay_start * total_steps))

        def factor(step: int) -> float:
            if step <= start or total_steps <= start:
                return 1.0
            return max(0.0, (total_steps - step) / (total_steps - start))

        return {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in self.optimizers.items()}

    def step_schedulers(self) -> None:
        with warnings.catch_warnings():  # an AMP step skipped on inf gradients leaves an optimiser unstepped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            super().step_schedulers()

    def batches(self) -> Iterator[CycleBatch]:
        """Endless (A, B) batches of uint8 (B, H, W, C) images, label-aligned where possible."""
        while True:
            ai, bi = self.sampler.draw(self.cfg.batch_size, self.rng)
            yield CycleBatch(self.a.images[ai], self.a.labels[ai], self.b.images[bi], self.b.labels[bi])

    def _targets(self, n: int, real: bool) -> torch.Tensor:
        """(n, 1, 1, 1) discriminator targets, one per image, broadcast over its patch scores (in a distributed
        step: this process's rows of the targets drawn for the global batch)."""
        shard = distributed.shard()
        t = shard.local(d_targets(shard.global_n(n), real, self.cfg, self.noise_rng))
        return to_device(t, self.device).view(n, 1, 1, 1)  # (n,) -> (n, 1, 1, 1)

    def discriminator_loss(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """LSGAN loss of D_A and D_B on real images and pooled fakes (Mao et al. eq. 2; appendix 6.2 targets)."""
        with torch.no_grad(), self.autocast():
            fake_b, fake_a = self.g_ab(a).float(), self.g_ba(b).float()
        shard = distributed.shard()  # the pools see the global batch's fakes, as one process (s2r.distributed)
        fake_b = shard.local(self.pool_b.query(shard.gather(fake_b), self.noise_rng))
        fake_a = shard.local(self.pool_a.query(shard.gather(fake_a), self.noise_rng))
        n = a.shape[0]
        with self.autocast():
            real_b_s, fake_b_s = self.d_b(b), self.d_b(fake_b)
            real_a_s, fake_a_s = self.d_a(a), self.d_a(fake_a)
        loss_b = lsgan_d_loss(real_b_s, fake_b_s, self._targets(n, True), self._targets(n, False))
        loss_a = lsgan_d_loss(real_a_s, fake_a_s, self._targets(n, True), self._targets(n, False))
        return {
            "loss_d": loss_a + loss_b,
            "d_real": (real_a_s.float().mean() + real_b_s.float().mean()).detach() / 2,
            "d_fake": (fake_a_s.float().mean() + fake_b_s.float().mean()).detach() / 2,
        }

    def generator_loss(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """L = L_GAN + lambda_cycle L_cycle + lambda_l1 L_L1 + lambda_identity L_id (appendix 6.1 and 7)."""
        c = self.cfg
        with self.autocast():
            fake_b, fake_a = self.g_ab(a), self.g_ba(b)
            rec_a, rec_b = self.g_ba(fake_b), self.g_ab(fake_a)
            gan = lsgan_g_loss(self.d_b(fake_b)) + lsgan_g_loss(self.d_a(fake_a))
        fake_b, fake_a, rec_a, rec_b = fake_b.float(), fake_a.float(), rec_a.float(), rec_b.float()
        # Cycle consistency (Zhu et al. 2017, eq. 2): ||G_BA(G_AB(a)) - a||_1 + ||G_AB(G_BA(b)) - b||_1
        cycle = F.l1_loss(rec_a, a) + F.l1_loss(rec_b, b)
        # L_L1 between original and refined images (appendix 7): ||G_AB(a) - a||_1 + ||G_BA(b) - b||_1
        l1 = F.l1_loss(fake_b, a) + F.l1_loss(fake_a, b)
        total = gan + c.lambda_cycle * cycle + c.lambda_l1 * l1
        identity = torch.zeros((), device=a.device)
        if c.lambda_identity > 0:
            # Identity mapping (Zhu et al. 2017, Section 5.2): ||G_AB(b) - b||_1 + ||G_BA(a) - a||_1
            with self.autocast():
                id_b, id_a = self.g_ab(b), self.g_ba(a)
            identity = F.l1_loss(id_b.float(), b) + F.l1_loss(id_a.float(), a)
            total = total + c.lambda_identity * identity
        return {"loss_g": total, "loss_gan_g": gan, "loss_cycle": cycle, "loss_l1": l1, "loss_identity": identity}

    def pretrain_generator_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Appendix 6.2 generator pretraining: L_L1 = ||G_AB(a) - a||_1 + ||G_BA(b) - b||_1 (start near identity)."""
        with self.autocast():
            fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        return F.l1_loss(fake_b.float(), a) + F.l1_loss(fake_a.float(), b)

    def _set_d_trainable(self, flag: bool) -> None:
        """Freeze D during G updates: G's backward then skips D's weight gradients (CycleGAN's habit)."""
        for p in [*self.d_a.parameters(), *self.d_b.parameters()]:
            p.requires_grad_(flag)

    def pretrain(self) -> dict[str, float]:
        """Appendix 6.2: pretrain_g_steps G-only L1 iterations, then pretrain_d_steps D-only adversarial ones.

        Runs before the first adversarial iteration, on batches from the same sampler, without stepping the lr
        schedule (the paper's 40,000 iterations and their decay are adversarial iterations).
        """
        out: dict[str, float] = {}
        for phase, n in (("g", self.cfg.pretrain_g_steps), ("d", self.cfg.pretrain_d_steps)):
            for _ in range(n):
                ai, bi = self.sampler.draw(self.cfg.batch_size, self.rng)
                ai, bi = distributed.shard().local(ai), distributed.shard().local(bi)  # this process's pairs
                a = to_float(self.a.images[ai], self.device) * 2 - 1  # [0, 1] -> [-1, 1]
                b = to_float(self.b.images[bi], self.device) * 2 - 1
                if phase == "g":
                    loss = self.pretrain_generator_loss(a, b)
                    self.optimize(loss, "g")
                    out["pretrain_l1"] = float(loss.detach())
                else:
                    d = self.discriminator_loss(a, b)
                    self.optimize(d["loss_d"], "d")
                    out["pretrain_loss_d"] = float(d["loss_d"].detach())
        self.pretrained = True
        self.pretrain_losses = out
        return out

    def before_training(self) -> None:
        """Pretraining draws its own batches: done before the loop's prefetch thread draws from the sampler."""
        if not self.pretrained:
            self.pretrain()

    def train_step(self, batch: CycleBatch) -> dict[str, torch.Tensor]:
        """One adversarial iteration: 1 D update + g_steps_per_d G updates on the batch (pretraining first, when
        the step is called outside the training loop)."""
        if not self.pretrained:
            self.pretrain()
        a = to_float(batch.a, self.device) * 2 - 1  # [0, 1] -> [-1, 1]
        b = to_float(batch.b, self.device) * 2 - 1
        d = self.discriminator_loss(a, b)
        self.optimize(d["loss_d"], "d")
        out: dict[str, torch.Tensor] = {k: v.detach() for k, v in d.items()}
        self._set_d_trainable(False)
        sums: dict[str, torch.Tensor] = {}  # float64 on the device (no sync per G update)
        for _ in range(self.cfg.g_steps_per_d):
            g = self.generator_loss(a, b)
            self.optimize(g["loss_g"], "g")
            for k, v in g.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double()
        self._set_d_trainable(True)
        out.update({k: v / self.cfg.g_steps_per_d for k, v in sums.items()})  # mean over the G updates
        self.step_schedulers()
        self.step_count += 1
        return out

    # -- use -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _refine(self, x: torch.Tensor, direction: str) -> torch.Tensor:
        """[0, 1] (B, C, H, W) -> [0, 1] refined, in eval mode."""
        gen = {"a2b": self.g_ab, "b2a": self.g_ba}.get(direction)
        if gen is None:
            raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")
        with self.autocast():
            out: torch.Tensor = ((gen(x * 2 - 1).float() + 1) / 2).clamp_(0, 1)
            return out

    @torch.no_grad()
    def translate(self, images: np.ndarray, direction: str = "a2b", batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, C) -> refined uint8 (N, H, W, C); a2b = synthetic -> real. Any H, W >= 8."""
        return translate_images(self, images, lambda x: self._refine(x, direction), batch_size)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Cycle and refinement L1 on fixed val images, and a pixel-statistics gap between refined A and real B."""
        xa = to_float(self.a_val.images[spread(len(self.a_val), 64)], self.device)
        xb = to_float(self.b_val.images[spread(len(self.b_val), 64)], self.device)
        fake_b, fake_a = self._refine(xa, "a2b"), self._refine(xb, "b2a")
        rec_a, rec_b = self._refine(fake_b, "b2a"), self._refine(fake_a, "a2b")
        return {
            "val_cycle_a": float((rec_a - xa).abs().mean()),
            "val_cycle_b": float((rec_b - xb).abs().mean()),
            "val_l1_a2b": float((fake_b - xa).abs().mean()),
            "val_l1_b2a": float((fake_a - xb).abs().mean()),
            "val_gap_original": stat_gap(xa, xb),
            "val_gap_refined": stat_gap(fake_b, xb),
            **self.pretrain_losses,
        }

    def example_input(self) -> np.ndarray:
        return to_float(self.a_val.images[:2], torch.device("cpu")).numpy()

    def health_checks(self) -> list[Any]:
        """s2r.health: a discriminator that wins or loses outright (epoch means of D(real) and D(fake))."""
        from s2r import health

        return list(health.GAN_CHECKS)

    def export_model(self) -> nn.Module:
        """The A -> B refiner with [0, 1] images in and out."""
        return Refiner(self.g_ab)

    # -- checkpoint state ----------------------------------------------------------------------------------

    def train_state(self) -> dict[str, Any]:
        """Adds the step counter, pretraining flag, noise rng and fake-image pools to the base state."""
        return super().train_state() | {"gan": {
            "step": self.step_count,
            "pretrained": self.pretrained,
            "pretrain_losses": dict(self.pretrain_losses),
            "noise_rng": copy.deepcopy(self.noise_rng.bit_generator.state),
            "pool_a": self.pool_a.state(),
            "pool_b": self.pool_b.state(),
        }}

    def load_train_state(self, state: dict[str, Any]) -> None:
        super().load_train_state(state)
        gan = state["gan"]
        self.step_count = int(gan["step"])
        self.pretrained = bool(gan["pretrained"])
        self.pretrain_losses = dict(gan["pretrain_losses"])
        self.noise_rng.bit_generator.state = copy.deepcopy(gan["noise_rng"])
        self.pool_a.load(gan["pool_a"], self.device)
        self.pool_b.load(gan["pool_b"], self.device)
