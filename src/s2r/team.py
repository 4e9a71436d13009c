"""Beyond one machine: `s2r team up/down/status/user` and `s2r tune --workers/--gpus` (one worker process per slot).

`s2r team up` starts, on the machine that serves the team:

- PostgreSQL (Debian package `postgresql`, installed with apt-get when missing, as tests/services/postgres.sh
  does), a cluster in DIR/pg with two databases: `s2r_mlflow` (MLflow's backend store, role `s2r_tracking`, over
  the cluster's unix socket only) and `s2r_optuna` (the Optuna RDB storage every worker shares, role `s2r`).
- An MLflow tracking server (`mlflow server`) on that database with `--serve-artifacts`: artifacts are proxied
  by the server to DIR/artifacts (or to the S3-compatible / other URL given with --artifacts), so workers need
  nothing but the server's URL. Its allowed Host headers and CORS origins are the addresses `team up` prints.

Both listen on 127.0.0.1 unless `--host` names another address. On the loopback both are open to every local
user. Off the loopback (s2r.team_security, threat model in docs/security.md) MLflow requires a login (basic-auth)
and both speak TLS only. Every credential is generated once into DIR/secrets (mode 600); workers get theirs in
DIR/env (mode 600, `source`-able): nothing secret is printed or put on a command line.

Workers: `s2r tune --study S --workers N` (CPU: N processes, cores // N threads each) or
`--gpus 0,1,2,3 [--workers-per-gpu K]` (K processes per GPU, each with CUDA_VISIBLE_DEVICES set to its GPU and
cores // (K * n_gpus) threads), the storage URL from $S2R_OPTUNA_STORAGE. Each worker is a plain
`s2r tune ... --resume` process; the first one creates the study and its MLflow parent run before the others
start, so all trials nest under one parent.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from s2r import team_security as sec

ROLE = "s2r"  # the workers' PostgreSQL role: the Optuna database only
ROLE_TRACKING = "s2r_tracking"  # the MLflow server's role: its database only, over the unix socket
DB_MLFLOW = "s2r_mlflow"
DB_OPTUNA = "s2r_optuna"
LOOPBACK = "127.0.0.1"
PG_SSL = "sslmode=require&channel_binding=require"  # TLS, and SCRAM bound to it: a man in the middle cannot log in


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
    """What `team up` started; kept in DIR/team.json (no secret in it: those live in DIR/secrets and DIR/env)."""

    dir: str
    host: str
    advertised_host: str
    pg_port: int
    mlflow_port: int
    mlflow_pid: int
    artifacts: str
    mlflow_tracking_uri: str
    optuna_storage: str  # with the password masked
    auth: bool = False
    tls_cert: str = ""
    allowed_hosts: list[str] = field(default_factory=list)

    @staticmethod
    def load(team_dir: Path) -> TeamState | None:
        """The state `team up` left in DIR, or None."""
        p = team_dir / "team.json"
        if not p.is_file():
            return None
        return TeamState(**json.loads(p.read_text()))

    @property
    def cert(self) -> Path | None:
        return Path(self.tls_cert) if self.tls_cert else None


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


def _passwords(team_dir: Path) -> dict[str, str]:
    """The PostgreSQL roles' passwords (a team folder of an older s2r kept the workers' one in DIR/password)."""
    old, new = team_dir / "password", team_dir / "secrets" / "pg-optuna"
    if old.is_file() and not new.exists():
        sec.secret(team_dir, "pg-optuna")  # makes the folder
        sec.write_private(new, old.read_text())
        old.unlink()
    return {ROLE: sec.secret(team_dir, "pg-optuna"), ROLE_TRACKING: sec.secret(team_dir, "pg-tracking")}


@dataclass
class PgPlan:
    """Where and how the cluster of DIR/pg serves."""

    team_dir: Path
    host: str
    port: int
    tls: sec.Tls | None

    @property
    def folder(self) -> Path:
        return self.team_dir / "pg"

    @property
    def data(self) -> Path:
        return self.folder / "data"


def _pg_start(plan: PgPlan, passwords: dict[str, str]) -> None:
    """Create (once), configure and start the cluster; roles, passwords and databases as `team up` wants them."""
    bindir = pg_bindir() or install_postgres()
    _pg_init(plan, bindir)
    changed = _pg_configure(plan)
    log = plan.folder / "server.log"
    ctl = [str(bindir / "pg_ctl"), "-D", str(plan.data)]
    running = subprocess.run(_as_owner([*ctl, "status"]), capture_output=True).returncode == 0
    if running and changed:  # new address, port, TLS files or client rules
        _run(_as_owner([*ctl, "-m", "fast", "-w", "-t", "60", "stop"]), f"stopping PostgreSQL in {plan.data}", log)
        running = False
    if not running:
        _run(_as_owner([*ctl, "-l", str(log), "-w", "-t", "60", "start"]),
             f"starting PostgreSQL on {plan.host}:{plan.port} (port busy?)", log)
    deadline = time.monotonic() + 60
    while not _pg_ready(bindir, plan.folder, plan.port):
        if time.monotonic() > deadline:
            raise TeamError(f"PostgreSQL does not accept connections in {plan.folder}\n{_tail(log)}")
        time.sleep(0.3)
    _pg_roles(functools.partial(_psql, bindir, plan), passwords)


def _pg_init(plan: PgPlan, bindir: Path) -> None:
    """The cluster folder (owned by the server's user, mode 700) and, once, its data directory."""
    plan.folder.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(plan.folder, "postgres", "postgres")
        if subprocess.run(_as_owner(["test", "-w", str(plan.folder), "-a", "-x", str(plan.folder)])).returncode:
            raise TeamError(f"user postgres cannot reach {plan.folder}: as root, use a --dir whose parents every "
                            "user may traverse (e.g. under /var/tmp or /srv)")
    if not (plan.data / "PG_VERSION").exists():
        shutil.rmtree(plan.data, ignore_errors=True)
        _run(_as_owner([str(bindir / "initdb"), "-D", str(plan.data), "-U", "postgres", "-E", "UTF8", "--locale=C",
                        "--auth-local=trust", "--auth-host=scram-sha-256"]), f"initdb in {plan.data}")


def _pg_configure(plan: PgPlan) -> bool:
    """Write the server settings, client rules and TLS files; whether any of them changed."""
    tls_lines = "ssl = off\n"
    if plan.tls is not None:  # the server's copies: PostgreSQL wants its key owned by its user, mode 600
        crt, key = plan.folder / "server.crt", plan.folder / "server.key"
        _write_as_owner(crt, plan.tls.cert.read_text())
        _write_as_owner(key, plan.tls.key.read_text(), mode="600")
        fingerprint = sec.cert_info(plan.tls.cert)["sha256"]
        tls_lines = (f"ssl = on  # certificate {fingerprint}\nssl_cert_file = '{crt}'\nssl_key_file = '{key}'\n"
                     "ssl_min_protocol_version = 'TLSv1.2'\n")
    conf = (f"# written by s2r team up\nlisten_addresses = '{plan.host}'\nport = {plan.port}\n"
            f"unix_socket_directories = '{plan.folder}'\nmax_connections = 200\n"
            f"password_encryption = 'scram-sha-256'\n{tls_lines}")
    hba = sec.pg_hba(exposed=sec.is_exposed(plan.host), worker_role=ROLE, worker_db=DB_OPTUNA,
                     server_role=ROLE_TRACKING, server_db=DB_MLFLOW)
    changed = False
    # postgresql.auto.conf is ALTER SYSTEM's file: ours to rewrite; initdb's postgresql.conf stays untouched
    for path, text in ((plan.data / "postgresql.auto.conf", conf), (plan.data / "pg_hba.conf", hba)):
        if _read_as_owner(path) != text:
            _write_as_owner(path, text, mode="600")
            changed = True
    return changed


def _psql(bindir: Path, plan: PgPlan, query: str, db: str = "postgres") -> str:
    """One SQL statement as the superuser over the cluster's unix socket; the SQL goes by stdin, never argv."""
    r = _run(_as_owner([str(bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(plan.folder), "-p",
                        str(plan.port), "-U", "postgres", "-d", db, "-tA", "-f", "-"]),
             f"psql: {query.split(' PASSWORD ')[0][:60]}...", plan.folder / "server.log", input=query)
    return r.stdout.strip()


def _pg_roles(sql: Any, passwords: dict[str, str]) -> None:
    """Roles with SCRAM verifiers made here; each role owns and alone may connect to its database."""
    for role, password in passwords.items():
        verb = "ALTER" if sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'") == "1" else "CREATE"
        sql(f"{verb} ROLE {role} LOGIN PASSWORD '{sec.scram_verifier(password)}'")
    for db, owner in ((DB_MLFLOW, ROLE_TRACKING), (DB_OPTUNA, ROLE)):
        if sql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":
            sql(f"CREATE DATABASE {db} OWNER {owner}")
    # an older s2r let the workers' role own MLflow's database: hand it (and its tables) to the server's role
    sql(f"ALTER DATABASE {DB_MLFLOW} OWNER TO {ROLE_TRACKING}")
    sql(f"REASSIGN OWNED BY {ROLE} TO {ROLE_TRACKING}", db=DB_MLFLOW)
    sql(f"ALTER DATABASE {DB_OPTUNA} OWNER TO {ROLE}")  # REASSIGN OWNED also moved this shared object
    for db in (DB_MLFLOW, DB_OPTUNA):
        sql(f"REVOKE ALL ON DATABASE {db} FROM PUBLIC")


def _pg_ready(bindir: Path, socket_dir: Path, port: int) -> bool:
    cmd = [str(bindir / "pg_isready"), "-q", "-h", str(socket_dir), "-p", str(port), "-d", "postgres"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _write_as_owner(path: Path, text: str, mode: str = "644") -> None:
    """Write a file of the cluster as its owner (the `postgres` user when we are root)."""
    if os.geteuid() == 0:
        subprocess.run(_as_owner(["tee", str(path)]), input=text.encode(), stdout=subprocess.DEVNULL, check=True)
        subprocess.run(_as_owner(["chmod", mode, str(path)]), check=True)
    else:
        path.write_text(text)
        os.chmod(path, int(mode, 8))


def _read_as_owner(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _pg_stop(team_dir: Path) -> None:
    data = team_dir / "pg" / "data"
    bindir = pg_bindir()
    if bindir is None or not (data / "postmaster.pid").exists():
        return
    if subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "status"]),
                      capture_output=True).returncode == 0:
        _run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]),
             f"stopping PostgreSQL in {data}")


def pg_url(password: str, host: str, port: int, db: str = DB_OPTUNA, role: str = ROLE, tls: bool = False) -> str:
    """A SQLAlchemy URL of the cluster (with `sslmode=require&channel_binding=require` when TLS is on)."""
    from urllib.parse import quote

    return f"postgresql+psycopg2://{role}:{quote(password, safe='')}@{host}:{port}/{db}" + (f"?{PG_SSL}" if tls else "")


def _socket_url(plan: PgPlan, password: str) -> str:
    """The MLflow server's URL of its database: the cluster's unix socket (never a network)."""
    from urllib.parse import quote

    return (f"postgresql+psycopg2://{ROLE_TRACKING}:{quote(password, safe='')}@/{DB_MLFLOW}"
            f"?host={quote(str(plan.folder))}&port={plan.port}")


# --- MLflow tracking server -----------------------------------------------------------------------------------

def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class ServerPlan:
    """How the MLflow server of DIR serves: address, names workers use, login, TLS."""

    team_dir: Path
    host: str
    port: int
    advertise: str
    artifacts: str
    workers: int
    extra_hosts: list[str]
    tls: sec.Tls | None

    @property
    def auth(self) -> bool:
        return sec.is_exposed(self.host)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def names(self) -> list[str]:
        """Every name workers or this machine may reach the server by."""
        local = [LOOPBACK, "localhost"] if self.host in (*sec.WILDCARD_HOSTS, *sec.LOOPBACK_HOSTS) else []
        return list(dict.fromkeys(sec.cert_names(self.host, self.advertise, self.extra_hosts) + local))

    def allowed_hosts(self) -> list[str]:
        """Host headers the server accepts (MLflow's DNS-rebinding check): each name with and without the port."""
        return [h for n in self.names() for h in (f"{_url_host(n)}:{self.port}", _url_host(n))]

    def origins(self) -> list[str]:
        """The UI's own origins: the browser sends them on every write, MLflow's CORS check must know them."""
        return [f"{self.scheme}://{_url_host(n)}:{self.port}" for n in self.names()]

    def local_uri(self) -> str:
        """The server's URL from this machine (a wildcard bind is reached over loopback)."""
        return f"{self.scheme}://{_url_host(LOOPBACK if self.host in sec.WILDCARD_HOSTS else self.host)}:{self.port}"

    def command(self) -> list[str]:
        """`mlflow server ...`: no secret in it (those go by environment)."""
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", self.host, "--port", str(self.port),
               "--serve-artifacts", "--artifacts-destination", self.artifacts, "--workers", str(self.workers),
               "--allowed-hosts", ",".join(self.allowed_hosts()), "--cors-allowed-origins", ",".join(self.origins())]
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
        if self.tls:
            cmd += ["--uvicorn-opts", f"--ssl-keyfile {shlex.quote(str(self.tls.key))} "
                                      f"--ssl-certfile {shlex.quote(str(self.tls.cert))}"]
        return cmd


def _healthy(uri: str, cert: Path | None = None, timeout: float = 2.0) -> bool:
    """Whether the server answers /health (over TLS verified against `cert` when given)."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(cert)) if cert else None
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout, context=context) as r:
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


def _mlflow_start(plan: ServerPlan, backend: str) -> int:
    """Start the server in its own process group and wait for /health; its pid."""
    log = plan.team_dir / "mlflow.log"
    # the backend URL and the auth secrets go by environment, not argv: argv is visible to every user in `ps`
    env = os.environ | {"MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env |= sec.auth_server_env(plan.team_dir) if plan.auth else {}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "S2R_OPTUNA_STORAGE"):
        env.pop(k, None)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as f:
        proc = subprocess.Popen(plan.command(), env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=plan.team_dir, start_new_session=True)
    cert = plan.tls.cert if plan.tls else None
    deadline = time.monotonic() + 180  # first start creates MLflow's tables in PostgreSQL
    while not _healthy(plan.local_uri(), cert):
        if proc.poll() is not None:
            raise TeamError(f"the MLflow server exited with code {proc.returncode} (port {plan.port} busy?)\n"
                            f"--- last lines of {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            raise TeamError(f"the MLflow server did not answer {plan.local_uri()}/health within 180 s\n{_tail(log)}")
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


# --- up / down / status / user ----------------------------------------------------------------------------------

def up(team_dir: Path, *, host: str = LOOPBACK, pg_port: int = 54330, mlflow_port: int = 5000,
       artifacts: str | None = None, advertise: str | None = None, mlflow_workers: int = 2,
       allowed_hosts: str | None = None, tls_cert: str | None = None, tls_key: str | None = None) -> TeamState:
    """Start PostgreSQL and the MLflow server (idempotent: a running setup is reused); write DIR/team.json, DIR/env."""
    team_dir = _team_folder(team_dir)
    old = TeamState.load(team_dir)
    if old and _alive(old.mlflow_pid):
        if old.host == host and _healthy(_state_local_uri(old), old.cert):
            return old  # already up: the same URLs
        _kill_group(old.mlflow_pid)  # served elsewhere (or hung): replaced by the server below
    adv = advertise or (host if host not in sec.WILDCARD_HOSTS else socket.getfqdn())
    extra = [h.strip() for h in (allowed_hosts or "").split(",") if h.strip()]
    tls = None
    if sec.is_exposed(host):
        try:
            tls = sec.ensure_certificate(team_dir, sec.cert_names(host, adv, extra), tls_cert, tls_key)
        except ValueError as e:
            raise TeamError(str(e)) from None
    passwords = _passwords(team_dir)
    pg = PgPlan(team_dir, host, pg_port, tls)
    _pg_start(pg, passwords)
    art = artifacts or str(team_dir / "artifacts")
    if "://" not in art:
        Path(art).mkdir(parents=True, exist_ok=True)
    plan = ServerPlan(team_dir, host, mlflow_port, adv, art, mlflow_workers, extra, tls)
    pid = _mlflow_start(plan, _socket_url(pg, passwords[ROLE_TRACKING]))
    worker = _ensure_worker(plan)
    tracking = f"{plan.scheme}://{_url_host(adv)}:{mlflow_port}"
    storage = pg_url(passwords[ROLE], _url_host(adv), pg_port, tls=tls is not None)
    state = TeamState(dir=str(team_dir), host=host, advertised_host=adv, pg_port=pg_port, mlflow_port=mlflow_port,
                      mlflow_pid=pid, artifacts=art, mlflow_tracking_uri=tracking, optuna_storage=_masked(storage),
                      auth=plan.auth, tls_cert=str(tls.cert) if tls else "", allowed_hosts=plan.allowed_hosts())
    sec.write_private(team_dir / "team.json", json.dumps(asdict(state), indent=2) + "\n")
    sec.write_private(team_dir / "env", env_text(state, worker, storage))
    return state


def _team_folder(team_dir: Path) -> Path:
    """DIR, made; as root mode 711 (postgres must traverse it to DIR/pg; nobody may list it)."""
    team_dir = team_dir.resolve()
    team_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chmod(team_dir, 0o711)
    return team_dir


def _masked(url: str) -> str:
    from s2r.tracking import REDACT

    return str(REDACT.text(url))


def _state_local_uri(state: TeamState) -> str:
    scheme = "https" if state.tls_cert else "http"
    return f"{scheme}://{_url_host(LOOPBACK if state.host in sec.WILDCARD_HOSTS else state.host)}:{state.mlflow_port}"


def _ensure_worker(plan: ServerPlan) -> tuple[str, str] | None:
    """With auth on: the workers' MLflow user in the workers' role; its (name, password)."""
    if not plan.auth:
        return None
    admin = sec.AuthAdmin(plan.local_uri(), sec.secret(plan.team_dir, "mlflow-admin"),
                          plan.tls.cert if plan.tls else None)
    password = sec.secret(plan.team_dir, "mlflow-worker")
    admin.ensure_user(sec.WORKER_USER, password)
    admin.assign(sec.WORKER_USER, admin.ensure_worker_role())
    return sec.WORKER_USER, password


def env_text(state: TeamState, login: tuple[str, str] | None, storage: str | None) -> str:
    """A `source`-able file with what a worker (or a user made by `team user`) needs; it holds secrets: mode 600."""
    lines = ["# s2r team credentials: keep this file mode 600. Other machines: copy it (and the certificate it names)",
             f"export MLFLOW_TRACKING_URI='{state.mlflow_tracking_uri}'"]
    if login:
        lines += [f"export MLFLOW_TRACKING_USERNAME='{login[0]}'", f"export MLFLOW_TRACKING_PASSWORD='{login[1]}'"]
    if state.tls_cert:
        lines.append(f"export MLFLOW_TRACKING_SERVER_CERT_PATH='{state.tls_cert}'")
    if storage:
        lines.append(f"export S2R_OPTUNA_STORAGE='{storage}'")
    return "\n".join(lines) + "\n"


def read_env(path: Path) -> dict[str, str]:
    """The variables of a file `env_text` wrote."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line.removeprefix("export ").split("=", 1)
            out[k] = v.strip("'")
    return out


def add_user(team_dir: Path, name: str, worker: bool = False) -> Path:
    """Make (or reset) an MLflow account: READ everywhere, or the workers' EDIT; credentials in DIR/users/NAME.env."""
    team_dir = team_dir.resolve()
    state = TeamState.load(team_dir)
    if state is None or not state.auth:
        raise TeamError(f"{team_dir}: no team server with logins here (loopback-only servers are open; "
                        "`s2r team up --host ADDR` turns logins on)")
    if not name.replace("-", "").replace("_", "").isalnum() or name == sec.ADMIN_USER:
        raise TeamError(f"user name {name!r}: letters, digits, - and _ only, and not {sec.ADMIN_USER!r}")
    admin = sec.AuthAdmin(_state_local_uri(state), sec.secret(team_dir, "mlflow-admin"), state.cert)
    password = sec.secret(team_dir, f"user-{name}")
    admin.ensure_user(name, password)
    if worker:
        admin.assign(name, admin.ensure_worker_role())
    out = team_dir / "users" / f"{name}.env"
    storage = pg_url(_passwords(team_dir)[ROLE], _url_host(state.advertised_host), state.pg_port, tls=True)
    sec.write_private(out, env_text(state, (name, password), storage if worker else None))
    return out


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
    """Whether both services answer, and whether login and TLS are on, checked live (not read from a file)."""
    team_dir = team_dir.resolve()
    state = TeamState.load(team_dir)
    if state is None:
        return {"dir": str(team_dir), "up": False}
    local = _state_local_uri(state)
    bindir = pg_bindir()
    pg_ok = bindir is not None and _pg_ready(bindir, team_dir / "pg", state.pg_port)
    ml_ok = _alive(state.mlflow_pid) and _healthy(local, state.cert)
    out: dict[str, Any] = {"dir": str(team_dir), "up": pg_ok and ml_ok, "postgresql": pg_ok, "mlflow": ml_ok,
                           "listening": f"{state.host} (ports {state.pg_port}, {state.mlflow_port})",
                           "MLFLOW_TRACKING_URI": state.mlflow_tracking_uri, "artifacts": state.artifacts}
    if ml_ok:
        out["auth"] = _auth_report(team_dir, state, local)
    out["tls"] = _tls_report(state, ml_ok)
    if pg_ok:
        out["postgresql_tls"] = _pg_tls_report(team_dir, state)
    out["allowed_hosts"] = ", ".join(state.allowed_hosts)
    out["worker_env"] = f"{team_dir / 'env'} (mode 600; workers: source it)"
    out["up"] = out["up"] and "BROKEN" not in " ".join(str(v) for v in out.values())
    return out


def _auth_report(team_dir: Path, state: TeamState, local: str) -> str:
    code = sec.probe_status(local, state.cert)
    if not state.auth:
        return "off (loopback only: every user of this machine can read and write runs)"
    if code != 401:
        return f"BROKEN: a request without login got HTTP {code}, expected 401"
    users = sec.AuthAdmin(local, sec.secret(team_dir, "mlflow-admin"), state.cert).users()
    return (f"on (MLflow basic-auth: a request without login gets HTTP 401; default permission "
            f"{sec.DEFAULT_PERMISSION}; role {sec.WORKER_ROLE} has EDIT on every experiment and model; "
            f"users: {', '.join(users)})")


def _tls_report(state: TeamState, answered: bool) -> str:
    if state.cert is None:
        return "off (loopback only)"
    info = sec.cert_info(state.cert)
    verified = "verified handshake" if answered else "server not answering"
    return (f"on ({verified}; certificate {state.cert}, SHA-256 {info['sha256'][:23]}..., valid until "
            f"{info['expires']:%Y-%m-%d}, names {', '.join(info['names'])}; workers: "
            "MLFLOW_TRACKING_SERVER_CERT_PATH)")


def _pg_tls_report(team_dir: Path, state: TeamState) -> str:
    """PostgreSQL's ssl setting, and what a login without TLS gets (exposed: refused by the client rules)."""
    import psycopg2

    bindir = pg_bindir()
    assert bindir is not None
    ssl = _psql(bindir, PgPlan(team_dir, state.host, state.pg_port, None), "SHOW ssl")
    if not state.tls_cert:
        return f"off (ssl = {ssl}; loopback only)"
    host = LOOPBACK if state.host in sec.WILDCARD_HOSTS else state.host
    try:
        psycopg2.connect(host=host, port=state.pg_port, user=ROLE, dbname=DB_OPTUNA, sslmode="disable",
                         password=_passwords(team_dir)[ROLE], connect_timeout=10).close()
    except psycopg2.OperationalError as e:
        refused = "no encryption" in str(e)
    else:
        refused = False
    if ssl != "on" or not refused:
        return f"BROKEN: ssl = {ssl}, a login without TLS was {'refused' if refused else 'ACCEPTED'}"
    return f"on (ssl = on; a login without TLS is refused; workers use {PG_SSL})"


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


def worker_env(slot: Slot, base: dict[str, str] | None = None, storage: str | None = None) -> dict[str, str]:
    """A worker's environment: its threads, its index, its GPU, and the storage URL (by environment, not argv)."""
    from s2r.parallel import thread_env
    from s2r.tune import STORAGE_ENV

    env = thread_env(slot.threads, base) | {"S2R_WORKER": str(slot.index)}
    if storage:
        env[STORAGE_ENV] = storage
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    return env


def _study_storage(params: dict[str, Any]) -> tuple[Any, str, Path]:
    from s2r import tune

    out_dir = Path(params.get("out_dir") or tune.TUNING_DIR / params["study"])
    opts = tune.TuneOptions(study=params["study"], data_dir=Path(params["data_dir"]), out_dir=out_dir,
                            storage=tune.storage_option(params.get("storage"), params.get("storage_file")))
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
    base, storage_url = worker_command(command, params)
    workers = _Workers(base, out_dir / "workers", storage_url)
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


def worker_command(command: click.Command, params: dict[str, Any]) -> tuple[list[str], str | None]:
    """A worker's `s2r tune` command line, and the storage URL it gets by environment (argv shows in `ps`)."""
    argv = [sys.executable, "-m", "s2r.cli", "tune", *cli_args(command, params, skip=(*LAUNCHER_OPTS, "restart",
                                                                                       "storage"))]
    return argv, None if params.get("storage_file") else params.get("storage")


class _Workers:
    """The launched worker processes (slot, process, log file); SIGTERM is forwarded to the running ones."""

    def __init__(self, base: list[str], logs: Path, storage: str | None = None) -> None:
        self.base, self.logs, self.storage = base, logs, storage
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[Slot, subprocess.Popen[bytes], Path]] = []

    def start(self, slot: Slot) -> subprocess.Popen[bytes]:
        """Worker `slot.index` (every one but the first joins with --resume), its output in its log file."""
        cmd = self.base if slot.index == 0 or "--resume" in self.base else [*self.base, "--resume"]
        log = self.logs / f"worker-{slot.index}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(cmd, env=worker_env(slot, storage=self.storage), stdout=f, stderr=subprocess.STDOUT,
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
                       help="Folder of the team services' data, logs and secrets [$S2R_TEAM_DIR or "
                            "/var/tmp/s2r-team-USER].")


@click.group("team")
def team_cli() -> None:
    """A shared MLflow tracking server + PostgreSQL (Optuna storage) for workers on several machines."""


@team_cli.command("up")
@DIR_OPT
@click.option("--host", default=LOOPBACK, show_default=True,
              help="Address both services bind to. 127.0.0.1: open to local users, no TLS. Any other address (the "
                   "machine's LAN address, 0.0.0.0): MLflow login (basic-auth) and TLS on both services.")
@click.option("--advertise", help="Host name workers use in the printed URLs [--host, or this machine's FQDN].")
@click.option("--pg-port", default=54330, show_default=True, help="PostgreSQL TCP port.")
@click.option("--mlflow-port", default=5000, show_default=True, help="MLflow tracking server port.")
@click.option("--artifacts", help="Where the server stores artifacts: a folder [DIR/artifacts] or an "
                                  "S3-compatible URL (s3://bucket/path; set MLFLOW_S3_ENDPOINT_URL and AWS_* "
                                  "for the server).")
@click.option("--mlflow-workers", default=2, show_default=True, help="Request-handling processes of the server.")
@click.option("--allowed-hosts", help="More names/addresses workers use for this machine (comma-separated), "
                                      "besides --host and --advertise: accepted Host headers and certificate names.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate of this machine for both services [a self-signed one in DIR/tls].")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its private key (PEM).")
def team_up(team_dir: Path | None, host: str, advertise: str | None, pg_port: int, mlflow_port: int,
            artifacts: str | None, mlflow_workers: int, allowed_hosts: str | None, tls_cert: str | None,
            tls_key: str | None) -> None:
    """Start PostgreSQL + the MLflow server; what workers need goes to DIR/env (mode 600), never the terminal.

    Example: s2r team up --host 10.0.0.5 && source /var/tmp/s2r-team-$USER/env
    """
    try:
        st = up(team_dir or default_dir(), host=host, pg_port=pg_port, mlflow_port=mlflow_port, artifacts=artifacts,
                advertise=advertise, mlflow_workers=mlflow_workers, allowed_hosts=allowed_hosts, tls_cert=tls_cert,
                tls_key=tls_key)
    except TeamError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"# team services in {st.dir}, listening on {st.host} (PostgreSQL :{st.pg_port}, "
               f"MLflow :{st.mlflow_port}); artifacts: {st.artifacts}")
    if st.auth:
        click.echo(f"# MLflow login required (basic-auth), TLS on both services; certificate: {st.tls_cert}")
        click.echo(f"# other machines: copy {st.dir}/env and {st.tls_cert} to the same paths there (mode 600)")
    else:
        click.echo("# loopback only: no login, no TLS (every user of this machine can read and write runs)")
    click.echo(f"# every worker: source {st.dir}/env && s2r tune --study NAME --data DIR --resume")
    click.echo(f"MLFLOW_TRACKING_URI={st.mlflow_tracking_uri}")
    click.echo(f"# S2R_OPTUNA_STORAGE={st.optuna_storage}  (password in {st.dir}/env)")


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
    """Whether the team services answer, where, and whether login and TLS are on (checked live)."""
    st = status(team_dir or default_dir())
    for k, v in st.items():
        click.echo(f"{k}: {v}")
    if not st["up"]:
        sys.exit(1)


@team_cli.command("user")
@DIR_OPT
@click.argument("name")
@click.option("--worker", is_flag=True, help="In the workers' role (EDIT on every experiment and model) and "
                                              "with the Optuna storage URL; default: READ only.")
def team_user(team_dir: Path | None, name: str, worker: bool) -> None:
    """Make an MLflow account on the team server (run where `team up` ran); its credentials go to a mode-600 file.

    Example: s2r team user alice   (then give alice DIR/users/alice.env and the certificate)
    """
    try:
        path = add_user(team_dir or default_dir(), name, worker=worker)
    except TeamError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"user {name} ({'workers role: EDIT' if worker else 'READ'}): credentials in {path} (mode 600)")
