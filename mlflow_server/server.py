"""`bitsearch server` / `bitsearch ui`: a real `mlflow server` process, started, health-checked, stopped.

Defaults: SQLite backend file + local artifact directory, bound to 127.0.0.1. Postgres and
S3-compatible artifacts come from flags or the environment (MLFLOW_BACKEND_STORE_URI,
MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_S3_ENDPOINT_URL, AWS_*).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests


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


def start(root: str | Path = "mlflow", host: str = "127.0.0.1", port: int = 5000, backend: str | None = None,
          artifacts: str | None = None, auth: bool = False, log: Path | None = None,
          allowed_hosts: str | None = None) -> tuple[subprocess.Popen, str]:
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    backend = backend or os.environ.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{root / 'mlflow.db'}"
    artifacts = artifacts or os.environ.get("MLFLOW_ARTIFACTS_DESTINATION") or str(root / "artifacts")
    logf = open(log or root / "server.log", "ab")
    proc = subprocess.Popen(server_command(backend, artifacts, host, port, auth, allowed_hosts=allowed_hosts),
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        wait_healthy(url, proc)
    except ServerError:
        stop(proc)
        raise
    return proc, url


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
