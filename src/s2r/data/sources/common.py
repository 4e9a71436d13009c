"""Helpers shared by the real-dataset adapters: options, deterministic splits, image ops, clear layout errors."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import SPLITS
from s2r.data.benchmark import DataError

DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class SourceInfo:
    """What `s2r data add` knows about one published dataset: where it comes from and what it looks like."""

    name: str
    title: str
    url: str
    layout: str  # the expected on-disk layout, printed when the data is missing or wrong
    papers: list[str]
    doc: str  # docs/datasets/<doc>.md
    checksums: dict[str, str] = field(default_factory=dict)  # relative file -> "sha256:<hex>" / "md5:<hex>"
    options: dict[str, str] = field(default_factory=dict)  # option -> one-line help


class LayoutError(DataError):
    """The folder does not hold the dataset's published layout; the message says what was expected."""


def layout_error(info: SourceInfo, root: Path, problem: str) -> LayoutError:
    """An error naming what is wrong, where the dataset comes from and the layout s2r expects."""
    return LayoutError(
        f"{root}: {problem}\n  {info.title} is not downloaded by s2r; get it from {info.url}\n"
        f"  expected layout under {root}:\n" + "\n".join(f"    {line}" for line in info.layout.strip().splitlines())
        + f"\n  (docs/datasets/{info.doc}.md)"
    )


def option(options: dict[str, Any], key: str, default: Any, kind: type | tuple[type, ...] | None = None) -> Any:
    """One adapter option with its default, type-checked so a typo or wrong type names the key."""
    value = options.get(key, default)
    if kind is not None and value is not None and not isinstance(value, kind):
        raise DataError(f"option {key!r}: {value!r} should be {getattr(kind, '__name__', kind)}")
    return value


def check_options(options: dict[str, Any], allowed: Iterable[str], source: str) -> None:
    """Unknown adapter options are an error naming the allowed ones (a typo must not be ignored)."""
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise DataError(f"source {source!r}: unknown option {bad[0]!r}; allowed: {sorted(allowed)}")


def check_fractions(fr: dict[str, float], key: str = "fractions") -> dict[str, float]:
    if set(fr) != set(SPLITS) or any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1) > 1e-6:
        raise DataError(f"option {key!r}: {fr} must give train/val/test fractions >= 0 summing to 1")
    return {s: float(fr[s]) for s in SPLITS}


def hash_unit(key: str, seed: int = 0) -> float:
    """A stable number in [0, 1) from a key: the same scene lands in the same split on every machine."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def assign_splits(keys: Iterable[str], fractions: dict[str, float], seed: int = 0) -> dict[str, str]:
    """Stable split per key: keys ordered by their hash, cut at the fractions; every split with a non-zero
    fraction gets at least one key when there are enough (tiny datasets still validate)."""
    uniq = sorted(set(keys), key=lambda k: (hash_unit(k, seed), k))
    n = len(uniq)
    active = [s for s in SPLITS if fractions.get(s, 0) > 0]
    counts = {}
    for s in ("val", "test"):
        f = fractions.get(s, 0.0)
        counts[s] = max(1, round(n * f)) if f > 0 and n >= len(active) else round(n * f)
    counts["train"] = n - counts["val"] - counts["test"]
    if counts["train"] < 0:
        counts["test"] = max(0, counts["test"] + counts["train"])
        counts["train"] = n - counts["val"] - counts["test"]
    out, i = {}, 0
    for s in ("test", "val", "train"):
        for k in uniq[i : i + counts[s]]:
            out[k] = s
        i += counts[s]
    return out


def read_image(path: Path, mode: str | None = None) -> np.ndarray:
    """Decode one image file fully, naming the file when it is missing or corrupt."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files; all mean "corrupt"
        raise DataError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from e


def resize(arr: np.ndarray, size: int | tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an (H, W[, C]) array to (size, size) (or (w, h)); nearest for labels and depth."""
    from PIL import Image

    wh = (size, size) if isinstance(size, int) else size
    if (arr.shape[1], arr.shape[0]) == tuple(wh):
        return arr
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if arr.dtype in (np.uint8, np.uint16, np.int32) or nearest:
        im = Image.fromarray(arr)
        return np.asarray(im.resize(wh, resample))
    im = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(im.resize(wh, resample))


def center_square(arr: np.ndarray) -> np.ndarray:
    """Centre crop to the largest square (wide street / table frames -> square benchmark images)."""
    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return arr[top : top + s, left : left + s]


def frame_to_square(arr: np.ndarray, size: int, crop: str, nearest: bool = False) -> np.ndarray:
    """Bring a non-square frame to size x size: 'center' crops the middle square, 'none' resizes (distorts)."""
    if crop not in ("center", "none"):
        raise DataError(f"option 'crop': {crop!r} must be 'center' or 'none'")
    if crop == "center":
        arr = center_square(arr)
    return resize(arr, size, nearest=nearest)


def sparse_depth_resize(depth: np.ndarray, size: int) -> np.ndarray:
    """Resize sparse depth by nearest neighbour on valid points only: no invented depth, no averaging with 0."""
    h, w = depth.shape
    out = np.zeros((size, size), np.float32)
    ys, xs = np.nonzero(depth > 0)
    if len(ys):
        ty = np.minimum((ys * size) // h, size - 1)
        tx = np.minimum((xs * size) // w, size - 1)
        out[ty, tx] = depth[ys, xs]
    return out


def sha_file(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(root: Path, checksums: dict[str, str], extra_file: Path | None = None) -> list[str]:
    """Check the dataset's published checksums (and a user's SHA256SUMS/MD5SUMS file); DataError naming the file.

    Returns the files that were verified. Files a checksum list names but the user did not download are
    skipped (partial downloads are allowed, e.g. only one MPI3D variant).
    """
    table = dict(checksums)
    for name, algo in (("SHA256SUMS", "sha256"), ("MD5SUMS", "md5")):
        f = extra_file if extra_file is not None and extra_file.name == name else root / name
        if f.is_file():
            for n, line in enumerate(f.read_text().splitlines(), 1):
                parts = line.split()
                if len(parts) != 2:
                    if line.strip():
                        raise DataError(f"{f}: line {n}: expected '<checksum>  <file>'")
                    continue
                table.setdefault(parts[1].lstrip("*"), f"{algo}:{parts[0].lower()}")  # published values win
    done = []
    for rel, want in sorted(table.items()):
        p = root / rel
        if not p.is_file():
            continue
        algo, _, hexd = want.partition(":")
        got = sha_file(p, algo)
        if got != hexd:
            raise DataError(f"{p}: {algo} {got} does not match the published {hexd}; re-download the file")
        done.append(rel)
    return done


def files(root: Path, pattern: str) -> list[Path]:
    """Sorted files matching a glob, hidden files skipped."""
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))


def equalize(grey: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a uint8 grey image (paper 1 A.1.5, Pillow's ImageOps.equalize)."""
    from PIL import Image, ImageOps

    return np.asarray(ImageOps.equalize(Image.fromarray(grey)))


def to_uint8_grey(arr: np.ndarray, path: Path) -> np.ndarray:
    """Grey uint8 from a grey/RGB/16-bit frame (16-bit IR amplitude images are min-max scaled)."""
    if arr.ndim == 3:
        arr = (arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round()
        out: np.ndarray = np.clip(arr, 0, 255).astype(np.uint8)
        return out
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in (np.uint16, np.int32, np.float32):
        a = arr.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255).round().astype(np.uint8)
    raise DataError(f"{path}: unsupported image dtype {arr.dtype}")
