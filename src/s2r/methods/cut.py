"""CUT (Contrastive Unpaired Translation) trained on random patches (paper 5, Imbusch et al., "Synthetic-to-Real
Domain Adaptation using Contrastive Unpaired Translation").

Park et al. 2020 (CUT) as summarised in Section III-B, with the paper's patch-based training (Section III-C):

  L = L_GAN(G, D, X, Y) + lambda_NCE * (L_PatchNCE(G, H, X) + L_PatchNCE(G, H, Y))          (Eq. 2)

The paper ran the official CUT code, which computes (models/cut_model.py, compute_G_loss / calculate_NCE_loss)

  L = L_GAN + 0.5 * lambda_NCE * (L_PatchNCE(G, H, X) + L_PatchNCE(G, H, Y))

so its lambda_NCE values (1, 2, 5, 7) mean this form: `nce_reduce: mean` (the default). `nce_reduce: sum` is
Eq. 2 as printed (twice the NCE weight at the same lambda_NCE).

- G: CUT's ResnetGenerator (c7s1-w, d2w, d4w; residual blocks; u2w, uw, c7s1-C), built by
  `s2r.methods.cyclegan.Generator` (one implementation for both papers) with CUT's settings: instance norm
  without affine parameters, xavier_normal(gain 0.02) init, and with `antialias: true` CUT's default blur-pool
  down/up-sampling (Zhang 2019). D: CUT's basic PatchGAN (NLayerDiscriminator): `disc_channels[:-1]` stride-2
  4x4 convs, a stride-1 4x4 conv of `disc_channels[-1]`, a stride-1 4x4 output conv; CUT's basic D is
  [64, 128, 256, 512] (2,764,737 parameters, 70 px receptive field without blur-pooling). L_GAN: least-squares
  GAN (CUT's default `gan_mode=lsgan`). `build_networks` pins CUT's parameter counts at CUT's widths.
- PatchNCE (CUT Eq. 2-3): features of `nce_layers` of G's encoder for the source patch x and for G(x), each
  through a small MLP head H_l (Linear-ReLU-Linear, `nce_mlp_dim` = 256) and L2-normalised; at `num_patches`
  (256) random locations, the SAME locations in x and G(x); for each output patch the positive is the input
  feature at the same location and the negatives are the other sampled locations of the same image; logits =
  cosine similarity / `nce_temperature` (0.07), cross-entropy with the positive as the class. Averaged over
  patches and layers. The identity term L_PatchNCE(G, H, Y) applies the same loss to target images y and G(y).
- Layers: CUT's `nce_layers=0,4,8,12,16` index its (anti-aliased) generator's nn.Sequential: the padded input,
  the two downsampling convs (before their blur-pool), residual blocks 1 and 5. With `antialias: true` our
  cyclegan.Generator.net has CUT's layout, so the indices are CUT's. Without blur-pooling (the CPU default,
  where the stride-1 full-resolution convs make G about 1.7x slower) the same layers are 0, 4, 7, 10 and 14; with the
  CPU default of 3 residual blocks the last one is 12 (the third block).
- Heads are created in `__init__` (CUT creates them lazily on the first batch) so that the optimiser exists
  before any checkpoint is restored and resume is exact.
- `nce_reduce`: `mean` (CUT's code, default: 0.5 * (X + Y) with the identity term, X alone without) or `sum`
  (Eq. 2 as printed).

Patch training (Section III-C): each step draws `batch_size` (paper 40) source and target images independently
(unpaired) and crops one random `patch_size` x `patch_size` patch from each, without flips. CUT works on sizes
that are multiples of 4; other sizes are rescaled to the nearest multiple of 4 with bicubic interpolation, as
the paper says (CUT's `__make_power_2(base=4)` rounding). `patch_size: 0` trains on full images. Inference runs
the fully convolutional generator on full-resolution images (any H, W: the generator pads to a multiple of 4).
The paper's 60-160 px patches on 640x480 images scale to 8-21 px on the 64 px scenes benchmark (x 64/480).

Optimisation (CUT defaults): Adam lr 2e-4, betas (0.5, 0.999) for G, D and the heads; constant lr, then linear
decay to 0 over the last (1 - decay_start) of all steps (CUT: 200 + 200 epochs). `ema_decay` > 0 keeps an
exponential moving average of G's weights that `translate` (the refine stage) and the exported model use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from s2r.config import ConfigError, Schema
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, PreparedSplit
from s2r.methods.base import IndexPool, to_device, to_float
from s2r.methods.base import Method as BaseMethod
from s2r.methods.common import (
    EMA,
    lsgan_d_loss,
    lsgan_g_loss,
    spread,
    stat_gap,
    translate_images,
    translation_domains,
)
from s2r.methods.cyclegan import Discriminator, Generator, Refiner
from s2r.methods.registry import register


def encoder_start(antialias: bool) -> int:
    """Index of the first residual block in cyclegan.Generator.net (0-9: c7s1-w, d2w, d4w; 0-11 anti-aliased)."""
    return 12 if antialias else 10


@dataclass
class Config(Schema):
    """`methods.cut` in params.yaml (variants: `cut_<suffix>`)."""

    domain_a: str  # synthetic side; "" = the benchmark's source domain
    domain_b: str  # real side; "" = the benchmark's target domain
    gen_width: int  # CUT ngf 64
    gen_blocks: int  # CUT 9 residual blocks
    disc_channels: list[int]  # CUT basic D: 64, 128, 256 (s2), 512 (s1)
    antialias: bool  # CUT's blur-pool down/up-sampling in G and D (CUT default; the recipe: true)
    nce_layers: list[int]  # indices into Generator.net
    nce_mlp_dim: int  # CUT netF_nc 256 (CPU-sized)
    num_patches: int  # CUT num_patches 256 (CPU-sized)
    nce_temperature: float  # CUT nce_T
    lambda_nce: float  # Eq. 2 (paper 4 tried 1, 2, 5, 7)
    lambda_gan: float
    nce_idt: bool  # identity PatchNCE on target images, L_PatchNCE(G, H, Y)
    nce_reduce: Literal["sum", "mean"]  # CUT's code (what the paper ran) averages X and Y; Eq. 2 sums
    patch_size: int  # random crop side in px (0 = full image); paper 60-160 px at 640x480 ~ 8-21 px here
    flip: bool  # Section IV-A: no horizontal flips
    lr: float
    beta1: float
    beta2: float
    decay_start: float  # fraction of all steps after which lr decays linearly to 0 (CUT 200 + 200 epochs)
    ema_decay: float  # > 0: translate/export use an EMA of G's weights (e.g. 0.995)
    batch_size: int  # patches per domain per step (paper 40; CPU-sized)
    epochs: int
    steps_per_epoch: int
    downstream: str  # params block of the segmenter the cut_patch objective trains

    def validate(self) -> None:
        if self.gen_width < 1 or self.gen_blocks < 1:
            raise ConfigError("keys 'gen_width' and 'gen_blocks' must be >= 1")
        if len(self.disc_channels) < 2 or any(c < 1 for c in self.disc_channels):
            raise ConfigError(f"key 'disc_channels' must be >= 2 positive widths (stride-2 layers, then CUT's "
                              f"stride-1 layer), got {self.disc_channels}")
        last = encoder_start(self.antialias) + self.gen_blocks - 1
        if not self.nce_layers or any(not 0 <= i <= last for i in self.nce_layers):
            raise ConfigError(f"key 'nce_layers' must be non-empty indices of the encoder 0..{last} (generator "
                              f"layers with gen_blocks={self.gen_blocks}, antialias={self.antialias}), "
                              f"got {self.nce_layers}")
        if self.nce_mlp_dim < 1 or self.num_patches < 1:
            raise ConfigError("keys 'nce_mlp_dim' and 'num_patches' must be >= 1")
        if self.nce_temperature <= 0:
            raise ConfigError(f"key 'nce_temperature' must be > 0, got {self.nce_temperature}")
        if self.lambda_nce < 0 or self.lambda_gan < 0:
            raise ConfigError("keys 'lambda_nce' and 'lambda_gan' must be >= 0")
        if self.nce_reduce not in ("sum", "mean"):
            raise ConfigError(f"key 'nce_reduce' must be 'sum' or 'mean', got {self.nce_reduce!r}")
        if self.patch_size != 0 and self.patch_size < 4:
            raise ConfigError(f"key 'patch_size' must be 0 (full image) or >= 4 px, got {self.patch_size}")
        if self.lr <= 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("key 'lr' must be > 0 and 'beta1', 'beta2' in [0, 1)")
        if not 0.0 <= self.decay_start <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("keys 'decay_start' must be in [0, 1] and 'ema_decay' in [0, 1)")
        if self.batch_size < 1 or self.epochs < 1 or self.steps_per_epoch < 1:
            raise ConfigError("keys 'batch_size', 'epochs' and 'steps_per_epoch' must be >= 1")


# -- PatchNCE ------------------------------------------------------------------------------------------------
def patch_nce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, temperature: float) -> torch.Tensor:
    """CUT Eq. 2-3 for one layer: (B, P, C) queries (output patches) vs keys (input patches), both L2-normalised.

    For query i of image b the positive is key i of image b, the negatives are the other P - 1 keys of the same
    image: loss = mean over (b, i) of -log( exp(q.k+ / T) / sum_j exp(q.k_j / T) ). Keys are detached (CUT).
    """
    b, p, _ = feat_q.shape
    feat_k = feat_k.detach()
    l_pos = (feat_q * feat_k).sum(-1, keepdim=True)  # (B, P, 1)
    l_neg = torch.bmm(feat_q, feat_k.transpose(1, 2))  # (B, P, P): query i vs every key j of the same image
    eye = torch.eye(p, dtype=torch.bool, device=feat_q.device)[None]
    l_neg = l_neg.masked_fill(eye, -10.0)  # the positive is not its own negative (CUT fills the diagonal with -10)
    logits = torch.cat([l_pos, l_neg], dim=2).reshape(b * p, p + 1) / temperature  # (B*P, 1+P)
    target = torch.zeros(b * p, dtype=torch.long, device=feat_q.device)
    return F.cross_entropy(logits.float(), target)


class PatchSampleHeads(nn.Module):
    """H: one MLP (Linear-ReLU-Linear) per NCE layer, and the patch sampler shared by input and output."""

    def __init__(self, in_channels: list[int], dim: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, dim), nn.ReLU(), nn.Linear(dim, dim)) for c in in_channels)
        for m in self.modules():  # CUT init_type=xavier, gain 0.02
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight, gain=0.02)
                nn.init.zeros_(m.bias)

    @staticmethod
    def sample_ids(feats: list[torch.Tensor], num_patches: int, generator: torch.Generator | None = None
                   ) -> list[torch.Tensor]:
        """Random locations per layer (the same for every image of the batch, as CUT): (min(P, H*W),) each."""
        out = []
        for f in feats:
            hw = f.shape[2] * f.shape[3]
            perm = to_device(torch.randperm(hw, generator=generator, device="cpu"), f.device)
            out.append(perm[: min(num_patches, hw)])
        return out

    def forward(self, feats: list[torch.Tensor], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Layer features (B, C, H, W) at `ids` -> L2-normalised projections (B, P, dim)."""
        out = []
        for mlp, f, i in zip(self.mlps, feats, ids):
            x = f.flatten(2).transpose(1, 2)[:, i]  # (B, C, H, W) -> (B, HW, C) -> (B, P, C)
            out.append(F.normalize(mlp(x.float()), dim=-1))
        return out


def encode_layers(gen: Generator, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Features after each of `layers` of gen.net (the encoder part); input padded like Generator.forward."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    feats, last = [], max(layers)
    for i, layer in enumerate(gen.net):
        x = layer(x)
        if i in layers:
            feats.append(x)
        if i == last:
            break
    return feats


def round_to_4(size: int) -> int:
    """CUT's __make_power_2(base=4): int(round(size / 4) * 4), at least 4."""
    return max(4, int(round(size / 4) * 4))


def random_crops(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One random size x size crop per uint8 (B, H, W, C) image (size 0 or H = W = size: the whole image)."""
    n, h, w = images.shape[:3]
    if size <= 0 or (size == h and size == w):
        return np.asarray(images)
    if size > h or size > w:
        raise ConfigError(f"key 'patch_size' ({size}) is larger than the {h}x{w} images")
    ys = rng.integers(0, h - size + 1, n)
    xs = rng.integers(0, w - size + 1, n)
    return np.stack([images[i, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(ys, xs))])


def to_multiple_of_4(x: torch.Tensor) -> torch.Tensor:
    """Section IV-B: patches whose size is not a multiple of 4 are rescaled to one with bicubic interpolation."""
    h, w = x.shape[-2:]
    th, tw = round_to_4(h), round_to_4(w)
    if (th, tw) == (h, w):
        return x
    return F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False).clamp_(-1, 1)


def build_networks(cfg: Config, channels: int) -> tuple[Generator, Discriminator, PatchSampleHeads]:
    """CUT's G (ResnetGenerator), D (NLayerDiscriminator) and F (PatchSampleF) as CUT builds them.

    Instance norm without affine parameters, xavier_normal(gain 0.02) init, D = stride-2 layers then a stride-1
    layer (`disc_channels[-1]`) and a stride-1 output conv; `antialias` adds CUT's blur-pooling to G and D.
    At CUT's widths (ngf = ndf = 64, 9 blocks, netF_nc 256, nce_layers 0,4,8,12,16) the parameter counts are
    CUT's: G 11,378,179, D 2,764,737, F 560,384 (tests/test_cut.py).
    """
    g = Generator(channels, cfg.gen_width, cfg.gen_blocks, antialias=cfg.antialias, affine=False, init="xavier")
    d = Discriminator(channels, cfg.disc_channels, last_stride1=True, antialias=cfg.antialias, affine=False,
                      init="xavier")
    with torch.no_grad():  # channel count of every NCE layer, so the heads exist before the optimiser
        probe = encode_layers(g, torch.zeros(1, channels, 8, 8), sorted(cfg.nce_layers))
    by_layer = dict(zip(sorted(cfg.nce_layers), probe))
    heads = PatchSampleHeads([int(by_layer[i].shape[1]) for i in cfg.nce_layers], cfg.nce_mlp_dim)
    return g, d, heads


def linear_decay_schedulers(optimizers: dict[str, torch.optim.Optimizer], total_steps: int,
                            decay_start: float) -> dict[str, Any]:
    """Constant lr, then linear decay to 0 at the last step (CUT's `linear` policy, in steps)."""
    start = int(round(decay_start * total_steps))

    def factor(step: int) -> float:
        if step <= start or total_steps <= start:
            return 1.0
        return max(0.0, (total_steps - step) / (total_steps - start))

    return {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in optimizers.items()}


# -- method --------------------------------------------------------------------------------------------------
class PatchBatch(NamedTuple):
    """Fields 0 and 1 are (images, labels) like other methods' batches (sample grids)."""

    a: np.ndarray  # (B, p, p, C) uint8 source patches
    a_labels: np.ndarray
    b: np.ndarray  # (B, p, p, C) uint8 target patches (independent images: unpaired)


@register(Config, downstream=lambda cfg: cfg.downstream)
class Method(BaseMethod[Config]):
    """CUT from domain A (synthetic) to B (real) on random patches; translates full images A -> B."""

    name = "cut"
    paper = "cut-patch-refinement"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"translate"})
    directions: ClassVar[tuple[str, ...]] = ("a2b",)  # one-sided: refine writes only <A>_cut

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        cfg.validate()
        self.domain_a, self.domain_b = translation_domains(self, cfg.domain_a, cfg.domain_b)
        self.a, self.b = data.get(self.domain_a, "train"), data.get(self.domain_b, "train")
        self.a_val, self.b_val = self._val_split(self.domain_a), self._val_split(self.domain_b)
        channels = int(self.a.images.shape[-1])
        if int(self.b.images.shape[-1]) != channels:
            raise DataError(f"domains {self.domain_a!r} and {self.domain_b!r} have different channel counts")
        side = min(self.a.images.shape[1:3])
        self.train_size = round_to_4(cfg.patch_size) if 0 < cfg.patch_size < side else side
        if cfg.patch_size > side:
            raise ConfigError(f"methods.cut: key 'patch_size' ({cfg.patch_size}) is larger than the {side}px images")
        if Discriminator.out_size(self.train_size, len(cfg.disc_channels) - 1, 1) < 1:
            raise ConfigError(f"key 'disc_channels': {len(cfg.disc_channels) - 1} stride-2 layers leave no patch "
                              f"for {self.train_size}px training patches; use fewer layers or a larger patch_size")
        self.batch_size = cfg.batch_size
        self.pool_a = self.sampler_part("a", IndexPool(np.arange(len(self.a))))
        self.pool_b = self.sampler_part("b", IndexPool(np.arange(len(self.b))))
        self.g, self.d, self.heads = build_networks(cfg, channels)
        self.g_ema = EMA(self.g, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def _val_split(self, domain: str) -> PreparedSplit:
        return self.data.get(domain, "val" if self.data.has(domain, "val") else "train")

    # -- optimisation --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.cfg
        betas = (c.beta1, c.beta2)
        return {"g": torch.optim.Adam(self.g.parameters(), lr=c.lr, betas=betas),
                "d": torch.optim.Adam(self.d.parameters(), lr=c.lr, betas=betas),
                "f": torch.optim.Adam(self.heads.parameters(), lr=c.lr, betas=betas)}

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        return linear_decay_schedulers(self.optimizers, total_steps, self.cfg.decay_start)

    def batches(self) -> Iterator[PatchBatch]:
        """Endless unpaired batches: batch_size random source images and target images, one random crop each."""
        p = self.cfg.patch_size
        while True:
            ai = self.pool_a.draw(self.cfg.batch_size, self.rng)
            bi = self.pool_b.draw(self.cfg.batch_size, self.rng)
            a = random_crops(self.a.images[ai], p, self.rng)
            b = random_crops(self.b.images[bi], p, self.rng)
            if self.cfg.flip:
                fa, fb = self.rng.random(len(a)) < 0.5, self.rng.random(len(b)) < 0.5
                a[fa], b[fb] = a[fa][:, :, ::-1], b[fb][:, :, ::-1]
            yield PatchBatch(a, self.a.labels[ai] if len(self.a.labels) else np.zeros(len(ai), np.int64), b)

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, p, p, C) patches -> (B, C, p', p') in [-1, 1], p' the multiple of 4 CUT trains on."""
        return to_multiple_of_4(to_float(images, self.device) * 2 - 1)

    def nce_loss(self, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """L_PatchNCE(G, H, src): mean over layers of patch_nce_loss at shared locations (CUT calculate_NCE_loss)."""
        layers = self.cfg.nce_layers
        feat_k = encode_layers(self.g, src, layers)
        feat_q = encode_layers(self.g, out, layers)
        ids = self.heads.sample_ids(feat_k, self.cfg.num_patches)
        k, q = self.heads(feat_k, ids), self.heads(feat_q, ids)  # same ids: same locations in input and output
        return torch.stack([patch_nce_loss(qi, ki, self.cfg.nce_temperature) for qi, ki in zip(q, k)]).mean()

    def forward_fake(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """G on cat(a, b) (b only with the identity term): (2B or B, C, p, p), as CUT's forward()."""
        c = self.cfg
        with self.autocast():
            out: torch.Tensor = self.g(torch.cat([a, b]) if c.nce_idt and c.lambda_nce > 0 else a)
            return out

    def generator_loss(self, a: torch.Tensor, b: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 2: lambda_GAN L_GAN + lambda_NCE (L_PatchNCE(G, H, X) + L_PatchNCE(G, H, Y)), fake = G(cat(a, b))."""
        c = self.cfg
        n = a.shape[0]
        zero = torch.zeros((), device=a.device)
        with self.autocast():
            gan = lsgan_g_loss(self.d(fake[:n])) if c.lambda_gan > 0 else zero
            nce_x = self.nce_loss(a, fake[:n]) if c.lambda_nce > 0 else zero
            nce_y = self.nce_loss(b, fake[n:]) if c.nce_idt and c.lambda_nce > 0 else zero
        nce = nce_x + nce_y if c.nce_reduce == "sum" else (nce_x + nce_y) * (0.5 if c.nce_idt else 1.0)
        total = c.lambda_gan * gan.float() + c.lambda_nce * nce.float()
        return {"loss_g": total, "loss_gan_g": gan, "loss_nce_x": nce_x, "loss_nce_y": nce_y}

    def train_step(self, batch: PatchBatch) -> dict[str, torch.Tensor | float]:
        """One CUT iteration (CUT optimize_parameters): forward, D on real B vs G(a), then G and H on Eq. 2."""
        a, b = self._prepare(batch.a), self._prepare(batch.b)
        fake = self.forward_fake(a, b)
        with self.autocast():
            real_s, fake_s = self.d(b), self.d(fake[: a.shape[0]].detach())
        ones, zeros = torch.ones(1, device=a.device), torch.zeros(1, device=a.device)
        loss_d = lsgan_d_loss(real_s, fake_s, ones, zeros)  # CUT: 0.5 (MSE(D(y), 1) + MSE(D(G(x)), 0))
        self.optimize(loss_d, "d")
        for p in self.d.parameters():  # D frozen for the G step (CUT set_requires_grad(netD, False))
            p.requires_grad_(False)
        g_out = self.generator_loss(a, b, fake)
        og, of = self.optimizers["g"], self.optimizers["f"]
        og.zero_grad(set_to_none=True)
        of.zero_grad(set_to_none=True)
        g_out["loss_g"].backward()
        og.step()
        of.step()
        for p in self.d.parameters():
            p.requires_grad_(True)
        if self.g_ema is not None:
            self.g_ema.update(self.g)
        self.step_schedulers()
        out: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in g_out.items()}  # synced when logged
        return out | {"loss_d": loss_d.detach(), "d_real": real_s.float().mean().detach(),
                      "d_fake": fake_s.float().mean().detach()}

    # -- use -----------------------------------------------------------------------------------------------
    def refiner(self) -> Generator:
        """The generator used for inference: the EMA weights when enabled."""
        return self.g_ema.module if self.g_ema is not None else self.g

    @torch.no_grad()
    def translate(self, images: np.ndarray, direction: str = "a2b", batch_size: int = 128) -> np.ndarray:
        """uint8 (N, H, W, C) full-resolution images -> refined uint8 (N, H, W, C) (fully convolutional G)."""
        if direction != "a2b":
            raise ValueError(f"cut is one-sided: only direction 'a2b' exists, got {direction!r}")
        gen = self.refiner()

        def refine(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                y: torch.Tensor = ((gen(x * 2 - 1).float() + 1) / 2).clamp_(0, 1)
            return y

        return translate_images(self, images, refine, batch_size)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """PatchNCE on full val images (fixed locations), content change and pixel-statistics gap to real B."""
        xa = to_float(self.a_val.images[spread(len(self.a_val), 32)], self.device)
        xb = to_float(self.b_val.images[spread(len(self.b_val), 32)], self.device)
        gen = self.refiner()
        fake = (gen(xa * 2 - 1).float() + 1) / 2
        layers = self.cfg.nce_layers
        feat_k, feat_q = encode_layers(gen, xa * 2 - 1, layers), encode_layers(gen, fake * 2 - 1, layers)
        ids = self.heads.sample_ids(feat_k, self.cfg.num_patches, torch.Generator().manual_seed(0))
        k, q = self.heads(feat_k, ids), self.heads(feat_q, ids)
        nce = torch.stack([patch_nce_loss(qi, ki, self.cfg.nce_temperature) for qi, ki in zip(q, k)]).mean()
        return {"val_nce_x": float(nce), "val_l1_a2b": float((fake - xa).abs().mean()),
                "val_gap_original": stat_gap(xa, xb), "val_gap_refined": stat_gap(fake.clamp(0, 1), xb)}

    def example_input(self) -> np.ndarray:
        return to_float(self.a_val.images[:2], torch.device("cpu")).numpy()

    def health_checks(self) -> list[Any]:
        """s2r.health: a discriminator that wins or loses outright (epoch means of D(real) and D(fake))."""
        from s2r import health

        return list(health.GAN_CHECKS)

    def export_model(self) -> nn.Module:
        """The A -> B refiner with [0, 1] images in and out (EMA weights when enabled)."""
        return Refiner(self.refiner())

