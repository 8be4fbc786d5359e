"""`bitsearch server` / `bitsearch ui`: a real `mlflow server` process, started, health-checked, stopped.

Defaults: SQLite backend file + local artifact directory, bound to 127.0.0.1. Postgres and
S3-compatible artifacts come from flags or the environment (MLFLOW_BACKEND_STORE_URI,
MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_S3_ENDPOINT_URL, AWS_*).
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

LOOPBACK_NAMES = ("localhost",)
ADMIN_PASSWORD_FILE = "admin-password"
SECRET_KEY_FILE = "flask-secret-key"


class ServerError(RuntimeError):
    pass


def server_command(backend: str, artifacts: str, host: str, port: int, auth: bool = False,
                   workers: int = 1, allowed_hosts: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
           artifacts, "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"mlflow server exited with code {proc.returncode} before answering {url}/health")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer {url}/health within {timeout:.0f} s")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret_file(path: Path, env_value: str | None) -> tuple[str, bool]:
    """A secret from the environment, else from ``path``, else generated into ``path`` (mode 600).
    Returns (secret, generated now)."""
    if env_value:
        return env_value, False
    if path.is_file():
        return path.read_text().strip(), False
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value, True


def auth_environment(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """What `mlflow server --app-name basic-auth` needs, kept under ``root``: the auth config (its user
    database in ``root``), the Flask secret key and the admin password (from MLFLOW_FLASK_SERVER_SECRET_KEY /
    MLFLOW_AUTH_ADMIN_PASSWORD when set, else generated once into ``root`` with mode 600).
    Returns (environment for the server, login info to show the user)."""
    user = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    password, new = _secret_file(root / ADMIN_PASSWORD_FILE, os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"))
    key, _ = _secret_file(root / SECRET_KEY_FILE, os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"))
    ini = root / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
                   f"admin_username = {user}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    os.chmod(ini, 0o600)
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": key,
           "MLFLOW_AUTH_ADMIN_USERNAME": user, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    where = ("from MLFLOW_AUTH_ADMIN_PASSWORD" if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") else
             f"generated now, saved in {root / ADMIN_PASSWORD_FILE} (mode 600)" if new else
             f"in {root / ADMIN_PASSWORD_FILE}")
    return env, {"user": user, "password": password if new else "", "where": where}


def check_port_free(host: str, port: int) -> None:
    """ServerError naming the port when another process listens on it (at ``host``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's lingering connections are no holder
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ServerError(f"port {port} on {host} is in use by another process ({e.strerror or e}): "
                              "stop it, or pick another with --port") from None


def start(root: str | Path = "mlflow", host: str = "127.0.0.1", port: int = 5000, backend: str | None = None,
          artifacts: str | None = None, auth: bool = False, log: Path | None = None,
          allowed_hosts: str | None = None) -> tuple[subprocess.Popen, str, dict | None]:
    """Start `mlflow server` and wait until /health answers: (process, URL, login). With ``auth``, the
    basic-auth app runs with everything it needs under ``root`` and ``login`` says how to sign in
    (see ``auth_environment``); else it is None."""
    check_port_free(host, port)  # else /health could be answered by whatever holds the port
    root = Path(root).resolve()
    if root.exists() and not root.is_dir():
        raise ServerError(f"--root {root} is a file: give a folder for the tracking data")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ServerError(f"--root {root} cannot be created: {e.strerror or e}") from None
    backend = backend or os.environ.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{root / 'mlflow.db'}"
    artifacts = artifacts or os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or str(root / "artifacts")
    env, login = dict(os.environ), None
    # MLflow 3's job runner (seven more Python processes importing mlflow, ~240 MB resident each) serves
    # GenAI jobs bitsearch never submits: off unless the user turns it on
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if auth:
        extra, login = auth_environment(root)
        env.update(extra)
    logf = open(log or root / "server.log", "ab")
    proc = subprocess.Popen(server_command(backend, artifacts, host, port, auth, allowed_hosts=allowed_hosts),
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=root)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_healthy(url, proc)
    except ServerError:
        stop(proc)
        raise
    return proc, url, login


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
