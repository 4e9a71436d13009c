"""Vehicle-interior occupancy datasets of paper 1: SVIRO, SVIRO-Illumination (synthetic) and TICaM (real).

All three become grey classification benchmarks whose label is the occupancy of every seat position
(empty, infant seat, child seat, adult), encoded as ``sum(seat_class * 4 ** (n_seats - 1 - k))`` over seats
``k`` from left to right: 3 seats -> 4**3 = 64 classes (paper 1, A.1.2), 2 seats -> 16 classes. Class names
join the seat names, e.g. ``empty-child-adult`` (left-middle-right).

SVIRO / SVIRO-Illumination (https://sviro.kl.dfki.de). Assumed layout (the files' names carry the labels)::

    <root>/<vehicle>/<train|test>/**/<vehicle>_<split>_imageID_<id>_GT_<left>_<middle>_<right>[_<k>].png

Seat codes (SVIRO): 0 empty, 1 infant seat with infant, 2 child seat with child, 3 adult, 4 everyday
object, 5 empty infant seat, 6 empty child seat. Paper 1 (A.1.2) treats everyday objects as background
(4 -> empty) and removes every image that contains an empty infant or child seat (5, 6). Only grey
images are used: when a split folder has sub-folders whose name contains ``gray``/``grey`` (SVIRO's
``grayscale_wholeImage``), only those are read. ``imageID`` is the scene: all renderings of one scene (the
illumination variations ``_<k>`` of SVIRO-Illumination) share ``scene_id`` and split. Each vehicle is a
domain. The published train folder is split train/val by a hash of the scene; test comes from the
published test folder, or (``train_only: true``, paper 1's choice for SVIRO) from the train folder too.

TICaM (https://vizta-tof.kl.dfki.de/). Assumed layout: ``<root>/<train|test>/**/*.png`` (the grey/IR
frames). Labels follow paper 1, A.1.5 exactly: the file name split at ``_``; the third part is the right
seat, the ninth the left seat; see :func:`ticam_seat_class`. Pre-processing as in A.1.5: histogram
equalisation, crop at top 120 / height 300 / left 106 / width 300, resize to 128; ``flips: true`` adds every
image mirrored with its left and right seat labels swapped (paper 1 evaluates on normal and flipped images).
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
    check_options,
    equalize,
    layout_error,
    option,
    read_image,
    resize,
    to_uint8_grey,
)

SEAT_CLASSES = ("empty", "infant", "child", "adult")  # per-seat class index 0..3
SVIRO_EVERYDAY_OBJECT, SVIRO_EMPTY_INFANT_SEAT, SVIRO_EMPTY_CHILD_SEAT = 4, 5, 6
SVIRO_NAME = re.compile(r"imageID_(?P<scene>\d+)_GT_(?P<l>\d+)_(?P<m>\d+)_(?P<r>\d+)(?:_(?P<var>\d+))?")
TICAM_CROP = (120, 300, 106, 300)  # top, height, left, width (paper 1, A.1.5)
TICAM_CHILD = {"s03", "s13", "s04", "s14"}  # always child seat (class 2)
TICAM_CONVERTIBLE = {"s01", "s11", "s02", "s12"}  # child seat with g00, infant seat with g01/g10/g11
TICAM_INFANT = {"s05", "s15", "s06", "s16"}

SVIRO_INFO = SourceInfo(
    name="sviro", title="SVIRO (synthetic vehicle interior rear seat occupancy)", url="https://sviro.kl.dfki.de",
    layout="""<vehicle>/train/grayscale_wholeImage/<vehicle>_train_imageID_<id>_GT_<l>_<m>_<r>.png
<vehicle>/test/grayscale_wholeImage/<vehicle>_test_imageID_<id>_GT_<l>_<m>_<r>.png   (optional)
  one folder per vehicle (aclass, escape, hilux, i3, lexus, tesla, tiguan, tucson, x5, zoe, ...)""",
    papers=["extractor-autoencoder-pirl-triplet"], doc="sviro",
    options={"seats": "'all' (3 seats, 64 classes) or 'outer' (left/right, 16 classes: TICaM's) [all]",
             "train_only": "test split from the train folder too (paper 1 A.1.2) [true]",
             "val_fraction": "share of train scenes for val [0.1]", "test_fraction": "with train_only [0.1]",
             "source": "source vehicle [tesla or first]", "target": "target vehicle [second]",
             "image_size": "square size [128]", "seed": "split hash seed [0]"},
)
ILLUMINATION_INFO = SourceInfo(
    name="sviro_illumination", title="SVIRO-Illumination", url="https://sviro.kl.dfki.de (SVIRO-Illumination)",
    layout="""<vehicle>/train/**/<vehicle>_train_imageID_<id>_GT_<l>_<m>_<r>_<k>.png   (k = illumination variation)
<vehicle>/test/**/<vehicle>_test_imageID_<id>_GT_<l>_<m>_<r>_<k>.png
  vehicles: cayenne, kodiaq, kona""",
    papers=["extractor-autoencoder-pirl-triplet"], doc="sviro",
    options=dict(SVIRO_INFO.options, train_only="test split from the train folder too [false: A.1.3 uses both]"),
)
TICAM_INFO = SourceInfo(
    name="ticam", title="TICaM (time-of-flight in-car cabin monitoring, real)", url="https://vizta-tof.kl.dfki.de/",
    layout="""train/**/<a>_<b>_<RIGHT>_<d>_<e>_<f>_<g>_<h>_<LEFT>[_...].png   grey/IR frames, >= 406x420 px
test/**/...same naming...
  RIGHT / LEFT seat codes: 0 or *o* empty, *p* person, s03/s13/s04/s14 child seat,
  s01/s11/s02/s12 + g00 child seat, + g01/g10/g11 infant seat, s05/s15/s06/s16 infant seat""",
    papers=["extractor-autoencoder-pirl-triplet"], doc="ticam",
    options={"flips": "add mirrored images with left/right labels swapped (A.1.5) [true]",
             "equalize": "histogram equalisation (A.1.5) [true]",
             "crop": "[top, height, left, width] [120,300,106,300]",
             "image_size": "resize after the crop (A.1.5) [128]", "val_fraction": "share of train scenes for val [0.1]",
             "seed": "split hash seed [0]", "domain": "domain name [ticam]"},
)


def seat_class_names(n_seats: int) -> list[str]:
    """Class names of the joint seat labels, index = base-4 number of the seat classes (left first)."""
    names = [""]
    for _ in range(n_seats):
        names = [f"{a}-{b}" if a else b for a in names for b in SEAT_CLASSES]
    return names


def seat_parts(n_seats: int) -> list[list[int]]:
    """Per class, its seat classes left to right (benchmark.yaml `class_parts`; 0 = empty)."""
    parts: list[list[int]] = [[]]
    for _ in range(n_seats):
        parts = [p + [s] for p in parts for s in range(len(SEAT_CLASSES))]
    return parts


def seat_mirror(n_seats: int) -> list[int]:
    """benchmark.yaml `mirror_classes`: a left-right mirrored interior swaps the seats (left <-> right)."""
    return [joint_label(p[::-1]) for p in seat_parts(n_seats)]


def joint_label(seats: list[int]) -> int:
    """Per-seat classes (left to right) -> one class index in 0..4**n-1."""
    out = 0
    for s in seats:
        out = out * 4 + s
    return out


def sviro_seat(code: int) -> int | None:
    """One SVIRO seat code -> paper-1 class (everyday object = empty), or None for a removed image."""
    if code in (SVIRO_EMPTY_INFANT_SEAT, SVIRO_EMPTY_CHILD_SEAT):
        return None
    if code == SVIRO_EVERYDAY_OBJECT:
        return 0
    if 0 <= code <= 3:
        return code
    raise ValueError(f"unknown SVIRO seat code {code}")


def ticam_seat_class(code: str) -> int:
    """Paper 1, A.1.5: one seat's part of a TICaM file name -> 0 empty, 1 infant seat, 2 child seat, 3 adult."""
    c = code.lower()
    if c == "0" or "o" in c:
        return 0
    if "p" in c:
        return 3
    seat = re.search(r"s\d\d", c)
    var = re.search(r"g\d\d", c)
    if seat is None:
        raise ValueError(f"seat code {code!r}: no person (p), object/empty (0, o) or child seat id (sNN)")
    s = seat.group(0)
    if s in TICAM_CHILD or (s in TICAM_CONVERTIBLE and var is not None and var.group(0) == "g00"):
        return 2
    if s in TICAM_INFANT or s in TICAM_CONVERTIBLE:  # g01, g11, g10 (A.1.5: "in all other cases ... 1")
        return 1
    raise ValueError(f"seat code {code!r}: child seat {s} is not one paper 1 lists")


def ticam_labels(path: Path) -> tuple[int, int]:
    """(left, right) seat classes of a TICaM file: parts 9 and 3 of the name split at '_' (A.1.5)."""
    parts = path.stem.split("_")
    if len(parts) < 9:
        raise DataError(f"{path}: TICaM file name has {len(parts)} '_'-separated parts; the labels are parts 3 "
                        "(right seat) and 9 (left seat)")
    try:
        return ticam_seat_class(parts[8]), ticam_seat_class(parts[2])
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e


def _grey_files(split_dir: Path) -> list[Path]:
    subs = [d for d in split_dir.rglob("*") if d.is_dir() and re.search(r"gr[ae]y", d.name.lower())]
    roots = subs or [split_dir]
    return sorted({p for r in roots for p in r.rglob("*.png") if not p.name.startswith(".")})


def build_sviro(src: Path, out: Path, name: str, options: dict[str, Any], illumination: bool = False) -> Path:
    """SVIRO or SVIRO-Illumination -> one grey domain per vehicle, labels per paper 1 A.1.2."""
    info = ILLUMINATION_INFO if illumination else SVIRO_INFO
    check_options(options, info.options, info.name)
    seats = option(options, "seats", "all", str)
    if seats not in ("all", "outer"):
        raise DataError(f"option 'seats': {seats!r} must be 'all' or 'outer'")
    train_only = bool(option(options, "train_only", not illumination, bool))
    val_f = float(option(options, "val_fraction", 0.1, (int, float)))
    test_f = float(option(options, "test_fraction", 0.1, (int, float)))
    size = int(option(options, "image_size", 128, int))
    seed = int(option(options, "seed", 0, int))
    vehicles = sorted(d.name for d in src.iterdir() if d.is_dir() and (d / "train").is_dir()) if src.is_dir() else []
    if not vehicles:
        raise layout_error(info, src, "no <vehicle>/train folder found")
    records: list[tuple[str, str, Path, int, int, int]] = []  # vehicle, split, file, label, scene, variation
    fr = {"train": 1 - val_f - (test_f if train_only else 0.0), "val": val_f, "test": test_f if train_only else 0.0}
    dropped = 0
    for v in vehicles:
        for pub in ("train", "test"):
            d = src / v / pub
            if not d.is_dir() or (pub == "test" and train_only):
                continue
            fs = _grey_files(d)
            if pub == "train" and not fs:
                raise layout_error(info, src, f"{d}: no .png images")
            for f in fs:
                labelled = _sviro_label(f, seats, info)
                if labelled is None:  # an empty infant/child seat: no class of paper 1 (A.1.2)
                    dropped += 1
                    continue
                split = "test" if pub == "test" else "?"  # train folder: assigned per scene below
                records.append((v, split, f, *labelled))
    scenes = assign_splits([f"{v}:{sc}" for v, sp, _, _, sc, _ in records if sp == "?"], fr, seed)
    records = [(v, scenes[f"{v}:{sc}"] if sp == "?" else sp, f, lb, sc, var) for v, sp, f, lb, sc, var in records]
    n_seats = 3 if seats == "all" else 2
    source, target = _sviro_roles(src, options, vehicles, illumination)
    spec = BenchmarkSpec(
        name=name, tasks=["classification"], source=source, target=target, image_size=size, channels=1,
        domains=[DomainSpec(v, "source" if v == source else "target" if v == target else "auxiliary",
                            f"{info.title}: {v}", labelled=True) for v in vehicles],
        classes=seat_class_names(n_seats), dataset=info.name,
        mirror_classes=seat_mirror(n_seats), class_parts=seat_parts(n_seats),
        description=f"{info.title} from {src}; {dropped} images with empty infant/child seats removed (A.1.2)",
    )

    def samples() -> Iterator[Sample]:
        for v, split, f, label, scene, var in records:
            img = resize(to_uint8_grey(read_image(f), f), size)
            yield Sample(id=f"{v}-{f.stem}",
                         domain=v, split=split, image=img, label=label, scene_id=scene, variation=var)

    return write_benchmark(out, spec, samples())


def _sviro_label(f: Path, seats: str, info: SourceInfo) -> tuple[int, int, int] | None:
    """(joint seat label, scene, variation) from a SVIRO file name; None for an empty infant/child seat."""
    m = SVIRO_NAME.search(f.stem)
    if m is None:
        raise DataError(f"{f}: file name has no 'imageID_<id>_GT_<l>_<m>_<r>' label part "
                        f"(expected layout: {info.layout.splitlines()[0]})")
    try:
        per_seat = [sviro_seat(int(m.group(k))) for k in ("l", "m", "r")]
    except ValueError as e:
        raise DataError(f"{f}: {e}") from e
    known = [s for s in per_seat if s is not None]
    if len(known) < len(per_seat):
        return None
    chosen = known if seats == "all" else [known[0], known[2]]
    return joint_label(chosen), int(m.group("scene")), int(m.group("var") or 0)


def _sviro_roles(src: Path, options: dict[str, Any], vehicles: list[str], illumination: bool) -> tuple[str, str]:
    """(source, target) vehicles: the options', else the ones paper 1 trains on (A.1.2, Section 4.5)."""
    preferred = "kodiaq" if illumination else "tesla"
    source = option(options, "source", preferred if preferred in vehicles else vehicles[0], str)
    others = [v for v in vehicles if v != source]
    target = option(options, "target", others[0] if others else source, str)
    if source == target:
        raise DataError(f"{src}: only vehicle {source!r} found; SVIRO needs two vehicles (or merge it with TICaM: "
                        "s2r data merge)")
    for k, v in (("source", source), ("target", target)):
        if v not in vehicles:
            raise DataError(f"option {k!r}: vehicle {v!r} not found in {src} ({vehicles})")
    return source, target


def ticam_preprocess(img: np.ndarray, path: Path, crop: tuple[int, int, int, int], size: int,
                     eq: bool = True) -> np.ndarray:
    """Paper 1 A.1.5: grey, histogram equalisation, crop (top, height, left, width), resize to `size`."""
    grey = to_uint8_grey(img, path)
    if eq:
        grey = equalize(grey)
    top, h, left, w = crop
    if grey.shape[0] < top + h or grey.shape[1] < left + w:
        raise DataError(f"{path}: image is {grey.shape[1]}x{grey.shape[0]}, too small for the crop "
                        f"top={top} height={h} left={left} width={w} (paper 1 A.1.5)")
    return resize(grey[top : top + h, left : left + w], size)


def build_ticam(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """TICaM -> a grey 16-class benchmark (left x right seat), pre-processed as paper 1 A.1.5."""
    check_options(options, TICAM_INFO.options, "ticam")
    flips = bool(option(options, "flips", True, bool))
    eq = bool(option(options, "equalize", True, bool))
    crop = tuple(option(options, "crop", list(TICAM_CROP), list))
    size = int(option(options, "image_size", 128, int))
    val_f = float(option(options, "val_fraction", 0.1, (int, float)))
    seed = int(option(options, "seed", 0, int))
    domain = option(options, "domain", "ticam", str)
    if len(crop) != 4:
        raise DataError(f"option 'crop': {list(crop)} must be [top, height, left, width]")
    found = {s: sorted(p for p in (src / s).rglob("*.png") if not p.name.startswith("."))
             for s in ("train", "test") if (src / s).is_dir()}
    if not found.get("train") or not found.get("test"):
        raise layout_error(TICAM_INFO, src, "need non-empty train/ and test/ folders of .png frames")
    records = []
    tv = assign_splits([f.stem for f in found["train"]], {"train": 1 - val_f, "val": val_f, "test": 0.0}, seed)
    for pub, fs in found.items():
        for f in fs:
            left, right = ticam_labels(f)
            split = "test" if pub == "test" else tv[f.stem]
            records.append((split, f, left, right))

    spec = BenchmarkSpec(
        name=name, tasks=["classification"], source=domain, target=domain, image_size=size, channels=1,
        domains=[DomainSpec(domain, "target", "TICaM real grey frames (A.1.5 pre-processing)", labelled=True)],
        classes=seat_class_names(2), dataset="ticam", mirror_classes=seat_mirror(2), class_parts=seat_parts(2),
        description=f"TICaM from {src}: equalize={eq}, crop={list(crop)}, size={size}, flips={flips}",
    )

    def samples() -> Iterator[Sample]:
        for k, (split, f, left, right) in enumerate(records):
            img = ticam_preprocess(read_image(f), f, crop, size, eq)
            yield Sample(id=f"{split}-{f.stem}", domain=domain, split=split, image=img,
                         label=joint_label([left, right]), scene_id=k, variation=0)
            if flips:  # mirrored: the left seat becomes the right one
                yield Sample(id=f"{split}-{f.stem}-flip", domain=domain, split=split,
                             image=np.ascontiguousarray(img[:, ::-1]), label=seat_mirror(2)[joint_label([left, right])],
                             scene_id=k, variation=1)

    return write_benchmark(out, spec, samples())


# ----------------------------------------------------------------------------------------------------------
# fixtures in the published layouts (tests, recipe stand-ins)


def _pattern(shape: tuple[int, int], k: int) -> np.ndarray:
    rng = np.random.default_rng(k)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def sviro_fixture(root: Path, vehicles: tuple[str, ...] = ("tesla", "kodiaq"), n: int = 24,
                  illumination: bool = False, size: int = 16) -> Path:
    """SVIRO-named grey images: every seat code appears, including 4 (object), 5 and 6 (removed)."""
    from PIL import Image

    codes = [(0, 0, 3), (3, 1, 2), (4, 0, 3), (5, 0, 0), (2, 6, 1), (1, 4, 3), (0, 2, 0), (3, 3, 3), (2, 0, 1),
             (1, 1, 0), (0, 3, 2), (3, 0, 1)]
    k = 0
    for v in vehicles:
        for pub in ("train", "test"):
            d = root / v / pub / ("grayscale_wholeImage" if not illumination else "")
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                left, mid, right = codes[i % len(codes)]
                for var in range(2 if illumination else 1):
                    suffix = f"_{var}" if illumination else ""
                    k += 1
                    Image.fromarray(_pattern((size, size), k)).save(
                        d / f"{v}_{pub}_imageID_{i}_GT_{left}_{mid}_{right}{suffix}.png")
    return root


TICAM_FIXTURE_CODES = [("p01", "0"), ("s03", "p02"), ("s01g00", "o01"), ("s01g01", "s13"), ("s05", "s02g10"),
                       ("0", "s12g11"), ("s16", "p03"), ("s04", "s11g00"), ("p04", "s06"), ("s14", "s15")]


def ticam_fixture(root: Path, n: int = 10) -> Path:
    """TICaM-named 512x424 grey frames whose 3rd/9th name parts cover every rule of paper 1 A.1.5."""
    from PIL import Image

    for pub in ("train", "test"):
        d = root / pub / "IR"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            right, left = TICAM_FIXTURE_CODES[i % len(TICAM_FIXTURE_CODES)]
            img = np.tile(np.arange(512, dtype=np.uint16)[None, :] // 4, (424, 1)).astype(np.uint8)
            img[120:420, 106:406] = _pattern((300, 300), 1000 + i + (100 if pub == "test" else 0)) // 2
            name = f"rec{i:02d}_{pub}_{right}_x_y_z_w_v_{left}_ir"
            Image.fromarray(img).save(d / f"{name}.png")
    return root
