"""`s2r parallel`: commands side by side with the cores split, the first failure stops the rest."""

from __future__ import annotations

import io
import shlex
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from s2r import parallel
from s2r.cli import main


def py(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


def test_commands_run_side_by_side_with_the_threads_split(tmp_path: Path) -> None:
    """Each command waits for the other's file: they can only both finish when they run at the same time."""
    wait_for = ("import os, pathlib, sys, time\n"
                "d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).write_text(os.environ['OMP_NUM_THREADS'])\n"
                "end = time.time() + 60\n"
                "while not (d / sys.argv[3]).exists():\n"
                "    assert time.time() < end, 'the other command never ran'\n"
                "    time.sleep(0.05)\n"
                "print('progress 50%\\rprogress 100%')\n")
    cmds = [shlex.join([sys.executable, "-c", wait_for, str(tmp_path), a, b]) for a, b in (("a", "b"), ("b", "a"))]
    out = io.StringIO()
    seconds = parallel.run(cmds, jobs=2, out=out)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    threads = str(max(1, parallel.cores() // 2))
    assert (tmp_path / "a").read_text() == threads and (tmp_path / "b").read_text() == threads
    text = out.getvalue()
    progress = sorted(line for line in text.splitlines() if " progress" in line and "$" not in line)
    assert progress == ["[0] progress 100%", "[1] progress 100%"]  # of a bar's \r updates, the last
    assert "[0] exit 0" in text and "[1] exit 0" in text


def test_jobs_bound_how_many_run_at_once(tmp_path: Path) -> None:
    """jobs=1: commands run one after the other, in the order given, each with every core's threads."""
    log = tmp_path / "log"
    step = ("import os, sys, time; f = open(sys.argv[1], 'a'); f.write(sys.argv[2] + ' start\\n'); f.flush(); "
            "time.sleep(0.2); f.write(sys.argv[2] + ' end ' + os.environ['OMP_NUM_THREADS'] + '\\n')")
    cmds = [shlex.join([sys.executable, "-c", step, str(log), n]) for n in ("x", "y", "z")]
    parallel.run(cmds, jobs=1, out=io.StringIO())
    t = str(parallel.cores())
    assert log.read_text().split("\n")[:-1] == ["x start", f"x end {t}", "y start", f"y end {t}", "z start",
                                                  f"z end {t}"]


def test_the_first_failure_stops_the_others_and_is_named(tmp_path: Path) -> None:
    survivor = tmp_path / "finished"
    slow = shlex.join([sys.executable, "-c", f"import time; time.sleep(30); open({str(survivor)!r}, 'w')"])
    failing = py("import time, sys; time.sleep(0.3); sys.exit(3)")
    t0 = time.monotonic()
    with pytest.raises(parallel.ParallelError, match=r"command \[1\] failed with exit status 3: .*sys.exit\(3\)"):
        parallel.run([slow, failing, py("print('never started')")], jobs=2, out=io.StringIO())
    assert time.monotonic() - t0 < 20  # the slow one was stopped, not waited for
    assert not survivor.exists()


def test_cli_reports_a_missing_program_by_name() -> None:
    res = CliRunner().invoke(main, ["parallel", "no-such-program-s2r --flag", py("print(1)")])
    assert res.exit_code == 1
    assert "command [0] could not start: 'no-such-program-s2r --flag'" in res.output


def test_a_chain_runs_its_parts_in_order_in_one_slot_and_stops_at_a_failure(tmp_path: Path) -> None:
    log = tmp_path / "log"
    step = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); sys.exit(int(sys.argv[3]))"
    part = lambda name, rc=0: shlex.join([sys.executable, "-c", step, str(log), name, str(rc)])  # noqa: E731
    out = io.StringIO()
    parallel.run([f"{part('a1')} && {part('a2')}", part("b")], jobs=1, out=out)
    assert log.read_text().split() == ["a1", "a2", "b"]
    assert "[0] part 1/2 done (CPU" in out.getvalue() and "[0] exit 0 after" in out.getvalue()
    log.unlink()
    with pytest.raises(parallel.ParallelError, match=r"command \[0\] failed with exit status 4: .* a2 4"):
        parallel.run([f"{part('a1')} && {part('a2', 4)} && {part('a3')}"], jobs=1, out=io.StringIO())
    assert log.read_text().split() == ["a1", "a2"]  # a3 never ran
    with pytest.raises(parallel.ParallelError, match="empty command"):
        parallel.run([f"{part('a1')} &&"], out=io.StringIO())


FORK_SCRIPT = """
import io, os, sys
from pathlib import Path
from s2r import parallel

tmp = Path(sys.argv[1])

def entry(argv):
    Path(argv[1]).write_text(f"{os.getppid()} {os.environ['OMP_NUM_THREADS']}")
    print("child says hi")
    raise SystemExit(0 if argv[2] == "ok" else 5)

server = parallel.ForkServer(lambda: (tmp / "calls").write_text("preloaded"), entry)
assert parallel.single_threaded()
out = io.StringIO()
parallel.run([f"s2r {tmp / 'a'} ok", f"s2r {tmp / 'b'} ok", sys.executable + " -c print(7)"], jobs=2, out=out,
             fork=server)
print(out.getvalue())
try:
    parallel.run([f"s2r {tmp / 'c'} fail"], out=io.StringIO(), fork=server)
except parallel.ParallelError as e:
    print("failed:", e)
print("parent", os.getpid())
"""


def test_s2r_commands_are_forked_after_one_preload(tmp_path: Path) -> None:
    """`s2r ...` commands run in children forked from the `s2r parallel` process after one `preload` (the entry
    records its parent pid and thread share); other programs run as subprocesses. In a fresh interpreter: a test
    process runs pytest-timeout's thread, and run() never forks a multi-threaded process (by design)."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=parallel.thread_env(1))
    assert res.returncode == 0, res.stderr
    parent = res.stdout.split("parent ")[-1].strip()
    threads = str(max(1, parallel.cores() // 2))
    assert (tmp_path / "calls").read_text() == "preloaded"
    assert (tmp_path / "a").read_text() == f"{parent} {threads}" == (tmp_path / "b").read_text()
    assert "[0] child says hi" in res.stdout and "[2] 7" in res.stdout
    assert "failed: s2r parallel: command [0] failed with exit status 5" in res.stdout


def test_the_cli_forks_its_s2r_commands_whatever_the_thread_environment() -> None:
    """Through the `s2r` CLI, as `dvc repro` runs it (no OMP_NUM_THREADS in the environment): every `s2r` command is
    forked. numpy's OpenBLAS starts a thread pool at import, sized by the environment; imported by the CLI before
    `s2r parallel` had set its share, that pool made the process multi-threaded and every command ran as a fresh
    process paying ~7 CPU-seconds of imports again."""
    import os
    import shutil
    import subprocess

    unset = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    exe = shutil.which("s2r", path=str(Path(sys.executable).parent)) or "s2r"
    res = subprocess.run([exe, "parallel", "s2r --version", "s2r --version"], capture_output=True, text=True,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stderr
    assert "[s2r parallel] 2 of 2 s2r commands forked after the imports\n" in res.stdout, res.stdout


PRELOAD_SCRIPT = """
import os, sys
from s2r.cli import preload_stages
preload_stages()
pid = os.fork()
if pid == 0:
    from mlflow.utils import requirements_utils
    ok = requirements_utils._MODULES_TO_PACKAGES is not None and "torch" in requirements_utils._MODULES_TO_PACKAGES
    ok = ok and "mlflow.store.tracking.sqlalchemy_store" in sys.modules
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_preload_gives_children_what_each_training_would_pay_for_again() -> None:
    """`preload_stages` leaves the forked children MLflow's SQL store imported and its installed-package map built
    (`log_model` scans every installed package's files for it: ~2.4 CPU-seconds per trained model otherwise)."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", PRELOAD_SCRIPT], capture_output=True, text=True, timeout=120,
                         env=parallel.thread_env(1))
    assert res.returncode == 0, res.stderr
    assert "child 0" in res.stdout, res.stdout


@pytest.mark.slow  # two fresh interpreters importing torch + MLflow: ~25 CPU-seconds
def test_a_forked_training_gives_the_losses_of_a_fresh_process(tiny_prepared: Path, tiny_params_file: Path,
                                                               tmp_path: Path) -> None:
    """The fork server changes where imports happen, not the numerics: `s2r parallel` (forked) and a plain
    `s2r train` process write bit-identical final losses."""
    import json
    import subprocess

    def cmd(name: str) -> str:
        return (f"s2r train mixing --data {tiny_prepared} --out {tmp_path / name} --checkpoints {tmp_path / 'c' / name}"
                f" --metrics {tmp_path / name}.json --params {tiny_params_file} --set tracking.log_model=false")

    env = parallel.thread_env(1) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    s2r = str(Path(sys.executable).with_name("s2r"))
    forked = subprocess.run([s2r, "parallel", "--jobs", "1", cmd("forked")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert forked.returncode == 0, forked.stdout + forked.stderr
    assert "imports for the forked commands" in forked.stdout  # it did fork
    plain = subprocess.run(shlex.split(cmd("plain").replace("s2r ", s2r + " ", 1)), env=env, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("forked", "plain"))
    assert a["train_loss"] == b["train_loss"] and a["val_accuracy"] == b["val_accuracy"]
