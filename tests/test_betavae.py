"""beta-VAE / Ada-GVAE (paper 3): architecture, losses, Ada-GVAE aggregation, noise, pairs, train/evaluate/tune."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import prepared_scenes, tiny_config, tiny_params_dict, tiny_section
from s2r.config import ConfigError, from_dict
from s2r.data.benchmark import DataError
from s2r.methods import betavae as bv
from s2r.params import load_params


@pytest.fixture(scope="module")
def scenes_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny embedded scenes benchmark (16 px), generated and prepared once for the module."""
    return prepared_scenes(tmp_path_factory.mktemp("scenes"), 48, 12, 12)


@pytest.fixture(scope="module")
def params_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("params") / "params.yaml"
    p.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    return p


def small_cfg(**kw: object) -> bv.Config:
    return tiny_config("betavae", **{"image_size": 16, "widths": [4, 8], "latent_dim": 4, "batch_size": 4,
                                     "render_pairs": 8, "cache_dir": "", "val_images": 8, **kw})


# ---- architecture -----------------------------------------------------------------------------------------------


def test_residual_blocks_are_identities_at_init() -> None:
    torch.manual_seed(0)
    block = bv.ResidualBlock(6, 0.02)
    assert block.gate.item() == 0.0
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(block(x), x)
    vae = bv.VAE(3, 32, tiny_config("betavae", widths=[4, 8, 8]))
    gates = [m.gate for m in vae.modules() if isinstance(m, bv.ResidualBlock)]
    assert len(gates) == 12 and all(g.item() == 0.0 for g in gates)  # 3 pairs in encoder and decoder


@pytest.mark.parametrize("size,widths", [(16, [4, 8]), (32, [4, 8, 16]), (64, [4, 8, 8, 16])])
def test_shapes_and_custom_logvar_init(size: int, widths: list[int]) -> None:
    torch.manual_seed(0)
    cfg = tiny_config("betavae", widths=widths, latent_dim=5, logvar_bias_init=-1.0, logvar_weight_scale=0.1)
    vae = bv.VAE(3, size, cfg)
    mu, lv = vae.encoder(torch.rand(2, 3, size, size))
    assert mu.shape == lv.shape == (2, 5)
    assert vae.decoder(mu).shape == (2, 3, size, size)
    assert torch.all(vae.encoder.logvar.bias == -1.0)
    assert vae.encoder.logvar.weight.abs().max() < 0.2 * vae.encoder.mean.weight.abs().max()
    layers = [type(m).__name__ for m in vae.modules()]
    assert "LayerNorm" in layers and "AvgPool2d" in layers and "Upsample" in layers
    assert any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in vae.modules())  # width changes


def test_recipe_architecture_has_the_papers_parameter_count() -> None:
    """Section 3 / appendix A: "approximately 16.3M" parameters at 128 px (Tables 3-4 widths, FC(512) hidden
    layers). Conv part 12,190,231 + FC stack 4,215,828 = 16,406,059 at d = 10 (12.3 M without the hidden FCs)."""
    raw = yaml.safe_load((Path(__file__).parents[1] / "pipelines/recipes/disentanglement-transfer-ood/params.yaml")
                         .read_text())["methods"]["betavae"]
    cfg = from_dict(bv.Config, raw | {"latent_dim": 10}, "recipe", "methods.betavae")
    assert cfg.fc_width == 512 and cfg.widths == [64, 128, 128, 256, 256]
    vae = bv.VAE(3, 128, cfg)
    n = sum(p.numel() for p in vae.parameters())
    assert n == 16_406_059 and abs(n - 16.3e6) / 16.3e6 < 0.01
    fc = [m for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(4096, 512), (512, 10), (512, 10), (10, 512),
                                                             (512, 4096)]  # encoder: hidden, mean, logvar; decoder
    no_hidden = bv.VAE(3, 128, from_dict(bv.Config, raw | {"latent_dim": 10, "fc_width": 0}, "r", "m"))
    assert sum(p.numel() for p in no_hidden.parameters()) == 12_325_419  # the old, 12.3 M stack


def test_widths_must_fit_the_image_size() -> None:
    with pytest.raises(ConfigError, match="widths"):
        bv.VAE(3, 20, tiny_config("betavae", widths=[4, 8, 16]))


# ---- losses -----------------------------------------------------------------------------------------------------


def test_kl_known_values() -> None:
    z = torch.zeros(1, 3)
    assert torch.allclose(bv.kl_normal_std(z, z), z)
    assert bv.kl_normal_std(torch.tensor([[1.0]]), torch.tensor([[0.0]])).item() == pytest.approx(0.5)
    lv = torch.tensor([[math.log(2.0)]])  # var 2: 1/2 (2 - log 2 - 1)
    assert bv.kl_normal_std(torch.zeros(1, 1), lv).item() == pytest.approx(0.5 * (1 - math.log(2)))
    a, b = torch.tensor([[0.0]]), torch.tensor([[2.0]])
    assert bv.kl_normal(a, a, b, a).item() == pytest.approx(2.0)  # (mu2 - mu1)^2 / 2
    assert bv.kl_normal(a, lv, a, torch.zeros(1, 1)).item() == pytest.approx(0.5 * (1 - math.log(2)))
    kl12, kl21 = bv.kl_normal(a, lv, b, a), bv.kl_normal(b, a, a, lv)
    assert bv.symmetric_kl(a, lv, b, a).item() == pytest.approx(0.5 * (kl12 + kl21).item())
    assert bv.symmetric_kl(a, lv, b, a).item() == pytest.approx(bv.symmetric_kl(b, a, a, lv).item())


def test_bernoulli_nll_and_elbo_known_values() -> None:
    logits, x = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert torch.allclose(bv.bernoulli_nll(logits, x), torch.full((2,), 48 * math.log(2)))
    rec, kl = bv.beta_vae_terms(logits, x, torch.ones(2, 4), torch.zeros(2, 4))
    assert kl.tolist() == [2.0, 2.0]  # 4 dims x 1/2 mu^2
    assert torch.allclose(rec, torch.full((2,), 48 * math.log(2)))


def test_ada_gvae_averages_the_lower_bin_dims() -> None:
    """delta = [0, 0.005, 4.5, 0.00125]: tau = 2.25, dims 0, 1, 3 (lower bin) are averaged, dim 2 is kept."""
    mu1 = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    mu2 = torch.tensor([[0.0, 0.1, 3.0, 0.05]])
    lv1 = torch.zeros(1, 4)
    lv2 = torch.tensor([[0.0, 0.0, 0.0, math.log(3.0)]])
    delta = bv.symmetric_kl(mu1, lv1, mu2, lv2)
    assert delta[0, 2] == delta.max()
    m1, l1, m2, l2, mask = bv.ada_gvae_aggregate(mu1, lv1, mu2, lv2)
    assert mask.tolist() == [[True, True, False, True]]
    assert m1.tolist()[0] == pytest.approx([0.0, 0.05, 0.0, 0.025])
    assert m2.tolist()[0] == pytest.approx([0.0, 0.05, 3.0, 0.025])
    assert l1[0, 3].item() == pytest.approx(math.log(2.0)) and l2[0, 3].item() == pytest.approx(math.log(2.0))
    assert l1[0, 2].item() == 0.0 and l2[0, 2].item() == 0.0


def test_input_noise_components() -> None:
    x = torch.zeros(4, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    grey = bv.add_input_noise(x, 0.0, 0.2, 8, g)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])  # greyscale
    assert grey[:, :, :, 1:].sub(grey[:, :, :, :-1]).abs().mean() < 0.05 * grey.std() * 8  # smooth: upsampled
    sub = bv.add_input_noise(x, 0.08, 0.0, 8, g)
    assert sub.std().item() == pytest.approx(0.08, rel=0.1)
    assert not torch.equal(sub[:, 0], sub[:, 1])  # independent per subpixel
    assert torch.equal(bv.add_input_noise(x, 0.0, 0.0, 8, g), x)


# ---- data -------------------------------------------------------------------------------------------------------


def test_matching_pairs_exact_k_and_fallback() -> None:
    f = np.array([[0, 0, 0], [0, 0, 1], [1, 1, 1], [2, 2, 2]])
    pairs, dist = bv.matching_pairs(f, 1)
    assert dist == 1 and pairs.tolist() == [[0, 1]]
    pairs, dist = bv.matching_pairs(f, 2)
    assert dist == 2 and pairs.tolist() == [[1, 2]]
    with pytest.warns(UserWarning, match="exactly k=1"):
        pairs, dist = bv.matching_pairs(np.array([[0, 0], [1, 1], [2, 2]]), 1)
    assert dist == 2 and len(pairs) == 3
    with pytest.raises(DataError, match="identical"):
        bv.matching_pairs(np.zeros((3, 2), int), 1)


def test_rendered_pairs_differ_in_k_factors_and_skip_the_holdout() -> None:
    from s2r.data.scenes import factor_sizes

    sizes = factor_sizes(12)
    imgs, facs, _ = bv.render_pair_pool(6, 1, "sim", 16, 12, sizes, {"hue": [1, 4, 7, 10]}, seed=0)
    assert imgs.shape == (6, 2, 16, 16, 3) and imgs.dtype == np.uint8
    assert ((facs[:, 0] != facs[:, 1]).sum(1) == 1).all()
    assert not np.isin(facs[:, :, list(sizes).index("hue")], [1, 4, 7, 10]).any()


# ---- method -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("supervision,pairs", [("unsupervised", "render"), ("weak", "render"), ("weak", "match")])
def test_train_steps_are_finite_and_deterministic(scenes_prepared: Path, supervision: str, pairs: str) -> None:
    from s2r.data.prepared import PreparedBenchmark

    def run() -> list[dict[str, float]]:
        torch.manual_seed(0)
        torch.set_num_threads(1)  # tiny convolutions: one thread avoids oversubscription on a shared CPU
        m = bv.Method(small_cfg(supervision=supervision, pairs=pairs, k=3 if pairs == "match" else 1,
                                input_noise=True), PreparedBenchmark(scenes_prepared), 0)
        m.setup(torch.device("cpu"), None, 4)
        it = m.batches()
        return [m.train_step(next(it)) for _ in range(2)]

    threads = torch.get_num_threads()
    try:
        a, b = run(), run()
    finally:
        torch.set_num_threads(threads)
    assert a == b
    assert all(math.isfinite(v) for r in a for v in r.values())
    assert ("shared_dims" in a[0]) == (supervision == "weak")
    assert a[0]["beta"] < a[1]["beta"] <= 1.0  # linear warm-up


def test_beta_is_scaled_to_the_paper_resolution(scenes_prepared: Path) -> None:
    """beta_resolution 128: the KL weight per pixel of a 128 px image (x (size/128)^2); 0: beta as given."""
    from s2r.data.prepared import PreparedBenchmark

    assert bv.beta_scale(tiny_config("betavae", beta=4.0, image_size=32), 32) == pytest.approx(4.0 / 16)
    assert bv.beta_scale(tiny_config("betavae", beta=4.0, beta_resolution=0), 32) == 4.0
    assert bv.beta_scale(tiny_config("betavae", beta=4.0, beta_resolution=64), 64) == 4.0
    m = bv.Method(small_cfg(beta=4.0, beta_resolution=32), PreparedBenchmark(scenes_prepared), 0)  # 16 px model
    m.setup(torch.device("cpu"), None, 80)
    m.step = 50  # past the warm-up
    assert m.beta_now() == pytest.approx(1.0)
    assert m.train_step(next(m.batches()))["beta"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="beta_resolution"):
        tiny_config("betavae", beta_resolution=-1).validate()


def test_schedule_warmup_and_halvings(scenes_prepared: Path) -> None:
    from s2r.data.prepared import PreparedBenchmark

    m = bv.Method(small_cfg(beta=4.0, lr=1e-3, beta_resolution=0), PreparedBenchmark(scenes_prepared), 0)
    m.setup(torch.device("cpu"), None, 80)
    m.step = 5
    assert m.beta_now() == pytest.approx(4.0 * 5 / 10)  # 0.125 of 80 steps
    m.step = 50
    assert m.beta_now() == 4.0
    lrs = []
    for _ in range(80):
        lrs.append(m.optimizers["vae"].param_groups[0]["lr"])
        m.optimizers["vae"].step()
        m.step_schedulers()
    assert lrs[29] == 1e-3 and lrs[30] == 5e-4 and lrs[59] == 5e-4 and lrs[60] == 2.5e-4  # halved at 30 and 60


def test_holdout_factor_must_exist(scenes_prepared: Path) -> None:
    from s2r.data.prepared import PreparedBenchmark

    with pytest.raises(ConfigError, match="ood_factor"):
        bv.Method(small_cfg(ood_factor="colour"), PreparedBenchmark(scenes_prepared), 0)


def test_user_manifest_with_factor_columns_trains_weakly(tmp_path: Path) -> None:
    """A user's factor-labelled dataset (import-manifest, factor_<name> columns) gets matched pairs."""
    import pandas as pd
    from PIL import Image

    from s2r.data.adapters import from_manifest
    from s2r.data.prepared import PreparedBenchmark, prepare

    rng = np.random.default_rng(0)
    rows = []
    for dom in ("sim", "real"):
        for split in ("train", "val", "test"):
            for i in range(6):
                a, b = int(rng.integers(3)), int(rng.integers(2))
                p = tmp_path / "img" / f"{dom}-{split}-{i}.png"
                p.parent.mkdir(exist_ok=True)
                Image.fromarray(np.full((16, 16, 3), 60 * a + 30 * b, np.uint8)).save(p)
                rows.append({"path": str(p), "domain": dom, "split": split, "factor_a": a, "factor_b": b})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    bench = from_manifest(tmp_path / "m.csv", tmp_path / "bench", name="user", source="sim", target="real")
    data = PreparedBenchmark(prepare(bench, tmp_path / "prep", progress=False))
    m = bv.Method(small_cfg(supervision="weak", ood_factor=""), data, 0)
    assert m.pair_mode == "match" and m.pair_distance == 1
    f = data.get("sim", "train").factors
    assert ((f[m.pairs[:, 0]] != f[m.pairs[:, 1]]).sum(1) == 1).all()
    m.setup(torch.device("cpu"), None, 2)
    assert m.train_step(next(m.batches()))["pair_distance"] == 1.0


# ---- stages: train / evaluate / tune / tables ---------------------------------------------------------------------


@pytest.mark.slow
def test_train_then_evaluate_writes_metrics_and_plots(scenes_prepared: Path, params_file: Path, tmp_path: Path
                                                      ) -> None:
    from s2r import stages
    from s2r.evaluators.disentanglement import METRIC_KEYS

    params = load_params(params_file)
    summary = stages.train(stages.TrainRequest("betavae_weak", scenes_prepared, tmp_path / "model",
                                               metrics_out=tmp_path / "train.json", ckpt_dir=tmp_path / "ckpt"), params)
    assert math.isfinite(summary["val_elbo"]) and summary["val_elbo"] < 0
    res = stages.evaluate("betavae_weak", tmp_path / "model", scenes_prepared, tmp_path / "eval.json",
                          tmp_path / "plots", params)
    saved = json.loads((tmp_path / "eval.json").read_text())
    for k in (*METRIC_KEYS, "elbo", "recon", "ood1a_gbt", "ood1b_mlp", "ood1c_gbt", "ood2a_mlp", "ood2b_gbt"):
        assert math.isfinite(saved[k]), k
    assert res["n_ood_values"] > 0 and res["n_target"] > 0
    for name in ("traversals.png", "reconstructions_target.png", "reconstructions_ood2a.png", "transfer.csv"):
        assert (tmp_path / "plots" / name).is_file(), name


@pytest.mark.slow
def test_tune_beta_vae_study_runs_two_trials(scenes_prepared: Path, params_file: Path, tmp_path: Path) -> None:
    from s2r import tune

    res = tune.run(tune.TuneOptions(study="beta_vae", data_dir=scenes_prepared, params_path=params_file,
                                    out_dir=tmp_path / "tune", study_name=f"bv-{tmp_path.name}", n_trials=2))
    assert res["metrics"]["n_complete"] == 2
    assert yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())["value"] < 0  # an ELBO


@pytest.mark.slow
def test_tables_cli_on_tiny_data(scenes_prepared: Path, params_file: Path, tmp_path: Path) -> None:
    import pandas as pd
    from click.testing import CliRunner

    from s2r.cli import main

    out = tmp_path / "tables"
    r = CliRunner().invoke(main, ["tables", "betavae", "--data", str(scenes_prepared), "--out", str(out),
                                  "--params", str(params_file)])
    assert r.exit_code == 0, r.output
    corr = json.loads((out / "spearman.json").read_text())
    assert corr["n_models"] == 4 and "mig" in corr["spearman"] and "ood2b_gbt" in corr["columns"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "weak_raises_dci_disentanglement" in metrics and "noise_lowers_ood2a_gbt" not in metrics  # no noisy runs
    for name in ("spearman.png", "transfer.md", "transfer.csv", "runs.csv", "per_factor.md", "fig3_right.png"):
        assert (out / name).is_file()
    per_factor = pd.read_csv(out / "per_factor.csv")  # Fig. 15: one row per model x scenario x regressor x factor
    assert len(per_factor) > 0 and set(per_factor["model"]) == set(pd.read_csv(out / "runs.csv")["model"])
    assert "hue" not in set(per_factor[per_factor["scenario"] == "OOD2-A"]["factor"])  # the OOD factor is left out
    f3 = json.loads((out / "fig3_right.json").read_text())
    assert f3["n_models"] == {"unsupervised": 2, "weak": 2}
    weak = f3["spearman"]["weak"]
    assert set(weak) == {"elbo", "recon", "gbt10000_error"} and "mig" in weak["elbo"]
    assert len(list((out / "models").glob("*/traversals.png"))) == 4


def test_correlation_pieces_on_a_hand_built_table() -> None:
    import pandas as pd

    from s2r.tables import betavae as tb

    runs = pd.DataFrame({"mig": [0.1, 0.2, 0.3, 0.4], "dci_disentanglement": [0.4, 0.3, 0.2, 0.1],
                         "sap": [0.0] * 4, "weak_supervision": [0, 0, 1, 1], "input_noise": [0, 1, 0, 1],
                         "ood2a_gbt": [0.4, 0.3, 0.2, 0.1], "ood2b_mlp": [0.5, 0.1, 0.6, 0.2]})
    corr = tb.spearman_table(runs, ["mig", "dci_disentanglement", "sap", "input_noise"], ["ood2a_gbt", "ood2b_mlp"])
    assert corr["mig"]["ood2a_gbt"] == pytest.approx(-1.0)
    assert corr["dci_disentanglement"]["ood2a_gbt"] == pytest.approx(1.0)
    assert corr["sap"]["ood2a_gbt"] is None  # constant: undefined
    f = tb.findings(runs)
    assert f["weak_raises_mig"] is True and f["weak_raises_dci_disentanglement"] is False
    assert f["noise_lowers_ood2b_mlp"] is True and f["ood2b_mlp_noise_mean"] == pytest.approx(0.15)
    fig = tb.plot_heatmap(corr, "t")
    assert len(fig.axes) == 1


def test_fig3_right_is_computed_per_supervision() -> None:
    """Fig. 3 right: ELBO / reconstruction / GBT10000 vs each metric, over unsupervised and weak models apart."""
    import pandas as pd

    from s2r.tables import betavae as tb

    runs = pd.DataFrame({"supervision": ["unsupervised"] * 4 + ["weak"] * 4,
                         "mig": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                         "elbo": [-4.0, -3.0, -2.0, -1.0, -1.0, -2.0, -3.0, -4.0],  # + in one group, - in the other
                         "recon": [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0],
                         "gbt10000_error": [0.4, 0.3, 0.2, 0.1, 0.4, 0.3, 0.2, 0.1]})
    f3 = tb.fig3_right(runs)
    assert f3["unsupervised"]["elbo"]["mig"] == pytest.approx(1.0) and f3["weak"]["elbo"]["mig"] == pytest.approx(-1.0)
    assert f3["weak"]["gbt10000_error"]["mig"] == pytest.approx(-1.0) and list(f3["weak"]["recon"]) == ["mig"]
    pooled = tb.spearman_table(runs, ["elbo"], ["mig"])["elbo"]["mig"]
    assert abs(pooled) < 0.5  # pooling hides both: why the paper splits by supervision
    assert len(tb.plot_fig3_right(f3).axes) == 2


def test_gbt10000_error_known_cases() -> None:
    from s2r.evaluators.disentanglement import downstream_gbt_error

    rng = np.random.default_rng(0)
    y = np.c_[rng.integers(0, 4, 600), rng.integers(0, 3, 600), np.zeros(600, int)]  # a constant factor: skipped
    perfect = downstream_gbt_error(y + 0.01 * rng.normal(size=y.shape), y)
    assert perfect["gbt10000_error"] < 0.02 and perfect["gbt_train_size"] == 480  # 600 - 120 test points
    noise = downstream_gbt_error(rng.normal(size=(600, 3)), y)["gbt10000_error"]
    assert noise > 0.5  # chance error 1 - (1/4 + 1/3) / 2 = 0.71
    assert downstream_gbt_error(y.astype(float), y, n_train=100)["gbt_train_size"] == 100


def test_default_params_declare_both_variants_and_the_study() -> None:
    """The project's params.yaml declares the two variants (the weak one a `base: betavae` block) and the study over
    beta, supervision, noise, latent size and seed (its layout, not its values: a user's -S keeps this true)."""
    from conftest import REPO
    from s2r.config import load_yaml

    p = load_params(REPO / "params.yaml")
    assert {"betavae", "betavae_weak"} <= set(p.methods)
    assert load_yaml(REPO / "params.yaml")["methods"]["betavae_weak"]["base"] == "betavae"
    assert {"methods.betavae.beta", "methods.betavae.supervision", "methods.betavae.input_noise",
            "methods.betavae.latent_dim", "seed"} <= set(p.studies["beta_vae"].search_space)
    assert p.reports.betavae_tables is not None


@pytest.mark.parametrize("supervision", ["unsupervised", "weak"])
def test_resume_matches_uninterrupted_run(scenes_prepared: Path, tmp_path: Path, supervision: str) -> None:
    """Checkpointed step counter (KL warm-up), noise RNG and pool sampler: a resumed run equals an uninterrupted one."""
    from s2r.config import TrainParams
    from s2r.data.prepared import PreparedBenchmark
    from s2r.train import fit, load_checkpoint, seed_everything

    train = tiny_section(TrainParams, "train", device="cpu", checkpoint_every=2, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make() -> bv.Method:
        seed_everything(0)
        m = bv.Method(small_cfg(supervision=supervision, input_noise=True, warmup_fraction=1.0),
                      PreparedBenchmark(scenes_prepared), 0)
        m.setup(torch.device("cpu"), None, 4)
        return m

    class Stop(Exception):
        pass

    def stop(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise Stop

    try:
        ref = fit(make(), train=train, epochs=2, steps_per_epoch=2, ckpt_dir=tmp_path / "a")
        with pytest.raises(Stop):
            fit(make(), train=train, epochs=2, steps_per_epoch=2, ckpt_dir=tmp_path / "b", on_epoch=stop)
        state = load_checkpoint(tmp_path / "b")
        assert state is not None and state["step"] == 2
        out = fit(make(), train=train, epochs=2, steps_per_epoch=2, ckpt_dir=tmp_path / "b", resume_state=state)
    finally:
        torch.set_num_threads(threads)
    assert [h["train_loss"] for h in out.history] == pytest.approx([h["train_loss"] for h in ref.history], abs=1e-4)
    assert out.history[-1]["train_beta"] == ref.history[-1]["train_beta"]
