"""Adapters for user data: image folders and manifest CSV/Parquet become benchmarks that validate; bad input
raises DataError naming the file or row, and never touches an existing output."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from s2r.data.adapters import from_image_folder, from_manifest
from s2r.data.benchmark import MANIFEST_COLUMNS, NO_LABEL, SPLITS, DataError, load_benchmark
from s2r.data.validation import validate_benchmark

CLASSES = ("cat", "dog")
PER_CLASS = 2


def _png(path: Path, rng: np.random.Generator, shape: tuple[int, ...] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """src/<domain>/<split>/<class>/<k>.png, 8x8 grey, distinct random pixels."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for d in ("sim", "real"):
        for s in SPLITS:
            for c in CLASSES:
                for k in range(PER_CLASS):
                    _png(src / d / s / c / f"{k}.png", rng)
    return src


@pytest.fixture
def csv_manifest(folder: Path) -> Path:
    """A user CSV next to the images: relative paths, class names as labels, no ids."""
    rows = [
        {
            "path": str(p.relative_to(folder)),
            "domain": p.parts[-4],
            "split": p.parts[-3],
            "label": p.parts[-2],
        }
        for p in sorted(folder.rglob("*.png"))
    ]
    path = folder / "user.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------------------
# image folder


def test_image_folder_to_valid_benchmark(folder: Path, tmp_path: Path) -> None:
    out = from_image_folder(folder, tmp_path / "bench", name="pets", source="sim", target="real")
    spec, df = load_benchmark(out)
    assert spec.classes == list(CLASSES) and spec.image_size == 8 and spec.channels == 1
    assert (spec.source, spec.target) == ("sim", "real") and spec.tasks == ["classification"]
    assert {d.name: d.role for d in spec.domains} == {"sim": "source", "real": "target"}
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS) and "label" in df.columns
    assert len(df) == 2 * len(SPLITS) * len(CLASSES) * PER_CLASS and df["id"].is_unique
    # files stay in place: absolute paths into src, labels from the class folder, checksums of the files
    assert not (out / "images").exists()
    for _, r in df.iterrows():
        p = Path(r["path"])
        assert p.is_absolute() and folder in p.parents
        assert CLASSES[r["label"]] == p.parent.name and (r["domain"], r["split"]) == (
            p.parts[-4],
            p.parts[-3],
        )
        assert r["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    rep = validate_benchmark(out)
    assert rep.success, rep.summary()


def test_image_folder_unlabelled_domain(folder: Path, tmp_path: Path) -> None:
    out = from_image_folder(
        folder, tmp_path / "b", name="pets", source="sim", target="real", unlabelled=["real"]
    )
    spec, _ = load_benchmark(out)
    assert {d.name: d.labelled for d in spec.domains} == {"sim": True, "real": False}


def test_image_folder_corrupt_image(folder: Path, tmp_path: Path) -> None:
    bad = folder / "real" / "val" / "dog" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut: only a full decode notices
    Image.open(bad).close()
    with pytest.raises(DataError, match="corrupt") as e:
        from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="real")
    assert str(bad) in str(e.value)


def test_image_folder_inconsistent_channels(folder: Path, tmp_path: Path) -> None:
    bad = _png(folder / "sim" / "test" / "cat" / "9.png", np.random.default_rng(1), (8, 8, 3))
    with pytest.raises(DataError, match="inconsistent channel counts") as e:
        from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="real")
    assert str(bad) in str(e.value)
    with pytest.raises(DataError, match="declared channels=3"):
        from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="real", channels=3)


def test_image_folder_size_mismatch_and_resize(folder: Path, tmp_path: Path) -> None:
    bad = _png(folder / "real" / "train" / "cat" / "9.png", np.random.default_rng(2), (12, 12))
    with pytest.raises(DataError, match="image sizes differ") as e:
        from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="real")
    assert str(bad) in str(e.value) and "12x12" in str(e.value)
    out = from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="real", image_size=8)
    spec, df = load_benchmark(out)
    assert spec.image_size == 8 and "resized to 8x8" in spec.description
    r = df[df["path"] == str(bad)].iloc[0]
    assert (r["width"], r["height"]) == (12, 12)  # the manifest tells the truth about the file


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda src: (src / "sim" / "val").rename(src / "sim" / "validation"),
            "unknown split folder 'validation'",
        ),
        (lambda src: [p.unlink() for p in (src / "real" / "test" / "cat").iterdir()], "empty class folder"),
        (lambda src: shutil.rmtree(src / "real" / "val"), "no 'val' folder"),
        (
            lambda src: _png(src / "sim" / "train" / "loose.png", np.random.default_rng(3)),
            "outside a class folder",
        ),
    ],
    ids=["unknown-split", "empty-class", "missing-split", "stray-image"],
)
def test_image_folder_layout_errors(
    folder: Path, tmp_path: Path, mutate: Callable[[Path], object], match: str
) -> None:
    mutate(folder)
    with pytest.raises(DataError, match=match) as e:
        from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="real")
    assert str(folder) in str(e.value)


def test_image_folder_empty_and_bad_keys(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder") as e:
        from_image_folder(tmp_path / "empty", tmp_path / "b", name="x", source="sim", target="real")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(DataError, match="key 'target'.*'photo'"):
        from_image_folder(folder, tmp_path / "b", name="x", source="sim", target="photo")


def test_out_never_replaces_inputs(folder: Path) -> None:
    for out in (folder, folder.parent, folder / "bench"):
        with pytest.raises(DataError, match="output folder"):
            from_image_folder(folder, out, name="x", source="sim", target="real")
    assert (folder / "sim" / "train" / "cat" / "0.png").is_file()


def test_failed_run_leaves_existing_out_untouched(folder: Path, tmp_path: Path) -> None:
    out = from_image_folder(folder, tmp_path / "bench", name="pets", source="sim", target="real")
    before = tree_digest(out)
    bad = folder / "sim" / "train" / "dog" / "0.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=str(bad)):
        from_image_folder(folder, out, name="pets2", source="sim", target="real")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "src"]  # no temp dir left behind


# ----------------------------------------------------------------------------------------------------------
# manifest CSV / Parquet


def test_manifest_csv_to_valid_benchmark(csv_manifest: Path, folder: Path, tmp_path: Path) -> None:
    out = from_manifest(csv_manifest, tmp_path / "bench", name="pets", source="sim", target="real")
    spec, df = load_benchmark(out)
    user = pd.read_csv(csv_manifest)
    assert spec.classes == list(CLASSES) and spec.channels == 1 and spec.image_size == 8
    assert list(df["id"]) == [f"{d}-{s}-{i}" for i, (d, s) in enumerate(zip(user["domain"], user["split"]))]
    assert list(df["path"]) == [str(folder / p) for p in user["path"]]
    assert [CLASSES[k] for k in df["label"]] == list(user["label"])
    rep = validate_benchmark(out)
    assert rep.success, rep.summary()


def test_manifest_parquet_int_labels_ids_root(csv_manifest: Path, folder: Path, tmp_path: Path) -> None:
    user = pd.read_csv(csv_manifest)
    user["label"] = [CLASSES.index(c) for c in user["label"]]
    user.loc[user["domain"] == "real", "label"] = None  # unlabelled target: empty label cells
    user["id"] = [f"u{i:03d}" for i in range(len(user))]
    user["factor_pose"] = [i % 3 for i in range(len(user))]
    pq = tmp_path / "elsewhere" / "user.parquet"
    pq.parent.mkdir()
    user.to_parquet(pq, index=False)
    out = from_manifest(
        pq,
        tmp_path / "bench",
        name="pets",
        source="sim",
        target="real",
        root=folder,
        classes=list(CLASSES),
        unlabelled=["real"],
    )
    spec, df = load_benchmark(out)
    assert spec.tasks == ["classification", "factors"] and spec.factors == {"pose": 3}
    assert list(df["id"]) == list(user["id"]) and set(df.loc[df["domain"] == "real", "label"]) == {NO_LABEL}
    assert validate_benchmark(out).success


def _write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _rows(csv_manifest: Path) -> list[dict]:
    return pd.read_csv(csv_manifest).to_dict("records")


def test_manifest_missing_column(csv_manifest: Path, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _rows(csv_manifest)]
    with pytest.raises(DataError, match="missing column 'split'") as e:
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")
    assert str(csv_manifest) in str(e.value)


def test_manifest_unknown_split(csv_manifest: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    rows[5]["split"] = "training"
    with pytest.raises(DataError, match=r"line 7: unknown split 'training'"):
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")


def test_manifest_label_not_in_class_set(csv_manifest: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    rows[3]["label"] = "bird"
    with pytest.raises(DataError, match=r"line 5: label 'bird' is not in the class set"):
        from_manifest(
            _write_csv(csv_manifest, rows),
            tmp_path / "b",
            name="x",
            source="sim",
            target="real",
            classes=list(CLASSES),
        )
    for r in rows:
        r["label"] = 1
    rows[4]["label"] = 2
    with pytest.raises(DataError, match=r"line 6: label 2 is not in the class set"):
        from_manifest(
            _write_csv(csv_manifest, rows),
            tmp_path / "b",
            name="x",
            source="sim",
            target="real",
            classes=list(CLASSES),
        )


def test_manifest_missing_label_in_labelled_domain(csv_manifest: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    rows[2]["label"] = None
    with pytest.raises(DataError, match=r"domain\(s\) \['real'\] have no 'label'.*line 4 .*unlabelled="):
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")


def test_manifest_duplicate_ids(csv_manifest: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    for i, r in enumerate(rows):
        r["id"] = f"s{i}"
    rows[7]["id"] = "s2"
    with pytest.raises(DataError, match=r"id 's2' \(line 9\): duplicate id 's2' \(first at row 2\)"):
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")


def test_manifest_corrupt_and_missing_files(csv_manifest: Path, folder: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    (folder / rows[6]["path"]).write_bytes(b"nope")
    original = rows[9]["path"]
    rows[9]["path"] = "sim/train/cat/absent.png"
    with pytest.raises(DataError) as e:  # a missing file is refused first: the sample count must not change
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")
    msg = str(e.value)
    assert "line 11" in msg and "absent.png" in msg and "no such file" in msg and "--skip-bad-files" in msg
    rows[9]["path"] = original
    with pytest.raises(DataError) as e:
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")
    msg = str(e.value)
    assert "1 unreadable or corrupt" in msg
    assert "line 8" in msg and str(folder / rows[6]["path"]) in msg and "cannot decode" in msg


def test_manifest_inconsistent_channels(csv_manifest: Path, folder: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    _png(folder / rows[10]["path"], np.random.default_rng(4), (8, 8, 3))
    with pytest.raises(DataError, match=r"inconsistent channel counts.*line 12 .*has 3 \(mode RGB\)"):
        from_manifest(csv_manifest, tmp_path / "b", name="x", source="sim", target="real")


def test_manifest_failed_run_leaves_out_untouched(csv_manifest: Path, tmp_path: Path) -> None:
    out = from_manifest(csv_manifest, tmp_path / "bench", name="pets", source="sim", target="real")
    before = tree_digest(out)
    spec_before = yaml.safe_load((out / "benchmark.yaml").read_text())
    rows = _rows(csv_manifest)
    rows[0]["split"] = "nope"
    with pytest.raises(DataError, match="line 2"):
        from_manifest(_write_csv(csv_manifest, rows), out, name="other", source="sim", target="real")
    assert tree_digest(out) == before and spec_before["name"] == "pets"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "src"]


def test_manifest_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text("{}")
    with pytest.raises(DataError, match=r"m\.json.*\.csv or \.parquet"):
        from_manifest(p, tmp_path / "b", name="x", source="sim", target="real")


def test_manifest_factor_out_of_range(csv_manifest: Path, tmp_path: Path) -> None:
    rows = _rows(csv_manifest)
    for i, r in enumerate(rows):
        r["factor_pose"] = i % 3
    rows[8]["factor_pose"] = 3
    with pytest.raises(DataError, match=r"line 10: factor_pose = 3 is outside 0..2"):
        from_manifest(
            _write_csv(csv_manifest, rows),
            tmp_path / "b",
            name="x",
            source="sim",
            target="real",
            factors={"pose": 3},
        )
    rows[8]["factor_pose"] = "left"
    with pytest.raises(DataError, match=r"line 10: .*'factor_pose' = 'left' is not an integer"):
        from_manifest(_write_csv(csv_manifest, rows), tmp_path / "b", name="x", source="sim", target="real")


def test_failure_while_writing_leaves_out_untouched(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = from_image_folder(folder, tmp_path / "bench", name="pets", source="sim", target="real")
    before = tree_digest(out)

    def broken_save(self: object, path: Path) -> None:
        path.write_text("half a file")
        raise OSError("disk full")

    monkeypatch.setattr("s2r.data.benchmark.BenchmarkSpec.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        from_image_folder(folder, out, name="pets2", source="sim", target="real")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "src"]
