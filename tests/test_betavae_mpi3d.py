"""Paper 3's methods on MPI3D-like data (the paper-3 recipe): a configurable OOD factor (object_color, not hue),
sampled one-factor pairs on large grids, a capped evaluation subset, and the recipe's sweep grid (1,080 models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import tiny_config, tiny_section
from s2r.config import BetavaeTablesParams, ConfigError
from s2r.data.benchmark import DataError
from s2r.methods import betavae as bv

GRID = {"object_color": 3, "object_shape": 2, "object_size": 2, "camera_height": 1, "background_color": 1,
        "horizontal_axis": 2, "vertical_axis": 2}


@pytest.fixture(scope="module")
def mpi3d_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MPI3D adapter on a 3-colour stand-in grid (8 px; the red channel encodes object_color), prepared."""
    from s2r.data import sources
    from s2r.data.prepared import prepare
    from s2r.data.sources import mpi3d

    root = tmp_path_factory.mktemp("mpi3d")
    raw = mpi3d.fixture(root / "raw", GRID)
    bench = Path(sources.add("mpi3d", raw, root / "bench", options={"factor_sizes": GRID})["benchmark"])
    return prepare(bench, root / "prepared", progress=False)


def cfg(**kw: Any) -> bv.Config:
    return tiny_config("betavae", **{"image_size": 8, "widths": [4, 8], "latent_dim": 3, "batch_size": 4,
                                     "cache_dir": "", "val_images": 8, "ood_factor": "object_color",
                                     "ood_holdout": [1], **kw})


def full_grid(sizes: list[int]) -> np.ndarray:
    return np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), 1)


def test_sampled_one_factor_pairs_on_a_grid() -> None:
    f = full_grid([3, 4, 5, 1])  # the last factor is constant: never the differing one
    pairs = bv.sampled_one_factor_pairs(f, 2000, seed=0)
    assert pairs.shape == (2000, 2)
    diff = f[pairs[:, 0]] != f[pairs[:, 1]]
    assert (diff.sum(1) == 1).all()
    assert set(np.flatnonzero(diff.any(0))) == {0, 1, 2}  # every varying factor is drawn
    assert np.array_equal(pairs, bv.sampled_one_factor_pairs(f, 2000, seed=0))
    # duplicate rows are never paired with each other
    dup = np.concatenate([f, f])
    p2 = bv.sampled_one_factor_pairs(dup, 500)
    assert ((dup[p2[:, 0]] != dup[p2[:, 1]]).sum(1) == 1).all()
    assert len(bv.sampled_one_factor_pairs(np.zeros((10, 2), int), 5)) == 0


def test_matching_pairs_samples_above_the_exact_limit() -> None:
    f = full_grid([6, 6, 2, 3])
    pairs, dist = bv.matching_pairs(f, 1, max_pairs=300, exact_limit=100)
    assert dist == 1 and len(pairs) == 300 and ((f[pairs[:, 0]] != f[pairs[:, 1]]).sum(1) == 1).all()
    with pytest.raises(DataError, match="k=1"):
        bv.matching_pairs(f, 2, exact_limit=100)
    with pytest.raises(DataError, match="exactly one factor"):
        bv.matching_pairs(np.array([[0, 0]] * 200 + [[1, 1]] * 200), 1, exact_limit=100)


def test_ood_factor_object_color_on_mpi3d(mpi3d_prepared: Path, one_thread: None) -> None:
    from s2r.data.prepared import PreparedBenchmark

    data = PreparedBenchmark(mpi3d_prepared)
    with pytest.raises(ConfigError, match="'hue' is not a factor"):  # the scenes default does not apply to MPI3D
        bv.Method(cfg(ood_factor="hue"), data, 0)
    m = bv.Method(cfg(supervision="weak"), data, 0)
    assert m.pair_mode == "match" and m.holdout == {"object_color": [1]}
    f = data.get(data.spec.source, "train").factors
    assert not (f[m.train_idx, 0] == 1).any() and (f[:, 0] == 1).any()  # held-out colour never trains the encoder
    assert ((f[m.pairs[:, 0]] != f[m.pairs[:, 1]]).sum(1) == 1).all()
    m.setup(torch.device("cpu"), None, 2)
    assert np.isfinite(m.train_step(next(m.batches()))["loss"])


def test_evaluation_subset_is_capped_aligned_and_fixed(mpi3d_prepared: Path) -> None:
    from s2r.data.prepared import PreparedBenchmark
    from s2r.data.sources import mpi3d
    from s2r.evaluators.disentanglement import evaluation_sets

    data = PreparedBenchmark(mpi3d_prepared)
    n = int(np.prod(list(GRID.values())))
    full = evaluation_sets(bv.Method(cfg(), data, 0))
    capped = evaluation_sets(bv.Method(cfg(eval_images=20), data, 0))
    again = evaluation_sets(bv.Method(cfg(eval_images=20), data, 1))
    assert len(full["realistic"][0]) == n and len(capped["realistic"][0]) == 20 and len(capped["real"][1]) == 20
    assert np.array_equal(capped["realistic"][1], again["realistic"][1])  # the same subset for every model
    for dom, (imgs, facs) in capped.items():  # images stay aligned with their factors after subsampling
        k = mpi3d.VARIANTS.index(dom)
        assert (imgs[:, 4, 4, 0] == facs[:, 0] * 60 + 20 * k).all()
    with pytest.raises(ConfigError, match="eval_images"):
        cfg(eval_images=-1).validate()


def test_transfer_study_on_mpi3d_object_color(mpi3d_prepared: Path) -> None:
    """OOD1-A/B/C and OOD2-A split by object_color (the OOD factor is not scored there), OOD2-B realistic -> real."""
    from s2r.data.prepared import PreparedBenchmark
    from s2r.evaluators.ood_transfer import transfer_study

    data = PreparedBenchmark(mpi3d_prepared)
    from s2r.evaluators.disentanglement import evaluation_sets

    m = bv.Method(cfg(ood_holdout=[1]), data, 0)
    sets = evaluation_sets(m)
    fs, ft = sets["realistic"][1], sets["real"][1]
    z = fs.astype(float) + np.random.default_rng(0).normal(0, 0.01, fs.shape)  # a perfect code of the factors
    zt = ft.astype(float)
    res = transfer_study(z, fs, m.factor_names, m.factor_sizes, "object_color", [1], (zt, ft), regressors=("gbt",))
    assert set(res["table"]) == {"OOD1-A", "OOD1-B", "OOD1-C", "OOD2-A", "OOD2-B"}
    for sc in ("OOD1-A", "OOD1-B", "OOD1-C", "OOD2-A"):
        assert "object_color" not in res["per_factor"][sc]["gbt"]
    assert "object_color" in res["per_factor"]["OOD2-B"]["gbt"]
    assert "camera_height" not in res["per_factor"]["OOD2-B"]["gbt"]  # a constant factor is never scored


def test_sweep_grid_size_and_paper_scale() -> None:
    from s2r.tables.betavae import model_grid

    default = model_grid(tiny_section(BetavaeTablesParams, "reports.betavae_tables", betas=[1.0, 4.0, 16.0],
                                      supervisions=["unsupervised", "weak"], noises=[False, True], seeds=[0]))
    assert len(default) == 12 and default[0]["slug"] == "beta1_unsupervised_noise0_seed0"
    assert set(default[0]["overrides"]) == {"seed", "methods.betavae.beta", "methods.betavae.supervision",
                                            "methods.betavae.input_noise"}
    paper = tiny_section(BetavaeTablesParams, "reports.betavae_tables", betas=[1.0, 2.0, 4.0], seeds=list(range(10)),
                         supervisions=["unsupervised", "weak"], noises=[False, True], latent_dims=[10, 25, 50],
                         warmup_fractions=[0.0, 0.025, 0.125])
    g = model_grid(paper)
    assert len(g) == 1080 and len({x["slug"] for x in g}) == 1080
    assert {x["overrides"]["methods.betavae.latent_dim"] for x in g} == {10, 25, 50}
    assert "beta2_weak_noise1_d25_warm0.025_seed7" in {x["slug"] for x in g}
    with pytest.raises(ConfigError, match="warmup_fractions"):
        tiny_section(BetavaeTablesParams, "reports.betavae_tables", warmup_fractions=[1.5]).validate()


def test_explicit_ood_order_changes_the_ood1_splits() -> None:
    """MPI3D object_color indices (white, green, red, blue, brown, olive) are not hue order: with the recipe's
    order (red, brown, olive, green, blue, white) and green / brown held out, V = [red, olive, blue, white]."""
    from s2r.evaluators import ood_transfer as ot

    colour = np.arange(6)
    sc = ot.hue_scenarios(colour, [0, 2, 3, 5], [1, 4], order=[2, 4, 5, 1, 3, 0])
    got = {k: (colour[tr].tolist(), colour[te].tolist()) for k, (tr, te) in sc.items()}
    assert got["OOD1-A"] == ([2], [0, 3, 5])  # train on red only
    assert got["OOD1-B"] == ([0, 3], [2, 5])  # train on blue + white, extrapolate to red + olive
    assert got["OOD1-C"] == ([2, 3], [0, 5])  # alternating along hue: red, blue vs olive, white
    index_order = {k: (colour[tr].tolist(), colour[te].tolist())
                   for k, (tr, te) in ot.hue_scenarios(colour, [0, 2, 3, 5], [1, 4]).items()}
    assert index_order["OOD1-A"] == ([0], [2, 3, 5]) and index_order["OOD1-B"] != got["OOD1-B"]
    with pytest.raises(ValueError, match="ood_order"):
        ot.hue_scenarios(colour, [0, 2, 3, 5], [1, 4], order=[2, 4, 5, 1])


def test_recipe_gives_mpi3d_a_hue_order_and_every_holdout_exists() -> None:
    import yaml

    from s2r.data.sources import misc, mpi3d

    recipe = yaml.safe_load((Path(__file__).parents[1] / "pipelines/recipes/disentanglement-transfer-ood/recipe.yaml")
                            .read_text())["prepared"]
    order = [int(v) for v in recipe["mpi3d"]["ood_order"].split(",")]
    assert sorted(order) == list(range(mpi3d.FACTORS["object_color"])) and order[0] == 2  # red first, all colours
    assert recipe["trifinger"]["ood_order"] == "" and misc.TRIFINGER_FACTORS["cube_hue"] == 12  # index = hue order
    dvc = (Path(__file__).parents[1] / "pipelines/recipes/disentanglement-transfer-ood/dvc.yaml").read_text()
    assert "methods.betavae.ood_order=[${item.ood_order}]" in dvc


def test_ood_values_outside_the_factor_and_bad_orders_are_errors(mpi3d_prepared: Path) -> None:
    from s2r.data.prepared import PreparedBenchmark

    data = PreparedBenchmark(mpi3d_prepared)  # object_color has 3 values here
    with pytest.raises(ConfigError, match=r"ood_holdout.*\[4\].*object_color.*3 values"):
        bv.Method(cfg(ood_holdout=[1, 4]), data, 0)
    with pytest.raises(ConfigError, match="every value"):
        bv.Method(cfg(ood_holdout=[0, 1, 2]), data, 0)
    with pytest.raises(ConfigError, match="ood_order"):
        bv.Method(cfg(ood_order=[2, 0]), data, 0)
    m = bv.Method(cfg(ood_order=[2, 0, 1]), data, 0)
    assert m.cfg.ood_order == [2, 0, 1]


def test_an_empty_ood_scenario_is_an_error_naming_it() -> None:
    from s2r.evaluators import ood_transfer as ot

    names, sizes = ["hue", "pos"], {"hue": 12, "pos": 4}
    rng = np.random.default_rng(0)
    f = np.c_[rng.choice([0, 2, 3, 5], 80), rng.integers(0, 4, 80)]  # no image of the held-out hues 1, 4
    with pytest.raises(DataError, match="OOD2-A: no test images"):
        ot.transfer_study(f.astype(float), f, names, sizes, "hue", [1, 4], regressors=("gbt",))
    ft = np.c_[np.full(10, 4), rng.integers(0, 4, 10)]  # every target image has a held-out hue
    with pytest.raises(DataError, match="OOD2-B: all 10 target images"):
        f2 = np.r_[f, [[4, 0], [1, 1]]]
        ot.transfer_study(f2.astype(float), f2, names, sizes, "hue", [1, 4], (ft.astype(float), ft),
                          regressors=("gbt",))
