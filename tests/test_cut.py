"""Paper 5: CUT on random patches (PatchNCE, patches, resume), refine, downstream segmenter, tables, cut_patch study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import tiny_params_dict
from s2r import stages, tune
from s2r.cli import main
from s2r.config import ConfigError, TrainParams, from_dict
from s2r.data.benchmark import DataError
from s2r.data.prepared import PreparedBenchmark
from s2r.methods import cut, segmenter
from s2r.params import load_params
from s2r.train import fit, load_checkpoint

TRAIN = TrainParams(device="cpu", checkpoint_every=100, progress=False)


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
    d_loss = cut.lsgan_d_loss(m.d(b), m.d(fake[:4].detach()), torch.ones(1), torch.zeros(1))
    d_loss.backward()
    for name, p in m.named_parameters():
        if name.startswith(("g.", "d.", "heads.")):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    losses = m.train_step(next(m.batches()))
    assert all(math.isfinite(v) for v in losses.values())
    assert {"loss_nce_x", "loss_nce_y", "loss_gan_g", "loss_d"} <= set(losses)


def test_eq2_total_and_reduce_options(scenes16: Path) -> None:
    m = make_cut(scenes16, lambda_nce=2.0)
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    out = m.generator_loss(a, b, m.forward_fake(a, b))
    expected = out["loss_gan_g"] + 2.0 * (out["loss_nce_x"] + out["loss_nce_y"])  # Eq. 2
    assert out["loss_g"].item() == pytest.approx(expected.item(), rel=1e-5)
    m.cfg.nce_reduce = "mean"
    torch.manual_seed(0)
    out = m.generator_loss(a, b, m.forward_fake(a, b))
    expected = out["loss_gan_g"] + 2.0 * 0.5 * (out["loss_nce_x"] + out["loss_nce_y"])  # CUT's code
    assert out["loss_g"].item() == pytest.approx(expected.item(), rel=1e-5)


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
        fit(part, train=TrainParams(device="cpu", checkpoint_every=2, progress=False), epochs=2, steps_per_epoch=2,
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
    ema = cut.EMA(net, 0.75)
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
    for f in ("miou_lastk.png", "tsne.png", "per_class_iou.png", "miou_history.csv"):
        assert (Path("ev") / f).stat().st_size > 0, f


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

    def fake(method, data_dir, out, params, *, on_epoch=None, run_name="", **kw):  # noqa: ANN001, ANN003
        called.append(method)
        on_epoch(1, {"val_miou": 0.5})
        return {"val_miou": 0.5, "mlflow_run_id": "x"}

    monkeypatch.setattr(stages, "train", fake)
    raw = tiny_params_dict()
    raw["studies"] = {"s": {"method": "segmenter_target", "objectives": [{"metric": "val_miou"}],
                            "search_space": {"methods.segmenter_target.lr": {"type": "categorical",
                                                                               "choices": [1e-3]}},
                            "sampler": "random", "pruner": "none", "n_trials": 1}}
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
