"""Paper 5: CUT on random patches (PatchNCE, patches, resume), refine, downstream segmenter, tables, cut_patch study."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import tiny_params_dict, tiny_section
from s2r import stages, tune
from s2r.cli import main
from s2r.config import ConfigError, TrainParams, from_dict
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark, prepare
from s2r.methods import common, cut, segmenter
from s2r.params import load_params
from s2r.train import fit, load_checkpoint

TRAIN = tiny_section(TrainParams, "train", device="cpu", checkpoint_every=100, progress=False)


@pytest.fixture(scope="module")
def scenes16(scenes16_prepared: Path) -> Path:
    """conftest's embedded scenes at 16 px, 4/2/2 samples per split: sim, pseudo_real, depth, masks."""
    return scenes16_prepared


def tiny_cfg(**kw: object) -> cut.Config:
    raw = tiny_params_dict()["methods"]["cut"] | kw
    return from_dict(cut.Config, raw, "test", "methods.cut")


def make_cut(data: Path, seed: int = 0, **kw: object) -> cut.Method:
    torch.manual_seed(seed)  # weight init (stages.train seeds it through seed_everything)
    m = cut.Method(tiny_cfg(**kw), PreparedBenchmark(data), seed)
    m.setup(torch.device("cpu"), None, 4)
    return m


def seg_cfg(**kw: object) -> segmenter.Config:
    raw = tiny_params_dict()["methods"]["segmenter_synthetic"] | kw
    return from_dict(segmenter.Config, raw, "test", "methods.segmenter")


# -- PatchNCE ---------------------------------------------------------------------------------------------------
def test_patch_nce_hand_computed_value() -> None:
    """B=1, P=2, one-hot features, T=1: logits of patch 0 are [q.k+ = 1, masked diagonal -10, q.k_1 = 0]."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = -math.log(math.e / (math.e + math.exp(-10) + 1.0))  # both patches are symmetric
    assert cut.patch_nce_loss(q, q.clone(), 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_patch_nce_dominant_positive_near_zero_uninformative_near_log_n() -> None:
    p = 16
    onehot = torch.eye(p)[None].repeat(2, 1, 1)  # (B=2, P, C=P): orthonormal patches
    assert cut.patch_nce_loss(onehot, onehot.clone(), 0.07).item() < 1e-4
    same = torch.nn.functional.normalize(torch.ones(2, p, 4), dim=-1)  # every key equally similar
    assert cut.patch_nce_loss(same, same.clone(), 0.07).item() == pytest.approx(math.log(p), rel=1e-4)
    shuffled = onehot[:, torch.randperm(p, generator=torch.Generator().manual_seed(0))]
    assert cut.patch_nce_loss(shuffled, onehot, 0.07).item() > 10  # positive at the wrong place: large


def test_patch_nce_invariant_to_shared_permutation_and_detaches_keys() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 10, 5, generator=g), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(3, 10, 5, generator=g), dim=-1).requires_grad_()
    perm = torch.randperm(10, generator=g)
    base = cut.patch_nce_loss(q, k, 0.07)
    assert cut.patch_nce_loss(q[:, perm], k[:, perm], 0.07).item() == pytest.approx(base.item(), rel=1e-6)
    base.backward()
    assert q.grad is not None and k.grad is None  # CUT: gradients flow through the output patches only


def test_same_patch_locations_for_input_and_output(scenes16: Path) -> None:
    m = make_cut(scenes16)
    seen: list[list[torch.Tensor]] = []
    orig = m.heads.forward

    def spy(feats: list[torch.Tensor], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(ids)
        return orig(feats, ids)

    m.heads.forward = spy  # type: ignore[method-assign]
    a = torch.rand(2, 3, 8, 8) * 2 - 1
    m.nce_loss(a, m.g(a))
    assert len(seen) == 2 and all(torch.equal(x, y) for x, y in zip(*seen))
    assert [len(i) for i in seen[0]] == [16, 16, 4, 4]  # min(num_patches, H*W) per layer (8, 4, 2, 2 px maps)


def test_identical_input_and_output_features_give_low_nce(scenes16: Path) -> None:
    """With G(x) = x the projected patches coincide: the loss is far below an unrelated output's."""
    m = make_cut(scenes16, nce_mlp_dim=32, num_patches=64)
    torch.manual_seed(0)
    for mlp in m.heads.mlps:  # larger heads than CUT's init so projections are distinct
        for layer in mlp:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, 0, 1.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    m.cfg.nce_layers = [0]
    same = m.nce_loss(x, x).item()
    other = m.nce_loss(x, torch.rand(2, 3, 16, 16) * 2 - 1).item()
    assert same < other


# -- patches and generator ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "expected"), [(8, 8), (9, 8), (10, 8), (11, 12), (21, 20), (70, 72), (60, 60)])
def test_round_to_multiple_of_4_like_cut(size: int, expected: int) -> None:
    assert cut.round_to_4(size) == expected


def test_random_crops_and_bicubic_rescale(scenes16: Path) -> None:
    m = make_cut(scenes16)  # patch_size 9
    batch = next(m.batches())
    assert batch.a.shape == (4, 9, 9, 3) and batch.b.shape == (4, 9, 9, 3) and batch.a.dtype == np.uint8
    x = m._prepare(batch.a)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    imgs = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6, 1)
    crops = cut.random_crops(imgs, 3, np.random.default_rng(0))
    for img, c in zip(imgs, crops):  # every crop is a contiguous window of its own image
        hits = [(y, x) for y in range(4) for x in range(4) if np.array_equal(img[y : y + 3, x : x + 3], c)]
        assert len(hits) == 1
    assert cut.random_crops(imgs, 0, np.random.default_rng(0)).shape == imgs.shape  # 0 = full image
    with pytest.raises(ConfigError, match="patch_size"):
        cut.random_crops(imgs, 7, np.random.default_rng(0))


def test_generator_keeps_shape_and_full_resolution_inference(scenes16: Path) -> None:
    m = make_cut(scenes16)
    for h, w in ((13, 18), (16, 16), (7, 9)):
        assert m.g(torch.rand(1, 3, h, w)).shape == (1, 3, h, w)
    imgs = np.asarray(PreparedBenchmark(scenes16).get("sim", "test").images)
    out = m.translate(imgs)  # trained on 8 px patches, applied to 16 px images
    assert out.shape == imgs.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="one-sided"):
        m.translate(imgs, "b2a")


def test_every_parameter_of_g_d_and_heads_gets_a_gradient(scenes16: Path) -> None:
    m = make_cut(scenes16)
    assert sum(p.numel() for p in m.heads.parameters()) > 0  # heads exist before any batch
    opt_params = {id(p) for p in m.optimizers["f"].param_groups[0]["params"]}
    assert opt_params == {id(p) for p in m.heads.parameters()}
    batch = next(m.batches())
    a, b = m._prepare(batch.a), m._prepare(batch.b)
    fake = m.forward_fake(a, b)
    m.generator_loss(a, b, fake)["loss_g"].backward()
    d_loss = common.lsgan_d_loss(m.d(b), m.d(fake[:4].detach()), torch.ones(1), torch.zeros(1))
    d_loss.backward()
    for name, p in m.named_parameters():
        if name.startswith(("g.", "d.", "heads.")):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    losses = m.train_step(next(m.batches()))
    assert all(math.isfinite(v) for v in losses.values())
    assert {"loss_nce_x", "loss_nce_y", "loss_gan_g", "loss_d"} <= set(losses)


def test_eq2_total_and_reduce_options(scenes16: Path) -> None:
    """`mean` = the official code (cut_model.compute_G_loss): L_GAN + 0.5 lambda_NCE (X + Y); `sum` = Eq. 2."""
    m = make_cut(scenes16, lambda_nce=2.0, nce_reduce="mean")
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    out = m.generator_loss(a, b, m.forward_fake(a, b))
    expected = out["loss_gan_g"] + 2.0 * 0.5 * (out["loss_nce_x"] + out["loss_nce_y"])  # CUT's code
    assert out["loss_g"].item() == pytest.approx(expected.item(), rel=1e-5)
    m.cfg.nce_reduce = "sum"
    torch.manual_seed(0)
    out = m.generator_loss(a, b, m.forward_fake(a, b))
    expected = out["loss_gan_g"] + 2.0 * (out["loss_nce_x"] + out["loss_nce_y"])  # Eq. 2 as printed
    assert out["loss_g"].item() == pytest.approx(expected.item(), rel=1e-5)
    m.cfg.nce_reduce, m.cfg.nce_idt = "mean", False
    out = m.generator_loss(a, b, m.forward_fake(a, b))  # without the identity term CUT weights NCE_X by lambda
    assert out["loss_g"].item() == pytest.approx((out["loss_gan_g"] + 2.0 * out["loss_nce_x"]).item(), rel=1e-5)


def recipe_cut_cfg() -> cut.Config:
    """methods.cut of the paper-5 recipe (CUT's widths)."""
    raw = yaml.safe_load((Path(__file__).parents[1] / "pipelines/recipes/cut-patch-refinement/params.yaml")
                         .read_text())
    return from_dict(cut.Config, raw["methods"]["cut"], "recipe", "methods.cut")


def test_recipe_networks_have_the_official_parameter_counts_and_nce_shapes() -> None:
    """CUT (resnet_9blocks, basic D, mlp_sample F, ngf = ndf = 64, netF_nc 256): G 11,378,179, D 2,764,737,
    F 560,384; NCE features of layers 0, 4, 8, 12, 16 have CUT's shapes (built at 32 px: counts don't depend on it)."""
    cfg = recipe_cut_cfg()
    assert cfg.antialias and cfg.nce_reduce == "mean" and cfg.disc_channels == [64, 128, 256, 512]
    torch.manual_seed(0)
    g, d, f = cut.build_networks(cfg, 3)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert (count(g), count(d), count(f)) == (11_378_179, 2_764_737, 560_384)
    with torch.no_grad():
        feats = cut.encode_layers(g, torch.zeros(1, 3, 32, 32), cfg.nce_layers)
    assert [tuple(x.shape) for x in feats] == [(1, 3, 38, 38), (1, 128, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8),
                                               (1, 256, 8, 8)]  # CUT: padded input, convs before blur-pool, blocks
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) and m.affine for m in [*g.modules(), *d.modules()])
    w = g.net[12].body[1].weight  # a residual conv: xavier_normal gain 0.02, std = 0.02 sqrt(2 / (fan_in + fan_out))
    assert w.std().item() == pytest.approx(0.02 * math.sqrt(2 / (2 * 256 * 9)), rel=0.02)
    assert d.net[-1].bias.abs().sum() == 0
    no_aa = cut.build_networks(from_dict(cut.Config, {**vars(cfg), "antialias": False,
                                                      "nce_layers": [0, 4, 7, 10, 14]}, "t", "m"), 3)
    assert [count(n) for n in no_aa] == [11_378_179, 2_764_737, 560_384]  # the same weights, strided layout


def _receptive_field(d: torch.nn.Module, size: int) -> int:
    """Side of the input region that reaches the centre output unit (norms removed: they couple all pixels)."""
    d = copy.deepcopy(d)
    for i, layer in enumerate(d.net):
        if isinstance(layer, torch.nn.InstanceNorm2d):
            d.net[i] = torch.nn.Identity()
    x = torch.randn(1, 3, size, size, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = (x.grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero()
    return int(rows.max() - rows.min() + 1)


def test_discriminator_is_cuts_basic_patchgan_with_70px_receptive_field() -> None:
    torch.manual_seed(0)
    d = cut.Discriminator(3, [4, 4, 4, 4], last_stride1=True, affine=False, init="xavier")
    assert _receptive_field(d, 160) == 70  # pix2pix / CUT "70x70 PatchGAN"
    assert cut.Discriminator.out_size(90, 3, 1) == tuple(d(torch.zeros(1, 3, 90, 90)).shape)[-1]
    aa = cut.Discriminator(3, [4, 4, 4, 4], last_stride1=True, antialias=True, affine=False, init="xavier")
    assert aa(torch.zeros(1, 3, 90, 90)).shape == d(torch.zeros(1, 3, 90, 90)).shape  # blur-pool: same map size
    assert _receptive_field(aa, 200) > 70  # the blur kernels widen it (CUT's default D)


def test_blur_pool_keeps_constants_and_removes_the_nyquist_frequency() -> None:
    from s2r.methods.cyclegan import BlurDownsample, BlurUpsample

    x = torch.full((1, 2, 9, 10), 0.7)
    assert torch.allclose(BlurDownsample(2)(x), torch.full((1, 2, 5, 5), 0.7))  # (B, C, ceil(H/2), ceil(W/2))
    assert torch.allclose(BlurUpsample(2)(x), torch.full((1, 2, 18, 20), 0.7))
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1  # +-1 alternating: highest frequency
    down = BlurDownsample(1)(checker[None, None])
    assert down[0, 0, 1:, 1:].abs().max() < 1e-6  # [1, 2, 1] / 4 in both directions cancels it (interior)
    plain = checker[None, None, ::2, ::2]  # what a stride-2 conv samples: aliased to a constant
    assert plain.abs().min() == 1


def test_cyclegan_networks_unchanged_by_cut_options() -> None:
    """CycleGAN keeps affine instance norm, N(0, 0.02) init and all-strided D (appendix 6.1)."""
    g, d = cut.Generator(3, 4, 1), cut.Discriminator(3, [4, 8])
    assert any(isinstance(m, torch.nn.InstanceNorm2d) and m.affine for m in g.modules())
    assert g.first_block == 10 and len(d.net) == 6 and d.net[2].stride == (2, 2)


def test_resume_reproduces_next_losses_exactly(scenes16: Path, tmp_path: Path) -> None:
    kw = dict(ema_decay=0.9)
    full = make_cut(scenes16, **kw)
    torch.manual_seed(0)  # patch locations come from torch's RNG (stages.train seeds it; fit checkpoints it)
    ref = fit(full, train=TRAIN, epochs=2, steps_per_epoch=2, ckpt_dir=tmp_path / "a")

    class Stop(Exception):
        pass

    def stop(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise Stop

    part = make_cut(scenes16, **kw)
    torch.manual_seed(0)
    with pytest.raises(Stop):
        fit(part, train=replace(TRAIN, device="cpu", checkpoint_every=2, progress=False), epochs=2, steps_per_epoch=2,
            ckpt_dir=tmp_path / "b", on_epoch=stop)
    state = load_checkpoint(tmp_path / "b")
    assert state is not None and state["step"] == 2 and "f" in state["method"]["optimizers"]
    resumed = make_cut(scenes16, **kw)
    out = fit(resumed, train=TRAIN, epochs=2, steps_per_epoch=2, ckpt_dir=tmp_path / "b", resume_state=state)
    for key in ("train_loss_g", "train_loss_nce_x", "train_loss_d", "val_nce_x"):
        assert out.history[-1][key] == ref.history[-1][key], key  # bit-exact on CPU
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_ema_update_known_value() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, 1.0)
    ema = common.EMA(net, 0.75)
    torch.nn.init.constant_(net.weight, 3.0)
    ema.update(net)
    assert ema.module.weight.item() == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)


def test_config_errors_name_keys(scenes16: Path) -> None:
    with pytest.raises(ConfigError, match="nce_layers"):
        tiny_cfg(nce_layers=[0, 11]).validate()
    with pytest.raises(ConfigError, match="patch_size"):
        tiny_cfg(patch_size=2).validate()
    with pytest.raises(ConfigError, match="patch_size"):
        make_cut(scenes16, patch_size=40)


# -- segmenter -----------------------------------------------------------------------------------------------------
def test_lastk_summary_known_values() -> None:
    s = segmenter.lastk_summary(np.array([0.9, np.nan, 0.1, 0.5, 0.2, 0.4, 0.3]), 5, "m")
    assert s["m_lastk_n"] == 5 and s["m_lastk_median"] == pytest.approx(0.3)  # last five: .1 .5 .2 .4 .3
    assert s["m_lastk_iqr"] == pytest.approx(0.4 - 0.2) and s["m_lastk_min"] == pytest.approx(0.1)
    assert segmenter.lastk_summary(np.array([np.nan]), 3, "m") == {}


def test_segmenter_training_sets_and_errors(scenes16: Path) -> None:
    data = PreparedBenchmark(scenes16)
    m = segmenter.Method(seg_cfg(train_data="target+synthetic", target_fraction=0.5), data, 0)
    assert [s is data.get("pseudo_real", "train") or True for s in m.train_sets] and len(m.train_sets) == 2
    m.setup(torch.device("cpu"), None, 4)
    seen = {id(b[0].base) for b in [next(m.batches()) for _ in range(1)]}
    assert seen
    with pytest.raises(DataError, match="sim_cut"):
        segmenter.Method(seg_cfg(train_data="refined"), data, 0)
    with pytest.raises(ConfigError, match="train_data"):
        seg_cfg(train_data="real").validate()


def test_segmenter_validate_records_history_and_resumes(scenes16: Path, tmp_path: Path) -> None:
    def mk() -> segmenter.Method:
        m = segmenter.Method(seg_cfg(train_data="target", epochs=3), PreparedBenchmark(scenes16), 0)
        m.setup(torch.device("cpu"), None, 6)
        return m

    full = mk()
    ref = fit(full, train=TRAIN, epochs=3, steps_per_epoch=2, ckpt_dir=tmp_path / "a")
    assert int(full.epochs_done) == 3 and torch.isfinite(full.miou_history).all()
    last = ref.history[-1]
    assert 0 <= last["test_miou"] <= 1 and last["test_miou_lastk_n"] == 2
    assert last["test_miou_lastk_median"] == pytest.approx(float(np.median(full.miou_history[1:, 1].numpy())))
    state = {"method": full.train_state()}
    again = mk()
    again.load_train_state(state["method"])
    assert torch.equal(again.miou_history, full.miou_history) and int(again.epochs_done) == 3
    pred = full.predict(np.asarray(PreparedBenchmark(scenes16).get("pseudo_real", "test").images))
    assert pred.shape == (2, 16, 16) and pred.max() < 6


# -- pipeline: refine -> segmenter -> evaluate; tables; study -------------------------------------------------------
def invoke(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_refine_writes_benchmark_the_segmenter_trains_on(in_tmp: Path, scenes16: Path, tiny_params_file: Path) -> None:
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["tracking"]["log_model"] = False  # model logging is tested elsewhere; it costs seconds per run
    tiny_params_file.write_text(yaml.safe_dump(raw))
    p = ["--params", str(tiny_params_file)]
    invoke("train", "cut", "--data", str(scenes16), "--out", "m/cut", *p)
    invoke("refine", "cut", "--model", "m/cut", "--data", str(scenes16), "--out", "scenes-cut", "--metrics", "r.json",
           "--plots", "pl", *p)
    ref = PreparedBenchmark("scenes-cut")
    assert ref.spec.source == "sim_cut" and ref.spec.target == "pseudo_real"
    assert {d.name for d in ref.spec.domains} == {"toy", "sim", "pseudo_real", "sim_cut"}  # one-sided
    src, new = PreparedBenchmark(scenes16).get("sim", "train"), ref.get("sim_cut", "train")
    assert np.array_equal(src.masks, new.masks) and np.array_equal(src.ids, new.ids)
    assert new.images.shape == src.images.shape and not np.array_equal(np.asarray(src.images), new.images)
    assert json.loads(Path("r.json").read_text())["domains"] == ["sim_cut"]
    invoke("train", "segmenter_refined", "--data", "scenes-cut", "--out", "m/seg", "--metrics", "t.json", *p)
    summary = json.loads(Path("t.json").read_text())
    assert 0 <= summary["val_miou_lastk_median"] <= 1
    invoke("evaluate", "segmenter_refined", "--model", "m/seg", "--data", "scenes-cut", "--out", "e.json",
           "--plots", "ev", *p)
    ev = json.loads(Path("e.json").read_text())
    assert ev["train_data"] == "refined" and len(ev["test_miou_lastk"]) == 2 and set(ev["per_class_iou"]) == {
        "background", "table", "cube", "sphere", "cylinder", "cone"}
    assert {"feature_gap_synthetic", "feature_gap_refined"} <= set(ev)
    assert ev["tsne_paired"] == 1.0  # scenes: sim and pseudo_real render the same scenes
    for f in ("miou_lastk.png", "tsne.png", "per_class_iou.png", "miou_history.csv"):
        assert (Path("ev") / f).stat().st_size > 0, f


def test_tsne_pairs_by_scene_where_pairs_exist_else_unpaired() -> None:
    """Section IV-F's red line joins a synthetic / refined / real triple: only meaningful for the same scene."""
    from types import SimpleNamespace

    from s2r.evaluators.segmentation_lastk import tsne_rows

    def part(ids: list[str], scenes: list[int]) -> SimpleNamespace:
        return SimpleNamespace(ids=ids, scene_ids=np.array(scenes), images=np.zeros(len(ids)))

    syn = part(["a", "b", "c", "d"], [5, 3, 9, -1])
    ref = part(["c", "a", "b", "d"], [9, 5, 3, -1])  # the same images translated, stored in another order
    tgt = part(["x", "y", "z"], [9, 7, 3])
    rows, paired = tsne_rows({"synthetic": syn, "refined": ref, "target": tgt}, 10)
    assert paired and rows["synthetic"].tolist() == [1, 2] and rows["target"].tolist() == [2, 0]  # scenes 3, 9
    assert rows["refined"].tolist() == [2, 0]  # ids b, c
    ycb_real = part(["r0", "r1", "r2"], [-1, -1, -1])  # real frames unrelated to the renders
    rows, paired = tsne_rows({"synthetic": syn, "refined": ref, "target": ycb_real}, 2)
    assert not paired and rows["target"].tolist() == [0, 1] and rows["refined"].tolist() == [1, 2]


def test_bop_official_test_split_object_subset_and_640x480_frames(tmp_path: Path) -> None:
    """Paper 5 (Section IV-D): HomebrewedDB is scored on the official BOP test images, on the objects S present
    there; CUT trains on the validation images showing S; frames stay 640x480 (here 16x12), CUT and the segmenter
    train on them and refine at full resolution."""
    from s2r.data import sources
    from s2r.data.benchmark import load_benchmark
    from s2r.data.sources import objects

    raw = objects.bop_fixture(tmp_path / "raw", test_split=True)
    out = Path(sources.add("bop", raw, tmp_path / "b", options={"image_size": 16, "crop": "keep"})["benchmark"])
    spec, df = load_benchmark(out)
    assert (spec.image_size, spec.image_height) == (16, 12) and set(df["width"]) == {16} and set(df["height"]) == {12}
    real = df[df["domain"] == "real"]
    scene = real["id"].str.split("-").str[2]
    frame = real["id"].str.split("-").str[3].astype(int)
    test = real["split"] == "test"
    assert set(scene[test]) == {"000003"} and sorted(frame[test]) == [0, 2, 4, 6, 8]  # test_targets_bop19 only
    assert not set(scene[real["split"] == "train"]) & set(scene[real["split"] == "val"])  # split by scene
    assert spec.expectations["mask_values"] == [0, 1, 3, 255] and spec.seg_classes[2] == "unused_2"  # S = {1, 3}
    assert not ((scene == "000002") & (frame % 2 == 0)).any()  # val frames showing only object 2: dropped
    prepared = prepare(out, tmp_path / "p", progress=False)
    data = PreparedBenchmark(prepared)
    masks = np.asarray(data.get("real", "val").masks)
    assert masks.shape[1:] == (12, 16) and 2 not in np.unique(masks) and 255 in np.unique(masks)  # 2: ignored
    m = cut.Method(tiny_cfg(patch_size=8), data, 0)
    m.setup(torch.device("cpu"), None, 4)
    assert all(math.isfinite(v) for v in m.train_step(next(m.batches())).values())
    imgs = np.asarray(data.get("synthetic", "test").images)
    assert m.translate(imgs).shape == imgs.shape == (len(imgs), 12, 16, 3)
    seg = segmenter.Method(seg_cfg(train_data="target", refiner="cut", batch_size=2), data, 0)
    seg.setup(torch.device("cpu"), None, 2)
    batch = next(seg.batches())
    masks = np.array(batch.masks)
    masks[:, :2] = 255  # pixels of objects outside S are ignored by the loss
    assert math.isfinite(seg.train_step(batch._replace(masks=masks))["loss"])
    assert seg.predict(np.asarray(data.get("real", "test").images)).shape == (5, 12, 16)
    hashed = Path(sources.add("bop", objects.bop_fixture(tmp_path / "r2"), tmp_path / "h",
                              options={"image_size": 8})["benchmark"])
    assert load_benchmark(hashed)[0].image_height == 0  # no test split: the old square, hashed layout
    with pytest.raises(DataError, match="objects: test"):
        sources.add("bop", objects.bop_fixture(tmp_path / "r3"), tmp_path / "x", options={"objects": "test"})
    ycb = Path(sources.add("ycb_video", objects.ycb_fixture(tmp_path / "ry"), tmp_path / "y",
                           options={"image_size": 16, "crop": "keep"})["benchmark"])
    assert load_benchmark(ycb)[0].image_height == 12  # 640x480 -> 640x480, no centre crop


def test_tables_cut_cli_on_tiny_data(in_tmp: Path, scenes16: Path, tiny_params_file: Path) -> None:
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["reports"]["cut_tables"].update(patch_sizes=[9], seg_epochs=1, last_k=1, mix_patch_size=9)
    tiny_params_file.write_text(yaml.safe_dump(raw))
    out = invoke("tables", "cut", "--data", str(scenes16), "--out", "tables", "--params", str(tiny_params_file))
    assert "Table II format" in out and "Table I format" in out and "raw synthetic" in out
    t2 = (Path("tables") / "table2.csv").read_text()
    for row in ("synthetic", "CUT 9px", "target", "target + synthetic", "target + refined"):
        assert row in t2
    import pandas as pd

    t1 = pd.read_csv(Path("tables") / "table1.csv")
    assert list(t1["trained on [px]"]) == [8] and (t1["time [s]"] > 0).all()  # 9 px rescaled to 8
    metrics = json.loads((Path("tables") / "metrics.json").read_text())
    assert isinstance(metrics["refined_beats_synthetic"], bool) and 0 <= metrics["target_miou"] <= 1
    assert (Path("tables") / "miou_lastk.png").stat().st_size > 0


def test_table2_format_known_values() -> None:
    from s2r.tables.cut import table2_rows

    df = table2_rows({"synthetic": np.array([0.5, 0.5]), "CUT 9px": np.array([0.6, 0.6]), "target": np.array([0.8])})
    rows = {r["Training mode"]: r for r in df.to_dict("records")}
    assert rows["CUT 9px"]["vs. syn."] == "+20.0%" and rows["CUT 9px"]["vs. target"] == "0.750"
    assert rows["synthetic"]["vs. syn."] == "—" and rows["target"]["vs. target"] == "1.000"


@pytest.mark.slow
def test_cut_patch_study_runs_the_chain(tmp_path: Path, scenes16: Path, tiny_params_file: Path) -> None:
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["studies"]["cut_patch"].update(pruner_warmup_epochs=1, n_startup_trials=1)
    raw["studies"]["cut_patch"]["search_space"]["methods.cut.patch_size"]["choices"] = [8, 9]  # 16 px images
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert load_params(params).studies["cut_patch"].method == "cut"
    o = tune.TuneOptions(study="cut_patch", data_dir=scenes16, params_path=params, out_dir=tmp_path / "out",
                         study_name=f"cp-{tmp_path.name}", n_trials=2)
    res = tune.run(o)
    assert res["metrics"]["n_complete"] + res["metrics"]["n_pruned"] == 2 and res["metrics"]["n_fail"] == 0
    best = yaml.safe_load((o.out_dir / "best.yaml").read_text())
    assert set(best["params"]) == {"methods.cut.patch_size", "methods.cut.lambda_nce"} and 0 <= best["value"] <= 1
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.optuna_study = '{o.study_name}'")
    names = sorted(r.info.run_name.split("/")[-1] for r in runs)
    assert names.count("train@cut") >= 1 and names.count("train@segmenter_refined") >= 1
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1


def test_tune_hook_is_optional(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scenes16: Path) -> None:
    """Methods without a `downstream` block go through stages.train (the plain path)."""
    called = []

    def fake(request, params):  # noqa: ANN001 - stages.train(TrainRequest, Params)
        called.append(request.method)
        request.on_epoch(1, {"val_miou": 0.5})
        return {"val_miou": 0.5, "mlflow_run_id": "x"}

    monkeypatch.setattr(stages, "train", fake)
    raw = tiny_params_dict()
    raw["studies"] = {"s": {"method": "segmenter_target", "objectives": [{"metric": "val_miou",
                                                                          "direction": "maximize"}],
                            "search_space": {"methods.segmenter_target.lr": {"type": "categorical",
                                                                               "choices": [1e-3]}},
                            "sampler": "random", "pruner": "none", "n_trials": 1, "seed": 0}}
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    tune.run(tune.TuneOptions(study="s", data_dir=scenes16, params_path=params, out_dir=tmp_path / "o",
                              study_name=f"s-{tmp_path.name}"))
    assert called == ["segmenter_target"]


def test_tune_calls_the_method_objective_with_pruning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      scenes16: Path) -> None:
    """methods.cut.downstream: tune.refine_chain replaces stages.train; its per-epoch values reach the pruner."""
    calls = []

    def fake(data_dir, params, work, *, on_epoch, parent_run_id, run_name, tags, method):  # noqa: ANN001
        n = int(run_name.rsplit("#", 1)[1])
        calls.append((method, params.methods["cut"].patch_size, parent_run_id is not None, tags["optuna_trial"]))
        for epoch in range(1, 4):
            on_epoch(epoch, {"val_miou_lastk_median": 0.1 * epoch if n != 3 else 0.0})
        return {"val_miou_lastk_median": 0.3 if n != 3 else 0.0, "mlflow_run_id": f"r{n}"}

    monkeypatch.setattr(tune, "refine_chain", fake)
    raw = tiny_params_dict()
    study = raw["studies"]["cut_patch"]
    study.update(n_startup_trials=2, pruner_warmup_epochs=0, sampler="grid", n_trials=4)
    study["search_space"] = {"methods.cut.patch_size": {"type": "categorical", "choices": [8, 9, 12, 16]}}
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    o = tune.TuneOptions(study="cut_patch", data_dir=scenes16, params_path=params, out_dir=tmp_path / "o",
                         study_name=f"h-{tmp_path.name}")
    res = tune.run(o)
    assert sorted(c[1] for c in calls) == [8, 9, 12, 16] and all(c[0] == "cut" and c[2] for c in calls)
    assert res["metrics"]["n_complete"] == 3 and res["metrics"]["n_pruned"] == 1  # trial 3 reports 0.0
    assert res["best"]["value"] == pytest.approx(0.3)


def test_translate_and_export_use_the_ema_generator(scenes16: Path) -> None:
    m = make_cut(scenes16, ema_decay=0.5)
    assert m.g_ema is not None and m.refiner() is m.g_ema.module
    with torch.no_grad():
        for p in m.g.parameters():
            p.add_(0.5)  # the live generator drifts; the EMA copy has not been updated
    imgs = np.array(PreparedBenchmark(scenes16).get("sim", "test").images)  # a writable copy
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        ema_out = (m.export_model()(x).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        live_out = (((m.g(x * 2 - 1) + 1) / 2).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = m.translate(imgs)
    assert np.array_equal(out, ema_out) and not np.array_equal(out, live_out)
