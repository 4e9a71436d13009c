"""Same seed, same numbers, in one process, whatever ran before (issue 22).

Root cause of the crashes and run-order-dependent losses seen on fresh CI machines: `to_float` handed every network
a channels_last view of the HWC batch (`permute(0, 3, 1, 2)`), so every convolution ran oneDNN's NHWC kernels. On
CPUs without AVX-512 (oneDNN's AVX2 code path, torch 2.14.1 / oneDNN 3.12) the weight gradient of the 1x1 stride-2
NHWC shortcut convolution is nondeterministic and corrupts the heap: `malloc(): unaligned tcache chunk detected`,
then SIGABRT/SIGSEGV inside autograd backward, at whichever later test the corrupted chunk is freed. The AVX2 path is
forced here with ONEDNN_MAX_CPU_ISA=AVX2, so the failure reproduces on any x86 machine, AVX-512 ones included.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from s2r.methods.base import to_float

REPO = Path(__file__).resolve().parents[1]

avx2_only = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                               reason="ONEDNN_MAX_CPU_ISA=AVX2 emulates an x86 CPU without AVX-512")


@pytest.mark.parametrize("channels", [1, 3])
def test_to_float_gives_nchw_contiguous(channels: int) -> None:
    """The batch networks see is NCHW with standard strides, also for C = 1 where the strides are ambiguous."""
    images = np.arange(2 * 8 * 8 * channels, dtype=np.uint8).reshape(2, 8, 8, channels)
    x = to_float(images, torch.device("cpu"))
    assert x.shape == (2, channels, 8, 8) and x.dtype == torch.float32
    assert x.stride() == (channels * 64, 64, 8, 1)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)


_SCRIPT = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config, tiny_samples, tiny_spec
    from s2r.data.benchmark import write_benchmark
    from s2r.data.prepared import PreparedBenchmark, prepare
    from s2r.methods.mixing import Method

    tmp = Path(tempfile.mkdtemp())
    spec = tiny_spec()
    prepared = prepare(write_benchmark(tmp / "b", spec, tiny_samples(spec), progress=False), tmp / "p", progress=False)

    def losses(seed):
        cfg = tiny_config("mixing", widths=[4, 8], blocks_per_stage=1, batch_size=8, epochs=2, steps_per_epoch=3,
                          real_per_class=2, real_fraction=0.125)
        torch.manual_seed(seed)
        m = Method(cfg, PreparedBenchmark(prepared), seed)
        m.setup(torch.device("cpu"), None, 6)
        it = m.batches()
        return [m.train_step(next(it))["loss"] for _ in range(4)]

    runs = [losses(0) for _ in range(5)]
    print("LOSSES", runs)
    assert all(r == runs[0] for r in runs), "same seed, different losses: " + repr(runs)
    assert losses(1) != runs[0]
""")


@avx2_only
@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_same_losses_on_onednn_avx2_path(tmp_path: Path, threads: int) -> None:
    """Five trainings with one seed in one process give bit-identical losses, and none crashes, on the AVX2 path.

    Before the fix this failed at every run with 2 threads (second loss 0.8363 vs 0.8493) and aborted the interpreter
    with 1 thread ("malloc(): unaligned tcache chunk detected").
    """
    env = os.environ | {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": str(threads),
                        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = tmp_path / "same_seed.py"
    script.write_text(_SCRIPT.format(tests=str(REPO / "tests")))
    res = subprocess.run([sys.executable, "-X", "faulthandler", str(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert "LOSSES" in res.stdout


def test_training_restores_torch_settings(tiny_prepared: Path, tiny_params_file: Path, in_tmp: Path) -> None:
    """`stages.train` (the CLI, `s2r tables`, every tuning trial) leaves threads and determinism as it found them."""
    from s2r import stages
    from s2r.params import load_params
    from s2r.train import torch_state

    params = load_params(tiny_params_file, {"train.threads": 1, "train.deterministic": True,
                                            "tracking.log_model": False})
    before = torch_state()
    stages.train(stages.TrainRequest("mixing", tiny_prepared, in_tmp / "model", ckpt_dir=in_tmp / "ckpt"), params)
    assert torch_state() == before
