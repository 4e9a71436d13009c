"""The GPU-efficient training loop (issue 19), checked on the CPU: losses summed on the device give the same
numbers as the former per-step float() loop, the NaN guard names its step range and never checkpoints after a
NaN, per-step logging, prefetching with exact resume, and the train.* performance options."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import yaml

from conftest import TEST_PARAMS, tiny_params_dict, tiny_section
from s2r.config import ConfigError, TrainParams
from s2r.data.prepared import PreparedBenchmark
from s2r.methods import registry
from s2r.params import parse_params
from s2r.train import LossSums, NonFiniteLossError, apply_train_options, fit, load_checkpoint, pin_batch, torch_settings

pytestmark = pytest.mark.usefixtures("one_thread_module")


def make(name: str, data: Path, steps: int = 6) -> Any:
    params = parse_params(tiny_params_dict(), "tiny params")
    torch.manual_seed(0)
    m = registry.method_class(name)(params.methods[name], PreparedBenchmark(data), 0)
    m.name = name
    m.setup(torch.device("cpu"), None, steps)
    return m


def train_params(**kw: Any) -> TrainParams:
    return tiny_section(TrainParams, "train", **({"device": "cpu", "checkpoint_every": 100, "progress": False} | kw))


def float_loop(m: Any, epochs: int, steps_per_epoch: int) -> list[dict[str, float]]:
    """The loop before issue 19: every loss turned into a Python float (a GPU sync) each step."""
    m.before_training()  # as fit does: work that draws its own batches (GAN pretraining) comes first
    it, history = m.batches(), []
    m.train()
    for _ in range(epochs):
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            for k, v in m.train_step(next(it)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        history.append({f"train_{k}": v / steps_per_epoch for k, v in sums.items()})
        m.eval()
        with torch.no_grad():
            m.validate()  # as fit does: validation may draw random numbers
        m.train()
    return history


@pytest.mark.parametrize("name", ["mixing", "cyclegan"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_device_sums_equal_the_per_step_float_loop(name: str, prefetch: int, tiny_prepared: Path,
                                                   tmp_path: Path) -> None:
    """Bit-identical per-epoch train_* means (cyclegan: G updates averaged on the device, pretraining first)."""
    ref = float_loop(make(name, tiny_prepared), 2, 3)
    out = fit(make(name, tiny_prepared), train=train_params(prefetch=prefetch), epochs=2, steps_per_epoch=3,
              ckpt_dir=tmp_path)
    got = [{k: v for k, v in h.items() if k.startswith("train_")} for h in out.history]
    assert [list(h) for h in got] == [list(h) for h in ref]  # same keys, same order
    assert got == ref  # exactly equal floats


def test_loss_sums_are_exact_and_ordered() -> None:
    vals = [{"a": torch.tensor(0.1), "b": 2, "c": torch.tensor(1 / 3, dtype=torch.bfloat16)},
            {"a": torch.tensor([0.7]), "b": 0.5, "c": torch.tensor(3.0, dtype=torch.bfloat16)}]
    s = LossSums({"a": 1.25})
    for v in vals:
        s.add(v)
    expected = {"a": 1.25 + float(vals[0]["a"]) + float(vals[1]["a"]), "b": 2.5,
                "c": float(vals[0]["c"]) + float(vals[1]["c"])}
    assert s.read() == expected and list(s.read()) == ["a", "b", "c"]
    assert s.dev["a"].dtype == torch.float64  # summed on the tensors' device, in float64
    assert not LossSums() and s


def test_nan_guard_names_the_step_range_and_keeps_the_last_good_checkpoint(tiny_prepared: Path,
                                                                            tmp_path: Path) -> None:
    m = make("mixing", tiny_prepared)
    step_fn, calls = m.train_step, []

    def poisoned(batch: Any) -> dict[str, Any]:
        calls.append(1)
        out = step_fn(batch)
        return out | {"loss": torch.tensor(float("nan"))} if len(calls) == 4 else out

    m.train_step = poisoned
    with pytest.raises(NonFiniteLossError, match=r"loss 'loss' is nan in steps 4-6 \(epoch 1;"):
        fit(m, train=train_params(checkpoint_every=3), epochs=1, steps_per_epoch=6, ckpt_dir=tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 3  # the checkpoint due at step 6 was not written


class FakeRun:
    """Records what fit() logs (the TrackedRun calls fit makes)."""

    run_id = "fake"
    log_seconds = 0.0

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def flush(self) -> None:
        pass


def test_log_every_logs_step_means(tiny_prepared: Path, tmp_path: Path) -> None:
    m = make("mixing", tiny_prepared)
    step_fn, seen = m.train_step, []

    def recording(batch: Any) -> dict[str, Any]:
        out = step_fn(batch)
        seen.append(float(out["loss"]))
        return out

    m.train_step = recording
    run = FakeRun()
    result = fit(m, train=train_params(), epochs=1, steps_per_epoch=4, ckpt_dir=tmp_path, run=run, log_every=2)  # type: ignore[arg-type]
    curve = [(s, d) for s, d in run.logged if "train_loss" in d]  # the training curve: window means
    assert [s for s, _ in curve] == [2, 4]
    assert [d["train_loss"] for _, d in curve] == [(seen[0] + seen[1]) / 2, (seen[2] + seen[3]) / 2]
    epoch = [(s, d) for s, d in run.logged if "val_accuracy" in d]  # once per epoch, at the global step
    assert [s for s, _ in epoch] == [4] and not any(k.startswith("train_") for k in epoch[0][1])
    assert result.history[0]["train_loss"] == sum(seen) / 4  # the history (train_history.csv) keeps epoch means


@pytest.mark.parametrize("log_every", [0, 2])
def test_prefetch_resume_after_a_crash_matches_an_uninterrupted_run(tiny_prepared: Path, tmp_path: Path,
                                                                    log_every: int) -> None:
    """The prefetcher runs ahead, yet the checkpoint (mid-epoch, at step 2) resumes to the same history."""
    train = train_params(prefetch=3, checkpoint_every=2)
    full = fit(make("cyclegan", tiny_prepared), train=train, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path / "a",
               log_every=log_every)

    class Crash(Exception):
        pass

    def crash(epoch: int, metrics: dict[str, float]) -> None:
        raise Crash

    with pytest.raises(Crash):
        fit(make("cyclegan", tiny_prepared), train=train, epochs=2, steps_per_epoch=3, ckpt_dir=tmp_path / "b",
            on_epoch=crash, log_every=log_every)
    state = load_checkpoint(tmp_path / "b")
    assert state["step"] == 2  # the last checkpoint before the crash at the end of epoch 1 (step 3)
    resumed = fit(make("cyclegan", tiny_prepared), train=train, epochs=2, steps_per_epoch=3,
                  ckpt_dir=tmp_path / "b", resume_state=state, log_every=log_every)
    np.testing.assert_equal(resumed.history, full.history)


class _Pair(NamedTuple):
    x: np.ndarray
    y: np.ndarray | None


@dataclasses.dataclass
class _Batch:
    images: np.ndarray
    extra: dict[str, np.ndarray]


def test_pin_batch_keeps_the_batch_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every array of tuples, named tuples, dicts and dataclasses goes to (here: simulated) pinned memory."""
    pinned: list[torch.Tensor] = []

    def fake_pin(self: torch.Tensor) -> torch.Tensor:
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    a = np.arange(6, dtype=np.uint8).reshape(1, 2, 3, 1)
    batch = (a, _Pair(a[:, ::-1], None), _Batch(a, {"k": np.zeros(3, np.int64)}), 7)
    out = pin_batch(batch)
    assert isinstance(out, tuple) and isinstance(out[1], _Pair) and isinstance(out[2], _Batch)
    assert out[3] == 7 and out[1].y is None and len(pinned) == 4
    np.testing.assert_array_equal(out[1].x, a[:, ::-1])
    assert all(isinstance(x.base, torch.Tensor) for x in (out[0], out[1].x, out[2].images, out[2].extra["k"]))


def test_channels_last_only_on_cuda(tiny_prepared: Path) -> None:
    """NHWC weights on CUDA only: on CPUs oneDNN's AVX2 NHWC weight gradient corrupts memory (issue 22)."""
    on = train_params(channels_last=True)
    m = make("mixing", tiny_prepared)
    apply_train_options(m, on)()
    convs = [p for p in m.parameters() if p.dim() == 4]
    assert convs and not any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in convs)
    m.device = torch.device("cuda")  # layout only: no CUDA kernel runs here
    apply_train_options(m, on)()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


@pytest.mark.slow
def test_compile_option_trains_and_exports_eager(tiny_prepared: Path, tmp_path: Path) -> None:
    import pickle

    ref = fit(make("mixing", tiny_prepared), train=train_params(), epochs=1, steps_per_epoch=3,
              ckpt_dir=tmp_path / "a")
    m = make("mixing", tiny_prepared)
    out = fit(m, train=train_params(compile=True), epochs=1, steps_per_epoch=3, ckpt_dir=tmp_path / "b")
    assert out.history[0]["train_loss"] == pytest.approx(ref.history[0]["train_loss"], rel=1e-3)
    pickle.dumps(m.export_model())  # back to eager after fit: MLflow's pickle format works


def test_train_options_parse_strictly() -> None:
    raw = tiny_params_dict()
    for v in ("auto", True, False):
        raw["train"]["channels_last"] = raw["train"]["compile"] = v
        p = parse_params(raw, "t")
        assert p.train.channels_last == v and p.train.compile == v
    raw["train"]["compile"] = "yes"
    with pytest.raises(ConfigError, match="train.compile"):
        parse_params(raw, "t")
    raw["train"]["compile"] = "auto"
    raw["tracking"]["log_every"] = -1
    with pytest.raises(ConfigError, match="log_every"):
        parse_params(raw, "t")


def test_cudnn_benchmark_only_when_not_deterministic() -> None:
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    with torch_settings(deterministic=False, threads=0):
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with torch_settings(deterministic=True, threads=0):
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    assert (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before  # restored


# -- what MLflow shows -------------------------------------------------------------------------------------------
def test_train_run_has_dataset_input_and_system_metrics(tiny_prepared: Path, tiny_params_file: Path, in_tmp: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import mlflow

    from s2r import stages
    from s2r.params import load_params

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    params = load_params(tiny_params_file, {"tracking.log_model": False, "tracking.log_every": 1})
    data = PreparedBenchmark(tiny_prepared)
    summary = stages.train(stages.TrainRequest("mixing", tiny_prepared, in_tmp / "model", ckpt_dir=in_tmp / "ck"),
                           params)
    client = mlflow.MlflowClient()
    run = client.get_run(summary["mlflow_run_id"])
    (inp,) = run.inputs.dataset_inputs
    # MLflow keeps one dataset per (name, digest) in an experiment: the source is the first folder that held this
    # data version (another test's copy of the same tiny benchmark), so only its form is checked here
    assert inp.dataset.digest == data.data_version[:36] and json.loads(inp.dataset.source)["uri"].endswith("prepared")
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    profile = json.loads(inp.dataset.profile)
    assert profile["data_version"] == data.data_version
    assert profile["splits"]["real"] == {s: len(data.get("real", s)) for s in ("train", "val", "test")}
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in steps] == list(range(1, 7))  # tracking.log_every: 1 -> every step of 2 x 3
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_experiment_kind_chosen_by_a_user_is_kept() -> None:
    import mlflow

    from s2r import tracking

    exp_id = tracking.setup("kind-kept")
    mlflow.MlflowClient().set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")
    tracking.setup("kind-kept")
    assert mlflow.MlflowClient().get_experiment(exp_id).tags["mlflow.experimentKind"] == "genai_development"
    assert tracking.ui_url("127.0.0.1", 5005, "kind-kept") == (
        f"http://127.0.0.1:5005/#/experiments/{exp_id}/runs?workflowType=machine_learning")


def test_run_server_stops_its_whole_process_group(tmp_path: Path) -> None:
    """SIGTERM to the supervisor (as to `s2r ui`) also ends the server's own children (uvicorn's workers)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "pids"
    child = f"sleep 60 & echo $$ $! > {pidfile}; wait"
    code = f"from s2r.tracking import run_server; run_server(['sh', '-c', {child!r}])"
    sup = subprocess.Popen([sys.executable, "-c", code],
                           env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and len(pidfile.read_text().split()) == 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    pgid, worker = (int(x) for x in pidfile.read_text().split())
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # the server and its background worker are gone
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)


# -- gpu-check and the loop benchmark -------------------------------------------------------------------------------
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from s2r.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    res = CliRunner().invoke(main, ["gpu-check", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("\n") == 1 and "no CUDA device" in res.output
    assert not out.exists()


def test_loop_vs_bare_step_measures_both(tiny_prepared: Path) -> None:
    """Numbers are reported, not asserted (shared machines): the loop's per-step time is a difference of two timings
    (its fixed costs cancel), which a loaded machine can make negative, so only finiteness is checked."""
    import math

    from s2r.bench import loop_vs_step

    res = loop_vs_step(lambda: make("mixing", tiny_prepared), train_params(), steps=(2, 4))
    assert res["bare_step_s"] > 0 and math.isfinite(res["loop_step_s"]) and math.isfinite(res["loop_over_bare"])
    assert 0 <= res["data_wait_share"] < 1 and res["steps"] == 4


def test_patch_benchmark_feeds_cut_at_paper_patch_sizes(tmp_path: Path) -> None:
    """gpu-check's timing data: CUT with its default networks draws batch-40 patches of the paper's sizes."""
    from s2r import gpucheck

    data = gpucheck.patch_benchmark(tmp_path, 68, n=4)
    m = gpucheck.cut_method(data, 60, torch.device("cpu"), None)
    batch = next(m.batches())
    assert batch.a.shape == (40, 60, 60, 3) and batch.b.shape == (40, 60, 60, 3)
    assert m.g is not None and m.cfg.gen_width == 64 and m.cfg.gen_blocks == 9 and m.cfg.num_patches == 256


@pytest.mark.slow
def test_s2r_ui_frees_its_port_on_sigterm(tmp_path: Path) -> None:
    """The real server: `s2r ui` answers, and after a SIGTERM nothing holds its port (uvicorn workers included)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1] / "src"),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'ui.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "s2r.cli", "ui", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline, up = time.monotonic() + 180, False
        while time.monotonic() < deadline and not up:
            try:
                up = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                time.sleep(0.5)
        assert up, "the MLflow UI did not come up"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert "workflowType=machine_learning" in (proc.stdout.read() if proc.stdout else "")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # free again: no worker survived


def test_gpu_check_params_are_valid_for_every_method_block() -> None:
    """The shrunken settings gpu-check trains every block with parse strictly (catchable without a GPU)."""
    from s2r import gpucheck

    p = gpucheck.check_params(None, steps=2, path=str(TEST_PARAMS))
    assert p.train.device == "cuda" and p.train.amp and p.tracking.experiment == "s2r-gpu-check"
    assert all(c.epochs == 2 and c.steps_per_epoch == 2 for c in p.methods.values())
    assert p.methods["cyclegan"].pretrain_g_steps == 1 and p.methods["segmenter_synthetic"].last_k <= 2


def test_gpu_check_places_every_block_from_the_registry(tmp_path: Path, in_tmp: Path) -> None:
    """Without a list of method names: a block trains on the first benchmark it can be built on, a refined-data block
    waits for the refiner before it, twin-VAE stage 2 starts from stage 1's model (its init_from), evaluation runs
    where the block has the capability its evaluator scores (run on the CPU here; `s2r gpu-check` on CUDA)."""
    from s2r import gpucheck

    raw = tiny_params_dict()
    raw["tracking"].update(log_model=False, system_metrics=False)  # speed only
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    names = ["segmenter_refined", "twinvae_heads", "cut", "twinvae"]
    res = gpucheck.check_methods(tmp_path / "w", names, steps=1, device="cpu", params_path=str(tmp_path / "p.yaml"))
    assert {n: r["status"] for n, r in res.items()} == dict.fromkeys(names, "passed"), res
    assert list(res) == ["cut", "twinvae", "twinvae_heads", "segmenter_refined"]  # its refined data comes first
    assert res["segmenter_refined"]["data"] == "refined_cut" and res["cut"]["data"] == "scenes"
    assert res["twinvae_heads"]["init"].endswith("model_twinvae") and res["twinvae"]["init"] == ""
    assert res["twinvae"]["evaluated"] == "refine"  # stage 1 translates; it has no heads to predict with
    assert res["twinvae_heads"]["evaluated"].startswith("depth_segmentation")
    assert res["segmenter_refined"]["evaluated"] == "segmentation_lastk" and "refine" in res["cut"]["evaluated"]
