"""`s2r benchmark`: where training time goes (data loading, step, tracking) and accuracy vs real fraction.

Numbers are measured and reported, never asserted: machines are shared and noisy.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from s2r.config import TrainParams
from s2r.files import write_json

if TYPE_CHECKING:  # torch stays a lazy import
    from s2r.methods.base import Method


def loading_vs_step(method: Any, n_batches: int = 20) -> dict[str, float]:
    """Images/s of drawing prepared batches vs the time of one optimisation step, same batches."""
    it = method.batches()
    next(it)  # warm the memory map and allocator
    t = time.perf_counter()
    batches = [next(it) for _ in range(n_batches)]
    load_s = (time.perf_counter() - t) / n_batches
    method.train()
    method.train_step(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches[1:]:
        method.train_step(b)
    step_s = (time.perf_counter() - t) / (n_batches - 1)
    bs = len(batches[0][0])
    return {"batch_size": bs, "load_seconds_per_batch": load_s, "load_images_per_second": bs / load_s,
            "step_seconds": step_s, "train_images_per_second": bs / step_s, "load_to_step_ratio": load_s / step_s}


def loop_vs_step(make_method: Callable[[], Method[Any]], train: TrainParams, steps: tuple[int, int] = (4, 12)
                 ) -> dict[str, float]:
    """Per-step time of the whole loop (s2r.train.fit: batch drawing, prefetch, loss sums, NaN checks) vs the bare
    train_step on pre-drawn batches. fit's fixed costs (one validation, the final checkpoint) cancel out in
    (T(n2) - T(n1)) / (n2 - n1); on CUDA every timing ends with a synchronize."""
    import torch

    from s2r.train import fit

    n1, n2 = steps
    m = make_method()
    dev = m.device
    def sync() -> None:
        """Wait for the GPU (every timing ends with one); nothing to wait for on the CPU."""
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    it = m.batches()
    batches = [next(it) for _ in range(n2 + 1)]
    m.train()
    m.train_step(batches[0])  # warm-up
    sync()
    t = time.perf_counter()
    for b in batches[1:]:
        m.train_step(b)
    sync()
    bare = (time.perf_counter() - t) / n2
    totals = []
    for n in (n1, n2):
        m = make_method()
        with tempfile.TemporaryDirectory() as tmp:
            sync()
            t = time.perf_counter()
            r = fit(m, train=train, epochs=1, steps_per_epoch=n, ckpt_dir=Path(tmp))
            sync()
            totals.append(time.perf_counter() - t)
    loop = (totals[1] - totals[0]) / (n2 - n1)
    return {"bare_step_s": bare, "loop_step_s": loop, "loop_over_bare": loop / bare,
            "data_wait_share": r.seconds_data / max(r.seconds_total, 1e-9), "steps": n2}


def run(method_name: str, data_dir: Path, fractions: list[float], out: Path, params_path: str) -> dict[str, Any]:
    """Measure loading vs step, tracking overhead, and test accuracy per real_fraction (one MLflow run each)."""
    from s2r.data.prepared import PreparedBenchmark
    from s2r.methods import registry
    from s2r.params import load_params
    from s2r.tables.mixing import train_and_test
    from s2r.train import select_device

    params = load_params(params_path)
    data = PreparedBenchmark(data_dir)
    cfg = params.methods[method_name]
    method = registry.method_class(method_name)(cfg, data, params.seed)
    device = select_device(params.train.device)
    method.setup(device, None, cfg.epochs * cfg.steps_per_epoch)
    result: dict[str, Any] = {"method": method_name, "device": str(device), "loading": loading_vs_step(method)}

    def fresh() -> Any:
        import torch

        torch.manual_seed(params.seed)
        m = registry.method_class(method_name)(cfg, data, params.seed)
        m.setup(device, None, cfg.epochs * cfg.steps_per_epoch)
        return m

    result["loop"] = loop_vs_step(fresh, dataclasses.replace(params.train, progress=False))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in fractions:
            p = load_params(params_path, {f"methods.{method_name}.real_fraction": f})
            t = time.perf_counter()
            r = train_and_test(method_name, data_dir, p, Path(tmp) / f"f{f}",
                               f"benchmark@{method_name}[real_fraction={f}]")
            runs.append({"real_fraction": f, **r, "stage_seconds": round(time.perf_counter() - t, 2)})
    result["runs"] = runs
    result["tracking_share_mean"] = float(np.mean([r["tracking_share"] for r in runs]))
    write_json(out, result)
    return result


def format_result(res: dict[str, Any]) -> str:
    lo = res["loading"]
    lines = [
        f"device {res['device']}  batch {lo['batch_size']}",
        f"loading : {lo['load_images_per_second']:>10.0f} img/s  ({lo['load_seconds_per_batch'] * 1e3:.2f} ms/batch)",
        f"training: {lo['train_images_per_second']:>10.0f} img/s  ({lo['step_seconds'] * 1e3:.1f} ms/step)",
        f"loading / step time: {lo['load_to_step_ratio']:.3%}",
        f"MLflow share of training time (mean): {res['tracking_share_mean']:.3%}",
        f"whole loop vs bare step: {res['loop']['loop_step_s'] * 1e3:.1f} vs {res['loop']['bare_step_s'] * 1e3:.1f} "
        f"ms/step ({res['loop']['loop_over_bare']:.3f}x)",
        "",
        f"{'real_fraction':>13} {'test_acc':>9} {'val_acc':>8} {'train_s':>8} {'tracking':>9}",
    ]
    for r in res["runs"]:
        lines.append(f"{r['real_fraction']:>13.4g} {r['test_accuracy']:>9.4f} {r['val_accuracy']:>8.4f} "
                     f"{r['train_seconds']:>8.1f} {r['tracking_share']:>9.2%}")
    return "\n".join(lines)
