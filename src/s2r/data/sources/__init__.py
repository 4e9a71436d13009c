"""Adapters for the published datasets of the five papers, and `s2r data add`'s logic.

Each adapter turns a dataset's published on-disk layout (downloaded by the user; s2r never downloads)
into an s2r benchmark (``benchmark.yaml`` + ``manifest.parquet`` + PNGs, written atomically by
:func:`s2r.data.benchmark.write_benchmark`) that ``s2r data validate`` and ``s2r data prepare`` consume.
Nothing here is imported by ``s2r`` at start-up and nothing touches the network.

| source | module | papers |
|---|---|---|
| mpi3d | mpi3d | 1, 3 |
| sviro, sviro_illumination, ticam | interior | 1 |
| kitti, vkitti2 | driving | 2 |
| ycb_video, bop | objects | 5 |
| cifar_da | misc | 4 |
| trifinger | misc | 3 |
| (anything else) | generic: a dataset declaration ``dataset.yaml`` in the user's folder | yours |
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2r.data.benchmark import DataError
from s2r.data.sources import driving, interior, misc, mpi3d, objects
from s2r.data.sources.common import SourceInfo, verify_checksums


@dataclass
class Source:
    """A published dataset: its description, its adapter and a writer of a tiny copy in its exact layout."""

    info: SourceInfo
    build: Callable[[Path, Path, str, dict[str, Any]], Path]
    fixture: Callable[[Path], Path]


SOURCES: dict[str, Source] = {
    "mpi3d": Source(mpi3d.INFO, mpi3d.build, mpi3d.fixture),
    "sviro": Source(interior.SVIRO_INFO, interior.build_sviro, interior.sviro_fixture),
    "sviro_illumination": Source(
        interior.ILLUMINATION_INFO,
        lambda s, o, n, opt: interior.build_sviro(s, o, n, opt, illumination=True),
        lambda r: interior.sviro_fixture(r, vehicles=("kodiaq", "cayenne"), illumination=True),
    ),
    "ticam": Source(interior.TICAM_INFO, interior.build_ticam, interior.ticam_fixture),
    "kitti": Source(driving.KITTI_INFO, driving.build_kitti, driving.kitti_fixture),
    "vkitti2": Source(driving.VKITTI_INFO, driving.build_vkitti2, driving.vkitti2_fixture),
    "ycb_video": Source(objects.YCB_INFO, objects.build_ycb, objects.ycb_fixture),
    "bop": Source(objects.BOP_INFO, objects.build_bop, lambda r: objects.bop_fixture(r, test_split=True)),
    "cifar_da": Source(misc.CIFAR_DA_INFO, misc.build_cifar_da, misc.cifar_da_fixture),
    "trifinger": Source(misc.TRIFINGER_INFO, misc.build_trifinger, misc.trifinger_fixture),
}


def get(kind: str) -> Source:
    """The adapter called `kind`, or an error listing the known ones."""
    if kind not in SOURCES:
        raise DataError(f"unknown dataset {kind!r}; known: {sorted(SOURCES)} (or a folder with a dataset "
                        "declaration dataset.yaml: docs/datasets/generic.md)")
    return SOURCES[kind]


def describe(kind: str) -> str:
    """Where to get a dataset and the layout s2r expects (printed by `s2r data add` and `s2r data sources`)."""
    info = get(kind).info
    opts = "\n".join(f"    {k}: {v}" for k, v in info.options.items())
    return (f"{kind}: {info.title}\n  get it from: {info.url}\n  expected layout:\n"
            + "\n".join(f"    {line}" for line in info.layout.strip().splitlines())
            + f"\n  options (-o KEY=VALUE):\n{opts}\n  docs: docs/datasets/{info.doc}.md")


def add(name: str, src: Path, out: Path, *, kind: str | None = None, options: dict[str, Any] | None = None,
        dvc: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build benchmark `name` at `out` from the user's download at `src`; optionally track both with DVC.

    `kind` picks the adapter (default: `name` when it is a known dataset, else the generic declaration).
    Published checksums (and a SHA256SUMS / MD5SUMS file in `src`) are verified before anything is built.
    """
    from s2r.data.sources import generic

    src, out = Path(src), Path(out)
    options = dict(options or {})
    kind = kind or (name if name in SOURCES else None)
    if not src.exists():
        hint = f"\n{describe(kind)}" if kind else ""
        raise DataError(f"{src}: not found; s2r does not download datasets: download it there first{hint}")
    _check_apart(src, out)
    if kind is None:
        generic.build(src, out, name, options)
        verified: list[str] = []
    else:
        source = get(kind)
        verified = verify_checksums(src, source.info.checksums)
        source.build(src, out, name, options)
    tracked = track_with_dvc([src, out], log) if dvc else []
    return {"benchmark": str(out), "kind": kind or "generic", "verified": verified, "dvc": tracked}


def _check_apart(src: Path, out: Path) -> None:
    s, o = Path(os.path.abspath(src)), Path(os.path.abspath(out))
    if s == o or str(o).startswith(str(s) + os.sep) or str(s).startswith(str(o) + os.sep):
        raise DataError(f"{out}: the benchmark folder must not be (inside) the download {src} or contain it")


def dvc_root(start: Path) -> Path | None:
    """The DVC project holding `start` (a folder with .dvc/), if any."""
    p = Path(os.path.abspath(start))
    for d in (p, *p.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


def track_with_dvc(paths: list[Path], log: Callable[[str], None] = print) -> list[str]:
    """`dvc add` each path that lies inside the current DVC project (the download and the built benchmark)."""
    root = dvc_root(Path.cwd())
    if root is None:
        log("not inside a DVC project: the benchmark is written but not tracked (run `dvc init` first)")
        return []
    exe = shutil.which("dvc")
    if exe is None:
        raise DataError("dvc is not on PATH; install s2r's environment or pass --no-dvc")
    done = []
    for p in paths:
        a = Path(os.path.abspath(p))
        if root not in a.parents:
            log(f"{p}: outside the DVC project {root}; move it under {root / 'data'} to version it with DVC")
            continue
        r = subprocess.run([exe, "add", "-q", str(a.relative_to(root))], cwd=root, capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"dvc add {p} failed: {(r.stderr or r.stdout).strip()}")
        done.append(str(a.relative_to(root)))
    return done


def write_fixture(kind: str, root: Path) -> Path:
    """A tiny copy of dataset `kind` in its published layout (tests, recipe stand-ins, layout examples)."""
    return get(kind).fixture(Path(root))
