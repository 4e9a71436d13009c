"""Wall time of one tiny study with 1 worker vs N workers (`s2r tune --workers`), against a `s2r team up` setup.

    PYTHONPATH=src python pipelines/team/measure_workers.py [--trials 12] [--workers 1 2] [--repeats 1]

Builds the test suite's tiny benchmark (tests/conftest.py) in a temporary folder, starts the team services on
free loopback ports, runs a grid study over `methods.mixing.lr` (TRIALS distinct points, so workers never
duplicate each other's trials) once per worker count, each worker with one torch thread, then stops the
services. Prints one JSON line per run and a summary. On a machine shared with other jobs the numbers are
indicative only: compare runs measured side by side in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60, help="steps per epoch of one trial (2 epochs)")
    args = ap.parse_args()

    import optuna

    from conftest import tiny_params_dict, tiny_samples, tiny_spec
    from s2r.data.benchmark import write_benchmark
    from s2r.data.prepared import prepare

    work = Path(tempfile.mkdtemp(prefix="s2r-measure-"))
    os.chmod(work, 0o711)  # as root, PostgreSQL's user must reach work/team/pg
    spec = tiny_spec()
    prepared = prepare(write_benchmark(work / "bench", spec, tiny_samples(spec), progress=False), work / "prepared",
                       progress=False)
    raw = tiny_params_dict()
    raw["train"]["threads"] = 1  # one torch thread per worker
    raw["methods"]["mixing"].update(epochs=2, steps_per_epoch=args.steps)
    raw["studies"] = {"measure": {
        "method": "mixing", "objectives": [{"metric": "val_accuracy", "direction": "maximize"}],
        "search_space": {"methods.mixing.lr": {"type": "float", "low": 0.01, "high": 0.01 * args.trials,
                                               "step": 0.01}},
        "sampler": "grid", "pruner": "none", "n_trials": args.trials, "seed": 0}}
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    env |= {"PYTHONPATH": str(REPO / "src"), "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "s2r.cli"]
    team = ["--dir", str(work / "team")]
    subprocess.run([*cli, "team", "up", *team, "--pg-port", str(free_port()), "--mlflow-port", str(free_port()),
                    "--mlflow-workers", "1"], env=env, capture_output=True, text=True, check=True)
    from s2r.team import read_env

    urls = read_env(work / "team" / "env")  # the URLs (and the storage password) as workers get them
    env |= urls
    results = []
    try:
        for rep in range(args.repeats):
            for n in args.workers if rep % 2 == 0 else reversed(args.workers):
                name = f"measure-w{n}-{uuid.uuid4().hex[:8]}"
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                r = subprocess.run([*cli, "tune", "--study", "measure", "--data", str(prepared),
                                    "--study-name", name, "--workers", str(n)],
                                   cwd=work, env=env, capture_output=True, text=True)
                sec = time.perf_counter() - t0
                if r.returncode != 0:
                    logs = "".join(p.read_text()[-3000:] for p in (work / "data/tuning/measure/workers").glob("*"))
                    sys.exit(f"s2r tune --workers {n} failed:\n{r.stdout}\n{r.stderr}\n{logs}")
                trials = optuna.load_study(study_name=name, storage=urls["S2R_OPTUNA_STORAGE"]).get_trials()
                done = [t for t in trials if t.datetime_complete is not None]
                # the trial phase: first trial's start to last trial's end (no process start-up, no final plots)
                span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
                res = {"workers": n, "trials": len(done), "seconds": round(sec, 1),
                       "trial_phase_seconds": round(span.total_seconds(), 1), "repeat": rep,
                       "load_before": round(load, 1)}
                print(json.dumps(res), flush=True)
                results.append(res)
    finally:
        subprocess.run([*cli, "team", "down", *team], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, object] = {"cores": len(os.sched_getaffinity(0))}
    for key in ("seconds", "trial_phase_seconds"):
        best = {n: min(r[key] for r in results if r["workers"] == n) for n in args.workers}
        summary[f"best_{key}"] = best
        summary[f"speedup_{key}"] = {n: round(best[args.workers[0]] / s, 2) for n, s in best.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
