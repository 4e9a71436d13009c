"""Run several commands side by side on one machine, the CPU cores split between them (`s2r parallel`).

The default pipeline's small networks use two cores poorly: one beta-VAE training at 32 px with two threads is
about as fast as one with a single thread, while two single-thread trainings side by side do twice the work
(measured on the 2-core CPU machine; OpenMP threads of two processes must not compete for the same cores).
`dvc repro` runs one stage at a time, so a stage that trains or scores several models (the seeds the paper
verdicts compare) calls `s2r parallel "s2r train ..." "s2r train ..." ...`.

Each command gets OMP_NUM_THREADS = cores // jobs (`train.threads: auto` reads it, `s2r.stages`); commands start
in the order given as slots free up (give the longest first); output lines are prefixed `[i]`. A command may be a
chain, `"s2r train ... && s2r evaluate ..."`: its parts run one after the other in the same slot, the next only if
the previous succeeded. The first command that fails stops the others (SIGTERM: a training checkpoints and exits)
and `s2r parallel` fails naming it.

Imports are paid once: an `s2r ...` command runs in a child forked from this process after it has imported torch,
MLflow and the s2r stages (the caller's `preload`, ~7 CPU-seconds that every fresh `s2r` process would pay again;
`s2r parallel` passes `s2r.cli.preload_stages`); other
programs, and every command when `fork=False` or the process is not single-threaded at that moment (fork only
copies the calling thread), start as ordinary subprocesses. A forked command runs the `s2r` CLI of this process's
package, with its own environment, thread count, stdin (/dev/null) and stdout/stderr (a pipe to this process).
"""

from __future__ import annotations

import io
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CHAIN = "&&"  # separates the parts of a chained command
Entry = Callable[[list[str]], Any]  # runs `s2r ARGS` in a forked child (argv[0] is "s2r"), with the child's
# environment (OMP_NUM_THREADS = its share) already in os.environ; may end with SystemExit(code)


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


FORK_SAFE_THREADS = ("jemalloc_bg_thd",)  # pyarrow's jemalloc: its own fork handlers reset it in the child


def single_threaded() -> bool:
    """True when this process runs one OS thread besides FORK_SAFE_THREADS (fork copies only the caller: another
    thread's locks would stay held in the child)."""
    import threading

    if threading.active_count() > 1:
        return False
    try:
        names = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    except OSError:
        return False
    return len([n for n in names if n not in FORK_SAFE_THREADS]) == 1


def _is_s2r(argv: list[str]) -> bool:
    return os.path.basename(argv[0]) == "s2r"


def _child_main(argv: list[str], env: dict[str, str], w: int, close: list[int], entry: Entry) -> None:
    """In a forked child: run `entry(argv)` (the s2r CLI) writing to pipe `w`; never returns."""
    code = 1
    try:
        for fd in close:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(null)
        os.close(w)
        # fresh text streams: the parent's objects may hold its locks and buffered text
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, errors="backslashreplace")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace")
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = list(argv)
        try:
            entry(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must exit here, never return into the parent's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


class _Proc:
    """A started command: a forked child of this process (s2r commands) or a subprocess."""

    def __init__(self, argv: list[str], env: dict[str, str], entry: Entry | None, close: list[int]) -> None:
        self.returncode: int | None = None
        self.cpu = 0.0  # user + system CPU seconds of the command (and its waited-for children)
        self.popen: subprocess.Popen[bytes] | None = None
        if entry is not None:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                _child_main(argv, env, w, [r, *close], entry)
            os.close(w)
            self.pid, self.fd = pid, r
        else:
            self.popen = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
            assert self.popen.stdout is not None
            self.pid, self.fd = self.popen.pid, self.popen.stdout.fileno()
        os.set_blocking(self.fd, False)

    def poll(self) -> int | None:
        """The exit status once the command ended (and its CPU seconds in `cpu`), else None."""
        if self.returncode is None:
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (e.g. Popen's own bookkeeping)
                self.returncode = self.popen.poll() if self.popen is not None else 1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.cpu = usage.ru_utime + usage.ru_stime
                if self.popen is not None:
                    self.popen.returncode = self.returncode
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.popen is not None and self.popen.stdout is not None:
            self.popen.stdout.close()
        else:
            try:
                os.close(self.fd)
            except OSError:
                pass


@dataclass
class _Job:
    index: int
    parts: list[list[str]]  # argv of each part of the chain
    texts: list[str]
    step: int = 0
    t0: float = 0.0
    proc: _Proc | None = None
    buf: bytes = b""
    eof: bool = False
    seconds: float = 0.0
    cpu: float = 0.0


def _parse(commands: Sequence[str]) -> list[_Job]:
    jobs = []
    for i, c in enumerate(commands):
        argv = shlex.split(c)
        parts: list[list[str]] = [[]]
        for tok in argv:
            if tok == CHAIN:
                parts.append([])
            else:
                parts[-1].append(tok)
        if not all(parts):
            raise ParallelError(f"s2r parallel: empty command {c!r}")
        jobs.append(_Job(i, parts, [shlex.join(p) for p in parts]))
    return jobs


class _Runner:
    """The scheduler and output relay of `run` (one thread: selectors, no relay threads, so forking is safe)."""

    def __init__(self, jobs: list[_Job], slots: int, out: IO[str], poll: float, fork: ForkServer | None) -> None:
        self.jobs, self.slots, self.out, self.poll = jobs, slots, out, poll
        self.env = thread_env(cores() // slots)
        use = fork is not None and hasattr(os, "fork") and any(_is_s2r(p) for j in jobs for p in j.parts)
        self.forker = fork if use else None
        self.sel = selectors.DefaultSelector()
        self.running: dict[int, _Job] = {}
        self.s2r_parts = self.forked_parts = 0  # `s2r ...` parts started / of them forked (reported at the end)

    def write(self, i: int, line: str) -> None:
        self.out.write(f"[{i}] {line}\n")
        self.out.flush()

    def start(self, job: _Job) -> None:
        argv = job.parts[job.step]
        self.write(job.index, f"$ {job.texts[job.step]}")
        forked = self.forker is not None and _is_s2r(argv) and single_threaded()
        self.s2r_parts += _is_s2r(argv)
        self.forked_parts += forked
        others = [j.proc.fd for j in self.running.values() if j.proc is not None and j is not job]
        try:
            job.proc = _Proc(argv, self.env, self.forker.entry if forked and self.forker else None, others)
        except OSError as e:
            raise ParallelError(f"s2r parallel: command [{job.index}] could not start: {job.texts[job.step]!r} "
                                f"({e})") from e
        job.buf, job.eof = b"", False
        self.sel.register(job.proc.fd, selectors.EVENT_READ, job)
        self.running[job.index] = job

    def relay(self, job: _Job, final: bool = False) -> None:
        """Copy a child's complete lines with its prefix; of a progress bar's \\r updates keep the last."""
        assert job.proc is not None
        while not job.eof:
            try:
                chunk = os.read(job.proc.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                job.eof = True
                self.sel.unregister(job.proc.fd)
            job.buf += chunk
        *lines, job.buf = job.buf.split(b"\n")
        if final and job.buf:
            lines, job.buf = [*lines, job.buf], b""
        for raw in lines:
            self.write(job.index, raw.decode(errors="replace").split("\r")[-1])

    def reap(self, job: _Job) -> None:
        """A finished part: relay the rest of its output, then start the chain's next part or end the job."""
        assert job.proc is not None
        rc = job.proc.poll()
        self.relay(job, final=True)
        if not job.eof:
            self.sel.unregister(job.proc.fd)
        job.proc.close()
        job.cpu += job.proc.cpu
        del self.running[job.index]
        if rc != 0:
            job.seconds = time.monotonic() - job.t0
            self.write(job.index, f"exit {rc} after {job.seconds:.1f} s (CPU {job.cpu:.1f} s)")
            raise ParallelError(f"s2r parallel: command [{job.index}] failed with exit status {rc}: "
                                f"{job.texts[job.step]}")
        job.step += 1
        if job.step < len(job.parts):
            self.write(job.index, f"part {job.step}/{len(job.parts)} done (CPU {job.proc.cpu:.1f} s)")
            self.start(job)
            return
        job.seconds = time.monotonic() - job.t0
        self.write(job.index, f"exit 0 after {job.seconds:.1f} s (CPU {job.cpu:.1f} s)")

    def loop(self) -> None:
        pending = list(self.jobs)
        if self.forker is not None:
            t0 = time.process_time()
            self.forker.preload()
            self.out.write(f"[s2r parallel] imports for the forked commands: {time.process_time() - t0:.1f} s CPU\n")
        while pending or self.running:
            while pending and len(self.running) < self.slots:
                job = pending.pop(0)
                job.t0 = time.monotonic()
                self.start(job)
            for key, _ in self.sel.select(timeout=self.poll):
                self.relay(key.data)
            for job in list(self.running.values()):
                if job.proc is not None and job.proc.poll() is not None:
                    self.reap(job)
        if self.forker is not None:
            note = "" if self.forked_parts == self.s2r_parts else (
                " (the others started as fresh processes, each paying the imports again: another thread of this "
                "process was running when they started)")
            self.out.write(f"[s2r parallel] {self.forked_parts} of {self.s2r_parts} s2r commands forked after the "
                           f"imports{note}\n")

    def stop_all(self, grace: float) -> None:
        procs = [j.proc for j in self.running.values() if j.proc is not None]
        for p in procs:
            p.signal(signal.SIGTERM)
        end = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.05)
        for p in procs:
            p.signal(signal.SIGKILL)
            while p.poll() is None:
                time.sleep(0.01)
            p.close()


@dataclass(frozen=True)
class ForkServer:
    """How `run` forks `s2r ...` commands: `preload()` once in this process, then `entry(argv)` in each child."""

    preload: Callable[[], None]
    entry: Entry


def run(commands: Sequence[str], jobs: int = 0, out: IO[str] | None = None, poll: float = 0.2,
        grace: float = 60.0, fork: ForkServer | None = None) -> list[float]:
    """Run `commands` (shell-style command lines or `&&` chains, no shell) at most `jobs` at a time; seconds of
    each.

    jobs 0 = min(len(commands), cores()). `fork`: run `s2r ...` commands in children of this process (see
    ForkServer); None: every command is a subprocess. Raises ParallelError naming the first failed command, after
    stopping the others (SIGTERM, then SIGKILL after `grace` seconds).
    """
    if not commands:
        raise ParallelError("s2r parallel: no commands given")
    parsed = _parse(commands)
    slots = jobs or min(len(parsed), cores())
    if slots < 1:
        raise ParallelError(f"s2r parallel: --jobs must be >= 1, got {jobs}")
    runner = _Runner(parsed, slots, out or sys.stdout, poll, fork)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        raise ParallelError(f"s2r parallel: stopped by signal {signum}")

    import threading

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    try:
        if runner.forker is not None:  # the imports of preload() then make no thread pool wider than a share
            os.environ.update({k: runner.env[k] for k in saved})
        runner.loop()
    except BaseException:
        runner.stop_all(grace)
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return [j.seconds for j in parsed]
