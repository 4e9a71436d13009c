"""Paper verdicts (s2r.verdicts): the stated rule (Welch's t-test) on fixed inputs with pinned numbers, sides that
choose per seed on validation data, collapsed models, the metrics JSON and README block, and that every default
claim compares models the default pipeline trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from conftest import tiny_params_dict
from s2r import verdicts

RULE = tuple(tiny_params_dict()["reports"]["verdicts"][k] for k in ("level", "power"))  # tests/params.yaml


# ---- the rule ---------------------------------------------------------------------------------------------------
def test_welch_numbers_pinned_on_equal_spreads() -> None:
    """Two sides of 3 seeds, sd 0.02 each: df = 4 exactly, se = 0.02 sqrt(2/3), t_{0.975, 4} = 2.776445."""
    r = verdicts.compare([0.8, 0.82, 0.84], [0.5, 0.52, 0.54], "higher", *RULE)
    se = 0.02 * math.sqrt(2 / 3)
    assert r["verdict"] == "agrees" and r["n_a"] == r["n_b"] == 3
    assert r["difference"] == pytest.approx(0.3) and r["df"] == pytest.approx(4.0)
    assert r["ci_low"] == pytest.approx(0.3 - 2.776445 * se, abs=1e-6) == pytest.approx(0.254661, abs=1e-6)
    assert r["ci_high"] == pytest.approx(0.345339, abs=1e-6)
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(0.3 / se, 4)) == pytest.approx(5.165e-5, rel=1e-3)
    assert "seeds_needed" not in r
    flipped = verdicts.compare([0.5, 0.52, 0.54], [0.8, 0.82, 0.84], "higher", *RULE)
    assert flipped["verdict"] == "disagrees" and flipped["ci_high"] == pytest.approx(-0.254661, abs=1e-6)
    lower = verdicts.compare([0.5, 0.52, 0.54], [0.8, 0.82, 0.84], "lower", *RULE)  # e.g. AbsRel: lower is better
    assert lower["verdict"] == "agrees" and lower["difference"] == pytest.approx(0.3)


def test_welch_not_student_on_unequal_spreads() -> None:
    """n 5 vs 2 with unequal spreads: Welch (df 4.42, p 0.0142) decides; Student's pooled test (p 0.061) would not."""
    a, b = [0.61, 0.64, 0.70, 0.58, 0.66], [0.55, 0.56]
    r = verdicts.compare(a, b, "higher", *RULE)
    assert r["df"] == pytest.approx(4.424082, abs=1e-5) and r["p_value"] == pytest.approx(0.0142400, abs=1e-6)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(0.0263269, abs=1e-6), pytest.approx(0.1396731, abs=1e-6))
    assert r["verdict"] == "agrees"
    assert stats.ttest_ind(a, b).pvalue > 0.05  # the pooled-variance form is a different (wrong here) test


def test_inconclusive_says_how_many_seeds_would_decide() -> None:
    """d = 0.05 at sd 0.2 / 0.05: the normal approximation says (1.96 + 0.8416)^2 (0.2^2 + 0.05^2) / 0.05^2 = 133.4
    seeds per side; the noncentral t (df from the Welch formula) needs a few more."""
    r = verdicts.compare([0.5, 0.7, 0.9], [0.6, 0.65, 0.7], "higher", *RULE)
    assert r["verdict"] == "inconclusive" and r["p_value"] == pytest.approx(0.711203, abs=1e-5)
    assert r["seeds_needed"] == 136 and "about 136 seeds per side" in r["why"]
    assert verdicts.seeds_needed(0.05, 0.2, 0.05, 0.95, 0.8) == 136
    assert verdicts.seeds_needed(1.0, 0.0, 0.0, 0.95, 0.8) == 2 and verdicts.seeds_needed(0.0, 1, 1, 0.95, 0.8) is None
    big = verdicts.seeds_needed(0.3, 0.1, 0.1, 0.95, 0.8)  # 2 (1.96 + 0.84)^2 / 9 = 1.74 -> small samples need t
    assert big == 4


def test_degenerate_inputs() -> None:
    assert verdicts.compare([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], "higher", *RULE)["verdict"] == "agrees"  # no spread: sign
    same = verdicts.compare([1.0, 1.0], [1.0, 1.0], "higher", *RULE)
    assert same["verdict"] == "inconclusive" and "no difference" in same["why"]
    one = verdicts.compare([0.9], [0.1], "higher", *RULE)
    assert one["verdict"] == "inconclusive" and "fewer than 2 seeds" in one["why"]
    assert verdicts.compare([], [0.1], "higher", *RULE)["verdict"] == "not run"
    assert verdicts.compare([0.8, 0.82, 0.84], [0.5, 0.52, 0.54], "higher", 0.99, 0.8)["ci_low"] == pytest.approx(
        0.3 - stats.t.ppf(0.995, 4) * 0.02 * math.sqrt(2 / 3))


# ---- claims over result files -----------------------------------------------------------------------------------
def _write(d: Path, method: str, seed: int, metrics: dict[str, float], collapsed: bool = False,
           train: dict[str, float] | None = None) -> None:
    d.mkdir(parents=True)
    (d / "evaluate.json").write_text(json.dumps({"method": method, "seed": seed, "domain": "t", **metrics}))
    (d / "train.json").write_text(json.dumps({"health": "collapsed" if collapsed else "ok",
                                              "health_reasons": ["posterior collapse: 0 active"] if collapsed else [],
                                              **(train or {})}))


def test_verdicts_over_seeds_metrics_json_and_readme(tmp_path: Path) -> None:
    m = tmp_path / "metrics"
    for s, (w, u) in enumerate([(0.30, 0.10), (0.32, 0.12), (0.34, 0.11)]):
        _write(m / f"betavae_weak-seed{s}", "betavae_weak", s, {"dci_disentanglement": w})
        _write(m / f"betavae-seed{s}", "betavae", s, {"dci_disentanglement": u})
        _write(m / f"segmenter_refined-seed{s}", "segmenter_refined", s, {"test_miou_lastk_median": 0.5 + s / 100})
        _write(m / f"segmenter_synthetic-seed{s}", "segmenter_synthetic", s, {"test_miou_lastk_median": 0.3},
               collapsed=s == 1)
    rows = {r["key"]: r for r in verdicts.verdicts(m, *RULE, root=tmp_path)}
    p3 = rows["paper3.weak_raises_dci"]
    assert p3["verdict"] == "agrees" and p3["n_a"] == 3 and p3["a_mean"] == pytest.approx(0.32)
    assert p3["kind"] == "method" and rows["paper2.target_vs_simonly"]["kind"] == "sanity"
    assert rows["paper5.refined_vs_synthetic"]["verdict"] == "inconclusive"
    assert "collapsed model: segmenter_synthetic seed 1" in rows["paper5.refined_vs_synthetic"]["why"]
    assert rows["paper2.miou_vs_simonly"]["verdict"] == "not run"
    assert "paper1.table10.ii_e_tae_vs_ae" not in rows  # an opt-in pipeline's claim: only once it ran
    t = tmp_path / "data" / "tables" / "ae"
    t.mkdir(parents=True)
    (t / "table10_runs.csv").write_text("model,seed,knn_accuracy\nAE,0,0.5\nAE,1,0.52\n"
                                        "II-E-TAE,0,0.4\nII-E-TAE,1,0.41\n")
    rows = {r["key"]: r for r in verdicts.verdicts(m, *RULE, root=tmp_path)}
    assert rows["paper1.table10.ii_e_tae_vs_ae"]["verdict"] == "disagrees"
    js = verdicts.metrics_json(list(rows.values()))
    assert js["paper3.weak_raises_dci"]["verdict_code"] == 1 and js["paper3.weak_raises_dci"]["p_value"] < 0.05
    assert js["paper1.table10.ii_e_tae_vs_ae"]["verdict_code"] == -1
    assert {"ci_low", "ci_high", "df", "level", "kind"} <= set(js["paper3.weak_raises_dci"])
    text = verdicts.text(list(rows.values()))
    assert "sanity claim:" in text and "Welch's t, 95 % interval" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{verdicts.README_BEGIN}\nold\n{verdicts.README_END}\nafter\n")
    verdicts.rewrite_readme(readme, verdicts.markdown(list(rows.values())))
    body = readme.read_text()
    assert "old" not in body and body.endswith("after\n") and "**agrees**" in body and "0.3200 ± 0.0200 (n=3)" in body
    assert "+0.2100 [" in body  # the difference and its interval
    (tmp_path / "bad.md").write_text("no markers")
    with pytest.raises(ValueError, match="markers|needs exactly one"):
        verdicts.rewrite_readme(tmp_path / "bad.md", "x")


def test_side_chooses_per_seed_on_validation_not_test(tmp_path: Path) -> None:
    """Paper 4: per seed the mixing ratio with the best real VALIDATION accuracy; its test accuracy is the value,
    even where another ratio has a better test accuracy."""
    m = tmp_path / "metrics"
    val = {0: {"mixing_1to15": 0.90, "mixing": 0.80, "mixing_1to1": 0.60},
           1: {"mixing_1to15": 0.70, "mixing": 0.95, "mixing_1to1": 0.60},
           2: {"mixing_1to15": 0.70, "mixing": 0.75, "mixing_1to1": 0.70}}
    test = {"mixing_1to15": 0.85, "mixing": 0.86, "mixing_1to1": 0.99}
    for seed, per in val.items():
        for method, v in per.items():
            _write(m / f"{method}-seed{seed}", method, seed, {"accuracy": test[method] + seed / 1000},
                   train={"val_accuracy": v})
        _write(m / f"mixing_realonly-seed{seed}", "mixing_realonly", seed, {"accuracy": 0.80 + seed / 100})
    rows = {r["key"]: r for r in verdicts.verdicts(m, *RULE, root=tmp_path)}
    cv = rows["paper4.mixing_cv_vs_realonly"]
    assert cv["a_mean"] == pytest.approx((0.85 + 0.861 + 0.862) / 3)  # 1:15 at seed 0, 1:7 at seeds 1 and 2
    assert cv["chosen"] == "chosen on val_accuracy: 1:15 x1, 1:7 x2"
    assert cv["verdict"] == "agrees" and rows["paper4.mixing_vs_realonly"]["n_a"] == 3


def test_every_default_claim_compares_models_the_default_pipeline_trains() -> None:
    """One report section per paper, sanity claims for papers 2, 4 and 5; every side of a default claim names a
    params block that dvc.yaml trains and evaluates."""
    claims = [c for c in verdicts.CLAIMS if c.default]
    assert {c.paper.split(" (")[0] for c in claims} == {f"Paper {i}" for i in range(1, 6)}
    assert {c.paper.split(" (")[0] for c in claims if c.kind == "sanity"} == {"Paper 2", "Paper 4", "Paper 5"}
    dvc = (Path(__file__).parents[1] / "dvc.yaml").read_text()
    for c in claims:
        for side in (c.a, c.b):
            for method in [side.method] if side.method else [m for m, _ in side.candidates]:
                assert f"s2r evaluate {method} " in dvc, (c.key, method)


def test_differences_name_the_claims_whose_verdict_changed() -> None:
    rows = [{"key": "p.a", "verdict": "agrees"}, {"key": "p.b", "verdict": "inconclusive"}]
    other = {"p.a": {"verdict": "agrees"}, "p.b": {"verdict": "disagrees"}}
    assert verdicts.differences(rows, other) == ["p.b: INCONCLUSIVE here, DISAGREES in the other run"]
    assert verdicts.differences(rows[:1], {}) == ["p.a: AGREES here, ABSENT in the other run"]
