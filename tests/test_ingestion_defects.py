"""Ingestion defect classes (issue 17): each case is one file or row wrong in an otherwise valid dataset, or a
valid control, run through import -> validate -> prepare exactly as a user would.

A defect must be refused with one message that names the file, the manifest row's id or the key at fault; a
control must be accepted with the expected sample count. ``python tests/test_ingestion_defects.py`` prints the
table of every case with what s2r did (the issue's "Must show"); the parametrised test keeps it from rotting.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from s2r.config import ConfigError
from s2r.data.adapters import Declared, from_image_folder, from_manifest, load_declared
from s2r.data.benchmark import DataError, read_manifest
from s2r.data.prepared import prepare
from s2r.data.validation import validate_benchmark

DOMAINS, SPLITS, CLASSES = ("sim", "real"), ("train", "val", "test"), ("cat", "dog")
N_BASE = len(DOMAINS) * len(SPLITS) * len(CLASSES)  # one image per (domain, split, class)
SIZE = 8
DECLARATION = {"classes": list(CLASSES), "factors": {"angle": 4, "shape": 2}, "factor_ranges": {"angle": [0.0, 1.0]},
               "mask_classes": ["background", "object", "shadow"], "depth_scale": 1000.0}


@dataclasses.dataclass
class Base:
    """The valid dataset every case starts from: images (folder layout), depth, masks, manifest, declaration."""

    root: Path  # the dataset root (manifest's folder)
    images: Path  # <root>/images/<domain>/<split>/<class>/<i>.png: the image-folder import's source
    manifest: Path
    declaration: Path
    outside: Path  # a folder beside the root (for path-containment cases)

    def rows(self) -> pd.DataFrame:
        return pd.read_csv(self.manifest, dtype=str, keep_default_na=False)

    def write(self, df: pd.DataFrame) -> None:
        df.to_csv(self.manifest, index=False)

    def image(self, domain: str = "sim", split: str = "train", cls: str = "cat") -> Path:
        return self.images / domain / split / cls / "0.png"

    def cell(self, col: str, i: int = 0) -> Path:
        return self.root / self.rows()[col].iat[i]


def _png(path: Path, arr: np.ndarray, fmt: str = "PNG", **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def png48(path: Path, h: int = SIZE, w: int = SIZE) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow reads these as 8-bit RGB and cannot write them)."""
    raw = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(data)
    return path


def build_base(tmp: Path) -> Base:
    rng = np.random.default_rng(0)
    root = tmp / "data"
    rows = []
    for d in DOMAINS:
        for s in SPLITS:
            for c in CLASSES:
                sid = f"{d}-{s}-{c}"
                _png(root / "images" / d / s / c / "0.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
                _png(root / "depth" / f"{sid}.png", rng.integers(1, 5000, (SIZE, SIZE)).astype(np.uint16))
                _png(root / "masks" / f"{sid}.png", rng.integers(0, 3, (SIZE, SIZE)).astype(np.uint8))
                rows.append({"id": sid, "path": f"images/{d}/{s}/{c}/0.png", "domain": d, "split": s, "label": c,
                             "factor_angle": f"{rng.random():.4f}", "factor_shape": str(CLASSES.index(c)),
                             "depth_path": f"depth/{sid}.png", "mask_path": f"masks/{sid}.png"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (tmp / "decl.yaml").write_text(yaml.safe_dump(DECLARATION))
    outside = tmp / "outside"
    outside.mkdir()
    _png(outside / "x.png", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    _png(outside / "m.png", np.zeros((SIZE, SIZE), np.uint8))
    return Base(root, root / "images", root / "manifest.csv", tmp / "decl.yaml", outside)


@dataclasses.dataclass
class Case:
    name: str
    mode: str  # "folder" (import-folder) or "manifest" (import-manifest with the declaration)
    mutate: Callable[[Base], Any]  # returns the needle the message must contain (file, id or key) or None
    expect: str = "refuse"  # "refuse" or "accept"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    count: int = N_BASE  # samples expected when accepted
    decl: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the declaration


@dataclasses.dataclass
class Outcome:
    stage: str  # where it stopped: import / validate / prepare, or "accepted"
    message: str
    n: int | None = None
    crashed: bool = False


def run_case(case: Case, tmp: Path) -> tuple[Outcome, str | None]:
    """Build the base, apply the case, run import -> validate -> prepare; the outcome and the needle."""
    base = build_base(tmp)
    needle = case.mutate(base)
    if case.decl:
        decl = yaml.safe_load(base.declaration.read_text()) | case.decl
        base.declaration.write_text(yaml.safe_dump(decl))
    out, stage = tmp / "bench", "import"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if case.mode == "folder":
                from_image_folder(base.images, out, name="mine", source="sim", target="real", **case.kwargs)
            else:
                from_manifest(base.manifest, out, name="mine", source="sim", target="real",
                              declared=load_declared(base.declaration), **case.kwargs)
        stage = "validate"
        rep = validate_benchmark(out)
        if not rep.success:
            return Outcome("validate", rep.summary()), needle
        stage = "prepare"
        prepare(out, tmp / "prepared", progress=False)
    except (DataError, ConfigError) as e:
        return Outcome(stage, str(e)), needle
    except Exception as e:  # noqa: BLE001 - a traceback is exactly what this harness must catch
        return Outcome(stage, f"{type(e).__name__}: {e}", crashed=True), needle
    notes = "; ".join(str(w.message) for w in caught if w.category.__name__ == "IngestWarning")
    return Outcome("accepted", notes, len(read_manifest(out))), needle


def verdict(case: Case, o: Outcome, needle: str | None) -> str:
    """refused (named) / accepted / WRONG: <why>."""
    if o.crashed:
        return f"WRONG: crashed in {o.stage}"
    if case.expect == "refuse":
        if o.stage == "accepted":
            return "WRONG: accepted"
        if needle is not None and needle not in o.message:
            return f"WRONG: refused without naming {needle!r}"
        return "refused (named)"
    if o.stage != "accepted":
        return f"WRONG: refused in {o.stage}"
    if o.n != case.count:
        return f"WRONG: {o.n} samples, expected {case.count}"
    return "accepted"


# -- the cases ---------------------------------------------------------------------------------------------------

def _bytes(data: bytes) -> Callable[[Base], str]:
    def f(b: Base) -> str:
        b.image().write_bytes(data)
        return b.image().name

    return f


def _replace_image(make: Callable[[Path], Any]) -> Callable[[Base], str]:
    def f(b: Base) -> str:
        p = b.image("real", "val", "dog")
        p.unlink()
        make(p)
        return str(p)

    return f


def _add_entry(make: Callable[[Path], Any], name: str) -> Callable[[Base], str]:
    def f(b: Base) -> str:
        p = b.images / "sim" / "train" / "cat" / name
        make(p)
        return name

    return f


def _row(col: str, value: Any, i: int = 3) -> Callable[[Base], str]:
    def f(b: Base) -> str:
        df = b.rows()
        sid = df["id"].iat[i]
        df.loc[i, col] = value
        b.write(df)
        return sid

    return f


def _aux_file(col: str, make: Callable[[Path], Any], i: int = 2) -> Callable[[Base], str]:
    def f(b: Base) -> str:
        p = b.cell(col, i)
        p.unlink()
        make(p)
        return str(b.rows()["id"].iat[i])

    return f


def _tiff(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.float32)).save(path, format="TIFF")


def _depth_values(values: Callable[[np.ndarray], None]) -> Callable[[Base], str]:
    """Replace one depth PNG by a float TIFF with a few bad pixels (a user's float depth export)."""
    def f(b: Base) -> str:
        df = b.rows()
        arr = np.full((SIZE, SIZE), 1.5, np.float32)
        values(arr)
        _tiff(b.root / "depth" / "bad.tif", arr)
        df.loc[2, "depth_path"] = "depth/bad.tif"
        b.write(df)
        return str(df["id"].iat[2])

    return f


def _symlink(target: Callable[[Base], Path], name: str = "link.png") -> Callable[[Base], str]:
    def f(b: Base) -> str:
        (b.images / "sim" / "train" / "cat" / name).symlink_to(target(b))
        return name

    return f


def _drop_col(col: str) -> Callable[[Base], str]:
    def f(b: Base) -> str:
        b.write(b.rows().drop(columns=[col]))
        return col

    return f


def _rng_img(shape: tuple[int, ...], mode: str | None = None) -> Callable[[Path], Any]:
    def f(p: Path) -> Any:
        arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        im = Image.fromarray(arr)
        if mode:
            im = im.convert(mode)
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p, format="JPEG" if mode == "CMYK" else "PNG")

    return f


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rename_all(fn: Callable[[str], str]) -> Callable[[Base], None]:
    def f(b: Base) -> None:
        for p in sorted(b.images.rglob("0.png")):
            p.rename(p.with_name(fn(p.name)))

    return f


def _jpeg_as_png(b: Base) -> None:
    p = b.image()
    arr = np.asarray(Image.open(p))
    p.unlink()
    Image.fromarray(arr).save(p, format="JPEG")


def _bom(b: Base) -> None:
    b.manifest.write_bytes(b"\xef\xbb\xbf" + b.manifest.read_bytes())


def _crlf(b: Base) -> None:
    b.manifest.write_bytes(b.manifest.read_bytes().replace(b"\n", b"\r\n"))


def _hidden(b: Base) -> None:
    d = b.images / "sim" / "train" / "cat"
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (d / "Thumbs.db").write_bytes(b"junk")


def _outside_manifest(b: Base) -> str:
    df = b.rows()
    df.loc[4, "path"] = "../outside/x.png"
    b.write(df)
    return str(df["id"].iat[4])


def _duplicate_image_across_splits(b: Base) -> str:
    shutil.copy(b.image("sim", "train", "cat"), b.image("sim", "test", "cat"))
    return "sim-test-cat"


def _mask_ids(b: Base) -> str:
    df = b.rows()
    _png(b.root / df["mask_path"].iat[5], np.full((SIZE, SIZE), 7, np.uint8))
    return str(df["id"].iat[5])


def _mask_ignore(b: Base) -> None:
    df = b.rows()
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[0] = 255
    _png(b.root / df["mask_path"].iat[5], arr)


def _typo_domain(b: Base) -> str:
    df = b.rows()
    df.loc[7, "domain"] = "reall"
    b.write(df)
    return "reall"


def _garbage_row(b: Base) -> str:
    with b.manifest.open("a") as f:
        f.write("x,y,z,1,2,3,4,5,6,7,8,9\n")
    return b.manifest.name


def _empty_class(b: Base) -> str:
    (b.images / "sim" / "train" / "bird").mkdir()
    return "bird"


def _missing_split(b: Base) -> str:
    shutil.rmtree(b.images / "real" / "val")
    return "'val'"


def _unknown_split_folder(b: Base) -> str:
    (b.images / "real" / "training" / "cat").mkdir(parents=True)
    return "training"


def _stray(b: Base) -> str:
    shutil.copy(b.image(), b.images / "sim" / "stray.png")
    return "stray.png"


def _unknown_class(b: Base) -> str:
    shutil.copytree(b.images / "sim" / "train" / "dog", b.images / "sim" / "train" / "horse")
    return "horse"


def _abs_outside(b: Base) -> str:
    df = b.rows()
    df.loc[4, "path"] = str(b.outside / "x.png")
    b.write(df)
    return str(df["id"].iat[4])


def _mask_outside(b: Base) -> str:
    df = b.rows()
    df.loc[4, "mask_path"] = "../outside/m.png"
    b.write(df)
    return str(df["id"].iat[4])


def _allow_outside(b: Base) -> None:
    df = b.rows()
    df.loc[4, "path"] = "../outside/x.png"
    b.write(df)


def _inside_symlink(b: Base) -> None:
    d = b.images / "sim" / "train" / "cat"
    (b.images / ".store").mkdir()  # hidden folders are not domains
    (d / "0.png").rename(b.images / ".store" / "kept.png")
    (d / "0.png").symlink_to(b.images / ".store" / "kept.png")


def _palette(b: Base) -> None:
    p = b.image("real", "test", "cat")
    Image.open(p).convert("P").save(p)


def _unicode(b: Base) -> None:
    for p in sorted(b.images.rglob("0.png")):
        p.rename(p.with_name("ça va 猫 0.png"))
    df = b.rows()
    df["path"] = df["path"].str.replace("0.png", "ça va 猫 0.png")
    b.write(df)


def _deep16(b: Base) -> str:
    p = b.image("real", "val", "dog")
    _png(p, np.full((SIZE, SIZE), 40000, np.uint16))
    return str(p)


def _all_grey16(b: Base) -> None:
    rng = np.random.default_rng(2)
    for p in sorted(b.images.rglob("0.png")):
        _png(p, rng.integers(0, 65535, (SIZE, SIZE)).astype(np.uint16))


def _grey_then_deep16(b: Base) -> str:
    for p in sorted(b.images.rglob("0.png")):
        _png(p, np.asarray(Image.open(p).convert("L")))
    return _deep16(b)


def _empty_id(b: Base) -> str:
    _row("id", "")(b)
    return "line 5"  # no id to name: the CSV line


def _empty_split(b: Base) -> str:
    df = b.rows()
    b.write(df[~((df["domain"] == "real") & (df["split"] == "test"))])
    return "real/test"


def _truncated(b: Base) -> str:
    data = b.image().read_bytes()
    b.image().write_bytes(data[: len(data) // 2])
    return str(b.image())


def _duplicate_id(b: Base) -> str:
    _row("id", "sim-train-cat")(b)
    return "'sim-train-cat' (line 5)"  # the second occurrence, by id and line


def _depth_invalid_declared(b: Base) -> None:
    _depth_values(lambda a: a.__setitem__((0, slice(None)), -1.0))(b)


CASES: list[Case] = [
    # -- image folder: files
    Case("corrupt image (random bytes)", "folder", _bytes(os.urandom(200))),
    Case("truncated PNG (half its bytes)", "folder", _truncated),
    Case("zero-byte file", "folder", _bytes(b"")),
    Case("text file named .png", "folder", _bytes(b"hello, not an image\n")),
    Case("broken symlink", "folder", _symlink(lambda b: b.root / "gone.png")),
    Case("symlink to a file outside the root", "folder", _symlink(lambda b: b.outside / "x.png")),
    Case("directory named like an image", "folder", _add_entry(lambda p: p.mkdir(), "dir.png")),
    Case("sub-folder inside a class folder", "folder", _add_entry(lambda p: p.mkdir(), "more")),
    Case("non-image file (notes.txt) in a class folder", "folder",
         _add_entry(lambda p: p.write_text("notes"), "notes.txt")),
    Case("unsupported image format (.gif) in a class folder", "folder",
         _add_entry(lambda p: Image.new("P", (SIZE, SIZE)).save(p), "x.gif")),
    Case("16-bit grey PNG among 8-bit RGB", "folder", _deep16),
    Case("16-bit grey PNG among 8-bit grey (channels agree)", "folder", _grey_then_deep16),
    Case("48-bit (16 per channel) RGB PNG", "folder", _replace_image(png48)),
    Case("RGBA image among RGB", "folder", _replace_image(_rng_img((SIZE, SIZE, 4)))),
    Case("grey (L) image among RGB", "folder", _replace_image(_rng_img((SIZE, SIZE)))),
    Case("grey+alpha (LA) image", "folder", _replace_image(_rng_img((SIZE, SIZE, 3), "LA"))),
    Case("CMYK JPEG", "folder", _replace_image(_rng_img((SIZE, SIZE, 3), "CMYK"))),
    Case("image of another size", "folder", _replace_image(_rng_img((SIZE + 2, SIZE, 3)))),
    # -- image folder: layout
    Case("class folder not in the declared classes", "folder", _unknown_class, kwargs={"classes": list(CLASSES)}),
    Case("unknown split folder ('training')", "folder", _unknown_split_folder),
    Case("missing split folder", "folder", _missing_split),
    Case("empty class folder", "folder", _empty_class),
    Case("image outside a class folder", "folder", _stray),
    # -- manifest: rows and columns
    Case("manifest path ../outside/x.png", "manifest", _outside_manifest),
    Case("manifest absolute path outside the root", "manifest", _abs_outside),
    Case("manifest path to a missing file", "manifest", _row("path", "images/sim/train/cat/absent.png")),
    Case("manifest path to a directory", "manifest", _row("path", "images/sim/train")),
    Case("manifest empty path cell", "manifest", _row("path", "")),
    Case("label outside the declared classes", "manifest", _row("label", "bird")),
    Case("negative numeric label", "manifest", _row("label", "-3")),
    Case("label missing on a labelled row", "manifest", _row("label", "")),
    Case("duplicate id", "manifest", _duplicate_id),
    Case("empty id", "manifest", _empty_id),
    Case("unknown split value", "manifest", _row("split", "training")),
    Case("domain typo (a one-row domain)", "manifest", _typo_domain),
    Case("missing column 'domain'", "manifest", _drop_col("domain")),
    Case("missing declared factor column", "manifest", _drop_col("factor_shape")),
    Case("row with extra fields (malformed CSV)", "manifest", _garbage_row),
    Case("same image in train and test (leakage)", "manifest", _duplicate_image_across_splits),
    Case("a domain with an empty split (no real/test rows)", "manifest", _empty_split),
    # -- factors
    Case("discrete factor value 0.5", "manifest", _row("factor_shape", "0.5")),
    Case("discrete factor outside the declared values", "manifest", _row("factor_shape", "2")),
    Case("continuous factor outside the declared range", "manifest", _row("factor_angle", "1.7")),
    Case("continuous factor NaN on a labelled row", "manifest", _row("factor_angle", "nan")),
    Case("continuous factor inf", "manifest", _row("factor_angle", "inf")),
    Case("continuous factor text", "manifest", _row("factor_angle", "left")),
    # -- depth
    Case("depth file missing", "manifest", _row("depth_path", "depth/absent.png")),
    Case("depth file corrupt", "manifest", _aux_file("depth_path", lambda p: p.write_bytes(b"\x89PNG junk"))),
    Case("depth of another size", "manifest",
         _aux_file("depth_path", lambda p: _png(p, np.ones((SIZE, SIZE + 4), np.uint16)))),
    Case("depth with 3 channels", "manifest",
         _aux_file("depth_path", lambda p: _png(p, np.ones((SIZE, SIZE, 3), np.uint8)))),
    Case("negative depth values", "manifest", _depth_values(lambda a: a.__setitem__((0, 0), -0.5))),
    Case("NaN depth values (invalid value is 0)", "manifest",
         _depth_values(lambda a: a.__setitem__((1, 1), np.nan))),
    Case("infinite depth values", "manifest", _depth_values(lambda a: a.__setitem__((2, 2), np.inf))),
    # -- masks
    Case("mask ids outside the declared classes", "manifest", _mask_ids),
    Case("RGB mask (colours, not ids)", "manifest",
         _aux_file("mask_path", lambda p: _png(p, np.zeros((SIZE, SIZE, 3), np.uint8)))),
    Case("mask of another size", "manifest",
         _aux_file("mask_path", lambda p: _png(p, np.zeros((SIZE + 1, SIZE + 1), np.uint8)))),
    Case("mask file corrupt", "manifest", _aux_file("mask_path", lambda p: p.write_bytes(b"nope"))),
    Case("mask path outside the root", "manifest", _mask_outside),
    Case("masks without declared mask classes", "manifest", lambda b: "mask_classes",
         decl={"mask_classes": None}),
    # -- valid controls
    Case("CONTROL the valid base (image folder)", "folder", lambda b: None, "accept"),
    Case("CONTROL the valid base (manifest, continuous factor, depth, masks)", "manifest", lambda b: None, "accept"),
    Case("CONTROL JPEG named .png", "folder", _jpeg_as_png, "accept"),
    Case("CONTROL unicode and spaces in file names", "manifest", _unicode, "accept"),
    Case("CONTROL upper-case extensions (.PNG)", "folder", _rename_all(lambda n: "0.PNG"), "accept"),
    Case("CONTROL UTF-8 BOM in the CSV", "manifest", _bom, "accept"),
    Case("CONTROL Windows line endings in the CSV", "manifest", _crlf, "accept"),
    Case("CONTROL hidden dot-files and Thumbs.db", "folder", _hidden, "accept"),
    Case("CONTROL symlink inside the root", "folder", _inside_symlink, "accept"),
    Case("CONTROL palette (P) PNG among RGB", "folder", _palette, "accept"),
    Case("CONTROL 16-bit images with convert_16bit declared", "folder", _all_grey16, "accept",
         kwargs={"declared": Declared(convert_16bit=True)}),
    Case("CONTROL path outside the root with --allow-outside-root", "manifest", _allow_outside, "accept",
         kwargs={"allow_outside_root": True}),
    Case("CONTROL broken symlink with --skip-bad-files (dropped, warned)", "folder",
         _symlink(lambda b: b.root / "gone.png"), "accept", kwargs={"skip_bad_files": True}, count=N_BASE),
    Case("CONTROL negative depth = the declared invalid value -1", "manifest", _depth_invalid_declared, "accept",
         decl={"depth_invalid": -1.0}),
    Case("CONTROL mask ignore id 255", "manifest", _mask_ignore, "accept"),
]




@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_ingestion_case(case: Case, tmp_path: Path) -> None:
    outcome, needle = run_case(case, tmp_path)
    assert verdict(case, outcome, needle) in ("refused (named)", "accepted"), (outcome, needle)


def test_table_has_enough_cases() -> None:
    defects = [c for c in CASES if c.expect == "refuse"]
    controls = [c for c in CASES if c.expect == "accept"]
    assert len(defects) >= 40 and len(controls) >= 8


def test_cli_flags_declaration_and_outside_root_report(tmp_path: Path) -> None:
    """--declaration / --classes refuse undeclared labels; --allow-outside-root accepts, warns, and validation
    lists the file outside the root."""
    from click.testing import CliRunner

    from s2r.cli import main

    base = build_base(tmp_path)
    _allow_outside(base)
    args = ["data", "import-manifest", str(base.manifest), "--out", str(tmp_path / "b"), "--name", "m",
            "--source", "sim", "--target", "real", "--declaration", str(base.declaration)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "outside the dataset root" in r.output and "id 'sim-test-cat'" in r.output
    assert not (tmp_path / "b").exists()
    r = CliRunner().invoke(main, [*args, "--allow-outside-root"])
    assert r.exit_code == 0 and "warning:" in r.output and "x.png" in r.output, r.output
    rep = validate_benchmark(tmp_path / "b")
    inside = next(x for x in rep.results if x["expectation"] == "expect_files_inside_dataset_root"
                  and x["column"] == "path")
    assert rep.success and inside["unexpected_count"] == 1 and inside["examples"][0]["id"] == "sim-test-cat"
    r = CliRunner().invoke(main, ["data", "import-folder", str(base.images), "--out", str(tmp_path / "f"),
                                  "--name", "f", "--source", "sim", "--target", "real", "--classes", "cat"])
    assert r.exit_code == 2 and "class folder 'dog' is not in the declared classes ['cat']" in r.output


def table(tmp: Path) -> str:
    """The issue's table: every case, the stage that stopped it and its message; counts at the end."""
    lines = ["| # | case | import | expected | s2r did | stage | message (shortened) |",
             "|---|---|---|---|---|---|---|"]
    counts = {"refused (named)": 0, "accepted": 0, "wrong": 0}
    for i, c in enumerate(CASES, 1):
        d = tmp / f"case{i}"
        d.mkdir()
        o, needle = run_case(c, d)
        v = verdict(c, o, needle)
        counts["wrong" if v.startswith("WRONG") else v] += 1
        msg = o.message.replace(str(d), "…").replace("\n", " ").replace("|", "/")
        msg = msg if len(msg) < 150 else msg[:147] + "..."
        lines.append(f"| {i} | {c.name} | {c.mode} | {c.expect} | {v} | {o.stage} | {msg} |")
    lines.append("")
    lines.append(f"refused with a named error: {counts['refused (named)']}; accepted: {counts['accepted']}; "
                 f"wrongly handled: {counts['wrong']} (of {len(CASES)} cases)")
    return "\n".join(lines)


if __name__ == "__main__":  # print the table for the report: python tests/test_ingestion_defects.py
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        print(table(Path(t)))
    sys.exit(0)
