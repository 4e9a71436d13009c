"""`s2r train` under torchrun end to end (gloo, CPU): a rank that dies, resume on two nodes and at one process.

- A rank that dies (rank 1 SIGKILLs itself before step 3, tests/crash_driver.py): rank 0 and torchrun end, the
  MLflow run is FAILED or KILLED (never RUNNING), the checkpoint of step 2 is there.
- Two "nodes" on this machine resume it: two `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-endpoint
  127.0.0.1:PORT -m s2r train ... --resume` agents (a free port) finish the SAME MLflow run, logged by rank 0 only
  (one run for the training, one value per epoch and metric).
- One process resumes the same checkpoint (`s2r train --resume`, no torchrun) to the same weights within float
  rounding. (Resuming at 2 ranks equals the uninterrupted 2-rank training bit for bit for every method:
  tests/test_ddp.py.) The `--nproc-per-node` launcher's command and its settling of a failed run: a stand-in
  Popen, no processes.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml

from conftest import tiny_params_dict
from crash_driver import run_cli
from ddp_driver import finish, torchrun
from s2r.methods import registry

METHOD = "mixing"
EPOCHS, STEPS = 2, 3  # checkpoints every 2 steps: at 2, 4, 6
CRASH_DRIVER = Path(__file__).with_name("crash_driver.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tiny_params_dict()
    raw["train"].update(threads=1, checkpoint_every=2)
    raw["tracking"].update(log_model=False, system_metrics=False, experiment=f"ddp-{time.time_ns()}")
    raw["methods"][METHOD].update(epochs=EPOCHS, steps_per_epoch=STEPS)
    p = tmp_path_factory.mktemp("ddp-params") / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def train_args(folder: Path, data: Path, params: Path) -> list[str]:
    return ["train", METHOD, "--data", str(data), "--out", str(folder / "model"), "--checkpoints",
            str(folder / "ckpt"), "--metrics", str(folder / "metrics.json"), "--params", str(params)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(folder / "model" / "model.pt", map_location="cpu", weights_only=False)
    return dict(saved["state"])


def run_id(folder: Path) -> str:
    return str(json.loads((folder / "ckpt" / "run.json").read_text())["run_id"])


@pytest.fixture(scope="module")
def killed(paired_prepared: Path, params: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two ranks on one node; rank 1 dies by SIGKILL before its 3rd step (after the checkpoint of step 2)."""
    folder = tmp_path_factory.mktemp("ddp-killed")
    mark = folder / "dead"
    env = {"S2R_TEST_KILL": "step:3", "S2R_TEST_KILL_RANK": "1", "S2R_TEST_DEAD_MARK": str(mark)}
    log = folder / "torchrun.log"
    proc = torchrun(["--standalone", "--nproc-per-node=2", str(CRASH_DRIVER),
                     *train_args(folder, paired_prepared, params)], log, env)
    code = finish(proc, log)
    ended = time.time()
    assert mark.is_file(), log.read_text()[-4000:]
    return {"folder": folder, "code": code, "seconds": ended - mark.stat().st_mtime, "log": log.read_text()}


def resumable(killed: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the killed training's checkpoint folder (each resume test continues its own copy)."""
    shutil.copytree(killed["folder"] / "ckpt", tmp_path / "ckpt")
    return tmp_path


def test_a_dying_rank_ends_the_run_without_leaving_it_running(killed: dict[str, Any]) -> None:
    print(f"rank 0 and torchrun ended {killed['seconds']:.1f} s after rank 1 died")
    assert killed["code"] != 0
    run = mlflow.MlflowClient().get_run(run_id(killed["folder"]))
    assert run.info.status in ("FAILED", "KILLED"), run.info.status
    state = torch.load(killed["folder"] / "ckpt" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2
    assert not (killed["folder"] / "model" / "model.pt").exists()


@pytest.fixture(scope="module")
def two_nodes(killed: dict[str, Any], paired_prepared: Path, params: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Path:
    """The killed training resumed by two torchrun agents ("nodes") of one process each (c10d on 127.0.0.1)."""
    folder = resumable(killed, tmp_path_factory.mktemp("ddp-two-nodes"))
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--rdzv-id=s2r-test", "-m", "s2r", *train_args(folder, paired_prepared, params), "--resume"]
    nodes = [torchrun(rdzv, folder / f"node{i}.log") for i in range(2)]
    codes = [finish(p, folder / f"node{i}.log") for i, p in enumerate(nodes)]
    logs = "\n".join((folder / f"node{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0] and "continuing from the checkpoint at step 2/6" in logs, logs
    return folder


def test_two_nodes_resume_the_one_run_logged_by_rank_0(two_nodes: Path, killed: dict[str, Any], params: Path
                                                       ) -> None:
    assert run_id(two_nodes) == run_id(killed["folder"])
    client = mlflow.MlflowClient()
    prefix = yaml.safe_load(params.read_text())["tracking"]["experiment"]
    exp = client.get_experiment_by_name(registry.experiment(prefix, METHOD))  # paper 4's experiment of this module
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id(two_nodes)]  # one training
    run = client.get_run(run_id(two_nodes))
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_status"] in ("FAILED", "KILLED")
    assert run.data.tags["distributed.world_size"] == "2" and run.data.tags["distributed.nodes"] == "2"
    total = EPOCHS * STEPS  # only rank 0 logs (means over ranks): one value per logged step, none twice
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, total + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [STEPS, total]
    assert not any(k.startswith("module.") or ".module." in k for k in weights(two_nodes))


def test_one_process_resumes_a_two_rank_checkpoint(killed: dict[str, Any], two_nodes: Path, paired_prepared: Path,
                                                   params: Path, tmp_path: Path) -> None:
    folder = resumable(killed, tmp_path)
    log = folder / "log.txt"
    code = run_cli([*train_args(folder, paired_prepared, params), "--resume"], {"OMP_NUM_THREADS": "1"}, log)
    assert code == 0 and "continuing from the checkpoint at step 2/6" in log.read_text(), log.read_text()[-4000:]
    assert mlflow.MlflowClient().get_run(run_id(folder)).info.status == "FINISHED"
    a, b = weights(two_nodes), weights(folder)
    for k in a:  # one process continues the two ranks' training: the same numbers up to float rounding
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


class _Launched:
    """Stands in for the torchrun process the launcher starts: records its command, ends with `code`."""

    calls: list[list[str]] = []
    code = 0

    def __init__(self, cmd: list[str]) -> None:
        self.calls.append(cmd)

    def wait(self) -> int:
        return self.code


@pytest.mark.parametrize("code", [0, 1])
def test_nproc_per_node_runs_torchrun_and_settles_a_failed_run(code: int, monkeypatch: pytest.MonkeyPatch,
                                                              paired_prepared: Path, params: Path,
                                                              tmp_path: Path) -> None:
    from click.testing import CliRunner

    from s2r import tracking
    from s2r.cli import main

    run = mlflow.MlflowClient().create_run(mlflow.MlflowClient().get_experiment_by_name("Default").experiment_id)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "run.json").write_text(json.dumps({"run_id": run.info.run_id}))
    settled: list[bool] = []
    monkeypatch.setattr(_Launched, "calls", [])
    monkeypatch.setattr(_Launched, "code", code)
    monkeypatch.setattr(subprocess, "Popen", _Launched)
    monkeypatch.setattr(tracking, "reconcile_deferring_interrupts", lambda: settled.append(True) or [])
    args = train_args(tmp_path, paired_prepared, params)
    result = CliRunner().invoke(main, [*args, "--resume", "--set", "seed=3", "--nproc-per-node", "2"])
    assert result.exit_code == code, result.output
    assert _Launched.calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                "-m", "s2r", *args[:2], "--data", args[3], "--out", args[5], "--params", args[-1],
                                "--resume", "--metrics", args[9], "--checkpoints", args[7], "--set", "seed=3"]]
    assert settled == ([True] if code else [])  # a failed torchrun: its RUNNING run is settled
    mlflow.MlflowClient().set_terminated(run.info.run_id, status="KILLED")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_nccl_on_the_gpus_trains_like_one_process(tmp_path: Path) -> None:
    """What `s2r gpu-check` runs: torchrun over every GPU here (nccl, cuda:<LOCAL_RANK>) against one process."""
    from s2r import gpucheck

    res = gpucheck.check_ddp(tmp_path)
    assert res["status"] == "passed", res
