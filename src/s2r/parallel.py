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
    if not commands:
        raise ParallelError("s2r parallel: no commands given")
    argvs = []
    for c in commands:
        argv = shlex.split(c)
        if not argv:
            raise ParallelError(f"s2r parallel: empty command {c!r}")
        argvs.append(argv)
    out = out or sys.stdout
    jobs = jobs or min(len(argvs), cores())
    if jobs < 1:
        raise ParallelError(f"s2r parallel: --jobs must be >= 1, got {jobs}")
    env = thread_env(cores() // jobs)
    lock = threading.Lock()
    running: dict[int, tuple[subprocess.Popen[bytes], threading.Thread, float]] = {}
    seconds = [0.0] * len(argvs)
    pending = list(range(len(argvs)))

    def stop_all() -> None:
        for p, _, _ in running.values():
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + grace
        for p, t, _ in running.values():
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            t.join()

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise ParallelError(f"s2r parallel: stopped by signal {signum}")

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop(0)
                with lock:
                    out.write(f"[{i}] $ {commands[i]}\n")
                    out.flush()
                try:
                    p = subprocess.Popen(argvs[i], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
                except OSError as e:
                    raise ParallelError(f"s2r parallel: command [{i}] could not start: {commands[i]!r} ({e})") from e
                t = threading.Thread(target=_relay, args=(i, p.stdout, out, lock), daemon=True)
                t.start()
                running[i] = (p, t, time.monotonic())
            time.sleep(poll)
            for i in list(running):
                p, t, t0 = running[i]
                rc = p.poll()
                if rc is None:
                    continue
                t.join()
                del running[i]
                seconds[i] = time.monotonic() - t0
                with lock:
                    out.write(f"[{i}] exit {rc} after {seconds[i]:.1f} s\n")
                    out.flush()
                if rc != 0:
                    raise ParallelError(f"s2r parallel: command [{i}] failed with exit status {rc}: {commands[i]}")
    except BaseException:
        stop_all()
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return seconds
