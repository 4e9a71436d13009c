"""Sources for data users bring: an image-folder tree or a manifest CSV/Parquet -> a benchmark directory.

Adapters point at the user's files in place (absolute paths in the manifest, nothing copied), read width,
height, channels and sha256 from the files themselves, and write ``benchmark.yaml`` + ``manifest.parquet``
atomically (built in a temp dir beside ``out``, swapped in with :func:`s2r.data.benchmark.staged_dir`), so a
failed run never corrupts an existing ``out``. Bad input raises :class:`DataError` naming file, row or key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from s2r.data.benchmark import (
    MANIFEST_COLUMNS,
    NO_LABEL,
    SPLITS,
    BenchmarkSpec,
    DataError,
    DomainSpec,
    staged_dir,
)
from s2r.data.validation import ImageInfo, inspect_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MAX_LISTED = 5  # offending files/rows named in one error message


@dataclasses.dataclass
class _Record:
    """One sample found in the user's data, before its file is inspected."""

    id: str
    domain: str
    split: str
    file: Path
    where: str  # how to name it in errors: "file ..." or "manifest.csv row 3 (file ...)"
    label: int = NO_LABEL
    factors: dict[str, int] = dataclasses.field(default_factory=dict)
    extra: dict[str, int] = dataclasses.field(default_factory=dict)  # scene_id / variation when given


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
) -> Path:
    """Turn ``src/<domain>/<split>/<class>/*.png|jpg|jpeg|bmp`` into a classification benchmark at `out`."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: image folder not found")
    _check_out_apart(Path(out), [src])
    domains = _subdirs(src)
    _reject_stray_images(src, "<domain>/<split>/<class>/")
    if not domains:
        raise DataError(f"{src}: empty folder: expected <domain>/<split>/<class>/ sub-folders with images")
    found: list[tuple[str, str, str, Path]] = []  # (domain, split, class, file)
    for ddir in domains:
        _reject_stray_images(ddir, "<split>/<class>/")
        for sdir in _subdirs(ddir):
            if sdir.name not in SPLITS:
                raise DataError(f"{sdir}: unknown split folder {sdir.name!r}; expected one of {list(SPLITS)}")
        for split in SPLITS:
            sdir = ddir / split
            if not sdir.is_dir():
                raise DataError(f"{ddir}: no {split!r} folder; every domain needs {list(SPLITS)}")
            _reject_stray_images(sdir, "<class>/")
            cdirs = _subdirs(sdir)
            if not cdirs:
                raise DataError(f"{sdir}: empty folder: expected one sub-folder per class")
            for cdir in cdirs:
                files = sorted(
                    f
                    for f in cdir.iterdir()
                    if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
                )
                if not files:
                    raise DataError(f"{cdir}: empty class folder: no {'/'.join(IMAGE_SUFFIXES)} images")
                found += [(ddir.name, split, cdir.name, f) for f in files]
    classes = sorted({c for _, _, c, _ in found})
    index = {c: i for i, c in enumerate(classes)}
    counters: Counter[tuple[str, str]] = Counter()
    records = []
    for d, s, c, f in found:
        rid = f"{d}-{s}-{counters[(d, s)]}"
        counters[(d, s)] += 1
        records.append(_Record(rid, d, s, Path(os.path.abspath(f)), f"file {f}", label=index[c]))
    return _finish(
        records,
        Path(out),
        name=name,
        source=source,
        target=target,
        classes=classes,
        factors={},
        channels=channels,
        image_size=image_size,
        unlabelled=unlabelled,
        description=f"image folder {src}",
    )


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
) -> Path:
    """Turn a user CSV/Parquet (path, domain, split [, id, label, factor_*]) into a benchmark at `out`."""
    manifest = Path(manifest)
    df = _read_table(manifest)
    root = Path(root) if root is not None else manifest.parent
    for col in ("path", "domain", "split"):
        if col not in df.columns:
            raise DataError(f"{manifest}: missing column {col!r} (columns: {list(df.columns)})")
    if len(df) == 0:
        raise DataError(f"{manifest}: the manifest has no rows")
    csv = manifest.suffix.lower() == ".csv"

    def where(i: int) -> str:
        return f"{manifest} row {i}" + (f" (line {i + 2})" if csv else "")

    for col in ("path", "domain", "split"):
        bad = [i for i, v in enumerate(df[col]) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise DataError(f"{where(bad[0])}: column {col!r} is empty ({len(bad)} rows in all)")
    for i, s in enumerate(df["split"]):
        if s not in SPLITS:
            raise DataError(f"{where(i)}: unknown split {s!r}; expected one of {list(SPLITS)}")
    ids = _ids(df, where)
    labels, class_names = _labels(df, classes, where, manifest)
    fac_cols = [c for c in df.columns if str(c).startswith("factor_")]
    fac_values, fac_sizes = _factors(df, fac_cols, factors, where, manifest)
    extras = {c: _int_column(df, c, where) for c in ("scene_id", "variation") if c in df.columns}
    if labels is None and not fac_cols:
        raise DataError(f"{manifest}: needs a 'label' column or factor_<name> columns (the task)")
    if labels is None and classes:
        raise DataError(f"{manifest}: key 'classes' is given but the manifest has no 'label' column")
    records = []
    for i in range(len(df)):
        rel = Path(str(df["path"].iat[i])).expanduser()
        file = Path(os.path.abspath(rel if rel.is_absolute() else root / rel))
        records.append(
            _Record(
                id=ids[i],
                domain=str(df["domain"].iat[i]),
                split=str(df["split"].iat[i]),
                file=file,
                where=f"{where(i)} (file {file})",
                label=labels[i] if labels is not None else NO_LABEL,
                factors={k: v[i] for k, v in fac_values.items()},
                extra={c: v[i] for c, v in extras.items() if v[i] is not None},
            )
        )
    _check_out_apart(Path(out), [manifest, *(r.file for r in records)])
    return _finish(
        records,
        Path(out),
        name=name,
        source=source,
        target=target,
        classes=class_names,
        factors=fac_sizes,
        channels=channels,
        image_size=image_size,
        unlabelled=unlabelled,
        description=f"manifest {manifest}",
    )


# ----------------------------------------------------------------------------------------------------------
# shared: inspect files, check consistency, build spec + manifest, write atomically


def _finish(
    records: list[_Record],
    out: Path,
    *,
    name: str,
    source: str,
    target: str,
    classes: list[str],
    factors: dict[str, int],
    channels: int | None,
    image_size: int | None,
    unlabelled: Sequence[str],
    description: str,
) -> Path:
    """Inspect every file, check the set is consistent, then write spec + manifest atomically to `out`."""
    import pandas as pd

    if not name or not isinstance(name, str):
        raise DataError(f"key 'name': a benchmark needs a non-empty name, got {name!r}")
    domains = sorted({r.domain for r in records})
    for key, value in (("source", source), ("target", target)):
        if value not in domains:
            raise DataError(f"key {key!r}: domain {value!r} not found in the data; domains are {domains}")
    if source == target:
        raise DataError(f"keys 'source'/'target': both are {source!r}; they must be different domains")
    unlabelled = [unlabelled] if isinstance(unlabelled, str) else list(unlabelled)
    for u in unlabelled:
        if u not in domains:
            raise DataError(f"key 'unlabelled': domain {u!r} not found in the data; domains are {domains}")
    infos = inspect_images([r.file for r in records])
    _raise_unreadable(records, infos)
    channels = _check_channels(records, infos, channels)
    image_size, resize = _check_size(records, infos, image_size)
    labelled = {d: d not in unlabelled for d in domains}
    if classes:
        _require_labels(records, labelled, "label", lambda r: r.label)
    for k in factors:
        _require_labels(records, labelled, f"factor_{k}", lambda r, k=k: r.factors.get(k, NO_LABEL))

    rows: list[dict[str, Any]] = []
    for r, info in zip(records, infos):
        row: dict[str, Any] = {
            "id": r.id,
            "domain": r.domain,
            "split": r.split,
            "path": str(r.file),
            "width": info.width,
            "height": info.height,
            "channels": info.channels,
            "sha256": info.sha256,
        }
        if classes:
            row["label"] = int(r.label)
        for k in factors:
            row[f"factor_{k}"] = int(r.factors.get(k, NO_LABEL))
        row.update(r.extra)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame = frame[[*MANIFEST_COLUMNS, *(c for c in frame.columns if c not in MANIFEST_COLUMNS)]]
    for c in ("width", "height", "channels", "label", *(f"factor_{k}" for k in factors)):
        if c in frame.columns:
            frame[c] = frame[c].astype("int64")
    for c in ("scene_id", "variation"):
        if c in frame.columns:
            frame[c] = frame[c].astype("Int64")

    tasks = (["classification"] if classes else []) + (["factors"] if factors else [])
    roles = {source: "source", target: "target"}
    spec_kwargs: dict[str, Any] = {}
    if resize:
        description += f"; images of other sizes are resized to {image_size}x{image_size} by prepare"
        spec_kwargs["resize"] = True
    spec = BenchmarkSpec(
        name=name,
        tasks=tasks,
        domains=[DomainSpec(name=d, role=roles.get(d, "auxiliary"), labelled=labelled[d]) for d in domains],
        source=source,
        target=target,
        image_size=image_size,
        channels=channels,
        classes=list(classes),
        factors=dict(factors),
        description=description,
        **spec_kwargs,
    )
    spec.validate()
    return _write_atomically(out, spec, frame)


def _write_atomically(out: Path, spec: BenchmarkSpec, frame: Any) -> Path:
    """Build the benchmark in a temp dir beside `out` and swap it in; on failure `out` is left as it was."""
    with staged_dir(out) as tmp:
        frame.to_parquet(tmp / "manifest.parquet", index=False)
        spec.save(tmp / "benchmark.yaml")
    return out


def _raise_unreadable(records: list[_Record], infos: list[ImageInfo]) -> None:
    bad = [(r, i) for r, i in zip(records, infos) if i.error]
    if bad:
        listed = "; ".join(f"{r.where}: {i.error}" for r, i in bad[:MAX_LISTED])
        more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{len(bad)} unreadable or corrupt image(s): {listed}{more}")


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


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, dtype={"id": str, "path": str, "domain": str, "split": str})
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
    df: Any, cols: list[str], sizes: dict[str, int] | None, where: Any, manifest: Path
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """factor_<name> columns as value indices, and the number of values of each factor."""
    if sizes is not None:
        missing = [k for k in sizes if f"factor_{k}" not in cols]
        if missing:
            raise DataError(f"{manifest}: missing column 'factor_{missing[0]}' (key 'factors' declares it)")
        cols = [f"factor_{k}" for k in sizes]
    values: dict[str, list[int]] = {}
    out_sizes: dict[str, int] = {}
    for c in cols:
        k = c[len("factor_") :]
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
