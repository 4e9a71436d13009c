"""MPI3D (Gondal et al., NeurIPS 2019): toy / realistic / real `.npz` arrays on one factor grid -> a factors benchmark.

Published layout (https://github.com/rr-learning/disentanglement_dataset): one file per variant,
``mpi3d_toy.npz``, ``mpi3d_realistic.npz``, ``mpi3d_real.npz``, each with one array ``images`` of shape
(1036800, 64, 64, 3) uint8. Image ``i`` shows the factor combination at flat index ``i`` of the grid
below in C (row-major) order, the first factor varying slowest::

    object_color 6 (white, green, red, blue, brown, olive)   object_shape 6 (cone, cube, cylinder,
    hexagonal, pyramid, sphere)   object_size 2 (small, large)   camera_height 3 (top, center, bottom)
    background_color 3 (purple, sea_green, salmon)   horizontal_axis 40   vertical_axis 40

The same flat index is the same scene in every variant, so it is the sample's ``scene_id`` (paired
sampling across domains). MPI3D publishes no splits: a scene's split is a hash of its index (one scene is
in the same split in every domain). Paper 1 (A.1.1) keeps only large objects: option ``large_only``.
The arrays are read through a memory map when the `.npz` member is stored uncompressed (as published), so
the 12 GB files are never loaded whole.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from s2r.data.benchmark import BenchmarkSpec, DataError, DomainSpec, Sample, write_benchmark
from s2r.data.sources.common import (
    DEFAULT_FRACTIONS,
    SourceInfo,
    assign_splits,
    check_fractions,
    check_options,
    layout_error,
    option,
    resize,
)

FACTORS: dict[str, int] = {
    "object_color": 6, "object_shape": 6, "object_size": 2, "camera_height": 3,
    "background_color": 3, "horizontal_axis": 40, "vertical_axis": 40,
}
VARIANTS = ("toy", "realistic", "real")
KEY = "images"

INFO = SourceInfo(
    name="mpi3d",
    title="MPI3D (toy / realistic / real)",
    url="https://github.com/rr-learning/disentanglement_dataset (mpi3d_toy.npz, mpi3d_realistic.npz, mpi3d_real.npz)",
    layout="""mpi3d_toy.npz        array 'images' (1036800, 64, 64, 3) uint8, factor grid in index order
mpi3d_realistic.npz  same grid
mpi3d_real.npz       same grid (any subset of the three files; at least two for sim2real)""",
    papers=["extractor-autoencoder-pirl-triplet", "disentanglement-transfer-ood"],
    doc="mpi3d",
    options={
        "large_only": "keep only object_size = large (paper 1, A.1.1) [false]",
        "source": "source domain [realistic, else toy]", "target": "target domain [real]",
        "fractions": "train/val/test fractions of scenes [0.8/0.1/0.1]", "seed": "split hash seed [0]",
        "max_scenes": "keep a deterministic subset of this many scenes (whole grid: 1,036,800) [all]",
        "image_size": "resize from 64 [64]", "factor_sizes": "override the grid (other MPI3D releases) [published]",
    },
)


def open_images(path: Path, key: str = KEY) -> np.ndarray:
    """`images` of an MPI3D `.npz`: memory-mapped when stored uncompressed, else loaded; errors name the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable .npz (zip) file: {e}") from e
    with zf:
        names = zf.namelist()
        member = f"{key}.npy"
        if member not in names:
            raise DataError(f"{path}: no array {key!r} (arrays: {[n[:-4] for n in names]})")
        zi = zf.getinfo(member)
        if zi.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(zi.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise DataError(f"{path}: corrupt zip header for {member}")
                n_name, n_extra = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
                f.seek(zi.header_offset + 30 + n_name + n_extra)
                try:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read(f)
                except ValueError as e:
                    raise DataError(f"{path}: {member} is not a valid .npy array: {e}") from e
                offset = f.tell()
            if fortran:
                raise DataError(f"{path}: {member} is Fortran-ordered; expected C order")
            need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
            if path.stat().st_size < need:
                raise DataError(f"{path}: truncated ({path.stat().st_size} bytes, {member} needs {need})")
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
        try:
            array: np.ndarray = np.load(path)[key]
            return array
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path}: cannot read array {key!r}: {e}") from e


def factor_values(index: np.ndarray, sizes: dict[str, int]) -> np.ndarray:
    """Flat grid indices -> (N, F) factor value indices (C order: the first factor varies slowest)."""
    return np.stack(np.unravel_index(index, tuple(sizes.values())), axis=1)


def build(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """Write the MPI3D benchmark: one domain per variant file found, factors from the grid position."""
    check_options(options, INFO.options, "mpi3d")
    sizes = dict(option(options, "factor_sizes", FACTORS, dict))
    n_grid = int(np.prod(list(sizes.values())))
    found = {v: src / f"mpi3d_{v}.npz" for v in VARIANTS if (src / f"mpi3d_{v}.npz").exists()}
    if len(found) < 2:
        raise layout_error(INFO, src, f"found {sorted(found) or 'no'} MPI3D file(s); need at least two variants")
    arrays = {}
    for v, p in found.items():
        a = open_images(p)
        if a.ndim != 4 or a.shape[0] != n_grid or a.shape[3] != 3 or a.dtype != np.uint8:
            raise DataError(f"{p}: array 'images' is {a.shape} {a.dtype}; expected ({n_grid}, H, W, 3) uint8 "
                            f"(the factor grid {sizes})")
        arrays[v] = a
    size = int(option(options, "image_size", int(next(iter(arrays.values())).shape[1]), int))
    source = option(options, "source", "realistic" if "realistic" in found else "toy", str)
    target = option(options, "target", "real" if "real" in found else sorted(set(found) - {source})[0], str)
    for k, v in (("source", source), ("target", target)):
        if v not in found:
            raise DataError(f"option {k!r}: domain {v!r} has no file mpi3d_{v}.npz in {src}")
    fractions = check_fractions(option(options, "fractions", DEFAULT_FRACTIONS, dict))
    seed = int(option(options, "seed", 0, int))
    index = np.arange(n_grid)
    if option(options, "large_only", False, bool):
        index = index[factor_values(index, sizes)[:, list(sizes).index("object_size")] == 1]
    max_scenes = option(options, "max_scenes", None, int)
    if max_scenes is not None and max_scenes < len(index):
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(index, size=max_scenes, replace=False))
    factors = factor_values(index, sizes)
    by_key = assign_splits([f"mpi3d:{i}" for i in index], fractions, seed)
    splits = [by_key[f"mpi3d:{i}"] for i in index]
    spec = BenchmarkSpec(
        name=name, tasks=["factors"], source=source, target=target, image_size=size, channels=3,
        domains=[DomainSpec(v, "source" if v == source else "target" if v == target else "auxiliary",
                            f"MPI3D {v} ({found[v].name})", labelled=True) for v in found],
        factors=sizes, dataset="mpi3d",
        description=f"MPI3D {sorted(found)} from {src}" + (", large objects only" if options.get("large_only") else ""),
        expectations={"domain_rows": {v: len(index) for v in found}},
    )

    def samples() -> Iterator[Sample]:
        for v, a in arrays.items():
            for j, i in enumerate(index):
                img = np.asarray(a[i])
                yield Sample(id=f"{v}-{i:07d}", domain=v, split=splits[j], image=resize(img, size),
                             factors={k: int(x) for k, x in zip(sizes, factors[j])}, scene_id=int(i),
                             variation=VARIANTS.index(v))

    return write_benchmark(out, spec, samples())


def fixture(root: Path, sizes: dict[str, int] | None = None, variants: tuple[str, ...] = VARIANTS) -> Path:
    """A tiny MPI3D in the published layout (same names and key, a reduced grid) for tests and stand-ins."""
    sizes = sizes or {"object_color": 2, "object_shape": 2, "object_size": 2, "camera_height": 1,
                      "background_color": 1, "horizontal_axis": 2, "vertical_axis": 2}
    root.mkdir(parents=True, exist_ok=True)
    n = int(np.prod(list(sizes.values())))
    f = factor_values(np.arange(n), sizes)
    for k, v in enumerate(variants):
        img = np.zeros((n, 8, 8, 3), np.uint8)
        img[..., 0] = (f[:, 0] * 60 + 20 * k)[:, None, None]  # colour channel encodes object_color
        img[..., 1] = (f[:, 2] * 100 + 10)[:, None, None]  # green encodes the size
        img[:, 0, 0, 2] = np.arange(n) % 256  # every scene distinct (no checksum shared across splits)
        img[:, 0, 1, 2] = np.arange(n) // 256
        np.savez(root / f"mpi3d_{v}.npz", images=img)
    return root
