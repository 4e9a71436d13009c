"""Benchmark data model: description file, samples, manifest, and the on-disk layout shared by all sources.

A benchmark on disk (written atomically by :func:`write_benchmark`)::

    <root>/benchmark.yaml                     BenchmarkSpec (name, task, domains, source/target, classes, factors)
    <root>/manifest.parquet                   one row per sample (MANIFEST_COLUMNS + label/factor columns)
    <root>/images/<domain>/<split>/<id>.png   uint8 image, grey (L) or RGB
    <root>/depth/<domain>/<split>/<id>.png    optional uint16 depth in millimetres, 0 = invalid pixel
    <root>/masks/<domain>/<split>/<id>.png    optional uint8 segmentation class ids (255 = ignore)

Paths in the manifest are relative to the benchmark root (absolute paths are allowed for adapters that
point at a user's files in place).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import SPLITS, ConfigError, Schema, from_dict

TASKS = ("classification", "factors", "depth", "segmentation")
ROLES = ("source", "target", "auxiliary")
# Columns every manifest has, in this order; label, factor_<name>, depth_path, mask_path, scene_id and
# variation follow when the benchmark has them.
MANIFEST_COLUMNS = ("id", "domain", "split", "path", "width", "height", "channels", "sha256")
NO_LABEL = -1
DEPTH_SCALE = 1000.0  # uint16 depth PNG stores millimetres


class DataError(ValueError):
    """Bad input data; the message names the file, row or key at fault."""


@dataclass
class DomainSpec(Schema):
    """One domain of a benchmark (e.g. synthetic or real)."""

    name: str
    role: str  # one of ROLES
    description: str = ""
    labelled: bool = True  # whether labels/factors of this domain may be used for training
    simulated_real: bool = False  # a stand-in for real data (said plainly in docs and reports)


@dataclass
class BenchmarkSpec(Schema):
    """What `benchmark.yaml` holds: the description that travels with the data."""

    name: str
    tasks: list[str]  # subset of TASKS
    domains: list[DomainSpec]
    source: str
    target: str
    image_size: int
    channels: int
    classes: list[str] = field(default_factory=list)  # class names, label i = classes[i]
    factors: dict[str, int] = field(default_factory=dict)  # factor name -> number of values
    seg_classes: list[str] = field(default_factory=list)  # segmentation class names (dense task)
    has_depth: bool = False
    has_mask: bool = False
    resize: bool = False  # files keep their own size; `prepare` resizes them to image_size (user adapters)
    description: str = ""
    # Added for the real-dataset adapters (s2r.data.sources); defaults keep older benchmark.yaml files valid.
    depth_scale: float = DEPTH_SCALE  # uint16 depth PNG value per metre (1000 = mm; KITTI uses 256)
    dataset: str = ""  # the published dataset an adapter built this from (e.g. "mpi3d"), "" for others
    # dataset rules validation checks beyond labels/factors: max_depth_m (float), mask_values (list of ids),
    # domain_rows ({domain: exact row count}); see s2r.data.validation._expectation_checks
    expectations: dict[str, Any] = field(default_factory=dict)
    # Added for user data (issue 17); defaults keep older benchmark.yaml files valid and byte-identical.
    factor_ranges: dict[str, list[float]] = field(default_factory=dict)  # continuous factor -> [low, high]
    depth_invalid: float = 0.0  # depth file value meaning "no measurement" (prepared as 0 = invalid)
    mask_ignore: int = 255  # mask id meaning "ignore this pixel" (allowed besides 0..len(seg_classes)-1)
    convert_16bit: bool = False  # 16-bit images: refused unless true, then prepare keeps the high byte (>> 8)
    data_root: str = ""  # the folder the user's files must lie in ("" = the benchmark folder itself)
    allow_outside_root: bool = False  # files outside data_root were accepted explicitly (--allow-outside-root)
    # 0 = square frames (image_size x image_size); else frames are image_size wide and image_height high
    # (paper 5 trains and scores YCB-Video / HomebrewedDB at 640x480)
    image_height: int = 0
    # Class structure (paper 1's seat occupancy): mirror_classes[i] is the label of class i's image mirrored
    # left-right ([] = no map: a flip keeps the label); class_parts[i] lists class i's per-position sub-labels
    # (seats left to right, 0 = empty) for hard triplet negatives ([] = classes have no parts).
    mirror_classes: list[int] = field(default_factory=list)
    class_parts: list[list[int]] = field(default_factory=list)

    @property
    def height(self) -> int:
        """Frame height in pixels (image_size for square benchmarks)."""
        return self.image_height or self.image_size

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"key 'tasks': {self.tasks} must be a non-empty subset of {list(TASKS)}")
        names = [d.name for d in self.domains]
        for key in ("source", "target"):
            if getattr(self, key) not in names:
                raise ConfigError(f"key {key!r}: {getattr(self, key)!r} is not a declared domain {names}")
        for d in self.domains:
            if d.role not in ROLES:
                raise ConfigError(f"key 'domains': domain {d.name!r} has role {d.role!r}, not one of {list(ROLES)}")
        if "classification" in self.tasks and not self.classes:
            raise ConfigError("key 'classes': a classification benchmark needs class names")
        n = len(self.classes)
        if self.mirror_classes:
            m = self.mirror_classes
            if len(m) != n or any(not 0 <= c < n for c in m) or any(m[c] != i for i, c in enumerate(m)):
                raise ConfigError(f"key 'mirror_classes': must map each of the {n} classes to a class index, and "
                                  f"mirroring twice must give the class back; got {m}")
        if self.class_parts and (len(self.class_parts) != n or len({len(p) for p in self.class_parts}) != 1):
            raise ConfigError(f"key 'class_parts': needs one equally long list of sub-labels per class ({n})")
        for k, rng in self.factor_ranges.items():
            if k not in self.factors:
                raise ConfigError(f"key 'factor_ranges.{k}': {k!r} is not a factor {list(self.factors)}")
            if (len(rng) != 2 or not all(math.isfinite(float(v)) for v in rng) or not float(rng[0]) < float(rng[1])):
                raise ConfigError(f"key 'factor_ranges.{k}': {rng} must be [low, high] with finite low < high")
            if self.factors[k] < 2:
                raise ConfigError(f"key 'factors.{k}': a continuous factor needs >= 2 bins, got {self.factors[k]}")

    def domain(self, name: str) -> DomainSpec:
        """Return the domain called `name` or fail naming the known ones."""
        for d in self.domains:
            if d.name == name:
                return d
        raise DataError(f"benchmark {self.name!r} has no domain {name!r}; known: {[d.name for d in self.domains]}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # the adapter fields are left out at their defaults, so existing benchmark.yaml files stay byte-identical
        defaults: tuple[tuple[str, object], ...] = (
            ("depth_scale", DEPTH_SCALE), ("dataset", ""), ("expectations", {}), ("factor_ranges", {}),
            ("depth_invalid", 0.0), ("mask_ignore", 255), ("convert_16bit", False), ("data_root", ""),
            ("allow_outside_root", False), ("image_height", 0), ("mirror_classes", []), ("class_parts", []))
        for key, default in defaults:
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "benchmark.yaml") -> BenchmarkSpec:
        """Build from a parsed YAML dict, strictly: unknown or missing keys name the file."""
        return from_dict(cls, raw, where)

    def save(self, path: Path) -> None:
        import yaml

        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> BenchmarkSpec:
        import yaml

        if not path.is_file():
            raise DataError(f"{path}: benchmark description not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML: {e}") from e
        return cls.from_dict(raw, str(path))


@dataclass
class Sample:
    """One generated sample before it is written; generators yield these."""

    id: str
    domain: str
    split: str
    image: np.ndarray  # (H, W) or (H, W, C) uint8
    label: int = NO_LABEL
    factors: dict[str, int] = field(default_factory=dict)  # factor name -> value index
    depth: np.ndarray | None = None  # (H, W) float32 metres, 0 or non-finite = invalid
    mask: np.ndarray | None = None  # (H, W) uint8 class ids
    scene_id: int | None = None  # samples rendered from the same scene share it (paired sampling)
    variation: int | None = None  # index of the rendering variation within the scene


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 (H,W)/(H,W,3) or uint16 (H,W) array as PNG, deterministically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _check_sample(s: Sample, spec: BenchmarkSpec) -> None:
    if s.split not in SPLITS:
        raise DataError(f"sample {s.id!r}: split {s.split!r} not in {SPLITS}")
    spec.domain(s.domain)
    if s.image.dtype != np.uint8:
        raise DataError(f"sample {s.id!r}: image dtype {s.image.dtype}, expected uint8")
    ch = 1 if s.image.ndim == 2 else s.image.shape[2]
    if ch != spec.channels:
        raise DataError(f"sample {s.id!r}: {ch} channels, benchmark declares {spec.channels}")


def write_benchmark(root: Path, spec: BenchmarkSpec, samples: Iterable[Sample], progress: bool = True) -> Path:
    """Write images, manifest and description into `root` atomically (a failed run leaves `root` as it was)."""
    import pandas as pd
    from tqdm import tqdm

    root = Path(root)
    with staged_dir(root) as tmp:
        rows: list[dict[str, Any]] = []
        for s in tqdm(samples, desc=f"generate {spec.name}", unit="img", disable=not progress):
            _check_sample(s, spec)
            rel = Path("images") / s.domain / s.split / f"{s.id}.png"
            data = png_bytes(np.ascontiguousarray(s.image))
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
            h, w = s.image.shape[:2]
            row: dict[str, Any] = {
                "id": s.id, "domain": s.domain, "split": s.split, "path": str(rel), "width": w, "height": h,
                "channels": spec.channels, "sha256": sha256_bytes(data),
            }
            if spec.classes:
                row["label"] = int(s.label)
            for name in spec.factors:
                row[f"factor_{name}"] = int(s.factors.get(name, NO_LABEL))
            if spec.has_depth:
                row["depth_path"] = _write_aux(tmp, "depth", s, _depth_png(s.depth, s.id, spec.depth_scale))
            if spec.has_mask:
                row["mask_path"] = _write_aux(tmp, "masks", s, s.mask)
            if s.scene_id is not None:
                row["scene_id"] = int(s.scene_id)
                row["variation"] = int(s.variation if s.variation is not None else 0)
            rows.append(row)
        if not rows:
            raise DataError(f"benchmark {spec.name!r}: the source produced no samples")
        manifest = pd.DataFrame(rows)
        for col in ("scene_id", "variation"):  # absent for some domains: nullable ints, not NaN floats
            if col in manifest:
                manifest[col] = manifest[col].astype("Int64")
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        spec.save(tmp / "benchmark.yaml")
    return root


def _depth_png(depth: np.ndarray | None, sid: str, scale: float = DEPTH_SCALE) -> np.ndarray:
    if depth is None:
        raise DataError(f"sample {sid!r}: benchmark has depth but the sample has none")
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0) * scale
    return np.clip(np.round(d), 0, 65535).astype(np.uint16)


def _write_aux(tmp: Path, kind: str, s: Sample, array: np.ndarray | None) -> str:
    if array is None:
        raise DataError(f"sample {s.id!r}: benchmark declares {kind} but the sample has none")
    rel = Path(kind) / s.domain / s.split / f"{s.id}.png"
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp / rel).write_bytes(png_bytes(np.ascontiguousarray(array)))
    return str(rel)


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """A temp dir beside `dest` that replaces it on success and vanishes on failure (never half-written)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dest)


def replace_dir(new: Path, dest: Path) -> None:
    """Swap `new` into `dest` with renames, so readers never see a half-written directory."""
    dest = Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


FACTOR_BINS = 20  # disentanglement_lib's default num_bins for make_discretizer (utils.py, _histogram_discretize)


def bin_factor(values: np.ndarray, low: float, high: float, bins: int) -> np.ndarray:
    """Continuous factor values -> bin indices 0..bins-1, the histogram discretisation of disentanglement_lib.

    disentanglement_lib (evaluation/metrics/utils.py, ``_histogram_discretize``) computes
    ``np.digitize(x, np.histogram(x, num_bins)[1][:-1])`` (1-based) over the observed range of the evaluated set.
    We use the same equal-width edges and digitize rule but over the DECLARED range [low, high] (so train, test
    and OOD sets share one set of edges), 0-based. Values equal to ``high`` fall in the last bin; NaN -> NO_LABEL.
    """
    v = np.asarray(values, np.float64)
    edges = np.histogram_bin_edges([low, high], bins=bins, range=(low, high))  # (bins + 1,)
    out = np.digitize(v, edges[:-1]) - 1  # edges[:-1]: the reference drops the last edge
    out = np.clip(out, 0, bins - 1).astype(np.int64)
    out[~np.isfinite(v)] = NO_LABEL
    return out


def bin_centres(low: float, high: float, bins: int) -> np.ndarray:
    """(bins,) centre of every bin of :func:`bin_factor` (thresholds in OOD splits are rounded to edges)."""
    edges = np.histogram_bin_edges([low, high], bins=bins, range=(low, high))
    out: np.ndarray = (edges[:-1] + edges[1:]) / 2
    return out


def read_manifest(root: Path) -> Any:
    """Load `<root>/manifest.parquet` (or `.csv`) as a DataFrame, naming the file on failure."""
    import pandas as pd

    root = Path(root)
    for name in ("manifest.parquet", "manifest.csv"):
        p = root / name
        if p.is_file():
            try:
                return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
            except Exception as e:
                raise DataError(f"{p}: cannot read manifest: {e}") from e
    raise DataError(f"{root}: no manifest.parquet or manifest.csv")


def resolve_path(root: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else Path(root) / p


def load_benchmark(root: Path) -> tuple[BenchmarkSpec, Any]:
    """Read a benchmark directory: its description and manifest."""
    root = Path(root)
    return BenchmarkSpec.load(root / "benchmark.yaml"), read_manifest(root)
