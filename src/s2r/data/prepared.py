"""Prepared form of a benchmark: decoded once into uint8 `.npy` arrays that training memory-maps.

Layout written by :func:`prepare` (atomically, so a failed run never replaces a good prepared copy)::

    <out>/prepared.json                     manifest sha256 (the data version), counts, image size
    <out>/benchmark.yaml                    copy of the description
    <out>/<domain>/<split>/images.npy       (N, H, W, C) uint8
    <out>/<domain>/<split>/labels.npy       (N,) int64, NO_LABEL where absent
    <out>/<domain>/<split>/factors.npy      (N, F) int64 (F = number of factors, may be 0); continuous factors
                                            as bin indices (equal-width bins over the declared range)
    <out>/<domain>/<split>/factor_values.npy (N, F) float64 raw factor values (only with continuous factors)
    <out>/<domain>/<split>/depth.npy        (N, H, W) float32 metres, 0 = invalid   (if the benchmark has depth)
    <out>/<domain>/<split>/masks.npy        (N, H, W) uint8 class ids               (if the benchmark has masks)
    <out>/<domain>/<split>/index.parquet    id, scene_id, variation per row
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import SPLITS
from s2r.data.benchmark import (
    DEPTH_SCALE,
    NO_LABEL,
    BenchmarkSpec,
    DataError,
    bin_factor,
    load_benchmark,
    resolve_path,
    staged_dir,
)


@dataclass
class PreparedSplit:
    """Arrays of one (domain, split); images stay memory-mapped until indexed."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    factors: np.ndarray  # (N, F) int64
    ids: list[str]
    scene_ids: np.ndarray  # (N,) int64, -1 where the source has no scenes
    variations: np.ndarray  # (N,) int64
    depth: np.ndarray | None = None  # (N, H, W) float32
    masks: np.ndarray | None = None  # (N, H, W) uint8
    factor_values: np.ndarray | None = None  # (N, F) float64 raw values when the benchmark has continuous factors

    def __len__(self) -> int:
        return int(self.images.shape[0])


def one_per_scene(split: PreparedSplit) -> np.ndarray:
    """Indices of the first image of every scene (all images where the split has no scene ids)."""
    s = np.asarray(split.scene_ids)
    if (s < 0).any():
        return np.arange(len(s))
    _, first = np.unique(s, return_index=True)
    return np.sort(first)


class PreparedBenchmark:
    """Read access to a prepared benchmark directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "prepared.json"
        if not meta_path.is_file():
            raise DataError(f"{self.root}: not a prepared benchmark (no prepared.json); run `s2r data prepare`")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.spec = BenchmarkSpec.load(self.root / "benchmark.yaml")
        self._cache: dict[tuple[str, str], PreparedSplit] = {}

    @property
    def data_version(self) -> str:
        """sha256 of the manifest the arrays were built from (logged as an MLflow tag)."""
        return str(self.meta["manifest_sha256"])

    def has(self, domain: str, split: str) -> bool:
        return (self.root / domain / split / "images.npy").is_file()

    def get(self, domain: str, split: str) -> PreparedSplit:
        """Load (memory-mapped) one domain/split, naming what is missing."""
        import pandas as pd

        key = (domain, split)
        if key in self._cache:
            return self._cache[key]
        d = self.root / domain / split
        if not (d / "images.npy").is_file():
            raise DataError(f"{self.root}: no prepared data for domain {domain!r} split {split!r}")
        index = pd.read_parquet(d / "index.parquet")
        part = PreparedSplit(
            images=np.load(d / "images.npy", mmap_mode="r"),
            labels=np.load(d / "labels.npy"),
            factors=np.load(d / "factors.npy"),
            ids=index["id"].astype(str).tolist(),
            scene_ids=index["scene_id"].to_numpy(np.int64),
            variations=index["variation"].to_numpy(np.int64),
            depth=np.load(d / "depth.npy", mmap_mode="r") if (d / "depth.npy").is_file() else None,
            masks=np.load(d / "masks.npy", mmap_mode="r") if (d / "masks.npy").is_file() else None,
            factor_values=np.load(d / "factor_values.npy") if (d / "factor_values.npy").is_file() else None,
        )
        self._cache[key] = part
        return part


def _decode(path: Path, channels: int, size: int | tuple[int, int], row: int, sid: str, mode: str = "image",
            convert_16bit: bool = False) -> np.ndarray:
    """Decode one file to uint8/uint16 array of the benchmark's size (side, or (width, height)), naming file and
    row on failure."""
    wh = (size, size) if isinstance(size, int) else tuple(size)
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"manifest id {sid!r} (row {row}): cannot read {path}: {e.strerror or e}") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if mode == "image":
                deep = im.mode in ("I", "F") or im.mode.startswith("I;16") or (data[:8] == b"\x89PNG\r\n\x1a\n"
                                                                               and len(data) > 24 and data[24] == 16)
                if deep and not (convert_16bit and im.mode not in ("I", "F")):
                    raise DataError(f"manifest id {sid!r} (row {row}): {path} has more than 8 bits per channel "
                                    f"(mode {im.mode}); declare convert_16bit: true to keep the high byte")
                if im.mode.startswith("I;16"):  # declared conversion: keep the high byte (65535 -> 255)
                    im = Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
                want = {1: "L", 3: "RGB"}.get(channels)
                if want is None:
                    raise DataError(f"benchmark declares {channels} channels; only 1 (L) or 3 (RGB) are supported")
                got = len(im.getbands())
                if got != channels and not (channels == 3 and im.mode == "P"):
                    raise DataError(
                        f"manifest id {sid!r} (row {row}): {path} has {got} channels ({im.mode}), "
                        f"benchmark declares {channels}"
                    )
                im = im.convert(want)
                if im.size != wh:
                    im = im.resize(wh, Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
                return arr[:, :, None] if arr.ndim == 2 else arr  # (H, W) -> (H, W, 1)
            resample = Image.Resampling.NEAREST
            if im.size != wh:
                im = im.resize(wh, resample)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"manifest id {sid!r} (row {row}): {path} is not a readable image: {e}") from e


def _aux(path: Any, kind: str, wh: tuple[int, int], row: int, sid: str, spec: BenchmarkSpec) -> np.ndarray:
    """A depth map (float32 metres, 0 = invalid) or a mask (uint8 ids) at the benchmark's size.

    Empty cells (rows of unlabelled domains) become all-invalid depth / all-ignore masks.
    """
    from PIL import Image

    from s2r.data.validation import read_aux

    shape = (wh[1], wh[0])  # (width, height) -> (H, W)

    def resize(a: np.ndarray) -> np.ndarray:  # nearest: no invented depth or class ids
        if a.shape == shape:
            return a
        return np.asarray(Image.fromarray(a).resize(wh, Image.Resampling.NEAREST))

    if not isinstance(path, str) or not path:
        return (np.zeros(shape, np.float32) if kind == "depth"
                else np.full(shape, spec.mask_ignore, np.uint8))
    try:
        arr = read_aux(Path(path), kind)
    except DataError as e:
        raise DataError(f"manifest id {sid!r} (row {row}): {e}") from e
    if kind == "depth":
        inv = float(spec.depth_invalid)
        bad = (np.isnan(arr) if math.isnan(inv) else arr == inv) | ~np.isfinite(arr) | (arr < 0)
        d = np.where(bad, 0.0, arr / float(spec.depth_scale or DEPTH_SCALE)).astype(np.float32)
        return resize(d).astype(np.float32)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise DataError(f"manifest id {sid!r} (row {row}): {path}: mask ids {int(arr.min())}..{int(arr.max())} "
                        "do not fit 0..255")
    return resize(arr.astype(np.uint8))


def _factor_indices(rows: Any, spec: BenchmarkSpec) -> np.ndarray:
    """(N, F) int64 factor indices; continuous factors are binned (:func:`s2r.data.benchmark.bin_factor`)."""
    cols = []
    for k, n in spec.factors.items():
        v = rows[f"factor_{k}"]
        if k in spec.factor_ranges:
            low, high = spec.factor_ranges[k]
            cols.append(bin_factor(pd_to_float(v), float(low), float(high), int(n)))
        else:
            cols.append(v.to_numpy(np.int64))
    return np.stack(cols, 1) if cols else np.zeros((len(rows), 0), np.int64)


def pd_to_float(v: Any) -> np.ndarray:
    import pandas as pd

    out: np.ndarray = pd.to_numeric(v, errors="coerce").to_numpy(np.float64)
    return out


def save_split(d: Path, part: PreparedSplit) -> None:
    """Write one (domain, split) in the prepared layout (images skipped when None: already written)."""
    import pandas as pd

    d.mkdir(parents=True, exist_ok=True)
    if part.images is not None:
        np.save(d / "images.npy", np.ascontiguousarray(part.images, dtype=np.uint8))
    np.save(d / "labels.npy", np.asarray(part.labels, np.int64))
    np.save(d / "factors.npy", np.asarray(part.factors, np.int64))
    if part.depth is not None:
        np.save(d / "depth.npy", np.asarray(part.depth, np.float32))
    if part.masks is not None:
        np.save(d / "masks.npy", np.asarray(part.masks, np.uint8))
    if part.factor_values is not None:
        np.save(d / "factor_values.npy", np.asarray(part.factor_values, np.float64))
    pd.DataFrame({"id": part.ids, "scene_id": np.asarray(part.scene_ids, np.int64),
                  "variation": np.asarray(part.variations, np.int64)}).to_parquet(d / "index.parquet", index=False)


def _transformed(part: PreparedSplit, fn: Callable[[np.ndarray], np.ndarray], name: str) -> np.ndarray:
    """`fn` applied to a split's images; it must keep their shape and uint8 type."""
    pixels = fn(np.asarray(part.images)) if len(part) else np.asarray(part.images)
    if pixels.shape != part.images.shape or pixels.dtype != np.uint8:
        raise DataError(f"transform for {name!r} returned {pixels.shape} {pixels.dtype}, "
                        f"expected {part.images.shape} uint8")
    return pixels


def derive(
    src: PreparedBenchmark,
    out: Path,
    new_domains: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
    *,
    source: str | None = None,
    target: str | None = None,
    version_salt: str,
) -> Path:
    """A new prepared benchmark: every domain of `src` plus domains made by a pixel transform.

    `new_domains` maps a new domain name to (the domain it is computed from, uint8 (N,H,W,C) -> same).
    Labels, factors, ids, depth and masks are carried over unchanged ("same manifest, new pixels");
    `source` / `target` name the domains that become the benchmark's source / target (others turn
    auxiliary). The data version mixes the parent's
    version with `version_salt` (e.g. the sha256 of the model that made the pixels).
    """
    from dataclasses import replace

    from s2r.data.benchmark import DomainSpec

    spec = src.spec
    domains = list(spec.domains)
    counts: dict[str, dict[str, int]] = {}
    with staged_dir(out) as tmp:
        for d in spec.domains:
            for split in SPLITS:
                if src.has(d.name, split):
                    part = src.get(d.name, split)
                    save_split(tmp / d.name / split, replace(part, images=np.asarray(part.images)))
                    counts.setdefault(d.name, {})[split] = len(part)
        for name, (parent, fn) in new_domains.items():
            base = spec.domain(parent)
            domains.append(DomainSpec(name, "auxiliary",
                                      f"{parent} transformed ({version_salt[:12]}): {base.description}",
                                      labelled=base.labelled, simulated_real=base.simulated_real))
            for split in SPLITS:
                if src.has(parent, split):
                    part = src.get(parent, split)
                    save_split(tmp / name / split, replace(part, images=_transformed(part, fn, name)))
                    counts.setdefault(name, {})[split] = len(part)
        source, target = source or spec.source, target or spec.target
        names = [d.name for d in domains]
        for key, name in (("source", source), ("target", target)):
            if name not in names:
                raise DataError(f"derived benchmark: {key} domain {name!r} is not one of {names}")
        domains = [replace(d, role="source" if d.name == source else "target" if d.name == target else "auxiliary")
                   for d in domains]
        new_spec = replace(spec, domains=domains, source=source, target=target,
                           description=f"{spec.description} [derived: {', '.join(new_domains)}]")
        new_spec.save(tmp / "benchmark.yaml")
        version = hashlib.sha256(f"{src.data_version}:{version_salt}".encode()).hexdigest()
        meta = {"benchmark": spec.name, "manifest_sha256": version, "parent": src.data_version,
                "image_size": spec.image_size, "channels": spec.channels, "counts": counts}
        (tmp / "prepared.json").write_text(json.dumps(meta, indent=2))
    return out


def _prepare_split(d: Path, bench_root: Path, rows: Any, spec: BenchmarkSpec, bar: Any) -> int:
    """Decode one (domain, split) group of manifest rows into `d` (images through a memmap); the row count."""
    size, ch = spec.image_size, spec.channels
    height, wh = spec.height, (spec.image_size, spec.height)
    factor_cols = [f"factor_{n}" for n in spec.factors]
    n = len(rows)
    d.mkdir(parents=True)
    images = np.lib.format.open_memmap(d / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, height, size, ch))
    depth = np.zeros((n, height, size), np.float32) if spec.has_depth else None
    masks = np.zeros((n, height, size), np.uint8) if spec.has_mask else None
    for j, (row, r) in enumerate(rows.iterrows()):
        sid = str(r["id"])
        images[j] = _decode(resolve_path(bench_root, r["path"]), ch, wh, int(row), sid,
                            convert_16bit=spec.convert_16bit)
        for arr, col, kind in ((depth, "depth_path", "depth"), (masks, "mask_path", "mask")):
            if arr is not None:
                v = r.get(col)
                p = str(resolve_path(bench_root, v)) if isinstance(v, str) and v else None
                arr[j] = _aux(p, kind, wh, int(row), sid, spec)
        bar.update(1)
    images.flush()
    del images
    save_split(d, PreparedSplit(
        images=None,  # type: ignore[arg-type]  # already written through the memmap above
        labels=rows["label"].to_numpy(np.int64) if "label" in rows else np.full(n, NO_LABEL, np.int64),
        factors=_factor_indices(rows, spec),
        factor_values=rows[factor_cols].to_numpy(np.float64).reshape(n, len(factor_cols))
        if spec.factor_ranges else None,
        ids=rows["id"].astype(str).tolist(),
        scene_ids=rows["scene_id"].fillna(-1).to_numpy(np.int64) if "scene_id" in rows else np.full(n, -1),
        variations=rows["variation"].fillna(0).to_numpy(np.int64) if "variation" in rows else np.zeros(n),
        depth=depth, masks=masks,
    ))
    return n


def prepare(bench_root: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Decode every manifest row once into memory-mappable arrays grouped by domain and split."""
    from tqdm import tqdm

    bench_root, out = Path(bench_root), Path(out)
    spec, manifest = load_benchmark(bench_root)
    manifest_file = next(p for p in (bench_root / "manifest.parquet", bench_root / "manifest.csv") if p.is_file())
    size, ch = spec.image_size, spec.channels
    factor_cols = [f"factor_{n}" for n in spec.factors]
    for col in ["id", "domain", "split", "path", *factor_cols] + (["label"] if spec.classes else []):
        if col not in manifest.columns:
            raise DataError(f"{manifest_file}: missing column {col!r}")
    counts: dict[str, dict[str, int]] = {}
    with staged_dir(out) as tmp:
        bar = tqdm(total=len(manifest), desc=f"prepare {spec.name}", unit="img", disable=not progress)
        for (domain, split), rows in manifest.groupby(["domain", "split"], sort=True):
            if split not in SPLITS:
                raise DataError(f"{manifest_file}: row {int(rows.index[0])}: unknown split {split!r}")
            n = _prepare_split(tmp / str(domain) / str(split), bench_root, rows, spec, bar)
            counts.setdefault(str(domain), {})[str(split)] = n
        bar.close()
        spec.save(tmp / "benchmark.yaml")
        meta = {
            "benchmark": spec.name,
            "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
            "image_size": size,
            "channels": ch,
            "counts": counts,
        }
        (tmp / "prepared.json").write_text(json.dumps(meta, indent=2))
    return out
