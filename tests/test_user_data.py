"""A user's own data end to end (issue 17): continuous factors through betavae_weak and its evaluation, and a
folder of images + depth + masks through papers 2 (twin VAE) and 5 (CUT, segmenter)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_params_dict
from s2r.config import ConfigError, from_dict
from s2r.data.adapters import Declared, from_manifest
from s2r.data.benchmark import bin_factor
from s2r.data.prepared import PreparedBenchmark, prepare
from s2r.data.validation import validate_benchmark
from s2r.params import resolve_methods

TINY = resolve_methods(tiny_params_dict()["methods"])  # variants with their base merged in


pytestmark = pytest.mark.usefixtures("one_thread_module")


# -- continuous factors -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def continuous(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A robot-like dataset: joint angle (continuous, radians) and a discrete cube colour, as a CSV manifest."""
    tmp = tmp_path_factory.mktemp("continuous")
    rng = np.random.default_rng(0)
    rows = []
    for dom in ("sim", "real"):
        for split, n in (("train", 24), ("val", 8), ("test", 8)):
            for i in range(n):
                angle, colour = float(rng.uniform(-1.5, 1.5)), int(rng.integers(2))
                img = np.zeros((16, 16, 3), np.uint8)
                x = int(round((angle + 1.5) / 3 * 12))  # the angle moves a bar; the colour picks its channel
                img[4:12, x : x + 4, colour] = 200 if dom == "sim" else 150
                img += rng.integers(0, 20, img.shape, dtype=np.uint8)
                p = tmp / "img" / f"{dom}-{split}-{i}.png"
                p.parent.mkdir(exist_ok=True)
                Image.fromarray(img).save(p)
                rows.append({"id": f"{dom}-{split}-{i}", "path": f"img/{p.name}", "domain": dom, "split": split,
                             "factor_angle": round(angle, 5), "factor_colour": colour})
    pd.DataFrame(rows).to_csv(tmp / "m.csv", index=False)
    decl = Declared(factors={"angle": 4, "colour": 2}, factor_ranges={"angle": [-1.5, 1.5]})
    bench = from_manifest(tmp / "m.csv", tmp / "bench", name="robot", source="sim", target="real", declared=decl)
    rep = validate_benchmark(bench)
    assert rep.success, rep.summary()
    return prepare(bench, tmp / "prep", progress=False)


def test_continuous_factors_are_kept_and_binned(continuous: Path) -> None:
    data = PreparedBenchmark(continuous)
    assert data.spec.factor_ranges == {"angle": [-1.5, 1.5]} and data.spec.factors == {"angle": 4, "colour": 2}
    part = data.get("sim", "train")
    raw = part.factor_values[:, 0]
    assert raw.dtype == np.float64 and not np.allclose(raw, np.round(raw))  # the real values, not indices
    assert (part.factors[:, 0] == bin_factor(raw, -1.5, 1.5, 4)).all()
    assert (part.factors[:, 1] == part.factor_values[:, 1]).all()  # discrete factors stay indices


def test_bin_factor_is_the_reference_histogram_discretisation() -> None:
    """disentanglement_lib _histogram_discretize: np.digitize(x, np.histogram(x, bins)[1][:-1]) (1-based)."""
    x = np.array([0.0, 0.1, 0.25, 0.5, 0.74, 0.75, 1.0])
    ref = np.digitize(x, np.histogram(x, 4)[1][:-1]) - 1  # the data span [0, 1] = the declared range here
    assert (bin_factor(x, 0.0, 1.0, 4) == ref).all() and list(ref) == [0, 0, 1, 2, 2, 3, 3]
    assert bin_factor(np.array([np.nan]), 0.0, 1.0, 4)[0] == -1


def _weak_on_continuous(data: PreparedBenchmark) -> Any:
    """betavae_weak on the continuous benchmark, OOD split by a threshold on the joint angle, 2 steps trained."""
    from s2r.methods import betavae as bv

    cfg = from_dict(bv.Config, TINY["betavae_weak"] | {"ood_factor": "angle", "ood_holdout": [], "ood_threshold": 0.75,
                                                       "pairs": "match"}, "test")
    torch.manual_seed(0)
    m = bv.Method(cfg, data, 0)
    m.setup(torch.device("cpu"), None, 2)
    for _, batch in zip(range(2), m.batches()):
        losses = m.train_step(batch)
        assert all(math.isfinite(v) for v in losses.values())
    return m


def test_betavae_weak_pairs_and_threshold_on_continuous_factors(continuous: Path) -> None:
    from s2r.methods import betavae as bv

    data = PreparedBenchmark(continuous)
    m = _weak_on_continuous(data)
    assert m.holdout == {"angle": [3]}  # bin centres -1.125, -0.375, 0.375, 1.125: >= 0.75 is the last bin
    f = data.get("sim", "train").factors
    assert ((f[m.pairs[:, 0]] != f[m.pairs[:, 1]]).sum(1) == m.pair_distance).all() and m.pair_distance == 1
    assert not np.isin(f[m.pairs.ravel(), 0], [3]).any()  # held-out bins never reach training
    assert m.in_distribution(f).sum() == (f[:, 0] != 3).sum()
    with pytest.raises(ConfigError, match="continuous"):  # a value set of bins is refused for a continuous factor
        bv.Method(from_dict(bv.Config, TINY["betavae_weak"] | {"ood_factor": "angle", "pairs": "match"}, "t"), data, 0)
    with pytest.raises(ConfigError, match="holds out 0"):
        bv.Method(from_dict(bv.Config, TINY["betavae_weak"] | {"ood_factor": "angle", "ood_holdout": [],
                                                               "ood_threshold": 9.0, "pairs": "match"}, "t"), data, 0)


@pytest.mark.slow  # ~15 s: LightGBM + MLP regressors of the OOD study
def test_betavae_weak_evaluates_on_continuous_factors(continuous: Path, tmp_path: Path) -> None:
    from s2r.evaluators import disentanglement

    m = _weak_on_continuous(PreparedBenchmark(continuous))

    class Run:
        logged: dict[str, float] = {}

        def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
            self.logged.update(metrics)

        def log_artifact(self, *a: Any, **k: Any) -> None:
            pass

        def log_figure(self, *a: Any, **k: Any) -> None:
            pass

    res = disentanglement.EVALUATOR.evaluate(m, Run(), tmp_path, None)
    for k in ("dci_disentanglement", "mig", "ood1a_gbt", "ood2a_gbt", "ood2b_gbt"):
        assert math.isfinite(res[k]), k
    assert res["n_ood_values"] > 0 and res["n_target"] > 0


# -- a user's folder of images + depth + masks (papers 2 and 5) ---------------------------------------------------

@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """renders/ and photos/ with rgb, 16-bit depth (mm) and mask PNGs, declared by a dataset.yaml."""
    from s2r.data.sources import generic

    tmp = tmp_path_factory.mktemp("dense")
    src = tmp / "mydata"
    rng = np.random.default_rng(1)
    for dom in ("renders", "photos"):
        for split, n in (("train", 4), ("val", 2), ("test", 2)):
            for i in range(n):
                mask = np.zeros((16, 16), np.uint8)
                y, x = rng.integers(2, 9, 2)
                mask[y : y + 6, x : x + 6] = 1 + i % 2
                depth = np.where(mask > 0, 800, 2000).astype(np.uint16)
                rgb = (rng.integers(0, 40, (16, 16, 3)) + mask[..., None] * 90).astype(np.uint8)
                for kind, arr in (("rgb", rgb), ("depth", depth), ("mask", mask)):
                    p = src / dom / split / kind / f"{i:03d}.png"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr).save(p)
    decl = {"task": "segmentation", "source": "renders", "target": "photos", "mask_classes": ["bg", "box", "ball"],
            "depth_scale": 1000.0,
            "domains": {d: {"path": d, "layout": "{split}/rgb/*.png", "depth": "{split}/depth/{stem}.png",
                            "mask": "{split}/mask/{stem}.png"} for d in ("renders", "photos")}}
    (src / "dataset.yaml").write_text(yaml.safe_dump(decl))
    bench = generic.build(src, tmp / "bench", "mine", {})
    rep = validate_benchmark(bench)
    assert rep.success, rep.summary()
    return prepare(bench, tmp / "prep", progress=False)


def test_user_depth_and_masks_are_prepared(dense: Path) -> None:
    data = PreparedBenchmark(dense)
    assert data.spec.has_depth and data.spec.has_mask and data.spec.seg_classes == ["bg", "box", "ball"]
    part = data.get("photos", "train")
    assert set(np.unique(part.depth).tolist()) == {0.8, 2.0} or np.allclose(sorted(np.unique(part.depth)), [0.8, 2.0])
    assert set(np.unique(part.masks).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("name", ["twinvae", "twinvae_heads"])
def test_paper2_twinvae_trains_on_the_users_folder(dense: Path, name: str) -> None:
    from s2r.methods import twinvae

    torch.manual_seed(0)
    m = twinvae.Method(from_dict(twinvae.Config, TINY[name], "test"), PreparedBenchmark(dense), 0)
    m.name = name
    m.initialised = True  # stage 2 without stage-1 weights: one step checks data, shapes and losses
    m.setup(torch.device("cpu"), None, 2)
    losses = m.train_step(next(m.batches()))
    assert losses and all(math.isfinite(v) for v in losses.values())


def test_paper5_cut_and_segmenter_train_on_the_users_folder(dense: Path) -> None:
    from s2r.methods import cut, segmenter

    data = PreparedBenchmark(dense)
    torch.manual_seed(0)
    c = cut.Method(from_dict(cut.Config, TINY["cut"], "test", "methods.cut"), data, 0)
    c.setup(torch.device("cpu"), None, 2)
    assert all(math.isfinite(v) for v in c.train_step(next(c.batches())).values())
    s = segmenter.Method(from_dict(segmenter.Config, TINY["segmenter_synthetic"], "test", "methods.segmenter"),
                         data, 0)
    assert s.classes == ["bg", "box", "ball"] and s.synthetic_domain == "renders"
    s.setup(torch.device("cpu"), None, 2)
    assert all(math.isfinite(v) for v in s.train_step(next(s.batches())).values())
