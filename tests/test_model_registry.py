"""Model registry: register trained runs as s2r-<method>, move aliases, load and predict like the trained method."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import tiny_params_dict, tiny_samples, tiny_spec
from s2r import model_registry, stages
from s2r.cli import main
from s2r.data.benchmark import DataError, write_benchmark
from s2r.params import load_params
from s2r.tracking import setup

NAME = model_registry.model_name("mixing")


@dataclass
class Trained:
    prepared: Path
    params_file: Path
    model_dirs: list[Path]
    metrics: list[Path]
    run_ids: list[str]
    versions_before: list[int]  # versions of s2r-mixing that other tests left in the shared store


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Two tiny mixing models (seeds 0 and 1) trained once for the module; nothing registered yet."""
    from s2r.data.prepared import prepare

    root = tmp_path_factory.mktemp("registry")
    spec = tiny_spec()
    bench = write_benchmark(root / "bench", spec, tiny_samples(spec), progress=False)
    prepared = prepare(bench, root / "prepared", progress=False)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    before = [r["version"] for r in model_registry.list_models("mixing")] if NAME in _names() else []
    dirs, metrics, runs = [], [], []
    for seed in (0, 1):
        params = load_params(params_file, {"seed": seed})
        out, m = root / f"model{seed}", root / f"metrics{seed}" / "train.json"
        summary = stages.train(stages.TrainRequest("mixing", prepared, out, metrics_out=m,
                                                   ckpt_dir=root / f"ckpt{seed}"), params)
        dirs.append(out)
        metrics.append(m)
        runs.append(summary["mlflow_run_id"])
    return Trained(prepared, params_file, dirs, metrics, runs, before)


@pytest.fixture(scope="module")
def registered(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """Seed 0 registered from its run id, seed 1 from its metrics file with a receipt."""
    receipt = tmp_path_factory.mktemp("release") / "sub" / "mixing.json"
    first = model_registry.register("mixing", run_id=trained.run_ids[0])
    second = model_registry.register("mixing", best_file=trained.metrics[1], receipt=receipt)
    return first, second, receipt


def _names() -> list[str]:
    return model_registry._model_names(model_registry._client())


def _prepared_test_images(trained: Trained) -> np.ndarray:
    from s2r.data.prepared import PreparedBenchmark

    data = PreparedBenchmark(trained.prepared)
    return np.asarray(data.get(data.spec.target, "test").images)


def _reference_probs(trained: Trained, i: int, images: np.ndarray) -> np.ndarray:
    method, _ = stages.load_trained(trained.model_dirs[i], trained.prepared, load_params(trained.params_file))
    return method.predict(images)


def test_register_creates_versions_with_alias_and_tags(trained: Trained, registered: tuple[dict, dict, Path]) -> None:
    first, second, receipt = registered
    base = max(trained.versions_before, default=0)
    assert (first["version"], second["version"]) == (base + 1, base + 2)
    assert first["run_id"] == trained.run_ids[0] and second["run_id"] == trained.run_ids[1]
    client = mlflow.MlflowClient()
    rm = client.get_registered_model(NAME)
    assert int(rm.aliases["candidate"]) == second["version"]  # moved from v1 to the newest
    mv = client.get_model_version(NAME, str(second["version"]))
    run = client.get_run(trained.run_ids[1])
    assert mv.run_id == trained.run_ids[1]
    for key in ("data_version", "benchmark", "seed", "image_size", "channels", "classes"):
        assert mv.tags[key] == run.data.tags[key], key
    assert mv.tags["seed"] == "1" and json.loads(mv.tags["classes"]) == ["c0", "c1", "c2"]
    assert client.get_model_version(NAME, str(first["version"])).tags["seed"] == "0"
    assert json.loads(receipt.read_text()) == {
        "name": NAME, "version": second["version"], "alias": "candidate", "run_id": trained.run_ids[1],
        "model_uri": run.data.tags["model_uri"], "data_version": run.data.tags["data_version"]}
    assert not list(receipt.parent.glob("*.tmp"))


def test_promote_moves_champion_and_keeps_old_versions(trained: Trained, registered: tuple[dict, dict, Path]) -> None:
    first, second, _ = registered
    v1, v2 = first["version"], second["version"]
    r = model_registry.promote(NAME, v1)
    assert r["alias"] == "champion" and r["version"] == v1
    assert int(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == v1
    r = model_registry.promote(NAME, v2, alias="champion")
    assert r["previous"] == v1 and r["version"] == v2
    assert int(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == v2
    rows = {row["version"]: row for row in model_registry.list_models("mixing")}
    assert rows[v2]["aliases"] == ["candidate", "champion"] and rows[v1]["aliases"] == []
    assert rows[v1]["run_id"] == trained.run_ids[0]
    # the old version is still registered and loadable by number
    old = mlflow.pytorch.load_model(f"models:/{NAME}/{v1}")
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert tuple(old(__import__("torch").from_numpy(x)).shape) == (2, 3)
    model, info = model_registry.load(NAME, version=v1)
    assert info["version"] == v1 and info["tags"]["seed"] == "0"


def test_promote_unknown_version_lists_existing(registered: tuple[dict, dict, Path]) -> None:
    first, second, _ = registered
    with pytest.raises(DataError, match=r"model 's2r-mixing' has no version 999; existing versions: \[") as e:
        model_registry.promote(NAME, 999)
    listed = json.loads(str(e.value).split("existing versions: ")[1])
    assert {first["version"], second["version"]} <= set(listed)
    with pytest.raises(model_registry.RegistryError, match=rf"no registered model 's2r-nope'.*{NAME}"):
        model_registry.promote("s2r-nope", 1)
    r = CliRunner().invoke(main, ["registry", "promote", NAME, "999"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.strip().count("\n") == 0
    assert "no version 999" in r.output and str(second["version"]) in r.output
    r = CliRunner().invoke(main, ["registry", "promote", NAME, "1", "--alias", "latest"])  # reserved by MLflow
    assert r.exit_code == 2 and "Traceback" not in r.output and "latest" in r.output, r.output


def test_cli_list_register_and_promote(trained: Trained, registered: tuple[dict, dict, Path], in_tmp: Path) -> None:
    first, second, _ = registered
    res = CliRunner().invoke(main, ["registry", "list", "mixing"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(NAME)]
    assert len(lines) == second["version"]
    by_version = {int(ln.split()[1]): ln for ln in lines}
    assert "candidate" in by_version[second["version"]] and trained.run_ids[0] in by_version[first["version"]]
    assert "candidate" not in by_version[first["version"]]
    res = CliRunner().invoke(main, ["registry", "list"], catch_exceptions=False)
    assert res.exit_code == 0 and NAME in res.output

    # register + promote through the CLI, then put champion back where the other tests expect it
    res = CliRunner().invoke(main, ["registry", "register", "mixing", "--from", str(trained.metrics[0]),
                                    "--alias", "staging", "--receipt", "r.json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    receipt = json.loads(Path("r.json").read_text())
    assert receipt["alias"] == "staging" and receipt["run_id"] == trained.run_ids[0]
    v3 = receipt["version"]
    assert v3 > second["version"] and f"{NAME} v{v3}" in res.output
    res = CliRunner().invoke(main, ["registry", "promote", NAME, str(v3), "--alias", "staging-ok"],
                             catch_exceptions=False)
    assert res.exit_code == 0 and "staging-ok" in res.output, res.output
    assert int(mlflow.MlflowClient().get_model_version_by_alias(NAME, "staging-ok").version) == v3
    mlflow.MlflowClient().delete_registered_model_alias(NAME, "staging-ok")


def test_load_champion_predicts_like_trained_method(trained: Trained, registered: tuple[dict, dict, Path]) -> None:
    import torch

    _, second, _ = registered
    model_registry.promote(NAME, second["version"])
    model, info = model_registry.load(NAME)  # champion
    assert info["version"] == second["version"] and info["uri"] == f"models:/{NAME}@champion"
    assert (info["image_size"], info["channels"], info["classes"]) == (8, 1, ["c0", "c1", "c2"])
    images = _prepared_test_images(trained)
    from s2r.methods.base import to_float

    with torch.no_grad():
        got = torch.softmax(model(to_float(images, torch.device("cpu"))), 1).numpy()
    want = _reference_probs(trained, 1, images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=(
        "registered model differs from data/models/<m>/model.pt: was it logged in train mode? MLflow runs the "
        "input_example through the module to infer a signature, which updates BatchNorm running stats"))
    other = _reference_probs(trained, 0, images)
    assert not np.allclose(got, other)  # it really is the seed-1 model, not any model
    with pytest.raises(model_registry.RegistryError, match="no alias 'nope'.*champion->v"):
        model_registry.load(NAME, alias="nope")


def test_predict_folder_matches_reference(trained: Trained, registered: tuple[dict, dict, Path],
                                          tmp_path: Path) -> None:
    _, second, _ = registered
    images = _prepared_test_images(trained)[:7]
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = []
    for i, img in enumerate(images):
        rel = f"sub/img{i:02d}.png" if i % 2 else f"img{i:02d}.png"
        Image.fromarray(img[..., 0]).save(folder / rel)
        names.append(rel)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out" / "pred.csv"
    df = model_registry.predict_folder(NAME, folder, out, version=second["version"])
    want = _reference_probs(trained, 1, images)
    order = np.argsort(names)  # files are read sorted
    classes = ["c0", "c1", "c2"]
    assert list(df["file"]) == sorted(names)
    assert list(df["predicted"]) == [classes[k] for k in want[order].argmax(1)]
    np.testing.assert_allclose(df[["p_c0", "p_c1", "p_c2"]].to_numpy(), want[order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df["probability"], want[order].max(1), rtol=1e-5)
    csv = pd.read_csv(out)
    assert list(csv.columns) == ["file", "predicted", "probability", "p_c0", "p_c1", "p_c2"]
    assert list(csv["predicted"]) == list(df["predicted"])

    # the CLI writes the same CSV
    res = CliRunner().invoke(main, ["registry", "predict", NAME, str(folder), "--out", str(tmp_path / "cli.csv"),
                                    "--version", str(second["version"])], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "cli.csv")["predicted"].tolist() == list(df["predicted"])

    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(model_registry.RegistryError, match=r"broken\.png: not a readable image"):
        model_registry.predict_folder(NAME, folder, tmp_path / "bad.csv", version=second["version"])
    r = CliRunner().invoke(main, ["registry", "predict", NAME, str(folder), "--out", str(tmp_path / "bad.csv"),
                                  "--version", str(second["version"])])
    assert r.exit_code == 2 and "broken.png" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "bad.csv").exists()


def test_register_errors_are_clear(trained: Trained, tmp_path: Path) -> None:
    setup("registry-tests")
    with mlflow.start_run(run_name="train@mixing", tags={"method": "mixing"}) as run:  # no model logged
        pass
    with pytest.raises(model_registry.RegistryError, match=rf"run {run.info.run_id}.*no 'model_uri' tag"):
        model_registry.register("mixing", run_id=run.info.run_id)
    with pytest.raises(model_registry.RegistryError, match="no MLflow run 'deadbeef'"):
        model_registry.register("mixing", run_id="deadbeef")
    with pytest.raises(model_registry.RegistryError, match="trained method 'mixing', not 'cut'"):
        model_registry.register("cut", run_id=trained.run_ids[0])
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump({"method": "cut", "mlflow_run_id": trained.run_ids[0]}))
    with pytest.raises(model_registry.RegistryError, match="result of method 'cut', not 'mixing'"):
        model_registry.register("mixing", best_file=best)
    best.write_text(yaml.safe_dump({"method": "mixing", "value": 0.5}))
    with pytest.raises(model_registry.RegistryError, match="no key 'mlflow_run_id'"):
        model_registry.register("mixing", best_file=best)
    with pytest.raises(model_registry.RegistryError, match="exactly one"):
        model_registry.register("mixing")
    r = CliRunner().invoke(main, ["registry", "register", "mixing", "--run-id", run.info.run_id])
    assert r.exit_code == 2 and "model_uri" in r.output and "Traceback" not in r.output, r.output


def test_register_from_tuning_best_yaml(trained: Trained) -> None:
    best = trained.metrics[0].parent / "best.yaml"
    best.write_text(yaml.safe_dump({"method": "mixing", "mlflow_run_id": trained.run_ids[0], "value": 0.9,
                                    "params": {"methods.mixing.lr": 0.01}}))
    r = model_registry.register("mixing", best_file=best, alias="tuned")
    assert r["run_id"] == trained.run_ids[0]
    assert int(mlflow.MlflowClient().get_model_version_by_alias(NAME, "tuned").version) == r["version"]


def test_registry_help_has_examples() -> None:
    for cmd in (["registry"], ["registry", "register"], ["registry", "list"], ["registry", "promote"],
                ["registry", "predict"]):
        out = CliRunner().invoke(main, [*cmd, "--help"]).output
        assert "Example: s2r registry" in out, cmd
