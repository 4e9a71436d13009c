"""Prepared arrays: decoded once, memory-mapped, atomic; bad files are named; benchmark writing is atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_samples, tiny_spec
from s2r.config import ConfigError
from s2r.data.benchmark import BenchmarkSpec, DataError, Sample, load_benchmark, write_benchmark
from s2r.data.prepared import PreparedBenchmark, prepare


def test_prepared_arrays_match_images(tiny_benchmark: Path, tiny_prepared: Path) -> None:
    from PIL import Image

    spec, manifest = load_benchmark(tiny_benchmark)
    pb = PreparedBenchmark(tiny_prepared)
    part = pb.get("real", "test")
    assert isinstance(part.images, np.memmap) and part.images.dtype == np.uint8
    assert part.images.shape == (18, 8, 8, 1) and len(part.ids) == 18
    row = manifest.set_index("id").loc[part.ids[5]]
    assert np.array_equal(np.asarray(Image.open(tiny_benchmark / row["path"]))[:, :, None], part.images[5])
    assert part.labels[5] == row["label"]
    meta = json.loads((tiny_prepared / "prepared.json").read_text())
    assert meta["counts"]["syn"]["train"] == 18 and pb.data_version == meta["manifest_sha256"]
    with pytest.raises(DataError, match="no prepared data for domain 'nope'"):
        pb.get("nope", "train")


def test_corrupt_image_named_and_old_prepared_kept(tiny_benchmark: Path, tiny_prepared: Path) -> None:
    before = (tiny_prepared / "real" / "test" / "images.npy").read_bytes()
    _, manifest = load_benchmark(tiny_benchmark)
    victim = manifest.iloc[7]
    (tiny_benchmark / victim["path"]).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError) as e:
        prepare(tiny_benchmark, tiny_prepared, progress=False)
    assert victim["path"] in str(e.value) and "row 7" in str(e.value) and victim["id"] in str(e.value)
    assert (tiny_prepared / "real" / "test" / "images.npy").read_bytes() == before
    assert not [p for p in tiny_prepared.parent.iterdir() if ".tmp-" in p.name]


def test_wrong_channels_and_missing_file_named(tiny_benchmark: Path, tmp_path: Path) -> None:
    from PIL import Image

    _, manifest = load_benchmark(tiny_benchmark)
    Image.new("RGB", (8, 8)).save(tiny_benchmark / manifest.iloc[3]["path"])
    with pytest.raises(DataError, match="3 channels .*declares 1"):
        prepare(tiny_benchmark, tmp_path / "p", progress=False)
    (tiny_benchmark / manifest.iloc[3]["path"]).unlink()
    sid = manifest.iloc[3]["id"]
    with pytest.raises(DataError, match=f"id '{sid}' \\(row 3\\): cannot read .*{sid}"):
        prepare(tiny_benchmark, tmp_path / "p", progress=False)


def test_missing_column_named(tiny_benchmark: Path, tmp_path: Path) -> None:
    m = pd.read_parquet(tiny_benchmark / "manifest.parquet").drop(columns=["label"])
    m.to_parquet(tiny_benchmark / "manifest.parquet")
    with pytest.raises(DataError, match="missing column 'label'"):
        prepare(tiny_benchmark, tmp_path / "p", progress=False)


def test_write_benchmark_is_atomic(tmp_path: Path) -> None:
    spec = tiny_spec()
    root = write_benchmark(tmp_path / "b", spec, tiny_samples(spec), progress=False)
    before = (root / "manifest.parquet").read_bytes()

    def broken():
        yield from tiny_samples(spec)[:5]
        yield Sample(id="bad", domain="syn", split="train", image=np.zeros((8, 8, 3), np.uint8), label=0)

    with pytest.raises(DataError, match="'bad': 3 channels"):
        write_benchmark(root, spec, broken(), progress=False)
    assert (root / "manifest.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_spec_strict_yaml(tmp_path: Path) -> None:
    spec = tiny_spec()
    spec.save(tmp_path / "benchmark.yaml")
    assert BenchmarkSpec.load(tmp_path / "benchmark.yaml") == spec
    text = (tmp_path / "benchmark.yaml").read_text().replace("source: syn", "source: nowhere")
    (tmp_path / "benchmark.yaml").write_text(text)
    with pytest.raises(ConfigError, match="benchmark.yaml: key 'source': 'nowhere' is not a declared domain"):
        BenchmarkSpec.load(tmp_path / "benchmark.yaml")


@pytest.mark.parametrize("name", ["digits", "scenes"])
def test_generation_same_seed_same_sha256s(name: str, tmp_path: Path) -> None:
    from conftest import tiny_params_dict
    from s2r import stages
    from s2r.params import parse_params

    raw = tiny_params_dict()
    params = parse_params(raw, "tiny")
    a = load_benchmark(stages.generate(name, tmp_path / "a", params))[1]
    b = load_benchmark(stages.generate(name, tmp_path / "b", params))[1]
    assert a["sha256"].tolist() == b["sha256"].tolist() and len(a) > 0
    raw["seed"] = 1
    c = load_benchmark(stages.generate(name, tmp_path / "c", parse_params(raw, "tiny")))[1]
    synthetic = a["domain"] != "real"  # sklearn's real digits are the same for every seed (only splits move)
    assert set(a.loc[synthetic, "sha256"]) != set(c.loc[c["domain"] != "real", "sha256"])
