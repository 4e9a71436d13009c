"""Tests of the embedded `scenes` generator: geometry, factors, domains, determinism and the written benchmark."""

from __future__ import annotations

import colorsys
import inspect
import itertools
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_section
from s2r.config import ScenesParams
from s2r.data import scenes
from s2r.data.benchmark import NO_LABEL, SPLITS, load_benchmark, resolve_path, write_benchmark
from s2r.data.scenes import (
    DOMAINS,
    FACTOR_NAMES,
    factor_sizes,
    generate,
    render_scene,
    sample_factors,
    sample_pair,
)

SIZE = 32
BASE = {"shape": 0, "hue": 0, "size": 2, "pos_x": 4, "pos_y": 4, "rotation": 2, "light": 0}


def _render(domain: str = "sim", seed: int = 0, px: int = SIZE, **changes: int):
    return render_scene({**BASE, **changes}, domain, px, np.random.default_rng(seed))


def _object(mask: np.ndarray) -> np.ndarray:
    return mask >= 2


def test_factor_sizes_order_and_hues() -> None:
    sizes = factor_sizes()
    assert tuple(sizes) == FACTOR_NAMES
    assert sizes == {"shape": 4, "hue": 12, "size": 3, "pos_x": 8, "pos_y": 8, "rotation": 8, "light": 4}
    assert factor_sizes(hues=16)["hue"] == 16


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_shapes_dtypes_and_ranges(domain: str) -> None:
    rgb, depth, mask = _render(domain)
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    assert depth.shape == (SIZE, SIZE) and depth.dtype == np.float32
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert np.isfinite(depth).all() and (depth > 0).all()  # background is real geometry: no invalid pixels
    assert set(np.unique(mask)) <= set(range(len(scenes.SEG_CLASSES)))


@pytest.mark.parametrize("size", [64, 128])
def test_larger_image_sizes(size: int) -> None:
    rgb, depth, mask = _render("pseudo_real", px=size)
    assert rgb.shape == (size, size, 3) and depth.shape == mask.shape == (size, size)
    assert _object(mask).sum() > _object(_render("sim")[2]).sum()  # same scene, more pixels


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_given_rng(domain: str) -> None:
    a, b = _render(domain, seed=3), _render(domain, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_pseudo_real_depends_on_rng_seed() -> None:
    assert not np.array_equal(_render("pseudo_real", seed=1)[0], _render("pseudo_real", seed=2)[0])


@pytest.mark.parametrize("shape", range(4))
def test_mask_holds_the_shape_class_table_and_background(shape: int) -> None:
    _, _, mask = _render(shape=shape)
    present = set(np.unique(mask).tolist())
    assert present == {0, 1, 2 + shape}
    assert scenes.SEG_CLASSES[2 + shape] == scenes.CLASSES[shape]


def test_depth_grows_up_the_table_and_objects_are_in_front() -> None:
    _, depth, mask = _render(shape=1)
    table_cols = np.flatnonzero((mask[0] == 1) | (mask[0] == 0))
    # The camera looks down: along every column the bottom row (near table) is nearer than the top row.
    assert (depth[0, table_cols] > depth[-1, table_cols]).all()
    has_table = (mask == 1).any(1)
    rows = np.array([depth[i][mask[i] == 1].mean() for i in np.flatnonzero(has_table)])
    assert (np.diff(rows) < 0).all()  # z-depth of the table falls monotonically from top to bottom
    obj = _object(mask)
    for col in np.flatnonzero(obj.any(0)):
        top = np.flatnonzero(obj[:, col])[0]
        assert top > 0
        # The surface just above the object's top edge in this column is behind it.
        assert depth[top - 1, col] > depth[obj[:, col], col].max()


def test_toy_is_flat_and_sim_is_shaded() -> None:
    toy, _, _ = _render("toy")
    sim, _, _ = _render("sim")
    n_toy = len(np.unique(toy.reshape(-1, 3), axis=0))
    n_sim = len(np.unique(sim.reshape(-1, 3), axis=0))
    assert n_toy <= 6  # wall, floor, table, shadow, object, painted sector
    assert n_sim >= 30  # shading, soft shadow and anti-aliasing make many colours


def _interior(obj: np.ndarray) -> np.ndarray:
    inner = obj.copy()
    inner[1:] &= obj[:-1]
    inner[:-1] &= obj[1:]
    inner[:, 1:] &= obj[:, :-1]
    inner[:, :-1] &= obj[:, 1:]
    return inner


def test_pseudo_real_differs_from_sim_but_stays_correlated() -> None:
    rng = np.random.default_rng(7)
    for k in range(4):
        f = sample_factors(rng, factor_sizes())
        sim, _, mask = render_scene(f, "sim", 64, np.random.default_rng(k))
        real, _, mask_r = render_scene(f, "pseudo_real", 64, np.random.default_rng(k))
        np.testing.assert_array_equal(mask, mask_r)  # same geometry, same ground truth
        assert np.abs(sim.astype(int) - real.astype(int)).mean() > 5
        obj = _object(mask)
        r = np.corrcoef(sim[obj].reshape(-1).astype(float), real[obj].reshape(-1).astype(float))[0, 1]
        assert r > 0.6, f"object pixels decorrelated (r={r:.2f}) for {f}"
        dh = abs(_mean_hue(sim, _interior(obj)) - _mean_hue(real, _interior(obj)))
        assert min(dh, 1 - dh) < 1 / factor_sizes()["hue"], f"object hue lost for {f}"


def test_pseudo_real_camera_adds_pixel_noise() -> None:
    flat = np.full((32, 32, 3), 0.5)
    for k in range(5):
        out = scenes._camera(flat, np.random.default_rng(k)).astype(float)
        # Vignetting and exposure are smooth; only sensor noise (through JPEG) makes neighbours differ.
        assert np.diff(out, axis=1).std() > 1.5


def test_objects_are_nearer_than_the_table_they_hide() -> None:
    _, depth_a, mask_a = _render(pos_x=0)
    _, depth_b, mask_b = _render(pos_x=7)
    hidden = _object(mask_a) & (mask_b == 1)  # table in b, covered by the object in a
    assert hidden.sum() > 5
    assert (depth_a[hidden] < depth_b[hidden]).all()


def test_generate_uses_distinct_settings_on_a_tiny_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {"shape": 2, "hue": 2, "size": 1, "pos_x": 2, "pos_y": 1, "rotation": 1, "light": 1}
    monkeypatch.setattr(scenes, "factor_sizes", lambda hues=12: dict(tiny))
    _, samples = generate(_small({"train": 4, "val": 2, "test": 2}), seed=3)
    settings = [tuple(s.factors.values()) for s in samples if s.domain == "sim"]
    assert sorted(settings) == sorted(itertools.product(*(range(n) for n in tiny.values())))


def test_seed_changes_pseudo_real_of_the_same_scene(monkeypatch: pytest.MonkeyPatch) -> None:
    one = {name: 1 for name in FACTOR_NAMES}  # a grid with a single setting: both seeds render it
    monkeypatch.setattr(scenes, "factor_sizes", lambda hues=12: dict(one))
    params = _small({"train": 1, "val": 0, "test": 0})
    a = {s.domain: s.image for s in generate(params, seed=0)[1]}
    b = {s.domain: s.image for s in generate(params, seed=1)[1]}
    np.testing.assert_array_equal(a["sim"], b["sim"])
    assert not np.array_equal(a["pseudo_real"], b["pseudo_real"])


def _mean_hue(rgb: np.ndarray, where: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*(rgb[where].mean(0) / 255.0))[0]


def test_hue_changes_object_colour_only() -> None:
    sizes = factor_sizes()
    a_rgb, a_depth, a_mask = _render("sim", hue=0)
    b_rgb, b_depth, b_mask = _render("sim", hue=sizes["hue"] // 3)  # 120 degrees round the colour wheel
    np.testing.assert_array_equal(a_mask, b_mask)
    np.testing.assert_array_equal(a_depth, b_depth)
    obj = _object(a_mask)
    assert _mean_hue(a_rgb, obj) == pytest.approx(0.0, abs=0.04) or _mean_hue(a_rgb, obj) > 0.96
    assert _mean_hue(b_rgb, obj) == pytest.approx(1 / 3, abs=0.04)
    toy_a, _, _ = _render("toy", hue=0)
    toy_b, _, _ = _render("toy", hue=5)
    np.testing.assert_array_equal(toy_a[~obj], toy_b[~obj])  # nothing but the object changes colour
    assert (toy_a[obj] != toy_b[obj]).any(-1).all()


def test_pos_x_moves_the_object_right_monotonically() -> None:
    centroids = []
    for x in range(factor_sizes()["pos_x"]):
        _, _, mask = _render("toy", pos_x=x)
        centroids.append(np.nonzero(_object(mask))[1].mean())
    assert (np.diff(centroids) > 0).all(), centroids


def test_pos_y_moves_the_object_up_and_away() -> None:
    tops, depths = [], []
    for y in range(factor_sizes()["pos_y"]):
        _, depth, mask = _render("toy", pos_y=y)
        obj = _object(mask)
        tops.append(np.nonzero(obj)[0].mean())
        depths.append(depth[obj].min())
    assert (np.diff(tops) < 0).all() and (np.diff(depths) > 0).all()


def test_size_grows_the_object() -> None:
    areas = [_object(_render("toy", px=64, size=s)[2]).sum() for s in range(3)]
    assert areas[0] < areas[1] < areas[2]


@pytest.mark.parametrize("shape", range(4))
def test_rotation_is_visible_for_every_shape(shape: int) -> None:
    a, _, _ = _render("toy", shape=shape, rotation=0)
    b, _, _ = _render("toy", shape=shape, rotation=6)
    assert not np.array_equal(a, b)


def test_light_is_visible_even_in_toy() -> None:
    images = [_render("toy", light=k)[0] for k in range(factor_sizes()["light"])]
    for a, b in itertools.combinations(images, 2):
        assert not np.array_equal(a, b)  # the flat cast shadow moves


def test_render_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="domain"):
        render_scene(BASE, "real", SIZE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="pos_x"):
        render_scene({**BASE, "pos_x": 8}, "sim", SIZE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="light"):
        render_scene({k: v for k, v in BASE.items() if k != "light"}, "sim", SIZE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="split"):
        render_scene(BASE, "pseudo_real", SIZE, np.random.default_rng(0), split="holdout")


def test_sample_factors_in_range() -> None:
    sizes = factor_sizes()
    rng = np.random.default_rng(0)
    draws = [sample_factors(rng, sizes) for _ in range(300)]
    for name, n in sizes.items():
        values = {d[name] for d in draws}
        assert values == set(range(n))


@pytest.mark.parametrize("k", range(1, len(FACTOR_NAMES)))
def test_sample_pair_differs_in_exactly_k(k: int) -> None:
    sizes = factor_sizes()
    rng = np.random.default_rng(k)
    for _ in range(50):
        f1, f2, changed = sample_pair(rng, sizes, k)
        differ = [n for n in FACTOR_NAMES if f1[n] != f2[n]]
        assert differ == changed and len(changed) == k
        assert all(0 <= f2[n] < sizes[n] for n in FACTOR_NAMES)


def test_sample_pair_default_k_is_uniform_over_1_to_n_minus_1() -> None:
    rng = np.random.default_rng(0)
    ks = [len(sample_pair(rng, factor_sizes())[2]) for _ in range(600)]
    assert set(ks) == set(range(1, len(FACTOR_NAMES)))
    with pytest.raises(ValueError, match="k="):
        sample_pair(rng, factor_sizes(), k=len(FACTOR_NAMES) + 1)


def test_photo_crops_come_from_disjoint_bands_per_split(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake photos whose red and green channels encode the column, so a crop tells which columns it came from.
    col = np.arange(640)
    code = np.stack([col // 256, col % 256, np.zeros_like(col)], -1).astype(np.uint8)  # (640, 3)
    photo = np.broadcast_to(code[None], (427, 640, 3))
    monkeypatch.setattr(scenes, "_photos", lambda: (photo, photo))
    seen: dict[str, set[int]] = {}
    for split in SPLITS:
        rng = np.random.default_rng(0)
        seen[split] = set()
        for _ in range(30):
            crop = np.round(scenes._photo_crop(rng, split) * 255).astype(int)
            seen[split] |= set((crop[..., 0] * 256 + crop[..., 1]).reshape(-1).tolist())
    assert max(seen["train"]) < 400 <= min(seen["val"]) and max(seen["val"]) < 520 <= min(seen["test"])


def _small(samples: dict[str, int] | None = None, hues: int = 12) -> ScenesParams:
    return tiny_section(ScenesParams, "benchmarks.scenes", image_size=SIZE,
                        samples=samples or {"train": 3, "val": 2, "test": 2}, hues=hues)


def test_generate_spec_and_lazy_samples() -> None:
    spec, samples = generate(_small(), seed=0)
    assert inspect.isgenerator(samples)
    assert spec.name == "scenes" and spec.source == "sim" and spec.target == "pseudo_real"
    assert spec.factors == factor_sizes() and spec.classes == list(scenes.CLASSES)
    assert spec.seg_classes == list(scenes.SEG_CLASSES) and spec.has_depth and spec.has_mask
    target = spec.domain("pseudo_real")
    assert target.simulated_real and "NOT real data" in target.description
    assert {d.name: d.role for d in spec.domains} == {
        "toy": "auxiliary",
        "sim": "source",
        "pseudo_real": "target",
    }
    items = list(samples)
    assert len(items) == 7 * len(DOMAINS)
    assert items[0].id == "toy-train-00000" and items[-1].id == "pseudo_real-test-00001"
    by_scene: dict[int, list] = {}
    for s in items:
        by_scene.setdefault(s.scene_id, []).append(s)
        assert s.label == s.factors["shape"] != NO_LABEL and s.variation == DOMAINS.index(s.domain)
    assert len(by_scene) == 7
    for group in by_scene.values():
        assert [s.domain for s in group] == list(DOMAINS)
        assert all(g.factors == group[0].factors for g in group)
    settings = {tuple(g[0].factors.values()) for g in by_scene.values()}
    assert len(settings) == 7  # distinct settings: no repeated image across splits


def test_generate_is_deterministic_and_seeded() -> None:
    a = list(generate(_small(), seed=5)[1])
    b = list(generate(_small(), seed=5)[1])
    c = list(generate(_small(), seed=6)[1])
    for x, y in zip(a, b):
        assert x.id == y.id and x.factors == y.factors
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.depth, y.depth)
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_generate_rejects_more_samples_than_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scenes, "factor_sizes", lambda hues=12: {"shape": 2, "hue": 2})
    with pytest.raises(ValueError, match="settings"):
        generate(_small({"train": 3, "val": 1, "test": 1}), seed=0)


def test_generate_then_write_benchmark(tmp_path: Path) -> None:
    spec, samples = generate(_small(), seed=1)
    root = write_benchmark(tmp_path / "scenes", spec, samples, progress=False)
    loaded, manifest = load_benchmark(root)
    assert loaded.factors == spec.factors and loaded.domain("pseudo_real").simulated_real
    assert set(manifest["domain"]) == set(DOMAINS) and set(manifest["split"]) == set(SPLITS)
    assert len(manifest) == 7 * len(DOMAINS)
    for name in FACTOR_NAMES:
        col = manifest[f"factor_{name}"]
        assert col.between(0, spec.factors[name] - 1).all()
    assert (manifest["label"] == manifest["factor_shape"]).all()
    assert manifest["sha256"].is_unique  # no image repeats, within or across splits
    assert manifest.groupby("scene_id")["domain"].nunique().eq(len(DOMAINS)).all()
    from PIL import Image

    for rel in list(manifest["depth_path"]) + list(manifest["mask_path"]):
        assert resolve_path(root, rel).is_file()
    row = manifest.iloc[0]
    depth_mm = np.asarray(Image.open(resolve_path(root, row["depth_path"])))
    mask = np.asarray(Image.open(resolve_path(root, row["mask_path"])))
    assert depth_mm.shape == mask.shape == (SIZE, SIZE)
    assert (depth_mm > 0).all() and 2 + row["label"] in np.unique(mask)
