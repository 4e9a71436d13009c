"""Derived (refined) benchmarks and the paper-4 table logic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, derive
from s2r.tables.mixing import TABLE3, _ratio, _ratio_table, _table, table_cells


def test_derive_adds_domains_keeps_labels_and_versions(tiny_prepared: Path, tmp_path: Path) -> None:
    src = PreparedBenchmark(tiny_prepared)
    out = derive(src, tmp_path / "d", {"syn_inv": ("syn", lambda x: 255 - x)}, source="syn_inv", version_salt="m1")
    d = PreparedBenchmark(out)
    assert d.spec.source == "syn_inv" and d.spec.target == "real"
    assert [x.role for x in d.spec.domains if x.name == "syn"] == ["auxiliary"]
    for split in ("train", "val", "test"):
        a, b = src.get("syn", split), d.get("syn_inv", split)
        assert np.array_equal(255 - np.asarray(a.images), b.images)
        assert np.array_equal(a.labels, b.labels) and a.ids == b.ids
        assert np.array_equal(src.get("real", split).images, d.get("real", split).images)
    assert d.data_version != src.data_version and d.meta["parent"] == src.data_version
    again = derive(src, tmp_path / "e", {"syn_inv": ("syn", lambda x: 255 - x)}, source="syn_inv", version_salt="m2")
    assert PreparedBenchmark(again).data_version != d.data_version


def test_derive_rejects_bad_transform_and_keeps_old(tiny_prepared: Path, tmp_path: Path) -> None:
    src = PreparedBenchmark(tiny_prepared)
    good = derive(src, tmp_path / "d", {"x": ("syn", lambda x: x)}, version_salt="a")
    before = (good / "prepared.json").read_text()
    with pytest.raises(DataError, match="transform for 'x' returned"):
        derive(src, good, {"x": ("syn", lambda x: x[:, :4])}, version_salt="b")
    assert (good / "prepared.json").read_text() == before


def test_ratio_notation() -> None:
    assert [_ratio(f) for f in (0.0, 0.0625, 0.125, 0.5, 1.0)] == ["0:1", "1:15", "1:7", "1:1", "1:0"]


def test_ratio_is_chosen_on_validation_not_test() -> None:
    runs = pd.DataFrame([
        # seed 0: val prefers 0.25 although 0.5 has the better test accuracy
        {"setting": "Real + Synthetic", "seed": 0, "real_fraction": 0.25, "val_accuracy": 0.9, "test_accuracy": 0.80},
        {"setting": "Real + Synthetic", "seed": 0, "real_fraction": 0.5, "val_accuracy": 0.8, "test_accuracy": 0.95},
        {"setting": "Real + Synthetic", "seed": 1, "real_fraction": 0.25, "val_accuracy": 0.7, "test_accuracy": 0.70},
        {"setting": "Real + Synthetic", "seed": 1, "real_fraction": 0.5, "val_accuracy": 0.8, "test_accuracy": 0.90},
    ])
    row = _table(runs, ["Real + Synthetic"]).iloc[0]
    assert row["mean"] == pytest.approx(0.85) and row["std"] == pytest.approx(0.05)
    assert row["mixing_ratio"] == "1:1, 1:3" and row["seeds"] == 2
    runs["augment"] = False
    t2 = _ratio_table(runs)
    assert t2["mean"].round(3).tolist() == [0.75, 0.925]


def test_mixing_cells_table2_only_and_fig7_stage2_mappings() -> None:
    """CIFAR-DA9 runs Table 2 alone; Fig. 7 adds one refined-synthetic-only cell per stage-2 mapping."""
    full = table_cells([0.125, 0.5], True, [])
    assert [c[0] for c in full[:7]] == TABLE3 and len(full) == len(set(map(str, full))) == 9  # shared cells once
    assert ("Real only", "synthetic", [1.0], True) in full
    assert ("Real + Synthetic", "synthetic", [0.125, 0.5], True) in full
    t2 = table_cells([0.125, 0.5], False, [])
    assert {c[1] for c in t2} == {"synthetic"} and {c[0] for c in t2} == {"Real + Synthetic", "Real only"}
    fig7 = table_cells([0.5], False, ["RR-RS", "R-RS", "RR-S"])[-3:]
    assert fig7 == [(f"Stage 2 {k}", k, [0.0], False) for k in ("RR-RS", "R-RS", "RR-S")]
