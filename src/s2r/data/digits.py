"""The embedded ``digits`` benchmark: font-rendered synthetic (source) vs real handwritten (target) digits.

Domains
-------
``synthetic`` (role ``source``, simulated)
    Digits 0-9 drawn with Pillow from the TrueType fonts bundled inside matplotlib (only those, so the data
    is byte-identical on every machine with the same matplotlib and Pillow). A *scene* fixes the digit
    geometry: font, glyph height, stroke width, rotation, shear and translation. Each scene is rendered in
    ``params.variations`` *variations* that share that geometry exactly and re-draw only the nuisance
    factors: background texture (flat, gradient, smooth random field or stripes), foreground intensity,
    Gaussian blur and Gaussian noise (paper 1 maps one variation of a scene to another). Glyphs are drawn at
    4x the output size and box-filtered down (antialiasing). Bright digit on a darker background, grey.
``real`` (role ``target``, real data)
    The 1,797 real handwritten digits shipped with scikit-learn (``load_digits``: 8x8, 0..16, higher = more
    ink), scaled to 0..255 (bright ink on dark, the synthetic polarity) and upsampled to ``image_size`` with
    Pillow's *bicubic* filter. Nothing about them is simulated. They are split train/val/test stratified by
    class with ``params.real_split``; every class is in every split. Ids ``real-<index>`` are the index in
    ``load_digits()`` so a sample can be traced back; labels are the human annotations.

Every sample's randomness comes from ``np.random.SeedSequence(seed, spawn_key=...)`` keyed by (domain, split,
scene, variation), so a sample does not depend on generation order and the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from s2r.config import SPLITS
from s2r.data.benchmark import BenchmarkSpec, DataError, DomainSpec, Sample

if TYPE_CHECKING:
    from PIL import ImageFont

    from s2r.config import DigitsParams

CLASSES = [str(d) for d in range(10)]
SUPERSAMPLE = 4  # glyphs are drawn at this multiple of the output size, then box-filtered down
BACKGROUNDS = ("flat", "gradient", "smooth", "stripes")
_REFERENCE_FONT = "DejaVuSans.ttf"  # matplotlib's default font: the template a "digit font" must match
_PROBE_SIZE = 48  # font size (px) for probing fonts
_SYNTHETIC, _REAL = 0, 1  # first element of every spawn key: which domain the randomness is for


# --------------------------------------------------------------------------------------------------- fonts


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(path: Path, size: int) -> ImageFont.FreeTypeFont:
    """Load a font once per (file, size): opening a TrueType file dominates the cost of drawing a glyph."""
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


def _probe_glyphs(path: Path) -> list[np.ndarray | None]:
    """Each digit's ink, cropped and resized to 16x16 (None where the glyph is empty), to vet a font."""
    from PIL import Image, ImageDraw

    font = _font(path, _PROBE_SIZE)
    out: list[np.ndarray | None] = []
    for d in CLASSES:
        im = Image.new("L", (2 * _PROBE_SIZE, 2 * _PROBE_SIZE))
        ImageDraw.Draw(im).text((_PROBE_SIZE, _PROBE_SIZE), d, font=font, fill=255, anchor="mm")
        box = im.getbbox()
        out.append(None if box is None else np.asarray(im.crop(box).resize((16, 16), Image.Resampling.BILINEAR), float))
    return out


def _standardise(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x - x.mean()) / (x.std() + 1e-8)
    return out


def available_fonts() -> list[Path]:
    """Matplotlib-bundled fonts whose 0-9 glyphs are real digits, sorted, so every machine renders the same.

    A font is kept when all ten glyphs are non-empty and pairwise distinct (drops display subsets and the
    last-resort font) and at least 6 of the 10 are nearest, by correlation, to the matching digit of
    matplotlib's default DejaVu Sans (drops symbol fonts such as cmsy10/cmex10 that map ASCII digits to
    other symbols).
    """
    return list(_vetted_fonts())


@functools.lru_cache(maxsize=1)
def _vetted_fonts() -> tuple[Path, ...]:
    paths = sorted(_font_dir().glob("*.ttf"))
    ref_path = _font_dir() / _REFERENCE_FONT
    ref = _probe_glyphs(ref_path) if ref_path in paths else None
    keep: list[Path] = []
    for p in paths:
        try:
            glyphs = _probe_glyphs(p)
        except OSError:  # unreadable font file: skip rather than fail the benchmark
            continue
        if any(g is None or g.max() == 0 for g in glyphs):
            continue
        if len({g.tobytes() for g in glyphs if g is not None}) != len(CLASSES):
            continue
        if ref is not None:
            templates = np.stack([_standardise(r) for r in ref if r is not None])  # (10, 16, 16)
            hits = sum(
                int(np.argmax((templates * _standardise(g)).sum(axis=(1, 2)))) == i
                for i, g in enumerate(glyphs)
                if g is not None
            )
            if hits < 6:
                continue
        keep.append(p)
    if not keep:
        raise DataError(f"{_font_dir()}: no bundled TrueType font renders the digits 0-9")
    return tuple(keep)


@functools.cache
def _digit_height_ratio(path: Path) -> float:
    """Mean digit ink height per pixel of font size, so a geometry's height means the same in every font."""
    from PIL import Image, ImageDraw

    font = _font(path, _PROBE_SIZE)
    heights = []
    for d in CLASSES:
        im = Image.new("L", (2 * _PROBE_SIZE, 2 * _PROBE_SIZE))
        ImageDraw.Draw(im).text((_PROBE_SIZE, _PROBE_SIZE), d, font=font, fill=255, anchor="mm")
        box = im.getbbox()
        if box is not None:
            heights.append(box[3] - box[1])
    return float(np.mean(heights)) / _PROBE_SIZE if heights else 0.7


# --------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class DigitGeometry:
    """What a scene fixes and all its variations share: which glyph and where, in fractions of the image."""

    font: Path
    height: float  # ink height of the font's digits as a fraction of the image height
    stroke: float  # extra outline (Pillow stroke_width) as a fraction of the image size
    rotation: float  # degrees, counter-clockwise
    shear: float  # horizontal shear: x += shear * y (about the glyph centre)
    dx: float  # translation of the glyph centre, fraction of the image size
    dy: float

    @classmethod
    def sample(cls, rng: np.random.Generator, fonts: list[Path]) -> DigitGeometry:
        """Draw a random geometry; ranges keep the glyph inside the frame."""
        return cls(
            font=fonts[int(rng.integers(len(fonts)))],
            height=float(rng.uniform(0.55, 0.8)),
            stroke=float(rng.uniform(0.0, 0.05)),
            rotation=float(rng.uniform(-12.0, 12.0)),
            shear=float(rng.uniform(-0.25, 0.25)),
            dx=float(rng.uniform(-0.05, 0.05)),
            dy=float(rng.uniform(-0.05, 0.05)),
        )


@dataclass(frozen=True)
class Nuisance:
    """What a variation re-draws: appearance only, never the digit's shape or position (intensities 0..1)."""

    background: str  # one of BACKGROUNDS
    bg_level: float  # darkest background intensity
    bg_amplitude: float  # texture contrast on top of bg_level
    angle: float  # gradient / stripe direction, radians
    frequency: float  # stripes: cycles per image; smooth: grid cells per side
    phase: float  # stripes phase, radians
    fg_level: float  # digit intensity (always brighter than the brightest background)
    blur: float  # Gaussian blur sigma as a fraction of the image size
    noise: float  # Gaussian noise standard deviation
    seed: int  # pixel-level randomness (smooth field, noise)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Nuisance:
        """Draw random appearance with the digit at least 0.2 brighter than any background pixel."""
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        fg_level = float(rng.uniform(0.6, 1.0))
        bg_level = float(rng.uniform(0.0, 0.3))
        amplitude = 0.0 if background == "flat" else float(rng.uniform(0.05, 0.35))
        amplitude = min(amplitude, max(fg_level - 0.2 - bg_level, 0.0))
        return cls(
            background=background,
            bg_level=bg_level,
            bg_amplitude=amplitude,
            angle=float(rng.uniform(0.0, 2 * math.pi)),
            frequency=float(rng.uniform(2.0, 6.0)),
            phase=float(rng.uniform(0.0, 2 * math.pi)),
            fg_level=fg_level,
            blur=float(rng.uniform(0.0, 0.04)),
            noise=float(rng.uniform(0.0, 0.06)),
            seed=int(rng.integers(2**63)),
        )


# ---------------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=256)
def _digit_mask(digit: int, geometry: DigitGeometry, image_size: int) -> np.ndarray:
    """Antialiased ink coverage (H, W) float32 in 0..1; cached so a scene's variations draw the glyph once."""
    from PIL import Image, ImageDraw

    big = image_size * SUPERSAMPLE
    size = max(4, round(geometry.height * big / _digit_height_ratio(geometry.font)))
    stroke = round(geometry.stroke * big)
    canvas = 2 * (size + stroke) + 8
    glyph = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(glyph).text(
        (canvas / 2, canvas / 2), str(digit), font=_font(geometry.font, size), fill=255, anchor="mm",
        stroke_width=stroke, stroke_fill=255,
    )
    box = glyph.getbbox()
    if box is None:
        raise DataError(f"font {geometry.font.name}: digit {digit} renders empty at size {size}")
    cx_in, cy_in = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    cx_out, cy_out = big / 2 + geometry.dx * big, big / 2 + geometry.dy * big
    # forward map about the glyph centre: A = R(theta) @ Shear; Image.transform wants output -> input = A^-1
    t = math.radians(geometry.rotation)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # counter-clockwise with y down
    forward = rot @ np.array([[1.0, geometry.shear], [0.0, 1.0]])
    inv = np.linalg.inv(forward)
    offset = np.array([cx_in, cy_in]) - inv @ np.array([cx_out, cy_out])
    coeffs = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    hi = glyph.transform((big, big), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    lo = hi.resize((image_size, image_size), Image.Resampling.BOX)  # exact 4x4 area average = antialiasing
    mask = np.asarray(lo, dtype=np.float32) / 255.0
    mask.setflags(write=False)
    return mask


def _background(n: Nuisance, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Background intensities (H, W) float32 in [bg_level, bg_level + bg_amplitude]."""
    from PIL import Image

    c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
    x, y = np.meshgrid(c, c)  # normalised coordinates in 0..1, same look at every image size
    u = x * math.cos(n.angle) + y * math.sin(n.angle)
    if n.background == "flat":
        field = np.zeros_like(x)
    elif n.background == "gradient":
        field = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif n.background == "stripes":
        field = 0.5 + 0.5 * np.sin(2 * math.pi * n.frequency * u + n.phase)
    elif n.background == "smooth":
        cells = max(2, round(n.frequency))
        grid = rng.uniform(0.0, 1.0, (cells, cells)).astype(np.float32)
        up = Image.fromarray(grid).resize((image_size, image_size), Image.Resampling.BICUBIC)
        field = np.asarray(up, dtype=np.float32)
        field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    else:
        raise DataError(f"unknown background {n.background!r}; known: {list(BACKGROUNDS)}")
    return (n.bg_level + n.bg_amplitude * field).astype(np.float32)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (numpy only, exact and deterministic)."""
    if sigma < 0.05:
        return img
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    h, w = img.shape
    pad = np.pad(img, r, mode="reflect") if r < min(h, w) else np.pad(img, r, mode="edge")
    rows = sum(k[i] * pad[:, i : i + w] for i in range(2 * r + 1))  # (H+2r, W)
    out: np.ndarray = sum(k[i] * rows[i : i + h, :] for i in range(2 * r + 1))  # (H, W)
    return out


def render_digit(digit: int, geometry: DigitGeometry, nuisance: Nuisance, image_size: int) -> np.ndarray:
    """Render one synthetic digit (H, W) uint8; the geometry alone decides the ink, so variations pair up."""
    if not 0 <= digit <= 9:
        raise DataError(f"digit {digit} is not in 0..9")
    mask = _digit_mask(int(digit), geometry, int(image_size))
    rng = np.random.default_rng(nuisance.seed)
    img = _background(nuisance, image_size, rng) * (1.0 - mask) + nuisance.fg_level * mask
    img = _gaussian_blur(img, nuisance.blur * image_size)
    if nuisance.noise > 0:
        img = img + rng.normal(0.0, nuisance.noise, img.shape).astype(np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------------------- real digits


def real_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's real digits as (N, H, W) uint8 bright-on-dark upsampled bicubically, and (N,) labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.empty((len(d.images), image_size, image_size), dtype=np.uint8)
    for i, small in enumerate(d.images):
        src = Image.fromarray((small * (255.0 / 16.0)).astype(np.float32))
        up = np.asarray(src.resize((image_size, image_size), Image.Resampling.BICUBIC))
        out[i] = np.clip(np.round(up), 0, 255).astype(np.uint8)  # bicubic overshoots: clip
    return out, d.target.astype(np.int64)


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> np.ndarray:
    """Split name per sample, stratified by label; every split gets at least one sample of every class."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_REAL,)))
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(fractions["val"] * len(idx)))
        n_test = max(1, round(fractions["test"] * len(idx)))
        if len(idx) - n_val - n_test < 1:
            raise DataError(f"class {c}: {len(idx)} samples cannot fill train/val/test with {fractions}")
        out[idx[:n_val]] = "val"
        out[idx[n_val : n_val + n_test]] = "test"
        out[idx[n_val + n_test :]] = "train"
    return out


# ---------------------------------------------------------------------------------------------- benchmark


def _spec(params: DigitsParams) -> BenchmarkSpec:
    return BenchmarkSpec(
        name="digits",
        tasks=["classification"],
        domains=[
            DomainSpec(
                "synthetic", "source",
                description=(
                    "Simulated: digits rendered from matplotlib's bundled TrueType fonts with random font, "
                    f"size, stroke, rotation, shear and translation; {params.variations} variations per "
                    "scene share the geometry and re-draw background texture, intensity, blur and noise."
                ),
            ),
            DomainSpec(
                "real", "target",
                description=(
                    "Real: the 1,797 handwritten digits shipped with scikit-learn (load_digits, 8x8), "
                    f"bright ink on dark, bicubically upsampled to {params.image_size}px; ids are "
                    "load_digits indices."
                ),
            ),
        ],
        source="synthetic",
        target="real",
        image_size=params.image_size,
        channels=1,
        classes=list(CLASSES),
        description="Font-rendered synthetic digits (source) vs real handwritten digits (target), grey.",
    )


def _synthetic_samples(params: DigitsParams, seed: int) -> Iterator[Sample]:
    fonts = available_fonts()
    offset = 0
    for s_idx, split in enumerate(SPLITS):
        n_scenes = params.scenes_per_class[split] * len(CLASSES)
        for j in range(n_scenes):
            digit = j % len(CLASSES)
            scene_id = offset + j
            geo_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SYNTHETIC, s_idx, j, 0)))
            geometry = DigitGeometry.sample(geo_rng, fonts)
            for v in range(params.variations):
                key = (_SYNTHETIC, s_idx, j, v + 1)  # variation v's own stream; 0 is the geometry's
                v_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
                yield Sample(
                    id=f"synthetic-{split}-s{scene_id:06d}-v{v}",
                    domain="synthetic",
                    split=split,
                    image=render_digit(digit, geometry, Nuisance.sample(v_rng), params.image_size),
                    label=digit,
                    scene_id=scene_id,
                    variation=v,
                )
        offset += n_scenes


def _real_samples(params: DigitsParams, seed: int) -> Iterator[Sample]:
    images, labels = real_digits(params.image_size)
    splits = stratified_split(labels, params.real_split, seed)
    for i in range(len(labels)):
        yield Sample(
            id=f"real-{i:05d}", domain="real", split=str(splits[i]), image=images[i], label=int(labels[i])
        )


def generate(params: DigitsParams, seed: int) -> tuple[BenchmarkSpec, Iterator[Sample]]:
    """Describe the digits benchmark and lazily yield its samples (synthetic, then real)."""
    params.validate()
    spec = _spec(params)
    spec.validate()

    def samples() -> Iterator[Sample]:
        yield from _synthetic_samples(params, seed)
        yield from _real_samples(params, seed)

    return spec, samples()
