"""No secret leaves an s2r process: the one redaction step of s2r.tracking (REDACT) on every channel s2r writes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import REPO
from s2r import tracking, tune
from s2r.tracking import REDACT, TrackedRun
from test_tune import fake_train, study_params  # noqa: F401  (fake_train: a fixture)

PW = "SeCrEt-pa55w0rd-xyz"  # unique: any occurrence below is a leak


@pytest.mark.parametrize(("text", "want"), [
    (f"postgresql+psycopg2://s2r:{PW}@10.0.0.5:54330/s2r_optuna?sslmode=require",
     "postgresql+psycopg2://s2r:***@10.0.0.5:54330/s2r_optuna?sslmode=require"),
    (f"sqlite:////data/optuna.db?password={PW}&timeout=5", "sqlite:////data/optuna.db?password=***&timeout=5"),
    (f"https://u:{PW}@host/x?token=abc&secret=def", "https://u:***@host/x?token=***&secret=***"),
    (f"export MLFLOW_TRACKING_PASSWORD='{PW}'", "export MLFLOW_TRACKING_PASSWORD='***'"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG AWS_ACCESS_KEY_ID=AKIAIOSFODNN7 AWS_REGION=eu-west-1",
     "AWS_SECRET_ACCESS_KEY=*** AWS_ACCESS_KEY_ID=*** AWS_REGION=eu-west-1"),
    ('{"password": "hunter2hunter2", "api_key": "k1", "max_tokens": 5}',
     '{"password": "***", "api_key": "***", "max_tokens": 5}'),
    # what must stay: no userinfo, secret words without a value, look-alike keys, paths
    ("password authentication failed for user s2r; token_budget=5 PWD=/work/x OLDPWD=/tmp",
     "password authentication failed for user s2r; token_budget=5 PWD=/work/x OLDPWD=/tmp"),
    ("postgresql+psycopg2://s2r@host/db mlflow-artifacts:/1/abc s3://bucket/prefix http://127.0.0.1:5000/#/x",
     "postgresql+psycopg2://s2r@host/db mlflow-artifacts:/1/abc s3://bucket/prefix http://127.0.0.1:5000/#/x"),
])
def test_redact_text(text: str, want: str) -> None:
    assert REDACT.text(text) == want
    assert REDACT.text(want) == want  # redacting twice changes nothing (params pass TrackedRun and the client)


def test_known_secrets_are_masked_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password seen in a URL, or held by a secret-named environment variable, is masked on its own too."""
    REDACT.learn(f"postgresql://u:{PW}@h/db")
    assert REDACT.text(f"psql said: bad password {PW}!") == "psql said: bad password ***!"
    monkeypatch.setenv("S2R_TEST_API_TOKEN", "tok-0123456789-abc")
    monkeypatch.setenv("PWD", "/work/wt/somewhere")  # not a secret name: its value stays visible
    assert REDACT.text("got tok-0123456789-abc in /work/wt/somewhere") == "got *** in /work/wt/somewhere"
    assert REDACT.obj({"storage": f"x://a:{PW}@h", "db": {"password": "short"}, "list": [f"token={PW}"]}) == {
        "storage": "x://a:***@h", "db": {"password": "***"}, "list": ["token=***"]}


def _leaks_in_store() -> list[str]:
    """Files of the suite's MLflow store (SQLite database and artifacts) that contain PW."""
    root = Path(tracking.tracking_uri().removeprefix("sqlite:///")).parent
    return [str(p) for p in root.rglob("*") if p.is_file() and PW.encode() in p.read_bytes()]


def test_tracked_run_redacts_params_tags_dicts_artifacts_errors(tmp_path: Path, tiny_prepared: Path) -> None:
    import shutil

    import numpy as np
    import torch

    from s2r.data.prepared import PreparedBenchmark

    note = tmp_path / "config.yaml"
    note.write_text(f"storage: postgresql://s2r:{PW}@host/db\nseed: 1\n")
    secret_root = tmp_path / f"token={PW}"  # a dataset whose path carries a secret-looking value
    shutil.copytree(tiny_prepared, secret_root)
    with pytest.raises(RuntimeError), TrackedRun(f"tune@x?password={PW}", experiment="t", params={
            "storage": f"postgresql://s2r:{PW}@host/db", "aws": {"secret_access_key": "abc"}},
            tags={"api_token": PW, "note": f"url https://u:{PW}@h"}) as run:
        run.set_tags({"mlflow.note.content": f"description with password={PW}"})
        run.log_dict({"db": {"password": PW}, "url": f"x://u:{PW}@h"}, "dicts/resolved.yaml")
        run.log_artifact(note, "config")
        run.log_dataset(PreparedBenchmark(secret_root), context="training")
        tracking.client().set_tag(run.run_id, "via_client", f"x://u:{PW}@h")
        _, model_id = run.log_model(torch.nn.Linear(2, 1), np.zeros((1, 2), np.float32), "m", tags={"api_token": PW},
                                    params={"storage": f"postgresql://s2r:{PW}@host/db"})
        raise RuntimeError(f"cannot connect to postgresql://s2r:{PW}@host/db")
    r = mlflow.MlflowClient().get_run(run.run_id)
    assert r.data.params == {"storage": "postgresql://s2r:***@host/db", "aws.secret_access_key": "***"}
    assert r.data.tags["api_token"] == "***" and r.data.tags["error"].endswith("postgresql://s2r:***@host/db")
    assert r.info.run_name == "tune@x?password=***"
    model = mlflow.get_logged_model(model_id)
    assert model.params["storage"] == "postgresql://s2r:***@host/db" and model.tags["api_token"] == "***"
    got = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, dst_path=str(tmp_path / "dl")))
    assert (got / "config" / "config.yaml").read_text() == "storage: postgresql://s2r:***@host/db\nseed: 1\n"
    assert yaml.safe_load((got / "dicts" / "resolved.yaml").read_text()) == {"db": {"password": "***"},
                                                                             "url": "x://u:***@h"}
    assert note.read_text().count(PW) == 1  # the user's file itself is left alone
    assert _leaks_in_store() == []


def test_process_output_and_log_records_are_redacted() -> None:
    """What an s2r process prints, logs or dies with (its stdout/stderr: terminal, worker logs) is redacted."""
    code = ("from s2r.tracking import redact_process_output; redact_process_output()\n"
            "import logging, click\n"
            f"print('url postgresql://u:{PW}@h/db'); click.echo('token={PW}')\n"
            f"logging.getLogger('x').warning('connecting to %s', 'https://a:{PW}@h')\n"
            f"raise RuntimeError('cannot reach postgresql://u:{PW}@h/db')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=os.environ | {"PYTHONPATH": str(REPO / "src")}, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and PW not in out, out
    assert "url postgresql://u:***@h/db" in r.stdout and "token=***" in r.stdout
    assert "connecting to https://a:***@h" in r.stderr and "RuntimeError: cannot reach postgresql://u:***@h" in out


def test_tune_storage_password_is_never_logged(tmp_path: Path, tiny_prepared: Path, fake_train) -> None:  # noqa: F811
    """The issue's reproduction: a storage URL with a password; the parent run's param `storage` is masked,
    nothing under the study's output folder or in the MLflow store holds it, the command line gets a warning."""
    import optuna
    from click.testing import CliRunner

    from s2r.cli import main

    fake_train.update({0: RuntimeError(f"lost postgresql://u:{PW}@h/db"), 1: [0.5]})
    url = f"sqlite:///{tmp_path / 'optuna.db'}?password={PW}"
    out = tmp_path / "tuning"
    res = CliRunner().invoke(main, ["tune", "--study", "t", "--data", str(tiny_prepared), "--params",
                                    str(study_params(tmp_path, n_trials=1)), "--out", str(out), "--storage", url,
                                    "--study-name", f"redact-{tmp_path.name}"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "--storage carries a password on the command line" in res.output and PW not in res.output
    parent = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.study = 'redact-{tmp_path.name}'")
    assert [r.data.params["storage"] for r in parent] == [url.replace(PW, "***")]
    study = optuna.load_study(study_name=f"redact-{tmp_path.name}", storage=url)
    attrs = json.dumps([study.user_attrs, *(t.user_attrs for t in study.trials)])
    assert "RuntimeError: lost postgresql://u:***@h/db" in attrs and PW not in attrs  # Optuna's fail_reason
    assert all(PW.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert _leaks_in_store() == []


def test_storage_from_environment_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`s2r tune` takes the URL from $S2R_OPTUNA_STORAGE or --storage-file (no password in argv)."""
    from s2r.cli import tune_cmd

    url = f"postgresql+psycopg2://s2r:{PW}@h:5/s2r_optuna"
    monkeypatch.setenv("S2R_OPTUNA_STORAGE", url)
    assert tune_cmd.make_context("tune", ["--study", "s", "--data", "."]).params["storage"] == url
    f = tmp_path / "storage"
    f.write_text(f"\nS2R_OPTUNA_STORAGE='{url}'\n")
    assert tune.storage_option(None, f) == url
    f.write_text("")
    with pytest.raises(tune.ConfigError, match="is empty"):
        tune.storage_option(None, f)


_MLFLOW_WRITES = {"set_tag", "set_tags", "log_param", "log_params", "log_metric", "log_metrics", "log_batch",
                  "log_dict", "log_text", "log_artifact", "log_artifacts", "log_input", "log_figure", "log_model",
                  "start_run", "create_run", "set_experiment_tag", "create_model_version", "create_registered_model",
                  "set_model_version_tag", "set_registered_model_tag", "update_run"}


def test_only_the_tracking_module_writes_to_mlflow() -> None:
    """Every MLflow write passes REDACT because only s2r.tracking makes one: no other module builds an
    MlflowClient (they use tracking.client()) or calls MLflow's fluent write API."""
    bad = []
    for path in sorted((REPO / "src" / "s2r").rglob("*.py")):
        if path.name == "tracking.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "MlflowClient" and isinstance(node.ctx, ast.Load):
                bad.append(f"{path.name}:{node.lineno} builds an MlflowClient")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MLFLOW_WRITES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "mlflow"):
                bad.append(f"{path.name}:{node.lineno} calls mlflow.{node.func.attr}")
    assert bad == []
