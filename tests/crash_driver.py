"""Run the `s2r` CLI in a process that SIGKILLs itself at a chosen point (the fault-injection tests).

S2R_TEST_KILL picks the point, counted within this process, so where it dies is deterministic:
  step:K            before the K-th training step
  checkpoint_tmp:N  while writing the N-th checkpoint: the temp file is written, the rename never happens
  after_fit         after the training loop, before the model file is written
  after_model       after model.pt is written, before the run is finished (plots, model logging)
S2R_TEST_DEAD_MARK=PATH: touch PATH just before dying. S2R_TEST_WAIT_FOR=PATH: hold the first training step
until PATH exists (so another worker is certainly mid-trial when it dies; an event, not a timer).
Usage: python tests/crash_driver.py train mixing --data ... (the arguments of `s2r`), or `run_cli` in a fork.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def die() -> None:
    if os.environ.get("S2R_TEST_DEAD_MARK"):
        Path(os.environ["S2R_TEST_DEAD_MARK"]).touch()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Patch the training loop's seams (no product code changes) to die at `spec`."""
    import torch

    import s2r.stages
    import s2r.train

    kind, _, arg = spec.partition(":") if spec else ("", "", "")
    real_fit, real_save = s2r.train.fit, s2r.train.save_checkpoint
    calls = {"step": 0, "ckpt": 0}

    def fit(method: Any, **kw: Any) -> Any:
        gate = os.environ.get("S2R_TEST_WAIT_FOR")
        if gate and not calls.get("waited"):
            import time

            calls["waited"] = 1
            deadline = time.monotonic() + 600
            while not Path(gate).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{gate} never appeared")
                time.sleep(0.1)
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

    def plot_history(*a: Any, **kw: Any) -> None:
        die()

    s2r.train.fit = fit
    s2r.train.save_checkpoint = save_checkpoint
    if kind == "after_model":
        s2r.stages._plot_history = plot_history


def run_cli(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Run `s2r ARGV` in a forked child of this process (no second start-up of torch/MLflow); return its status.

    The status is the exit code, or minus the signal that ended it (-9: SIGKILL). stdout/stderr go to `log`.
    """
    return wait(spawn_cli(argv, env, log))


def wait(pid: int, timeout: float = 600.0) -> int:
    """The exit code of child `pid`, or minus the signal that ended it; a child still alive after `timeout`
    seconds is killed and reported as a TimeoutError (a hung child must fail the test, never hang the suite)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"forked s2r child {pid} still running after {timeout:.0f} s; killed")
        time.sleep(0.05)


def spawn_cli(argv: list[str], env: dict[str, str], log: Path) -> int:
    """Start `s2r ARGV` in a forked child; return its pid (see run_cli)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller (pytest)
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(fd, "w", buffering=1)  # noqa: SIM115 - lives until os._exit
            os.environ.update(env)
            if env.get("S2R_TEST_KILL") or env.get("S2R_TEST_WAIT_FOR"):
                install(env.get("S2R_TEST_KILL", ""))
            from s2r.cli import main

            main(argv, prog_name="s2r")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - report anything, then leave without running the caller's code
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


if __name__ == "__main__":  # also every process of `torchrun ... tests/crash_driver.py train ...` (test_ddp_run)
    only = os.environ.get("S2R_TEST_KILL_RANK")  # under torchrun: only this rank dies
    if os.environ.get("S2R_TEST_KILL") and only in (None, os.environ.get("RANK")):
        install(os.environ["S2R_TEST_KILL"])
    from s2r.cli import main

    main(sys.argv[1:], prog_name="s2r")
