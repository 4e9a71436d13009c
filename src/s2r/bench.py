"""`s2r benchmark`: where training time goes (data loading, step, tracking) and accuracy vs real fraction.

Numbers are measured and reported, never asserted: machines are shared and noisy.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from s2r.files import write_json


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
        "",
        f"{'real_fraction':>13} {'test_acc':>9} {'val_acc':>8} {'train_s':>8} {'tracking':>9}",
    ]
    for r in res["runs"]:
        lines.append(f"{r['real_fraction']:>13.4g} {r['test_accuracy']:>9.4f} {r['val_accuracy']:>8.4f} "
                     f"{r['train_seconds']:>8.1f} {r['tracking_share']:>9.2%}")
    return "\n".join(lines)
