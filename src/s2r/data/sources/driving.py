"""KITTI (real) and Virtual KITTI 2 (sim) for paper 2: RGB + depth + segmentation on the 12 shared classes.

Paper 2, Section 4.2: the 12 classes common to VKITTI, Cityscapes and KITTI are terrain, sky, vegetation,
building, road, guard rail, traffic sign, traffic light, pole, truck, car, van (mask ids 0..11 in that
order); every other class is 255 (ignored). Choices, documented in docs/datasets/kitti.md:

- KITTI's semantic labels use the Cityscapes label ids, which have no "van" (vans are labelled car), so
  id 11 never occurs in KITTI masks. VKITTI 2's "Tree" and "Vegetation" both map to vegetation (Cityscapes
  labels trees as vegetation); "Misc" and "Undefined" are ignored.
- Option ``classes``: ``shared`` (default: the 12 shared ids above) or ``vkitti``, paper 2's protocol: the
  network predicts VKITTI's 15 categories (14 classes + Undefined; Table 2 note (**): 15 output channels) and only
  the 12 shared ones are scored (`reports.depth_segmentation.classes`). The class list is then the 12 shared
  classes (ids 0..11, unchanged) followed by tree (12), misc (13), undefined (14); VKITTI 2's Tree, Misc and
  Undefined get those ids instead of vegetation / ignore. KITTI (Cityscapes ids) uses the same 15-class list,
  where ids 12..14 never occur (Cityscapes labels trees as vegetation). Set it on both adapters of a merge.
- Depth is stored at KITTI's own scale (uint16 PNG, 256 per metre, 0 = no measurement). KITTI's sparse
  LiDAR depth is resized by moving valid points only (no interpolation with empty pixels); VKITTI 2's dense
  depth (centimetres, 655.35 m = sky) is clipped to ``max_depth`` (80 m, the usual KITTI evaluation cap).
- Paper 2 resizes every image to 256x256 (Section 4.2), so frames are resized, not cropped, by default.
- A KITTI frame has either depth (the depth benchmark) or a mask (the 200 semantic images): the other is
  stored as "absent" (depth 0 = invalid, mask 255 = ignore), so one benchmark holds both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
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
    sparse_depth_resize,
)

SHARED_CLASSES = ["terrain", "sky", "vegetation", "building", "road", "guard_rail", "traffic_sign", "traffic_light",
                  "pole", "truck", "car", "van"]
IGNORE = 255
KITTI_DEPTH_SCALE = 256.0  # KITTI depth PNGs: metres * 256, 0 = invalid
VKITTI_DEPTH_SCALE = 100.0  # VKITTI 2 depth PNGs: centimetres
# Cityscapes label ids (KITTI semantics) -> shared class
CITYSCAPES_TO_SHARED = {22: 0, 23: 1, 21: 2, 11: 3, 7: 4, 14: 5, 20: 6, 19: 7, 17: 8, 27: 9, 26: 10}
VKITTI_TO_SHARED = {"Terrain": 0, "Sky": 1, "Tree": 2, "Vegetation": 2, "Building": 3, "Road": 4, "GuardRail": 5,
                    "TrafficSign": 6, "TrafficLight": 7, "Pole": 8, "Truck": 9, "Car": 10, "Van": 11,
                    "Misc": IGNORE, "Undefined": IGNORE}
# VKITTI 2 colors.txt (Category r g b), used when the file is not next to the data
VKITTI_COLORS = {"Terrain": (210, 0, 200), "Sky": (90, 200, 255), "Tree": (0, 199, 0), "Vegetation": (90, 240, 0),
                 "Building": (140, 140, 140), "Road": (100, 60, 100), "GuardRail": (250, 100, 255),
                 "TrafficSign": (255, 255, 0), "TrafficLight": (200, 200, 0), "Pole": (255, 130, 0),
                 "Misc": (80, 80, 80), "Truck": (160, 60, 60), "Car": (255, 127, 80), "Van": (0, 139, 139),
                 "Undefined": (0, 0, 0)}
MASK_VALUES = list(range(len(SHARED_CLASSES))) + [IGNORE]
# `classes: vkitti` (paper 2 trains on VKITTI's 15 categories and scores the 12 shared ones)
VKITTI_CLASSES = [*SHARED_CLASSES, "tree", "misc", "undefined"]
VKITTI_TO_FULL = {**VKITTI_TO_SHARED, "Tree": 12, "Misc": 13, "Undefined": 14}
CLASS_SETS = {"shared": SHARED_CLASSES, "vkitti": VKITTI_CLASSES}
CLASSES_OPTION = ("'shared' (the 12 shared classes) or 'vkitti' (paper 2: VKITTI's 15 categories, the 12 shared "
                  "first) [shared]")


def class_set(options: dict[str, Any]) -> str:
    """The `classes` option, checked: which label set the masks use."""
    name = option(options, "classes", "shared", str)
    if name not in CLASS_SETS:
        raise DataError(f"option 'classes': {name!r} must be one of {sorted(CLASS_SETS)}")
    out: str = name
    return out

KITTI_INFO = SourceInfo(
    name="kitti", title="KITTI (depth + semantics, real)", url="https://www.cvlibs.net/datasets/kitti/ (raw data, "
    "depth prediction 'annotated depth maps', semantic segmentation)",
    layout="""data_depth_annotated/<train|val>/<drive>/proj_depth/groundtruth/image_02/<frame>.png  uint16, m*256
raw/<date>/<drive>/image_02/data/<frame>.png        RGB frames of those drives (<date> = first 10 chars of <drive>)
data_semantics/training/image_2/<id>_10.png         RGB
data_semantics/training/semantic/<id>_10.png        Cityscapes label ids
  (the depth part, the semantics part, or both)""",
    papers=["twin-vae-depth-segmentation"], doc="kitti",
    options={"image_size": "square size (paper 2: 256) [256]", "crop": "'none' (resize, paper 2) or 'center' [none]",
             "val_fraction": "share of annotated-train drives for val [0.1]", "frame_step": "keep every k-th depth "
             "frame [1]", "semantics_split": "'test' (paper 2 evaluates on the 200 images) or 'hash' [test]",
             "seed": "split hash seed [0]", "domain": "domain name [kitti]", "classes": CLASSES_OPTION},
)
VKITTI_INFO = SourceInfo(
    name="vkitti2", title="Virtual KITTI 2 (sim)", url="https://europe.naverlabs.com/research/computer-vision/"
    "proxy-virtual-worlds-vkitti-2/ (rgb, depth, classSegmentation, textgt tarballs)",
    layout="""vkitti_2.0.3_rgb/<Scene>/<variation>/frames/rgb/Camera_0/rgb_<frame:05d>.jpg
vkitti_2.0.3_depth/<Scene>/<variation>/frames/depth/Camera_0/depth_<frame:05d>.png   uint16 centimetres
vkitti_2.0.3_classSegmentation/<Scene>/<variation>/frames/classSegmentation/Camera_0/classgt_<frame:05d>.png
vkitti_2.0.3_textgt/<Scene>/<variation>/colors.txt    (optional; published colours otherwise)""",
    papers=["twin-vae-depth-segmentation"], doc="vkitti2",
    options={"image_size": "square size [256]", "crop": "'none' or 'center' [none]", "max_depth": "clip metres [80]",
             "fractions": "train/val/test of (scene, frame) [0.8/0.1/0.1]", "variations": "list [all found]",
             "camera": "[Camera_0]", "frame_step": "keep every k-th frame [1]", "seed": "[0]",
             "domain": "domain name [vkitti2]", "classes": CLASSES_OPTION},
)


def cityscapes_to_shared(ids: np.ndarray) -> np.ndarray:
    """(H, W) Cityscapes label ids -> shared class ids (255 elsewhere)."""
    lut = np.full(256, IGNORE, np.uint8)
    for k, v in CITYSCAPES_TO_SHARED.items():
        lut[k] = v
    return lut[ids.astype(np.uint8)]


def read_colors(path: Path | None, mapping: dict[str, int] | None = None) -> dict[tuple[int, int, int], int]:
    """colour -> class id (`mapping`: VKITTI_TO_SHARED or VKITTI_TO_FULL) from a VKITTI 2 colors.txt (or the
    published colours)."""
    mapping = mapping or VKITTI_TO_SHARED
    table = dict(VKITTI_COLORS)
    if path is not None and path.is_file():
        for n, line in enumerate(path.read_text().splitlines()[1:], 2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
                raise DataError(f"{path}: line {n}: expected 'Category r g b', got {line!r}")
            r, g, b = (int(p) for p in parts[1:])
            table[parts[0]] = (r, g, b)
    out: dict[tuple[int, int, int], int] = {}
    for cat, rgb in table.items():
        if cat not in mapping:
            raise DataError(f"{path}: unknown VKITTI 2 category {cat!r}")
        out[rgb] = mapping[cat]
    return out


def vkitti_mask(rgb: np.ndarray, colors: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
    """(H, W, 3) class colours -> (H, W) shared ids; a colour outside colors.txt is an error naming the file."""
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    uniq, inv = np.unique(packed, return_inverse=True)
    lut = {(r << 16) | (g << 8) | b: v for (r, g, b), v in colors.items()}
    bad = [u for u in uniq.tolist() if u not in lut]
    if bad:
        raise DataError(f"{path}: colours {[((u >> 16) & 255, (u >> 8) & 255, u & 255) for u in bad[:4]]} are not "
                        "VKITTI 2 classes (colors.txt)")
    return np.array([lut[u] for u in uniq.tolist()], np.uint8)[inv].reshape(rgb.shape[:2])


def _kitti_frames(src: Path, frame_step: int) -> list[tuple[str, Path, Path]]:
    """(published split, rgb file, depth file) of the annotated depth frames."""
    out = []
    base = src / "data_depth_annotated"
    for pub in ("train", "val"):
        for dfile in sorted((base / pub).glob("*/proj_depth/groundtruth/image_02/*.png"))[::frame_step]:
            drive = dfile.parents[3].name
            rgb = src / "raw" / drive[:10] / drive / "image_02" / "data" / dfile.name
            if not rgb.is_file():
                raise DataError(f"{dfile}: its RGB frame {rgb} is missing (download the raw drive {drive})")
            out.append((pub, rgb, dfile))
    return out


def build_kitti(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """KITTI depth frames and/or the 200 semantic images -> one real domain with depth and masks."""
    check_options(options, KITTI_INFO.options, "kitti")
    size = int(option(options, "image_size", 256, int))
    crop = option(options, "crop", "none", str)
    val_f = float(option(options, "val_fraction", 0.1, (int, float)))
    step = int(option(options, "frame_step", 1, int))
    sem_split = option(options, "semantics_split", "test", str)
    seed = int(option(options, "seed", 0, int))
    domain = option(options, "domain", "kitti", str)
    classes = CLASS_SETS[class_set(options)]
    depth_frames = _kitti_frames(src, step) if (src / "data_depth_annotated").is_dir() else []
    sem_dir = src / "data_semantics" / "training"
    sem = sorted((sem_dir / "semantic").glob("*.png")) if sem_dir.is_dir() else []
    if not depth_frames and not sem:
        raise layout_error(KITTI_INFO, src, "found neither annotated depth frames nor semantic images")
    if sem_split not in ("test", "hash"):
        raise DataError(f"option 'semantics_split': {sem_split!r} must be 'test' or 'hash'")
    if not depth_frames:
        sem_split = "hash"  # the semantic images alone must fill train/val/test
    records: list[tuple[str, str, Path, Path | None, Path | None]] = []
    drive_split = assign_splits([d.parents[3].name for p, _, d in depth_frames if p == "train"],
                                {"train": 1 - val_f, "val": val_f, "test": 0.0}, seed)
    sem_splits = assign_splits([m.stem for m in sem], {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
    for pub, rgb, dfile in depth_frames:
        drive = dfile.parents[3].name
        split = "test" if pub == "val" else drive_split[drive]
        records.append((f"depth-{drive}-{dfile.stem}", split, rgb, dfile, None))
    for mfile in sem:
        rgb = sem_dir / "image_2" / mfile.name
        split = "test" if sem_split == "test" else sem_splits[mfile.stem]
        records.append((f"sem-{mfile.stem}", split, rgb, None, mfile))
    spec = BenchmarkSpec(
        name=name, tasks=["depth", "segmentation"], source=domain, target=domain, image_size=size, channels=3,
        domains=[DomainSpec(domain, "target", "KITTI real frames (sparse LiDAR depth / semantic subset)",
                            labelled=True)],
        seg_classes=list(classes), has_depth=True, has_mask=True, depth_scale=KITTI_DEPTH_SCALE,
        dataset="kitti", description=f"KITTI from {src}: {len(depth_frames)} depth frames, {len(sem)} semantic",
        expectations={"max_depth_m": 120.0, "mask_values": MASK_VALUES},
    )

    return write_benchmark(out, spec, (_kitti_sample(r, domain, size, crop) for r in records))


KittiRecord = tuple[str, str, Path, Path | None, Path | None]  # id, split, rgb, depth file, semantic file


def _kitti_sample(record: KittiRecord, domain: str, size: int, crop: str) -> Sample:
    """One KITTI frame: its sparse LiDAR depth (metres) or its semantic mask (shared classes); the other empty."""
    sid, split, rgb, dfile, mfile = record
    img = frame_to_square(read_image(rgb, "RGB"), size, crop)
    depth = np.zeros((size, size), np.float32)
    mask = np.full((size, size), IGNORE, np.uint8)
    if dfile is not None:
        raw = read_image(dfile)
        if raw.dtype != np.uint16:
            raise DataError(f"{dfile}: depth PNG is {raw.dtype}; KITTI depth maps are uint16 (m * 256)")
        d = raw.astype(np.float32) / KITTI_DEPTH_SCALE
        if crop == "center":
            from s2r.data.sources.common import center_square

            d = center_square(d)
        depth = sparse_depth_resize(d, size)
    if mfile is not None:
        ids = read_image(mfile)
        if ids.ndim != 2:
            raise DataError(f"{mfile}: semantic map must be one channel of Cityscapes label ids")
        mask = frame_to_square(cityscapes_to_shared(ids), size, crop, nearest=True)
    return Sample(id=sid, domain=domain, split=split, image=img, depth=depth, mask=mask)


def build_vkitti2(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """Virtual KITTI 2 -> one sim domain with dense depth and 12-class masks; variations share scene ids."""
    check_options(options, VKITTI_INFO.options, "vkitti2")
    size = int(option(options, "image_size", 256, int))
    crop = option(options, "crop", "none", str)
    max_depth = float(option(options, "max_depth", 80.0, (int, float)))
    fractions = check_fractions(option(options, "fractions", {"train": 0.8, "val": 0.1, "test": 0.1}, dict))
    cam = option(options, "camera", "Camera_0", str)
    step = int(option(options, "frame_step", 1, int))
    seed = int(option(options, "seed", 0, int))
    domain = option(options, "domain", "vkitti2", str)
    label_set = class_set(options)
    classes = CLASS_SETS[label_set]
    mapping = VKITTI_TO_FULL if label_set == "vkitti" else VKITTI_TO_SHARED
    rgb_root = src / "vkitti_2.0.3_rgb"
    rgbs = sorted(rgb_root.glob(f"*/*/frames/rgb/{cam}/rgb_*.jpg"))
    if not rgbs:
        raise layout_error(VKITTI_INFO, src, f"no {rgb_root}/<Scene>/<variation>/frames/rgb/{cam}/rgb_*.jpg")
    wanted = option(options, "variations", None, list)
    variations = sorted({p.parents[3].name for p in rgbs})
    if wanted:
        missing = sorted(set(wanted) - set(variations))
        if missing:
            raise DataError(f"option 'variations': {missing} not found in {rgb_root} ({variations})")
        variations = list(wanted)
    frames = sorted({(p.parents[4].name, int(re.sub(r"\D", "", p.stem))) for p in rgbs})[::step]
    keep = set(frames)
    scene_index = {f: k for k, f in enumerate(frames)}
    records: list[VkittiRecord] = []
    frame_split = assign_splits([f"{s}:{f}" for s, f in frames], fractions, seed)
    for p in rgbs:
        scene, var, frame = p.parents[4].name, p.parents[3].name, int(re.sub(r"\D", "", p.stem))
        if (scene, frame) not in keep or var not in variations:
            continue
        d = src / "vkitti_2.0.3_depth" / scene / var / "frames" / "depth" / cam / f"depth_{frame:05d}.png"
        m = (src / "vkitti_2.0.3_classSegmentation" / scene / var / "frames" / "classSegmentation" / cam
             / f"classgt_{frame:05d}.png")
        for f, what in ((d, "depth"), (m, "classSegmentation")):
            if not f.is_file():
                raise DataError(f"{f}: missing {what} for {p}")
        split = frame_split[f"{scene}:{frame}"]
        records.append((f"{scene}-{var}-{cam}-{frame:05d}", split, p, d, m, scene, var, scene_index[(scene, frame)]))
    spec = BenchmarkSpec(
        name=name, tasks=["depth", "segmentation"], source=domain, target=domain, image_size=size, channels=3,
        domains=[DomainSpec(domain, "source", "Virtual KITTI 2 renderings (dense depth, class segmentation)",
                            labelled=True)],
        seg_classes=list(classes), has_depth=True, has_mask=True, depth_scale=KITTI_DEPTH_SCALE,
        dataset="vkitti2", description=f"Virtual KITTI 2 from {src}: {cam}, variations {variations}",
        expectations={"max_depth_m": max_depth, "mask_values": list(range(len(classes))) + [IGNORE]},
    )
    return write_benchmark(out, spec, _vkitti2_samples(records, src, mapping, domain, variations, size, crop,
                                                       max_depth))


VkittiRecord = tuple[str, str, Path, Path, Path, str, str, int]  # id, split, rgb, depth, mask, scene, var, scene_id


def _vkitti2_samples(records: list[VkittiRecord], src: Path, mapping: dict[str, int], domain: str,
                     variations: list[str], size: int, crop: str, max_depth: float) -> Iterator[Sample]:
    """The frames with depth (metres, clipped at max_depth) and class masks from each scene's colour table."""
    colour_cache: dict[tuple[str, str], dict[tuple[int, int, int], int]] = {}
    for sid, split, p, d, m, scene, var, scene_id in records:
        if (scene, var) not in colour_cache:
            colour_cache[(scene, var)] = read_colors(src / "vkitti_2.0.3_textgt" / scene / var / "colors.txt",
                                                     mapping)
        raw = read_image(d)
        if raw.dtype != np.uint16:
            raise DataError(f"{d}: depth PNG is {raw.dtype}; VKITTI 2 depth is uint16 centimetres")
        depth = np.minimum(raw.astype(np.float32) / VKITTI_DEPTH_SCALE, max_depth)
        mask = vkitti_mask(read_image(m, "RGB"), colour_cache[(scene, var)], m)
        yield Sample(id=sid, domain=domain, split=split, image=frame_to_square(read_image(p, "RGB"), size, crop),
                     depth=frame_to_square(depth, size, crop, nearest=True),
                     mask=frame_to_square(mask, size, crop, nearest=True), scene_id=scene_id,
                     variation=variations.index(var))


# ----------------------------------------------------------------------------------------------------------
# fixtures in the published layouts


def _rgb(h: int, w: int, k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8)


def kitti_fixture(root: Path, w: int = 24, h: int = 8) -> Path:
    """Two drives with sparse uint16 depth (m * 256) + 4 semantic images with Cityscapes ids."""
    from PIL import Image

    k = 0
    for pub, drives in (("train", ["2011_09_26_drive_0001_sync", "2011_09_26_drive_0002_sync"]),
                        ("val", ["2011_09_26_drive_0005_sync"])):
        for drive in drives:
            for frame in range(3):
                k += 1
                d = root / "data_depth_annotated" / pub / drive / "proj_depth" / "groundtruth" / "image_02"
                r = root / "raw" / drive[:10] / drive / "image_02" / "data"
                d.mkdir(parents=True, exist_ok=True)
                r.mkdir(parents=True, exist_ok=True)
                depth = np.zeros((h, w), np.uint16)
                depth[h // 2 :, ::3] = np.uint16(round(10.5 * 256))  # 10.5 m on every third column, bottom half
                Image.fromarray(depth).save(d / f"{frame:010d}.png")
                Image.fromarray(_rgb(h, w, k)).save(r / f"{frame:010d}.png")
    s = root / "data_semantics" / "training"
    (s / "image_2").mkdir(parents=True, exist_ok=True)
    (s / "semantic").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        ids = np.full((h, w), 23, np.uint8)  # sky
        ids[h // 2 :] = 7  # road
        ids[h // 2 :, : w // 4] = 26  # car
        ids[0, 0] = 4  # a class outside the 12 (ignored)
        Image.fromarray(ids).save(s / "semantic" / f"{i:06d}_10.png")
        Image.fromarray(_rgb(h, w, 100 + i)).save(s / "image_2" / f"{i:06d}_10.png")
    return root


def vkitti2_fixture(root: Path, w: int = 24, h: int = 8, frames: int = 5) -> Path:
    """Two scenes x two variations x `frames` frames: jpg RGB, uint16 cm depth, colour-coded classes."""
    from PIL import Image

    k = 0
    for scene in ("Scene01", "Scene02"):
        for var in ("clone", "fog"):
            base = {"rgb": root / "vkitti_2.0.3_rgb" / scene / var / "frames" / "rgb" / "Camera_0",
                    "depth": root / "vkitti_2.0.3_depth" / scene / var / "frames" / "depth" / "Camera_0",
                    "seg": root / "vkitti_2.0.3_classSegmentation" / scene / var / "frames" / "classSegmentation"
                    / "Camera_0"}
            for p in base.values():
                p.mkdir(parents=True, exist_ok=True)
            for f in range(frames):
                k += 1
                Image.fromarray(_rgb(h, w, k)).save(base["rgb"] / f"rgb_{f:05d}.jpg", quality=95)
                depth = np.full((h, w), 2000, np.uint16)  # 20 m
                depth[: h // 2] = 65535  # sky: 655.35 m -> clipped
                Image.fromarray(depth).save(base["depth"] / f"depth_{f:05d}.png")
                seg = np.zeros((h, w, 3), np.uint8)
                seg[: h // 2] = VKITTI_COLORS["Sky"]
                seg[h // 2 :] = VKITTI_COLORS["Road"]
                seg[h // 2 :, : w // 4] = VKITTI_COLORS["Van"]
                seg[h - 1, w - 1] = VKITTI_COLORS["Tree"]
                Image.fromarray(seg).save(base["seg"] / f"classgt_{f:05d}.png")
    return root
