"""Credentials and encryption of `s2r team up` (threat model: docs/security.md).

Off the loopback (`--host` other than 127.0.0.1 / localhost / ::1) the team services require:

- secrets generated once into DIR/secrets/ (folder 700, files 600): the PostgreSQL passwords of the workers' role
  and of the MLflow server's role, the MLflow admin and worker passwords, the Flask secret key;
- TLS with a certificate made here (or given with --tls-cert/--tls-key) for both PostgreSQL and MLflow;
- PostgreSQL: every TCP login over TLS (`hostnossl ... reject`), workers only to the Optuna database, SCRAM
  verifiers computed here (the plaintext never reaches the server, argv or a log);
- MLflow: the basic-auth app, a worker user in a role with EDIT on every experiment and registered model, READ for
  every other account the admin makes (`s2r team user`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::")
ADMIN_USER = "admin"
WORKER_USER = "s2r-worker"
WORKER_ROLE = "s2r-workers"
# Every account on the server is made by the admin (MLflow has no open sign-up: /signup needs an admin), so READ
# lets colleagues compare every run (the point of a team server) while writes need the workers' role; requests
# without a login get 401 whatever this says.
DEFAULT_PERMISSION = "READ"
WORKER_GRANTS = (("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT"))
WORKSPACE = "default"  # MLflow's workspace when workspaces are off (roles live in one)
CERT_DAYS = 825
AUTH_CACHE_SECONDS = 60


def is_exposed(host: str) -> bool:
    """Whether services bound to `host` are reachable from other machines (then login and TLS are required)."""
    return host not in LOOPBACK_HOSTS


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (mode 600 from the first byte on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def secret(team_dir: Path, name: str) -> str:
    """The secret DIR/secrets/NAME, generated once (32 URL-safe characters) and kept with mode 600."""
    folder = team_dir / "secrets"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24) + "\n")
    os.chmod(path, 0o600)
    return path.read_text().strip()


# --- TLS --------------------------------------------------------------------------------------------------------

@dataclass
class Tls:
    """The certificate both services present; workers trust it (MLFLOW_TRACKING_SERVER_CERT_PATH)."""

    cert: Path
    key: Path
    generated: bool


def cert_names(host: str, advertise: str, extra: list[str]) -> list[str]:
    """The names and addresses workers may use for this server (the certificate's subjectAltName)."""
    names = [advertise, *([] if host in WILDCARD_HOSTS else [host]), *extra]
    if host in WILDCARD_HOSTS:
        names += [socket.getfqdn(), socket.gethostname(), "localhost", "127.0.0.1"]
    return list(dict.fromkeys(n for n in names if n))


def ensure_certificate(team_dir: Path, names: list[str], cert: str | None = None, key: str | None = None) -> Tls:
    """The admin's certificate, else DIR/tls/server.crt made here (again when it lacks a name or expires soon)."""
    if cert or key:
        if not (cert and key):
            raise ValueError("give both --tls-cert and --tls-key (or neither: a certificate is made for you)")
        return Tls(Path(cert).resolve(), Path(key).resolve(), generated=False)
    folder = team_dir / "tls"
    folder.mkdir(mode=0o700, exist_ok=True)
    crt, pem = folder / "server.crt", folder / "server.key"
    if not (crt.exists() and pem.exists() and _covers(crt, names)):
        _new_certificate(names, crt, pem)
    os.chmod(folder, 0o755)  # the certificate is public; the key file stays 600
    return Tls(crt, pem, generated=True)


def _san(name: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _new_certificate(names: list[str], crt: Path, key_path: Path) -> None:
    """A self-signed P-256 certificate for `names`: its own trust anchor (CA:TRUE, pathlen 0) and a TLS server."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "s2r team")])
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(crt, 0o644)


def cert_info(crt: Path) -> dict[str, Any]:
    """Names, SHA-256 fingerprint and expiry of a certificate (for `s2r team status`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return {"names": names, "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
            "expires": cert.not_valid_after_utc}


def _covers(crt: Path, names: list[str]) -> bool:
    """Whether a certificate names every one of `names` and stays valid for 30 more days."""
    try:
        info = cert_info(crt)
    except (OSError, ValueError):
        return False
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    have = {str(ipaddress.ip_address(n)) if _is_ip(n) else n.lower() for n in info["names"]}
    want = {str(ipaddress.ip_address(n)) if _is_ip(n) else n.lower() for n in names}
    return want <= have and info["expires"] > soon


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --- PostgreSQL -------------------------------------------------------------------------------------------------

def scram_verifier(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores (RFC 5802/7677), so ALTER ROLE never carries the plaintext."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored = hashlib.sha256(client_key).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


def pg_hba(*, exposed: bool, worker_role: str, worker_db: str, server_role: str, server_db: str) -> str:
    """Client rules: superuser and MLflow's role over the unix socket only; workers to their database, over TLS
    from anywhere when exposed (every non-TLS TCP login refused), else over loopback."""
    rules = ["# written by s2r team up (threat model: docs/security.md); first match wins",
             "local all postgres trust  # the socket folder is mode 700",
             f"local {server_db} {server_role} scram-sha-256"]
    if exposed:
        rules += ["hostnossl all all 0.0.0.0/0 reject", "hostnossl all all ::/0 reject",
                  f"hostssl {worker_db} {worker_role} 0.0.0.0/0 scram-sha-256",
                  f"hostssl {worker_db} {worker_role} ::/0 scram-sha-256"]
    else:
        rules += [f"host {worker_db} {worker_role} 127.0.0.1/32 scram-sha-256",
                  f"host {worker_db} {worker_role} ::1/128 scram-sha-256"]
    return "\n".join(rules) + "\n"


# --- MLflow basic-auth ------------------------------------------------------------------------------------------

def auth_server_env(team_dir: Path) -> dict[str, str]:
    """Environment of `mlflow server --app-name basic-auth`: its config file, admin password, Flask secret key."""
    folder = team_dir / "auth"
    folder.mkdir(mode=0o700, exist_ok=True)
    ini = folder / "basic_auth.ini"
    write_private(ini, "# written by s2r team up\n[mlflow]\n"
                       f"default_permission = {DEFAULT_PERMISSION}\n"
                       f"database_uri = sqlite:///{folder / 'users.db'}\n"
                       f"admin_username = {ADMIN_USER}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       # each login's password hash (scrypt) costs ~0.1 s of CPU: check it once a minute per worker
                       # process, not on every request (a changed password reaches the other processes within 60 s)
                       f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": secret(team_dir, "mlflow-admin"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(team_dir, "flask-secret-key")}


class AuthAdmin:
    """The MLflow server's user and role API, as its admin (over TLS, verifying the team's certificate)."""

    def __init__(self, uri: str, password: str, cert: Path | None) -> None:
        self.uri, self.auth, self.verify = uri, (ADMIN_USER, password), str(cert) if cert else True

    def call(self, method: str, route: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """One request; a status outside `ok` raises with the server's answer."""
        import requests

        r = requests.request(method, self.uri + route, auth=self.auth, verify=self.verify, timeout=60, **kwargs)
        if r.status_code not in ok:
            raise RuntimeError(f"MLflow {method} {route}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json() if r.content and r.headers.get("content-type", "").startswith("application/json") else {}

    def ensure_user(self, name: str, password: str) -> None:
        """Create the user, or set its password to `password` (the team folder is the source of truth)."""
        from mlflow.server.auth import routes

        r = self.call("GET", routes.GET_USER, ok=(200, 404), params={"username": name})
        if r.get("user"):
            self.call("PATCH", routes.UPDATE_USER_PASSWORD, json={"username": name, "password": password})
        else:
            self.call("POST", routes.CREATE_USER, json={"username": name, "password": password})

    def ensure_worker_role(self) -> int:
        """The workers' role with EDIT on every experiment and registered model; its id."""
        from mlflow.server.auth import routes

        roles = self.call("GET", routes.LIST_ROLES, params={"workspace": WORKSPACE}).get("roles", [])
        role = next((r for r in roles if r["name"] == WORKER_ROLE), None)
        if role is None:
            role = self.call("POST", routes.CREATE_ROLE, json={
                "workspace": WORKSPACE, "name": WORKER_ROLE,
                "description": "s2r tuning/training workers: EDIT on every experiment and model"})["role"]
        have = {(p["resource_type"], p["resource_pattern"], p["permission"]) for p in self.call(
            "GET", routes.LIST_ROLE_PERMISSIONS, params={"role_id": str(role["id"])}).get("role_permissions", [])}
        for rtype, pattern, perm in WORKER_GRANTS:
            if (rtype, pattern, perm) not in have:
                self.call("POST", routes.ADD_ROLE_PERMISSION, json={
                    "role_id": role["id"], "resource_type": rtype, "resource_pattern": pattern, "permission": perm})
        return int(role["id"])

    def assign(self, user: str, role_id: int) -> None:
        """Put `user` in the role (kept when it is there already)."""
        from mlflow.server.auth import routes

        roles = self.call("GET", routes.LIST_USER_ROLES, params={"username": user}).get("roles", [])
        if all(int(r["id"]) != role_id for r in roles):
            self.call("POST", routes.ASSIGN_ROLE, json={"username": user, "role_id": role_id})

    def users(self) -> list[str]:
        """Every account on the server."""
        from mlflow.server.auth import routes

        return sorted(u["username"] for u in self.call("GET", routes.LIST_USERS).get("users", []))


def probe_status(uri: str, cert: Path | None, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of an experiment search on the server (401 without a valid login when auth is on)."""
    import requests

    r = requests.post(f"{uri}/api/2.0/mlflow/experiments/search", json={"max_results": 1}, auth=auth,
                      verify=str(cert) if cert else True, timeout=30)
    return int(r.status_code)
