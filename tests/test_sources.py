"""Real-dataset adapters on tiny copies written in each dataset's published layout (file names, array keys,
label encodings): counts, labels, factors, depth scale, class maps, paper 1's TICaM rules, clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from s2r.cli import main
from s2r.data import sources
from s2r.data.benchmark import DataError, load_benchmark, resolve_path
from s2r.data.prepared import PreparedBenchmark, prepare
from s2r.data.sources import driving, interior, misc, mpi3d, objects
from s2r.data.sources.common import assign_splits, verify_checksums
from s2r.data.sources.generic import merge
from s2r.data.validation import validate_benchmark

REPO = Path(__file__).resolve().parents[1]

GRID = {"object_color": 2, "object_shape": 2, "object_size": 2, "camera_height": 1, "background_color": 1,
        "horizontal_axis": 2, "vertical_axis": 2}


def _add(*args: object, **kwargs: object) -> Path:
    return Path(sources.add(*args, **kwargs)["benchmark"])  # type: ignore[arg-type]


def _img(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(resolve_path(root, rel)))


# ----------------------------------------------------------------------------------------------------------
# MPI3D


def test_mpi3d_factor_grid_in_index_order_and_large_only(tmp_path: Path) -> None:
    raw = mpi3d.fixture(tmp_path / "raw", GRID)
    assert isinstance(mpi3d.open_images(raw / "mpi3d_real.npz"), np.memmap)  # stored npz member -> memory map
    out = _add("mpi3d", raw, tmp_path / "b", options={"factor_sizes": GRID})
    spec, df = load_benchmark(out)
    n = int(np.prod(list(GRID.values())))
    assert spec.factors == GRID and spec.tasks == ["factors"] and len(df) == 3 * n
    assert (spec.source, spec.target) == ("realistic", "real") and spec.image_size == 8
    for _, r in df.sample(12, random_state=0).iterrows():
        want = np.unravel_index(int(r["scene_id"]), tuple(GRID.values()))  # C order: first factor slowest
        assert [r[f"factor_{k}"] for k in GRID] == list(want)
        px = _img(out, r["path"])
        k = mpi3d.VARIANTS.index(r["domain"])
        assert px[4, 4, 0] == want[0] * 60 + 20 * k and px[4, 4, 1] == want[2] * 100 + 10
    # the same scene is in the same split in every domain (paired sampling, no leakage)
    assert df.groupby("scene_id")["split"].nunique().max() == 1
    large = _add("mpi3d", raw, tmp_path / "l", options={"factor_sizes": GRID, "large_only": True})
    _, dl = load_benchmark(large)
    assert len(dl) == 3 * n // 2 and set(dl["factor_object_size"]) == {1}
    assert load_benchmark(large)[0].expectations == {"domain_rows": {v: n // 2 for v in mpi3d.VARIANTS}}


def test_mpi3d_published_grid_and_errors(tmp_path: Path) -> None:
    assert int(np.prod(list(mpi3d.FACTORS.values()))) == 1_036_800
    raw = mpi3d.fixture(tmp_path / "raw", GRID)
    with pytest.raises(DataError, match="expected \\(1036800") as e:  # published grid, fixture-sized file
        _add("mpi3d", raw, tmp_path / "b")
    assert "mpi3d_" in str(e.value)
    np.savez(raw / "mpi3d_toy.npz", pictures=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="no array 'images'") as e:
        _add("mpi3d", raw, tmp_path / "b", options={"factor_sizes": GRID})
    assert "mpi3d_toy.npz" in str(e.value)
    data = (raw / "mpi3d_real.npz").read_bytes()
    (raw / "mpi3d_real.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="mpi3d_real.npz"):
        mpi3d.open_images(raw / "mpi3d_real.npz")
    with pytest.raises(DataError, match="get it from: https://github.com/rr-learning"):
        _add("mpi3d", tmp_path / "empty_dir_missing", tmp_path / "b")


def test_mpi3d_compressed_npz_falls_back_to_loading(tmp_path: Path) -> None:
    a = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez_compressed(tmp_path / "c.npz", images=a)
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert z.getinfo("images.npy").compress_type != zipfile.ZIP_STORED
    assert np.array_equal(mpi3d.open_images(tmp_path / "c.npz"), a)


# ----------------------------------------------------------------------------------------------------------
# SVIRO / SVIRO-Illumination / TICaM (paper 1, appendix A.1)


def test_sviro_labels_64_classes_and_removed_images(tmp_path: Path) -> None:
    raw = interior.sviro_fixture(tmp_path / "raw", n=12)
    out = _add("sviro", raw, tmp_path / "b", options={"image_size": 16})
    spec, df = load_benchmark(out)
    assert len(spec.classes) == 64 and spec.classes[0] == "empty-empty-empty"
    assert spec.classes[63] == "adult-adult-adult" and spec.channels == 1
    # fixture codes per image index: 12 per vehicle; (5,0,0) and (2,6,1) hold empty infant/child seats -> removed
    assert len(df) == 2 * 10 and not df["id"].str.contains("imageID_3_|imageID_4_").any()
    row = df[df["id"] == "tesla-tesla_train_imageID_2_GT_4_0_3"].iloc[0]  # everyday object (4) -> empty
    assert spec.classes[row["label"]] == "empty-empty-adult"
    row = df[df["id"] == "tesla-tesla_train_imageID_5_GT_1_4_3"].iloc[0]
    assert row["label"] == 1 * 16 + 0 * 4 + 3
    assert set(df["split"]) == {"train", "val", "test"}  # train_only (A.1.2): test comes from train too
    # benchmark.yaml carries the seat structure: mirrored = left and right swapped; parts = seats left to right
    assert spec.mirror_classes[1 * 16 + 0 * 4 + 3] == 3 * 16 + 0 * 4 + 1 and spec.class_parts[19] == [1, 0, 3]
    outer = _add("sviro", raw, tmp_path / "o", options={"seats": "outer", "image_size": 16})
    so, do = load_benchmark(outer)
    assert so.classes == interior.seat_class_names(2)
    assert so.classes[do[do["id"] == "tesla-tesla_train_imageID_1_GT_3_1_2"].iloc[0]["label"]] == "adult-child"


def test_sviro_illumination_variations_share_scene_and_split(tmp_path: Path) -> None:
    raw = interior.sviro_fixture(tmp_path / "raw", vehicles=("kodiaq", "cayenne"), n=12, illumination=True)
    spec, df = load_benchmark(_add("sviro_illumination", raw, tmp_path / "b", options={"image_size": 8}))
    assert spec.source == "kodiaq" and (df["variation"] == 1).sum() == len(df) // 2
    assert df.groupby(["domain", "scene_id", df["id"].str.contains("_test_")])["split"].nunique().max() == 1
    assert (df[df["id"].str.contains("_test_")]["split"] == "test").all()  # A.1.3: published test images used


def test_sviro_bad_file_name_names_file(tmp_path: Path) -> None:
    raw = interior.sviro_fixture(tmp_path / "raw", n=4)
    bad = raw / "tesla" / "train" / "grayscale_wholeImage" / "tesla_train_image_7.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(bad)
    with pytest.raises(DataError, match="imageID_<id>_GT_") as e:
        _add("sviro", raw, tmp_path / "b")
    assert str(bad) in str(e.value)


@pytest.mark.parametrize(("code", "cls"), [
    ("0", 0), ("o01", 0), ("s01o", 0),                          # a 0 or containing an o -> empty
    ("p", 3), ("p01", 3),                                        # containing a p -> adult
    ("s03", 2), ("s13", 2), ("s04", 2), ("s14", 2),              # child seats
    ("s01g00", 2), ("s11g00", 2), ("s02g00", 2), ("s12g00", 2),  # convertible seats in child-seat mode g00
    ("s05", 1), ("s15", 1), ("s06", 1), ("s16", 1),              # infant seats
    ("s01g01", 1), ("s11g11", 1), ("s02g10", 1), ("s12g01", 1),  # convertible seats, g01 g11 g10 -> infant
])
def test_ticam_filename_rule_every_documented_case(code: str, cls: int) -> None:
    assert interior.ticam_seat_class(code) == cls


def test_ticam_label_parts_and_bad_names() -> None:
    assert interior.ticam_labels(Path("a_b_p01_d_e_f_g_h_s03_x.png")) == (2, 3)  # (left = part 9, right = part 3)
    with pytest.raises(DataError, match="labels are parts 3"):
        interior.ticam_labels(Path("/x/a_b_p01.png"))
    with pytest.raises(DataError, match="s99"):
        interior.ticam_labels(Path("/x/a_b_s99_d_e_f_g_h_0.png"))


def test_ticam_preprocessing_flips_and_counts(tmp_path: Path) -> None:
    raw = interior.ticam_fixture(tmp_path / "raw", n=10)
    spec, df = load_benchmark(_add("ticam", raw, tmp_path / "b", options={"image_size": 30}))
    out = tmp_path / "b"
    assert spec.classes == interior.seat_class_names(2) and len(df) == 2 * 2 * 10  # (train + test) x flips
    assert (df[df["id"].str.startswith("test-")]["split"] == "test").all()
    for _, r in df[~df["id"].str.endswith("-flip")].iterrows():
        name = r["id"].split("-", 1)[1]
        parts = name.split("_")
        left, right = interior.ticam_seat_class(parts[8]), interior.ticam_seat_class(parts[2])
        assert r["label"] == interior.joint_label([left, right])
        flip = df[df["id"] == f"{r['id']}-flip"].iloc[0]
        assert flip["label"] == interior.joint_label([right, left]) == spec.mirror_classes[r["label"]]
        assert np.array_equal(_img(out, flip["path"]), _img(out, r["path"])[:, ::-1])
    # A.1.5 by hand for one frame: equalise, crop (120, 300, 106, 300), resize
    f = sorted((raw / "train" / "IR").glob("*.png"))[0]
    src = np.asarray(Image.open(f))
    want = np.asarray(Image.fromarray(interior.equalize(src)[120:420, 106:406]).resize((30, 30), Image.BILINEAR))
    r = df[df["id"] == f"{df[df['id'].str.contains(f.stem)].iloc[0]['split']}-{f.stem}"].iloc[0]
    assert np.array_equal(_img(out, r["path"]), want)


def test_ticam_small_image_and_missing_split_folder(tmp_path: Path) -> None:
    raw = interior.ticam_fixture(tmp_path / "raw", n=3)
    small = raw / "train" / "IR" / "rec99_t_p01_x_y_z_w_v_0_ir.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(small)
    with pytest.raises(DataError, match="too small for the crop") as e:
        _add("ticam", raw, tmp_path / "b")
    assert str(small) in str(e.value)
    small.unlink()
    for p in (raw / "test" / "IR").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="vizta-tof"):
        _add("ticam", raw, tmp_path / "b")


# ----------------------------------------------------------------------------------------------------------
# KITTI / Virtual KITTI 2 (paper 2)


def test_kitti_depth_scale_sparse_points_and_semantic_classes(tmp_path: Path) -> None:
    raw = driving.kitti_fixture(tmp_path / "raw")
    out = _add("kitti", raw, tmp_path / "b", options={"image_size": 12})
    spec, df = load_benchmark(out)
    assert spec.seg_classes == driving.SHARED_CLASSES and len(spec.seg_classes) == 12
    assert spec.depth_scale == 256.0 and spec.has_depth and spec.has_mask
    assert len(df) == 9 + 4 and (df[df["id"].str.startswith("sem-")]["split"] == "test").all()
    assert set(df[df["id"].str.contains("drive_0005")]["split"]) == {"test"}  # published val -> test
    d = df[df["id"].str.startswith("depth-")].iloc[0]
    raw_png = _img(out, d["depth_path"])
    assert raw_png.dtype == np.uint16 and set(np.unique(raw_png)) == {0, round(10.5 * 256)}
    assert _img(out, d["mask_path"]).max() == 255  # no labels on depth frames
    m = _img(out, df[df["id"].str.startswith("sem-")].iloc[0]["mask_path"])
    assert set(np.unique(m)) <= {1, 4, 10, 255} and {1, 4, 10} <= set(np.unique(m))  # sky, road, car; 4 -> ignored
    prep = PreparedBenchmark(prepare(out, tmp_path / "p", progress=False))
    dep = prep.get("kitti", "train").depth
    assert np.isclose(dep.max(), 10.5) and 0 < (dep > 0).mean() < 0.5  # metres, still sparse
    rep = validate_benchmark(out)
    assert rep.success, rep.summary()


def test_kitti_errors_name_the_file(tmp_path: Path) -> None:
    raw = driving.kitti_fixture(tmp_path / "raw")
    f = next((raw / "data_depth_annotated" / "train").rglob("*.png"))
    Image.fromarray(np.zeros((8, 24), np.uint8)).save(f)  # 8-bit instead of uint16
    with pytest.raises(DataError, match="uint16") as e:
        _add("kitti", raw, tmp_path / "b")
    assert str(f) in str(e.value)
    rgb = next((raw / "raw").rglob("*.png"))
    rgb.unlink()
    with pytest.raises(DataError, match="RGB frame .* is missing"):
        _add("kitti", raw, tmp_path / "b")


def test_vkitti2_depth_classes_and_paired_variations(tmp_path: Path) -> None:
    raw = driving.vkitti2_fixture(tmp_path / "raw", frames=5)
    out = _add("vkitti2", raw, tmp_path / "b", options={"image_size": 8})
    spec, df = load_benchmark(out)
    assert len(df) == 2 * 2 * 5 and df.groupby("scene_id")["variation"].nunique().eq(2).all()
    assert df.groupby("scene_id")["split"].nunique().max() == 1
    r = df.iloc[0]
    depth = _img(out, r["depth_path"]) / spec.depth_scale
    assert np.isclose(depth[-1, 2], 20.0) and np.isclose(depth[0, 0], 80.0)  # 2000 cm; sky 655.35 m -> max_depth
    mask = _img(out, r["mask_path"])
    assert mask[0, 0] == 1 and mask[-1, 0] == 11 and mask[-1, -2] == 4  # sky, van, road
    tree = np.array([[driving.VKITTI_COLORS["Tree"]]], np.uint8)
    assert driving.vkitti_mask(tree, driving.read_colors(None), Path("x.png"))[0, 0] == 2  # Tree -> vegetation
    bad = next((raw / "vkitti_2.0.3_classSegmentation").rglob("*.png"))
    seg = np.asarray(Image.open(bad)).copy()
    seg[0, 0] = (1, 2, 3)
    Image.fromarray(seg).save(bad)
    with pytest.raises(DataError, match="not VKITTI 2 classes") as e:
        _add("vkitti2", raw, tmp_path / "c", options={"image_size": 8})
    assert str(bad) in str(e.value)


def test_merge_vkitti2_kitti_and_class_mismatch(tmp_path: Path) -> None:
    v = _add("vkitti2", driving.vkitti2_fixture(tmp_path / "rv"), tmp_path / "v", options={"image_size": 8})
    k = _add("kitti", driving.kitti_fixture(tmp_path / "rk"), tmp_path / "k", options={"image_size": 8})
    out = merge([v, k], tmp_path / "m", name="vk", source="vkitti2",
                target="kitti")
    spec, df = load_benchmark(out)
    assert [d.role for d in spec.domains] == ["source", "target"] and len(df) == 20 + 13
    assert all(resolve_path(out, p).is_file() for p in df["mask_path"])
    from s2r.data.validation import _containment_check

    # the parts' files lie beside the merged folder: contained in the parts' common folder, not refused
    assert spec.data_root == str(tmp_path.resolve()) and all(r["success"] for r in _containment_check(df, out, spec))
    il = _add("sviro_illumination", interior.sviro_fixture(tmp_path / "ri", vehicles=("kodiaq", "cayenne"), n=6,
                                                           illumination=True), tmp_path / "il",
              options={"seats": "outer", "image_size": 8})
    ti = _add("ticam", interior.ticam_fixture(tmp_path / "rt", n=6), tmp_path / "ti", options={"image_size": 8})
    _, dm = load_benchmark(merge([il, ti], tmp_path / "kt", name="kt", source="kodiaq", target="ticam"))
    sv, st = (set(dm.loc[dm["domain"] == d, "scene_id"].astype(int)) - {-1} for d in ("kodiaq", "ticam"))
    assert sv and st and not sv & st  # different datasets' scenes never share an id (no false scene pairs)
    assert dm.groupby("scene_id")["variation"].nunique().max() > 1  # Kodiaq's variations still share their scene
    t = _add("trifinger", misc.trifinger_fixture(tmp_path / "rt"), tmp_path / "t")
    with pytest.raises(DataError, match="differs"):
        merge([tmp_path / "v", t], tmp_path / "x", name="x", source="vkitti2", target="real")


# ----------------------------------------------------------------------------------------------------------
# YCB-Video and BOP (paper 5)


def test_ycb_video_image_sets_and_object_ids(tmp_path: Path) -> None:
    raw = objects.ycb_fixture(tmp_path / "raw")
    spec, df = load_benchmark(_add("ycb_video", raw, tmp_path / "b", options={"image_size": 12, "depth": True}))
    assert spec.seg_classes[0] == "background" and len(spec.seg_classes) == 22
    real = df[df["domain"] == "real"]
    assert real.groupby("split").size().to_dict() == {"train": 4, "val": 2, "test": 2}  # image_sets lists
    assert (df["domain"] == "synthetic").sum() == 10 and spec.source == "synthetic"
    assert set(np.unique(_img(tmp_path / "b", real.iloc[0]["mask_path"]))) <= set(range(22))
    d = _img(tmp_path / "b", real.iloc[0]["depth_path"]) / spec.depth_scale
    assert np.isclose(d.max(), 0.8)  # 8000 / factor_depth 10000
    label = raw / "data" / "0000" / "000002-label.png"
    Image.fromarray(np.full((12, 16), 40, np.uint8)).save(label)
    with pytest.raises(DataError, match="object id 40") as e:
        _add("ycb_video", raw, tmp_path / "c")
    assert "000002-label.png" in str(e.value)


def test_bop_masks_from_visible_instances(tmp_path: Path) -> None:
    raw = objects.bop_fixture(tmp_path / "raw", n=10)
    out = _add("bop", raw, tmp_path / "b", options={"image_size": 12, "crop": "none", "depth": True})
    spec, df = load_benchmark(out)
    assert len(df) == 20 and spec.expectations["mask_values"] == [0, 1, 2, 3, 255]
    r = df[df["id"] == "real-val_primesense-000001-000001"].iloc[0]
    m = _img(out, r["mask_path"])
    assert m[0, 0] == 2 and m[11, 11] == 0 and m[5, 7] == 3  # instance 0 obj 2; instance 1 obj 3 on top
    assert np.isclose((_img(out, r["depth_path"]) / spec.depth_scale).max(), 0.5)  # 5000 * 0.1 mm
    rep = validate_benchmark(out)
    assert rep.success, rep.summary()
    (raw / "train_pbr" / "000001" / "scene_gt.json").unlink()
    with pytest.raises(DataError, match="scene_gt.json"):
        _add("bop", raw, tmp_path / "c")


# ----------------------------------------------------------------------------------------------------------
# CIFAR-DA (paper 4) and TriFinger (paper 3)


def test_cifar_da_classes_and_real_counts(tmp_path: Path) -> None:
    raw = misc.cifar_da_fixture(tmp_path / "raw")
    opts = {"real_train": 4, "real_val": 2, "real_test": 2}
    spec, df = load_benchmark(_add("cifar_da", raw, tmp_path / "b", options=opts))
    assert spec.classes == ["car", "bicycle", "motorcycle", "train"]
    real = df[df["domain"] == "real"]
    counts = real.groupby(["label", "split"]).size()
    assert all(counts[(k, s)] == n for k in range(4) for s, n in (("train", 4), ("val", 2), ("test", 2)))
    assert len(real) == 4 * 8 and (df["domain"] == "synthetic").sum() == 4 * 12
    spec9, df9 = load_benchmark(_add("cifar_da", raw, tmp_path / "c", options={**opts, "variant": "da9"}))
    assert spec9.classes == misc.DA9 and (df9["domain"] == "real").sum() == 9 * 8
    # val_from test (default): val and test are disjoint test-pickle images; val_from train: from the train pickle
    ids = {s: set(real[real["split"] == s]["sha256"]) for s in ("train", "val", "test")}
    assert not (ids["val"] & ids["test"]) and not (ids["train"] & ids["val"])
    _, dft = load_benchmark(_add("cifar_da", raw, tmp_path / "e", options={**opts, "val_from": "train"}))
    rt = dft[dft["domain"] == "real"]
    assert set(rt[rt["split"] == "test"]["sha256"]) <= ids["val"] | ids["test"]  # test pickle's first images
    with open(raw / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"nodata": 1}, f)
    with pytest.raises(DataError, match="test_batch"):
        _add("cifar_da", raw, tmp_path / "d", options=opts)


def test_cifar_da_fixture_has_cifar100s_real_counts(tmp_path: Path) -> None:
    """CIFAR-100 holds 500 train / 100 test images per class: 500 + 50 from the train pickle cannot fit."""
    raw = misc.cifar_da_fixture(tmp_path / "raw")
    c100 = misc._unpickle(raw / "cifar-100-python" / "train")
    assert np.bincount(c100[b"fine_labels"]).max() == 500
    with pytest.raises(DataError, match="500 train / 100 test images of class 'bicycle'; need 550 / 50"):
        _add("cifar_da", raw, tmp_path / "b", options={"val_from": "train"})
    with pytest.raises(DataError, match="option 'val_from'"):
        _add("cifar_da", raw, tmp_path / "c", options={"val_from": "both"})


@pytest.mark.slow
def test_cifar_da_builds_at_the_recipes_real_sizes_from_a_real_count_standin(tmp_path: Path) -> None:
    """The recipe's own options (500 / 50 / 50 per class) on a stand-in with CIFAR's real per-class counts."""
    from s2r import recipes

    rec = recipes.load("mixing-ratio-mrgan", REPO)
    for name, opts in rec["recipe"]["sources"].items():
        raw = misc.cifar_da_fixture(tmp_path / "raw")
        _, df = load_benchmark(_add("cifar_da", raw, tmp_path / name, options={**opts, "image_size": 8}))
        real = df[df["domain"] == "real"]
        classes = misc.DA4 if opts["variant"] == "da4" else misc.DA9
        assert real.groupby("split").size().to_dict() == {s: len(classes) * n for s, n in
                                                          (("train", 500), ("val", 50), ("test", 50))}


def test_trifinger_manifest_factors_and_errors(tmp_path: Path) -> None:
    raw = misc.trifinger_fixture(tmp_path / "raw")
    spec, df = load_benchmark(_add("trifinger", raw, tmp_path / "b", options={"image_size": 12}))
    assert spec.factors == misc.TRIFINGER_FACTORS and len(df) == 48
    assert df[df["domain"] == "real"]["split"].tolist()[:3] == ["train", "val", "test"]  # the split column wins
    labels = pd.read_csv(raw / "real" / "labels.csv")
    labels.loc[3, "cube_hue"] = 12
    labels.to_csv(raw / "real" / "labels.csv", index=False)
    with pytest.raises(DataError, match=r"labels.csv: row 3: cube_hue = 12"):
        _add("trifinger", raw, tmp_path / "c")


# ----------------------------------------------------------------------------------------------------------
# generic declaration, expectations, checksums, splits, CLI, DVC


def _declared(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "mine"
    for split in ("train", "val", "test"):
        for c in ("cat", "kitty", "dog"):
            for k in range(2):
                p = root / "renders" / split / c / f"{k}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
    for c in ("cat", "dog", "junk"):
        for k in range(5):
            p = root / "photos" / c / f"{k}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(p)
    (root / "dataset.yaml").write_text("""
task: classification
source: synthetic
target: real
image_size: 8
classes: [cat, dog]
class_map: {kitty: cat, junk: null}
domains:
  synthetic: {path: renders, layout: "{split}/{class}/*.png"}
  real: {path: photos, layout: "{class}/*.jpg", splits: {train: 0.6, val: 0.2, test: 0.2}, labelled: false}
""")
    return root


def test_generic_declaration(tmp_path: Path) -> None:
    root = _declared(tmp_path)
    spec, df = load_benchmark(_add("mine", root, tmp_path / "b"))
    assert spec.classes == ["cat", "dog"] and spec.resize and spec.image_size == 8
    syn, real = df[df["domain"] == "synthetic"], df[df["domain"] == "real"]
    assert len(syn) == 18 and (syn["label"] == 0).sum() == 12  # kitty merged into cat
    assert len(real) == 10 and set(real["split"]) == {"train", "val", "test"}  # junk dropped, hashed splits
    assert {d.name: d.labelled for d in spec.domains} == {"real": False, "synthetic": True}
    (root / "dataset.yaml").write_text((root / "dataset.yaml").read_text() + "colour: red\n")
    with pytest.raises(DataError, match="unknown key 'colour'"):
        _add("mine", root, tmp_path / "c")


def test_each_yaml_file_given_to_the_wrong_command_says_which_command_takes_it(tmp_path: Path) -> None:
    """Three YAML formats, three names: a benchmark's own benchmark.yaml (written by s2r), a dataset declaration
    dataset.yaml (`s2r data add NAME --from FOLDER`), a `--declaration` file of data keys (`s2r data import-*`)."""
    from click.testing import CliRunner

    from s2r.cli import main
    from s2r.data.adapters import load_declared

    root = _declared(tmp_path)
    bench = _add("mine", root, tmp_path / "b")
    dataset_yaml, benchmark_yaml = root / "dataset.yaml", bench / "benchmark.yaml"
    data_keys = tmp_path / "keys.yaml"
    data_keys.write_text("classes: [cat, dog]\nchannels: 3\n")
    folder = ["data", "import-folder", str(root / "renders"), "--out", str(tmp_path / "f"), "--name", "f",
              "--source", "synthetic", "--target", "real", "--declaration"]
    r = CliRunner().invoke(main, [*folder, str(dataset_yaml)])
    assert r.exit_code == 2 and (
        f"{dataset_yaml}: keys ['class_map', 'domains', 'source', 'target', 'task'] make this a dataset "
        "declaration (dataset.yaml next to the files; `s2r data add NAME --from FOLDER`), not a `--declaration` "
        "file of `s2r data import-folder / import-manifest`; --declaration takes only the data keys"
    ) in " ".join(r.output.split())
    r = CliRunner().invoke(main, [*folder, str(benchmark_yaml)])
    assert r.exit_code == 2 and "make this a benchmark description written by s2r (benchmark.yaml; `s2r data " \
        "prepare` reads it), not a `--declaration` file" in " ".join(r.output.split())
    assert load_declared(data_keys).classes == ["cat", "dog"]  # the file --declaration takes
    mine = tmp_path / "mine2"
    shutil.copytree(root, mine)
    shutil.copy(data_keys, mine / "dataset.yaml")
    with pytest.raises(DataError, match=r"holds only data keys \['channels', 'classes'\]: that is a `--declaration` "
                                        r"file of `s2r data import-folder / import-manifest`; a dataset.yaml for "
                                        r"`s2r data add` also needs task, source, target and domains"):
        _add("mine", mine, tmp_path / "c")
    (mine / "dataset.yaml").rename(mine / "benchmark.yaml")
    shutil.copy(dataset_yaml, mine / "benchmark.yaml")
    with pytest.raises(DataError, match=r"benchmark.yaml: a dataset declaration for `s2r data add` is called "
                                        r"dataset.yaml \(benchmark.yaml is the description s2r writes"):
        _add("mine", mine, tmp_path / "d")
    with pytest.raises(DataError, match=rf"{bench} is already an s2r benchmark .*`s2r data prepare {bench}`"):
        _add("mine", bench, tmp_path / "e")


def test_expectations_fail_with_rows(tmp_path: Path) -> None:
    raw = objects.bop_fixture(tmp_path / "raw", n=6)
    out = Path(_add("bop", raw, tmp_path / "b", options={"image_size": 12}))
    spec_file = out / "benchmark.yaml"
    import yaml

    spec = yaml.safe_load(spec_file.read_text())
    spec["expectations"] = {"mask_values": [0, 1, 255], "domain_rows": {"real": 99}}
    spec_file.write_text(yaml.safe_dump(spec))
    rep = validate_benchmark(out)
    failed = {r["expectation"] for r in rep.failures()}
    assert failed == {"expect_mask_ids_in_class_map", "expect_domain_row_counts"}
    assert "mask ids [2" in rep.summary() or "mask ids [3" in rep.summary()


def test_checksums_and_splits(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    (tmp_path / "SHA256SUMS").write_text(f"{sha}  a.bin\n{'0' * 64}  not_downloaded.bin\n")
    assert verify_checksums(tmp_path, {}) == ["a.bin"]
    with pytest.raises(DataError, match="a.bin: md5"):
        verify_checksums(tmp_path, {"a.bin": "md5:" + "0" * 32})
    s = assign_splits([str(i) for i in range(100)], {"train": 0.8, "val": 0.1, "test": 0.1})
    assert pd.Series(s).value_counts().to_dict() == {"train": 80, "val": 10, "test": 10}
    assert assign_splits(["a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1}) == assign_splits(
        ["c", "b", "a"], {"train": 0.8, "val": 0.1, "test": 0.1})
    assert set(assign_splits(["a", "b", "c"], {"train": 0.8, "val": 0.1, "test": 0.1}).values()) == {
        "train", "val", "test"}


def test_cli_add_missing_prints_source_and_layout(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["data", "add", "ticam", "--from", str(tmp_path / "nope"), "--no-dvc"])
    assert r.exit_code == 2 and "does not download" in r.output and "vizta-tof" in r.output
    assert "train/**/" in r.output
    raw = interior.ticam_fixture(tmp_path / "raw", n=3)
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["data", "add", "real_cabin", "--kind", "ticam", "--from", str(raw), "--out", str(out),
                                  "-o", "image_size=12", "-o", "flips=false", "--no-dvc"])
    assert r.exit_code == 0, r.output
    spec, df = load_benchmark(out)
    assert spec.name == "real_cabin" and len(df) == 6 and spec.image_size == 12
    r = CliRunner().invoke(main, ["data", "add", "x", "--kind", "ticam", "--from", str(raw), "--out", str(out),
                                  "-o", "flip=false", "--no-dvc"])
    assert r.exit_code == 2 and "unknown option 'flip'" in r.output
    listing = CliRunner().invoke(main, ["data", "sources"]).output
    assert all(k in listing for k in sources.SOURCES)


def test_add_tracks_download_and_benchmark_with_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    misc.trifinger_fixture(tmp_path / "data" / "raw" / "trifinger", n=6)
    monkeypatch.setenv("PATH", f"{Path(dvc).parent}:{__import__('os').environ['PATH']}")
    res = sources.add("trifinger", Path("data/raw/trifinger"), Path("data/benchmarks/trifinger"), dvc=True,
                      log=lambda m: None)
    assert res["dvc"] == ["data/raw/trifinger", "data/benchmarks/trifinger"]
    assert (tmp_path / "data" / "raw" / "trifinger.dvc").is_file()
    assert (tmp_path / "data" / "benchmarks" / "trifinger.dvc").is_file()


def test_every_source_has_fixture_docs_and_layout(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    for kind, s in sources.SOURCES.items():
        assert (repo / "docs" / "datasets" / f"{s.info.doc}.md").is_file(), kind
        assert s.info.url and s.info.layout and s.info.papers
        assert "get it from" in sources.describe(kind)
    assert json.loads(json.dumps(sorted(sources.SOURCES))) == sorted(sources.SOURCES)
