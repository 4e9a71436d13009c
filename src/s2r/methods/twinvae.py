"""Twin VAE with a shared latent space, PackNet packing layers and depth / segmentation heads (paper 2, Raghavan
et al., "Sim2Real for Self-Supervised Monocular Depth and Segmentation").

One module, three training stages chosen by `stage` (params blocks of the same method, one name everywhere):

- ``vae`` (`methods.twinvae`, paper Section 3.1, Eq. 1-10): real encoder E_R / decoder G_R and sim encoder E_S /
  decoder G_S on unpaired real and sim images. The last encoder layers and the first decoder layer are ONE module
  object used by both domains (shared latent space). Loss, each term with its own weight in params.yaml::

      L = w_kl (L_R,KL + L_S,KL) + w_mse (L_R,MSE + L_S,MSE) + w_mmd (L_R,MMD + L_S,MMD) + w_cycle (L_R,CC + L_S,CC)

  The paper's Eq. 10 lists L_S,CC twice and L_R,MMD once (no L_R,CC, no L_S,MMD) while the text calls it "the
  sum of these eight functions": we read it as a typo and implement all eight terms (both cycles, both MMDs).
- ``heads`` (`methods.twinvae_heads`, Section 3.3, Eq. 11-20): starts from stage 1's weights (`s2r train
  twinvae_heads --init data/models/twinvae`) and trains a depth decoder G_D (MSE, Eq. 15-16) and a segmentation
  decoder G_I (pixel-wise cross-entropy, Eq. 18-19), each fed by the sim encoder on sim images (z_S) and by the
  real encoder on sim images translated to real, x'_R = G_R(z_S) (z'_R = E_R(x'_R)), with sim labels only; plus
  the cross-domain KL terms (Eq. 11-12) and the MMD terms between z_S and z'_R (Eq. 13) and between
  z'_S = E_S(G_S(z_R)) and z_R of unpaired real images (Eq. 14). L_depth and L_seg (Eq. 17, 20) share their KL
  and MMD terms; we minimise their union once: KL + MMD + depth + segmentation terms, each weighted.
- ``supervised``: the baselines of the same protocol (paper Table 1's supervised rows): the same encoder (a sim
  encoder: private + shared layers, reparameterised, KL-regularised as in Eq. 12) and the same two heads trained
  directly on one domain's labels, without the twin VAE: `supervised_domain: source` is the sim-only lower bound,
  `target` the target-supervised upper bound.

Architecture (appendix Table 2, widths/depth from params; the paper's 256 px values in comments):
  encoder  c7 stem + LeakyReLU | (P - 1) x [Packing + Conv2D + InstanceNorm] | mid residual blocks
           (Conv2D + IN + Conv2D + IN) | Packing + Conv2D + IN || shared: Conv2D + BatchNorm -> mu, logvar (1x1)
  decoder  shared: ConvTranspose2D + BatchNorm || Conv2D + IN + Unpacking | mid residual blocks |
           (P - 1) x [Conv2D + IN + Unpacking] | ConvTranspose2D k7 + tanh (no tanh for segmentation logits)
P packing layers divide the resolution by 2^P (paper P = 6: 256 px -> 4x4). The table lists one shared layer
each side; the text says "the last three weights of each encoder are shared, and the first three weights of each
decoder": the shared encoder holds the table's conv (+ BN) and the mu / logvar convolutions (three weight
tensors); the shared decoder holds layer 11's transposed conv (+ BN) and layer 12 (Conv2D + IN + Unpacking: its
2D conv and the unpacking's 3D conv), three weight tensors (`shared_decoder_weights: 3`; 1 = Table 2's layer 11
only). Auxiliary heads have their own copy of these "shared decoder" layers (table note (*)). The segmentation
head has one output per benchmark class: VKITTI's 15 categories with the driving adapters' `classes: vkitti`
(Table 2 note (**): 15 x 256 x 256), of which the evaluator scores the 12 shared ones
(`reports.depth_segmentation.classes`). Activations are ReLU unless stated (table caption).
Packing (Guizilini et al. 2020): space-to-depth (r = 2), a 3D convolution with `pack_d` filters over the folded
channels, reshape, then a 2D convolution; unpacking mirrors it (2D conv, 3D conv, depth-to-space).

Losses (documented choices where the paper is ambiguous):
  - Eq. 2/3 KL term: d_KL(q(z|x) || N(0, I)) + E[-log p(x|z)], with a unit-variance Gaussian decoder, so
    -log p(x|z) = 0.5 * MSE + const. Both parts are means per element (per latent dimension / per pixel) so the
    weights do not depend on resolution. Eq. 4/5 "MSE losses" are mean squared errors (the paper writes an L2
    norm but names them MSE).
  - Eq. 6/7 MMD with k(x, y) = exp(-||x - y||^2 / (2 sigma^2)) on flattened latents, prior samples a ~ N(0, I);
    "we let a = a~ and z = z~": the biased (V-statistic) estimate using the same sample twice, diagonal included.
    sigma^2 = `mmd_sigma2_per_dim` * D (D = latent dimension) so the kernel does not vanish in high dimension.
    Because of the diagonal terms, two batches of B samples from the same distribution score about
    2 (1 - e^(-1)) / B rather than 0 (0.158 at B = 8): a constant floor; the gradient is unaffected.
  - Eq. 8/9 cycle terms: mean absolute error.
  - Depth targets are scaled to the tanh range: d_n = 2 d / depth_max - 1 (0 m -> -1); MSE over valid pixels
    (depth > 0). Segmentation: mean pixel-wise cross-entropy, 255 = ignore.
  - The reparameterisation trick runs in every forward pass (Section 3: "done during all forward passes"):
    inference (predict, encode, translate) samples z too (`inference_sample: true`, default) from a generator
    seeded by the model's seed (repeatable evaluations); `inference_sample: false` uses the posterior mean.
    Exported models (MLflow) use the mean (deterministic deployment).
  - In stage 2 x'_R = G_R(z_S) is treated as an input (no gradient into G_R through it); with
    `train_vae_in_heads: true` (default, as Eq. 11-14 are losses of the encoders) the encoders and decoders keep
    training with the stage-2 losses, otherwise only the heads train.
Images are [0, 1] at the method's edges and [-1, 1] inside the networks. Adam (0.9, 0.999), lr 1e-4 (Section 4.2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r import distributed
from s2r.config import ConfigError, Schema
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, PreparedSplit
from s2r.methods.base import IndexPool, to_device, to_float, to_uint8
from s2r.methods.base import Method as BaseMethod
from s2r.methods.common import spread, translation_domains
from s2r.methods.registry import register

IGNORE = 255  # mask value of pixels without a class (benchmark layout)
# Config keys stage 2 must share with stage 1: the network's shape, and the sim side its encoder learnt.
INIT_KEYS = ("stem_channels", "pack_channels", "mid_blocks", "latent_channels", "pack_d", "shared_decoder_weights",
             "domain_a")


@dataclass
class Config(Schema):
    """`methods.twinvae` (stage 1), `methods.twinvae_heads` (stage 2) and the baselines in params.yaml."""

    stage: Literal["vae", "heads", "supervised"]
    supervised_domain: Literal["source", "target"]  # stage supervised: whose labels (lower/upper bound)
    domain_a: str  # the labelled sim side ("source" above); "" = the benchmark's source domain. The real side is
    # always the benchmark's target, the domain the evaluator scores
    # architecture (appendix Table 2); paper: 64, [76, 88, 100, 128, 200, 250], 2, 300 at 256 px
    stem_channels: int
    pack_channels: list[int]
    mid_blocks: int
    latent_channels: int
    pack_d: int  # 3D-conv filters of packing / unpacking (PackNet's d)
    shared_decoder_weights: int  # "the first three weights of each decoder are shared" (Section 3.2); 1 = Table 2
    init_std: float  # Gaussian weight initialisation N(0, init_std) (Section 3.2; value not given)
    logvar_bias_init: float  # initial bias of the log-variance conv (0: unit posterior noise at init)
    # stage 1 weights (Eq. 10; the paper sums with weight 1)
    w_kl: float  # Eq. 2-3 (KL + Gaussian NLL; paper 1)
    w_mse: float  # Eq. 4-5
    w_mmd: float  # Eq. 6-7
    w_cycle: float  # Eq. 8-9
    mmd_sigma2_per_dim: float  # kernel sigma^2 = this * latent dimension
    # stage 2 / baseline weights (Eq. 17 and 20)
    w_kl2: float  # Eq. 11-12 (paper 1)
    w_mmd2: float  # Eq. 13-14
    w_depth: float  # Eq. 15-16
    w_seg: float  # Eq. 18-19
    train_vae_in_heads: bool  # stage 2: encoders/decoders keep training with Eq. 11-14 (else heads only)
    depth_max: float  # metres mapped to the tanh range (d_n = 2 d / depth_max - 1)
    inference_sample: bool  # Section 3: z is sampled in every forward pass; false = the posterior mean
    seg_weighting: Literal["none", "median_frequency"]  # Eq. 18-19 plain CE, or class-balanced CE
    lr: float
    beta1: float
    beta2: float
    batch_size: int
    epochs: int
    steps_per_epoch: int
    val_images: int  # validation subset per domain (per-epoch monitoring)

    def validate(self) -> None:
        if self.stem_channels < 1 or not self.pack_channels or any(c < 1 for c in self.pack_channels):
            raise ConfigError("keys 'stem_channels' and 'pack_channels' must be positive (pack_channels non-empty)")
        if self.mid_blocks < 0 or self.latent_channels < 1 or self.pack_d < 1:
            raise ConfigError("keys 'mid_blocks' >= 0, 'latent_channels' >= 1 and 'pack_d' >= 1 required")
        if self.shared_decoder_weights not in (1, 3):
            raise ConfigError(f"key 'shared_decoder_weights' must be 3 (Section 3.2: layer 11 + layer 12) or 1 "
                              f"(Table 2: layer 11 only), got {self.shared_decoder_weights}")
        outs = [self.stem_channels, *self.pack_channels[:-1]]  # unpacking outputs
        bad = [c for c in outs if (4 * c) % self.pack_d]
        if bad:
            raise ConfigError(f"key 'pack_d': unpacking to {bad} channels needs 4 * channels divisible by pack_d "
                              f"({self.pack_d})")
        weights = {"w_kl": self.w_kl, "w_mse": self.w_mse, "w_mmd": self.w_mmd, "w_cycle": self.w_cycle,
                   "w_kl2": self.w_kl2, "w_mmd2": self.w_mmd2, "w_depth": self.w_depth, "w_seg": self.w_seg,
                   "init_std": self.init_std}
        for k, v in weights.items():
            if v < 0:
                raise ConfigError(f"key {k!r} must be >= 0, got {v}")
        if self.mmd_sigma2_per_dim <= 0 or self.depth_max <= 0 or self.lr <= 0:
            raise ConfigError("keys 'mmd_sigma2_per_dim', 'depth_max' and 'lr' must be > 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError("keys 'beta1' and 'beta2' must be in [0, 1)")
        if self.batch_size < 2 or self.epochs < 1 or self.steps_per_epoch < 1 or self.val_images < 1:
            raise ConfigError("keys 'batch_size' >= 2 (BatchNorm, MMD), 'epochs', 'steps_per_epoch', 'val_images' >= 1")


# -- layers --------------------------------------------------------------------------------------------------
def _in(c: int) -> nn.Module:
    return nn.InstanceNorm2d(c, affine=True)


class Packing(nn.Module):
    """PackNet packing: space-to-depth (r = 2), 3D conv (d filters), reshape, Conv2D + InstanceNorm + ReLU."""

    def __init__(self, cin: int, cout: int, d: int = 8, k: int = 3) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(1, d, 3, padding=1)
        self.conv = nn.Conv2d(4 * cin * d, cout, k, padding=k // 2)
        self.norm = _in(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pixel_unshuffle(x, 2)  # (B, C, H, W) -> (B, 4C, H/2, W/2)
        b, _, h, w = x.shape
        x = self.conv3d(x.unsqueeze(1))  # (B, 1, 4C, h, w) -> (B, d, 4C, h, w)
        x = x.reshape(b, -1, h, w)  # (B, d, 4C, h, w) -> (B, 4Cd, h, w)
        return F.relu(self.norm(self.conv(x)))


class Unpacking(nn.Module):
    """Table 2 "Conv2D + InstanceNorm + Unpacking": Conv2D to 4 cout / d channels + IN, 3D conv (d filters),
    reshape to 4 cout channels, depth-to-space (r = 2), ReLU."""

    def __init__(self, cin: int, cout: int, d: int = 8, k: int = 3) -> None:
        super().__init__()
        if (4 * cout) % d:
            raise ValueError(f"unpacking to {cout} channels needs 4 * {cout} divisible by d = {d}")
        mid = 4 * cout // d
        self.conv = nn.Conv2d(cin, mid, k, padding=k // 2)
        self.norm = _in(mid)
        self.conv3d = nn.Conv3d(1, d, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        b, _, h, w = x.shape
        x = self.conv3d(x.unsqueeze(1))  # (B, 1, 4cout/d, h, w) -> (B, d, 4cout/d, h, w)
        x = x.reshape(b, -1, h, w)  # -> (B, 4cout, h, w)
        return F.relu(F.pixel_shuffle(x, 2))  # (B, 4cout, h, w) -> (B, cout, 2h, 2w)


class ResBlock(nn.Module):
    """Table 2 layers 7-8 / 13-14: Conv2D + IN + ReLU + Conv2D + IN, with an identity shortcut (UNIT's blocks)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _in(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, c, 3, padding=1), _in(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class Latent(NamedTuple):
    """A reparameterised sample and its Gaussian posterior, each (B, L, h, w)."""

    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor


class PrivateEncoder(nn.Module):
    """Table 2 layers 1-9 of one domain: stem, packings, mid blocks before the last packing."""

    def __init__(self, in_ch: int, cfg: Config) -> None:
        super().__init__()
        chans = [cfg.stem_channels, *cfg.pack_channels]
        layers: list[nn.Module] = [nn.Conv2d(in_ch, cfg.stem_channels, 7, padding=3), nn.LeakyReLU(0.2, True)]
        for i in range(len(cfg.pack_channels)):
            if i == len(cfg.pack_channels) - 1:
                layers += [ResBlock(chans[i]) for _ in range(cfg.mid_blocks)]
            layers.append(Packing(chans[i], chans[i + 1], cfg.pack_d))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class SharedEncoder(nn.Module):
    """Table 2 layer 10 (Conv2D + BatchNorm, ReLU) and the mu / logvar 1x1 convolutions: one object, both domains."""

    def __init__(self, cin: int, latent: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, latent, 3, padding=1), nn.BatchNorm2d(latent), nn.ReLU(inplace=True))
        self.mu = nn.Conv2d(latent, latent, 1)
        self.logvar = nn.Conv2d(latent, latent, 1)

    def forward(self, h: torch.Tensor) -> Latent:
        h = self.conv(h)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10.0, 10.0)
        # reparameterisation (Kingma & Welling 2014); in a distributed step the rows of a global-batch draw
        z = mu + torch.exp(0.5 * logvar) * distributed.shard().randn_like(mu)
        return Latent(z, mu, logvar)


class Encoder(nn.Module):
    """E_i = private layers of domain i, then the shared encoder (the same module object in E_R and E_S)."""

    def __init__(self, private: PrivateEncoder, shared: SharedEncoder) -> None:
        super().__init__()
        self.private = private
        self.shared = shared

    def forward(self, x: torch.Tensor) -> Latent:
        """(B, C, H, W) in [-1, 1] -> Latent of (B, L, H / 2^P, W / 2^P)."""
        out: Latent = self.shared(self.private(x))
        return out


class SharedDecoder(nn.Module):
    """Table 2 layer 11: ConvTranspose2D + BatchNorm (+ ReLU), latent -> last packing width; with
    `shared_decoder_weights: 3` also layer 12 (Conv2D + InstanceNorm + Unpacking: two more weight tensors)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        cout = cfg.pack_channels[-1]
        layers: list[nn.Module] = [nn.ConvTranspose2d(cfg.latent_channels, cout, 3, 1, 1), nn.BatchNorm2d(cout),
                                   nn.ReLU(inplace=True)]
        if cfg.shared_decoder_weights == 3:
            chans = [cfg.stem_channels, *cfg.pack_channels][::-1]
            layers.append(Unpacking(chans[0], chans[1], cfg.pack_d))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(z)
        return out


class PrivateDecoder(nn.Module):
    """Table 2 layers 12-20: unpackings (mid blocks after the first), ConvTranspose2D k7 (+ tanh)."""

    def __init__(self, out_ch: int, cfg: Config, tanh: bool) -> None:
        super().__init__()
        chans = [cfg.stem_channels, *cfg.pack_channels][::-1]  # e.g. [250, 200, 128, 100, 88, 76, 64]
        layers: list[nn.Module] = []
        for i in range(len(cfg.pack_channels)):
            if i > 0 or cfg.shared_decoder_weights == 1:  # layer 12 belongs to the shared decoder otherwise
                layers.append(Unpacking(chans[i], chans[i + 1], cfg.pack_d))
            if i == 0:
                layers += [ResBlock(chans[1]) for _ in range(cfg.mid_blocks)]
        layers.append(nn.ConvTranspose2d(cfg.stem_channels, out_ch, 7, 1, 3))
        if tanh:
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(h)
        return out


class Decoder(nn.Module):
    """G_i = the shared decoder layer (shared between G_R and G_S; a head has its own), then private layers."""

    def __init__(self, shared: SharedDecoder, private: PrivateDecoder) -> None:
        super().__init__()
        self.shared = shared
        self.private = private

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, h, w) latent -> (B, out, h * 2^P, w * 2^P)."""
        out: torch.Tensor = self.private(self.shared(z))
        return out


class TwinVAE(nn.Module):
    """E_R, E_S, G_R, G_S with the last encoder layers and first decoder layer shared (Section 3.1-3.2)."""

    def __init__(self, channels: int, cfg: Config) -> None:
        super().__init__()
        shared_enc = SharedEncoder(cfg.pack_channels[-1], cfg.latent_channels)
        shared_dec = SharedDecoder(cfg)
        self.enc_r = Encoder(PrivateEncoder(channels, cfg), shared_enc)
        self.enc_s = Encoder(PrivateEncoder(channels, cfg), shared_enc)
        self.dec_r = Decoder(shared_dec, PrivateDecoder(channels, cfg, tanh=True))
        self.dec_s = Decoder(shared_dec, PrivateDecoder(channels, cfg, tanh=True))
        gaussian_init(self, cfg.init_std)
        init_logvar(shared_enc, cfg.logvar_bias_init)


class Heads(nn.Module):
    """Auxiliary decoders: G_D (1 channel, tanh: normalised depth) and G_I (K segmentation logits, no tanh)."""

    def __init__(self, num_classes: int, cfg: Config) -> None:
        super().__init__()
        self.depth = Decoder(SharedDecoder(cfg), PrivateDecoder(1, cfg, tanh=True))
        self.seg = Decoder(SharedDecoder(cfg), PrivateDecoder(num_classes, cfg, tanh=False))
        gaussian_init(self, cfg.init_std)


def gaussian_init(module: nn.Module, std: float) -> None:
    """Section 3.2 "Gaussian weight initialization": conv weights N(0, std), norm scales N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def init_logvar(shared: SharedEncoder, bias: float) -> None:
    """Start the posterior with variance exp(bias): with N(0, 0.02) weights mu is ~0.1 at init, and unit noise
    (bias 0) would hide it from the decoders and heads for the first hundreds of steps (paper 3's custom
    log-variance init, Table 3, does the same for its VAEs)."""
    with torch.no_grad():
        bias_param = shared.logvar.bias
        assert bias_param is not None  # nn.Conv2d/Linear built with bias=True
        bias_param.fill_(bias)


# -- losses --------------------------------------------------------------------------------------------------
def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """d_KL(N(mu, exp(logvar)) || N(0, I)) of Eq. 1-3 and 11-12, mean per latent element (batch included)."""
    return 0.5 * torch.mean(mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())


def gaussian_nll(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """E[-log p(x|z)] of Eq. 2-3 / 11-12 for a unit-variance Gaussian decoder, per pixel, constant dropped."""
    return 0.5 * F.mse_loss(recon.float(), x.float())


def mmd(x: torch.Tensor, y: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Eq. 6-7 / 13-14: E k(x, x~) - 2 E k(x~, y~) + E k(y, y~), k = exp(-||a - b||^2 / (2 sigma2)).

    x, y: (B, ...) samples, flattened per row. As the paper says ("a = a~, z = z~"), each expectation re-uses
    the same sample: the biased V-statistic, diagonal terms included (>= 0, 0 iff the samples coincide).
    """
    x = x.float().flatten(1)
    y = y.float().flatten(1)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * sigma2))

    return k(x, x).mean() - 2.0 * k(x, y).mean() + k(y, y).mean()


def mmd_prior(z: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Eq. 6-7: MMD between encoded z and a same-sized sample of the N(0, I) prior."""
    return mmd(torch.randn_like(z, dtype=torch.float32), z, sigma2)


def global_mmd(x: torch.Tensor, y: torch.Tensor, sigma2: float) -> torch.Tensor:
    """mmd over the global batch: in a distributed step both samples are gathered from every rank (with gradients);
    the kernel means couple every pair of samples, so per-rank MMDs would estimate another quantity."""
    shard = distributed.shard()
    return mmd(shard.gather(x), shard.gather(y), sigma2)


def global_mmd_prior(z: torch.Tensor, sigma2: float) -> torch.Tensor:
    """mmd_prior over the global batch (the prior sample drawn at the global shape, as one process draws it)."""
    return mmd_prior(distributed.shard().gather(z), sigma2)


def depth_loss(pred_n: torch.Tensor, depth_m: torch.Tensor, depth_max: float) -> torch.Tensor:
    """Eq. 15-16: MSE between predicted and true normalised depth (2 d / depth_max - 1) over valid pixels (d > 0)."""
    valid = depth_m > 0
    target = 2.0 * depth_m.clamp(0, depth_max) / depth_max - 1.0
    err = (pred_n.float().squeeze(1) - target) ** 2
    return distributed.shard().ratio((err * valid).sum(), valid.sum())  # over the global batch's valid pixels


def median_frequency_weights(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Median frequency balancing (Eigen & Fergus 2015): w_c = median_c'(f_c') / f_c over the classes present in
    the labelled training masks (f_c = pixel share of class c, 255 ignored); absent classes get weight 0."""
    counts = np.zeros(num_classes, np.float64)
    for i in range(0, len(masks), 256):  # chunks: memory-mapped masks stay out of RAM
        m = np.asarray(masks[i : i + 256]).ravel()
        counts += np.bincount(m[m != IGNORE].astype(np.int64), minlength=num_classes)[:num_classes]
    freq = counts / max(counts.sum(), 1.0)
    present = freq > 0
    if not present.any():
        return np.ones(num_classes, np.float32)
    w = np.zeros(num_classes)
    w[present] = np.median(freq[present]) / freq[present]
    return w.astype(np.float32)


def seg_loss(logits: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 18-19: pixel-wise cross-entropy of the K logits against class ids (mean over labelled pixels).

    A batch without any labelled pixel (e.g. KITTI depth frames, whose masks are all 255) gives 0, not NaN
    (F.cross_entropy's mean is 0/0 there), like depth_loss on a batch without valid depth.
    """
    ce = F.cross_entropy(logits.float(), masks, weight=weight, ignore_index=IGNORE, reduction="sum")
    return distributed.shard().ratio(ce, (masks != IGNORE).sum())  # over the global batch's labelled pixels


# -- exported models -----------------------------------------------------------------------------------------
class Translator(nn.Module):
    """Exported stage-1 model: sim -> real cross-decoding G_R(E_S(x)), [0, 1] images in and out.

    Exported models use the posterior mean whatever `inference_sample` says: a deterministic, traceable model for
    deployment (the evaluate stage samples as the paper does)."""

    def __init__(self, twin: TwinVAE) -> None:
        super().__init__()
        self.twin = twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = (self.twin.dec_r(self.twin.enc_s(x * 2 - 1).mu) + 1) / 2
        return out


class DensePredictor(nn.Module):
    """Exported heads model: (B, C, H, W) in [0, 1] -> (B, 1 + K, H, W): channel 0 depth (m), then K class logits."""

    def __init__(self, encoder: Encoder, heads: Heads, depth_max: float) -> None:
        super().__init__()
        self.encoder, self.heads, self.depth_max = encoder, heads, depth_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.encoder(x * 2 - 1).mu
        depth = (self.heads.depth(mu) + 1) / 2 * self.depth_max
        return torch.cat([depth, self.heads.seg(mu)], 1)  # (B, 1, H, W) + (B, K, H, W) -> (B, 1 + K, H, W)


# -- batches -------------------------------------------------------------------------------------------------
class TwinBatch(NamedTuple):
    """One step's data. Fields 0 and 1 are (images, labels) like other methods' batches (sample grids)."""

    images: np.ndarray  # (B, H, W, C) uint8: sim images (stages vae/heads) or the supervised domain's
    labels: np.ndarray  # (B,) int64 object classes (only for the preview grid)
    depth: np.ndarray  # (B, H, W) float32 metres (0 = invalid)
    masks: np.ndarray  # (B, H, W) uint8 class ids
    real: np.ndarray  # (B, H, W, C) uint8 unpaired real images, drawn independently ((0, ...) when supervised)


@register(Config, capabilities_for=lambda cfg: {"vae": {"encode", "translate"}, "supervised": {"encode", "predict"},
                                                "heads": {"encode", "translate", "predict"}}[cfg.stage])
class Method(BaseMethod[Config]):
    """Twin VAE (stage vae), its depth/segmentation heads (stage heads) and the supervised baselines."""

    name = "twinvae"
    paper = "twin-vae-depth-segmentation"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"encode", "translate", "predict"})
    evaluator: ClassVar[str] = "depth_segmentation"

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        spec = data.spec
        # sim (a) -> real (b), as the refine stage expects; b is the target the evaluator scores
        self.domain_a, self.domain_b = translation_domains(self, cfg.domain_a, "")
        if self.domain_a == self.domain_b:
            raise ConfigError(f"key 'domain_a': {self.domain_a!r} is the target domain the twin VAE adapts to; name "
                              f"another labelled domain of {data.root} (or '' for its source, {spec.source!r})")
        needs_labels = cfg.stage != "vae"
        if needs_labels and not (spec.has_depth and spec.has_mask and spec.seg_classes):
            raise DataError(f"{data.root}: stage {cfg.stage!r} needs depth and segmentation masks with seg_classes "
                            f"in benchmark.yaml (has_depth={spec.has_depth}, has_mask={spec.has_mask})")
        self.seg_classes = list(spec.seg_classes)
        self.sim = data.get(self.domain_a, "train")
        self.real = data.get(self.domain_b, "train")
        if cfg.stage == "supervised":
            dom = self.domain_a if cfg.supervised_domain == "source" else self.domain_b
            if not spec.domain(dom).labelled:
                raise DataError(f"{data.root}: domain {dom!r} is declared unlabelled; it cannot supervise the baseline")
            self.sup = data.get(dom, "train")
            self._check_dense(self.sup, dom)
        elif needs_labels:
            self._check_dense(self.sim, self.domain_a)
        self.sim_val = self._val(self.domain_a)
        self.real_val = self._val(self.domain_b)
        size, channels = int(self.sim.images.shape[1]), int(self.sim.images.shape[-1])
        factor = 2 ** len(cfg.pack_channels)
        if size % factor or int(self.sim.images.shape[2]) % factor:
            raise ConfigError(f"key 'pack_channels': {len(cfg.pack_channels)} packing layers need an image size "
                              f"divisible by {factor}; {data.root} has {size}px images")
        self.batch_size = cfg.batch_size
        self.sigma2 = cfg.mmd_sigma2_per_dim * cfg.latent_channels * (size // factor) ** 2
        self.pools = {"sim": self.sampler_part("sim", IndexPool(np.arange(len(self.sim)))),
                      "real": self.sampler_part("real", IndexPool(np.arange(len(self.real))))}
        self.twin: TwinVAE | None = None
        self.encoder: Encoder | None = None  # supervised baselines: one encoder, no twin
        self.heads: Heads | None = None
        if cfg.stage == "supervised":
            self.encoder = Encoder(PrivateEncoder(channels, cfg), SharedEncoder(cfg.pack_channels[-1],
                                                                                 cfg.latent_channels))
            gaussian_init(self.encoder, cfg.init_std)
            init_logvar(self.encoder.shared, cfg.logvar_bias_init)
            self.pools["sup"] = self.sampler_part("sup", IndexPool(np.arange(len(self.sup))))
        else:
            self.twin = TwinVAE(channels, cfg)
        if cfg.stage != "vae":
            self.heads = Heads(len(self.seg_classes), cfg)
        self.initialised = cfg.stage != "heads"  # stage 2 needs stage 1's weights (init_from)
        self.seg_weight: torch.Tensor | None = None  # class weights of the CE (seg_weighting), from the train masks
        if cfg.seg_weighting == "median_frequency" and cfg.stage != "vae":
            labelled = self.sup if cfg.stage == "supervised" else self.sim
            assert labelled.masks is not None  # checked above (_check_dense)
            self.seg_weight = torch.from_numpy(median_frequency_weights(labelled.masks, len(self.seg_classes)))
        self.init_info: dict[str, str] = {}

    def trained_tasks(self) -> list[str]:
        """The tasks whose heads this model trained (stage vae: none; a zero loss weight leaves a head untrained)."""
        if self.cfg.stage == "vae":
            return []
        return [t for t, w in (("depth", self.cfg.w_depth), ("segmentation", self.cfg.w_seg)) if w > 0]

    def _val(self, domain: str) -> PreparedSplit:
        return self.data.get(domain, "val" if self.data.has(domain, "val") else "train")

    @staticmethod
    def _check_dense(part: PreparedSplit, domain: str) -> None:
        if part.depth is None or part.masks is None:
            raise DataError(f"domain {domain!r} has no prepared depth/masks to train the heads on")

    # -- stage 2 start ---------------------------------------------------------------------------------------
    def init_from(self, model_dir: Path) -> dict[str, str]:
        """Load a trained stage-1 twin VAE (`<model_dir>/model.pt`) into this stage-2 model."""
        from s2r.methods import registry

        if self.cfg.stage != "heads":
            raise ConfigError(f"--init: stage {self.cfg.stage!r} trains from scratch; only stage 'heads' starts "
                              "from a trained twin VAE")
        path = Path(model_dir) / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--init {model_dir}: no model.pt; run `s2r train twinvae` first")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if registry.resolve(saved.get("method", "")) != __name__ or saved["config"].get("stage") != "vae":
            raise DataError(f"--init {path}: holds {saved.get('method')!r} (stage {saved['config'].get('stage')!r}), "
                            "not a stage-1 twin VAE (stage 'vae')")
        mine = asdict(self.cfg)
        diff = [k for k in INIT_KEYS if saved["config"].get(k) != mine[k]]
        if diff:
            was = {k: saved["config"].get(k) for k in diff}
            now = {k: mine[k] for k in diff}
            raise ConfigError(f"--init {path}: keys {diff} differ from methods.{self.name} "
                              f"({was} vs {now})")
        state = {k[len("twin."):]: v for k, v in saved["state"].items() if k.startswith("twin.")}
        assert self.twin is not None
        self.twin.load_state_dict(state)
        self.initialised = True
        self.init_info = {"init_model": str(model_dir), "init_run_id": str(saved.get("mlflow_run_id", "")),
                          "init_data_version": str(saved.get("data_version", ""))}
        return self.init_info

    def setup(self, device: torch.device, amp_dtype: torch.dtype | None, total_steps: int) -> None:
        if not self.initialised:
            raise ConfigError(f"methods.{self.name}: stage 'heads' starts from a trained stage-1 twin VAE; pass "
                              "--init data/models/twinvae (s2r train ... --init DIR)")
        super().setup(device, amp_dtype, total_steps)

    # -- optimisation ----------------------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        c = self.cfg
        if c.stage == "vae":
            assert self.twin is not None
            return list(self.twin.parameters())
        assert self.heads is not None
        if c.stage == "supervised":
            assert self.encoder is not None
            return [*self.encoder.parameters(), *self.heads.parameters()]
        assert self.twin is not None
        if not c.train_vae_in_heads:
            self.twin.requires_grad_(False)
            return list(self.heads.parameters())
        return [*self.twin.parameters(), *self.heads.parameters()]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        return {"net": torch.optim.Adam(self.trainable(), lr=c.lr, betas=(c.beta1, c.beta2))}

    def distributed_networks(self) -> list[nn.Module]:
        """Disjoint modules the steps call: each private part, and the shared encoder / decoder once (one DDP
        wrapper serves both domains, s2r.distributed), the baseline's encoder, each head."""
        out: list[nn.Module] = []
        if self.twin is not None:
            t = self.twin
            out += [t.enc_r.private, t.enc_s.private, t.enc_r.shared, t.dec_r.private, t.dec_s.private, t.dec_r.shared]
        if self.encoder is not None:
            out.append(self.encoder)
        if self.heads is not None:
            out += [self.heads.depth, self.heads.seg]
        return out

    def batches(self) -> Iterator[TwinBatch]:
        """Endless batches; sim and real indices are drawn independently (unpaired, Section 3.2)."""
        b = self.cfg.batch_size
        empty = np.zeros((0, *self.real.images.shape[1:]), np.uint8)
        while True:
            if self.cfg.stage == "supervised":
                i = np.sort(self.pools["sup"].draw(b, self.rng))
                part = self.sup
                yield TwinBatch(part.images[i], part.labels[i], _arr(part.depth, i), _arr(part.masks, i), empty)
                continue
            si = np.sort(self.pools["sim"].draw(b, self.rng))
            ri = np.sort(self.pools["real"].draw(b, self.rng))
            s = self.sim
            yield TwinBatch(s.images[si], s.labels[si], _arr(s.depth, si), _arr(s.masks, si), self.real.images[ri])

    def _t(self, images: np.ndarray) -> torch.Tensor:
        return to_float(images, self.device) * 2 - 1  # [0, 1] -> [-1, 1]

    def vae_losses(self, x_r: torch.Tensor, x_s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage 1 (Eq. 2-9): every term, each a scalar tensor, and the weighted total (Eq. 10, all 8 terms)."""
        c, t = self.cfg, self.twin
        assert t is not None
        with self.autocast():
            lr_, ls = t.enc_r(x_r), t.enc_s(x_s)
            rec_r, rec_s = t.dec_r(lr_.z), t.dec_s(ls.z)  # within-domain reconstructions (Fig. 2c)
            cross_s, cross_r = t.dec_s(lr_.z), t.dec_r(ls.z)  # real -> sim, sim -> real
            cyc_r = t.dec_r(t.enc_s(cross_s).z)  # G_R(E_S(G_S(E_R(x_R)))) (Eq. 8, Fig. 2a)
            cyc_s = t.dec_s(t.enc_r(cross_r).z)  # G_S(E_R(G_R(E_S(x_S)))) (Eq. 9, Fig. 2b)
        out = {
            "kl_r": kl_normal(lr_.mu, lr_.logvar), "kl_s": kl_normal(ls.mu, ls.logvar),  # Eq. 2-3, KL part
            "nll_r": gaussian_nll(rec_r, x_r), "nll_s": gaussian_nll(rec_s, x_s),  # Eq. 2-3, likelihood part
            "mse_r": F.mse_loss(rec_r.float(), x_r), "mse_s": F.mse_loss(rec_s.float(), x_s),  # Eq. 4-5
            "mmd_r": global_mmd_prior(lr_.z, self.sigma2), "mmd_s": global_mmd_prior(ls.z, self.sigma2),  # Eq. 6-7
            "cycle_r": F.l1_loss(cyc_r.float(), x_r), "cycle_s": F.l1_loss(cyc_s.float(), x_s),  # Eq. 8-9
        }
        out["loss"] = (c.w_kl * (out["kl_r"] + out["nll_r"] + out["kl_s"] + out["nll_s"])
                       + c.w_mse * (out["mse_r"] + out["mse_s"]) + c.w_mmd * (out["mmd_r"] + out["mmd_s"])
                       + c.w_cycle * (out["cycle_r"] + out["cycle_s"]))
        return out

    def head_losses(self, x_s: torch.Tensor, x_r: torch.Tensor, depth: torch.Tensor,
                    masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage 2 (Eq. 11-20): KL, MMD, depth MSE and segmentation CE from z_S and z'_R = E_R(G_R(z_S))."""
        c, t, h = self.cfg, self.twin, self.heads
        assert t is not None and h is not None
        with self.autocast():
            ls = t.enc_s(x_s)
            x_r2 = t.dec_r(ls.z).detach()  # x'_R = G_R(z_S): sim translated to real, an input here
            lr2 = t.enc_r(x_r2)  # z'_R
            lr_ = t.enc_r(x_r)  # unpaired real images
            ls2 = t.enc_s(t.dec_s(lr_.z).detach())  # z'_S = E_S(G_S(z_R))
            rec_r2, rec_s = t.dec_r(lr2.z), t.dec_s(ls.z)
            d_s, d_r2 = h.depth(ls.z), h.depth(lr2.z)
            g_s, g_r2 = h.seg(ls.z), h.seg(lr2.z)
        out = {
            "kl_r2d": kl_normal(lr2.mu, lr2.logvar) + gaussian_nll(rec_r2, x_r2),  # Eq. 11
            "kl_s2d": kl_normal(ls.mu, ls.logvar) + gaussian_nll(rec_s, x_s),  # Eq. 12
            "mmd_s2r": global_mmd(ls.z, lr2.z, self.sigma2),  # Eq. 13
            "mmd_r2s": global_mmd(ls2.z, lr_.z, self.sigma2),  # Eq. 14
            "depth_s": depth_loss(d_s, depth, c.depth_max),  # Eq. 15: G_D(E_S(x_S))
            "depth_r": depth_loss(d_r2, depth, c.depth_max),  # Eq. 16: G_D(E_R(x'_R))
            "seg_s": seg_loss(g_s, masks, self._seg_weight()),  # Eq. 18
            "seg_r": seg_loss(g_r2, masks, self._seg_weight()),  # Eq. 19
        }
        out["loss"] = (c.w_kl2 * (out["kl_r2d"] + out["kl_s2d"]) + c.w_mmd2 * (out["mmd_s2r"] + out["mmd_r2s"])
                       + c.w_depth * (out["depth_s"] + out["depth_r"]) + c.w_seg * (out["seg_s"] + out["seg_r"]))
        return out

    def _seg_weight(self) -> torch.Tensor | None:
        if self.seg_weight is not None and self.seg_weight.device != self.device:
            self.seg_weight = self.seg_weight.to(self.device)
        return self.seg_weight

    def supervised_losses(self, x: torch.Tensor, depth: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Baselines: the same encoder (KL as Eq. 12, no decoder) and heads on one domain's labels."""
        c, e, h = self.cfg, self.encoder, self.heads
        assert e is not None and h is not None
        with self.autocast():
            lat = e(x)
            d, g = h.depth(lat.z), h.seg(lat.z)
        out = {"kl": kl_normal(lat.mu, lat.logvar), "depth": depth_loss(d, depth, c.depth_max),
               "seg": seg_loss(g, masks, self._seg_weight())}
        out["loss"] = c.w_kl2 * out["kl"] + c.w_depth * out["depth"] + c.w_seg * out["seg"]
        return out

    def losses(self, batch: TwinBatch) -> dict[str, torch.Tensor]:
        """The loss terms of this stage for one batch."""
        x = self._t(batch.images)
        if self.cfg.stage == "vae":
            return self.vae_losses(self._t(batch.real), x)
        depth = to_device(np.ascontiguousarray(batch.depth, np.float32), self.device)
        masks = to_device(np.ascontiguousarray(batch.masks), self.device).long()
        if self.cfg.stage == "heads":
            return self.head_losses(x, self._t(batch.real), depth, masks)
        return self.supervised_losses(x, depth, masks)

    def train_step(self, batch: TwinBatch) -> dict[str, torch.Tensor]:
        out = self.losses(batch)
        self.optimize(out["loss"], "net")
        return {k: v.detach() for k, v in out.items()}  # on the device: the loop syncs when it logs

    # -- capabilities ----------------------------------------------------------------------------------------
    def _latent(self, enc: Encoder, x: torch.Tensor) -> torch.Tensor:
        lat = enc(x)
        out: torch.Tensor = lat.z if self.cfg.inference_sample else lat.mu
        return out

    def _predict_encoder(self) -> Encoder:
        """The encoder that reads target (real) images: E_R for the twin, the baseline's own encoder otherwise."""
        if self.encoder is not None:
            return self.encoder
        assert self.twin is not None
        return self.twin.enc_r

    @torch.no_grad()
    def _batched(self, images: np.ndarray, fn: Any, batch_size: int) -> list[torch.Tensor]:
        """fn over batches in eval mode; with `inference_sample` the posterior samples come from a generator
        seeded by the model's seed, so the same call gives the same output and the global RNG is untouched."""
        was = self.training
        self.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                out = []
                for i in range(0, len(images), batch_size):
                    with self.autocast():
                        out.append(fn(self._t(images[i : i + batch_size])).float().cpu())
                return out
        finally:
            self.train(was)

    def encode(self, images: np.ndarray, domain: str = "real", batch_size: int = 128) -> np.ndarray:
        """uint8 (N, H, W, C) -> (N, D) flattened latent (posterior mean) from the real or sim encoder."""
        if self.twin is None:
            enc = self._predict_encoder()
        else:
            enc = {"real": self.twin.enc_r, "sim": self.twin.enc_s}.get(domain)  # type: ignore[assignment]
            if enc is None:
                raise ValueError(f"domain must be 'real' or 'sim', got {domain!r}")
        return torch.cat(self._batched(images, lambda x: self._latent(enc, x).flatten(1), batch_size)).numpy()

    def translate(self, images: np.ndarray, direction: str = "a2b", batch_size: int = 128) -> np.ndarray:
        """Cross-decoding, uint8 (N, H, W, C) -> uint8: a2b = sim -> real G_R(E_S(x)), b2a = real -> sim."""
        if self.twin is None:
            raise DataError(f"method {self.name!r} (stage 'supervised') has no twin VAE to translate with")
        t = self.twin
        pair = {"a2b": (t.enc_s, t.dec_r), "b2a": (t.enc_r, t.dec_s)}.get(direction)
        if pair is None:
            raise ValueError(f"direction must be 'a2b' or 'b2a', got {direction!r}")
        enc, dec = pair
        ys = self._batched(images, lambda x: dec(self._latent(enc, x)), batch_size)
        y = ((torch.cat(ys) + 1) / 2).clamp(0, 1)
        return to_uint8(y)

    def predict(self, images: np.ndarray, batch_size: int = 64, domain: str = "real") -> dict[str, np.ndarray]:
        """Images of `domain` -> {"depth": (N, H, W) float32 metres, "mask": (N, H, W) int64 class ids}.

        domain "real" (the evaluated target images) reads them with E_R, "sim" with E_S (the twin's sim encoder;
        a baseline has one encoder for both)."""
        if self.heads is None:
            raise DataError(f"method {self.name!r} (stage 'vae') has no depth/segmentation heads; train "
                            "twinvae_heads (stage 'heads') on it")
        if domain not in ("real", "sim"):
            raise ValueError(f"domain must be 'real' or 'sim', got {domain!r}")
        enc = self.twin.enc_s if domain == "sim" and self.twin is not None else self._predict_encoder()
        h, dmax = self.heads, self.cfg.depth_max

        def fn(x: torch.Tensor) -> torch.Tensor:
            z = self._latent(enc, x)
            depth = (h.depth(z).float() + 1) / 2 * dmax
            return torch.cat([depth, h.seg(z).argmax(1, keepdim=True).float()], 1)  # (B, 2, H, W)

        out = torch.cat(self._batched(images, fn, batch_size))
        return {"depth": out[:, 0].numpy().astype(np.float32), "mask": out[:, 1].numpy().astype(np.int64)}

    def validate(self) -> dict[str, float]:
        """Per-epoch monitoring on fixed val subsets (never used to pick models for the tables).

        Heads / baselines: `val_sim_*` = the sim encoder E_S on sim val images (the supervised path the heads are
        trained on), `val_real_*` = the real encoder E_R on real val images (the evaluated path)."""
        n = self.cfg.val_images
        sv, rv = self.sim_val, self.real_val
        si, ri = spread(len(sv), n), spread(len(rv), n)
        if self.cfg.stage == "vae":
            zs = torch.from_numpy(self.encode(sv.images[si], "sim"))
            zr = torch.from_numpy(self.encode(rv.images[ri], "real"))
            rec_r = self.translate(self.translate(rv.images[ri], "b2a"), "a2b")  # real -> sim -> real
            return {
                "val_mmd_latent": float(mmd(zs, zr, self.sigma2)),  # sim vs real latent gap (lower = aligned)
                "val_cycle_r": float(np.abs(rec_r.astype(np.float32) - rv.images[ri]).mean() / 255.0),
            }
        from s2r.evaluators.depth import depth_metrics, valid_mask
        from s2r.evaluators.segmentation import segmentation_metrics

        out: dict[str, float] = {}
        for tag, part, idx in (("sim", sv, si), ("real", rv, ri)):
            if part.depth is None or part.masks is None:
                continue
            p = self.predict(part.images[idx], domain=tag)
            truth_d, truth_m = np.asarray(part.depth[idx]), np.asarray(part.masks[idx])
            if valid_mask(truth_d).any():  # sparse / absent labels (KITTI depth frames have no mask and vice versa)
                out[f"val_{tag}_abs_rel"] = depth_metrics(p["depth"], truth_d)["abs_rel"]
            if (truth_m != IGNORE).any():
                sm = segmentation_metrics(truth_m, p["mask"], self.seg_classes, ignore_index=IGNORE)
                out[f"val_{tag}_miou"] = sm["miou"]
        return out

    def health_signals(self) -> dict[str, float]:
        """s2r.health: single-class masks of the heads on real val images; stage vae: active latent channels."""
        from s2r import health

        rv = self.real_val
        ri = spread(len(rv), self.cfg.val_images)
        if self.heads is None:
            lat = self._predict_encoder()(self._t(rv.images[ri]))
            return health.active_units(lat.mu.float().cpu(), lat.logvar.float().cpu())
        truth = None if rv.masks is None else np.asarray(rv.masks[ri])
        return health.class_usage(self.predict(rv.images[ri])["mask"], len(self.seg_classes), truth, IGNORE)

    def health_checks(self) -> list[Any]:
        from s2r import health

        if self.heads is None:
            return [health.Check(health.PREFIX + "active_units", "<", 1,
                                 "posterior collapse: no active latent channel (KL > 0.01 nats) on real val")]
        return [health.single_class_check("segmentation masks")]

    def example_input(self) -> np.ndarray:
        return to_float(self.real_val.images[:2], torch.device("cpu")).numpy()

    def export_model(self) -> nn.Module:
        """Stage vae: the sim -> real translator; heads / baselines: depth + segmentation on target images."""
        if self.heads is None:
            assert self.twin is not None
            return Translator(self.twin)
        return DensePredictor(self._predict_encoder(), self.heads, self.cfg.depth_max)



def _arr(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    if a is None:
        return np.zeros((len(idx), 0, 0), np.float32)
    return np.asarray(a[idx])
