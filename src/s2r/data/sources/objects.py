"""Tabletop object datasets of paper 5: YCB-Video and BOP-format datasets such as HomebrewedDB.

Both become segmentation benchmarks whose mask value is the object id (0 = background, 255 = ignore),
with ``seg_classes`` = background + the dataset's objects, and optional depth.

YCB-Video (https://rse-lab.cs.washington.edu/projects/posecnn/). Published layout::

    YCB_Video_Dataset/data/<video:04d>/<frame:06d>-color.png|-label.png|-depth.png|-meta.mat
    YCB_Video_Dataset/data_syn/<frame:06d>-color.png|-label.png|-depth.png       (synthetic renders)
    YCB_Video_Dataset/image_sets/train.txt|val.txt|keyframe.txt                  ("0000/000001" per line)
    YCB_Video_Dataset/image_sets/classes.txt                                      (21 object names)

``-label.png`` holds object ids 1..21 (0 background); depth is uint16 with factor_depth 10000 per metre.
Option ``crop``: ``keep`` keeps the frames' aspect (``image_size`` wide: 640 -> 640x480, the resolution paper 5
trains, infers and scores at; a non-square benchmark), ``center`` (default) crops the middle square, ``none``
resizes to a square (distorts).
Domains: ``real`` (data/; train.txt -> train, val.txt (or a hash of train) -> val, keyframe.txt -> test, the
PoseCNN test keyframes) and, when present, ``synthetic`` (data_syn/, split by hash). Paper 5's synthetic
images come from the Stillleben renderer, not from data_syn: render them into the same naming
(``<frame>-color.png`` / ``-label.png``) and point option ``synthetic_dir`` at them.

BOP (https://bop.felk.cvut.cz/datasets/, e.g. HomebrewedDB ``hb``). Published layout per split folder::

    <split>/<scene:06d>/rgb/<im:06d>.png|jpg, depth/<im:06d>.png, mask_visib/<im:06d>_<inst:06d>.png,
    <split>/<scene:06d>/scene_gt.json ({"im": [{"obj_id": k, ...} per instance]}), scene_camera.json (depth_scale)

The semantic mask is the union of each instance's visible mask with its ``obj_id``. Domains: ``synthetic``
= ``train_pbr`` (BOP's physically based renders) and ``real`` = the annotated real split (``val_primesense``
for HomebrewedDB, option ``real_splits``). Splits of the real domain:

- With an official test split (option ``test_split``, default ``test_primesense`` when that folder exists; paper
  5: "the official test set is used to evaluate"): real/test = its images, restricted to the images listed in
  ``test_targets`` (default ``test_targets_bop19.json`` when present: the BOP'19/20 test images); real/train and
  real/val = the ``real_splits`` images, split BY SCENE (``val_fraction`` of the scenes, at least one, to val),
  so neighbouring video frames never straddle splits. ``objects: test`` (the default then; paper 5: "the subset
  S of HomebrewedDB objects which are present in the test images") keeps only the frames (real and synthetic)
  that show an object of S, and marks every other object 255 (ignored).
- Without one (``test_split: hash``): a hash of (scene, image) splits the real frames by ``fractions`` (a
  user's own BOP-format data; neighbouring frames can land in different splits).

Frames are centre cropped to a square and resized to ``image_size`` (``crop: center``), resized to a square
(``none``), or kept at their aspect (``keep``: 640x480 at ``image_size`` 640, paper 5's resolution).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2r.data.benchmark import BenchmarkSpec, DataError, DomainSpec, Sample, write_benchmark
from s2r.data.sources.common import (
    SourceInfo,
    assign_splits,
    check_fractions,
    check_options,
    frame_to_square,
    layout_error,
    option,
    read_image,
    resize,
)

YCB_OBJECTS = ["002_master_chef_can", "003_cracker_box", "004_sugar_box", "005_tomato_soup_can", "006_mustard_bottle",
               "007_tuna_fish_can", "008_pudding_box", "009_gelatin_box", "010_potted_meat_can", "011_banana",
               "019_pitcher_base", "021_bleach_cleanser", "024_bowl", "025_mug", "035_power_drill",
               "036_wood_block", "037_scissors", "040_large_marker", "051_large_clamp", "052_extra_large_clamp",
               "061_foam_brick"]
YCB_DEPTH_FACTOR = 10000.0
CROP_OPTION = ("'keep' (the frame's aspect, image_size wide: 640x480 at 640, paper 5), 'center' (middle square) or "
               "'none' (resize to a square) [center]")

YCB_INFO = SourceInfo(
    name="ycb_video", title="YCB-Video", url="https://rse-lab.cs.washington.edu/projects/posecnn/ (YCB_Video_Dataset)",
    layout="""data/<video:04d>/<frame:06d>-color.png, -label.png (object ids 0..21), -depth.png (uint16, 1e4/m)
data_syn/<frame:06d>-color.png, -label.png, -depth.png   (optional synthetic domain)
image_sets/train.txt, val.txt (optional), keyframe.txt   lines like 0000/000001
image_sets/classes.txt                                   (optional; the 21 published names otherwise)""",
    papers=["cut-patch-refinement"], doc="ycb_video",
    options={"image_size": "width (and height if square) [256]", "crop": CROP_OPTION, "depth": "include depth [false]",
             "synthetic_dir": "folder of <frame>-color/-label.png renders (e.g. Stillleben) [data_syn]",
             "val_fraction": "share of train frames for val when val.txt is absent [0.05]",
             "max_frames": "keep every k-th listed frame so at most this many per split [all]", "seed": "[0]"},
)
BOP_INFO = SourceInfo(
    name="bop", title="BOP-format dataset (e.g. HomebrewedDB)", url="https://bop.felk.cvut.cz/datasets/ (hb_base, "
    "hb_models, hb_train_pbr, hb_val_primesense)",
    layout="""models/models_info.json                                   object ids
train_pbr/<scene:06d>/rgb/<im:06d>.jpg, depth/, mask_visib/<im:06d>_<inst:06d>.png, scene_gt.json, scene_camera.json
val_primesense/<scene:06d>/rgb/<im:06d>.png, depth/, mask_visib/, scene_gt.json, scene_camera.json""",
    papers=["cut-patch-refinement"], doc="bop",
    options={"image_size": "width (and height if square) [256]", "crop": CROP_OPTION, "depth": "include depth [false]",
             "synthetic_splits": "[train_pbr]", "real_splits": "annotated real split folders [val_primesense, else "
             "any other *_primesense/test with scene_gt.json]",
             "test_split": "official real test split folder, or 'hash' [test_primesense if present, else hash]",
             "test_targets": "file listing the official test images [test_targets_bop19.json if present]",
             "objects": "'test' (objects of the test images only) or 'all' [test with a test split, else all]",
             "val_fraction": "share of real training scenes for val (with a test split) [0.1]",
             "fractions": "real train/val/test with test_split hash [0.6/0.2/0.2]",
             "max_frames": "at most this many frames per domain (every k-th) [all]", "seed": "[0]"},
)


def fit_frame(arr: np.ndarray, size: int, crop: str, nearest: bool = False, height: int = 0) -> np.ndarray:
    """crop 'keep': resize to size x height (the frame's aspect); otherwise a square (common.frame_to_square)."""
    if crop == "keep":
        return resize(arr, (size, height), nearest=nearest)
    return frame_to_square(arr, size, crop, nearest=nearest)


def frame_height(first: Path, size: int, crop: str) -> int:
    """Benchmark image_height: 0 (square) unless crop 'keep', then size * h / w of the first frame (640 -> 480)."""
    if crop not in ("keep", "center", "none"):
        raise DataError(f"option 'crop': {crop!r} must be 'keep', 'center' or 'none'")
    if crop != "keep":
        return 0
    from PIL import Image

    with Image.open(first) as im:
        w, h = im.size
    out: int = max(1, round(size * h / w))
    return out


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


def _thin(items: list[Any], max_frames: int | None) -> list[Any]:
    if max_frames is None or len(items) <= max_frames:
        return items
    step = -(-len(items) // max_frames)
    return items[::step]


def build_ycb(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """YCB-Video real frames (+ synthetic renders) -> segmentation benchmark with the 21 object ids."""
    check_options(options, YCB_INFO.options, "ycb_video")
    size = int(option(options, "image_size", 256, int))
    crop = option(options, "crop", "center", str)
    with_depth = bool(option(options, "depth", False, bool))
    val_f = float(option(options, "val_fraction", 0.05, (int, float)))
    max_frames = option(options, "max_frames", None, int)
    seed = int(option(options, "seed", 0, int))
    sets = src / "image_sets"
    train, keyframes = _lines(sets / "train.txt"), _lines(sets / "keyframe.txt")
    if not (src / "data").is_dir() or not train or not keyframes:
        raise layout_error(YCB_INFO, src, "need data/, image_sets/train.txt and image_sets/keyframe.txt")
    classes = _lines(sets / "classes.txt") or YCB_OBJECTS
    val = _lines(sets / "val.txt")
    real = [(f, "test") for f in _thin(keyframes, max_frames)]
    if val:
        real += [(f, "val") for f in _thin(val, max_frames)]
        real += [(f, "train") for f in _thin(train, max_frames)]
    else:
        tr = _thin(train, max_frames)
        sp = assign_splits([f.split("/")[0] for f in tr], {"train": 1 - val_f, "val": val_f, "test": 0.0}, seed)
        real += [(f, sp[f.split("/")[0]]) for f in tr]
    records = [("real", split, src / "data" / f) for f, split in real]
    syn_dir = Path(option(options, "synthetic_dir", str(src / "data_syn"), str))
    syn = sorted(syn_dir.glob("*-color.png")) if syn_dir.is_dir() else []
    if "synthetic_dir" in options and not syn:
        raise DataError(f"option 'synthetic_dir': {syn_dir} holds no <frame>-color.png files")
    syn = _thin(syn, max_frames)
    sp = assign_splits([p.name for p in syn], {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    records += [("synthetic", sp[p.name], p.parent / p.name[: -len("-color.png")]) for p in syn]
    domains = ["real"] + (["synthetic"] if syn else [])
    n_ids = len(classes) + 1
    height = frame_height(Path(f"{records[0][2]}-color.png"), size, crop)
    spec = BenchmarkSpec(
        name=name, tasks=["segmentation"] + (["depth"] if with_depth else []),
        source="synthetic" if syn else "real", target="real", image_size=size, channels=3, image_height=height,
        domains=[DomainSpec(d, "target" if d == "real" else "source",
                            "YCB-Video real frames" if d == "real" else f"synthetic renders from {syn_dir}")
                 for d in domains],
        seg_classes=["background", *classes], has_mask=True, has_depth=with_depth,
        depth_scale=1000.0, dataset="ycb_video", description=f"YCB-Video from {src}",
        expectations={"mask_values": list(range(n_ids)) + [255]},
    )

    frame = _Frame(size, crop, height)
    return write_benchmark(out, spec, (_ycb_sample(r, n_ids, with_depth, frame) for r in records))


@dataclass(frozen=True)
class _Frame:
    """How frames are fitted to the benchmark's images (fit_frame): square side, crop mode, height."""

    size: int
    crop: str
    height: int


def _ycb_sample(record: tuple[str, str, Path], n_ids: int, with_depth: bool, frame: _Frame) -> Sample:
    """One YCB-Video frame: RGB, object-id mask (checked against the ids), depth in metres if asked."""
    domain, split, stem = record
    label = read_image(Path(f"{stem}-label.png"))
    if label.ndim != 2:
        raise DataError(f"{stem}-label.png: label image must have one channel of object ids")
    if label.max(initial=0) >= n_ids:
        raise DataError(f"{stem}-label.png: object id {int(label.max())} outside 0..{n_ids - 1}")
    depth = None
    if with_depth:
        d = read_image(Path(f"{stem}-depth.png")).astype(np.float32) / YCB_DEPTH_FACTOR
        depth = fit_frame(d, frame.size, frame.crop, True, frame.height)
    sid = f"{domain}-{stem.parent.name}-{stem.name}" if domain == "real" else f"syn-{stem.name}"
    image = fit_frame(read_image(Path(f"{stem}-color.png"), "RGB"), frame.size, frame.crop, False, frame.height)
    return Sample(id=sid, domain=domain, split=split, image=image,
                  mask=fit_frame(label.astype(np.uint8), frame.size, frame.crop, True, frame.height), depth=depth)


def _bop_frames(split_dir: Path) -> list[tuple[Path, str, dict[str, Any], dict[str, Any]]]:
    """(scene dir, image id, its scene_gt entries, its scene_camera entry) of one BOP split folder."""
    out = []
    for scene in sorted(d for d in split_dir.iterdir() if d.is_dir()):
        gt_file, cam_file = scene / "scene_gt.json", scene / "scene_camera.json"
        try:
            gt = json.loads(gt_file.read_text())
            cam = json.loads(cam_file.read_text()) if cam_file.is_file() else {}
        except FileNotFoundError as e:
            raise DataError(f"{gt_file}: missing (BOP scenes need scene_gt.json)") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{gt_file}: not valid JSON: {e}") from e
        for im in sorted(gt, key=int):
            out.append((scene, im, gt[im], cam.get(im, {})))
    return out


def _bop_rgb(scene: Path, im: str) -> Path:
    for ext in ("png", "jpg"):
        p = scene / "rgb" / f"{int(im):06d}.{ext}"
        if p.is_file():
            return p
    raise DataError(f"{scene / 'rgb'}: no {int(im):06d}.png or .jpg for image {im} of scene_gt.json")


def bop_mask(scene: Path, im: str, instances: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """Union of the visible instance masks, each painted with its object id (later instances on top)."""
    mask = np.zeros(shape, np.uint8)
    for k, inst in enumerate(instances):
        if "obj_id" not in inst:
            raise DataError(f"{scene / 'scene_gt.json'}: image {im} instance {k} has no 'obj_id'")
        p = scene / "mask_visib" / f"{int(im):06d}_{k:06d}.png"
        m = read_image(p)
        if m.shape[:2] != shape:
            raise DataError(f"{p}: mask is {m.shape[1]}x{m.shape[0]}, image is {shape[1]}x{shape[0]}")
        mask[(m if m.ndim == 2 else m[..., 0]) > 0] = int(inst["obj_id"])
    return mask


def _bop_split_frames(src: Path, folders: list[str], domain: str) -> list[tuple[str, Path, str, Any, Any]]:
    frames = []
    for f in folders:
        if not (src / f).is_dir():
            raise layout_error(BOP_INFO, src, f"no split folder {f!r}")
        frames += [(f, *fr) for fr in _bop_frames(src / f)]
    if not frames:
        raise layout_error(BOP_INFO, src, f"{domain} split folders {folders} hold no annotated images")
    return frames


def _test_targets(path: Path) -> set[tuple[int, int]]:
    """(scene_id, im_id) of a BOP test_targets_bop19.json (a list of {scene_id, im_id, obj_id, inst_count})."""
    try:
        rows = json.loads(path.read_text())
        return {(int(r["scene_id"]), int(r["im_id"])) for r in rows}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a BOP test targets list of {{scene_id, im_id, ...}}: {e}") from e


def build_bop(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """A BOP dataset (HomebrewedDB) -> synthetic (PBR) and real domains with object-id masks (see module doc)."""
    check_options(options, BOP_INFO.options, "bop")
    size = int(option(options, "image_size", 256, int))
    crop = option(options, "crop", "center", str)
    with_depth = bool(option(options, "depth", False, bool))
    fractions = check_fractions(option(options, "fractions", {"train": 0.6, "val": 0.2, "test": 0.2}, dict))
    max_frames = option(options, "max_frames", None, int)
    seed = int(option(options, "seed", 0, int))
    syn_splits, real_splits, test_split = _bop_splits(src, options)
    official = test_split != "hash"
    objects = option(options, "objects", "test" if official else "all", str)
    if objects not in ("test", "all"):
        raise DataError(f"option 'objects': {objects!r} must be 'test' or 'all'")
    if objects == "test" and not official:
        raise DataError("option 'objects: test' needs an official test split (option 'test_split'), got 'hash'")
    val_f = float(option(options, "val_fraction", 0.1, (int, float)))
    syn = _thin(_bop_split_frames(src, syn_splits, "synthetic"), max_frames)
    real = _thin(_bop_split_frames(src, real_splits, "real"), max_frames)
    test = _bop_test_frames(src, options, test_split) if official else []
    subset = sorted({int(i["obj_id"]) for *_, gt, _ in test for i in gt}) if objects == "test" else None

    def shows_subset(gt: list[dict[str, Any]]) -> bool:
        return subset is None or any(int(i.get("obj_id", -1)) in subset for i in gt)

    records: list[BopRecord] = []
    sp = assign_splits([f"{fo}:{sc.name}:{im}" for fo, sc, im, _, _ in syn], {"train": 0.8, "val": 0.1, "test": 0.1}
                       if official else fractions, seed)
    records += [("synthetic", sp[f"{fo}:{sc.name}:{im}"], sc, im, cam, gt) for fo, sc, im, gt, cam in syn
                if shows_subset(gt)]
    if official:
        real = [fr for fr in real if shows_subset(fr[3])]
        val_scenes = _bop_val_scenes(src, real, real_splits, val_f, seed)
        records += [("real", "val" if f"{fo}:{sc.name}" in val_scenes else "train", sc, im, cam, gt)
                    for fo, sc, im, gt, cam in real]
        records += [("real", "test", sc, im, cam, gt) for fo, sc, im, gt, cam in test]
    else:
        sp = assign_splits([f"{fo}:{sc.name}:{im}" for fo, sc, im, _, _ in real], fractions, seed)
        records += [("real", sp[f"{fo}:{sc.name}:{im}"], sc, im, cam, gt) for fo, sc, im, gt, cam in real]
    obj_ids = _bop_object_ids(src, records)
    keep_ids = subset if subset is not None else obj_ids
    n_classes = max(obj_ids) + 1
    height = frame_height(_bop_rgb(records[0][2], records[0][3]), size, crop)
    spec = BenchmarkSpec(
        name=name, tasks=["segmentation"] + (["depth"] if with_depth else []), source="synthetic", target="real",
        image_size=size, channels=3, image_height=height,
        domains=[DomainSpec("synthetic", "source", f"BOP {syn_splits} renders"),
                 DomainSpec("real", "target", f"BOP {real_splits} real frames"
                            + (f", test = {test_split}" if official else ""))],
        seg_classes=["background"] + [f"obj_{k:06d}" if k in keep_ids else f"unused_{k}" for k in range(1, n_classes)],
        has_mask=True, has_depth=with_depth, depth_scale=1000.0, dataset="bop",
        description=f"BOP dataset from {src}" + (f"; objects {subset} of the test images" if subset else ""),
        expectations={"mask_values": [0, *keep_ids, 255]},
    )

    frame = _Frame(size, crop, height)
    return write_benchmark(out, spec, (_bop_sample(r, subset, with_depth, frame) for r in records))


BopRecord = tuple[str, str, Path, str, dict[str, Any], list[dict[str, Any]]]  # domain, split, scene, im, cam, gt


def _bop_sample(record: BopRecord, subset: list[int] | None, with_depth: bool, frame: _Frame) -> Sample:
    """One BOP frame: RGB, object-id mask (objects outside `subset` ignored), depth in metres if asked."""
    domain, split, scene, im, cam, gt = record
    rgb = read_image(_bop_rgb(scene, im), "RGB")
    mask = bop_mask(scene, im, gt, rgb.shape[:2])
    if subset is not None:
        mask[~np.isin(mask, [0, *subset])] = 255  # objects outside S: ignored, not background
    depth = None
    if with_depth:
        raw = read_image(scene / "depth" / f"{int(im):06d}.png").astype(np.float32)
        depth = fit_frame(raw * float(cam.get("depth_scale", 1.0)) / 1000.0, frame.size, frame.crop, True,
                          frame.height)
    return Sample(id=f"{domain}-{scene.parent.name}-{scene.name}-{int(im):06d}", domain=domain, split=split,
                  image=fit_frame(rgb, frame.size, frame.crop, False, frame.height),
                  mask=fit_frame(mask, frame.size, frame.crop, True, frame.height), depth=depth)


def _bop_object_ids(src: Path, records: list[BopRecord]) -> list[int]:
    """The dataset's object ids: from models/models_info.json, else the ids annotated in the frames."""
    info_file = src / "models" / "models_info.json"
    if info_file.is_file():
        return sorted(int(k) for k in json.loads(info_file.read_text()))
    return sorted({int(i["obj_id"]) for *_, gt in records for i in gt})


def _bop_splits(src: Path, options: dict[str, Any]) -> tuple[list[str], list[str], str]:
    """(synthetic, real, test) split folders: the options', else PBR renders, the PrimeSense val/test folders
    (or every other folder with annotated scenes, and a hashed test split)."""
    syn_splits = option(options, "synthetic_splits", ["train_pbr"], list)
    test_split = option(options, "test_split", "test_primesense" if (src / "test_primesense").is_dir() else "hash",
                        str)
    default_real = ["val_primesense"] if (src / "val_primesense").is_dir() else sorted(
        d.name for d in src.iterdir() if d.is_dir() and d.name not in (*syn_splits, test_split) and
        any((s / "scene_gt.json").is_file() for s in d.iterdir() if s.is_dir())) if src.is_dir() else []
    return syn_splits, option(options, "real_splits", default_real, list), test_split


def _bop_val_scenes(src: Path, real: list[tuple[str, Path, str, Any, Any]], real_splits: list[str], val_f: float,
                    seed: int) -> set[str]:
    """The real scenes held out for validation (a scene-level split, hashed from `seed`)."""
    scenes = sorted({f"{fo}:{sc.name}" for fo, sc, *_ in real})
    if len(scenes) < 2:
        raise DataError(f"{src}: real splits {real_splits} have {len(scenes)} scene(s) showing the test objects; "
                        "a scene-level train/val split needs at least 2")
    n_val = max(1, round(val_f * len(scenes)))
    return set(sorted(scenes, key=lambda k: hashlib_key(k, seed))[:n_val])


def _bop_test_frames(src: Path, options: dict[str, Any], test_split: str) -> list[tuple[str, Path, str, Any, Any]]:
    """The official test split's frames, limited to the BOP test targets file where there is one."""
    test = _bop_split_frames(src, [test_split], "test")
    tfile = src / option(options, "test_targets", "test_targets_bop19.json", str)
    if "test_targets" in options and not tfile.is_file():
        raise DataError(f"option 'test_targets': {tfile} not found")
    if tfile.is_file():
        targets = _test_targets(tfile)
        test = [fr for fr in test if (int(fr[1].name), int(fr[2])) in targets]
        if not test:
            raise DataError(f"{tfile}: none of its images is in {src / test_split}")
    return test


def hashlib_key(key: str, seed: int) -> str:
    """A stable pseudo-random order of keys (scene-level val draw)."""
    import hashlib

    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# fixtures in the published layouts


def ycb_fixture(root: Path, w: int = 16, h: int = 12) -> Path:
    """Two videos of 4 frames + 4 synthetic frames with the published names and image sets."""
    from PIL import Image

    k = 0
    lists: dict[str, list[str]] = {"train": [], "val": [], "keyframe": []}
    for video in ("0000", "0001"):
        d = root / "data" / video
        d.mkdir(parents=True, exist_ok=True)
        for f in range(1, 5):
            k += 1
            stem = d / f"{f:06d}"
            Image.fromarray(np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                f"{stem}-color.png")
            label = np.zeros((h, w), np.uint8)
            label[2:6, 2:6] = 1 + (k % 21)
            Image.fromarray(label).save(f"{stem}-label.png")
            Image.fromarray(np.full((h, w), 8000, np.uint16)).save(f"{stem}-depth.png")  # 0.8 m
            lists["keyframe" if f == 4 else "val" if f == 3 else "train"].append(f"{video}/{f:06d}")
    syn = root / "data_syn"
    syn.mkdir(parents=True, exist_ok=True)
    for f in range(10):
        k += 1
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            syn / f"{f:06d}-color.png")
        label = np.zeros((h, w), np.uint8)
        label[4:8, 4:10] = 21
        Image.fromarray(label).save(syn / f"{f:06d}-label.png")
        Image.fromarray(np.full((h, w), 12000, np.uint16)).save(syn / f"{f:06d}-depth.png")
    (root / "image_sets").mkdir(parents=True, exist_ok=True)
    for name, lines in lists.items():
        (root / "image_sets" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def bop_fixture(root: Path, w: int = 16, h: int = 12, n: int = 10, test_split: bool = False) -> Path:
    """train_pbr + val_primesense with scene_gt.json, scene_camera.json and visible instance masks.

    test_split: also HomebrewedDB's layout for paper 5's protocol: a second val_primesense scene (even frames
    show only object 2), test_primesense (scene 3, objects 1 and 3) and test_targets_bop19.json (its even
    frames): the official test images, whose objects S = {1, 3}."""
    from PIL import Image

    k = 0
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "models_info.json").write_text(json.dumps({str(i): {"diameter": 100.0} for i in (1, 2, 3)}))
    scenes = [("train_pbr", "000001", "jpg"), ("val_primesense", "000001", "png")]
    if test_split:
        scenes += [("val_primesense", "000002", "png"), ("test_primesense", "000003", "png")]
    for split, scene_name, ext in scenes:
        scene = root / split / scene_name
        for sub in ("rgb", "depth", "mask_visib"):
            (scene / sub).mkdir(parents=True, exist_ok=True)
        gt, cam = {}, {}
        for im in range(n):
            k += 1
            img = np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)
            opts: dict[str, Any] = {"quality": 95} if ext == "jpg" else {}
            Image.fromarray(img).save(scene / "rgb" / f"{im:06d}.{ext}", **opts)
            Image.fromarray(np.full((h, w), 5000, np.uint16)).save(scene / "depth" / f"{im:06d}.png")
            objs = {"000002": [2] if im % 2 == 0 else [1, 2], "000003": [1, 3]}.get(scene_name, [1 + im % 3, 3])
            gt[str(im)] = [{"obj_id": o} for o in objs]
            cam[str(im)] = {"depth_scale": 0.1}
            for inst, box in list(enumerate(((0, 6, 0, 6), (4, 10, 4, 12))))[: len(objs)]:
                m = np.zeros((h, w), np.uint8)
                m[box[0] : box[1], box[2] : box[3]] = 255
                Image.fromarray(m).save(scene / "mask_visib" / f"{im:06d}_{inst:06d}.png")
        (scene / "scene_gt.json").write_text(json.dumps(gt))
        (scene / "scene_camera.json").write_text(json.dumps(cam))
    if test_split:
        targets = [{"scene_id": 3, "im_id": im, "obj_id": 1, "inst_count": 1} for im in range(0, n, 2)]
        (root / "test_targets_bop19.json").write_text(json.dumps(targets))
    return root
