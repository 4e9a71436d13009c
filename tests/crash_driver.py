"""Run the `s2r` CLI in a process that SIGKILLs itself at a chosen point (the fault-injection tests).

S2R_TEST_KILL picks the point, counted within this process, so where it dies is deterministic:
  step:K            before the K-th training step
  checkpoint_tmp:N  while writing the N-th checkpoint: the temp file is written, the rename never happens
  after_fit         after the training loop, before the model file is written
  log_model         while logging the model to MLflow (model.pt written, run not finished)
Usage: python tests/crash_driver.py train mixing --data ... (the arguments of `s2r`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Patch the training loop's seams (no product code changes) to die at `spec`."""
    import torch

    import s2r.tracking
    import s2r.train

    kind, _, arg = spec.partition(":")
    real_fit, real_save = s2r.train.fit, s2r.train.save_checkpoint
    calls = {"step": 0, "ckpt": 0}

    def fit(method: Any, **kw: Any) -> Any:
        if kind == "step":
            real_step = method.train_step

            def train_step(batch: Any) -> Any:
                calls["step"] += 1
                if calls["step"] == int(arg):
                    die()
                return real_step(batch)

            method.train_step = train_step
        result = real_fit(method, **kw)
        if kind == "after_fit":
            die()
        return result

    def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
        if kind == "checkpoint_tmp" and Path(path).name == s2r.train.CHECKPOINT:
            calls["ckpt"] += 1
            if calls["ckpt"] == int(arg):
                torch.save(state, Path(path).with_name(Path(path).name + ".tmp"))
                die()
        real_save(path, state)

    def log_model(self: Any, *a: Any, **kw: Any) -> str:
        die()
        return ""

    s2r.train.fit = fit
    s2r.train.save_checkpoint = save_checkpoint
    if kind == "log_model":
        s2r.tracking.TrackedRun.log_model = log_model


if __name__ == "__main__":
    if os.environ.get("S2R_TEST_KILL"):
        install(os.environ["S2R_TEST_KILL"])
    from s2r.cli import main

    main(sys.argv[1:], prog_name="s2r")
