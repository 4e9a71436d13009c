"""Host/device discipline of every method (issue 21): train steps, validate, checkpoint/resume, export and the
capabilities run with tensors on a non-CPU device.

There is no GPU on the test machines, so `standin_device` provides a device whose tensors compute on the CPU
(values equal a CPU run, which the tests check) but enforce a GPU's host/device rules: `.numpy()` and
`np.asarray` of a device tensor raise (segmenter.py's `miou_history[...].numpy()` crashed every GPU run) and so do
ops mixing device tensors with CPU tensors. CUDA-only behaviour (kernels, bf16 autocast, pinned memory, streams,
speed) is out of its reach: `s2r gpu-check` covers that on a CUDA machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_params_dict, tiny_samples, tiny_section, tiny_spec
from s2r.config import TrainParams
from s2r.data.benchmark import write_benchmark
from s2r.data.prepared import PreparedBenchmark, prepare
from s2r.methods import registry
from s2r.params import parse_params
from s2r.train import fit, load_checkpoint
from standin_device import STANDIN, DeviceTensor, HostDeviceError, standin

TRAIN = tiny_section(TrainParams, "train", device="cpu", checkpoint_every=1, progress=False, prefetch=1)

# every method module, and the variants that take other code paths (extractor, triplet, factor-VAE, Ada-GVAE)
ON_DIGITS = ["mixing", "cyclegan", "ae", "ae_ii_tae", "ae_factorvae10"]
SLOW_DIGITS = ["ae_e_tae", "ae_vae"]  # the VGG extractor path takes ~30 s here: in the slow stage test
ON_SCENES = ["cut", "segmenter_synthetic", "twinvae", "twinvae_simonly", "betavae", "betavae_weak"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory: pytest.TempPathFactory, scenes16_prepared: Path) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("device")
    spec = tiny_spec()
    digits = prepare(write_benchmark(tmp / "tiny", spec, tiny_samples(spec), progress=False), tmp / "tiny_p",
                     progress=False)
    return {"digits": digits, "scenes": scenes16_prepared}


def build(name: str, data: Path, device: torch.device, steps: int):
    params = parse_params(tiny_params_dict(), "tiny params")
    torch.manual_seed(0)
    m = registry.method_class(name)(params.methods[name], PreparedBenchmark(data), 0)
    m.name = name
    m.setup(device, None, steps)
    return m


def capabilities(m) -> dict[str, np.ndarray]:
    """Every capability on two validation images: results must come back as host arrays."""
    data = m.data
    images = np.asarray(data.get(data.spec.target, "val").images[:2])
    out: dict[str, np.ndarray] = {}
    if "predict" in m.capabilities and getattr(m, "heads", True) is not None:  # twin-VAE stage 1: no heads
        p = m.predict(images)
        out |= {f"predict_{k}": v for k, v in p.items()} if isinstance(p, dict) else {"predict": p}
    if "encode" in m.capabilities:
        out["encode"] = m.encode(images)
    if "translate" in m.capabilities and getattr(m, "twin", True) is not None:  # twin-VAE baselines: no twin
        out["translate"] = m.translate(images, "a2b")
    return out


def run_method(name: str, data: Path, tmp: Path, on_standin: bool) -> dict:
    """2 epochs x 1 step (validate twice), a checkpoint per step, a resume, export and capabilities."""
    def go(device: torch.device) -> dict:
        m = build(name, data, device, 2)
        if device == STANDIN:
            assert all(isinstance(p, DeviceTensor) for p in m.parameters()), "setup() left parameters on the host"
        first = fit(m, train=TRAIN, epochs=1, steps_per_epoch=1, ckpt_dir=tmp)
        resumed = build(name, data, device, 2)
        second = fit(resumed, train=TRAIN, epochs=2, steps_per_epoch=1, ckpt_dir=tmp,
                     resume_state=load_checkpoint(tmp))
        model = resumed.export_model()
        buf = io.BytesIO()
        torch.save(resumed.state_dict(), buf)  # stages.train's model.pt
        model.cpu()  # what stages.train hands to MLflow, with the CPU example input
        with torch.no_grad():
            ex = torch.from_numpy(resumed.example_input())
            exported = model(ex) if not hasattr(model, "encode_tensor") else None
        model.to(device)
        return {"history": first.history + second.history[1:], "caps": capabilities(resumed),
                "exported": exported}

    if on_standin:
        with standin() as dev:
            return go(dev)
    return go(torch.device("cpu"))


@pytest.mark.parametrize("name", ON_DIGITS + ON_SCENES)
def test_method_runs_on_a_device_like_a_gpu(name: str, benchmarks: dict[str, Path], tmp_path: Path) -> None:
    data = benchmarks["digits" if name in ON_DIGITS else "scenes"]
    dev = run_method(name, data, tmp_path / "dev", on_standin=True)
    cpu = run_method(name, data, tmp_path / "cpu", on_standin=False)
    assert [h["epoch"] for h in dev["history"]] == [1, 2]
    # the stand-in computes with the CPU's kernels: a GPU-correct method gives the CPU's numbers exactly
    np.testing.assert_equal(dev["history"], cpu["history"])
    assert set(dev["caps"]) == set(cpu["caps"]) and dev["caps"], f"{name}: no capability exercised"
    for k, v in dev["caps"].items():
        assert isinstance(v, np.ndarray), f"{name}.{k} returned {type(v).__name__}, not a host array"
        np.testing.assert_array_equal(v, cpu["caps"][k])


def test_standin_rejects_what_a_gpu_rejects() -> None:
    """The checks themselves: the issue-21 crash (`.numpy()` of a device buffer) and host/device mixes."""
    with standin() as dev:
        hist = torch.full((3, 2), float("nan"), dtype=torch.float64).to(dev)
        with pytest.raises(HostDeviceError, match="numpy"):
            hist[:1].numpy()  # segmenter.py:251 before the fix
        with pytest.raises(HostDeviceError, match="np.asarray"):
            np.asarray(hist)
        assert np.isnan(hist[:1].cpu().numpy()).all()  # the fix
        conv = torch.nn.Conv2d(1, 2, 3).to(dev)
        with pytest.raises(HostDeviceError, match="same device"):
            conv(torch.zeros(1, 1, 5, 5))  # an input left on the host
        with pytest.raises(HostDeviceError, match="same device"):
            _ = hist + torch.ones(3, 2, dtype=torch.float64)
        assert float(hist.nan_to_num().sum() + torch.tensor(1.0)) == 1.0  # 0-dim host tensors mix, as on CUDA
        idx = torch.tensor([0, 2])
        assert hist[idx].shape == (2, 2)  # host index tensors are allowed, as on CUDA
        hist[0] = torch.tensor([1.0, 2.0], dtype=torch.float64)  # a host -> device copy
        assert hist[0].tolist() == [1.0, 2.0]
        sd = io.BytesIO()
        torch.save(conv.state_dict(), sd)
        sd.seek(0)
        loaded = torch.load(sd, weights_only=False)
        assert type(loaded["weight"]) is torch.Tensor  # saved like map_location="cpu"
        fresh = torch.nn.Conv2d(1, 2, 3).to(dev)
        fresh.load_state_dict(loaded)
        assert torch.equal(fresh.weight.cpu(), conv.weight.cpu())


def test_segmenter_validate_on_device_regression(benchmarks: dict[str, Path], tmp_path: Path) -> None:
    """Issue 21's crash, at the line that had it: validate() reads its mIoU history buffer on the device."""
    with standin() as dev:
        m = build("segmenter_synthetic", benchmarks["scenes"], dev, 1)
        m.eval()
        out = m.validate()
        assert isinstance(m.miou_history, DeviceTensor)
        assert out["val_miou_lastk_n"] == 1 and np.isfinite(out["val_miou"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_DIGITS + SLOW_DIGITS + ON_SCENES + ["twinvae_heads", "segmenter_target"])
def test_stages_train_and_evaluate_on_device(name: str, benchmarks: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole stage path on the stand-in: train (MLflow run, model export) then evaluate or refine."""
    from s2r import stages
    from s2r import train as train_mod

    raw = tiny_params_dict()
    raw["train"].update(device="cpu", checkpoint_every=1)
    params = parse_params(raw, "tiny params")
    data = benchmarks["digits" if name in ON_DIGITS + SLOW_DIGITS else "scenes"]
    monkeypatch.setattr(train_mod, "select_device", lambda pref: STANDIN)
    monkeypatch.chdir(tmp_path)
    with standin():
        init = None
        if name == "twinvae_heads":
            init = tmp_path / "stage1"
            stages.train(stages.TrainRequest("twinvae", data, init, ckpt_dir=tmp_path / "ck1"), params)
        stages.train(stages.TrainRequest(name, data, tmp_path / "model", ckpt_dir=tmp_path / "ck", init=init), params)
        cls = registry.method_class(name)
        if cls.evaluator and name != "twinvae":  # stage 1 of the twin VAE has no heads to evaluate
            res = stages.evaluate(name, tmp_path / "model", data, tmp_path / "eval.json", None, params)
            assert res["evaluator"] == cls.evaluator
        if "translate" in cls.capabilities and name in ("cyclegan", "cut", "twinvae"):  # the others: no twin VAE
            res = stages.refine(name, tmp_path / "model", data, tmp_path / "refined", None, params)
            assert res["domains"]
