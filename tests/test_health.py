"""Training-health checks (s2r.health): known values and a forced collapse that `s2r report` must mark (the paper
verdicts: tests/test_verdicts.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import prepared_scenes, tiny_config, tiny_params_dict
from s2r import health
from s2r.params import load_params
from s2r.report import report


@pytest.fixture(scope="module")
def scenes_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny embedded scenes benchmark (16 px) with depth and masks."""
    return prepared_scenes(tmp_path_factory.mktemp("scenes"), 8, 4, 4)


# ---- measures ---------------------------------------------------------------------------------------------------
def test_active_units_known_values() -> None:
    mu = np.zeros((5, 3))
    mu[:, 1] = 1.0  # KL = 0.5 nats in dim 1
    lv = np.zeros((5, 3))
    lv[:, 2] = math.log(0.5)  # KL = 0.5 (0.5 - log 0.5 - 1) = 0.0966 nats in dim 2
    out = health.active_units(mu, lv)
    assert out["active_units"] == 2
    assert out["kl_total"] == pytest.approx(0.5 + 0.5 * (0.5 - math.log(0.5) - 1))
    # spatial latents (B, C, h, w): per channel, averaged over positions
    assert health.active_units(np.zeros((2, 4, 3, 3)), np.zeros((2, 4, 3, 3)))["active_units"] == 0


def test_class_usage_counts_predicted_missed_and_ignored() -> None:
    truth = np.array([[0, 1, 2, 255]])
    pred = np.array([[1, 1, 1, 0]])  # the ignored pixel's prediction does not count
    out = health.class_usage(pred, 3, truth, ignore_index=255)
    assert out == {"pred_classes": 1.0, "majority_share": 1.0, "missed_classes": 2.0}
    assert health.class_usage(np.array([0, 1, 2, 2]), 3)["pred_classes"] == 3


def test_frozen_losses_and_gan_balance() -> None:
    moving = [{"train_loss": 1.0, "train_beta": 1.0}, {"train_loss": 0.5, "train_beta": 1.0}]
    frozen = [{"train_loss": 0.7, "train_d": 2.0}, {"train_loss": 0.7, "train_d": 2.0}]
    assert health.frozen_losses(moving) == [] and health.frozen_losses(frozen[:1]) == []
    assert health.frozen_losses(frozen) == ["train_loss"]
    assert health.gan_balance({"train_d_real": 0.99, "train_d_fake": 0.01}) == {"d_gap": pytest.approx(0.98)}
    wins = health.assess([{health.PREFIX + "d_gap": 0.98}], health.GAN_CHECKS)
    loses = health.assess([{health.PREFIX + "d_gap": -0.6}], health.GAN_CHECKS)
    ok = health.assess([{health.PREFIX + "d_gap": 0.3}], health.GAN_CHECKS)
    assert wins["health"] == "collapsed" and "wins outright" in wins["health_reasons"][0]
    assert "loses outright" in loses["health_reasons"][0]
    assert ok == {"health": "ok", "health_reasons": []}
    assert "frozen losses: train_loss" in health.assess(frozen, [])["health_reasons"][0]


def test_evaluation_reasons_single_predicted_class() -> None:
    one = {"confusion_matrix": [[0, 5], [0, 7]], "classes": ["bg", "table"], "domain": "real"}
    two = {"confusion_matrix": [[4, 1], [0, 7]], "classes": ["bg", "table"]}
    assert "'table'" in health.evaluation_reasons(one)[0]
    assert health.evaluation_reasons(two) == [] and health.evaluation_reasons({}) == []


def test_betavae_declares_posterior_collapse(scenes_prepared: Path) -> None:
    """Zeroed posterior heads (mu = 0, logvar = 0: KL = 0 in every dim) fail the betavae check."""
    import torch

    from s2r.methods import betavae as bv

    cfg = tiny_config("betavae", image_size=16, widths=[4, 8], latent_dim=4, batch_size=4, render_pairs=8, cache_dir="",
                    val_images=4)
    m = bv.Method(cfg, bv_data(scenes_prepared), 0)
    with torch.no_grad():
        for lin in (m.vae.encoder.mean, m.vae.encoder.logvar):
            lin.weight.zero_()
            lin.bias.zero_()
    sig = health.epoch_signals(m, {})
    assert sig[health.PREFIX + "active_units"] == 0
    verdict = health.assess([sig], m.health_checks())
    assert verdict["health"] == "collapsed" and "posterior collapse" in verdict["health_reasons"][0]


def bv_data(root: Path):  # noqa: ANN201
    from s2r.data.prepared import PreparedBenchmark

    return PreparedBenchmark(root)


# ---- a model that collapses on purpose ---------------------------------------------------------------------------
def _collapsing_params(tmp_path: Path):  # noqa: ANN202
    """Zero-initialised heads with the segmentation loss switched off: class 0 everywhere, for ever."""
    raw = tiny_params_dict()
    raw["methods"]["twinvae_simonly"].update(init_std=0.0, w_seg=0.0, epochs=2)
    raw["tracking"]["log_model"] = False
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(pf)


def test_fit_logs_signals_and_the_report_marks_the_collapse(scenes_prepared: Path, tmp_path: Path) -> None:
    """The loop logs the declared single-class signal every epoch; the verdict and `s2r report` say COLLAPSED."""
    import torch

    from s2r.evaluators.segmentation import confusion
    from s2r.files import write_json
    from s2r.methods import registry
    from s2r.train import fit

    params = _collapsing_params(tmp_path)
    cfg = params.methods["twinvae_simonly"]
    m = registry.method_class("twinvae_simonly")(cfg, bv_data(scenes_prepared), 0)
    m.setup(torch.device("cpu"), None, cfg.epochs * cfg.steps_per_epoch)
    res = fit(m, train=params.train, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, ckpt_dir=tmp_path / "ck")
    assert [h[health.PREFIX + "pred_classes"] for h in res.history] == [1.0, 1.0]
    verdict = health.assess(res.history, m.health_checks())
    assert verdict["health"] == "collapsed" and "single-class segmentation masks" in verdict["health_reasons"][0]
    test = m.data.get(m.data.spec.target, "test")
    cm = confusion(np.asarray(test.masks), m.predict(test.images)["mask"], len(m.seg_classes), ignore_index=255)
    d = tmp_path / "metrics" / "twinvae_simonly"
    write_json(d / "train.json", {"val_real_miou": 0.1, **verdict})
    write_json(d / "evaluate.json", {"method": "twinvae_simonly", "seed": 0, "evaluator": "depth_segmentation",
                                     "domain": "pseudo_real", "miou": 0.1, "abs_rel": 0.2,
                                     "confusion_matrix": cm.tolist(), "classes": m.seg_classes})
    out = report(tmp_path / "metrics", params.reports.verdicts)
    line = next(x for x in out.splitlines() if x.startswith("twinvae_simonly"))
    assert "COLLAPSED: single-class segmentation masks" in line and "on pseudo_real/test" in line
    assert "0.1000" not in line  # its numbers are not printed as a result


@pytest.mark.slow
def test_collapsed_model_is_marked_by_the_report(scenes_prepared: Path, tmp_path: Path) -> None:
    """Zero-initialised heads with the segmentation loss switched off predict class 0 everywhere: the loop logs the
    single-class signal, train.json says collapsed, and `s2r report` prints COLLAPSED instead of the numbers."""
    from s2r import stages

    raw = tiny_params_dict()
    raw["methods"]["twinvae_simonly"].update(init_std=0.0, w_seg=0.0, epochs=2)
    raw["tracking"]["log_model"] = False
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(pf)
    metrics = tmp_path / "metrics"
    name = "twinvae_simonly"
    summary = stages.train(stages.TrainRequest(name, scenes_prepared, tmp_path / name,
                                               metrics_out=metrics / name / "train.json",
                                               ckpt_dir=tmp_path / "ck" / name), params)
    stages.evaluate(name, tmp_path / name, scenes_prepared, metrics / name / "evaluate.json", None, params)
    assert summary[health.PREFIX + "pred_classes"] == 1  # logged with the epoch's metrics
    assert summary["health"] == "collapsed"
    assert "single-class segmentation masks" in summary["health_reasons"][0]
    saved = json.loads((metrics / "twinvae_simonly" / "train.json").read_text())
    assert saved["health"] == "collapsed"
    out = report(metrics, params.reports.verdicts, verdicts_out=tmp_path / "verdicts.json")
    line = next(x for x in out.splitlines() if x.startswith("twinvae_simonly"))
    assert "COLLAPSED: single-class segmentation masks" in line
    v = json.loads((tmp_path / "verdicts.json").read_text())
    assert v["paper2.upper_bound_miou"]["verdict"] == "not run"  # twinvae_heads did not run
    assert v["paper3.weak_raises_dci"]["verdict"] == "not run"
