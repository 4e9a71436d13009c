"""The embedded digits benchmark: fonts, paired variations, real-data fidelity, determinism, learnability."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.neighbors import NearestCentroid

from conftest import tiny_section
from s2r.config import DigitsParams
from s2r.data.benchmark import SPLITS, BenchmarkSpec, Sample, load_benchmark, write_benchmark
from s2r.data.digits import (
    DigitGeometry,
    Nuisance,
    available_fonts,
    generate,
    render_digit,
    stratified_split,
)

Small = tuple[BenchmarkSpec, list[Sample]]
SMALL = tiny_section(DigitsParams, "benchmarks.digits", image_size=20,
                     scenes_per_class={"train": 3, "val": 1, "test": 1}, variations=3)


def _samples(params: DigitsParams, seed: int) -> tuple[BenchmarkSpec, list[Sample]]:
    spec, it = generate(params, seed)
    return spec, list(it)


@pytest.fixture(scope="module")
def small() -> Small:
    return _samples(SMALL, 0)


def _clean(bg_level: float = 0.0, fg_level: float = 1.0) -> Nuisance:
    """A nuisance without texture, blur or noise, so the rendered ink can be read back exactly."""
    return Nuisance(
        background="flat",
        bg_level=bg_level,
        bg_amplitude=0.0,
        angle=0.0,
        frequency=3.0,
        phase=0.0,
        fg_level=fg_level,
        blur=0.0,
        noise=0.0,
        seed=0,
    )


def test_fonts_are_matplotlib_bundled_digit_fonts() -> None:
    fonts = available_fonts()
    ttf = (Path(matplotlib.get_data_path()) / "fonts" / "ttf").resolve()
    assert len(fonts) >= 5
    assert fonts == sorted(fonts)
    assert all(p.resolve().parent == ttf and p.suffix == ".ttf" for p in fonts)
    names = {p.name for p in fonts}
    assert "DejaVuSans.ttf" in names
    # symbol / fallback fonts map ASCII digits to non-digits or to one box: they must be filtered out
    for bad in ("cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"):
        assert bad not in names


def test_render_digit_is_bright_ink_on_darker_background() -> None:
    rng = np.random.default_rng(0)
    geo = DigitGeometry.sample(rng, available_fonts())
    ink = render_digit(3, geo, _clean(), 32)
    assert ink.shape == (32, 32) and ink.dtype == np.uint8
    mask = ink > 127
    assert 0.05 < mask.mean() < 0.6  # a glyph, neither empty nor filling the frame
    for _ in range(20):
        img = render_digit(3, geo, Nuisance.sample(rng), 32).astype(float)
        assert img[mask].mean() > img[~mask].mean() + 20


def test_variations_share_geometry_exactly() -> None:
    geo = DigitGeometry.sample(np.random.default_rng(1), available_fonts())
    a = render_digit(7, geo, _clean(bg_level=0.1, fg_level=0.9), 24).astype(float)
    b = render_digit(7, geo, _clean(bg_level=0.3, fg_level=0.7), 24).astype(float)
    assert not np.array_equal(a, b)
    # flat backgrounds: the ink coverage (img - bg) / (fg - bg) is the same glyph in both
    np.testing.assert_allclose((a - 25.5) / 204, (b - 76.5) / 102, atol=0.02)
    other = DigitGeometry.sample(np.random.default_rng(2), available_fonts())
    c = render_digit(7, other, _clean(bg_level=0.1, fg_level=0.9), 24).astype(float)
    assert np.abs(a - c).mean() > 5


def test_generated_variations_overlap_more_than_other_scenes(small: Small) -> None:
    synthetic = [s for s in small[1] if s.domain == "synthetic"]
    by_scene: dict[int, list[Sample]] = {}
    for s in synthetic:
        by_scene.setdefault(int(s.scene_id), []).append(s)  # type: ignore[arg-type]

    def iou(x: np.ndarray, y: np.ndarray) -> float:
        fx, fy = x > np.percentile(x, 75), y > np.percentile(y, 75)
        return float((fx & fy).sum() / max((fx | fy).sum(), 1))

    pairs = [(v[0], v[k]) for v in by_scene.values() for k in range(1, len(v))]
    assert pairs and all(not np.array_equal(a.image, b.image) for a, b in pairs)
    within = [iou(a.image, b.image) for a, b in pairs]
    assert all(len({s.label for s in v}) == 1 for v in by_scene.values())
    scenes = [v[0] for v in by_scene.values()]
    between = [
        iou(a.image, b.image) for i, a in enumerate(scenes) for b in scenes[i + 1 :] if a.label == b.label
    ]
    assert between
    assert np.mean(within) > np.mean(between) + 0.15


def test_spec_and_synthetic_counts(small: Small) -> None:
    spec, samples = small
    assert spec.name == "digits" and spec.tasks == ["classification"]
    assert [(d.name, d.role) for d in spec.domains] == [("synthetic", "source"), ("real", "target")]
    assert (spec.source, spec.target, spec.channels, spec.image_size) == ("synthetic", "real", 1, 20)
    assert spec.classes == [str(i) for i in range(10)]
    synthetic = [s for s in samples if s.domain == "synthetic"]
    for split in SPLITS:
        rows = [s for s in synthetic if s.split == split]
        assert len(rows) == SMALL.scenes_per_class[split] * 10 * SMALL.variations
        assert np.bincount([s.label for s in rows], minlength=10).tolist() == [len(rows) // 10] * 10
        assert {s.variation for s in rows} == set(range(SMALL.variations))
    assert len({s.id for s in samples}) == len(samples)
    scene_split = {(s.scene_id, s.split) for s in synthetic}
    assert len(scene_split) == len({s.scene_id for s in synthetic})  # no scene in two splits
    assert all(s.image.shape == (20, 20) and s.image.dtype == np.uint8 for s in samples)
    s = synthetic[4]
    assert s.id == f"synthetic-{s.split}-s{s.scene_id:06d}-v{s.variation}"


def test_same_seed_same_bytes_different_seed_differs(small: Small) -> None:
    again = _samples(SMALL, 0)[1]
    assert [s.id for s in again] == [s.id for s in small[1]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, small[1], strict=True))
    other = {s.id: s for s in _samples(SMALL, 1)[1]}
    synthetic = [s for s in small[1] if s.domain == "synthetic"]
    assert sum(not np.array_equal(s.image, other[s.id].image) for s in synthetic) > 0.9 * len(synthetic)
    real = [s for s in small[1] if s.domain == "real"]
    assert sum(s.split != other[s.id].split for s in real) > 100  # the real split is reshuffled too


def test_samples_do_not_depend_on_generation_order(small: Small) -> None:
    # more scenes and fewer variations: the shared train scenes' variation 0 must be byte-identical
    bigger = dataclasses.replace(SMALL, scenes_per_class={"train": 5, "val": 2, "test": 1}, variations=1)
    ref = {s.id: s.image for s in small[1] if s.variation == 0 and s.split == "train"}
    got = {s.id: s.image for s in _samples(bigger, 0)[1] if s.split == "train"}
    assert ref and set(ref) <= set(got)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


def test_real_domain_is_sklearn_digits(small: Small) -> None:
    digits = load_digits()
    real = [s for s in small[1] if s.domain == "real"]
    assert len(real) == 1797 == len(digits.target)
    assert [s.id for s in real] == [f"real-{i:05d}" for i in range(1797)]
    assert [s.label for s in real] == digits.target.tolist()
    assert all(s.scene_id is None for s in real)
    # stratified: every class in every split, in roughly the requested fractions, and no sample in two splits
    splits = np.array([s.split for s in real])
    for split, frac in SMALL.real_split.items():
        counts = np.bincount(digits.target[splits == split], minlength=10)
        assert counts.min() > 0
        assert abs(counts.sum() / 1797 - frac) < 0.02
    assert len({s.id for s in real}) == 1797
    # the upsampled image averaged back to 8x8 is the original digit (bright ink = high sklearn value)
    for i in (0, 42, 1796):
        img = Image.fromarray(real[i].image.astype(np.float32)).resize((8, 8), Image.BOX)
        corr = np.corrcoef(np.asarray(img).ravel(), digits.images[i].ravel())[0, 1]
        assert corr > 0.95


def test_stratified_split_keeps_every_class_everywhere() -> None:
    labels = np.repeat(np.arange(3), [3, 10, 50])
    out = stratified_split(labels, {"train": 0.9, "val": 0.05, "test": 0.05}, seed=3)
    for split in SPLITS:
        assert set(labels[out == split]) == {0, 1, 2}
    assert np.array_equal(out, stratified_split(labels, {"train": 0.9, "val": 0.05, "test": 0.05}, seed=3))


def test_write_benchmark_manifest(tmp_path: Path) -> None:
    params = tiny_section(DigitsParams, "benchmarks.digits", image_size=16,
                          scenes_per_class={"train": 1, "val": 1, "test": 1}, variations=2)
    spec, samples = generate(params, 5)
    root = write_benchmark(tmp_path / "digits", spec, samples, progress=False)
    loaded, manifest = load_benchmark(root)
    assert loaded == spec
    assert {"label", "scene_id", "variation"} <= set(manifest.columns)
    for domain in ("synthetic", "real"):
        assert set(manifest.loc[manifest.domain == domain, "split"]) == set(SPLITS)
    syn = manifest[manifest.domain == "synthetic"]
    assert len(syn) == 3 * 10 * 2 and syn.scene_id.notna().all()
    assert set(syn.variation) == {0, 1}
    assert (manifest[manifest.domain == "real"].shape[0]) == 1797
    assert manifest.sha256.is_unique
    assert set(manifest.label) == set(range(10))
    first = manifest.iloc[0]
    assert np.asarray(Image.open(root / first.path)).shape == (16, 16)


def test_synthetic_digits_transfer_to_real_above_chance() -> None:
    """A polarity, orientation or labelling bug in the renderer would drop this to chance (10%)."""
    params = tiny_section(DigitsParams, "benchmarks.digits", image_size=16,
                          scenes_per_class={"train": 30, "val": 1, "test": 1}, variations=1)
    _, samples = _samples(params, 0)
    train = [s for s in samples if s.domain == "synthetic" and s.split == "train"]
    real = [s for s in samples if s.domain == "real"]
    x = np.stack([s.image.ravel() for s in train]) / 255.0
    xr = np.stack([s.image.ravel() for s in real]) / 255.0
    clf = NearestCentroid().fit(x, [s.label for s in train])
    acc = float((clf.predict(xr) == np.array([s.label for s in real])).mean())
    assert acc > 0.3, acc
