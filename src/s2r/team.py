"""Beyond one machine: `s2r team up/down/status` and `s2r tune --workers/--gpus` (one worker process per slot).

`s2r team up` starts, on the machine that serves the team:

- PostgreSQL (Debian package `postgresql`, installed with apt-get when missing, as tests/services/postgres.sh
  does), a cluster in DIR/pg with two databases: `s2r_mlflow` (MLflow's backend store) and `s2r_optuna`
  (the Optuna RDB storage every worker shares). Role `s2r`, password generated once into DIR/password (mode
  600); TCP clients authenticate with scram-sha-256; the superuser only over a unix socket inside DIR/pg.
- An MLflow tracking server (`mlflow server`) on that database with `--serve-artifacts`: artifacts are
  proxied by the server to DIR/artifacts (or to the S3-compatible / other URL given with --artifacts), so
  workers need nothing but the server's http URL.

Both listen on 127.0.0.1 unless `--host` names another address. It prints the two URLs each worker needs and
writes them to DIR/env (mode 600, `source`-able). `s2r team down` stops both; `s2r team status` reports.

Workers: `s2r tune --study S --storage URL --workers N` (CPU: N processes, cores // N threads each) or
`--gpus 0,1,2,3 [--workers-per-gpu K]` (K processes per GPU, each with CUDA_VISIBLE_DEVICES set to its GPU and
cores // (K * n_gpus) threads). Each worker is a plain `s2r tune ... --resume` process; the first one creates
the study and its MLflow parent run before the others start, so all trials nest under one parent.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

ROLE = "s2r"
DB_MLFLOW = "s2r_mlflow"
DB_OPTUNA = "s2r_optuna"
LOOPBACK = "127.0.0.1"


class TeamError(RuntimeError):
    """A team service could not be started/stopped; the message says which and where its log is."""


def default_dir() -> Path:
    """$S2R_TEAM_DIR, else /var/tmp/s2r-team-<user> (every parent traversable by the `postgres` user)."""
    env = os.environ.get("S2R_TEAM_DIR")
    if env:
        return Path(env)
    import getpass

    return Path("/var/tmp") / f"s2r-team-{getpass.getuser()}"


@dataclass
class TeamState:
    """What `team up` started; kept in DIR/team.json (mode 600: the URLs hold the password)."""

    dir: str
    host: str
    advertised_host: str
    pg_port: int
    mlflow_port: int
    mlflow_pid: int
    artifacts: str
    mlflow_tracking_uri: str
    optuna_storage: str

    @staticmethod
    def load(team_dir: Path) -> TeamState | None:
        p = team_dir / "team.json"
        if not p.is_file():
            return None
        return TeamState(**json.loads(p.read_text()))


# --- PostgreSQL -----------------------------------------------------------------------------------------------

def pg_bindir() -> Path | None:
    """Newest /usr/lib/postgresql/*/bin with pg_ctl, initdb and postgres, else the one holding pg_ctl on PATH."""
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _version_key(p.parent.name),
                   reverse=True)
    for d in cands:
        if all((d / x).exists() for x in ("pg_ctl", "initdb", "postgres")):
            return d
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    return None


def _version_key(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(".") if x.isdigit())


def install_postgres() -> Path:
    """apt-get install postgresql (no 'main' cluster on 5432), as tests/services/postgres.sh does."""
    sudo: list[str] = []
    if os.geteuid() != 0:
        if not (shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0):
            raise TeamError("PostgreSQL is not installed and installing it needs root: apt-get install postgresql")
        sudo = ["sudo", "-n"]
    if not shutil.which("apt-get"):
        raise TeamError("PostgreSQL is not installed and apt-get is not available: install PostgreSQL >= 13")
    conf = Path("/etc/postgresql-common/createcluster.d/s2r-no-main-cluster.conf")
    if not Path("/etc/postgresql-common/createcluster.conf").exists():
        subprocess.run([*sudo, "mkdir", "-p", str(conf.parent)], check=True)
        subprocess.run([*sudo, "tee", str(conf)], input=b"create_main_cluster = false  # s2r team\n",
                       stdout=subprocess.DEVNULL, check=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    cmd = [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:  # stale or missing package lists: refresh once and retry
        subprocess.run([*sudo, "apt-get", "update", "-q"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise TeamError(f"apt-get install postgresql failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    found = pg_bindir()
    if found is None:
        raise TeamError("PostgreSQL was installed but no pg_ctl/initdb was found under /usr/lib/postgresql")
    return found


def _as_owner(cmd: list[str]) -> list[str]:
    """The server may not run as root: as root, commands run as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, log: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = f"\n--- last lines of {log}:\n{_tail(log)}" if log else ""
        raise TeamError(f"{what} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}{tail}")
    return r


def _tail(path: Path | None, n: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:]) if path else ""
    except OSError as e:
        return f"<{e}>"


def _password(team_dir: Path) -> str:
    """The role's password: generated once, kept in DIR/password with mode 600."""
    p = team_dir / "password"
    if not p.exists():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    os.chmod(p, 0o600)
    return p.read_text().strip()


def _pg_start(team_dir: Path, host: str, port: int, password: str) -> None:
    bindir = pg_bindir() or install_postgres()
    pg = team_dir / "pg"
    data, log = pg / "data", pg / "server.log"
    pg.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(pg, "postgres", "postgres")
        if subprocess.run(_as_owner(["test", "-w", str(pg), "-a", "-x", str(pg)])).returncode != 0:
            raise TeamError(f"user postgres cannot reach {pg}: as root, use a --dir whose parents every user "
                            "may traverse (e.g. under /var/tmp or /srv)")
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        _run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                        "--auth-local=trust", "--auth-host=scram-sha-256"]), f"initdb in {data}")
    conf = data / "postgresql.auto.conf"  # ALTER SYSTEM's file: ours to rewrite; initdb's file stays untouched
    conf_text = (f"# written by s2r team up\nlisten_addresses = '{host}'\nport = {port}\n"
                 f"unix_socket_directories = '{pg}'\nmax_connections = 200\n")
    _write_as_owner(conf, conf_text)
    hba = data / "pg_hba.conf"
    hba_text = hba.read_text() if os.access(hba, os.R_OK) else ""
    marker = "# s2r team: remote workers\n"
    if host not in (LOOPBACK, "localhost", "::1") and marker not in hba_text:
        _write_as_owner(hba, hba_text + marker + f"host {DB_MLFLOW},{DB_OPTUNA} {ROLE} 0.0.0.0/0 scram-sha-256\n"
                        f"host {DB_MLFLOW},{DB_OPTUNA} {ROLE} ::/0 scram-sha-256\n")
    status = subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "status"]), capture_output=True)
    if status.returncode != 0:
        _run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start"]),
             f"starting PostgreSQL on {host}:{port} (port busy?)", log)
    deadline = time.monotonic() + 60
    while not _pg_ready(bindir, pg, port):
        if time.monotonic() > deadline:
            raise TeamError(f"PostgreSQL does not accept connections in {pg}\n{_tail(log)}")
        time.sleep(0.3)

    def sql(q: str, db: str = "postgres") -> str:
        r = _run(_as_owner([str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(pg), "-p", str(port),
                            "-U", "postgres", "-d", db, "-tAc", q]), f"psql: {q[:40]}...", log)
        out: str = r.stdout.strip()
        return out

    quoted = password.replace("'", "''")
    verb = "ALTER" if sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'") == "1" else "CREATE"
    sql(f"{verb} ROLE {ROLE} LOGIN PASSWORD '{quoted}'")
    for db in (DB_MLFLOW, DB_OPTUNA):
        if sql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
            sql(f"CREATE DATABASE {db} OWNER {ROLE}")


def _pg_ready(bindir: Path, socket_dir: Path, port: int) -> bool:
    cmd = [str(bindir / "pg_isready"), "-q", "-h", str(socket_dir), "-p", str(port), "-d", "postgres"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _write_as_owner(path: Path, text: str) -> None:
    if os.geteuid() == 0:
        subprocess.run(_as_owner(["tee", str(path)]), input=text.encode(), stdout=subprocess.DEVNULL, check=True)
    else:
        path.write_text(text)


def _pg_stop(team_dir: Path) -> None:
    data = team_dir / "pg" / "data"
    bindir = pg_bindir()
    if bindir is None or not (data / "postmaster.pid").exists():
        return
    if subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "status"]),
                      capture_output=True).returncode == 0:
        _run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]),
             f"stopping PostgreSQL in {data}")


# --- MLflow tracking server -----------------------------------------------------------------------------------

def _pg_url(password: str, host: str, port: int, db: str) -> str:
    from urllib.parse import quote

    return f"postgresql+psycopg2://{ROLE}:{quote(password, safe='')}@{host}:{port}/{db}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _local_uri(host: str, port: int) -> str:
    """The server's URL from this machine (a wildcard bind is reached over loopback)."""
    return f"http://{_url_host(LOOPBACK if host in ('0.0.0.0', '::') else host)}:{port}"


def _healthy(uri: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            out: bool = r.status == 200
            return out
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _mlflow_start(team_dir: Path, host: str, port: int, backend: str, artifacts: str, workers: int,
                  allowed_hosts: str | None) -> int:
    log = team_dir / "mlflow.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--serve-artifacts",
           "--artifacts-destination", artifacts, "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    # the backend URL (with the password) goes by environment, not argv: argv is visible to every user in `ps`
    env = os.environ | {"MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=team_dir, start_new_session=True)
    uri = _local_uri(host, port)
    deadline = time.monotonic() + 180  # first start creates MLflow's tables in PostgreSQL
    while not _healthy(uri):
        if proc.poll() is not None:
            raise TeamError(f"the MLflow server exited with code {proc.returncode} (port {port} busy?)\n"
                            f"--- last lines of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            raise TeamError(f"the MLflow server did not answer {uri}/health within 180 s\n{_tail(log)}")
        time.sleep(0.5)
    return proc.pid


def _kill_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group (server + its uvicorn workers), SIGKILL what is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:  # reap it when it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _group_alive(pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# --- up / down / status ---------------------------------------------------------------------------------------

def up(team_dir: Path, *, host: str = LOOPBACK, pg_port: int = 54330, mlflow_port: int = 5000,
       artifacts: str | None = None, advertise: str | None = None, mlflow_workers: int = 2,
       allowed_hosts: str | None = None) -> TeamState:
    """Start PostgreSQL and the MLflow server (idempotent: a running setup is reused); write DIR/team.json."""
    team_dir = team_dir.resolve()
    team_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(team_dir, 0o711)  # postgres must traverse it to reach DIR/pg; nobody may list it
    old = TeamState.load(team_dir)
    if old and _alive(old.mlflow_pid) and _healthy(_local_uri(old.host, old.mlflow_port)):
        return old  # already up: the same URLs
    password = _password(team_dir)
    _pg_start(team_dir, host, pg_port, password)
    art = artifacts or str(team_dir / "artifacts")
    if "://" not in art:
        Path(art).mkdir(parents=True, exist_ok=True)
    pg_host = LOOPBACK if host in ("0.0.0.0", "::", LOOPBACK) else host
    pid = _mlflow_start(team_dir, host, mlflow_port, _pg_url(password, pg_host, pg_port, DB_MLFLOW), art,
                        mlflow_workers, allowed_hosts)
    adv = advertise or (host if host not in ("0.0.0.0", "::") else socket.getfqdn())
    state = TeamState(dir=str(team_dir), host=host, advertised_host=adv, pg_port=pg_port, mlflow_port=mlflow_port,
                      mlflow_pid=pid, artifacts=art, mlflow_tracking_uri=f"http://{_url_host(adv)}:{mlflow_port}",
                      optuna_storage=_pg_url(password, _url_host(adv), pg_port, DB_OPTUNA))
    _write_private(team_dir / "team.json", json.dumps(asdict(state), indent=2) + "\n")
    _write_private(team_dir / "env", f"export MLFLOW_TRACKING_URI='{state.mlflow_tracking_uri}'\n"
                                     f"export S2R_OPTUNA_STORAGE='{state.optuna_storage}'\n")
    return state


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def down(team_dir: Path) -> list[str]:
    """Stop the MLflow server and PostgreSQL of DIR; return what was stopped. Data stays (the next up reuses it)."""
    team_dir = team_dir.resolve()
    stopped = []
    state = TeamState.load(team_dir)
    if state and _alive(state.mlflow_pid):
        _kill_group(state.mlflow_pid)
        stopped.append(f"MLflow server (pid {state.mlflow_pid}, port {state.mlflow_port})")
    if (team_dir / "pg" / "data" / "postmaster.pid").exists():
        _pg_stop(team_dir)
        stopped.append(f"PostgreSQL ({team_dir / 'pg' / 'data'})")
    return stopped


def status(team_dir: Path) -> dict[str, Any]:
    team_dir = team_dir.resolve()
    state = TeamState.load(team_dir)
    if state is None:
        return {"dir": str(team_dir), "up": False}
    local = _local_uri(state.host, state.mlflow_port)
    bindir = pg_bindir()
    pg_ok = bindir is not None and _pg_ready(bindir, team_dir / "pg", state.pg_port)
    ml_ok = _alive(state.mlflow_pid) and _healthy(local)
    return {"dir": str(team_dir), "up": pg_ok and ml_ok, "postgresql": pg_ok, "mlflow": ml_ok,
            "listening": f"{state.host} (ports {state.pg_port}, {state.mlflow_port})",
            "MLFLOW_TRACKING_URI": state.mlflow_tracking_uri, "artifacts": state.artifacts}


def listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (from /proc/net/tcp{,6}; Linux)."""
    out = []
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            addr, p = f[1].split(":")
            if int(p, 16) == port and f[3] == "0A":  # 0A = LISTEN
                if width == 8:
                    out.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    out.append(socket.inet_ntop(socket.AF_INET6, raw))
    return out


# --- workers: `s2r tune --workers N | --gpus 0,1 [--workers-per-gpu K]` -----------------------------------------

LAUNCHER_OPTS = ("workers", "gpus", "workers_per_gpu")


def worker_options(f: Any) -> Any:
    """Add --workers/--gpus/--workers-per-gpu to `s2r tune`: with any of them, this process only launches workers."""

    @functools.wraps(f)
    def wrapper(*args: Any, workers: int | None, gpus: str | None, workers_per_gpu: int, **kwargs: Any) -> Any:
        if workers is None and gpus is None:
            return f(*args, **kwargs)
        ctx = click.get_current_context()
        plan = plan_workers(workers=workers, gpus=gpus, workers_per_gpu=workers_per_gpu)
        sys.exit(launch(ctx.command, dict(ctx.params), plan))

    opts = [
        click.option("--workers", type=click.IntRange(min=1),
                     help="Start this many worker processes of the study here (CPU: cores // N threads each)."),
        click.option("--gpus", metavar="0,1,..", help="One worker per listed GPU (CUDA_VISIBLE_DEVICES), "
                     "times --workers-per-gpu; 'all' = every GPU torch sees."),
        click.option("--workers-per-gpu", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Workers sharing each GPU of --gpus."),
    ]
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


@dataclass
class Slot:
    index: int
    gpu: str | None  # CUDA_VISIBLE_DEVICES value, None = leave the environment's
    threads: int


def plan_workers(*, workers: int | None, gpus: str | None, workers_per_gpu: int = 1,
                 cores: int | None = None) -> list[Slot]:
    """Worker slots: GPU ids round-robin (each GPU gets workers_per_gpu), threads = cores // number of workers."""
    cores = cores or len(os.sched_getaffinity(0))
    if gpus is not None:
        if gpus.strip() == "all":
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
            if not ids:
                raise click.UsageError("--gpus all: torch sees no CUDA device here")
        else:
            ids = [g.strip() for g in gpus.split(",") if g.strip()]
            if not ids or len(set(ids)) != len(ids):
                raise click.UsageError(f"--gpus {gpus!r}: expected distinct GPU ids such as 0,1,2,3")
        n = len(ids) * workers_per_gpu
        if workers is not None and workers != n:
            raise click.UsageError(f"--workers {workers} disagrees with --gpus {gpus} x --workers-per-gpu "
                                   f"{workers_per_gpu} = {n} workers; give one or the other")
        gpu_of: list[str | None] = [ids[i % len(ids)] for i in range(n)]
    else:
        assert workers is not None
        n, gpu_of = workers, [None] * workers
    threads = max(1, cores // n)
    return [Slot(i, gpu_of[i], threads) for i in range(n)]


def cli_args(command: click.Command, params: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives `command` these parameter values (options left at their default are omitted)."""
    args: list[str] = []
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in skip or p.name not in params:
            continue
        v = params[p.name]
        if v is None or (v == p.default and not p.required):
            continue
        if p.is_flag:
            if v:
                args.append(p.opts[0])
            elif p.secondary_opts:
                args.append(p.secondary_opts[0])
        elif p.multiple:
            for x in v:
                args += [p.opts[0], str(x)]
        else:
            args += [p.opts[0], str(v)]
    return args


def worker_env(slot: Slot, base: dict[str, str] | None = None) -> dict[str, str]:
    from s2r.parallel import thread_env

    env = thread_env(slot.threads, base) | {"S2R_WORKER": str(slot.index)}
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return env


def _study_storage(params: dict[str, Any]) -> tuple[Any, str, Path]:
    from s2r import tune

    out_dir = Path(params.get("out_dir") or tune.TUNING_DIR / params["study"])
    opts = tune.TuneOptions(study=params["study"], data_dir=Path(params["data_dir"]),
                            storage=params.get("storage"), out_dir=out_dir)
    return tune.build_storage(opts, out_dir), params.get("study_name") or params["study"], out_dir


def _parent_ready(storage: Any, name: str) -> bool:
    import optuna

    try:
        return "mlflow_parent_run_id" in optuna.load_study(study_name=name, storage=storage).user_attrs
    except KeyError:
        return False


def launch(command: click.Command, params: dict[str, Any], plan: list[Slot], first_timeout: float = 600) -> int:
    """Run one `s2r tune` worker process per slot; return 0 when every worker succeeded.

    The launcher applies --restart itself (before any worker starts), starts worker 0, waits until the study
    and its MLflow parent run exist, then starts the others with --resume. Logs: OUT/workers/worker-<i>.log.
    Ctrl-C / SIGTERM is passed on to the workers (their runs end KILLED).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage, name, out_dir = _study_storage(params)
    if params.get("restart"):
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
    base = [sys.executable, "-m", "s2r.cli", "tune", *cli_args(command, params, skip=(*LAUNCHER_OPTS, "restart"))]
    workers = _Workers(base, out_dir / "workers")
    old = signal.signal(signal.SIGTERM, workers.forward)
    try:
        first = workers.start(plan[0])
        if len(plan) > 1:
            failed = _wait_for_first(first, workers, storage, name, first_timeout)
            if failed:
                return failed
            for slot in plan[1:]:
                workers.start(slot)
        codes = workers.wait()
    finally:
        signal.signal(signal.SIGTERM, old)
    bad = [(s.index, c, log) for (s, _, log), c in zip(workers.procs, codes) if c != 0]
    for i, c, log in bad:
        click.secho(f"worker {i} exited with code {c}; last lines of {log}:\n{_tail(log, 15)}", fg="red", err=True)
    metrics = out_dir / "metrics.json"
    if metrics.is_file():
        click.echo(" ".join(f"{k}={v}" for k, v in json.loads(metrics.read_text()).items()))
    return 1 if bad else 0


class _Workers:
    """The launched worker processes (slot, process, log file); SIGTERM is forwarded to the running ones."""

    def __init__(self, base: list[str], logs: Path) -> None:
        self.base, self.logs = base, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[Slot, subprocess.Popen[bytes], Path]] = []

    def start(self, slot: Slot) -> subprocess.Popen[bytes]:
        """Worker `slot.index` (every one but the first joins with --resume), its output in its log file."""
        cmd = self.base if slot.index == 0 or "--resume" in self.base else [*self.base, "--resume"]
        log = self.logs / f"worker-{slot.index}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, env=worker_env(slot), stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        gpu = f"GPU {slot.gpu}" if slot.gpu is not None else "CPU"
        click.echo(f"worker {slot.index}: pid {p.pid}, {gpu}, {slot.threads} thread(s), log {log}")
        self.procs.append((slot, p, log))
        return p

    def forward(self, signum: int, frame: Any) -> None:
        for _, p, _ in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def wait(self) -> list[int]:
        """Every worker's exit code (Ctrl-C is passed on to them first)."""
        try:
            return [p.wait() for _, p, _ in self.procs]
        except KeyboardInterrupt:
            self.forward(signal.SIGTERM, None)
            return [p.wait() for _, p, _ in self.procs]


def _wait_for_first(first: subprocess.Popen[bytes], workers: _Workers, storage: Any, name: str, timeout: float
                    ) -> int:
    """Wait until worker 0 created the study's MLflow parent run; its exit code if it failed first, else 0."""
    deadline = time.monotonic() + timeout
    while not _parent_ready(storage, name):
        if first.poll() is not None:
            if first.returncode != 0:
                click.secho(f"worker 0 failed (exit {first.returncode}):\n{_tail(workers.procs[0][2])}", fg="red",
                            err=True)
                return first.returncode or 1
            return 0  # it finished the whole study already
        if time.monotonic() > deadline:
            click.secho(f"warning: study {name!r} has no MLflow parent run after {timeout:.0f} s; "
                        "starting the other workers anyway", fg="yellow", err=True)
            return 0
        time.sleep(0.5)
    return 0


# --- `s2r team` commands ----------------------------------------------------------------------------------------

DIR_OPT = click.option("--dir", "team_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                       help="Folder of the team services' data, logs, password [$S2R_TEAM_DIR or "
                            "/var/tmp/s2r-team-USER].")


@click.group("team")
def team_cli() -> None:
    """A shared MLflow tracking server + PostgreSQL (Optuna storage) for workers on several machines."""


@team_cli.command("up")
@DIR_OPT
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Address both services bind to; another than 127.0.0.1 only when workers on other machines "
                   "must reach them (e.g. the machine's LAN address, or 0.0.0.0).")
@click.option("--advertise", help="Host name workers use in the printed URLs [--host, or this machine's FQDN].")
@click.option("--pg-port", default=54330, show_default=True, help="PostgreSQL TCP port.")
@click.option("--mlflow-port", default=5000, show_default=True, help="MLflow tracking server port.")
@click.option("--artifacts", help="Where the server stores artifacts: a folder [DIR/artifacts] or an "
                                  "S3-compatible URL (s3://bucket/path; set MLFLOW_S3_ENDPOINT_URL and AWS_* "
                                  "for the server).")
@click.option("--mlflow-workers", default=2, show_default=True, help="Request-handling processes of the server.")
@click.option("--allowed-hosts", help="Host headers the MLflow server accepts (mlflow server --allowed-hosts).")
def team_up(team_dir: Path | None, host: str, advertise: str | None, pg_port: int, mlflow_port: int,
            artifacts: str | None, mlflow_workers: int, allowed_hosts: str | None) -> None:
    """Start PostgreSQL + the MLflow server and print what every worker needs.

    Example: s2r team up && source /var/tmp/s2r-team-$USER/env
    """
    try:
        st = up(team_dir or default_dir(), host=host, pg_port=pg_port, mlflow_port=mlflow_port, artifacts=artifacts,
                advertise=advertise, mlflow_workers=mlflow_workers, allowed_hosts=allowed_hosts)
    except TeamError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"# team services in {st.dir}, listening on {st.host} (PostgreSQL :{st.pg_port}, "
               f"MLflow :{st.mlflow_port}); artifacts: {st.artifacts}")
    click.echo(f"# every worker: `source {st.dir}/env` (or copy these two lines), then "
               "s2r tune --study NAME --data DIR --storage \"$S2R_OPTUNA_STORAGE\" --resume")
    click.echo(f"MLFLOW_TRACKING_URI={st.mlflow_tracking_uri}")
    click.echo(f"S2R_OPTUNA_STORAGE={st.optuna_storage}")


@team_cli.command("down")
@DIR_OPT
def team_down(team_dir: Path | None) -> None:
    """Stop the MLflow server and PostgreSQL (their data stays in DIR for the next `up`)."""
    try:
        stopped = down(team_dir or default_dir())
    except TeamError as e:
        raise click.ClickException(str(e)) from None
    click.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


@team_cli.command("status")
@DIR_OPT
def team_status(team_dir: Path | None) -> None:
    """Whether the team services answer, and where."""
    st = status(team_dir or default_dir())
    for k, v in st.items():
        click.echo(f"{k}: {v}")
    if not st["up"]:
        sys.exit(1)
