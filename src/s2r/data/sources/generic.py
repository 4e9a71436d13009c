"""Your own data without code: a dataset declaration ``dataset.yaml`` in your folder, and merging benchmarks.

Dataset declaration (``<your folder>/dataset.yaml``; docs/datasets/generic.md)::

    task: classification           # classification | factors
    source: synthetic              # the domain you train on
    target: real                   # the domain you care about
    channels: 3                    # optional: 1 or 3 (default: what the files hold)
    image_size: 64                 # optional: prepare resizes every image to 64x64
    classes: [cat, dog]            # optional: label order (default: sorted class names found)
    class_map: {kitty: cat, puppy: dog, junk: null}   # optional: folder/label name -> class (null drops it)
    factors: {shape: 3, size: 2}   # factors task: factor -> number of values (manifest columns factor_<name>)
    domains:
      synthetic:
        path: renders              # relative to this file
        layout: "{split}/{class}/*.png"   # {split} and {class} are folder names; * globs
        labelled: true
      real:
        path: photos
        layout: "{class}/*.jpg"
        splits: {train: 0.6, val: 0.2, test: 0.2}   # when the layout has no {split}: a stable hash per file
        labelled: false            # labels of this domain must not be used for training
      extra:
        manifest: extra.csv        # columns path[, split][, label][, factor_<name>...][, depth_path, mask_path]

    Optional data keys (those of a ``s2r data import-* --declaration`` file, adapters.DATA_KEYS): factor_ranges
    ({factor: [low, high]}: continuous factors), depth_scale (file value per metre), depth_invalid (file value of
    "no depth", .nan ok),
    mask_classes (mask id i = name i), mask_ignore (255), convert_16bit (accept 16-bit images), and
    allow_outside_root / skip_bad_files (the CLI flags). A layout domain finds depth / masks with templates
    ``depth: "depth/{split}/{stem}.png"`` (``{split}``, ``{class}``, ``{stem}``, ``{name}``; relative to its path).

Files stay where they are (absolute paths in the manifest, like ``s2r data import-folder``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from s2r.config import SPLITS
from s2r.data import adapters
from s2r.data.adapters import _finish, _Record
from s2r.data.benchmark import NO_LABEL, BenchmarkSpec, DataError, read_manifest, resolve_path, staged_dir
from s2r.data.sources.common import assign_splits, check_fractions
from s2r.files import JsonDict

DATASET_KEYS = {"name", "task", "source", "target", "channels", "image_size", "classes", "class_map", "factors",
                    "domains", "description", "factor_ranges", "depth_scale", "depth_invalid", "mask_classes",
                    "mask_ignore", "convert_16bit", "allow_outside_root", "skip_bad_files"}
DOMAIN_KEYS = {"path", "layout", "splits", "labelled", "manifest", "seed", "depth", "mask"}
TASKS = ("classification", "factors", "depth", "segmentation")


def dataset_file(src: Path) -> Path:
    """The dataset declaration of a folder (`<src>/dataset.yaml`, or `src` itself when it is a file); a folder holding
    a benchmark.yaml instead is an error saying what that file is and which command reads it."""
    if not src.is_dir():
        return src
    decl = src / adapters.DATASET_FILE
    old = src / "benchmark.yaml"
    if not decl.is_file() and old.is_file():
        import yaml

        try:
            raw = yaml.safe_load(old.read_text())
        except yaml.YAMLError as e:
            raise DataError(f"{old}: not valid YAML: {e}") from e
        if isinstance(raw, dict) and adapters.wrong_file(raw, old, "dataset"):
            raise DataError(f"{src} is already an s2r benchmark ({old} was written by s2r): prepare it with "
                            f"`s2r data prepare {src}`; `s2r data add` reads a {adapters.DATASET_FILE}")
        raise DataError(f"{old}: a dataset declaration for `s2r data add` is called {adapters.DATASET_FILE} "
                        "(benchmark.yaml is the description s2r writes into a benchmark): rename it")
    return decl


def load_declaration(path: Path) -> dict[str, Any]:
    """Read and check a dataset declaration; unknown keys and wrong types name the key and the file, and a
    `--declaration` file or a benchmark.yaml given instead says which command takes it."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: no dataset declaration (docs/datasets/generic.md)") from e
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{path}: must be a mapping")
    other = adapters.wrong_file(raw, path, "dataset")
    if other:
        raise DataError(other)
    if set(raw) <= set(adapters.DATA_KEYS):
        raise DataError(f"{path}: holds only data keys {sorted(raw)}: that is a `--declaration` file of "
                        f"`s2r data import-folder / import-manifest`; a {adapters.DATASET_FILE} for `s2r data add` "
                        "also needs task, source, target and domains (docs/datasets/generic.md)")
    bad = sorted(set(raw) - DATASET_KEYS)
    if bad:
        raise DataError(f"{path}: unknown key {bad[0]!r} (allowed: {sorted(DATASET_KEYS)})")
    for k in ("task", "source", "target", "domains"):
        if k not in raw:
            raise DataError(f"{path}: missing key {k!r}")
    if raw["task"] not in TASKS:
        raise DataError(f"{path}: key 'task': {raw['task']!r} must be one of {list(TASKS)}")
    if not isinstance(raw["domains"], dict) or not raw["domains"]:
        raise DataError(f"{path}: key 'domains' must map domain names to their files")
    for d, spec in raw["domains"].items():
        if not isinstance(spec, dict):
            raise DataError(f"{path}: key 'domains.{d}' must be a mapping")
        bad = sorted(set(spec) - DOMAIN_KEYS)
        if bad:
            raise DataError(f"{path}: unknown key 'domains.{d}.{bad[0]}' (allowed: {sorted(DOMAIN_KEYS)})")
        if ("layout" in spec) == ("manifest" in spec):
            raise DataError(f"{path}: domain {d!r} needs exactly one of 'layout' (with 'path') or 'manifest'")
    return raw


def _layout_regex(layout: str) -> tuple[str, re.Pattern[str]]:
    """'{split}/{class}/*.png' -> (glob '*/*/*.png', regex with named groups)."""
    glob = re.sub(r"\{(split|class)\}", "*", layout)
    rx = re.escape(layout).replace(r"\{split\}", r"(?P<split>[^/]+)").replace(r"\{class\}", r"(?P<cls>[^/]+)")
    rx = rx.replace(r"\*\*", ".*").replace(r"\*", r"[^/]*").replace(r"\?", ".")
    return glob, re.compile(f"^{rx}$")


Found = tuple[list[_Record], list[str | None]]  # the samples of one domain and their raw class names


def build(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """A folder with a dataset declaration (dataset.yaml) -> a benchmark (files referenced in place)."""
    if options:
        raise DataError(f"the generic declaration takes no -o options (got {sorted(options)}); edit "
                        f"{adapters.DATASET_FILE}")
    decl_file = dataset_file(src)
    decl = load_declaration(decl_file)
    base = decl_file.parent
    declared = adapters.declared_from_dict({k: decl[k] for k in adapters.DATA_KEYS if k in decl}, str(decl_file))
    cmap: dict[str, Any] = dict(decl.get("class_map") or {})
    factors: dict[str, int] = dict(decl.get("factors") or {})
    records: list[_Record] = []
    raw_labels: list[str | None] = []
    for d, ds in decl["domains"].items():
        fractions = check_fractions(ds.get("splits", {"train": 0.8, "val": 0.1, "test": 0.1}), f"domains.{d}.splits")
        if "layout" in ds:
            found = _from_layout(decl_file, d, ds, fractions, cmap, bool(decl.get("skip_bad_files", False)))
        else:
            found = _from_manifest(base / str(ds["manifest"]), d, ds, fractions, cmap, factors,
                                   declared.factor_ranges)
        for r in found[0]:
            r.id = f"{d}-{len(records)}"  # ids number the samples of all domains in order
            records.append(r)
        raw_labels += found[1]
    declared.classes = _label(records, raw_labels, decl) if decl["task"] == "classification" else []
    declared.factors = factors
    unlabelled = [d for d, s in decl["domains"].items() if not s.get("labelled", True)]
    return _finish(records, out, name=name, source=decl["source"], target=decl["target"], decl=declared,
                   unlabelled=unlabelled, description=str(decl.get("description", f"declared in {decl_file}")),
                   data_root=base, allow_outside_root=bool(decl.get("allow_outside_root", False)),
                   skip_bad_files=bool(decl.get("skip_bad_files", False)))


def _from_layout(decl_file: Path, d: str, ds: JsonDict, fractions: dict[str, float], cmap: dict[str, Any],
                 skip_bad: bool) -> Found:
    """Domain `d` declared by a folder `layout` ("{split}/{class}/*.png"); splits hashed where the layout has none."""
    root = decl_file.parent / str(ds.get("path", "."))
    glob, rx = _layout_regex(str(ds["layout"]))
    if not root.is_dir():
        raise DataError(f"{decl_file}: domains.{d}.path {root} is not a folder")
    matched = sorted(p for p in root.glob(glob) if not p.name.startswith("."))
    bad = [(p, adapters._entry_problem(p)) for p in matched if p.is_symlink() and not p.exists()
           or p.is_dir() and p.suffix.lower() in adapters.IMAGE_SUFFIXES]
    adapters._bad_entries([(p, str(why)) for p, why in bad], skip_bad)
    found = [p for p in matched if p.is_file()]
    if not found:
        raise DataError(f"{decl_file}: domains.{d}: no files match {root}/{ds['layout']}")
    hashed = assign_splits([f"{d}:{f.relative_to(root).as_posix()}" for f in found], fractions, int(ds.get("seed", 0)))
    records: list[_Record] = []
    labels: list[str | None] = []
    for f in found:
        m = rx.match(f.relative_to(root).as_posix())
        if m is None:
            continue
        gd = m.groupdict()
        split = gd.get("split") or hashed[f"{d}:{f.relative_to(root).as_posix()}"]
        if split not in SPLITS:
            raise DataError(f"{f}: split folder {split!r} not in {list(SPLITS)}")
        cls = gd.get("cls")
        if cls is not None and cls in cmap and cmap[cls] is None:
            continue
        aux = {kind: Path(os.path.abspath(root / str(ds[kind]).format(  # e.g. depth: "depth/{split}/{stem}.png"
            split=gd.get("split") or "", stem=f.stem, name=f.name, **{"class": cls or ""})))
            for kind in ("depth", "mask") if kind in ds}
        records.append(_Record("", d, split, Path(os.path.abspath(f)), f"file {f}", depth=aux.get("depth"),
                               mask=aux.get("mask")))
        labels.append(cmap.get(cls, cls) if cls is not None else None)
    return records, labels


def _from_manifest(man: Path, d: str, ds: JsonDict, fractions: dict[str, float], cmap: dict[str, Any],
                   factors: dict[str, int], ranges: dict[str, list[float]]) -> Found:
    """Domain `d` declared by a manifest CSV/Parquet (path[, split, id, label, factor_*, depth_path, mask_path])."""
    df = adapters._read_table(man)
    if "path" not in df.columns:
        raise DataError(f"{man}: missing column 'path'")
    hashed = assign_splits([f"{d}:{x}" for x in df["path"]], fractions, int(ds.get("seed", 0)))
    records: list[_Record] = []
    labels: list[str | None] = []
    for i, r in df.iterrows():
        f = resolve_path(man.parent, str(r["path"]))
        at = f"{man} id {str(r['id'])!r} (row {i})" if "id" in df.columns else f"{man} row {i}"
        split = str(r["split"]) if "split" in df.columns else hashed[f"{d}:{r['path']}"]
        if split not in SPLITS:
            raise DataError(f"{at}: split {split!r} not in {list(SPLITS)}")
        lab = r.get("label") if "label" in df.columns else None
        lab = None if lab is None or adapters._missing(lab) else str(lab)
        if lab is not None and lab in cmap and cmap[lab] is None:
            continue
        fac = {k: _factor(r, df.columns, k, n, ranges, man, at) for k, n in factors.items()}
        aux = {kind: Path(os.path.abspath(resolve_path(man.parent, str(r[f"{kind}_path"]))))
               for kind in ("depth", "mask") if f"{kind}_path" in df.columns
               and not adapters._missing(r[f"{kind}_path"]) and str(r[f"{kind}_path"]).strip()}
        records.append(_Record("", d, split, Path(os.path.abspath(f)), f"{at} (file {f})", factors=fac,
                               depth=aux.get("depth"), mask=aux.get("mask")))
        labels.append(cmap.get(lab, lab) if lab is not None else None)
    return records, labels


def _factor(r: Any, columns: Any, k: str, n: int, ranges: dict[str, list[float]], man: Path, at: str) -> Any:
    """Factor `k` of manifest row `r`: a value in the declared range (continuous) or an integer in 0..n-1."""
    col = f"factor_{k}"
    if col not in columns:
        raise DataError(f"{man}: missing column {col!r} (key 'factors' declares {k!r})")
    v = r[col]
    if k in ranges:  # continuous: finite and inside the declared [low, high]
        value = None if adapters._missing(v) else _number(v, f"{at}: {col}")
        lo, hi = ranges[k]
        if value is not None and not float(lo) <= value <= float(hi):
            raise DataError(f"{at}: {col} = {v} outside the declared range [{lo}, {hi}]")
        return value
    if not adapters._missing(v) and not float(_number(v, f"{at}: {col}")).is_integer():
        raise DataError(f"{at}: {col} = {v} is not an integer; declare factor_ranges.{k} for a continuous factor")
    level = NO_LABEL if adapters._missing(v) else int(float(v))
    if level != NO_LABEL and not 0 <= level < n:
        raise DataError(f"{at}: {col} = {v} outside 0..{n - 1}")
    return level


def _label(records: list[_Record], raw_labels: list[str | None], decl: JsonDict) -> list[str]:
    """The class list (declared, or the sorted names found) and every record's label index."""
    classes = [str(c) for c in decl.get("classes") or sorted({lb for lb in raw_labels if lb is not None})]
    index = {c: k for k, c in enumerate(classes)}
    for r, lb in zip(records, raw_labels):
        if lb is None:
            continue
        if str(lb) not in index:
            raise DataError(f"{r.where}: class {lb!r} is not in classes {classes} (add it or map it in class_map)")
        r.label = index[str(lb)]
    return classes


def _number(v: Any, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise DataError(f"{where} = {v!r} is not a number") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise DataError(f"{where} = {v!r} is not finite")
    return f


Part = tuple[Path, BenchmarkSpec, Any]  # a benchmark folder, its spec and its manifest (pandas)
SHARED_KEYS = ("classes", "seg_classes", "factors", "channels", "has_depth", "has_mask", "depth_scale",
               "mirror_classes", "class_parts")  # what merged benchmarks must agree on


def merge(parts: list[Path], out: Path, *, name: str, source: str, target: str,
          image_size: int | None = None) -> Path:
    """One benchmark from several (e.g. SVIRO + TICaM, VKITTI 2 + KITTI): domains side by side, same task.

    Class lists, segmentation classes, factors, channels, depth scale and which of depth/masks exist must
    agree; domain names must be distinct. Files are not copied: manifest paths point at the parts' files,
    relative to `out` (so the parts must stay beside it, as DVC stage outputs under data/benchmarks do).
    """
    if len(parts) < 2:
        raise DataError("merge needs at least two benchmarks")
    loaded = [(Path(p), BenchmarkSpec.load(Path(p) / "benchmark.yaml"), read_manifest(Path(p))) for p in parts]
    _check_mergeable(loaded, source, target)
    size = image_size or max(spec.image_size for _, spec, _ in loaded)
    merged = _merged_spec(loaded, name=name, source=source, target=target, size=size)
    manifest = _merged_manifest(loaded, out)
    with staged_dir(out) as tmp:
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        merged.save(tmp / "benchmark.yaml")
    return out


def _check_mergeable(loaded: list[Part], source: str, target: str) -> None:
    """The parts agree on SHARED_KEYS, their domain names are distinct, source and target are among them."""
    first = loaded[0][1]
    mine = asdict(first)
    for p, spec, _ in loaded[1:]:
        theirs = asdict(spec)
        for key in SHARED_KEYS:
            if theirs[key] != mine[key]:
                raise DataError(f"{p}: {key} = {theirs[key]!r} differs from {loaded[0][0]}'s {mine[key]!r}; merged "
                                "benchmarks must share them")
    names = [d.name for _, spec, _ in loaded for d in spec.domains]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"domain {dup[0]!r} appears in more than one benchmark; rename it (adapter option 'domain')")
    for key, v in (("source", source), ("target", target)):
        if v not in names:
            raise DataError(f"{key} {v!r} is not a domain of the merged benchmarks {names}")
    wide = [str(p) for p, spec, _ in loaded if spec.image_height]
    if wide:
        raise DataError(f"{wide[0]}: non-square frames (image_height) cannot be merged yet; build the parts square")


def _merged_manifest(loaded: list[Part], out: Path) -> Any:
    """The parts' manifests one after another: disjoint scene ids, paths relative to `out`, unique ids."""
    import pandas as pd

    frames = []
    offset = 0
    for p, _, df in loaded:
        df = df.copy()
        if "scene_id" in df.columns:  # scenes of different datasets are different scenes: keep their ids disjoint
            sc = pd.to_numeric(df["scene_id"], errors="coerce")
            ok = sc.notna() & (sc >= 0)
            if ok.any():
                df.loc[ok, "scene_id"] = sc[ok] + offset
                offset = int(sc[ok].max()) + offset + 1
        for col in ("path", "depth_path", "mask_path"):
            if col in df.columns:
                df[col] = [os.path.relpath(os.path.abspath(resolve_path(p, v)), os.path.abspath(out))
                           if isinstance(v, str) else v for v in df[col]]
        frames.append(df)
    manifest = pd.concat(frames, ignore_index=True)
    if not manifest["id"].is_unique:
        manifest["id"] = manifest["domain"].astype(str) + "/" + manifest["id"].astype(str)
    for col in ("scene_id", "variation"):
        if col in manifest.columns:
            manifest[col] = manifest[col].astype("Int64")
    return manifest


def _merged_spec(loaded: list[Part], *, name: str, source: str, target: str, size: int) -> BenchmarkSpec:
    """The first part's spec with the union of tasks, domains (roles reassigned), expectations and roots."""
    from dataclasses import replace

    exp: dict[str, Any] = {}
    for _, spec, _ in loaded:
        for k, v in spec.expectations.items():
            if k == "domain_rows":
                exp.setdefault(k, {}).update(v)
            elif k == "mask_values":
                exp[k] = sorted(set(exp.get(k, [])) | set(v))
            elif k == "max_depth_m":
                exp[k] = max(exp.get(k, 0.0), float(v))
    # the merged files live in the parts' roots: containment is checked against their common folder
    roots = [os.path.abspath(spec.data_root or p) for p, spec, _ in loaded]
    order = ("classification", "factors", "depth", "segmentation")
    merged = replace(
        loaded[0][1], name=name, source=source, target=target, image_size=size,
        resize=any(spec.image_size != size or spec.resize for _, spec, _ in loaded),
        tasks=sorted({t for _, spec, _ in loaded for t in spec.tasks}, key=order.index),
        domains=[replace(d, role="source" if d.name == source else "target" if d.name == target else "auxiliary")
                 for _, spec, _ in loaded for d in spec.domains],
        dataset="+".join(spec.dataset or spec.name for _, spec, _ in loaded), expectations=exp,
        data_root=str(Path(os.path.commonpath(roots)).resolve()),
        allow_outside_root=any(spec.allow_outside_root for _, spec, _ in loaded),
        description="merged: " + "; ".join(f"{spec.name} ({p})" for p, spec, _ in loaded),
    )
    merged.validate()
    return merged
