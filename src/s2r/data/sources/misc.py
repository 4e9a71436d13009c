"""Paper 4's CIFAR-DA4 / CIFAR-DA9 (VisDA renders + CIFAR photos) and paper 3's TriFinger robot-finger data.

CIFAR-DA (paper 4, Sections 3.3 and 4.3). The paper's renderer is not public; its synthetic images are
renders of the VisDA-2017 classification 3D models, so this adapter uses the published VisDA-2017
synthetic renders (``train/<class>/*.png``) as the synthetic domain. Real images come from the
official Python pickles of CIFAR-10 and CIFAR-100. Class sources (an assumption where the paper is silent:
"car" and "truck" are not CIFAR-100 classes): airplane/car/horse/truck <- CIFAR-10 airplane, automobile,
horse, truck; bicycle/bus/motorcycle/train <- CIFAR-100 fine classes of those names; person <- CIFAR-100
baby, boy, girl, man, woman. Per class (paper 4, Section 3.3): 500 real train, 50 val and 50 test images.
CIFAR-100 has exactly 500 train and 100 test images per class, so 500 + 50 cannot both come from its train
pickle: by default (`val_from: test`) train is the class's 500 train-pickle images and val / test are the first
and second 50 of its test-pickle images (the paper does not say how it split; this is the only split that fits
CIFAR-100's sizes without dropping training images). `val_from: train` takes val from the train pickle instead
(fits CIFAR-10 classes only; with CIFAR-100 classes it needs `real_train` <= 450). Synthetic images are resized
to CIFAR's 32x32 and split by hash (their val/test splits exist only because every s2r domain has them).

TriFinger (paper 3, Dittadi et al. 2021). The paper describes 1M simulated and 1,809 real annotated images
with 7 factors (Table 1: upper, middle, lower joint 30 values each, cube x and y 30, cube rotation 10, cube
hue 12) but its release format is not given in the paper, so this adapter reads a documented manifest:
``<root>/<domain>/labels.csv`` with a ``file`` column (relative to ``<root>/<domain>/``), one column per
factor holding the value *index* (0..n-1 of Table 1's linear spacing) and an optional ``split`` column.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from s2r.config import SPLITS
from s2r.data.benchmark import BenchmarkSpec, DataError, DomainSpec, Sample, write_benchmark
from s2r.data.sources.common import (
    SourceInfo,
    assign_splits,
    check_fractions,
    check_options,
    layout_error,
    option,
    read_image,
    resize,
)

DA9 = ["airplane", "car", "bicycle", "bus", "horse", "motorcycle", "person", "train", "truck"]
DA4 = ["car", "bicycle", "motorcycle", "train"]
VISDA_NAMES = {"airplane": "aeroplane"}  # s2r class -> VisDA folder when they differ
CIFAR10 = {"airplane": ["airplane"], "car": ["automobile"], "horse": ["horse"], "truck": ["truck"]}
CIFAR100 = {"bicycle": ["bicycle"], "bus": ["bus"], "motorcycle": ["motorcycle"], "train": ["train"],
            "person": ["baby", "boy", "girl", "man", "woman"]}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRIFINGER_FACTORS = {"upper_joint": 30, "middle_joint": 30, "lower_joint": 30, "cube_x": 30, "cube_y": 30,
                     "cube_rotation": 10, "cube_hue": 12}

CIFAR_DA_INFO = SourceInfo(
    name="cifar_da", title="CIFAR-DA4 / CIFAR-DA9 (VisDA-2017 renders + CIFAR-10/100 photos)",
    url="https://ai.bu.edu/visda-2017/ (classification train = synthetic renders) and "
    "https://www.cs.toronto.edu/~kriz/cifar.html (python versions)",
    layout="""visda/train/<class>/*.png            aeroplane, bicycle, bus, car, horse, motorcycle, person, train, truck
cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta
cifar-100-python/train, test, meta""",
    papers=["mixing-ratio-mrgan"], doc="cifar_da",
    options={"variant": "'da4' or 'da9' [da4]", "real_train": "real train images per class [500]",
             "real_val": "[50]", "real_test": "[50]",
             "val_from": "'test' (val = test pickle images before the test ones) or 'train' [test]",
             "synthetic_per_class": "at most this many renders per class [all]",
             "image_size": "[32]", "seed": "[0]"},
)
TRIFINGER_INFO = SourceInfo(
    name="trifinger", title="TriFinger robot-finger disentanglement dataset (paper 3)",
    url="the dataset of Dittadi et al., 'On the transfer of disentangled representations in realistic settings' "
    "(ICLR 2021); convert it to the manifest below",
    layout="""<domain>/labels.csv      columns: file, upper_joint, middle_joint, lower_joint, cube_x, cube_y,
                         cube_rotation, cube_hue (value indices, Table 1), optional split (train/val/test)
<domain>/<file>          the images (one domain folder per sim / real)""",
    papers=["disentanglement-transfer-ood"], doc="trifinger",
    options={"source": "[sim]", "target": "[real]", "fractions": "when no split column [0.8/0.1/0.1]",
             "image_size": "[128, the paper's resolution]", "seed": "[0]"},
)


def _unpickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise DataError(f"{path}: file not found (CIFAR python version)")
    try:
        with open(path, "rb") as f:
            batch: dict[bytes, Any] = pickle.load(f, encoding="bytes")  # noqa: S301 - the user's own CIFAR download
            return batch
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable CIFAR pickle: {e}") from e


def _cifar_images(d: dict[bytes, Any], path: Path, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in d or key not in d:
        raise DataError(f"{path}: CIFAR pickle without {'data'!r} / {key.decode()!r}")
    data = np.asarray(d[b"data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' is {data.shape}; expected (N, 3072)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(d[key])  # (N, 3072) -> (N, 32, 32, 3)


def build_cifar_da(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """CIFAR-DA4/9: synthetic (VisDA renders) and real (CIFAR) domains, classification."""
    check_options(options, CIFAR_DA_INFO.options, "cifar_da")
    variant = option(options, "variant", "da4", str)
    if variant not in ("da4", "da9"):
        raise DataError(f"option 'variant': {variant!r} must be 'da4' or 'da9'")
    classes = DA4 if variant == "da4" else DA9
    n = {s: int(option(options, f"real_{s}", d, int)) for s, d in (("train", 500), ("val", 50), ("test", 50))}
    val_from = option(options, "val_from", "test", str)
    if val_from not in ("test", "train"):
        raise DataError(f"option 'val_from': {val_from!r} must be 'test' or 'train'")
    need = {"train": n["train"] + (n["val"] if val_from == "train" else 0),
            "test": n["test"] + (n["val"] if val_from == "test" else 0)}
    syn_max = option(options, "synthetic_per_class", None, int)
    size = int(option(options, "image_size", 32, int))
    seed = int(option(options, "seed", 0, int))
    c10, c100, visda = src / "cifar-10-batches-py", src / "cifar-100-python", src / "visda" / "train"
    for p in (c10, c100, visda):
        if not p.is_dir():
            raise layout_error(CIFAR_DA_INFO, src, f"missing folder {p.relative_to(src)}")
    pools = _cifar_pools(c10, c100, classes)
    for c in classes:
        if len(pools[c]["train"]) < need["train"] or len(pools[c]["test"]) < need["test"]:
            raise DataError(f"{src}: CIFAR has {len(pools[c]['train'])} train / {len(pools[c]['test'])} test images "
                            f"of class {c!r}; need {need['train']} / {need['test']} (real_train {n['train']}, "
                            f"real_val {n['val']} from the {val_from} pickle, real_test {n['test']})")
    syn = _visda_renders(src, visda, classes, syn_max, seed)
    spec = BenchmarkSpec(
        name=name, tasks=["classification"], source="synthetic", target="real", image_size=size, channels=3,
        domains=[DomainSpec("synthetic", "source", "VisDA-2017 synthetic renders"),
                 DomainSpec("real", "target", "CIFAR-10/100 photographs")],
        classes=list(classes), dataset="cifar_da", description=f"CIFAR-{variant.upper()} from {src}",
        expectations={"domain_rows": {"real": len(classes) * sum(n.values())}},
    )

    def samples() -> Iterator[Sample]:
        for split, p, k in syn:
            yield Sample(id=f"syn-{classes[k]}-{p.stem}", domain="synthetic", split=split,
                         image=resize(read_image(p, "RGB"), size), label=k)
        for k, c in enumerate(classes):
            train, test = pools[c]["train"], pools[c]["test"]
            if val_from == "test":  # val = the first real_val test-pickle images, test = the next real_test
                parts = {"train": train[: n["train"]], "val": test[: n["val"]],
                         "test": test[n["val"] : n["val"] + n["test"]]}
            else:
                parts = {"train": train[: n["train"]], "val": train[n["train"] : n["train"] + n["val"]],
                         "test": test[: n["test"]]}
            for split in SPLITS:
                for j, im in enumerate(parts[split]):
                    yield Sample(id=f"real-{c}-{split}-{j}", domain="real", split=split, image=resize(im, size),
                                 label=k)

    return write_benchmark(out, spec, samples())


def _cifar_pools(c10: Path, c100: Path, classes: list[str]) -> dict[str, dict[str, list[np.ndarray]]]:
    """class -> {"train", "test"} -> the CIFAR-10/100 images of its CIFAR classes (pickle order)."""
    pools: dict[str, dict[str, list[np.ndarray]]] = {c: {"train": [], "test": []} for c in classes}
    tr10 = [_cifar_images(_unpickle(c10 / f"data_batch_{i}"), c10 / f"data_batch_{i}", b"labels") for i in range(1, 6)]
    te10 = _cifar_images(_unpickle(c10 / "test_batch"), c10 / "test_batch", b"labels")
    meta100 = _unpickle(c100 / "meta")
    fine = [s.decode() for s in meta100.get(b"fine_label_names", [])]
    if not fine:
        raise DataError(f"{c100 / 'meta'}: no 'fine_label_names'")
    tr100 = _cifar_images(_unpickle(c100 / "train"), c100 / "train", b"fine_labels")
    te100 = _cifar_images(_unpickle(c100 / "test"), c100 / "test", b"fine_labels")
    for c in classes:
        if c in CIFAR10:
            ids = [CIFAR10_NAMES.index(x) for x in CIFAR10[c]]
            pools[c]["train"] = [im for imgs, lab in tr10 for im, y in zip(imgs, lab) if y in ids]
            pools[c]["test"] = [im for im, y in zip(*te10) if y in ids]
        else:
            missing = [x for x in CIFAR100[c] if x not in fine]
            if missing:
                raise DataError(f"{c100 / 'meta'}: fine classes {missing} not found")
            ids = [fine.index(x) for x in CIFAR100[c]]
            pools[c]["train"] = [im for im, y in zip(*tr100) if y in ids]
            pools[c]["test"] = [im for im, y in zip(*te100) if y in ids]
    return pools


def _visda_renders(src: Path, visda: Path, classes: list[str], syn_max: int | None, seed: int
                   ) -> list[tuple[str, Path, int]]:
    """(split, file, class index) of the VisDA renders of every class (at most `syn_max`, evenly thinned)."""
    syn: list[tuple[str, Path, int]] = []
    for k, c in enumerate(classes):
        folder = visda / VISDA_NAMES.get(c, c)
        fs = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not fs:
            raise layout_error(CIFAR_DA_INFO, src, f"no renders in {folder}")
        if syn_max is not None and len(fs) > syn_max:
            fs = fs[:: -(-len(fs) // syn_max)][:syn_max]
        sp = assign_splits([p.name for p in fs], {"train": 0.9, "val": 0.05, "test": 0.05}, seed)
        syn += [(sp[p.name], p, k) for p in fs]
    return syn


def build_trifinger(src: Path, out: Path, name: str, options: dict[str, Any]) -> Path:
    """TriFinger manifest (per-domain labels.csv with factor indices) -> a factors benchmark."""
    import pandas as pd

    check_options(options, TRIFINGER_INFO.options, "trifinger")
    source, target = option(options, "source", "sim", str), option(options, "target", "real", str)
    fractions = check_fractions(option(options, "fractions", {"train": 0.8, "val": 0.1, "test": 0.1}, dict))
    size = int(option(options, "image_size", 128, int))
    seed = int(option(options, "seed", 0, int))
    domains = sorted(d.name for d in src.iterdir() if (d / "labels.csv").is_file()) if src.is_dir() else []
    for d in (source, target):
        if d not in domains:
            raise layout_error(TRIFINGER_INFO, src, f"no {d}/labels.csv")
    records = []
    for d in domains:
        csv = src / d / "labels.csv"
        hashed: dict[str, str] = {}
        try:
            df = pd.read_csv(csv)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{csv}: cannot read: {e}") from e
        missing = [c for c in ["file", *TRIFINGER_FACTORS] if c not in df.columns]
        if missing:
            raise DataError(f"{csv}: missing column(s) {missing}")
        for i, r in df.iterrows():
            fac = {}
            for k, nv in TRIFINGER_FACTORS.items():
                v = r[k]
                if pd.isna(v) or float(v) != int(v) or not 0 <= int(v) < nv:
                    raise DataError(f"{csv}: row {i}: {k} = {v!r} is not a value index 0..{nv - 1} (Table 1)")
                fac[k] = int(v)
            if "split" not in df.columns and not hashed:
                hashed = assign_splits([str(x) for x in df["file"]], fractions, seed)
            split = str(r["split"]) if "split" in df.columns else hashed[str(r["file"])]
            if split not in SPLITS:
                raise DataError(f"{csv}: row {i}: split {split!r} not in {list(SPLITS)}")
            records.append((d, split, src / d / str(r["file"]), fac, int(i)))
    spec = BenchmarkSpec(
        name=name, tasks=["factors"], source=source, target=target, image_size=size, channels=3,
        domains=[DomainSpec(d, "source" if d == source else "target" if d == target else "auxiliary",
                            f"TriFinger {d}") for d in domains],
        factors=dict(TRIFINGER_FACTORS), dataset="trifinger", description=f"TriFinger manifest from {src}",
    )

    def samples() -> Iterator[Sample]:
        for d, split, f, fac, i in records:
            yield Sample(id=f"{d}-{i:07d}", domain=d, split=split, image=resize(read_image(f, "RGB"), size),
                         factors=fac)

    return write_benchmark(out, spec, samples())


# ----------------------------------------------------------------------------------------------------------
# fixtures


CIFAR10_COUNTS = (5000, 1000)  # real images per class in CIFAR-10's train / test pickles
CIFAR100_COUNTS = (500, 100)  # ... and in CIFAR-100's (the binding sizes for CIFAR-DA)


def cifar_da_fixture(root: Path, counts10: tuple[int, int] = CIFAR10_COUNTS,
                     counts100: tuple[int, int] = CIFAR100_COUNTS, renders: int = 12) -> Path:
    """CIFAR-10/100 pickles (the official dict keys) at the real per-class counts, and a VisDA train/<class>/ folder.

    Only the classes CIFAR-DA reads get images (CIFAR-10: airplane, automobile, horse, truck; CIFAR-100: the nine
    fine classes), each at the real dataset's per-class count, so a recipe that asks for more than the real data
    holds fails on the stand-in as it would on the download. Images are noise.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    c10 = root / "cifar-10-batches-py"
    c100 = root / "cifar-100-python"
    c10.mkdir(parents=True, exist_ok=True)
    c100.mkdir(parents=True, exist_ok=True)

    def dump(path: Path, labels: list[int], key: bytes) -> None:
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(path, "wb") as f:
            pickle.dump({b"data": data, key: labels}, f)

    used10 = [CIFAR10_NAMES.index(x) for c in CIFAR10 for x in CIFAR10[c]]
    for i in range(1, 6):  # the train images of each class spread over the five batches, as in the release
        dump(c10 / f"data_batch_{i}", [y for y in used10 for _ in range(counts10[0] // 5)], b"labels")
    dump(c10 / "test_batch", [y for y in used10 for _ in range(counts10[1])], b"labels")
    fine = [f"class{k}" for k in range(100)]
    for k, nm in enumerate(["bicycle", "bus", "motorcycle", "train", "baby", "boy", "girl", "man", "woman"]):
        fine[8 + k * 9] = nm
    with open(c100 / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [s.encode() for s in fine]}, f)
    wanted = [fine.index(x) for x in ["bicycle", "bus", "motorcycle", "train", "baby", "boy", "girl", "man", "woman"]]
    dump(c100 / "train", [y for _ in range(counts100[0]) for y in wanted], b"fine_labels")
    dump(c100 / "test", [y for _ in range(counts100[1]) for y in wanted], b"fine_labels")
    for c in DA9:
        d = root / "visda" / "train" / VISDA_NAMES.get(c, c)
        d.mkdir(parents=True, exist_ok=True)
        for j in range(renders):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{c}_{j:04d}.png")
    return root


def trifinger_fixture(root: Path, n: int = 24) -> Path:
    """sim/ and real/ folders with labels.csv (factor indices; real has an explicit split column)."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("sim", "real"):
        (root / d / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            f = f"images/{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / d / f)
            row = {"file": f, **{k: int((i * 7 + j) % nv) for j, (k, nv) in enumerate(TRIFINGER_FACTORS.items())}}
            if d == "real":
                row["split"] = SPLITS[i % 3]
            rows.append(row)
        pd.DataFrame(rows).to_csv(root / d / "labels.csv", index=False)
    return root
