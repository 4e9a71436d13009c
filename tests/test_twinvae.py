"""Twin VAE (paper 2): packing layers, shared layers, losses with known values, stages, --init, CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import tiny_config, tiny_params_dict
from s2r.config import ConfigError, from_dict
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.methods.twinvae import (
    Config,
    Heads,
    Method,
    Packing,
    TwinVAE,
    Unpacking,
    depth_loss,
    gaussian_nll,
    kl_normal,
    median_frequency_weights,
    mmd,
    seg_loss,
)
from s2r.params import resolve_methods

TINY = resolve_methods(tiny_params_dict()["methods"])  # variants with their base merged in


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def scenes16(scenes16_prepared: Path) -> Path:
    """conftest's embedded scenes at 16 px, 4/2/2 samples per split: sim, pseudo_real, depth, masks."""
    return scenes16_prepared


def cfg(name: str = "twinvae", **kw) -> Config:
    return from_dict(Config, TINY[name] | kw, "test")


def make(prepared: Path, name: str = "twinvae", **kw) -> Method:
    torch.manual_seed(0)
    c = cfg(name, **kw)
    m = Method(c, PreparedBenchmark(prepared), 0)
    m.name = name
    return m


def test_packing_then_unpacking_restores_shape() -> None:
    x = torch.randn(2, 6, 16, 16)
    p = Packing(6, 10, d=4)
    u = Unpacking(10, 6, d=4)
    h = p(x)
    assert h.shape == (2, 10, 8, 8)  # space-to-depth halves H, W
    assert u(h).shape == x.shape
    assert isinstance(p.conv3d, torch.nn.Conv3d) and p.conv.in_channels == 6 * 4 * 4  # 4C folded x d filters


def test_architecture_table2_at_256px() -> None:
    """The paper's widths: 6 packing layers take 256 px to a 300 x 4 x 4 latent and back to 3 x 256 x 256."""
    c = tiny_config("twinvae", stem_channels=64, pack_channels=[76, 88, 100, 128, 200, 250], latent_channels=300,
                    pack_d=8)
    c.validate()
    twin = TwinVAE(3, c)
    packs = [m for m in twin.enc_r.private.modules() if isinstance(m, Packing)]
    unpacks = [m for m in twin.dec_r.modules() if isinstance(m, Unpacking)]
    assert [p.conv.out_channels for p in packs] == [76, 88, 100, 128, 200, 250]
    assert len(unpacks) == 6 and twin.enc_r.shared.mu.out_channels == 300
    with torch.no_grad():  # the same depth, narrow: 6 packings take 128 px to 2 x 2 and back
        small = TwinVAE(3, tiny_config("twinvae", stem_channels=2, pack_channels=[2, 2, 2, 2, 2, 4],
                                       latent_channels=6, pack_d=8))
        lat = small.enc_r(torch.randn(2, 3, 128, 128))
        assert lat.z.shape == (2, 6, 2, 2) and small.dec_s(lat.z).shape == (2, 3, 128, 128)


def test_shared_layers_are_the_same_objects() -> None:
    twin = TwinVAE(3, cfg())
    assert twin.enc_r.shared is twin.enc_s.shared and twin.dec_r.shared is twin.dec_s.shared
    assert twin.enc_r.shared.mu.weight is twin.enc_s.shared.mu.weight  # the same tensor object
    assert twin.enc_r.private is not twin.enc_s.private and twin.dec_r.private is not twin.dec_s.private
    w_r = next(twin.enc_r.private.parameters())
    w_s = next(twin.enc_s.private.parameters())
    assert w_r is not w_s and not torch.equal(w_r, w_s)
    names = {id(p) for p in twin.parameters()}
    assert len(names) == len(list(twin.parameters()))  # shared parameters counted once by the optimiser
    convs = [m.weight for m in twin.modules() if isinstance(m, torch.nn.Conv2d)]
    w = torch.cat([c.detach().flatten() for c in convs])
    std = cfg().init_std
    assert abs(float(w.std()) - std) < 0.15 * std and abs(float(w.mean())) < 0.1 * std  # Gaussian init N(0, std)


def test_first_three_decoder_weights_are_shared() -> None:
    """Section 3.2: "the first three weights of each decoder are shared": layer 11's transposed conv and layer 12's
    2D conv + unpacking 3D conv are one object in G_R and G_S; each head has its own copy (Table 2 note (*))."""
    def weights(module: torch.nn.Module) -> list[torch.Tensor]:
        return [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d,
                                                                       torch.nn.Conv3d))]

    c = cfg()
    assert c.shared_decoder_weights == 3  # params.yaml default = the paper's text
    twin = TwinVAE(3, c)
    shared = weights(twin.dec_r.shared)
    assert len(shared) == 3 and all(a is b for a, b in zip(shared, weights(twin.dec_s.shared)))
    assert len(weights(twin.enc_r.shared)) == 3  # the encoder side: layer 10 conv, mu, logvar
    first_private = weights(twin.dec_r.private)[0]
    assert first_private is not weights(twin.dec_s.private)[0]
    heads = Heads(15, c)
    assert not set(map(id, weights(heads.depth.shared))) & set(map(id, weights(heads.seg.shared)))
    assert heads.seg(torch.zeros(2, c.latent_channels, 4, 4)).shape[1] == 15
    table = cfg(shared_decoder_weights=1)
    t1 = TwinVAE(3, table)
    assert len(weights(t1.dec_r.shared)) == 1
    z = torch.randn(2, c.latent_channels, 4, 4)
    assert t1.dec_r(z).shape == twin.dec_r(z).shape  # the same network, only the sharing differs
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(t1) - n(twin) == sum(p.numel() for p in twin.dec_r.shared.net[3].parameters())  # layer 12 counted once
    with pytest.raises(ConfigError, match="shared_decoder_weights"):
        cfg(shared_decoder_weights=2).validate()


def test_reparameterisation_samples_every_forward() -> None:
    twin = TwinVAE(3, cfg())
    x = torch.randn(2, 3, 16, 16)
    a, b = twin.enc_s(x), twin.enc_s(x)
    assert not torch.equal(a.z, b.z)
    twin.eval()
    c, d = twin.enc_s(x), twin.enc_s(x)
    assert torch.equal(c.mu, d.mu) and not torch.equal(c.z, d.z)  # sampling even in eval; the mean is fixed


def test_mmd_near_zero_for_same_gaussian_and_grows_with_shift() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)
    sigma2 = 8.0
    same = float(mmd(x, y, sigma2))
    shifts = [float(mmd(x, y + s, sigma2)) for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.01
    assert same < shifts[0] < shifts[1] < shifts[2]
    assert float(mmd(x, x, sigma2)) == pytest.approx(0.0, abs=1e-6)


def test_kl_and_reconstruction_known_values() -> None:
    z = torch.zeros(2, 3, 4, 4)
    assert float(kl_normal(z, z)) == 0.0  # q = N(0, 1) = prior
    assert float(kl_normal(z + 1, z)) == pytest.approx(0.5)  # 0.5 * mu^2
    assert float(kl_normal(z, z + np.log(4.0))) == pytest.approx(0.5 * (4 - 1 - np.log(4)))
    x = torch.zeros(1, 3, 4, 4)
    assert float(gaussian_nll(x + 2, x)) == pytest.approx(2.0)  # 0.5 * 2^2


def test_depth_and_segmentation_losses_known_values() -> None:
    depth = torch.tensor([[[2.0, 0.0], [4.0, 1.0]]])  # one invalid pixel
    pred = (2 * depth / 4.0 - 1).unsqueeze(1)  # exact normalised depth
    assert float(depth_loss(pred, depth, 4.0)) == 0.0
    assert float(depth_loss(pred + 0.5, depth, 4.0)) == pytest.approx(0.25)  # invalid pixel ignored
    logits = torch.zeros(1, 4, 2, 2)
    masks = torch.tensor([[[0, 1], [2, 255]]])
    assert float(seg_loss(logits, masks)) == pytest.approx(np.log(4))  # uniform over 4 classes, 255 ignored
    # a batch with no labelled pixel (KITTI depth frames: all-255 masks) is 0 with zero gradient, not NaN
    lg = torch.randn(2, 4, 2, 2, requires_grad=True)
    loss = seg_loss(lg, torch.full((2, 2, 2), 255))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(lg.grad.abs().sum()) == 0.0
    assert float(depth_loss(pred, torch.zeros_like(depth), 4.0)) == 0.0  # no valid depth: 0, not NaN


def test_median_frequency_weights_and_weighted_ce_known_values() -> None:
    """Eigen & Fergus 2015: w_c = median(f) / f_c over present classes; absent classes 0; 255 ignored."""
    masks = np.array([[[0, 0, 0, 0], [0, 0, 1, 1], [2, 255, 255, 255]]], np.uint8)  # f = 6/9, 2/9, 1/9
    w = median_frequency_weights(masks, 4)
    assert w == pytest.approx([(2 / 9) / (6 / 9), 1.0, (2 / 9) / (1 / 9), 0.0])
    logits = torch.zeros(1, 4, 1, 2)
    m = torch.tensor([[[0, 2]]])
    wt = torch.from_numpy(w)
    # sum of weighted per-pixel CE over labelled pixels / their count: (1/3 + 2) log 4 / 2
    assert float(seg_loss(logits, m, wt)) == pytest.approx((1 / 3 + 2) * np.log(4) / 2)


def test_seg_weighting_and_logvar_init_options(scenes16: Path) -> None:
    """seg_weighting: median_frequency weights the CE by the supervised domain's train masks; logvar_bias_init
    sets the initial posterior variance exp(bias) of the shared encoder."""
    m = make(scenes16, "twinvae_targetsup", seg_weighting="median_frequency", logvar_bias_init=-6.0)
    assert m.seg_weight is not None
    assert m.seg_weight.numpy() == pytest.approx(median_frequency_weights(m.sup.masks, len(m.seg_classes)))
    bias = m.encoder.shared.logvar.bias.detach()
    assert float(bias.min()) == float(bias.max()) == -6.0
    plain = make(scenes16, "twinvae_targetsup", seg_weighting="none", logvar_bias_init=0.0)
    assert plain.seg_weight is None and float(plain.encoder.shared.logvar.bias.detach().abs().max()) == 0.0
    twin = make(scenes16, "twinvae", logvar_bias_init=-4.0)
    assert float(twin.twin.enc_r.shared.logvar.bias.detach().mean()) == -4.0 and twin.seg_weight is None
    x = twin._t(twin.real_val.images[:2])
    assert float(twin.twin.enc_r(x).logvar.detach().mean()) == pytest.approx(-4.0, abs=0.5)


def test_domain_a_picks_the_labelled_sim_side_and_the_target_stays_the_real_side(scenes16: Path) -> None:
    """domain_a: '' is the benchmark's source; another domain (toy) feeds the sim encoder, the sim-only bound, the
    stage-2 labels, the median-frequency weights and the sim validation images; the target cannot be named."""
    data = PreparedBenchmark(scenes16)
    toy, sim, target = data.get("toy", "train"), data.get("sim", "train"), data.get("pseudo_real", "train")
    assert not np.array_equal(toy.images, sim.images)
    default = make(scenes16, "twinvae_simonly")
    assert (default.domain_a, default.domain_b) == ("sim", "pseudo_real")
    assert np.array_equal(default.sup.images, sim.images)
    lower = make(scenes16, "twinvae_simonly", domain_a="toy", seg_weighting="median_frequency")
    assert (lower.domain_a, lower.domain_b) == ("toy", "pseudo_real")
    assert np.array_equal(lower.sup.images, toy.images) and np.array_equal(lower.sim.images, toy.images)
    assert np.array_equal(lower.sim_val.images, data.get("toy", "val").images)
    assert lower.seg_weight.numpy() == pytest.approx(median_frequency_weights(toy.masks, len(lower.seg_classes)))
    upper = make(scenes16, "twinvae_targetsup", domain_a="toy")
    assert np.array_equal(upper.sup.images, target.images)
    twin = make(scenes16, "twinvae", domain_a="toy", batch_size=2)
    batch = next(twin.batches())
    assert all(any(np.array_equal(x, t) for t in toy.images) for x in batch.images)
    assert all(any(np.array_equal(x, t) for t in target.images) for x in batch.real)
    with pytest.raises(ConfigError, match="'domain_a'.*target"):
        make(scenes16, "twinvae", domain_a="pseudo_real")
    with pytest.raises(DataError, match="'nope'"):
        make(scenes16, "twinvae", domain_a="nope")


@pytest.mark.parametrize("name", ["twinvae", "twinvae_heads", "twinvae_simonly", "twinvae_targetsup"])
def test_loss_terms_per_stage(scenes16: Path, name: str) -> None:
    """The Eq. 1-20 terms each stage reports (finite losses and gradients: tests/test_contract.py)."""
    m = make(scenes16, name)
    m.initialised = True  # stage 2 without stage 1 weights: shapes and gradients only
    m.setup(torch.device("cpu"), None, 2)
    out = m.losses(next(m.batches()))
    expected = {"twinvae": {"kl_r", "kl_s", "nll_r", "nll_s", "mse_r", "mse_s", "mmd_r", "mmd_s", "cycle_r",
                            "cycle_s"},
                "twinvae_heads": {"kl_r2d", "kl_s2d", "mmd_s2r", "mmd_r2s", "depth_s", "depth_r", "seg_s", "seg_r"}}
    assert expected.get(name, {"kl", "depth", "seg"}) | {"loss"} == set(out)


def test_vae_batches_are_unpaired(scenes16: Path) -> None:
    """Sim and real images are drawn independently (the benchmark renders the same scenes in both domains)."""
    m = make(scenes16, batch_size=2)  # 2 of 4 train images per domain and batch
    pairs = []
    for _, b in zip(range(10), m.batches()):
        sim_ids = [m.sim.images.tolist().index(x.tolist()) for x in b.images]
        real_ids = [m.real.images.tolist().index(x.tolist()) for x in b.real]
        pairs.append(sim_ids != real_ids)
    assert any(pairs)


def test_stage2_loads_stage1_weights_and_checks_them(scenes16: Path, tmp_path: Path) -> None:
    stage1 = make(scenes16)
    torch.save({"method": "twinvae", "config": stage1.cfg.__dict__ | {}, "state": stage1.state_dict(),
                "mlflow_run_id": "r1", "data_version": "v"}, _mkdir(tmp_path / "s1") / "model.pt")
    stage2 = make(scenes16, "twinvae_heads")
    with pytest.raises(ConfigError, match="--init"):
        stage2.setup(torch.device("cpu"), None, 2)
    info = stage2.init_from(tmp_path / "s1")
    assert info["init_run_id"] == "r1"
    for k, v in stage1.twin.state_dict().items():
        assert torch.equal(stage2.twin.state_dict()[k], v), k
    stage2.setup(torch.device("cpu"), None, 2)  # initialised now
    other = make(scenes16, "twinvae_heads", latent_channels=8)
    with pytest.raises(ConfigError, match="latent_channels"):
        other.init_from(tmp_path / "s1")
    with pytest.raises(ConfigError, match="domain_a"):  # heads on toy labels from a twin VAE that learnt sim
        make(scenes16, "twinvae_heads", domain_a="toy").init_from(tmp_path / "s1")
    torch.save({"method": "twinvae_simonly", "config": {"stage": "supervised"}, "state": {}},
               _mkdir(tmp_path / "bad") / "model.pt")
    with pytest.raises(ValueError, match="not a stage-1 twin VAE"):
        make(scenes16, "twinvae_heads").init_from(tmp_path / "bad")


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_capabilities_shapes(scenes16: Path) -> None:
    m = make(scenes16, "twinvae_heads")
    imgs = np.asarray(m.real_val.images)
    assert m.encode(imgs).shape == (len(imgs), 4 * 4 * 4)
    assert m.translate(imgs, "a2b").shape == imgs.shape and m.translate(imgs).dtype == np.uint8
    p = m.predict(imgs)
    assert p["depth"].shape == imgs.shape[:3] and p["mask"].shape == imgs.shape[:3]
    assert (p["depth"] >= 0).all() and (p["depth"] <= 4.0).all() and p["mask"].max() < 6
    np.testing.assert_array_equal(m.predict(imgs)["mask"], p["mask"])  # posterior mean: deterministic
    out = m.export_model()(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 1 + 6, 16, 16)
    with pytest.raises(ValueError, match="no depth/segmentation heads"):
        make(scenes16).predict(imgs)


def test_heads_only_option_and_sampling_at_inference(scenes16: Path) -> None:
    m = make(scenes16, "twinvae_heads", train_vae_in_heads=False, inference_sample=True)  # Section 3: z sampled
    m.initialised = True
    m.setup(torch.device("cpu"), None, 2)
    assert {id(p) for p in m.optimizers["net"].param_groups[0]["params"]} == {id(p) for p in m.heads.parameters()}
    m.losses(next(m.batches()))["loss"].backward()
    assert all(p.grad is None for p in m.twin.parameters())  # frozen twin VAE
    assert all(p.grad is not None for p in m.heads.parameters())
    imgs = np.asarray(m.real_val.images)
    state = torch.get_rng_state()
    first = m.predict(imgs)["depth"]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert np.array_equal(first, m.predict(imgs)["depth"])  # repeatable: samples from a generator seeded by the seed
    m.seed = 1
    sampled = m.predict(imgs)["depth"]
    assert not np.array_equal(first, sampled)  # z sampled at inference (another seed, another sample)
    m.cfg.inference_sample = False
    mean = m.predict(imgs)["depth"]
    m.seed = 0
    assert np.array_equal(mean, m.predict(imgs)["depth"]) and not np.array_equal(mean, first)  # the mean option


def test_gap_closed_known_values() -> None:
    from s2r.tables.twinvae import gap_closed

    assert gap_closed(0.5, 0.3, 0.1, higher_better=False) == pytest.approx(0.5)  # AbsRel 0.5 -> 0.3 of 0.5 -> 0.1
    assert gap_closed(0.2, 0.5, 0.6, higher_better=True) == pytest.approx(0.75)  # mIoU
    assert gap_closed(0.2, 0.1, 0.6, higher_better=True) == pytest.approx(-0.25)  # worse than sim only
    assert gap_closed(0.3, 0.1, 0.4, higher_better=False) is None  # "upper" worse than "lower": no gap
    assert gap_closed(0.3, None, 0.1, higher_better=False) is None  # a metric absent (no labels in the split)


def test_gap_closed_is_na_unless_both_bounds_trained_on_the_task() -> None:
    from s2r.tables.twinvae import build

    def res(abs_rel: float, miou: float, tasks: list[str] | None) -> dict:
        r = {"abs_rel": abs_rel, "sq_rel": 1.0, "rmse": 1.0, "log_rmse": 1.0, "a1": 0.5, "a2": 0.6, "a3": 0.7,
             "miou": miou, "pixel_accuracy": 0.5}
        return r if tasks is None else r | {"trained_tasks": tasks}

    both = ["depth", "segmentation"]
    out = build({"lower": res(0.5, 0.2, both), "ours": res(0.3, 0.5, both), "upper": res(0.1, 0.6, ["depth"])})
    assert out["gap_closed"]["abs_rel"] == pytest.approx(0.5) and out["gap_closed"]["miou"] is None
    seg = out["tables"]["segmentation"]
    assert seg["mIoU"].iloc[-1] == "n/a (bound not trained on segmentation)"
    assert seg["Network"].iloc[2].endswith("(head not trained)") and "not trained" not in seg["Network"].iloc[0]
    full = build({"lower": res(0.5, 0.2, both), "ours": res(0.3, 0.5, both), "upper": res(0.1, 0.6, both)})
    assert full["gap_closed"]["miou"] == pytest.approx(0.75)
    unknown = build({"lower": res(0.5, 0.2, None), "ours": res(0.3, 0.5, both), "upper": res(0.1, 0.6, both)})
    assert unknown["gap_closed"]["abs_rel"] is None and unknown["gap_closed"]["miou"] is None  # not stated


def test_val_sim_metrics_read_sim_images_with_the_sim_encoder(scenes16: Path) -> None:
    m = make(scenes16, "twinvae_heads", inference_sample=False)
    m.initialised = True
    m.setup(torch.device("cpu"), None, 2)
    imgs = np.asarray(m.sim_val.images)
    from_s, from_r = m.predict(imgs, domain="sim")["depth"], m.predict(imgs, domain="real")["depth"]
    assert not np.array_equal(from_s, from_r)  # E_S and E_R differ (private layers)
    calls: list[str] = []
    orig = m.predict

    def spy(images: np.ndarray, batch_size: int = 64, domain: str = "real") -> dict:
        calls.append(domain)
        return orig(images, batch_size, domain)

    m.predict = spy  # type: ignore[method-assign]
    out = m.validate()
    assert calls == ["sim", "real"] and {"val_sim_abs_rel", "val_real_abs_rel"} <= set(out)
    base = make(scenes16, "twinvae_simonly", inference_sample=False)
    base.setup(torch.device("cpu"), None, 2)
    assert np.array_equal(base.predict(imgs, domain="sim")["depth"], base.predict(imgs)["depth"])  # one encoder
    assert base.trained_tasks() == ["depth", "segmentation"] and make(scenes16).trained_tasks() == []


def test_driving_adapters_vkitti_classes_give_15_outputs_scoring_12(tmp_path: Path) -> None:
    """Paper 2: the segmentation decoder outputs VKITTI's 15 categories (Table 2 (**)); 12 shared are scored."""
    from s2r.data.benchmark import DataError, load_benchmark
    from s2r.data.sources import add, driving
    from s2r.data.sources.generic import merge
    from s2r.params import load_params

    opts = {"image_size": 8, "classes": "vkitti"}
    v = Path(add("vkitti2", driving.vkitti2_fixture(tmp_path / "rv"), tmp_path / "v", options=opts)["benchmark"])
    k = Path(add("kitti", driving.kitti_fixture(tmp_path / "rk"), tmp_path / "k", options=opts)["benchmark"])
    spec, _ = load_benchmark(merge([v, k], tmp_path / "m", name="vk", source="vkitti2", target="kitti"))
    assert len(spec.seg_classes) == 15 and spec.seg_classes[:12] == driving.SHARED_CLASSES
    assert spec.seg_classes[12:] == ["tree", "misc", "undefined"]
    tree = np.array([[driving.VKITTI_COLORS["Tree"], driving.VKITTI_COLORS["Undefined"]]], np.uint8)
    ids = driving.vkitti_mask(tree, driving.read_colors(None, driving.VKITTI_TO_FULL), Path("x.png"))
    assert ids.tolist() == [[12, 14]]  # own classes, not vegetation / ignore as with classes: shared
    assert Heads(len(spec.seg_classes), cfg("twinvae_heads")).seg.private.net[-1].out_channels == 15
    recipe = yaml.safe_load((Path(__file__).parents[1] / "pipelines/recipes/twin-vae-depth-segmentation/recipe.yaml")
                            .read_text())
    assert all(src["options"]["classes"] == "vkitti" for src in recipe["sources"].values())
    p = load_params(Path(__file__).parents[1] / "pipelines/recipes/twin-vae-depth-segmentation/params.yaml")
    assert p.reports.depth_segmentation.classes == driving.SHARED_CLASSES  # the 12 scored
    s = Path(add("vkitti2", driving.vkitti2_fixture(tmp_path / "rs"), tmp_path / "s",
                 options={"image_size": 8})["benchmark"])
    with pytest.raises(DataError, match="differs"):  # a 12-class and a 15-class part do not merge
        merge([s, k], tmp_path / "x", name="x", source="vkitti2", target="kitti")
    with pytest.raises(DataError, match="classes"):
        add("kitti", driving.kitti_fixture(tmp_path / "rk2"), tmp_path / "k2", options={"classes": "all"})


def test_config_errors_name_keys(scenes16: Path) -> None:
    with pytest.raises(ConfigError, match="pack_d"):
        cfg(pack_d=3)
    with pytest.raises(ConfigError, match="pack_channels"):
        make(scenes16, pack_channels=[4, 8, 8, 8, 8])  # 16 px / 2^5 is not whole


def test_cli_train_evaluate_tables(scenes16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 -> stage 2 (--init) -> evaluate; both baselines; the Table 1 file; the report."""
    from s2r.cli import main

    monkeypatch.chdir(tmp_path)
    raw = tiny_params_dict()
    raw["tracking"]["log_model"] = False
    raw["methods"]["twinvae_targetsup"]["w_seg"] = 0.0  # the recipe's upper bound: no segmentation training
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = CliRunner().invoke
    d, p = str(scenes16), ["--params", str(params)]
    r = run(main, ["train", "twinvae", "--data", d, "--out", "m/twinvae", *p])
    assert r.exit_code == 0, r.output
    r = run(main, ["train", "twinvae_heads", "--data", d, "--out", "m/heads", *p])
    assert r.exit_code == 2 and "--init" in r.output  # stage 2 needs stage 1
    for name, extra in (("twinvae_heads", ["--init", "m/twinvae"]), ("twinvae_simonly", []),
                        ("twinvae_targetsup", [])):
        r = run(main, ["train", name, "--data", d, "--out", f"m/{name}", "--metrics", f"x/{name}/train.json", *extra,
                       *p])
        assert r.exit_code == 0, r.output
        r = run(main, ["evaluate", name, "--model", f"m/{name}", "--data", d, "--out", f"x/{name}/evaluate.json",
                       "--plots", f"plots/{name}", *p])
        assert r.exit_code == 0, r.output
        res = json.loads(Path(f"x/{name}/evaluate.json").read_text())
        assert 0 <= res["abs_rel"] and 0 <= res["miou"] <= 1 and res["domain"] == "pseudo_real"
        assert Path(f"plots/{name}/panels.png").stat().st_size > 0
    import mlflow

    runs = mlflow.search_runs(experiment_names=["s2r/paper2-twin-vae-depth-segmentation"],
                              filter_string="tags.mlflow.runName = 'train@twinvae_heads-seed0'")
    assert runs["tags.init_model"].iloc[0] == "m/twinvae"
    r = run(main, ["tables", "twinvae", "--ours", "x/twinvae_heads/evaluate.json", "--lower",
                   "x/twinvae_simonly/evaluate.json", "--upper", "x/twinvae_targetsup/evaluate.json", "--out", "t", *p])
    assert r.exit_code == 0, r.output
    table = Path("t/table1.md").read_text()
    assert "Sim only (lower bound)" in table and "Gap closed" in table and "mIoU" in table
    metrics = json.loads(Path("t/metrics.json").read_text())
    assert set(metrics) >= {"ours.abs_rel", "gap_closed.miou"} and metrics["gap_closed.miou"] is None
    assert "n/a (bound not trained on segmentation)" in table and "(head not trained)" in table
    assert json.loads(Path("x/twinvae_targetsup/evaluate.json").read_text())["trained_tasks"] == ["depth"]
    r = run(main, ["report", "--metrics-dir", "x"])
    assert r.exit_code == 0 and "twinvae_heads" in r.output, r.output
