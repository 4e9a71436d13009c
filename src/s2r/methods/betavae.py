"""beta-VAE and weakly supervised Ada-GVAE with the deep residual architecture of paper 3.

Paper 3 (disentanglement-transfer-ood): Dittadi et al., "On the transfer of disentangled representations in
realistic settings", Section 3 and appendix A.

Objective (appendix A; Higgins et al. 2017): maximise E_q(z|x)[log p(x|z)] - beta KL(q(z|x) || p(z)) with a
Gaussian encoder, isotropic Gaussian prior p(z) = N(0, I) and a Bernoulli decoder (Locatello et al. 2019b).
beta is warmed up linearly from 0 over the first `warmup_fraction` of the run (paper: the first 50k of 400k
steps; Bowman et al. 2015, Sonderby et al. 2016). Adam (default betas), learning rate halved at 150k and 300k of
400k steps (fractions 0.375 and 0.75: `lr_milestones`), global gradient norm clipped to `grad_clip` before
every update.

Weak supervision (`supervision: weak`, Ada-GVAE of Locatello et al. 2020 as modified in appendix A): every
training example is a pair (x1, x2) whose factors differ in exactly k (= 1) factors. Per latent dimension i we
compute the symmetrised KL between the two posteriors
    delta_i = 1/2 KL(q(z_i|x1) || q(z_i|x2)) + 1/2 KL(q(z_i|x2) || q(z_i|x1))      (appendix A)
and split the dimensions into two equal-width bins between min_i delta_i and max_i delta_i (threshold
tau = (min + max) / 2, exactly `tf.histogram_fixed_width_bins(nbins=2)` in Locatello et al.'s code). The
dimensions in the LOWER bin (delta_i < tau: the pair agrees there) are treated as shared: both posteriors are
replaced by their average (GVAE: mean = (mu1 + mu2) / 2, variance = (var1 + var2) / 2); the dimensions in the
upper bin keep their own posterior. Both images are then decoded from the modified posteriors and the loss is
the sum of the two beta-VAE losses.

Input noise (`input_noise: true`, appendix A): two independent zero-mean Gaussian components added to the
encoder's input only (the reconstruction target stays clean): one per subpixel (RGB) with std
`noise_std_subpixel`, one per pixel (greyscale, shared by the channels) with std `noise_std_pixel` drawn at
1/`noise_upsample` of the resolution and bilinearly upsampled (paper: factor 16 at 128 px; we keep the same
fraction of the image, factor = noise_upsample * size / 128, at least 1).

Architecture (appendix A, Fig. 8, Tables 2-4): encoder = conv 5x5 stride 2, then pairs of residual blocks
(two 3x3 convolutions with leaky ReLU and a learnable scalar gate initialised to 0: ReZero, Bachlechner et al.
2020, so every block is the identity at init), average pooling (stride 2) between the pairs, 1x1 convolutions
where the width changes, flatten, a hidden fully connected layer of `fc_width` units, LayerNorm, and two fully
connected heads (mean, log-variance; the log-variance head has a custom init: weights scaled by
`logvar_weight_scale`, bias `logvar_bias_init`). The decoder mirrors it: FC(fc_width), FC, reshape, residual pairs
with bilinear upsampling and 1x1 channel changes, and a final 5x5 stride-2 transposed convolution to Bernoulli
logits. The paper's widths per pair are [64, 128, 128, 256, 256] at 128 px with a 512-unit hidden FC (the recipe):
16.41 M parameters at d = 10 (Section 3: "approximately 16.3M"; without the hidden FC it would be 12.3 M); the
CPU default is smaller (params.yaml).

Data: the encoder trains on the source domain's images whose `ood_factor` value is not in `ood_holdout` (the
paper trains the VAEs on 8 of its 12 cube colours; the 4 held out are the OOD2-A test colours). A held-out value
outside the factor's range is an error; `ood_order` gives the order of the factor's values along which the
evaluator's OOD1-B / OOD1-C split (extrapolation / interpolation: hue order), [] = index order. Pairs for weak
supervision come from one of two places (`pairs`):
- `render`: the embedded `scenes` benchmark's renderer draws `render_pairs` factor pairs that differ in exactly k
  factors (`s2r.data.scenes.sample_pair`, holdout values excluded) and renders both images in the source domain;
  the pool is cached under `cache_dir` keyed by everything that decides its pixels, so models share it. In render
  mode the unsupervised model trains on the same 2 x render_pairs images, so both supervisions see the same data.
- `match`: pairs of rows of the prepared train split whose factor vectors differ in exactly k entries (a user's
  factor-labelled dataset, e.g. `s2r data import-manifest` with factor_<name> columns). Continuous factors
  (``factor_ranges``) are compared after prepare's binning (``factors.npy`` holds bin indices: equal-width bins over
  the declared range, disentanglement_lib's histogram discretisation, `s2r.data.benchmark.bin_factor`), so "differ in
  k factors" means "fall in different bins of k factors". If no two rows differ in
  exactly k factors, the pairs at the smallest available Hamming distance are used with a warning and the
  distance is reported as `pair_distance` in the train metrics; if all rows are identical it is an error.
`auto` = `render` for the embedded scenes benchmark, `match` otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
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
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.files import atomic_path
from s2r.methods.base import IndexPool, to_device, to_float, to_uint8
from s2r.methods.base import Method as BaseMethod
from s2r.methods.common import area_resize
from s2r.methods.registry import register


@dataclass
class Config(Schema):
    """`methods.betavae` (and variants such as `methods.betavae_weak`) in params.yaml."""

    supervision: Literal["unsupervised", "weak"]
    beta: float
    beta_resolution: int  # beta is the paper's value at this image size; 0 = beta as given (see beta_scale)
    latent_dim: int
    k: int  # factors that differ within a weakly supervised pair (paper: k = 1)
    pairs: Literal["auto", "render", "match"]
    render_pairs: int
    pool_seed: int  # the rendered pool does not depend on the model seed, so models share one cache
    cache_dir: str  # "" = render in memory every time
    ood_factor: str  # factor whose held-out values the encoder never sees (OOD2-A); "" = none
    ood_holdout: list[int]
    ood_threshold: float | None  # instead of ood_holdout: hold out values >= it (continuous: bin centres)
    ood_order: list[int]  # OOD1-B/C order of the factor's values; [] = index order
    match_pairs: int  # `match` mode: at most this many pairs (paper 3: 500k pairs differing in 1 FoV)
    eval_images: int  # evaluator: a fixed random subset of this many images per domain; 0 = all (MPI3D: 1M)
    input_noise: bool
    noise_std_subpixel: float
    noise_std_pixel: float
    noise_upsample: int  # at 128 px; scaled with the resolution
    image_size: int  # model resolution (images are area-downsampled); 0 = the benchmark's
    widths: list[int]  # channels per residual pair
    fc_width: int  # hidden FC of encoder and decoder (Tables 3-4; paper 512); 0 = none (FC heads only)
    logvar_weight_scale: float
    logvar_bias_init: float
    leaky_slope: float
    batch_size: int
    epochs: int
    steps_per_epoch: int
    lr: float  # paper 1e-4 at 400k steps; our CPU runs are ~1000x shorter
    lr_milestones: list[float]  # 150k, 300k of 400k
    lr_gamma: float  # "halved"
    warmup_fraction: float  # 50k of 400k steps
    grad_clip: float
    val_images: int

    def validate(self) -> None:
        p = "key 'methods.betavae"
        if self.beta < 0:
            raise ConfigError(f"{p}.beta' must be >= 0, got {self.beta}")
        if self.beta_resolution < 0:
            raise ConfigError(f"{p}.beta_resolution' must be >= 0 (0 = beta as given), got {self.beta_resolution}")
        if self.latent_dim < 1 or self.k < 1:
            raise ConfigError(f"{p}.latent_dim' and '.k' must be >= 1")
        if self.batch_size < 2 or self.epochs < 1 or self.steps_per_epoch < 1 or self.render_pairs < 1:
            raise ConfigError(f"{p}.batch_size' >= 2, epochs/steps_per_epoch/render_pairs >= 1")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError(f"{p}.widths' must be a non-empty list of positive channel counts")
        if self.fc_width < 0:
            raise ConfigError(f"{p}.fc_width' must be >= 0 (0 = no hidden FC layer), got {self.fc_width}")
        if any(not 0.0 < m < 1.0 for m in self.lr_milestones):
            raise ConfigError(f"{p}.lr_milestones' are fractions of training in (0, 1)")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ConfigError(f"{p}.warmup_fraction' must be in [0, 1]")
        if self.image_size < 0 or self.noise_upsample < 1 or self.grad_clip <= 0:
            raise ConfigError(f"{p}.image_size' >= 0, noise_upsample >= 1, grad_clip > 0")
        if self.noise_std_subpixel < 0 or self.noise_std_pixel < 0:
            raise ConfigError(f"{p}.noise_std_*' must be >= 0")
        if self.match_pairs < 1 or self.eval_images < 0:
            raise ConfigError(f"{p}.match_pairs' must be >= 1 and '.eval_images' >= 0")


# ---------------------------------------------------------------------------------------------------------
# Networks (appendix A, Fig. 8, Tables 2-4)


class ResidualBlock(nn.Module):
    """Table 2: x + g * conv3x3(lrelu(conv3x3(lrelu(x)))), scalar gate g initialised to 0 (ReZero)."""

    def __init__(self, channels: int, slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.gate = nn.Parameter(torch.zeros(()))
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, self.slope))
        h = self.conv2(F.leaky_relu(h, self.slope))
        out: torch.Tensor = x + self.gate * h
        return out


def _pair(c: int, slope: float) -> list[nn.Module]:
    return [ResidualBlock(c, slope), ResidualBlock(c, slope)]


def final_spatial(image_size: int, n_pairs: int) -> int:
    """Spatial size after the stride-2 conv and (n_pairs - 1) poolings."""
    out: int = image_size // 2 ** n_pairs
    return out


class Encoder(nn.Module):
    """Table 3: conv5x5/2, residual pairs with avg-pool and 1x1 width changes, flatten, LeakyReLU, FC(fc_width),
    LeakyReLU, LayerNorm, two FC heads (the "2 fully-connected layers" of Section 3; fc_width 0: no hidden FC)."""

    def __init__(self, channels: int, size: int, widths: list[int], latent: int, slope: float,
                 logvar_weight_scale: float, logvar_bias_init: float, fc_width: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 5, stride=2, padding=2)]
        prev = widths[0]
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.AvgPool2d(2))
            if w != prev:
                layers.append(nn.Conv2d(prev, w, 1))
            layers += _pair(w, slope)
            prev = w
        self.body = nn.Sequential(*layers)
        s = final_spatial(size, len(widths))
        self.flat = prev * s * s
        self.slope = slope
        self.hidden = nn.Linear(self.flat, fc_width) if fc_width else None
        feat = fc_width or self.flat
        self.norm = nn.LayerNorm(feat)  # "LayerNorm before the posterior parameterisation"
        self.mean = nn.Linear(feat, latent)
        self.logvar = nn.Linear(feat, latent)
        with torch.no_grad():  # custom init of the log-variance layer (Table 3)
            self.logvar.weight.mul_(logvar_weight_scale)
            self.logvar.bias.fill_(logvar_bias_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> mean (B, d), log-variance (B, d)."""
        h = F.leaky_relu(self.body(x).flatten(1), self.slope)  # (B, C, h, w) -> (B, C*h*w)
        if self.hidden is not None:
            h = F.leaky_relu(self.hidden(h), self.slope)
        h = self.norm(h)
        return self.mean(h), self.logvar(h)


class Decoder(nn.Module):
    """Table 4: FC(fc_width), LeakyReLU, FC, reshape, residual pairs with bilinear upsampling and 1x1 width
    changes, conv5x5 to logits (fc_width 0: one FC from z)."""

    def __init__(self, channels: int, size: int, widths: list[int], latent: int, slope: float,
                 fc_width: int = 0) -> None:
        super().__init__()
        ws = list(reversed(widths))
        self.s = final_spatial(size, len(widths))
        self.c0 = ws[0]
        self.hidden = nn.Linear(latent, fc_width) if fc_width else None
        self.fc = nn.Linear(fc_width or latent, ws[0] * self.s * self.s)
        layers: list[nn.Module] = []
        prev = ws[0]
        for i, w in enumerate(ws):
            if i > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            if w != prev:
                layers.append(nn.Conv2d(prev, w, 1))
            layers += _pair(w, slope)
            prev = w
        self.body = nn.Sequential(*layers)
        self.out = nn.ConvTranspose2d(prev, channels, 5, stride=2, padding=2, output_padding=1)
        self.slope = slope

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) -> Bernoulli logits (B, C, H, W)."""
        if self.hidden is not None:
            z = F.leaky_relu(self.hidden(z), self.slope)
        h = self.fc(z).view(-1, self.c0, self.s, self.s)  # (B, C*s*s) -> (B, C, s, s)
        out: torch.Tensor = self.out(F.leaky_relu(self.body(h), self.slope))
        return out


class VAE(nn.Module):
    """Encoder + decoder; `forward` returns the posterior mean (the exported representation)."""

    def __init__(self, channels: int, size: int, cfg: Config) -> None:
        super().__init__()
        if final_spatial(size, len(cfg.widths)) < 1 or size % 2 ** len(cfg.widths):
            raise ConfigError(f"key 'methods.betavae.widths': {len(cfg.widths)} residual pairs need an image size "
                              f"divisible by {2 ** len(cfg.widths)}, got {size}")
        self.encoder = Encoder(channels, size, cfg.widths, cfg.latent_dim, cfg.leaky_slope, cfg.logvar_weight_scale,
                               cfg.logvar_bias_init, cfg.fc_width)
        self.decoder = Decoder(channels, size, cfg.widths, cfg.latent_dim, cfg.leaky_slope, cfg.fc_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.encoder(x)[0]
        return out


# ---------------------------------------------------------------------------------------------------------
# Losses


def kl_normal_std(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, 1)) per dimension = 1/2 (mu^2 + var - log var - 1) (Kingma & Welling 2014, App. B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def kl_normal(mu1: torch.Tensor, lv1: torch.Tensor, mu2: torch.Tensor, lv2: torch.Tensor) -> torch.Tensor:
    """KL(N(mu1, var1) || N(mu2, var2)) per dimension = 1/2 (var1/var2 + (mu2-mu1)^2/var2 - 1 + lv2 - lv1)."""
    return 0.5 * ((lv1 - lv2).exp() + (mu2 - mu1).pow(2) / lv2.exp() - 1.0 + lv2 - lv1)


def symmetric_kl(mu1: torch.Tensor, lv1: torch.Tensor, mu2: torch.Tensor, lv2: torch.Tensor) -> torch.Tensor:
    """Appendix A: delta_i = 1/2 KL(q1_i || q2_i) + 1/2 KL(q2_i || q1_i), per dimension."""
    return 0.5 * kl_normal(mu1, lv1, mu2, lv2) + 0.5 * kl_normal(mu2, lv2, mu1, lv1)


def shared_mask(delta: torch.Tensor) -> torch.Tensor:
    """Ada-GVAE: True where delta_i falls in the lower of two equal-width bins over [min, max] (shared dims)."""
    lo = delta.min(dim=1, keepdim=True).values
    hi = delta.max(dim=1, keepdim=True).values
    return delta < 0.5 * (lo + hi)


def ada_gvae_aggregate(mu1: torch.Tensor, lv1: torch.Tensor, mu2: torch.Tensor, lv2: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the shared dims of both posteriors by their GVAE average (Locatello et al. 2020, Eq. 5-6)."""
    mask = shared_mask(symmetric_kl(mu1, lv1, mu2, lv2))
    mu_avg = 0.5 * (mu1 + mu2)
    lv_avg = torch.log(0.5 * (lv1.exp() + lv2.exp()))
    return (torch.where(mask, mu_avg, mu1), torch.where(mask, lv_avg, lv1),
            torch.where(mask, mu_avg, mu2), torch.where(mask, lv_avg, lv2), mask)


def beta_scale(cfg: Config, size: int) -> float:
    """The KL weight the loss uses: beta x (size / beta_resolution)^2, or beta when beta_resolution is 0.

    The paper's betas (1 ... 16) weigh the KL of a 128 px image, whose Bernoulli likelihood sums 16x more
    subpixels than a 32 px one. The same beta at 32 px is therefore a 16x stronger bottleneck per pixel, and the
    CPU demo's models collapsed onto 4-5 latent dims. Scaling beta with the number of pixels keeps the paper's
    balance of KL against reconstruction: the normalised beta of Higgins et al. (2017, beta_norm = beta M / N).
    """
    if cfg.beta_resolution == 0:
        return cfg.beta
    return cfg.beta * (size / cfg.beta_resolution) ** 2


def bernoulli_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) of a Bernoulli decoder with targets in [0, 1], summed over pixels: (B,)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


def beta_vae_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example reconstruction NLL and KL of the beta-VAE objective (appendix A): loss = rec + beta * kl."""
    return bernoulli_nll(logits, x), kl_normal_std(mu, logvar).sum(1)


def add_input_noise(x: torch.Tensor, std_subpixel: float, std_pixel: float, upsample: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Appendix A: per-subpixel N(0, s1^2) + greyscale per-pixel N(0, s2^2) bilinearly upsampled by `upsample`."""
    b, c, h, w = x.shape
    shard = distributed.shard()  # in a distributed step: this process's rows of a draw over the global batch
    n1 = to_device(shard.randn(tuple(x.shape), generator), x.device) * std_subpixel
    hs, ws = max(1, math.ceil(h / upsample)), max(1, math.ceil(w / upsample))
    low = to_device(shard.randn((b, 1, hs, ws), generator), x.device) * std_pixel
    n2 = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)  # (B,1,h,w) -> (B,1,H,W)
    return x + n1 + n2  # n2 broadcast over the channels: greyscale


# ---------------------------------------------------------------------------------------------------------
# Data: encoder training set and weak-supervision pairs


EXACT_PAIRS_LIMIT = 20_000  # above this many rows the O(n^2) exact enumeration is replaced by sampling (k = 1)


def sampled_one_factor_pairs(factors: np.ndarray, n_pairs: int, seed: int = 0) -> np.ndarray:
    """n_pairs index pairs (P, 2) of rows differing in exactly one factor, sampled as Locatello et al. (2020) do.

    For large factor grids (MPI3D: 1,036,800 rows) where enumerating all n^2 pairs is infeasible: for each pair a
    factor j is drawn uniformly among those along which some rows differ, a row i uniformly, and a partner
    uniformly among the rows that agree with i on every factor but j (grouped once per factor by sorting;
    O(n log n) per factor). Partners identical to i (duplicate factor vectors) are dropped.
    """
    f = np.asarray(factors)
    n, m = f.shape
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4, 2)))
    groups = []  # per factor: (sorted row order, group start of each sorted position, group size)
    for j in range(m):
        rest = np.delete(f, j, axis=1)
        _, gid = np.unique(rest, axis=0, return_inverse=True) if rest.shape[1] else (None, np.zeros(n, np.int64))
        gid = np.asarray(gid).reshape(-1)
        order = np.argsort(gid, kind="stable")
        sg = gid[order]
        starts = np.flatnonzero(np.r_[True, sg[1:] != sg[:-1]])
        sizes = np.diff(np.r_[starts, n])
        if (sizes > 1).any() and len(np.unique(f[:, j])) > 1:
            pos_start = np.repeat(starts, sizes)  # per sorted position: its group's start and size
            pos_size = np.repeat(sizes, sizes)
            groups.append((order, pos_start, pos_size))
    if not groups:
        return np.zeros((0, 2), np.int64)
    out: list[np.ndarray] = []
    have = 0
    for _ in range(50):  # rejection of singleton groups / identical rows; a few rounds suffice
        need = n_pairs - have
        if need <= 0:
            break
        col = rng.integers(0, len(groups), need)
        pos = rng.integers(0, n, need)
        pairs = np.empty((need, 2), np.int64)
        ok = np.zeros(need, bool)
        for g, (order, pos_start, pos_size) in enumerate(groups):
            sel = col == g
            p, st, sz = pos[sel], pos_start[pos[sel]], pos_size[pos[sel]]
            r = (rng.random(len(p)) * np.maximum(sz - 1, 1)).astype(np.int64)
            other = st + r
            other = other + (other >= p)  # skip i itself within its group
            good = sz > 1
            i, o = order[p], order[np.minimum(other, len(order) - 1)]
            pairs[sel] = np.stack([i, o], 1)
            ok[sel] = good & (f[i] != f[o]).any(1)
        out.append(pairs[ok])
        have += int(ok.sum())
    return np.concatenate(out)[:n_pairs] if out else np.zeros((0, 2), np.int64)


def matching_pairs(factors: np.ndarray, k: int, max_pairs: int = 200_000,
                   exact_limit: int = EXACT_PAIRS_LIMIT) -> tuple[np.ndarray, int]:
    """Index pairs (P, 2) of rows whose factor vectors differ in exactly k entries, and that distance.

    Falls back to the smallest Hamming distance >= 1 present (with a warning) when none differ in exactly k.
    Above `exact_limit` rows (k = 1 only) the pairs are sampled (`sampled_one_factor_pairs`) instead of enumerated.
    """
    f = np.asarray(factors)
    n = len(f)
    if n < 2 or f.ndim != 2 or f.shape[1] == 0:
        raise DataError(f"weak supervision needs >= 2 factor-labelled training rows, got {f.shape}")
    if n > exact_limit:
        if k != 1:
            raise DataError(f"weak supervision: exact k={k} pair matching on {n} rows is O(n^2); "
                            f"use k=1 (sampled pairs) or fewer rows (<= {exact_limit})")
        pairs = sampled_one_factor_pairs(f, max_pairs)
        if not len(pairs):
            raise DataError(f"weak supervision: no two of the {n} training rows differ in exactly one factor")
        return pairs, 1
    by_dist: dict[int, list[np.ndarray]] = {}
    counts: dict[int, int] = {}
    for i in range(0, n, 512):  # (b, n) Hamming distances, chunked to bound memory
        d = (f[i : i + 512, None, :] != f[None, :, :]).sum(-1)
        rows, cols = np.nonzero(d > 0)
        rows = rows + i
        keep = cols > rows  # each unordered pair once
        rows, cols = rows[keep], cols[keep]
        dist = d[rows - i, cols]
        for v in np.unique(dist):
            sel = dist == v
            counts[int(v)] = counts.get(int(v), 0) + int(sel.sum())
            if sum(len(a) for a in by_dist.get(int(v), [])) < max_pairs:
                by_dist.setdefault(int(v), []).append(np.stack([rows[sel], cols[sel]], 1))
    if not by_dist:
        raise DataError("weak supervision: all factor-labelled training rows are identical; no pairs exist")
    dist = k if k in by_dist else min(by_dist)
    if dist != k:
        warnings.warn(f"weak supervision: no two training rows differ in exactly k={k} factors; using the "
                      f"{counts[dist]} pairs that differ in {dist}", stacklevel=2)
    return np.concatenate(by_dist[dist])[:max_pairs], dist


def render_pair_pool(n: int, k: int, domain: str, image_size: int, hues: int, sizes: dict[str, int],
                     holdout: dict[str, list[int]], seed: int, progress: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render n pairs differing in exactly k factors (holdout values excluded) -> images (n,2,H,W,C), factors."""
    from tqdm import tqdm

    from s2r.data.scenes import render_scene, sample_pair

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(4, 1)))
    names = list(sizes)
    imgs = np.empty((n, 2, image_size, image_size, 3), np.uint8)
    facs = np.empty((n, 2, len(names)), np.int64)
    for i in tqdm(range(n), desc=f"render {n} pairs (k={k})", disable=not progress):
        while True:
            f1, f2, _ = sample_pair(rng, sizes, k)
            if not any(f[name] in vals for name, vals in holdout.items() for f in (f1, f2)):
                break
        for j, f in enumerate((f1, f2)):
            imgs[i, j] = render_scene(f, domain, image_size, rng, hues=hues, split="train")[0]
            facs[i, j] = [f[name] for name in names]
    return imgs, facs, facs[:, 0, 0]


def check_ood_values(cfg: Config, size: int, where: str) -> None:
    """`ood_holdout` values must exist (0..size-1) and `ood_order` must list every value once (or be empty)."""
    bad = [v for v in cfg.ood_holdout if not 0 <= v < size]
    if bad:
        raise ConfigError(f"key 'methods.betavae.ood_holdout': value(s) {bad} outside factor {cfg.ood_factor!r} of "
                          f"{where}, which has {size} values (0..{size - 1})")
    if len(set(cfg.ood_holdout)) >= size:
        raise ConfigError(f"key 'methods.betavae.ood_holdout': {cfg.ood_holdout} holds out every value of factor "
                          f"{cfg.ood_factor!r} ({size} values): nothing left to train on")
    if cfg.ood_order and sorted(cfg.ood_order) != list(range(size)):
        raise ConfigError(f"key 'methods.betavae.ood_order': {cfg.ood_order} must list every value of factor "
                          f"{cfg.ood_factor!r} of {where} exactly once (0..{size - 1}), or be [] for index order")


@register(Config)
class Method(BaseMethod[Config]):
    """beta-VAE / Ada-GVAE; `encode` gives the posterior mean, scored by the disentanglement evaluator."""

    name = "betavae"
    paper = "disentanglement-transfer-ood"  # its MLflow experiment (registry.experiment)
    capabilities: ClassVar[frozenset[str]] = frozenset({"encode"})
    evaluator: ClassVar[str] = "disentanglement"

    def __init__(self, cfg: Config, data: PreparedBenchmark, seed: int) -> None:
        super().__init__(cfg, data, seed)
        cfg.validate()
        spec = data.spec
        if not spec.factors:
            raise DataError(f"{data.root}: method 'betavae' needs a benchmark with factors of variation")
        self.factor_names = list(spec.factors)
        self.factor_sizes = dict(spec.factors)
        if cfg.ood_factor and cfg.ood_factor not in self.factor_names:
            raise ConfigError(f"key 'methods.betavae.ood_factor': {cfg.ood_factor!r} is not a factor of "
                              f"{data.root} ({self.factor_names}); use \"\" for none")
        if cfg.ood_factor:
            check_ood_values(cfg, self.factor_sizes[cfg.ood_factor], str(data.root))
        self.holdout = {cfg.ood_factor: sorted(cfg.ood_holdout)} if cfg.ood_factor and cfg.ood_holdout else {}
        if cfg.ood_factor:
            self.holdout = self._threshold_holdout(cfg, spec) or self.holdout
        self.size = cfg.image_size or spec.image_size
        self.channels = spec.channels
        self.batch_size = cfg.batch_size
        self.domain = spec.source
        self.vae = VAE(self.channels, self.size, cfg)
        self.noise_gen = torch.Generator().manual_seed(seed + 17)
        self.step = 0
        self.total_steps = 1  # set by configure_schedulers (the loop's setup)
        mode = cfg.pairs
        if mode == "auto":
            mode = "render" if spec.name == "scenes" and self.channels == 3 else "match"
        if mode == "render" and spec.name != "scenes":
            raise ConfigError(f"key 'methods.betavae.pairs': 'render' needs the embedded scenes benchmark, "
                              f"{data.root} is {spec.name!r}; use 'match'")
        self.pair_mode = mode
        self.pair_distance = cfg.k
        if mode == "render":
            imgs, facs, labels = self._rendered_pool()
            self.pair_images = imgs  # (P, 2, H, W, C)
            self.pair_labels = facs[:, :, 0]
            self.pool = self.sampler_part("pool", IndexPool(np.arange(len(imgs))))
        else:
            train = data.get(self.domain, "train")
            keep = self.in_distribution(train.factors)
            self.train_idx = np.flatnonzero(keep)
            if len(self.train_idx) < 2:
                raise DataError(f"{data.root}: fewer than 2 {self.domain}/train images outside the holdout")
            self.train_split = train
            if cfg.supervision == "weak":
                pairs, self.pair_distance = matching_pairs(train.factors[self.train_idx], cfg.k, cfg.match_pairs)
                self.pairs = self.train_idx[pairs]
                self.pool = self.sampler_part("pool", IndexPool(np.arange(len(self.pairs))))
            else:
                self.pool = self.sampler_part("pool", IndexPool(self.train_idx))
        val = data.get(self.domain, "val")
        vi = np.flatnonzero(self.in_distribution(val.factors))[: cfg.val_images]
        if len(vi) == 0:  # a tiny val split with only held-out values: score all of it rather than nothing
            vi = np.arange(min(len(val), cfg.val_images))
        if len(vi) == 0:
            raise DataError(f"{data.root}: no {self.domain}/val images to validate on")
        self.val_images = np.asarray(val.images[vi])

    # -- data ---------------------------------------------------------------------------------------------
    @staticmethod
    def _threshold_holdout(cfg: Config, spec: Any) -> dict[str, list[int]]:
        """OOD split by a threshold: held-out values are those >= `ood_threshold`.

        A continuous factor (``factor_ranges`` in benchmark.yaml) is binned by prepare
        (:func:`s2r.data.benchmark.bin_factor`); its held-out bins are those whose centre is >= the threshold, so the
        effective threshold is the nearest bin edge. A continuous OOD factor needs the threshold (value sets of
        bins are refused: they depend on the bin count).
        """
        from s2r.data.benchmark import bin_centres

        name = cfg.ood_factor
        if cfg.ood_threshold is None:
            if name in spec.factor_ranges and cfg.ood_holdout:
                raise ConfigError(f"key 'methods.betavae.ood_holdout': factor {name!r} is continuous; hold values out "
                                  "with 'ood_threshold' (and ood_holdout: [])")
            return {}
        if cfg.ood_holdout:
            raise ConfigError("keys 'methods.betavae.ood_holdout' / '.ood_threshold': give one of them, not both")
        n = spec.factors[name]
        if name in spec.factor_ranges:
            low, high = spec.factor_ranges[name]
            values = bin_centres(float(low), float(high), n)
        else:
            values = np.arange(n, dtype=np.float64)
        held = [int(b) for b in np.flatnonzero(values >= cfg.ood_threshold)]
        if not held or len(held) == n:
            raise ConfigError(f"key 'methods.betavae.ood_threshold': {cfg.ood_threshold} holds out {len(held)} of "
                              f"the {n} values of {name!r}; choose one inside its range")
        return {name: held}

    def in_distribution(self, factors: np.ndarray) -> np.ndarray:
        """Rows whose held-out factor value is one the encoder trains on."""
        keep = np.ones(len(factors), bool)
        for name, vals in self.holdout.items():
            keep &= ~np.isin(factors[:, self.factor_names.index(name)], vals)
        return keep

    def _rendered_pool(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, spec = self.cfg, self.data.spec
        key = {"data_version": self.data.data_version, "domain": self.domain, "n": c.render_pairs, "k": c.k,
               "size": spec.image_size, "holdout": self.holdout, "seed": c.pool_seed, "v": 1}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(c.cache_dir) / f"pairs-{digest}.npz"
        if c.cache_dir and path.is_file():
            z = np.load(path)
            return z["images"], z["factors"], z["labels"]
        imgs, facs, labels = render_pair_pool(c.render_pairs, c.k, self.domain, spec.image_size,
                                              self.factor_sizes.get("hue", 12), self.factor_sizes, self.holdout,
                                              c.pool_seed, progress=True)
        if c.cache_dir:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez keeps the name
                np.savez(f, images=imgs, factors=facs, labels=labels)
        return imgs, facs, labels

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """(x1 uint8 (B,H,W,C), labels (B,), x2 uint8 (B,H,W,C) for weak supervision else None)."""
        weak = self.cfg.supervision == "weak"
        while True:
            if self.pair_mode == "render":
                if weak:
                    i = np.sort(self.pool.draw(self.batch_size, self.rng))
                    yield self.pair_images[i, 0], self.pair_labels[i, 0], self.pair_images[i, 1]
                else:  # the same pool's 2P images, one at a time
                    i = np.sort(self.pool.draw(self.batch_size, self.rng))
                    j = self.rng.integers(0, 2, len(i))
                    yield self.pair_images[i, j], self.pair_labels[i, j], None
            elif weak:
                p = self.pairs[np.sort(self.pool.draw(self.batch_size, self.rng))]
                s = self.train_split
                yield np.asarray(s.images[p[:, 0]]), s.labels[p[:, 0]], np.asarray(s.images[p[:, 1]])
            else:
                i = np.sort(self.pool.draw(self.batch_size, self.rng))
                yield np.asarray(self.train_split.images[i]), self.train_split.labels[i], None

    def to_input(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float (B, C, S, S) in [0, 1] at the model resolution (area downsampling)."""
        return area_resize(to_float(np.ascontiguousarray(images), self.device), self.size)

    # -- training -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": torch.optim.Adam(self.vae.parameters(), lr=self.cfg.lr)}

    def distributed_networks(self) -> list[nn.Module]:
        """The training step calls the encoder and the decoder, not VAE.forward (s2r.distributed)."""
        return [self.vae.encoder, self.vae.decoder]

    def configure_schedulers(self, total_steps: int) -> dict[str, Any]:
        self.total_steps = total_steps
        ms = sorted({max(1, int(round(m * total_steps))) for m in self.cfg.lr_milestones})
        return {"vae": torch.optim.lr_scheduler.MultiStepLR(self.optimizers["vae"], ms, self.cfg.lr_gamma)}

    def beta_now(self) -> float:
        """Linear deterministic KL warm-up over the first warmup_fraction of the run, to beta_scale(cfg, size)."""
        warm = self.cfg.warmup_fraction * self.total_steps
        return beta_scale(self.cfg, self.size) * (1.0 if warm <= 0 else min(1.0, self.step / warm))

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if not c.input_noise:
            return x
        up = max(1, round(c.noise_upsample * self.size / 128))
        return add_input_noise(x, c.noise_std_subpixel, c.noise_std_pixel, up, self.noise_gen)

    def reparameterise(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + distributed.shard().randn_like(mu) * (0.5 * logvar).exp()

    def losses(self, x1: torch.Tensor, x2: torch.Tensor | None, beta: float) -> dict[str, torch.Tensor]:
        """Mean per-image loss terms; for pairs the two images' losses are summed (Ada-GVAE)."""
        mu1, lv1 = self.vae.encoder(self.noisy(x1))
        if x2 is None:
            rec, kl = beta_vae_terms(self.vae.decoder(self.reparameterise(mu1, lv1)), x1, mu1, lv1)
            return {"loss": (rec + beta * kl).mean(), "recon": rec.mean(), "kl": kl.mean()}
        mu2, lv2 = self.vae.encoder(self.noisy(x2))
        m1, l1, m2, l2, mask = ada_gvae_aggregate(mu1, lv1, mu2, lv2)
        rec1, kl1 = beta_vae_terms(self.vae.decoder(self.reparameterise(m1, l1)), x1, m1, l1)
        rec2, kl2 = beta_vae_terms(self.vae.decoder(self.reparameterise(m2, l2)), x2, m2, l2)
        rec, kl = 0.5 * (rec1 + rec2), 0.5 * (kl1 + kl2)  # per image
        return {"loss": (rec1 + rec2 + beta * (kl1 + kl2)).mean(), "recon": rec.mean(), "kl": kl.mean(),
                "shared_dims": mask.float().sum(1).mean()}

    def train_step(self, batch: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> dict[str, torch.Tensor | float]:
        x1 = self.to_input(batch[0])
        x2 = self.to_input(batch[2]) if batch[2] is not None else None
        beta = self.beta_now()
        with self.autocast():
            out = self.losses(x1, x2, beta)
        opt = self.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.cfg.grad_clip)  # global norm (App. A)
        opt.step()
        self.step_schedulers()
        self.step += 1
        res: dict[str, torch.Tensor | float] = {k: v.detach() for k, v in out.items()}
        res |= {"beta": beta, "grad_norm": gnorm.detach()}
        if self.pair_mode == "match" and self.cfg.supervision == "weak":
            res["pair_distance"] = float(self.pair_distance)
        return res

    @torch.no_grad()
    def elbo_terms(self, images: np.ndarray, batch_size: int = 256) -> dict[str, float]:
        """Single-image ELBO = -(recon + KL) (beta = 1), recon NLL and KL per image, on clean inputs."""
        self.vae.eval()
        rec_all, kl_all = [], []
        gen = torch.Generator().manual_seed(0)  # a fixed sample of z: comparable across epochs and models
        for i in range(0, len(images), batch_size):
            x = self.to_input(images[i : i + batch_size])
            mu, lv = self.vae.encoder(x)
            z = mu + torch.randn(mu.shape, generator=gen).to(mu.device) * (0.5 * lv).exp()
            rec, kl = beta_vae_terms(self.vae.decoder(z).float(), x, mu.float(), lv.float())
            rec_all.append(rec.cpu())
            kl_all.append(kl.cpu())
        rec, kl = torch.cat(rec_all), torch.cat(kl_all)
        return {"elbo": float(-(rec + kl).mean()), "recon": float(rec.mean()), "kl": float(kl.mean())}

    def validate(self) -> dict[str, float]:
        """val_elbo (the study objective), val_recon, val_kl on source-domain validation images."""
        t = self.elbo_terms(self.val_images)
        loss = t["recon"] + beta_scale(self.cfg, self.size) * t["kl"]
        return {f"val_{k}": v for k, v in t.items()} | {"val_loss": loss}

    def health_signals(self) -> dict[str, float]:
        """Posterior collapse (s2r.health.active_units): latent dims with mean KL > 0.01 nats on val images."""
        from s2r import health

        mu, lv = self.vae.encoder(self.to_input(self.val_images))
        return health.active_units(mu.float().cpu(), lv.float().cpu())

    def health_checks(self) -> list[Any]:
        """Collapsed with fewer active latent dims than the benchmark has factors of variation (or latent dims)."""
        from s2r import health

        need = min(len(self.factor_names), self.cfg.latent_dim)
        return [health.Check(health.PREFIX + "active_units", "<", need,
                             "posterior collapse: {value:g} active latent dims (KL > 0.01 nats), fewer than the "
                             f"{len(self.factor_names)} factors of variation")]

    # -- capabilities -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 (N, H, W, C) -> posterior means (N, d): the representation the evaluators score."""
        self.vae.eval()
        out = [self.vae.encoder(self.to_input(images[i : i + batch_size]))[0].float().cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.latent_dim), np.float32)

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents (N, d) -> uint8 images (N, S, S, C): the Bernoulli means."""
        self.vae.eval()
        x = torch.sigmoid(self.vae.decoder(torch.as_tensor(z, dtype=torch.float32, device=self.device)).float())
        return to_uint8(x)

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(images))

    def example_input(self) -> np.ndarray:
        return self.to_input(self.val_images[:2]).cpu().numpy()

    def export_model(self) -> nn.Module:
        return self.vae

    def train_state(self) -> dict[str, Any]:
        return super().train_state() | {"step": self.step, "noise_gen": self.noise_gen.get_state()}

    def load_train_state(self, state: dict[str, Any]) -> None:
        super().load_train_state(state)
        self.step = int(state["step"])
        self.noise_gen.set_state(state["noise_gen"])

