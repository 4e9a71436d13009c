"""Manifest validation with Great Expectations: the gate every benchmark passes before anything trains on it.

This is the only module that imports ``great_expectations`` (inside functions: the import takes seconds).
:func:`validate_benchmark` builds an expectation suite from the benchmark's own ``benchmark.yaml``, runs it on
the manifest, adds the checks GX has no single expectation for (non-empty domain/split pairs, no checksum
shared between train/val and test, files that exist, decode and match their manifest row) and returns a
:class:`ValidationReport` whose failures name the rows, ids and files at fault. Row numbers are 0-based
positions in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from s2r.config import SPLITS
from s2r.data.benchmark import (
    MANIFEST_COLUMNS,
    NO_LABEL,
    BenchmarkSpec,
    DataError,
    read_manifest,
    resolve_path,
)
from s2r.files import write_json

MAX_EXAMPLES = 5  # offending rows kept per expectation
SHA256_REGEX = r"^[0-9a-f]{64}$"
TEXT_COLUMNS = ("id", "domain", "split", "path", "sha256")
INT_COLUMNS = ("width", "height", "channels")
# integer dtypes (numpy, pandas nullable) and "int" for Python ints in object columns
INT_DTYPES = ["int"] + [f"{p}{b}" for p in ("int", "uint", "Int", "UInt") for b in (8, 16, 32, 64)]
NUMBER_DTYPES = [*INT_DTYPES, "float", "float32", "float64", "Float32", "Float64"]
# Channels of a decoded image by Pillow mode. Palette images count as RGB (prepare converts them to RGB).
MODE_CHANNELS = {
    "1": 1,
    "L": 1,
    "I": 1,
    "F": 1,
    "I;16": 1,
    "I;16B": 1,
    "I;16L": 1,
    "I;16N": 1,
    "LA": 2,
    "La": 2,
    "P": 3,
    "PA": 4,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "RGBA": 4,
    "RGBa": 4,
    "RGBX": 4,
    "CMYK": 4,
}


@dataclass
class ImageInfo:
    """What a file really holds, read once from its bytes (size, channels, checksum, or why it is bad)."""

    path: str
    width: int = 0
    height: int = 0
    channels: int = 0
    mode: str = ""
    sha256: str = ""
    error: str | None = None  # set when the file is missing, unreadable or does not decode
    bits: int = 8  # bits per channel as stored (a 16-bit PNG decodes to 8-bit RGB in Pillow: read from the header)


def image_channels(mode: str) -> int:
    """Channel count of a Pillow mode, so adapters, validation and prepare agree on what 'channels' means."""
    if mode in MODE_CHANNELS:
        return MODE_CHANNELS[mode]
    from PIL import Image

    return Image.getmodebands(mode)


def inspect_image(path: Path) -> ImageInfo:
    """Read a file once, hash its bytes and decode them fully, so truncated or corrupt images are caught."""
    from PIL import Image

    info = ImageInfo(path=str(path))
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        info.error = "no such file"
        return info
    except OSError as e:
        info.error = f"cannot read: {e.strerror or e}"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            info.width, info.height = im.size
            info.mode = im.mode
            info.channels = image_channels(im.mode)
            info.bits = MODE_BITS.get(im.mode, 8)
        if data[:8] == PNG_SIGNATURE and len(data) > 24:
            info.bits = max(info.bits, data[24])  # IHDR bit depth: Pillow reads 48-bit RGB PNGs as 8-bit RGB
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files; all mean "corrupt"
        info.error = f"cannot decode image: {type(e).__name__}: {e}"
    return info


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODE_BITS = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 32, "F": 32, "1": 1}


def read_aux(path: Path, kind: str) -> Any:
    """A depth map (float64, file units) or a mask (int64 ids) as an (H, W) array; DataError naming the file.

    Depth: 8/16-bit PNG, 32-bit integer or float TIFF, or a 2-D ``.npy``. Mask: a single-channel image (L, P
    palette indices, I;16); RGB masks are refused (class ids, not colours).
    """
    import numpy as np
    from PIL import Image

    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                im.load()
                if kind == "mask" and image_channels(im.mode) != 1 and im.mode != "P":
                    raise DataError(f"{path}: mask has mode {im.mode} ({image_channels(im.mode)} channels); "
                                    "a mask holds one class id per pixel (mode L, P or I;16)")
                arr = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except Exception as e:  # noqa: BLE001 - numpy/Pillow raise many types for bad files; all mean "corrupt"
        raise DataError(f"{path}: cannot decode {kind}: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"{path}: {kind} has shape {arr.shape}; expected one value per pixel (H, W)")
    if kind == "mask":
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: mask dtype {arr.dtype}; class ids must be integers")
        return arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{path}: depth dtype {arr.dtype} is not numeric")
    return arr.astype(np.float64)


def depth_facts(arr: Any, invalid: float) -> tuple[float, int]:
    """(smallest valid value, count of non-finite values that are not the declared invalid value)."""
    import numpy as np

    valid = np.isnan(arr) if math.isnan(invalid) else arr == invalid
    rest = arr[~valid]
    nonfinite = int((~np.isfinite(rest)).sum())
    finite = rest[np.isfinite(rest)]
    return (float(finite.min()) if finite.size else 0.0), nonfinite


def inspect_images(paths: Sequence[Path]) -> list[ImageInfo]:
    """Inspect many files in order; sequential on purpose (threads were 2-4x slower on small PNGs here)."""
    return [inspect_image(p) for p in paths]


@dataclass
class ValidationReport:
    """Outcome of validating one benchmark: one entry per expectation, failures naming rows, ids and files."""

    benchmark: str
    root: str
    success: bool
    n_rows: int
    results: list[dict[str, Any]] = field(default_factory=list)

    def failures(self) -> list[dict[str, Any]]:
        """The failed expectations only: what a user has to fix."""
        return [r for r in self.results if not r["success"]]

    def to_json(self, path: Path) -> None:
        """Write the report atomically (tmp + rename) so a pipeline never reads half a report."""
        write_json(path, asdict(self), default=_plain)

    @classmethod
    def from_json(cls, path: Path) -> ValidationReport:
        """Read a report written by :meth:`to_json` (e.g. a DVC stage output)."""
        raw = json.loads(Path(path).read_text())
        return cls(**raw)

    def summary(self) -> str:
        """Human text for the CLI and logs: each failed expectation with the rows, ids and files at fault."""
        failed = self.failures()
        status = "OK" if self.success else "FAILED"
        passed = len(self.results) - len(failed)
        lines = [
            f"benchmark {self.benchmark!r} at {self.root}: {status} "
            + f"({passed}/{len(self.results)} expectations passed, {self.n_rows} rows)"
        ]
        for r in failed:
            col = f" [{r['column']}]" if r.get("column") else ""
            msg = f": {r['message']}" if r.get("message") else ""
            lines.append(f"- {r['expectation']}{col}: {r['unexpected_count']} unexpected{msg}")
            for ex in r["examples"]:
                where = [f"id {ex['id']!r}" if ex.get("id") is not None else None]
                where.append(f"row {ex['row']}" if ex.get("row") is not None else None)
                where.append(f"file {ex['path']}" if ex.get("path") is not None else None)
                loc = ", ".join(w for w in where if w)
                lines.append(f"    {loc + ': ' if loc else ''}{ex.get('value')}")
            more = r["unexpected_count"] - len(r["examples"])
            if more > 0:
                lines.append(f"    ... and {more} more")
        return "\n".join(lines)


def validate_benchmark(root: Path, check_files: bool = True) -> ValidationReport:
    """Check a benchmark's manifest (and its files) before training; DataError if it cannot be read."""
    from s2r.config import ConfigError

    root = Path(root)
    try:
        spec = BenchmarkSpec.load(root / "benchmark.yaml")
    except ConfigError as e:  # a bad description is bad data: one error type for the CLI to report
        raise DataError(str(e)) from e
    df = read_manifest(root).reset_index(drop=True)
    results = _run_gx(df, spec)
    results += _pandas_checks(df, spec)
    if check_files:
        results += _file_checks(df, root, spec)
        results += _containment_check(df, root, spec)
    if spec.expectations:
        results += _expectation_checks(df, spec, root, check_files)
    return ValidationReport(
        benchmark=spec.name,
        root=str(root),
        success=all(r["success"] for r in results),
        n_rows=len(df),
        results=results,
    )


# ----------------------------------------------------------------------------------------------------------
# Great Expectations part


def required_columns(spec: BenchmarkSpec) -> list[str]:
    """Columns the manifest of `spec` must have: the shared ones plus label/factor/depth/mask as declared."""
    cols = list(MANIFEST_COLUMNS)
    if spec.classes:
        cols.append("label")
    cols += [f"factor_{name}" for name in spec.factors]
    if spec.has_depth:
        cols.append("depth_path")
    if spec.has_mask:
        cols.append("mask_path")
    return cols


def _build_suite(df: Any, spec: BenchmarkSpec) -> Any:
    """benchmark.yaml -> GX suite; value checks only on present columns, so a missing one fails once."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    present = set(df.columns)
    required = required_columns(spec)
    exps: list[Any] = [gxe.ExpectColumnToExist(column=c) for c in required]
    have = [c for c in required if c in present]
    labelled = [d.name for d in spec.domains if d.labelled]
    unlabelled = [d.name for d in spec.domains if not d.labelled]
    continuous = [f"factor_{k}" for k in spec.factor_ranges]
    # continuous factors, depth and masks may be empty (NaN / "") on rows of unlabelled domains only
    optional = [c for c in have if c in continuous or c in ("depth_path", "mask_path")]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in have if c not in optional]
    if "domain" in present:
        cond: dict[str, Any] = {} if not unlabelled else {"row_condition": Column("domain").is_in(labelled)}
        exps += [gxe.ExpectColumnValuesToNotBeNull(column=c, **cond) for c in optional if labelled]
    exps += [gxe.ExpectColumnValuesToBeOfType(column=c, type_="str") for c in TEXT_COLUMNS if c in present]
    ints = [c for c in have if c in INT_COLUMNS or c == "label" or (c.startswith("factor_") and c not in continuous)]
    exps += [gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=INT_DTYPES) for c in ints]
    exps += [gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=NUMBER_DTYPES) for c in have if c in continuous]
    for k, (low, high) in spec.factor_ranges.items():  # finite and inside the declared range (inf fails too)
        if f"factor_{k}" in present:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=f"factor_{k}", min_value=float(low),
                                                          max_value=float(high)))
    if "id" in present:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="id"))
    if "domain" in present:
        exps.append(
            gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=[d.name for d in spec.domains])
        )
    if "split" in present:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    resize = spec.resize  # prepare resizes: files keep their own size
    for c, want in (("width", spec.image_size), ("height", spec.height)):
        if c in present and not resize:
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[want]))
    if "channels" in present:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="channels", value_set=[spec.channels]))
    if "sha256" in present:
        exps.append(gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=SHA256_REGEX))
    # label / discrete factors: labelled domains need a real value, unlabelled ones may also hold NO_LABEL
    targets = [("label", len(spec.classes))] if spec.classes else []
    targets += [(f"factor_{k}", n) for k, n in spec.factors.items() if k not in spec.factor_ranges]
    for col, n in targets:
        if col not in present or "domain" not in present:
            continue
        for names, extra in ((labelled, []), (unlabelled, [NO_LABEL])):
            if not names:
                continue
            cond = {} if len(names) == len(spec.domains) else {"row_condition": Column("domain").is_in(names)}
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=list(range(n)) + extra, **cond))
    suite = gx.ExpectationSuite(name=f"s2r-{spec.name}")
    for i, e in enumerate(exps):
        e.meta = {"s2r_order": i}
        suite.add_expectation(e)
    return suite


def _run_gx(df: Any, spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Validate the manifest DataFrame in an ephemeral GX context and convert results to plain dicts."""
    return _validate_gx(df, lambda: _build_suite(df, spec))


def _run_suite(df: Any, exps: list[Any], name: str) -> list[dict[str, Any]]:
    """Run a list of GX expectations on a DataFrame (e.g. the per-row facts of depth/mask files)."""
    import great_expectations as gx

    def build() -> Any:
        suite = gx.ExpectationSuite(name=name)
        for i, e in enumerate(exps):
            e.meta = {"s2r_order": i}
            suite.add_expectation(e)
        return suite

    return _validate_gx(df, build)


def _validate_gx(df: Any, build: Callable[[], Any]) -> list[dict[str, Any]]:
    """Run the suite `build()` makes (after the GX context exists) on `df`; results in suite order."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("s2r").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("manifest").get_batch(
        batch_parameters={"dataframe": df}
    )
    res = batch.validate(build(), result_format="COMPLETE")
    # GX returns results in its own order; restore the suite's order (stable, readable reports)
    ordered = sorted(res.results, key=lambda r: (r.expectation_config.meta or {}).get("s2r_order", 1 << 30))
    return [_from_gx(r, df) for r in ordered]


def _from_gx(r: Any, df: Any) -> dict[str, Any]:
    """One GX ExpectationValidationResult -> the report's plain-dict form with example rows."""
    cfg = r.expectation_config.to_json_dict()
    kwargs = {k: v for k, v in cfg.get("kwargs", {}).items() if k != "batch_id"}
    column = kwargs.get("column")
    result = r.result or {}
    idx = [int(i) for i in result.get("unexpected_index_list") or [] if not isinstance(i, dict)]
    count = int(result.get("unexpected_count") or 0)
    message = None
    error = _gx_exception(r.exception_info)
    if error:
        message = f"could not be evaluated: {error}"
    elif cfg["type"] == "expect_column_to_exist" and not r.success:
        message = f"column {column!r} is missing (manifest has {list(df.columns)})"
        count = 1
    elif cfg["type"] == "expect_column_values_to_be_of_type" and not r.success:
        message = f"column {column!r} has dtype {df[column].dtype}, expected {kwargs.get('type_')}"
        count = len(df)
    elif cfg["type"] == "expect_column_values_to_be_in_type_list" and not r.success and not idx:
        message = f"column {column!r} has dtype {df[column].dtype}, expected an integer type"
        count = count or len(df)
    if cfg["type"] == "expect_column_values_to_be_in_set" and "value_set" in kwargs and not r.success:
        vs = kwargs["value_set"]
        shown = vs if len(vs) <= 12 else [*vs[:5], "...", *vs[-3:]]
        message = f"values outside {shown}"
    if cfg["type"] == "expect_column_values_to_be_between" and not r.success and not error:
        message = f"values outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}] or not finite"
    examples = [_example(df, int(i), column) for i in idx[:MAX_EXAMPLES]]
    return _result(cfg["type"], column, kwargs, bool(r.success), count, examples, message)


# ----------------------------------------------------------------------------------------------------------
# checks GX has no single expectation for, in the same result format


def _gx_exception(info: Any) -> str | None:
    """The message of an exception GX caught while evaluating (flat or keyed by metric id), if any."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for v in info.values():
        if isinstance(v, dict) and v.get("raised_exception"):
            return str(v.get("exception_message"))
    return None


def _pandas_checks(df: Any, spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Non-empty (domain, split) pairs and no checksum shared between train/val and test."""
    out: list[dict[str, Any]] = []
    if {"domain", "split"} <= set(df.columns):
        counts = df.groupby(["domain", "split"]).size().to_dict()
        domains = [d.name for d in spec.domains]
        empty = [(d, s) for d in domains for s in SPLITS if counts.get((d, s), 0) == 0]
        examples = [
            {"row": None, "id": None, "path": None, "value": f"domain {d!r} split {s!r} has no rows"}
            for d, s in empty
        ]
        msg = "empty: " + ", ".join(f"{d}/{s}" for d, s in empty) if empty else None
        out.append(
            _result(
                "expect_domain_split_pairs_to_be_non_empty",
                None,
                {"domains": domains, "splits": list(SPLITS)},
                not empty,
                len(empty),
                examples[:MAX_EXAMPLES],
                msg,
            )
        )
    if {"split", "sha256"} <= set(df.columns):
        for a, b in (("train", "test"), ("val", "test")):
            out.append(_disjoint_sha(df, a, b))
    return out


def _disjoint_sha(df: Any, a: str, b: str) -> dict[str, Any]:
    """Rows of split `b` whose file checksum also appears in split `a` (train/test leakage)."""
    first_in_a: dict[str, int] = {}
    for i, h in df.loc[df["split"] == a, "sha256"].items():
        if isinstance(h, str):  # missing checksums are reported by the not-null expectation
            first_in_a.setdefault(h, int(i))
    in_b = df.loc[df["split"] == b, "sha256"].items()
    leaks = [(int(i), first_in_a[h]) for i, h in in_b if isinstance(h, str) and h in first_in_a]
    examples = []
    for i, j in leaks[:MAX_EXAMPLES]:
        ex = _example(df, i, None)
        other = _example(df, j, None)
        ex["value"] = f"same sha256 as {a} row {j} (id {other['id']!r}, file {other['path']})"
        examples.append(ex)
    msg = f"{len(leaks)} {b} rows have the checksum of a {a} row (leakage)" if leaks else None
    return _result(
        "expect_sha256_disjoint_between_splits",
        "sha256",
        {"splits": [a, b]},
        not leaks,
        len(leaks),
        examples,
        msg,
    )


def _file_checks(df: Any, root: Path, spec: BenchmarkSpec | None = None) -> list[dict[str, Any]]:
    """Every referenced file exists, decodes, and has the size, channels, bit depth and checksum its row claims;
    depth and mask files also have valid values (:func:`_aux_checks`)."""
    out: list[dict[str, Any]] = []
    for col in ("path", "depth_path", "mask_path"):
        if col not in df.columns:
            continue
        if col != "path" and spec is not None:
            out += _aux_checks(df, root, spec, col)
            continue
        rows = [(int(i), v) for i, v in df[col].items() if isinstance(v, str) and v]
        infos = inspect_images([resolve_path(root, v) for _, v in rows])
        pairs = list(zip((i for i, _ in rows), infos))
        bad = [(i, info.error) for i, info in pairs if info.error]
        out.append(_file_result("expect_files_to_exist_and_decode", col, df, bad, lambda i, e: f"{e}"))
        ok = [(i, info) for i, info in pairs if not info.error]
        if {"width", "height"} <= set(df.columns):
            size = [
                (i, f"file is {info.width}x{info.height}, row says {df.at[i, 'width']}x{df.at[i, 'height']}")
                for i, info in ok
                if not (_eq(info.width, df.at[i, "width"]) and _eq(info.height, df.at[i, "height"]))
            ]
            out.append(_file_result("expect_file_size_to_match_manifest", col, df, size, lambda i, e: e))
        if col != "path":
            continue
        if "channels" in df.columns:
            ch = [
                (i, f"file has {info.channels} channels (mode {info.mode}), row says {df.at[i, 'channels']}")
                for i, info in ok
                if not _eq(info.channels, df.at[i, "channels"])
            ]
            out.append(_file_result("expect_file_channels_to_match_manifest", col, df, ch, lambda i, e: e))
        if spec is not None:
            deep = [(i, f"{info.bits}-bit per channel (mode {info.mode}); declare convert_16bit: true to keep the "
                        "high byte, or convert the file to 8-bit") for i, info in ok
                    if info.bits > 8 and not (spec.convert_16bit and info.bits == 16)]
            out.append(_file_result("expect_file_bit_depth_8", col, df, deep, lambda i, e: e))
        if "sha256" in df.columns:
            sha = [
                (i, f"file sha256 {info.sha256}, row says {df.at[i, 'sha256']}")
                for i, info in pairs
                if info.sha256 and info.sha256 != df.at[i, "sha256"]
            ]
            out.append(_file_result("expect_file_sha256_to_match_manifest", col, df, sha, lambda i, e: e))
    return out


def _aux_checks(df: Any, root: Path, spec: BenchmarkSpec, col: str) -> list[dict[str, Any]]:
    """Depth / mask files: decode, same size as the row's image, and values checked by a GX suite on a per-row
    facts table (depth finite and >= 0 apart from the declared invalid value; mask ids in the declared set)."""
    import great_expectations.expectations as gxe
    import numpy as np
    import pandas as pd

    kind = "depth" if col == "depth_path" else "mask"
    rows = [(int(i), v) for i, v in df[col].items() if isinstance(v, str) and v]
    bad, size = [], []
    facts = pd.DataFrame(index=df.index)
    for c in ("id", "path"):
        if c in df.columns:
            facts[c] = df[c]
    allowed = set(range(len(spec.seg_classes))) | {int(spec.mask_ignore)}
    vals: dict[str, dict[int, Any]] = {"depth_min": {}, "depth_nonfinite": {}, "mask_ids_outside": {}}
    for i, v in rows:
        try:
            arr = read_aux(resolve_path(root, v), kind)
        except DataError as e:
            bad.append((i, str(e)))
            continue
        h, w = arr.shape
        if {"width", "height"} <= set(df.columns) and not (_eq(w, df.at[i, "width"]) and _eq(h, df.at[i, "height"])):
            size.append((i, f"{kind} is {w}x{h}, its image is {df.at[i, 'width']}x{df.at[i, 'height']}"))
        if kind == "depth":
            vals["depth_min"][i], vals["depth_nonfinite"][i] = depth_facts(arr, float(spec.depth_invalid))
        elif spec.seg_classes:
            extra = sorted(set(np.unique(arr).tolist()) - allowed)
            vals["mask_ids_outside"][i] = " ".join(map(str, extra[:8]))
    out = [_file_result("expect_files_to_exist_and_decode", col, df, bad, lambda i, e: e),
           _file_result("expect_file_size_to_match_manifest", col, df, size, lambda i, e: e)]
    exps: list[Any] = []
    if kind == "depth" and rows:
        facts["depth_min"] = pd.Series(vals["depth_min"], dtype="float64")
        facts["depth_nonfinite"] = pd.Series(vals["depth_nonfinite"], dtype="Int64")
        exps = [gxe.ExpectColumnValuesToBeBetween(column="depth_min", min_value=0.0),
                gxe.ExpectColumnValuesToBeInSet(column="depth_nonfinite", value_set=[0])]
    elif kind == "mask" and rows and spec.seg_classes:
        facts["mask_ids_outside"] = pd.Series(vals["mask_ids_outside"], dtype="object")
        exps = [gxe.ExpectColumnValuesToBeInSet(column="mask_ids_outside", value_set=[""])]
    if exps:
        for r in _run_suite(facts, exps, f"s2r-{spec.name}-{kind}"):
            r["message"] = (r["message"] or "") + (f" (invalid value {spec.depth_invalid} excepted)"
                                                   if kind == "depth" else
                                                   f" (allowed: 0..{len(spec.seg_classes) - 1} {spec.seg_classes} "
                                                   f"and ignore {spec.mask_ignore})")
            for ex in r["examples"]:
                ex["path"] = _plain(df.at[ex["row"], col])
            out.append(r)
    return out


def _containment_check(df: Any, root: Path, spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """Every file (symlinks resolved) lies inside the dataset root, unless the benchmark allows it explicitly;
    allowed files outside are still listed, so the report says which."""
    base = Path(spec.data_root) if spec.data_root else Path(root)
    base = base.resolve()
    out = []
    for col in ("path", "depth_path", "mask_path"):
        if col not in df.columns:
            continue
        bad = []
        for i, v in df[col].items():
            if isinstance(v, str) and v:
                real = resolve_path(root, v).resolve()
                if not real.is_relative_to(base):
                    bad.append((int(i), f"resolves to {real}, outside the dataset root {base}"))
        r = _file_result("expect_files_inside_dataset_root", col, df, bad, lambda i, e: e)
        if bad and spec.allow_outside_root:
            r["success"] = True
            r["message"] = f"{len(bad)} files in column {col!r} lie outside {base} (allowed: allow_outside_root)"
        out.append(r)
    return out


EXPECTATION_KEYS = ("max_depth_m", "mask_values", "domain_rows")


def _expectation_checks(df: Any, spec: BenchmarkSpec, root: Path, check_files: bool) -> list[dict[str, Any]]:
    """A published dataset's own rules (``benchmark.yaml`` ``expectations``): exact row counts per domain,
    depth within the sensor's range at the declared scale, mask ids within the class map."""
    import numpy as np
    from PIL import Image

    out: list[dict[str, Any]] = []
    exp = spec.expectations
    unknown = sorted(set(exp) - set(EXPECTATION_KEYS))
    if unknown:
        raise DataError(f"{root}/benchmark.yaml: unknown key 'expectations.{unknown[0]}' "
                        f"(allowed: {list(EXPECTATION_KEYS)})")
    if "domain_rows" in exp and "domain" in df.columns:
        counts = df["domain"].value_counts().to_dict()
        bad = [(d, int(n), int(counts.get(d, 0))) for d, n in exp["domain_rows"].items() if counts.get(d, 0) != n]
        examples = [{"row": None, "id": None, "path": None, "value": f"domain {d!r} has {g} rows, expected {n}"}
                    for d, n, g in bad]
        out.append(_result("expect_domain_row_counts", "domain", {"domain_rows": exp["domain_rows"]}, not bad,
                           len(bad), examples[:MAX_EXAMPLES], "row counts differ from the dataset's" if bad else None))
    if not check_files:
        return out
    for key, col in (("max_depth_m", "depth_path"), ("mask_values", "mask_path")):
        if key not in exp or col not in df.columns:
            continue
        bad_files: list[tuple[int, Any]] = []
        allowed = set(int(v) for v in exp.get("mask_values", []))
        for i, v in df[col].items():
            if not isinstance(v, str) or not v:
                continue
            try:
                with Image.open(resolve_path(root, v)) as im:
                    arr = np.asarray(im)
            except Exception:  # noqa: BLE001 - unreadable files are reported by expect_files_to_exist_and_decode
                continue
            if key == "max_depth_m":
                if arr.dtype != np.uint16:
                    bad_files.append((int(i), f"depth PNG dtype {arr.dtype}, expected uint16"))
                elif arr.max(initial=0) / spec.depth_scale > float(exp[key]):
                    bad_files.append((int(i), f"depth {arr.max() / spec.depth_scale:.2f} m > {exp[key]} m "
                                        f"(scale {spec.depth_scale} per metre)"))
            else:
                extra = sorted(set(np.unique(arr).tolist()) - allowed)
                if extra:
                    bad_files.append((int(i), f"mask ids {extra[:8]} not in the class map"))
        name = "expect_depth_within_range" if key == "max_depth_m" else "expect_mask_ids_in_class_map"
        out.append(_file_result(name, col, df, bad_files, lambda i, e: e))
    return out


def _file_result(
    name: str, col: str, df: Any, bad: list[tuple[int, Any]], value: Callable[[int, Any], Any]
) -> dict[str, Any]:
    examples = []
    for i, e in bad[:MAX_EXAMPLES]:
        ex = _example(df, i, None)
        ex["path"] = _plain(df.at[i, col])
        ex["value"] = value(i, e)
        examples.append(ex)
    msg = f"{len(bad)} files in column {col!r} fail" if bad else None
    return _result(name, col, {"column": col}, not bad, len(bad), examples, msg)


# ----------------------------------------------------------------------------------------------------------
# helpers


def _result(
    name: str,
    column: str | None,
    kwargs: dict[str, Any],
    success: bool,
    count: int,
    examples: list[dict[str, Any]],
    message: str | None = None,
) -> dict[str, Any]:
    return {
        "expectation": name,
        "column": column,
        "kwargs": _plain(kwargs),
        "success": success,
        "unexpected_count": int(count),
        "examples": examples,
        "message": message,
    }


def _example(df: Any, i: int, column: str | None) -> dict[str, Any]:
    """A manifest row as {row, id, path, value} for reports."""
    row = {"row": int(i), "id": None, "path": None, "value": None}
    if i < 0 or i >= len(df):
        return row
    if "id" in df.columns:
        row["id"] = _plain(df.at[i, "id"])
    if "path" in df.columns:
        row["path"] = _plain(df.at[i, "path"])
    if column is not None and column in df.columns:
        row["value"] = _plain(df.at[i, column])
    return row


def _eq(actual: int, claimed: Any) -> bool:
    try:
        return int(actual) == int(claimed) and float(claimed) == float(int(claimed))
    except (TypeError, ValueError, OverflowError):
        return False


def _plain(v: Any) -> Any:
    """numpy/pandas scalars and containers -> JSON-native values (NaN -> None)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            return str(v)
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)
