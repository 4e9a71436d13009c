"""Paper recipes (pipelines/recipes/<paper>): their dvc.yaml, recipe vars and params (with the stand-in
overrides) load strictly and agree with each other; `dvc repro` completes on the stand-ins (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from s2r import recipes
from s2r.config import ConfigError
from s2r.data import sources
from s2r.params import parse_params, resolve_methods

PAPERS = sorted(p.name for p in (REPO / "pipelines" / "recipes").iterdir() if (p / "dvc.yaml").is_file())


def test_one_recipe_per_paper() -> None:
    assert PAPERS == sorted({"extractor-autoencoder-pirl-triplet", "twin-vae-depth-segmentation",
                             "disentanglement-transfer-ood", "mixing-ratio-mrgan", "cut-patch-refinement"})


@pytest.mark.parametrize("paper", PAPERS)
@pytest.mark.parametrize("fixture", [False, True], ids=["full", "standin"])
def test_recipe_loads_strictly(paper: str, fixture: bool) -> None:
    rec = recipes.load(paper, REPO, fixture=fixture)
    assert (rec["dir"] / "README.md").is_file()
    if "params" in rec:
        parse_params(rec["params"], f"{paper}/params.yaml")  # strict: every key typed and known
    raw, srcs = rec["recipe"]["raw"], rec["recipe"].get("sources", {})
    assert set(raw) <= set(sources.SOURCES)
    for name, s in srcs.items():
        kind = s.get("kind", name)
        if "from" in s:  # data-side recipes: the path is templated into the add stage
            assert kind in sources.SOURCES and s["from"] == raw[kind], name
    stages = rec["dvc"]["stages"]
    for name, stage in stages.items():
        do = stage.get("do", stage)
        assert do["cmd"].startswith("s2r "), name
        assert do.get("wdir") == "../../..", name
    text = (rec["dir"] / "dvc.yaml").read_text()
    assert "--no-dvc" in text  # stage outputs are tracked by DVC itself, not by `dvc add`
    built = set(srcs) | set(rec["recipe"].get("merges") or {})
    assert set(_prepared(rec)) <= built
    if "params" in rec:  # DVC loads params.yaml next to dvc.yaml as template vars too: no key may be defined twice
        assert not set(rec["recipe"]) & set(rec["params"]), sorted(set(rec["recipe"]) & set(rec["params"]))


def _prepared(rec: dict) -> list[str]:
    """The benchmarks a recipe validates and prepares (`prepared` where params.yaml already has `benchmarks`)."""
    return list(rec["recipe"].get("benchmarks") or rec["recipe"].get("prepared") or [])


def test_fixture_override_must_name_existing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        recipes.overridden({"a": {"b": 1}}, {"a.c": 2}, "fixture.yaml")
    assert recipes.overridden({"a": {"b": 1}}, {"a.b": 2}, "x") == {"a": {"b": 2}}
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        recipes.load("nope", REPO)


def test_fixture_wildcard_overrides_every_block_that_has_the_key() -> None:
    raw = {"methods": {"a": {"epochs": 5, "x": 1}, "b": {"epochs": 7}, "c": {"y": 2}}}
    out = recipes.overridden(raw, {"methods.*.epochs": 1, "methods.*.x": 3}, "fixture.yaml")
    assert out == {"methods": {"a": {"epochs": 1, "x": 3}, "b": {"epochs": 1}, "c": {"y": 2}}}
    with pytest.raises(ConfigError, match="matches no existing key"):
        recipes.overridden(raw, {"methods.*.nope": 1}, "fixture.yaml")


def test_paper4_recipe_uses_existing_cli_and_paper_scale() -> None:
    rec = recipes.load("mixing-ratio-mrgan", REPO)
    p = resolve_methods(rec["params"]["methods"])
    assert p["mixing"]["epochs"] == 500 and p["cyclegan"]["epochs"] * p["cyclegan"]["steps_per_epoch"] == 40_000
    assert p["cyclegan"]["disc_channels"] == [64, 128] and p["cyclegan"]["batch_size"] == 144
    cmds = " ".join(s.get("do", s)["cmd"] for s in rec["dvc"]["stages"].values())
    for cmd in ("s2r data add", "s2r data validate", "s2r data prepare", "s2r train", "s2r refine",
                "s2r tables mixing"):
        assert cmd in cmds
    # appendix 3.2: real-only runs decay at epochs 89 / 139 of 500, mixed runs at 221 / 348
    assert [round(f * 500) for f in p["mixing"]["real_only_lr_milestones"]] == [89, 139]
    assert [round(f * 500) for f in p["mixing"]["lr_milestones"]] == [221, 348]
    # the GANs read exactly the classifier's labelled real images
    for gan in ("cyclegan", "mrgan", "mrgan_r_rs", "mrgan_rr_s"):
        assert (p[gan]["real_per_class"], p[gan]["real_subset_seed"]) == (
            p["mixing"]["real_per_class"], p["mixing"]["real_subset_seed"]), gan
        assert (p[gan]["pretrain_g_steps"], p[gan]["pretrain_d_steps"]) == (1000, 500)  # on top of the 40,000
    # Fig. 5B's three stage-2 mappings (Fig. 7): RR-RS, R-RS, RR-S
    assert [(p[k]["domain_a"], p[k]["domain_b"]) for k in ("mrgan", "mrgan_r_rs", "mrgan_rr_s")] == [
        ("synthetic_cyclegan", "real_cyclegan"), ("synthetic_cyclegan", "real"), ("synthetic", "real_cyclegan")]
    stages = rec["dvc"]["stages"]
    assert set(stages["train"]["foreach"]) == {"cyclegan", "mrgan", "mrgan_r_rs", "mrgan_rr_s"}
    assert cmds.count("--stage2") == 3 and "--synthetic data/prepared/cifar_da9 --out" in stages["tables_da9"]["cmd"]
    # CIFAR-DA4 (Table 3) and CIFAR-DA9 (Table 2) at the paper's real sizes, in the recipe and in its stand-in
    for rc in (rec["recipe"], recipes.load("mixing-ratio-mrgan", REPO, fixture=True)["recipe"]):
        assert {k: v["variant"] for k, v in rc["sources"].items()} == {"cifar_da4": "da4", "cifar_da9": "da9"}
        for v in rc["sources"].values():
            assert (v["real_train"], v["real_val"], v["real_test"], v["val_from"]) == (500, 50, 50, "test")


def _expanded_commands(rec: dict) -> list[str]:
    """Every stage command with its foreach items substituted (${key}, ${item}, ${item.x}) and recipe vars."""
    import re

    def sub(cmd: str, key: str, item: object) -> str:
        cmd = cmd.replace("${key}", key)
        if isinstance(item, dict):
            cmd = re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item.get(m.group(1), m.group(0))), cmd)
        else:
            cmd = cmd.replace("${item}", str(item))
        return cmd

    out = []
    for stage in rec["dvc"]["stages"].values():
        fe = stage.get("foreach")
        cmd = " ".join(stage.get("do", stage)["cmd"].split())
        if fe is None:
            out.append(cmd)
            continue
        if isinstance(fe, str):  # ${sources} etc.: a recipe var
            fe = rec["recipe"][fe.strip("${}")]
        for key, item in (fe.items() if isinstance(fe, dict) else ((str(i), i) for i in fe)):
            out.append(sub(cmd, key, item))
    return out


def test_paper2_recipe_uses_existing_cli_methods_and_paper_scale() -> None:
    """Paper 2 (twin VAE): the Table 2 network at 256 px, Adam 1e-4, ~300 + ~25 epochs (Section 4.2), and every
    stage command is an existing s2r command with existing options and method names."""
    import click

    from s2r.cli import main
    from s2r.methods import registry

    rec = recipes.load("twin-vae-depth-segmentation", REPO)
    p, methods = rec["params"], resolve_methods(rec["params"]["methods"])
    assert p["train"]["device"] == "cuda"
    assert set(methods) == {"twinvae", "twinvae_heads", "twinvae_simonly", "twinvae_targetsup"}
    for name, m in methods.items():
        assert (m["stem_channels"], m["pack_channels"], m["latent_channels"], m["mid_blocks"], m["pack_d"]) == (
            64, [76, 88, 100, 128, 200, 250], 300, 2, 8), name
        assert m["lr"] == 1e-4 and (m["beta1"], m["beta2"]) == (0.9, 0.999), name
        assert registry.resolve(name) == "s2r.methods.twinvae", name
    s1, s2 = methods["twinvae"], methods["twinvae_heads"]
    assert s1["stage"] == "vae" and s1["epochs"] == 300 and s1["steps_per_epoch"] * s1["batch_size"] >= 2126
    assert s2["stage"] == "heads" and s2["epochs"] == 25 and s2["steps_per_epoch"] * s2["batch_size"] >= 21260
    srcs = rec["recipe"]["sources"]
    assert all(s["options"]["image_size"] == 256 for s in srcs.values())
    assert srcs["vkitti2_s1"]["options"]["frame_step"] == 10  # 21,260 / 10 = the paper's 2,126 stage-1 images
    assert sorted(p["reports"]["depth_segmentation"]["classes"]) == sorted(
        ["terrain", "sky", "vegetation", "building", "road", "guard_rail", "traffic_sign", "traffic_light", "pole",
         "truck", "car", "van"])
    cmds = _expanded_commands(rec)
    joined = " ".join(cmds)
    for c in ("s2r train twinvae --data data/prepared/vkitti2_kitti_s1", "s2r train twinvae_heads",
              "--init data/models/vkitti2_kitti/twinvae ", "s2r train twinvae_simonly", "s2r train twinvae_targetsup",
              "s2r evaluate twinvae_heads", "s2r evaluate twinvae_simonly", "s2r evaluate twinvae_targetsup",
              "s2r tables twinvae"):
        assert c in joined, c
    for cmd in cmds:  # every (sub)command and option exists in the CLI
        words, cur = cmd.split()[1:], main
        while isinstance(cur, click.Group):
            sub = cur.get_command(click.Context(cur), words[0])
            assert sub is not None, (cmd, words[0])
            cur, words = sub, words[1:]
        opts = {o for prm in cur.params for o in (*prm.opts, *getattr(prm, "secondary_opts", []))}
        used = {w.split("=")[0] for w in words if w.startswith("--")}
        assert used <= opts, (cmd, used - opts)
        if cur.name in ("train", "evaluate"):
            assert words[0] in methods, cmd
def test_paper1_recipe_uses_existing_cli_methods_and_paper_scale() -> None:
    """Paper 1 (extractor AEs): appendix A.2 (AdamW 1e-4, wd 1e-5, batch 64, 250 / 100 epochs, 224 px extractor
    input, ImageNet VGG-11 cut at level -3, latent 64 / 10, Table 7 / 4 / 6 decoders, SSIM, Eq. 5 alpha = beta = 1),
    the Table 2-3 variants on Kodiaq -> TICaM, and every stage command is an existing s2r command / option / method."""
    import click

    from s2r.cli import main
    from s2r.methods import registry

    rec = recipes.load("extractor-autoencoder-pirl-triplet", REPO)
    p = parse_params(rec["params"], "extractor-autoencoder-pirl-triplet/params.yaml")
    assert p.train.device == "cuda"
    interior = {"ae_e": ("vanilla", False), "ae_i_e": ("I", False), "ae_ii_e": ("II", False),
                "ae_e_tae": ("vanilla", True), "ae_i_e_tae": ("I", True), "ae_ii_e_tae": ("II", True)}
    sviro = {"ae_e_sviro": ("vanilla", False), "ae_ii_e_sviro": ("II", False), "ae_e_tae_sviro": ("vanilla", True),
             "ae_ii_e_tae_sviro": ("II", True)}
    # Table 1: {toy, realistic} x {AE, VAE, beta-VAE 4 / 8, FactorVAE 10 / 50, E-AE}
    table1 = {"ae_mpi3d": ("ae", 1.0, 10.0, "ssim", "none"), "ae_mpi3d_vae": ("vae", 1.0, 10.0, "bce", "none"),
              "ae_mpi3d_betavae4": ("vae", 4.0, 10.0, "bce", "none"), "ae_mpi3d_betavae8": ("vae", 8.0, 10.0, "bce",
                                                                                              "none"),
              "ae_mpi3d_factorvae10": ("factorvae", 1.0, 10.0, "bce", "none"),
              "ae_mpi3d_factorvae50": ("factorvae", 1.0, 50.0, "bce", "none"),
              "ae_mpi3d_e": ("ae", 1.0, 10.0, "ssim", "vgg11")}
    mpi3d = {**table1, **{f"{k}_toy": v for k, v in table1.items()}}
    baselines = {"classifier_vgg11": False, "classifier_vgg11_scratch": True, "classifier_vgg11_sviro": False}
    assert set(p.methods) == set(interior) | set(sviro) | set(mpi3d) | set(baselines)
    for name, m in p.methods.items():
        assert (m.lr, m.weight_decay, m.batch_size) == (1e-4, 1e-5, 64)  # A.2, autoencoders and classifiers alike
        if name in baselines:
            assert registry.resolve(name) == "s2r.methods.classifier", name
            assert m.train_extractor == baselines[name] and m.hflip and m.extractor == "vgg11"
            assert m.extractor_weights == ("none" if m.train_extractor else "imagenet") and m.epochs == 250
            continue
        assert registry.resolve(name) == "s2r.methods.ae", name
        assert (m.alpha, m.beta) == (1, 1) and m.recon_loss == ("bce" if m.model != "ae" else "ssim"), name
        assert m.triplet_margin == 0.2 and m.triplet_swap and m.knn_k == 0
        if m.extractor != "none":
            assert m.extractor_weights == "imagenet" and m.extractor_input_size == 224, name
    for name, (sampling, triplet) in {**interior, **sviro}.items():
        m = p.methods[name]
        assert (m.sampling, m.triplet, m.extractor, m.latent_dim, m.decoder_fc_channels, m.epochs) == (
            sampling, triplet, "vgg11", 64, 256, 250), name  # Table 7: FC 4096 = 256 x 4 x 4
        # A.2: flips (labels mirrored), negatives one seat away, no all-empty negatives
        assert m.hflip and m.triplet_negatives == "one_part" and m.triplet_exclude_empty, name
    for name, (model, beta_kl, gamma, loss, ext) in mpi3d.items():
        m = p.methods[name]
        assert (m.model, m.beta_kl, m.gamma_tc, m.recon_loss, m.extractor) == (model, beta_kl, gamma, loss, ext), name
        assert (m.latent_dim, m.decoder_fc_channels, m.epochs, m.sampling) == (10, 64, 100, "vanilla"), name
        assert m.source_domain == ("toy" if name.endswith("_toy") else "realistic"), name
    srcs = rec["recipe"]["sources"]
    assert all(s["options"]["image_size"] == 64 for s in srcs.values())  # the Table 4 / 6 / 7 decoders end at 64
    assert srcs["ticam"]["options"]["flips"] and srcs["sviro_illumination_lr"]["options"]["seats"] == "outer"
    fixture = recipes.load("extractor-autoencoder-pirl-triplet", REPO, fixture=True)["params"]
    fixture = resolve_methods(fixture["methods"])
    assert all(m["extractor_weights"] == "none" for m in fixture.values())  # no ImageNet weights in a stand-in
    cmds = _expanded_commands(rec)
    joined = " ".join(cmds)
    for name in [*interior, "classifier_vgg11", "classifier_vgg11_scratch"]:
        assert f"s2r train {name} --data data/prepared/kodiaq_ticam " in joined, name
        assert f"s2r evaluate {name} --model data/models/kodiaq_ticam/{name} " in joined, name
    for name in [*sviro, "classifier_vgg11_sviro"]:
        assert f"s2r train {name} --data data/prepared/sviro " in joined, name
        assert f"s2r evaluate {name} --model data/models/sviro/{name} " in joined, name
    for name in mpi3d:
        assert f"s2r train {name} --data data/prepared/mpi3d_large " in joined, name
        assert f"s2r evaluate {name} --model data/models/mpi3d_large/{name} " in joined, name
    for cmd in cmds:  # every (sub)command and option exists in the CLI
        words, cur = cmd.split()[1:], main
        while isinstance(cur, click.Group):
            sub = cur.get_command(click.Context(cur), words[0])
            assert sub is not None, (cmd, words[0])
            cur, words = sub, words[1:]
        opts = {o for prm in cur.params for o in (*prm.opts, *getattr(prm, "secondary_opts", []))}
        used = {w.split("=")[0] for w in words if w.startswith("--")}
        assert used <= opts, (cmd, used - opts)
        if cur.name in ("train", "evaluate"):
            assert words[0] in p.methods, cmd


def test_paper3_recipe_uses_existing_cli_and_paper_scale() -> None:
    from s2r.tables.betavae import model_grid

    rec = recipes.load("disentanglement-transfer-ood", REPO)
    p = parse_params(rec["params"], "disentanglement-transfer-ood/params.yaml")
    m, t = p.methods["betavae"], p.reports.betavae_tables
    assert t.epochs * t.steps_per_epoch == 400_000 and m.batch_size == 64 and m.lr == 1e-4  # appendix A
    assert m.widths == [64, 128, 128, 256, 256] and m.image_size == 0 and p.train.device == "cuda"
    assert len(model_grid(t)) == 1080 and sorted(t.betas) == [1.0, 2.0, 4.0] and len(t.seeds) == 10
    cmds = " ".join(s.get("do", s)["cmd"] for s in rec["dvc"]["stages"].values())
    for cmd in ("s2r data add", "s2r data validate", "s2r data prepare", "s2r tables betavae"):
        assert cmd in cmds
    prepared = rec["recipe"]["prepared"]
    for name, want in (("mpi3d", "object_color"), ("trifinger", "cube_hue")):  # each an existing factor
        from s2r.data.sources import misc, mpi3d

        factors = mpi3d.FACTORS if name == "mpi3d" else misc.TRIFINGER_FACTORS
        b = prepared[name]
        assert b["ood_factor"] == want in factors
        held = [int(v) for v in str(b["ood_holdout"]).split(",")]
        assert 2 <= factors[want] - len(held) and all(0 <= v < factors[want] for v in held)

@pytest.mark.parametrize("fixture", [False, True], ids=["full", "standin"])
def test_paper5_recipe_uses_existing_cli_and_paper_scale(fixture: bool) -> None:
    import re

    from s2r.methods import registry

    rec = recipes.load("cut-patch-refinement", REPO, fixture=fixture)
    stages, r = rec["dvc"]["stages"], rec["recipe"]
    cmds = " ".join(s.get("do", s)["cmd"] for s in stages.values())
    for cmd in ("s2r data add", "s2r data validate", "s2r data prepare", "s2r train cut", "s2r refine cut",
                "s2r train segmenter_", "s2r evaluate segmenter_", "s2r tables cut"):
        assert cmd in cmds
    for seg in r["segmenters"]:  # every segmenter the matrix names is a params block of a registered method
        assert f"segmenter_{seg}" in resolve_methods(rec["params"]["methods"]) and registry.resolve(f"segmenter_{seg}")
    assert set(r["experiments"]) == set(_prepared(rec)) and {t["benchmark"] for t in r["tables"].values()} <= set(
        _prepared(rec))
    # the --set overrides of the templated commands name existing keys, with values the strict loader accepts
    for key, entries in (("cut", r["experiments"]), ("tables", r["tables"])):
        cmd = stages[key]["do"]["cmd"]
        for name, item in entries.items():
            sets = dict(kv.split("=", 1) for kv in re.findall(r"--set '?([^ ']+)'?", cmd))
            assert len(sets) >= 2, cmd
            over = {k: yaml.safe_load(re.sub(r"\$\{item\.(\w+)\}", lambda m, it=item: str(it[m.group(1)]), v))
                    for k, v in sets.items()}
            params = dict(rec["params"])
            for k, v in over.items():
                params = recipes.overridden(params, {k: v}, f"{key}@{name}")
            parsed = parse_params(params, f"{key}@{name}")
            size = r["sources"][item.get("benchmark", name)]["options"]["image_size"]
            sizes = parsed.reports.cut_tables.patch_sizes if key == "tables" else [parsed.methods["cut"].patch_size]
            assert max(sizes) <= size, (name, sizes, size)
    if not fixture:  # Section IV-A/B/D at the paper's scale
        m, t = resolve_methods(rec["params"]["methods"]), rec["params"]["reports"]["cut_tables"]
        assert m["cut"]["batch_size"] == 40 and m["cut"]["epochs"] == 400 and not m["cut"]["flip"]
        assert sorted(t["patch_sizes"]) == [60, 70, 90, 100, 120, 160] and t["last_k"] == 50
        assert t["seg_epochs"] == 300 and t["seg_steps_per_epoch"] * m["segmenter_target"]["batch_size"] == 1500
        assert all(m[f"segmenter_{s}"]["ema_decay"] == 0.995 for s in r["segmenters"])
        assert r["experiments"]["hb"] == {"patch_size": 70, "lambda_nce": 2.0}
        assert sorted(t["lambda_nce"] for k, t in r["tables"].items() if k.startswith("hb")) == [2.0, 5.0, 7.0]
        assert rec["params"]["train"]["device"] == "cuda"


def test_tables_cut_set_must_be_key_value(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from s2r.cli import main

    res = CliRunner().invoke(main, ["tables", "cut", "--data", str(tmp_path), "--set", "reports.cut_tables.lambda_nce"])
    assert res.exit_code != 0 and "expected KEY=VALUE" in (res.output + str(res.exception))


@pytest.mark.slow
@pytest.mark.parametrize("paper", PAPERS)
def test_recipe_runs_end_to_end_on_standins(paper: str, tmp_path: Path) -> None:
    root = recipes.standin(paper, tmp_path / "proj", REPO)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO / "src"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    r = subprocess.run([str(Path(sys.executable).with_name("dvc")), "repro", f"pipelines/recipes/{paper}/dvc.yaml"],
                       cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = recipes.load(paper, REPO, fixture=True)
    for b in _prepared(rec) or ["cifar_da4"]:
        report = yaml.safe_load((root / "data" / "reports" / b / "validation.json").read_text())
        assert report["success"] and (root / "data" / "prepared" / b / "prepared.json").is_file()
    if paper == "twin-vae-depth-segmentation":
        table = (root / "data" / "tables" / "vkitti2_kitti" / "table1.md").read_text()
        assert "twinvae_heads" in table and "with depth" in table and "with masks" in table
        ev_path = root / "data" / "metrics" / "vkitti2_kitti" / "twinvae_heads" / "evaluate.json"
        ev = yaml.safe_load(ev_path.read_text())
        assert ev["depth_images"] > 0 and ev["seg_images"] > 0 and ev["n"] > max(ev["depth_images"], ev["seg_images"])
    if paper == "extractor-autoencoder-pirl-triplet":
        for b, name in (("kodiaq_ticam", "ae_ii_e_tae"), ("mpi3d_large", "ae_mpi3d_e_toy")):
            ev = yaml.safe_load((root / "data" / "metrics" / b / name / "evaluate.json").read_text())
            assert ev["recon_ssim_real"] is not None and (b != "kodiaq_ticam" or "knn_accuracy" in ev)
            assert ev.get("paired", 0) == 0 if b == "kodiaq_ticam" else ev["paired"] > 0  # scenes pair in MPI3D only
    if paper == "mixing-ratio-mrgan":
        assert "Real + Refined by MrGAN" in (root / "data" / "tables" / "cifar_da4" / "table3.md").read_text()
    if paper == "disentanglement-transfer-ood":
        for b in ("mpi3d", "trifinger"):
            m = yaml.safe_load((root / "data" / "tables" / b / "metrics.json").read_text())
            assert m["n_models"] == 2 and "ood1a_gbt" in (root / "data" / "tables" / b / "transfer.md").read_text()
