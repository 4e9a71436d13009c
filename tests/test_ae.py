"""Paper 1 (extractor autoencoders): losses, samplers, variants, frozen extractor + cache, weights, evaluator."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import paired_samples, paired_spec, tiny_config
from s2r.data.benchmark import BenchmarkSpec, DomainSpec, Sample, write_benchmark
from s2r.data.prepared import PreparedBenchmark, prepare
from s2r.evaluators import latent
from s2r.methods import ae, extractors


@pytest.fixture(scope="module")
def paired(paired_prepared: Path) -> Path:
    """conftest's paired benchmark: synthetic scenes in 2 variations, real images sharing scene ids."""
    return paired_prepared


def _cfg(**kw: object) -> ae.Config:
    base = tiny_config("ae", batch_size=6, epochs=1, steps_per_epoch=2, latent_dim=4, extractor_input_size=32,
                     feature_cache_dir="", ssim_win_size=3, rf_trees=5)
    c = replace(base, **kw)
    c.validate()
    return c


# ----------------------------------------------------------------------------------------------- losses


def test_ssim_loss_of_identical_images_is_zero_and_positive_otherwise() -> None:
    x = torch.rand(2, 1, 16, 16)
    logits = torch.logit(x.clamp(1e-4, 1 - 1e-4))
    assert ae.recon_loss("ssim", logits, x.clamp(1e-4, 1 - 1e-4)).abs().max() < 1e-4
    assert (ae.recon_loss("ssim", logits, torch.rand(2, 1, 16, 16)) > 0.1).all()
    assert ae.recon_loss("mse", logits, x.clamp(1e-4, 1 - 1e-4)).max() < 1e-8
    # BCE with logits at the target = the target's entropy: 0 for binary targets
    t = (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert ae.recon_loss("bce", (t * 2 - 1) * 30, t).max() < 1e-6


def test_triplet_loss_known_values() -> None:
    a = torch.tensor([[0.0, 0.0]])
    p = torch.tensor([[0.1, 0.0]])
    n = torch.tensor([[1.0, 0.0]])
    assert float(ae.triplet_loss(a, p, n, 0.2, swap=False)) == 0.0  # 0.1 - 1.0 + 0.2 < 0: margin satisfied
    hard = torch.tensor([[0.2, 0.0]])
    assert float(ae.triplet_loss(a, p, hard, 0.2, swap=False)) == pytest.approx(0.1 - 0.2 + 0.2)
    # swap: the negative distance is min(d(a, n), d(p, n)) = d(p, n) = 0.1 here
    assert float(ae.triplet_loss(a, p, hard, 0.2, swap=True)) == pytest.approx(0.1 - 0.1 + 0.2)


def test_kl_of_standard_normal_is_zero() -> None:
    assert float(ae.kl_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).abs().max()) == 0.0
    assert float(ae.kl_standard_normal(torch.ones(1, 2), torch.zeros(1, 2))[0]) == pytest.approx(1.0)  # 0.5*|mu|^2


def test_factorvae_total_correlation_via_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 3, generator=g)
    zp = ae.permute_dims(z, g)
    for j in range(3):  # every column keeps its values (marginals), rows are shuffled (dependence broken)
        assert torch.equal(z[:, j].sort().values, zp[:, j].sort().values)
    assert not torch.equal(z, zp)
    # a discriminator certain of "from q(z)" with log-odds 2 gives TC = 2; indifferent gives 0
    assert float(ae.total_correlation(torch.tensor([[2.0, 0.0], [1.0, -1.0]]))) == pytest.approx(2.0)
    assert float(ae.total_correlation(torch.zeros(4, 2))) == 0.0


# ----------------------------------------------------------------------------------------------- samplers


def test_samplers_return_targets_with_the_stated_relation(paired: Path) -> None:
    split = PreparedBenchmark(paired).get("syn", "train")
    rng = np.random.default_rng(0)
    idx = np.arange(len(split))
    van = ae.TargetSampler(split, "vanilla", "t").targets(idx, rng)
    assert np.array_equal(van, idx)
    s1 = ae.TargetSampler(split, "I", "t")
    t1 = s1.targets(idx, rng)
    assert (split.scene_ids[t1] == split.scene_ids[idx]).all() and (t1 != idx).all()  # same scene, other variation
    assert (split.variations[t1] != split.variations[idx]).all()
    s2 = ae.TargetSampler(split, "II", "t")
    t2 = s2.targets(idx, rng)
    assert (split.labels[t2] == split.labels[idx]).all() and (split.scene_ids[t2] != split.scene_ids[idx]).all()
    pos, neg = s2.positives(idx, rng), s2.negatives(idx, rng)
    assert (split.labels[pos] == split.labels[idx]).all() and (split.scene_ids[pos] != split.scene_ids[idx]).all()
    assert (split.labels[neg] != split.labels[idx]).all()


def test_single_scene_class_falls_back_to_its_own_scene() -> None:
    """A class with one scene (rare seat combinations of SVIRO-Illumination): sampling II and triplet positives
    take another variation of that scene (same class), or the image itself when the class has one image."""
    from types import SimpleNamespace

    split = SimpleNamespace(labels=np.array([0, 0, 1, 1, 1, 2]), scene_ids=np.array([5, 5, 6, 7, 7, 8]))
    s = ae.TargetSampler(split, "II", "t")  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    idx = np.array([0, 1, 2, 3, 5])
    for _ in range(5):
        t, pos = s.targets(idx, rng), s.positives(idx, rng)
        assert (split.labels[t] == split.labels[idx]).all() and (split.labels[pos] == split.labels[idx]).all()
        assert list(t[:2]) == [1, 0] and list(pos[:2]) == [1, 0]  # class 0: the other variation of scene 5
        assert t[2] in (3, 4) and split.scene_ids[t[3]] == 6  # class 1 has two scenes: another scene
        assert t[4] == 5  # class 2: a single image, itself
        assert (split.labels[s.negatives(idx, rng)] != split.labels[idx]).all()


def test_sampling_I_needs_variations(tiny_prepared: Path) -> None:
    from s2r.data.benchmark import DataError

    with pytest.raises(DataError, match="scene"):
        ae.TargetSampler(PreparedBenchmark(tiny_prepared).get("syn", "train"), "I", "tiny")


# ----------------------------------------------------------------------------------------------- variants

VARIANTS = {
    "AE": {}, "TAE": {"triplet": True}, "I-AE": {"sampling": "I"}, "II-TAE": {"sampling": "II", "triplet": True},
    "VAE": {"model": "vae", "recon_loss": "bce"}, "beta-VAE": {"model": "vae", "beta_kl": 4.0, "recon_loss": "ssim"},
    "FactorVAE": {"model": "factorvae", "recon_loss": "bce", "gamma_tc": 10.0},
    "II-E-TAE": {"extractor": "vgg11", "sampling": "II", "triplet": True},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_with_finite_losses_and_grads(name: str, paired: Path) -> None:
    torch.manual_seed(0)
    m = ae.Method(_cfg(**VARIANTS[name]), PreparedBenchmark(paired), seed=0)
    m.setup(torch.device("cpu"), None, 2)
    batch = next(m.batches())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    losses = m.train_step(batch)
    assert all(math.isfinite(v) for v in losses.values()) and "recon" in losses
    if VARIANTS[name].get("triplet"):
        assert "triplet" in losses
    fixed = {n for n, _ in m.encoder.named_buffers(prefix="encoder")}  # the summariser's input statistics
    for k, v in m.state_dict().items():  # every trainable tensor moved (a gradient reached it)
        if v.dtype.is_floating_point and k not in fixed:
            assert not torch.equal(v, before[k]), f"{name}: {k} got no update"
    if m.extractor is not None:
        assert all(p.grad is None and not p.requires_grad for p in m.extractor.parameters())
    z = m.encode(np.asarray(m.data.get("real", "test").images))
    assert z.shape == (9, 4) and np.isfinite(z).all()
    assert m.reconstruct(np.asarray(m.data.get("real", "test").images[:2])).shape == (2, 16, 16, 1)
    assert 0.0 <= m.validate()["val_knn_accuracy"] <= 1.0


def test_frozen_extractor_cache_is_used(paired: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(extractor="vgg11", feature_cache_dir=str(tmp_path / "cache"))
    m = ae.Method(cfg, PreparedBenchmark(paired), seed=0)
    m.setup(torch.device("cpu"), None, 2)
    calls = []
    real_extract = m.extract
    monkeypatch.setattr(m, "extract", lambda images, batch_size=128: calls.append(len(images)) or real_extract(images))
    it = m.batches()
    m.train_step(next(it))
    m.train_step(next(it))
    assert calls == [18]  # the 18 training images once, not per step
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    f = m.features("syn", "train")
    direct = real_extract(np.asarray(m.data.get("syn", "train").images))
    assert torch.allclose(f.float(), direct.float())
    m.extractor.train()  # the loop's .train() must not switch the frozen backbone out of eval mode
    assert not any(mod.training for mod in m.extractor.modules())
    # a new method with the same extractor reads the disk cache, computing nothing
    m2 = ae.Method(cfg, PreparedBenchmark(paired), seed=1)
    monkeypatch.setattr(m2, "extract", lambda *a, **k: pytest.fail("recomputed cached features"))
    assert torch.equal(m2.features("syn", "train"), f)


def test_summariser_inputs_are_standardised_from_the_training_features(paired: Path, tmp_path: Path) -> None:
    """feature_standardise: zero mean / unit std per channel on the training features, kept in the model file;
    off: the raw features (identity), as the paper feeds ImageNet features."""
    from s2r import stages

    m = ae.Method(_cfg(extractor="vgg11"), PreparedBenchmark(paired), seed=0)
    m.setup(torch.device("cpu"), None, 2)
    m.before_training()
    f = m.features("syn", "train").float()
    h = (f - m.encoder.in_mean) / m.encoder.in_std
    assert h.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    live = f.std(dim=(0, 2, 3)) > 1e-6  # a random VGG-11 has dead (constant) channels: they stay 0
    assert live.sum() > 0 and (h.std(dim=(0, 2, 3))[live] - 1).abs().max() < 1e-3
    assert float(f.std()) < 0.2  # the random VGG-11's features are small: the reason for the option
    raw = ae.Method(_cfg(extractor="vgg11", feature_standardise=False), PreparedBenchmark(paired), seed=0)
    raw.setup(torch.device("cpu"), None, 2)
    raw.before_training()
    assert torch.equal(raw.encoder.in_mean, torch.zeros_like(raw.encoder.in_mean))
    assert torch.equal(raw.encoder.in_std, torch.ones_like(raw.encoder.in_std))
    stages.save_trained(tmp_path / "model", "ae", m, 0, "run")  # the statistics travel with the model
    loaded = ae.Method(_cfg(extractor="vgg11"), PreparedBenchmark(paired), seed=0)
    loaded.load_state_dict(torch.load(tmp_path / "model" / "model.pt", weights_only=False)["state"])
    assert torch.equal(loaded.encoder.in_std, m.encoder.in_std)


def test_imagenet_weights_load_from_the_torchvision_cache_layout(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    expected = extractors.expected_weights_file("vgg11")
    assert expected == tmp_path / "hub" / "checkpoints" / Path(torchvision.models.VGG11_Weights.IMAGENET1K_V1.url).name
    with pytest.raises(FileNotFoundError, match=expected.name):  # absent: a clear error, never a fallback
        ae.build_extractor("vgg11", "imagenet")
    torch.manual_seed(123)
    state = torchvision.models.vgg11(weights=None).state_dict()
    expected.parent.mkdir(parents=True)
    torch.save(state, expected)
    cut = ae.build_extractor("vgg11", "imagenet")
    assert torch.equal(cut[16].weight, state["features.16.weight"])  # the 7th conv came from the file
    assert len(cut) == 18 and isinstance(cut[17], torch.nn.ReLU)
    own = ae.build_extractor("vgg11", str(expected))  # a local file path works the same
    assert torch.equal(own[0].weight, state["features.0.weight"])
    rand = ae.build_extractor("vgg11", "none", seed=0)
    assert not torch.equal(rand[0].weight, state["features.0.weight"])


def test_extractor_cuts_match_the_paper() -> None:
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert ae.build_extractor("resnet50", "none")(x).shape[1] == extractors.EXTRACTOR_CHANNELS["resnet50"]
        assert ae.build_extractor("densenet121", "none")(x).shape[1] == extractors.EXTRACTOR_CHANNELS["densenet121"]
    assert ae.build_extractor("vgg11", "none")(torch.rand(1, 3, 224, 224)).shape == (1, 512, 14, 14)


# ----------------------------------------------------------------------------------------------- evaluator


def test_knn_default_k_is_floor_sqrt_n() -> None:
    assert latent.knn_default_k(13356) == 115  # Section 4.7: k = sqrt(N) = 115 for N = 13,356 (115.57, floored)
    assert latent.knn_default_k(100) == 10 and latent.knn_default_k(99) == 9 and latent.knn_default_k(1) == 1


def test_classifiers_on_separable_latents_score_one() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    z = np.eye(3)[y] * 10 + rng.normal(0, 0.1, (90, 3))
    s = latent.classifier_scores(z[::2], y[::2], z[1::2], y[1::2], trees=10)
    assert s["knn_k"] == 6 and s["knn_accuracy"] == 1.0 and s["rf_accuracy"] == 1.0 and s["svm_accuracy"] == 1.0
    shuffled = latent.classifier_scores(z[::2], rng.permutation(y[::2]), z[1::2], y[1::2], trees=10)
    assert shuffled["knn_accuracy"] < 0.8


def test_reconstruction_metrics_known_values() -> None:
    a = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1)).astype(np.uint8)
    assert latent.ssim_per_image(a, a) == pytest.approx([1.0, 1.0])
    assert latent.l1_per_image(a, a).max() == 0.0
    assert latent.l1_per_image(np.zeros_like(a), np.full_like(a, 255)) == pytest.approx([1.0, 1.0])
    assert list(latent.paired_indices(np.array([5, 7, -1]), np.array([7, 5, 9]))) == [1, 0, -1]


def test_latent_evaluator_end_to_end(paired: Path, tmp_path: Path) -> None:
    class Run:
        def __init__(self) -> None:
            self.metrics: dict[str, float] = {}
            self.figures: list[str] = []

        def log_metrics(self, m: dict[str, float], step: int) -> None:
            self.metrics |= m

        def log_figure(self, fig: object, name: str) -> None:
            self.figures.append(name)

    class P:
        seed = 0

    m = ae.Method(_cfg(), PreparedBenchmark(paired), seed=0)
    m.setup(torch.device("cpu"), None, 2)
    run = Run()
    res = latent.EVALUATOR.evaluate(m, run, tmp_path / "plots", P())
    assert res["n_train"] == 9 and res["knn_k"] == 3  # one image per scene: 9 scenes, k = sqrt(9)
    assert {"knn_accuracy", "rf_accuracy", "svm_accuracy", "recon_l1_real", "recon_ssim_synth"} <= set(res)
    assert res["paired"] == 9 and res["lpips_real"] is None and res["lpips_status"].startswith("unavailable")
    assert (tmp_path / "plots" / "tsne.png").is_file() and (tmp_path / "plots" / "reconstructions.png").is_file()
    assert "test_knn_accuracy" in run.metrics and "lpips_real" not in str(run.metrics)


def test_latent_evaluator_without_pairs_reports_not_applicable(tiny_prepared: Path, tmp_path: Path,
                                                               in_tmp: Path) -> None:
    from s2r.tracking import TrackedRun

    m = ae.Method(_cfg(), PreparedBenchmark(tiny_prepared), seed=0)  # 8 px images
    m.setup(torch.device("cpu"), None, 2)

    class P:
        seed = 0

    with TrackedRun("test@latent", experiment="test-ae") as run:
        res = latent.EVALUATOR.evaluate(m, run, None, P())
    assert res["recon_l1_synth"] is None and res["paired_status"].startswith("not applicable")


def test_table10_layout_and_table1_markdown() -> None:
    import pandas as pd

    from s2r.tables.ae import TABLE10_ROWS, table1_markdown, table10

    rows = [{"model": m, "seed": s, "knn_accuracy": 0.5 + 0.1 * s, "rf_accuracy": 0.2, "svm_accuracy": 0.3}
            for m in TABLE10_ROWS for s in (0, 1)]
    t = table10(pd.DataFrame(rows))
    assert list(t["Model"]) == list(TABLE10_ROWS)  # the paper's row order
    assert t.loc[0, "KNN"] == "55.00 ± 5.00%" and t.loc[0, "knn_mean"] == pytest.approx(0.55)
    md = table1_markdown(pd.DataFrame([{"Trained on": "toy", "Model": "AE", "Variant": "SSIM", "l1_synth": 0.1,
                                        "l1_real": 0.2, "ssim_synth": 0.5, "ssim_real": 0.4, "lpips_synth": None,
                                        "lpips_real": None}]))
    assert "| toy | AE | SSIM | 0.100 | 0.200 | 0.500 | 0.400 | n/a | n/a |" in md


def test_study_ae_loss_weights_runs_two_tiny_trials(paired: Path, tmp_path: Path, in_tmp: Path) -> None:
    import yaml

    from conftest import tiny_params_dict
    from s2r import tune

    raw = tiny_params_dict()
    spec = raw["studies"]["ae_loss_weights"]
    assert spec["objectives"][0]["metric"] == "val_knn_accuracy"  # validation split, never test
    raw["studies"] = {"ae_loss_weights": spec | {"n_trials": 2}}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = tune.run(tune.TuneOptions(study="ae_loss_weights", data_dir=paired, params_path=p, out_dir=tmp_path / "t"))
    assert res["metrics"]["n_complete"] == 2
    assert 0.0 <= res["best"]["value"] <= 1.0 and "methods.ae_ii_e_tae.alpha" in res["best"]["params"]


@pytest.mark.slow
def test_tables_ae_cli_on_tiny_data(paired: Path, tmp_path: Path, in_tmp: Path) -> None:
    import json

    import yaml
    from click.testing import CliRunner

    from conftest import tiny_params_dict
    from s2r.cli import main

    raw = tiny_params_dict()
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "tables"
    res = CliRunner().invoke(main, ["tables", "ae", "--digits", str(paired), "--scenes", str(paired),
                                    "--out", str(out), "--params", str(p)])
    assert res.exit_code == 0, res.output
    md = (out / "table10.md").read_text()
    for row in ("| AE |", "| TAE |", "| II-AE |", "| II-TAE |", "| E-AE |", "| E-TAE |", "| II-E-AE |", "| II-E-TAE |"):
        assert row in md
    assert "±" in md and "KNN" in md and "RForest" in md and "SVM" in md
    runs = (out / "table10_runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 8 * len(raw["reports"]["ae_tables"]["seeds"])
    t1 = (out / "table1.md").read_text()
    assert "FactorVAE" in t1 and "E-AE" in t1 and "n/a" in t1  # LPIPS unavailable offline, not zero
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["table10.II-E-TAE.knn"] <= 1.0


def test_tsne_plot_with_too_few_latents_is_labelled_not_an_error() -> None:
    """Stand-in splits can hold 2 target test images and no labelled source (MPI3D): t-SNE needs n > perplexity."""
    from s2r.evaluators.latent import plot_tsne

    fig = plot_tsne(np.zeros((0, 4)), np.ones((2, 4)), ("realistic", "real"), "t")
    assert "too few for t-SNE" in fig.axes[0].texts[0].get_text()
    fig = plot_tsne(np.random.default_rng(0).normal(size=(6, 4)), np.ones((3, 4)), ("a", "b"), "t")
    assert len(fig.axes[0].collections) == 2  # source and target scatter


# ----------------------------------------------------------------------------------------------- seat structure


def _seat_bench(tmp: Path, seats: int = 2) -> Path:
    """A 2-seat interior-like benchmark (16 classes): each seat's class draws a bar on its side of the image."""
    from s2r.data.sources.interior import seat_class_names, seat_mirror, seat_parts

    spec = BenchmarkSpec(
        name="seats", tasks=["classification"],
        domains=[DomainSpec("syn", "source", "synthetic"), DomainSpec("real", "target", "real")],
        source="syn", target="real", image_size=8, channels=1, classes=seat_class_names(seats),
        mirror_classes=seat_mirror(seats), class_parts=seat_parts(seats),
    )
    rng = np.random.default_rng(0)
    out, sid = [], 0
    for domain in ("syn", "real"):
        for split in ("train", "val", "test"):
            for c, parts in enumerate(spec.class_parts):
                for _ in range(2):
                    img = rng.integers(0, 30, (8, 8)).astype(np.uint8)
                    img[:, :4] += np.uint8(50 * parts[0])
                    img[:, 4:] += np.uint8(50 * parts[1])
                    out.append(Sample(f"{domain}-{split}-{sid}", domain, split, img, c, scene_id=sid, variation=0))
                    sid += 1
    return prepare(write_benchmark(tmp / "bench", spec, out, progress=False), tmp / "prepared", progress=False)


def test_seat_mirror_map_swaps_left_and_right(tmp_path: Path) -> None:
    from s2r.data.sources.interior import joint_label, seat_mirror, seat_parts

    m2, m3 = seat_mirror(2), seat_mirror(3)
    assert m2[joint_label([1, 3])] == joint_label([3, 1]) and m2[joint_label([2, 2])] == joint_label([2, 2])
    assert m3[joint_label([0, 2, 3])] == joint_label([3, 2, 0]) and all(m3[m3[i]] == i for i in range(64))
    assert seat_parts(3)[joint_label([1, 0, 2])] == [1, 0, 2]
    with pytest.raises(Exception, match="mirror_classes"):
        replace(paired_spec(), mirror_classes=[1, 2, 0]).validate()  # not an involution


def test_hflip_mirrors_labels_and_flips_a_triplet_as_a_whole(tmp_path: Path) -> None:
    data = PreparedBenchmark(_seat_bench(tmp_path))
    m = ae.Method(_cfg(hflip=True, triplet=True, batch_size=8), data, seed=0)
    m.setup(torch.device("cpu"), None, 2)
    raw = m.train_split.labels
    mirror = np.asarray(data.spec.mirror_classes)
    seen_flip = False
    it = m.batches()
    for _ in range(5):
        _, labels, idx = next(it)
        flip = idx["flip"].reshape(3, 8)
        assert (flip == flip[0]).all()  # anchor, positive and negative share their flip
        expect = np.where(idx["flip"], mirror[raw[idx["input"]]], raw[idx["input"]])
        assert np.array_equal(labels, expect)
        a, p = labels[:8], labels[8:16]
        assert np.array_equal(a, p)  # a positive keeps its anchor's class after the flip
        seen_flip |= bool(flip.any())
    assert seen_flip


def test_flipped_training_latents_carry_mirrored_labels(tmp_path: Path) -> None:
    data = PreparedBenchmark(_seat_bench(tmp_path))
    m = ae.Method(_cfg(hflip=True), data, seed=0)
    m.setup(torch.device("cpu"), None, 2)
    z, y = latent.source_training_latents(m)
    n = len(y) // 2
    assert np.array_equal(y[n:], np.asarray(data.spec.mirror_classes)[y[:n]]) and not np.array_equal(y[n:], y[:n])
    assert latent.knn_default_k(len(z)) == math.isqrt(len(z))
    assert 0.0 <= m.validate()["val_knn_accuracy"] <= 1.0  # per-epoch KNN fits the flipped latents too


def test_hard_triplet_negatives_differ_in_one_seat_and_are_never_empty(tmp_path: Path) -> None:
    data = PreparedBenchmark(_seat_bench(tmp_path))
    parts = np.asarray(data.spec.class_parts)
    m = ae.Method(_cfg(triplet=True, triplet_negatives="one_part", triplet_exclude_empty=True, batch_size=16),
                  data, seed=0)
    m.setup(torch.device("cpu"), None, 2)
    labels = m.train_split.labels
    it = m.batches()
    for _ in range(10):
        _, _, idx = next(it)
        a, n = labels[idx["input"][:16]], labels[idx["input"][32:]]
        diff = (parts[a] != parts[n]).sum(1)
        one_away_non_empty = [(parts[[c]] != parts).sum(1) == 1 for c in a]
        has_hard = np.array([(o & (parts != 0).any(1)).any() for o in one_away_non_empty])
        assert (diff[has_hard] == 1).all() and (parts[n] != 0).any(1).all()
    easy = ae.Method(_cfg(triplet=True, batch_size=16), data, seed=0)
    easy.setup(torch.device("cpu"), None, 2)
    _, _, idx = next(easy.batches())
    diff = (parts[labels[idx["input"][:16]]] != parts[labels[idx["input"][32:]]]).sum(1)
    assert (diff >= 1).all() and (diff == 2).any()  # "any other class" also picks two-seat differences
    with pytest.raises(Exception, match="class_parts"):
        ae.Method(_cfg(triplet=True, triplet_negatives="one_part"), PreparedBenchmark(_paired_or_tiny(tmp_path)), 0)


def _paired_or_tiny(tmp: Path) -> Path:
    spec = paired_spec()
    return prepare(write_benchmark(tmp / "plain", spec, paired_samples(spec), progress=False), tmp / "plain_p",
                   progress=False)
