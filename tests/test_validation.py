"""Great Expectations validation of manifests: a clean benchmark passes, each kind of bad input fails naming
the expectation and the row, id or file at fault."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from s2r.data.benchmark import NO_LABEL, BenchmarkSpec, DomainSpec, Sample, sha256_bytes, write_benchmark
from s2r.data.validation import ValidationReport, image_channels, validate_benchmark

PER_SPLIT = 4


def _spec(**kw: Any) -> BenchmarkSpec:
    base: dict[str, Any] = {
        "name": "vtiny",
        "tasks": ["classification"],
        "domains": [DomainSpec("sim", "source"), DomainSpec("real", "target", labelled=False)],
        "source": "sim",
        "target": "real",
        "image_size": 8,
        "channels": 1,
        "classes": ["a", "b"],
    }
    base.update(kw)
    return BenchmarkSpec(**base)


def _samples(spec: BenchmarkSpec, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for d in ("sim", "real"):
        for s in ("train", "val", "test"):
            for k in range(PER_SPLIT):
                # the unlabelled domain's train rows carry no label; its val/test keep them for evaluation
                label = NO_LABEL if (d == "real" and s == "train") else k % 2
                factors = {name: k % n for name, n in spec.factors.items()}
                img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                out.append(
                    Sample(id=f"{d}-{s}-{k}", domain=d, split=s, image=img, label=label, factors=factors)
                )
    return out


@pytest.fixture(scope="module")
def clean_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid benchmark per module (GX import and writing happen once); tests work on copies."""
    import great_expectations  # noqa: F401 - pay the ~4 s import once for the module

    spec = _spec()
    return write_benchmark(tmp_path_factory.mktemp("clean") / "bench", spec, _samples(spec), progress=False)


@pytest.fixture
def bench(clean_bench: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean_bench, tmp_path / "bench"))


def edit_manifest(root: Path, fn: Callable[[pd.DataFrame], pd.DataFrame | None]) -> None:
    df = pd.read_parquet(root / "manifest.parquet")
    new = fn(df)
    (df if new is None else new).to_parquet(root / "manifest.parquet", index=False)


def row(root: Path, sid: str) -> tuple[int, pd.Series]:
    df = pd.read_parquet(root / "manifest.parquet")
    i = int(np.flatnonzero(df["id"] == sid)[0])
    return i, df.iloc[i]


def failed(report: ValidationReport) -> dict[tuple[str, Any], dict[str, Any]]:
    return {(f["expectation"], f["column"]): f for f in report.failures()}


def example_ids(result: dict[str, Any]) -> set[Any]:
    return {e["id"] for e in result["examples"]}


def write_png(path: Path, array: np.ndarray) -> str:
    """Overwrite `path` with a PNG of `array`; return its sha256."""
    Image.fromarray(array).save(path, format="PNG")
    return sha256_bytes(path.read_bytes())


def set_cell(root: Path, sid: str, col: str, value: Any) -> None:
    def fn(df: pd.DataFrame) -> None:
        df.loc[df["id"] == sid, col] = value

    edit_manifest(root, fn)


# ----------------------------------------------------------------------------------------------------------


def test_clean_benchmark_passes(bench: Path) -> None:
    rep = validate_benchmark(bench)
    assert rep.success, rep.summary()
    assert rep.failures() == []
    assert rep.n_rows == 2 * 3 * PER_SPLIT
    names = {r["expectation"] for r in rep.results}
    # schema, allowed values, checksums, non-empty pairs, leakage and file checks all ran
    for n in (
        "expect_column_to_exist",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_match_regex",
        "expect_domain_split_pairs_to_be_non_empty",
        "expect_sha256_disjoint_between_splits",
        "expect_files_to_exist_and_decode",
        "expect_file_sha256_to_match_manifest",
        "expect_file_channels_to_match_manifest",
        "expect_file_size_to_match_manifest",
    ):
        assert n in names
    for r in rep.results:
        assert set(r) >= {"expectation", "column", "kwargs", "success", "unexpected_count", "examples"}


def test_corrupt_image_named(bench: Path) -> None:
    i, r = row(bench, "sim-val-1")
    f = bench / r["path"]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated pixel data: the header still opens, decoding fails
    Image.open(f).close()
    rep = validate_benchmark(bench)
    assert not rep.success
    res = failed(rep)[("expect_files_to_exist_and_decode", "path")]
    assert res["unexpected_count"] == 1
    (ex,) = res["examples"]
    assert (ex["row"], ex["id"], ex["path"]) == (i, "sim-val-1", r["path"])
    assert "decode" in ex["value"]


def test_missing_file_named(bench: Path) -> None:
    _, r = row(bench, "real-test-2")
    (bench / r["path"]).unlink()
    res = failed(validate_benchmark(bench))[("expect_files_to_exist_and_decode", "path")]
    assert example_ids(res) == {"real-test-2"} and "no such file" in res["examples"][0]["value"]


def test_check_files_false_skips_file_checks(bench: Path) -> None:
    _, r = row(bench, "sim-val-1")
    (bench / r["path"]).write_bytes(b"not an image")
    assert validate_benchmark(bench, check_files=False).success
    assert not validate_benchmark(bench, check_files=True).success


def test_wrong_channel_count_in_file(bench: Path) -> None:
    _, r = row(bench, "sim-train-2")
    sha = write_png(bench / r["path"], np.zeros((8, 8, 3), np.uint8))  # RGB where the benchmark is grey
    set_cell(bench, "sim-train-2", "sha256", sha)
    rep = validate_benchmark(bench)
    assert set(failed(rep)) == {("expect_file_channels_to_match_manifest", "path")}
    res = failed(rep)[("expect_file_channels_to_match_manifest", "path")]
    assert example_ids(res) == {"sim-train-2"}
    assert "3 channels" in res["examples"][0]["value"]


def test_wrong_channel_count_in_manifest(bench: Path) -> None:
    set_cell(bench, "real-val-0", "channels", 3)
    res = failed(validate_benchmark(bench))
    assert example_ids(res[("expect_column_values_to_be_in_set", "channels")]) == {"real-val-0"}
    assert example_ids(res[("expect_file_channels_to_match_manifest", "path")]) == {"real-val-0"}


@pytest.mark.parametrize(
    ("sid", "label"),
    [("sim-train-0", 2), ("sim-test-1", NO_LABEL), ("real-test-1", 5), ("real-train-3", -2)],
    ids=["labelled-too-big", "labelled-no-label", "unlabelled-too-big", "unlabelled-negative"],
)
def test_label_outside_declared_set(bench: Path, sid: str, label: int) -> None:
    set_cell(bench, sid, "label", label)
    rep = validate_benchmark(bench)
    fails = [f for f in rep.failures() if f["column"] == "label"]
    assert len(fails) == 1 and fails[0]["expectation"] == "expect_column_values_to_be_in_set"
    assert example_ids(fails[0]) == {sid}
    assert fails[0]["examples"][0]["value"] == label


def test_factor_outside_declared_range(tmp_path: Path) -> None:
    spec = _spec(tasks=["factors"], classes=[], factors={"shape": 3})
    root = write_benchmark(tmp_path / "fb", spec, _samples(spec), progress=False)
    assert validate_benchmark(root).success
    set_cell(root, "sim-val-2", "factor_shape", 3)
    res = failed(validate_benchmark(root))[("expect_column_values_to_be_in_set", "factor_shape")]
    assert example_ids(res) == {"sim-val-2"}


def test_empty_split_for_a_domain(bench: Path) -> None:
    edit_manifest(bench, lambda df: df[~((df["domain"] == "real") & (df["split"] == "val"))])
    rep = validate_benchmark(bench)
    assert set(failed(rep)) == {("expect_domain_split_pairs_to_be_non_empty", None)}
    res = failed(rep)[("expect_domain_split_pairs_to_be_non_empty", None)]
    assert res["unexpected_count"] == 1
    assert "'real'" in res["examples"][0]["value"] and "'val'" in res["examples"][0]["value"]


@pytest.mark.parametrize("column", ["sha256", "label", "split", "width"])
def test_missing_column_reported_by_name(bench: Path, column: str) -> None:
    edit_manifest(bench, lambda df: df.drop(columns=[column]))
    rep = validate_benchmark(bench)
    res = failed(rep)[("expect_column_to_exist", column)]
    assert column in res["message"]
    # nothing crashed: only the missing column's own failure (file checks that need it are skipped)
    assert all(f["column"] == column for f in rep.failures())


def test_duplicate_ids(bench: Path) -> None:
    i, _ = row(bench, "sim-train-1")
    set_cell(bench, "sim-train-2", "id", "sim-train-1")
    res = failed(validate_benchmark(bench))
    assert set(res) == {("expect_column_values_to_be_unique", "id")}
    ex = res[("expect_column_values_to_be_unique", "id")]["examples"]
    assert {e["row"] for e in ex} == {i, i + 1} and {e["id"] for e in ex} == {"sim-train-1"}


def test_undeclared_domain_and_split(bench: Path) -> None:
    set_cell(bench, "sim-val-0", "domain", "cartoon")
    set_cell(bench, "real-val-0", "split", "training")
    res = failed(validate_benchmark(bench))
    assert example_ids(res[("expect_column_values_to_be_in_set", "domain")]) == {"sim-val-0"}
    assert example_ids(res[("expect_column_values_to_be_in_set", "split")]) == {"real-val-0"}


def test_same_sha256_in_train_and_test(bench: Path) -> None:
    _, tr = row(bench, "sim-train-0")
    _, te = row(bench, "real-test-3")
    shutil.copyfile(bench / tr["path"], bench / te["path"])
    set_cell(bench, "real-test-3", "sha256", tr["sha256"])
    rep = validate_benchmark(bench)
    assert set(failed(rep)) == {("expect_sha256_disjoint_between_splits", "sha256")}
    res = failed(rep)[("expect_sha256_disjoint_between_splits", "sha256")]
    assert res["kwargs"]["splits"] == ["train", "test"]
    (ex,) = res["examples"]
    assert ex["id"] == "real-test-3" and ex["path"] == te["path"]
    assert "sim-train-0" in ex["value"] and tr["path"] in ex["value"]


def test_same_sha256_in_val_and_test(bench: Path) -> None:
    _, va = row(bench, "real-val-1")
    set_cell(bench, "sim-test-0", "sha256", va["sha256"])
    res = failed(validate_benchmark(bench, check_files=False))
    r = res[("expect_sha256_disjoint_between_splits", "sha256")]
    assert r["kwargs"]["splits"] == ["val", "test"] and example_ids(r) == {"sim-test-0"}


def test_wrong_image_size_in_file(bench: Path) -> None:
    _, r = row(bench, "real-val-2")
    sha = write_png(bench / r["path"], np.zeros((9, 9), np.uint8))
    set_cell(bench, "real-val-2", "sha256", sha)
    rep = validate_benchmark(bench)
    assert set(failed(rep)) == {("expect_file_size_to_match_manifest", "path")}
    res = failed(rep)[("expect_file_size_to_match_manifest", "path")]
    assert example_ids(res) == {"real-val-2"} and "9x9" in res["examples"][0]["value"]


def test_wrong_image_size_in_manifest(bench: Path) -> None:
    set_cell(bench, "sim-test-3", "width", 16)
    res = failed(validate_benchmark(bench))
    assert example_ids(res[("expect_column_values_to_be_in_set", "width")]) == {"sim-test-3"}
    assert res[("expect_column_values_to_be_in_set", "width")]["examples"][0]["value"] == 16


def test_sha256_mismatch(bench: Path) -> None:
    set_cell(bench, "sim-val-3", "sha256", "0" * 64)
    rep = validate_benchmark(bench)
    assert set(failed(rep)) == {("expect_file_sha256_to_match_manifest", "path")}
    assert example_ids(failed(rep)[("expect_file_sha256_to_match_manifest", "path")]) == {"sim-val-3"}


def test_sha256_malformed(bench: Path) -> None:
    set_cell(bench, "sim-val-3", "sha256", "ABC")
    res = failed(validate_benchmark(bench, check_files=False))
    assert set(res) == {("expect_column_values_to_match_regex", "sha256")}
    assert example_ids(res[("expect_column_values_to_match_regex", "sha256")]) == {"sim-val-3"}


def test_report_json_round_trip_and_summary(bench: Path, tmp_path: Path) -> None:
    _, r = row(bench, "sim-val-1")
    (bench / r["path"]).write_bytes(b"garbage")
    set_cell(bench, "sim-train-0", "label", 7)
    rep = validate_benchmark(bench)
    out = tmp_path / "reports" / "validation.json"
    rep.to_json(out)
    assert json.loads(out.read_text())["success"] is False
    assert ValidationReport.from_json(out) == rep
    assert [p.name for p in out.parent.iterdir()] == ["validation.json"]  # no temp file left behind
    text = rep.summary()
    assert "FAILED" in text and "sim-val-1" in text and r["path"] in text
    assert "sim-train-0" in text and "expect_column_values_to_be_in_set [label]" in text


def test_summary_of_clean_report(bench: Path) -> None:
    text = validate_benchmark(bench, check_files=False).summary()
    assert "OK" in text and "vtiny" in text


def test_image_channels_by_mode() -> None:
    assert [image_channels(m) for m in ("L", "RGB", "RGBA", "LA", "P", "I;16")] == [1, 3, 4, 2, 3, 1]


def test_unreadable_description_or_manifest_raises(bench: Path) -> None:
    from s2r.data.benchmark import DataError

    (bench / "manifest.parquet").unlink()
    with pytest.raises(DataError, match="no manifest"):
        validate_benchmark(bench)
    (bench / "benchmark.yaml").write_text("name: x\nbogus: 1\n")
    with pytest.raises(DataError, match="bogus"):
        validate_benchmark(bench)


def test_depth_and_mask_files_checked(tmp_path: Path) -> None:
    spec = _spec(
        tasks=["depth", "segmentation"], classes=[], seg_classes=["bg", "obj"], has_depth=True, has_mask=True
    )
    samples = _samples(spec)
    for s in samples:
        s.depth = np.full((8, 8), 1.5, np.float32)
        s.mask = np.zeros((8, 8), np.uint8)
    root = write_benchmark(tmp_path / "dm", spec, samples, progress=False)
    assert validate_benchmark(root).success
    _, r = row(root, "real-test-0")
    (root / r["mask_path"]).unlink()
    write_png(root / r["depth_path"], np.zeros((4, 4), np.uint16))
    res = failed(validate_benchmark(root))
    assert set(res) == {
        ("expect_files_to_exist_and_decode", "mask_path"),
        ("expect_file_size_to_match_manifest", "depth_path"),
    }
    assert res[("expect_files_to_exist_and_decode", "mask_path")]["examples"][0]["path"] == r["mask_path"]
    assert example_ids(res[("expect_file_size_to_match_manifest", "depth_path")]) == {"real-test-0"}
