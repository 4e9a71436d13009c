"""Run several commands side by side on one machine, the CPU cores split between them (`s2r parallel`).

The default pipeline's small networks use two cores poorly: one beta-VAE training at 32 px with two threads is
about as fast as one with a single thread, while two single-thread trainings side by side do twice the work
(measured on the 2-core CPU machine; OpenMP threads of two processes must not compete for the same cores).
`dvc repro` runs one stage at a time, so a stage that trains or scores several models (the seeds the paper
verdicts compare) calls `s2r parallel "s2r train ..." "s2r train ..." ...`.

Each command gets OMP_NUM_THREADS = cores // jobs (`train.threads: auto` reads it, `s2r.stages`); commands start
in the order given as slots free up (give the longest first); output lines are prefixed `[i]`. The first command
that fails stops the others (SIGTERM: a training checkpoints and exits) and `s2r parallel` fails naming it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any


class ParallelError(RuntimeError):
    """A command of `s2r parallel` failed (or could not start)."""


def cores() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process that may use `threads` CPU threads (torch / OpenMP / BLAS)."""
    env = dict(os.environ if base is None else base)
    t = str(max(1, threads))
    return env | {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "PYTHONUNBUFFERED": "1"}


def _relay(index: int, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    """Copy a child's output line by line with its prefix; of a progress bar's \\r updates keep the last."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n").split("\r")[-1]
        with lock:
            out.write(f"[{index}] {line}\n")
            out.flush()


def run(commands: Sequence[str], jobs: int = 0, out: IO[str] | None = None, poll: float = 0.2,
        grace: float = 60.0) -> list[float]:
    """Run `commands` (shell-style command lines, no shell) at most `jobs` at a time; seconds of each.

    jobs 0 = min(len(commands), cores()). Raises ParallelError naming the first failed command, after stopping
    the others (SIGTERM, then SIGKILL after `grace` seconds).
    """
    argvs = _parse(commands)
    jobs = jobs or min(len(argvs), cores())
    if jobs < 1:
        raise ParallelError(f"s2r parallel: --jobs must be >= 1, got {jobs}")
    pool = _Pool(commands, argvs, thread_env(cores() // jobs), out or sys.stdout)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_term)
    try:
        pending = list(range(len(argvs)))
        while pending or pool.running:
            while pending and len(pool.running) < jobs:
                pool.start(pending.pop(0))
            time.sleep(poll)
            pool.reap()
    except BaseException:
        pool.stop_all(grace)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return pool.seconds


def _parse(commands: Sequence[str]) -> list[list[str]]:
    """Each command line split like a shell would (no shell runs it); errors name the empty one."""
    if not commands:
        raise ParallelError("s2r parallel: no commands given")
    argvs = [shlex.split(c) for c in commands]
    for c, argv in zip(commands, argvs):
        if not argv:
            raise ParallelError(f"s2r parallel: empty command {c!r}")
    return argvs


def _on_term(signum: int, frame: Any) -> None:
    raise ParallelError(f"s2r parallel: stopped by signal {signum}")


class _Pool:
    """The running commands: their processes, output relays and start times; each one's seconds when done."""

    def __init__(self, commands: Sequence[str], argvs: list[list[str]], env: dict[str, str], out: IO[str]) -> None:
        self.commands, self.argvs, self.env, self.out = commands, argvs, env, out
        self.lock = threading.Lock()
        self.running: dict[int, tuple[subprocess.Popen[bytes], threading.Thread, float]] = {}
        self.seconds = [0.0] * len(argvs)

    def say(self, line: str) -> None:
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def start(self, i: int) -> None:
        """Start command i, its output relayed line by line with an `[i]` prefix."""
        self.say(f"[{i}] $ {self.commands[i]}")
        try:
            p = subprocess.Popen(self.argvs[i], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        except OSError as e:
            raise ParallelError(f"s2r parallel: command [{i}] could not start: {self.commands[i]!r} ({e})") from e
        assert p.stdout is not None  # stdout=PIPE
        t = threading.Thread(target=_relay, args=(i, p.stdout, self.out, self.lock), daemon=True)
        t.start()
        self.running[i] = (p, t, time.monotonic())

    def reap(self) -> None:
        """Collect the commands that ended; a failed one raises ParallelError naming it."""
        for i in list(self.running):
            p, t, t0 = self.running[i]
            rc = p.poll()
            if rc is None:
                continue
            t.join()
            del self.running[i]
            self.seconds[i] = time.monotonic() - t0
            self.say(f"[{i}] exit {rc} after {self.seconds[i]:.1f} s")
            if rc != 0:
                raise ParallelError(f"s2r parallel: command [{i}] failed with exit status {rc}: {self.commands[i]}")

    def stop_all(self, grace: float) -> None:
        """SIGTERM to every running command, SIGKILL to those still alive after `grace` seconds."""
        for p, _, _ in self.running.values():
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + grace
        for p, t, _ in self.running.values():
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            t.join()
