"""Sources for data users bring: an image-folder tree or a manifest CSV/Parquet -> a benchmark directory.

Adapters point at the user's files in place (absolute, symlink-resolved paths in the manifest, nothing copied),
read width, height, channels, bit depth and sha256 from the files themselves, and write ``benchmark.yaml`` +
``manifest.parquet`` atomically (built in a temp dir beside ``out``, swapped in with
:func:`s2r.data.benchmark.staged_dir`), so a failed run never corrupts an existing ``out``. Bad input raises
:class:`DataError` naming the file, the manifest row's id or the key (docs/datasets/generic.md lists every check):

- the sample count never changes silently: a broken symlink, a directory named like an image, a file with an
  unknown extension in a class folder or an unreadable image is an error, unless the user passes
  ``skip_bad_files`` (``--skip-bad-files``), which drops them with a warning that lists them;
- every path is resolved (symlinks followed) and must lie inside the dataset root (the image folder, the
  manifest's ``--root``/folder, the declaration's folder) unless ``allow_outside_root`` is given; the benchmark
  records that, and ``s2r data validate`` lists the files outside;
- images with more than 8 bits per channel are refused unless the declaration sets ``convert_16bit: true``;
- labels outside the declared classes, factor values outside the declared set or range, depth and mask files
  that are missing, undecodable or of another size than their image are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from s2r.config import SPLITS, Schema
from s2r.data.benchmark import (
    DEPTH_SCALE,
    FACTOR_BINS,
    MANIFEST_COLUMNS,
    NO_LABEL,
    BenchmarkSpec,
    DataError,
    DomainSpec,
    staged_dir,
)
from s2r.data.validation import ImageInfo, inspect_images, read_aux

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_LISTED = 5  # offending files/rows named in one error message
JUNK_FILES = ("thumbs.db", "desktop.ini")  # operating-system litter in image folders, skipped like dot-files


class IngestWarning(UserWarning):
    """Something the user accepted explicitly (files skipped or outside the root); the CLI prints it."""


@dataclasses.dataclass
class Declared(Schema):
    """What the user declares about their data (CLI flags, ``--declaration`` file, dataset.yaml)."""

    classes: list[str] | None = None  # label order; labels outside it are refused
    factors: dict[str, int] | None = None  # discrete: number of values; continuous: number of bins
    factor_ranges: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # continuous: [low, high]
    channels: int | None = None
    image_size: int | None = None
    depth_scale: float = DEPTH_SCALE  # depth file value per metre
    depth_invalid: float = 0.0  # depth file value meaning "no measurement" (.nan allowed)
    mask_classes: list[str] | None = None  # mask id i = mask_classes[i]
    mask_ignore: int = 255
    convert_16bit: bool = False


DATA_KEYS = tuple(f.name for f in dataclasses.fields(Declared))  # a `--declaration` file (also allowed in dataset.yaml)
DATASET_FILE = "dataset.yaml"  # the dataset declaration of `s2r data add NAME --from FOLDER` (s2r.data.sources.generic)
DATASET_ONLY_KEYS = ("task", "source", "target", "domains", "class_map")  # what only a dataset.yaml holds
BENCHMARK_KEYS = ("tasks", "has_depth", "has_mask", "resize")  # what only a benchmark.yaml written by s2r holds


def wrong_file(raw: dict[str, Any], path: Path | str, expected: str) -> str | None:
    """Why `raw` is one of s2r's other two YAML formats (None when it is not), saying which command reads which file.

    The three: a benchmark's own description `benchmark.yaml` (written by s2r, read by `s2r data prepare`); a
    dataset declaration `dataset.yaml` next to the user's files (`s2r data add NAME --from FOLDER`); a
    `--declaration` file of data keys only (`s2r data import-folder / import-manifest`)."""
    found = {"benchmark": sorted(set(raw) & set(BENCHMARK_KEYS)),
             "dataset": sorted(set(raw) & set(DATASET_ONLY_KEYS))}
    what = {"benchmark": "a benchmark description written by s2r (benchmark.yaml; `s2r data prepare` reads it)",
            "dataset": f"a dataset declaration ({DATASET_FILE} next to the files; `s2r data add NAME --from FOLDER`)",
            "declaration": "a `--declaration` file of `s2r data import-folder / import-manifest`"}
    for kind in ("benchmark", "dataset"):
        if kind != expected and found[kind]:
            return (f"{path}: keys {found[kind]} make this {what[kind]}, not {what[expected]}; "
                    f"{_takes(expected)}")
    return None


def _takes(expected: str) -> str:
    if expected == "declaration":
        return f"--declaration takes only the data keys {list(DATA_KEYS)}"
    return f"a {DATASET_FILE} needs task, source, target and domains (docs/datasets/generic.md)"


def declared_from_dict(raw: dict[str, Any], where: str) -> Declared:
    """Typed :class:`Declared` from YAML keys; unknown or mistyped keys name the key and the file."""
    from s2r.config import ConfigError, from_dict

    bad = sorted(set(raw) - set(DATA_KEYS))
    if bad:
        raise DataError(f"{where}: unknown key {bad[0]!r} (allowed: {list(DATA_KEYS)})")
    raw = dict(raw)
    if raw.get("classes") is not None:
        raw["classes"] = [str(c) for c in raw["classes"]]
    try:
        return from_dict(Declared, raw, where)
    except ConfigError as e:
        raise DataError(str(e)) from e


def load_declared(path: Path) -> Declared:
    """A ``--declaration`` YAML for import-folder / import-manifest (keys: :data:`DATA_KEYS`); a dataset.yaml or a
    benchmark.yaml passed instead is an error saying which command takes it."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise DataError(f"{path}: cannot read declaration: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a declaration must be a mapping of keys {list(DATA_KEYS)}")
    other = wrong_file(raw, path, "declaration")
    if other:
        raise DataError(other)
    return declared_from_dict(raw, str(path))


@dataclasses.dataclass
class _Record:
    """One sample found in the user's data, before its file is inspected."""

    id: str
    domain: str
    split: str
    file: Path
    where: str  # how to name it in errors: "file ..." or "manifest.csv id 'x' (line 5)"
    label: int = NO_LABEL
    factors: dict[str, float] = dataclasses.field(default_factory=dict)  # int values; float when continuous
    extra: dict[str, int] = dataclasses.field(default_factory=dict)  # scene_id / variation when given
    depth: Path | None = None
    mask: Path | None = None


def _merge_declared(declared: Declared | None, **given: Any) -> Declared:
    """Keyword arguments given explicitly (not None) override the declaration."""
    d = copy.deepcopy(declared) if declared is not None else Declared()  # never mutate the caller's
    for k, v in given.items():
        if v is not None:
            setattr(d, k, list(v) if k == "classes" else v)
    return d


def from_image_folder(
    src: Path,
    out: Path,
    *,
    name: str,
    source: str,
    target: str,
    channels: int | None = None,
    image_size: int | None = None,
    unlabelled: Sequence[str] = (),
    classes: Sequence[str] | None = None,
    declared: Declared | None = None,
    allow_outside_root: bool = False,
    skip_bad_files: bool = False,
) -> Path:
    """Turn ``src/<domain>/<split>/<class>/*.png|jpg|jpeg|bmp`` into a classification benchmark at `out`."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: image folder not found")
    decl = _merge_declared(declared, classes=classes, channels=channels, image_size=image_size)
    _check_out_apart(Path(out), [src])
    domains = _subdirs(src)
    _reject_stray_images(src, "<domain>/<split>/<class>/")
    if not domains:
        raise DataError(f"{src}: empty folder: expected <domain>/<split>/<class>/ sub-folders with images")
    found: list[tuple[str, str, str, Path]] = []  # (domain, split, class, file)
    bad: list[tuple[Path, str]] = []  # entries that would silently change the sample count
    for ddir in domains:
        for split, cdir in _class_folders(ddir, decl.classes):
            files = _class_files(cdir, bad)
            found += [(ddir.name, split, cdir.name, f) for f in files]
    _bad_entries(bad, skip_bad_files)
    classes_ = list(decl.classes) if decl.classes is not None else sorted({c for _, _, c, _ in found})
    index = {c: i for i, c in enumerate(classes_)}
    counters: Counter[tuple[str, str]] = Counter()
    records = []
    for d, s, c, f in found:
        rid = f"{d}-{s}-{counters[(d, s)]}"
        counters[(d, s)] += 1
        records.append(_Record(rid, d, s, Path(os.path.abspath(f)), f"file {f}", label=index[c]))
    decl.classes, decl.factors = classes_, {}
    return _finish(records, Path(out), name=name, source=source, target=target, decl=decl, unlabelled=unlabelled,
                   description=f"image folder {src}", data_root=src, allow_outside_root=allow_outside_root,
                   skip_bad_files=skip_bad_files)


def _class_folders(ddir: Path, classes: list[str] | None) -> list[tuple[str, Path]]:
    """(split, class folder) of one domain folder: every split present, no stray split, images or classes."""
    _reject_stray_images(ddir, "<split>/<class>/")
    for sdir in _subdirs(ddir):
        if sdir.name not in SPLITS:
            raise DataError(f"{sdir}: unknown split folder {sdir.name!r}; expected one of {list(SPLITS)}")
    out = []
    for split in SPLITS:
        sdir = ddir / split
        if not sdir.is_dir():
            raise DataError(f"{ddir}: no {split!r} folder; every domain needs {list(SPLITS)}")
        _reject_stray_images(sdir, "<class>/")
        cdirs = _subdirs(sdir)
        if not cdirs:
            raise DataError(f"{sdir}: empty folder: expected one sub-folder per class")
        for cdir in cdirs:
            if classes is not None and cdir.name not in classes:
                raise DataError(f"{cdir}: class folder {cdir.name!r} is not in the declared classes "
                                f"{classes} (add it to the declaration or remove the folder)")
            out.append((split, cdir))
    return out


def _class_files(cdir: Path, bad: list[tuple[Path, str]]) -> list[Path]:
    """The image files of a class folder; entries that are not images go to `bad` (hidden files and OS litter
    are skipped); a folder without either is an error."""
    files = []
    for f in sorted(cdir.iterdir()):
        if f.name.startswith(".") or f.name.lower() in JUNK_FILES:
            continue  # hidden files (.DS_Store, ._x.png) and OS litter are not samples
        problem = _entry_problem(f)
        if problem:
            bad.append((f, problem))
        else:
            files.append(f)
    if not files and not bad:
        raise DataError(f"{cdir}: empty class folder: no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def _entry_problem(f: Path) -> str | None:
    """Why a non-hidden entry of a class folder is not an image sample (None: it is one)."""
    if f.is_symlink() and not f.exists():
        return f"broken symlink (points to {os.readlink(f)})"
    if f.is_dir():
        return ("a directory named like an image" if f.suffix.lower() in IMAGE_SUFFIXES
                else "a sub-folder inside a class folder")
    if not f.is_file():
        return "not a regular file"
    if f.suffix.lower() not in IMAGE_SUFFIXES:
        return f"extension {f.suffix or '(none)'!r} is not one of {list(IMAGE_SUFFIXES)}"
    return None


def _bad_entries(bad: list[tuple[Path, str]], skip: bool) -> None:
    """Refuse entries that would be dropped, or (skip_bad_files) drop them with a warning listing them."""
    if not bad:
        return
    listed = "; ".join(f"{f}: {why}" for f, why in bad[:MAX_LISTED])
    more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    if not skip:
        raise DataError(f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} would be dropped, changing the sample "
                        f"count: {listed}{more}; fix or remove them, or pass --skip-bad-files to drop them")
    warnings.warn(f"skipped {len(bad)} bad file(s) (--skip-bad-files): {listed}{more}", IngestWarning, stacklevel=3)


def from_manifest(
    manifest: Path,
    out: Path,
    *,
    name: str,
    source: str,
    target: str,
    root: Path | None = None,
    classes: Sequence[str] | None = None,
    factors: dict[str, int] | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    unlabelled: Sequence[str] = (),
    declared: Declared | None = None,
    allow_outside_root: bool = False,
    skip_bad_files: bool = False,
) -> Path:
    """Turn a user CSV/Parquet (path, domain, split [, id, label, factor_*, depth_path, mask_path]) into a
    benchmark at `out`; relative paths are relative to `root` (default: the manifest's folder)."""
    manifest = Path(manifest)
    decl = _merge_declared(declared, classes=classes, factors=factors, channels=channels, image_size=image_size)
    df = _read_table(manifest)
    root = Path(root) if root is not None else manifest.parent
    where = _row_names(manifest, df)
    _check_cells(manifest, df, where)
    ids = _ids(df, where)
    labels, class_names = _labels(df, decl.classes, where, manifest)
    fac_cols = [c for c in df.columns if str(c).startswith("factor_")]
    fac_values, fac_sizes = _factors(df, fac_cols, decl, where, manifest)
    extras = {c: _int_column(df, c, where) for c in ("scene_id", "variation") if c in df.columns}
    aux = {c: [_path_cell(df, c, i, root) for i in range(len(df))] if c in df.columns else [None] * len(df)
           for c in ("depth_path", "mask_path")}
    if labels is None and not fac_cols and "depth_path" not in df.columns and "mask_path" not in df.columns:
        raise DataError(f"{manifest}: needs a 'label' column, factor_<name> columns, depth_path or mask_path "
                        "(the task)")
    if labels is None and decl.classes:
        raise DataError(f"{manifest}: key 'classes' is given but the manifest has no 'label' column")
    records = []
    for i in range(len(df)):
        file = _path_cell(df, "path", i, root)
        assert file is not None  # _check_cells: no empty path
        records.append(_Record(
            id=ids[i], domain=str(df["domain"].iat[i]), split=str(df["split"].iat[i]), file=file,
            where=f"{where(i)} (file {file})", label=labels[i] if labels is not None else NO_LABEL,
            factors={k: v[i] for k, v in fac_values.items()},
            extra={c: v[i] for c, v in extras.items() if v[i] is not None},
            depth=aux["depth_path"][i], mask=aux["mask_path"][i]))
    _check_out_apart(Path(out), [manifest, *(r.file for r in records)])
    decl.classes, decl.factors = class_names, fac_sizes
    return _finish(records, Path(out), name=name, source=source, target=target, decl=decl, unlabelled=unlabelled,
                   description=f"manifest {manifest}", data_root=root, allow_outside_root=allow_outside_root,
                   skip_bad_files=skip_bad_files)


def _row_names(manifest: Path, df: Any) -> Callable[[int], str]:
    """How errors name manifest row i: its id and CSV line (header = line 1) or Parquet row."""
    csv = manifest.suffix.lower() == ".csv"

    def where(i: int) -> str:
        v = df["id"].iat[i] if "id" in df.columns else None
        pos = f"line {i + 2}" if csv else f"row {i}"
        if v is None or _missing(v) or not str(v).strip():
            return f"{manifest} {pos}"
        return f"{manifest} id {str(v)!r} ({pos})"

    return where


def _check_cells(manifest: Path, df: Any, where: Callable[[int], str]) -> None:
    """Rows exist; path, domain and split are present and non-empty; every split is a known one."""
    for col in ("path", "domain", "split"):
        if col not in df.columns:
            raise DataError(f"{manifest}: missing column {col!r} (columns: {list(df.columns)})")
    if len(df) == 0:
        raise DataError(f"{manifest}: the manifest has no rows")
    for col in ("path", "domain", "split"):
        bad = [i for i, v in enumerate(df[col]) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise DataError(f"{where(bad[0])}: column {col!r} is empty ({len(bad)} rows in all)")
    for i, s in enumerate(df["split"]):
        if s not in SPLITS:
            raise DataError(f"{where(i)}: unknown split {s!r}; expected one of {list(SPLITS)}")


def _path_cell(df: Any, col: str, i: int, root: Path) -> Path | None:
    """A manifest path cell -> an absolute (not yet symlink-resolved) path; None for an empty cell."""
    v = df[col].iat[i]
    if _missing(v) or not str(v).strip():
        return None
    rel = Path(str(v)).expanduser()
    return Path(os.path.abspath(rel if rel.is_absolute() else Path(root) / rel))


# ----------------------------------------------------------------------------------------------------------
# shared: inspect files, check consistency, build spec + manifest, write atomically


def _finish(
    records: list[_Record],
    out: Path,
    *,
    name: str,
    source: str,
    target: str,
    decl: Declared,
    unlabelled: Sequence[str],
    description: str,
    data_root: Path,
    allow_outside_root: bool = False,
    skip_bad_files: bool = False,
) -> Path:
    """Inspect every file, check the set is consistent, then write spec + manifest atomically to `out`."""
    unlabelled = [unlabelled] if isinstance(unlabelled, str) else list(unlabelled)
    domains = _check_roles(records, name, source, target, unlabelled)
    records = _check_paths(records, Path(data_root), allow_outside_root, skip_bad_files)
    infos = inspect_images([r.file for r in records])
    records, infos = _unreadable(records, infos, skip_bad_files)
    _check_bits(records, infos, decl.convert_16bit)
    channels = _check_channels(records, infos, decl.channels)
    image_size, resize = _check_size(records, infos, decl.image_size)
    labelled = {d: d not in unlabelled for d in domains}
    has_depth, has_mask = _check_labels(records, infos, labelled, decl)
    frame = _manifest(records, infos, decl, has_depth, has_mask)
    if resize:
        description += f"; images of other sizes are resized to {image_size}x{image_size} by prepare"
    spec = _spec(decl, name=name, domains=domains, source=source, target=target, labelled=labelled,
                 image_size=image_size, resize=resize, channels=channels, has_depth=has_depth, has_mask=has_mask,
                 description=description, data_root=data_root, allow_outside_root=allow_outside_root)
    return _write_atomically(out, spec, frame)


def _check_roles(records: list[_Record], name: str, source: str, target: str, unlabelled: list[str]) -> list[str]:
    """A name, and source / target / unlabelled domains that exist in the data; the domains, sorted."""
    if not name or not isinstance(name, str):
        raise DataError(f"key 'name': a benchmark needs a non-empty name, got {name!r}")
    domains = sorted({r.domain for r in records})
    for key, value in (("source", source), ("target", target)):
        if value not in domains:
            raise DataError(f"key {key!r}: domain {value!r} not found in the data; domains are {domains}")
    if source == target:
        raise DataError(f"keys 'source'/'target': both are {source!r}; they must be different domains")
    for u in unlabelled:
        if u not in domains:
            raise DataError(f"key 'unlabelled': domain {u!r} not found in the data; domains are {domains}")
    return domains


def _check_labels(records: list[_Record], infos: list[ImageInfo], labelled: dict[str, bool], decl: Declared
                  ) -> tuple[bool, bool]:
    """Labelled domains carry every declared label, factor, depth and mask; (has depth, has masks)."""
    if decl.classes:
        _require_labels(records, labelled, "label", lambda r: r.label)
    for k in decl.factors or {}:
        if k in decl.factor_ranges:  # continuous: None = empty cell (-1.0 is a valid value)
            _require_labels(records, labelled, f"factor_{k}",
                            lambda r, k=k: NO_LABEL if r.factors.get(k) is None else 0)
        else:
            _require_labels(records, labelled, f"factor_{k}", lambda r, k=k: r.factors.get(k, NO_LABEL))
    has_depth, has_mask = any(r.depth for r in records), any(r.mask for r in records)
    if has_depth:
        _require_labels(records, labelled, "depth_path", lambda r: r.depth or NO_LABEL)
        _check_aux(records, infos, "depth")
    if has_mask:
        _require_labels(records, labelled, "mask_path", lambda r: r.mask or NO_LABEL)
        _check_aux(records, infos, "mask")
    if has_mask and not decl.mask_classes:
        raise DataError("key 'mask_classes': masks are given (mask_path) but no mask class names are declared; "
                        "list them in the declaration (mask id i = mask_classes[i])")
    return has_depth, has_mask


def _manifest(records: list[_Record], infos: list[ImageInfo], decl: Declared, has_depth: bool, has_mask: bool
              ) -> Any:
    """The manifest DataFrame: one row per sample, the MANIFEST_COLUMNS first, integer columns typed."""
    import pandas as pd

    factors = dict(decl.factors or {})
    rows = [_manifest_row(r, info, decl, has_depth, has_mask) for r, info in zip(records, infos)]
    frame = pd.DataFrame(rows)
    frame = frame[[*MANIFEST_COLUMNS, *(c for c in frame.columns if c not in MANIFEST_COLUMNS)]]
    discrete = [f"factor_{k}" for k in factors if k not in decl.factor_ranges]
    for c in ("width", "height", "channels", "label", *discrete):
        if c in frame.columns:
            frame[c] = frame[c].astype("int64")
    for c in ("scene_id", "variation"):
        if c in frame.columns:
            frame[c] = frame[c].astype("Int64")
    return frame


def _manifest_row(r: _Record, info: ImageInfo, decl: Declared, has_depth: bool, has_mask: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"id": r.id, "domain": r.domain, "split": r.split, "path": str(r.file),
                           "width": info.width, "height": info.height, "channels": info.channels,
                           "sha256": info.sha256}
    if decl.classes:
        row["label"] = int(r.label)
    for k in decl.factors or {}:
        if k in decl.factor_ranges:
            v = r.factors.get(k)
            row[f"factor_{k}"] = float("nan") if v is None else float(v)
        else:
            row[f"factor_{k}"] = int(r.factors.get(k, NO_LABEL))
    if has_depth:
        row["depth_path"] = str(r.depth) if r.depth else None
    if has_mask:
        row["mask_path"] = str(r.mask) if r.mask else None
    row.update(r.extra)
    return row


def _spec(decl: Declared, *, name: str, domains: list[str], source: str, target: str, labelled: dict[str, bool],
          image_size: int, resize: bool, channels: int, has_depth: bool, has_mask: bool, description: str,
          data_root: Path, allow_outside_root: bool) -> BenchmarkSpec:
    """The benchmark.yaml of the imported data (validated: a bad declaration is a DataError naming the key)."""
    from s2r.config import ConfigError

    classes, factors = list(decl.classes or []), dict(decl.factors or {})
    tasks = ((["classification"] if classes else []) + (["factors"] if factors else [])
             + (["depth"] if has_depth else []) + (["segmentation"] if has_mask else []))
    roles = {source: "source", target: "target"}
    spec = BenchmarkSpec(
        name=name, tasks=tasks,
        domains=[DomainSpec(name=d, role=roles.get(d, "auxiliary"), labelled=labelled[d]) for d in domains],
        source=source, target=target, image_size=image_size, channels=channels, classes=classes, factors=factors,
        seg_classes=list(decl.mask_classes or []) if has_mask else [], has_depth=has_depth, has_mask=has_mask,
        description=description, depth_scale=float(decl.depth_scale),
        factor_ranges={k: [float(v) for v in rng] for k, rng in decl.factor_ranges.items() if k in factors},
        depth_invalid=float(decl.depth_invalid), mask_ignore=int(decl.mask_ignore),
        convert_16bit=bool(decl.convert_16bit), data_root=str(Path(data_root).resolve()),
        allow_outside_root=bool(allow_outside_root), resize=resize)
    try:
        spec.validate()
    except ConfigError as e:
        raise DataError(str(e)) from e
    return spec


def _write_atomically(out: Path, spec: BenchmarkSpec, frame: Any) -> Path:
    """Build the benchmark in a temp dir beside `out` and swap it in; on failure `out` is left as it was."""
    with staged_dir(out) as tmp:
        frame.to_parquet(tmp / "manifest.parquet", index=False)
        spec.save(tmp / "benchmark.yaml")
    return out


def _check_paths(records: list[_Record], root: Path, allow_outside: bool, skip_bad: bool) -> list[_Record]:
    """Resolve every path (symlinks followed); refuse missing / broken / directory entries and files outside
    `root` (unless allowed: then warn, listing them). Records keep the resolved paths."""
    base = Path(root).resolve()
    bad: list[tuple[_Record, str]] = []
    outside: list[str] = []
    keep = []
    for r in records:
        problem = None
        for kind in ("file", "depth", "mask"):
            p: Path | None = getattr(r, kind)
            if p is None:
                continue
            label = {"file": "image", "depth": "depth_path", "mask": "mask_path"}[kind]
            if p.is_symlink() and not p.exists():
                problem = f"{label} {p} is a broken symlink (points to {os.readlink(p)})"
            elif p.is_dir():
                problem = f"{label} {p} is a directory, not a file"
            elif not p.exists():
                problem = f"{label} {p}: no such file"
            if problem:
                break
            real = p.resolve()
            if not real.is_relative_to(base):
                outside.append(f"{r.where}: {label} resolves to {real}")
            setattr(r, kind, real)
        if problem:
            bad.append((r, problem))
        else:
            keep.append(r)
    if bad:
        listed = "; ".join(f"{r.where.split(' (file ')[0]}: {why}" for r, why in bad[:MAX_LISTED])
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        if not skip_bad:
            raise DataError(f"{len(bad)} sample(s) point at missing or non-regular files, changing the sample count: "
                            f"{listed}{more}; "
                            "fix them, or pass --skip-bad-files to drop them")
        warnings.warn(f"skipped {len(bad)} sample(s) (--skip-bad-files): {listed}{more}", IngestWarning, stacklevel=3)
    if outside:
        listed = "; ".join(outside[:MAX_LISTED]) + (f" (and {len(outside) - MAX_LISTED} more)"
                                                   if len(outside) > MAX_LISTED else "")
        if not allow_outside:
            raise DataError(f"{len(outside)} file(s) lie outside the dataset root {base}: {listed}; move them "
                            "inside, or pass --allow-outside-root to accept them (the validation report lists them)")
        warnings.warn(f"{len(outside)} file(s) outside the dataset root {base} accepted (--allow-outside-root): "
                      f"{listed}", IngestWarning, stacklevel=3)
    if not keep:
        raise DataError("no samples left after dropping the bad files")
    return keep


def _unreadable(records: list[_Record], infos: list[ImageInfo], skip: bool
                ) -> tuple[list[_Record], list[ImageInfo]]:
    bad = [(r, i) for r, i in zip(records, infos) if i.error]
    if not bad:
        return records, infos
    listed = "; ".join(f"{r.where}: {i.error}" for r, i in bad[:MAX_LISTED])
    more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    if not skip:
        raise DataError(f"{len(bad)} unreadable or corrupt image(s): {listed}{more}; fix them, or pass "
                        "--skip-bad-files to drop them")
    warnings.warn(f"skipped {len(bad)} unreadable image(s) (--skip-bad-files): {listed}{more}", IngestWarning,
                  stacklevel=3)
    kept = [(r, i) for r, i in zip(records, infos) if not i.error]
    if not kept:
        raise DataError("no samples left after dropping the unreadable images")
    return [r for r, _ in kept], [i for _, i in kept]


def _check_bits(records: list[_Record], infos: list[ImageInfo], convert_16bit: bool) -> None:
    """8 bits per channel, or 16 when the declaration asks for conversion (prepare keeps the high byte)."""
    bad = [(r, i) for r, i in zip(records, infos) if i.bits > 8 and not (convert_16bit and i.bits == 16)]
    if bad:
        listed = "; ".join(f"{r.where} is {i.bits}-bit (mode {i.mode})" for r, i in bad[:MAX_LISTED])
        raise DataError(f"{len(bad)} image(s) have more than 8 bits per channel: {listed}; convert them to 8-bit, "
                        "or declare convert_16bit: true (16-bit only) to keep the high byte")


def _check_aux(records: list[_Record], infos: list[ImageInfo], kind: str) -> None:
    """Depth / mask files decode and have the size of their image (values are checked by validation, GX)."""
    bad = []
    for r, info in zip(records, infos):
        p = getattr(r, kind)
        if p is None:
            continue
        try:
            arr = read_aux(p, kind)
        except DataError as e:
            bad.append(f"{r.where.split(' (file ')[0]}: {e}")
            continue
        if arr.shape != (info.height, info.width):
            bad.append(f"{r.where.split(' (file ')[0]}: {kind} {p} is {arr.shape[1]}x{arr.shape[0]}, "
                       f"its image is {info.width}x{info.height}")
    if bad:
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{len(bad)} bad {kind} file(s): " + "; ".join(bad[:MAX_LISTED]) + more)


def _check_channels(records: list[_Record], infos: list[ImageInfo], channels: int | None) -> int:
    """All files must share one channel count (the declared one if given): prepare does not convert."""
    counts = Counter(i.channels for i in infos)
    expected = channels if channels is not None else counts.most_common(1)[0][0]
    bad = [(r, i) for r, i in zip(records, infos) if i.channels != expected]
    if bad:
        if channels is not None:
            ref = f"declared channels={channels}"
        else:
            first = next(r for r, i in zip(records, infos) if i.channels == expected)
            ref = f"{counts[expected]} files such as {first.where}"
        listed = "; ".join(f"{r.where} has {i.channels} (mode {i.mode})" for r, i in bad[:MAX_LISTED])
        raise DataError(
            f"inconsistent channel counts: expected {expected} ({ref}), "
            f"but {len(bad)} file(s) differ: {listed}"
        )
    if expected not in (1, 3):
        raise DataError(f"images have {expected} channels (e.g. {records[0].where}, mode {infos[0].mode}); "
                        "s2r trains on grey (1) or RGB (3) images: convert them")
    return expected


def _check_size(records: list[_Record], infos: list[ImageInfo], image_size: int | None) -> tuple[int, bool]:
    """One common square size, unless `image_size` is given: then prepare resizes and we record that."""
    if image_size is not None:
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise DataError(f"key 'image_size': must be a positive integer, got {image_size!r}")
        return image_size, any(i.width != image_size or i.height != image_size for i in infos)
    sizes = Counter((i.width, i.height) for i in infos)
    (w, h), n = sizes.most_common(1)[0]
    bad = [(r, i) for r, i in zip(records, infos) if (i.width, i.height) != (w, h)]
    if bad:
        listed = "; ".join(f"{r.where} is {i.width}x{i.height}" for r, i in bad[:MAX_LISTED])
        raise DataError(
            f"image sizes differ: {n} files are {w}x{h} but {len(bad)} are not: {listed}; "
            "pass image_size to have prepare resize them"
        )
    if w != h:
        raise DataError(
            f"images are {w}x{h}, not square (e.g. {records[0].where}); pass image_size to resize them"
        )
    return w, False


def _require_labels(records: list[_Record], labelled: dict[str, bool], col: str, get: Any) -> None:
    """Labelled domains need a value on every row; a gap is an error to fix, not a guess to make."""
    bad = [r for r in records if labelled[r.domain] and get(r) == NO_LABEL]
    if bad:
        listed = "; ".join(r.where for r in bad[:MAX_LISTED])
        doms = sorted({r.domain for r in bad})
        raise DataError(
            f"{len(bad)} row(s) of labelled domain(s) {doms} have no {col!r}: {listed}; "
            "give the value or list the domain in unlabelled="
        )


def _check_out_apart(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an `out` that is, holds or sits inside an input: replacing it would destroy the user's data."""
    o = Path(os.path.abspath(out))
    prefix = str(o) + os.sep
    for p in inputs:
        a = Path(os.path.abspath(p))
        if a == o or str(a).startswith(prefix):
            raise DataError(
                f"{out}: output folder holds input {p}; writing there would replace the user's files"
            )
        if a.is_dir() and str(o).startswith(str(a) + os.sep):
            raise DataError(f"{out}: output folder is inside input folder {p}; choose a folder outside it")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _reject_stray_images(folder: Path, expected: str) -> None:
    stray = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise DataError(f"{stray[0]}: image outside a class folder; expected {folder}/{expected}<files>")


# ----------------------------------------------------------------------------------------------------------
# manifest columns


TEXT_CSV_COLUMNS = ("id", "path", "domain", "split", "depth_path", "mask_path")


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") must not become part of the first column name
            df = pd.read_csv(path, encoding="utf-8-sig", dtype={c: str for c in TEXT_CSV_COLUMNS})
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unknown manifest format {suffix!r}; use .csv or .parquet")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read manifest: {e}") from e
    df.columns = [str(c).strip() for c in df.columns]
    return df.reset_index(drop=True)


def _ids(df: Any, where: Any) -> list[str]:
    if "id" not in df.columns:
        return [f"{d}-{s}-{i}" for i, (d, s) in enumerate(zip(df["domain"], df["split"]))]
    ids: list[str] = []
    seen: dict[str, int] = {}
    for i, v in enumerate(df["id"]):
        if _missing(v) or not str(v).strip():
            raise DataError(f"{where(i)}: column 'id' is empty")
        sid = str(v)
        if sid in seen:
            raise DataError(
                f"{where(i)}: duplicate id {sid!r} (first at row {seen[sid]}); ids must be unique"
            )
        seen[sid] = i
        ids.append(sid)
    return ids


def _labels(
    df: Any, classes: Sequence[str] | None, where: Any, manifest: Path
) -> tuple[list[int] | None, list[str]]:
    """Labels as class indices (names or ints accepted), and the class names."""
    if "label" not in df.columns:
        return None, list(classes or [])
    values = list(df["label"])
    numeric = all(_missing(v) or _is_number(v) for v in values)
    out: list[int] = []
    if numeric:
        ints: list[int] = []
        for i, v in enumerate(values):
            if _missing(v) or v == NO_LABEL:
                ints.append(NO_LABEL)
            elif float(v) != int(float(v)) or int(float(v)) < 0:
                raise DataError(f"{where(i)}: label {v!r} is not a class index (a non-negative integer)")
            else:
                ints.append(int(float(v)))
        names = list(classes) if classes is not None else [str(k) for k in range(max(ints) + 1)]
        for i, v in enumerate(ints):
            if v != NO_LABEL and v >= len(names):
                raise DataError(
                    f"{where(i)}: label {v} is not in the class set (0..{len(names) - 1}: {names})"
                )
        out = ints
    else:
        names = list(classes) if classes is not None else sorted({str(v) for v in values if not _missing(v)})
        index = {c: k for k, c in enumerate(names)}
        for i, v in enumerate(values):
            if _missing(v):
                out.append(NO_LABEL)
            elif str(v) not in index:
                raise DataError(f"{where(i)}: label {v!r} is not in the class set {names}")
            else:
                out.append(index[str(v)])
    if not names:
        raise DataError(f"{manifest}: column 'label' has no labels and no classes are given")
    return out, names


def _factors(
    df: Any, cols: list[str], decl: Declared, where: Any, manifest: Path
) -> tuple[dict[str, list[Any]], dict[str, int]]:
    """factor_<name> columns -> per-row values and the number of values (discrete) or bins (continuous).

    Discrete factors hold value indices 0..n-1. A factor is continuous when ``factor_ranges`` declares its
    [low, high] (values must be finite and inside it) or, undeclared, when its column holds non-integer numbers
    (the range is then the observed [min, max], with a warning: declare it to have it checked). Continuous values
    are kept as floats in the manifest; prepare bins them into ``factors.<name>`` (default 20) equal-width bins.
    """
    sizes = decl.factors
    if sizes is not None:
        missing = [k for k in sizes if f"factor_{k}" not in cols]
        if missing:
            raise DataError(f"{manifest}: missing column 'factor_{missing[0]}' (key 'factors' declares it)")
        extra = [c for c in cols if c[len("factor_"):] not in sizes]
        if extra:
            raise DataError(f"{manifest}: column {extra[0]!r} is not a declared factor {list(sizes)}")
        cols = [f"factor_{k}" for k in sizes]
    for k in decl.factor_ranges:
        if f"factor_{k}" not in cols:
            raise DataError(f"{manifest}: missing column 'factor_{k}' (key 'factor_ranges' declares it)")
    values: dict[str, list[Any]] = {}
    out_sizes: dict[str, int] = {}
    for c in cols:
        k = c[len("factor_") :]
        if k not in decl.factor_ranges and k not in (sizes or {}) and not _all_integers(df[c]):
            floats = _float_column(df, c, where)
            seen = [v for v in floats if v is not None]
            if seen and min(seen) < max(seen):
                decl.factor_ranges[k] = [min(seen), max(seen)]
                warnings.warn(f"{manifest}: {c} holds non-integer values: a continuous factor with the observed "
                              f"range {decl.factor_ranges[k]}; declare factor_ranges.{k} to have the range checked",
                              IngestWarning, stacklevel=3)
        if k in decl.factor_ranges:
            low, high = (float(v) for v in decl.factor_ranges[k])
            floats = _float_column(df, c, where)
            for i, v in enumerate(floats):
                if v is not None and not low <= v <= high:
                    raise DataError(f"{where(i)}: {c} = {v} is outside the declared range [{low}, {high}] "
                                    f"(key 'factor_ranges.{k}')")
            values[k], out_sizes[k] = floats, int((sizes or {}).get(k, FACTOR_BINS))
            continue
        ints = [
            NO_LABEL if (_missing(v) or v == NO_LABEL) else v for v in _int_column(df, c, where, NO_LABEL)
        ]
        for i, v in enumerate(ints):
            if v != NO_LABEL and v < 0:
                raise DataError(f"{where(i)}: {c} = {v} is negative; factor values are indices 0..n-1")
        n = sizes[k] if sizes is not None else max([v + 1 for v in ints] + [0])
        for i, v in enumerate(ints):
            if v >= n:
                raise DataError(f"{where(i)}: {c} = {v} is outside 0..{n - 1} (key 'factors.{k}')")
        if n == 0:
            raise DataError(f"{manifest}: column {c!r} has no values")
        values[k], out_sizes[k] = ints, n
    return values, out_sizes


def _all_integers(col: Any) -> bool:
    """True when every non-empty cell is an integer (or integer text); text that is no number counts as integer
    here so that :func:`_int_column` reports it by name."""
    for v in col:
        if _missing(v) or (isinstance(v, str) and not v.strip()):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            return True
        if math.isfinite(f) and f != int(f):
            return False
    return True


def _float_column(df: Any, col: str, where: Any) -> list[float | None]:
    """A continuous factor column: finite numbers (text such as '0.3' accepted), None for empty cells."""
    out: list[float | None] = []
    for i, v in enumerate(df[col]):
        if _missing(v) or (isinstance(v, str) and not v.strip()):
            out.append(None)
            continue
        try:
            f = float(v) if not isinstance(v, bool) else math.nan
        except (TypeError, ValueError):
            raise DataError(f"{where(i)}: column {col!r} = {v!r} is not a number") from None
        if not math.isfinite(f):
            raise DataError(f"{where(i)}: column {col!r} = {v!r} is not finite")
        out.append(f)
    return out


def _int_column(df: Any, col: str, where: Any, missing: Any = None) -> list[Any]:
    """An integer column; text cells such as '3' are accepted (a CSV column with one bad cell reads as text)."""
    out: list[Any] = []
    for i, v in enumerate(df[col]):
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v.strip())
        if _missing(v) or (isinstance(v, str) and not v.strip()):
            out.append(missing)
        elif _is_number(v) and float(v) == int(float(v)):
            out.append(int(float(v)))
        else:
            raise DataError(f"{where(i)}: column {col!r} = {v!r} is not an integer")
    return out


def _missing(v: Any) -> bool:
    """None, NaN, pd.NA and NaT: an empty cell in the user's table."""
    import pandas as pd

    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):  # list-like cells are values, not gaps
        return False


def _is_number(v: Any) -> bool:
    if isinstance(v, (bool, str)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
