"""`bitsearch server` and `ui`: an MLflow tracking server, or the UI on a search's embedded store."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from bitsearch.common import UserError
from mlflow_server import server
from mlflow_server.server import ServerError, is_loopback
from mlflow_server.tracking import ARTIFACTS_DIR


def add_server(sub) -> None:
    p = sub.add_parser("server", help="run an MLflow tracking server (SQLite + local artifacts by default)")
    p.add_argument("--root", default="mlflow", help="folder for the SQLite file and artifacts")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for other machines, "
                   "with --basic-auth")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--backend-store-uri", dest="backend", help="e.g. postgresql+psycopg2://user:pw@host/db "
                   "(default: $MLFLOW_BACKEND_STORE_URI, else SQLite in --root)")
    p.add_argument("--artifacts-destination", dest="artifacts", help="e.g. s3://bucket/path; the server proxies "
                   "artifact transfers (default: $MLFLOW_ARTIFACTS_DESTINATION, else --root/artifacts)")
    p.add_argument("--basic-auth", dest="auth", action="store_true", help="MLflow's basic auth: user admin, the "
                   "password from $MLFLOW_AUTH_ADMIN_PASSWORD or generated into --root")
    p.add_argument("--allowed-hosts", dest="allowed_hosts", help="Host headers the server answers, comma list "
                   "(default: MLflow's, localhost only)")
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("ui", help="open the MLflow UI on a search's embedded store")
    p.add_argument("out", help="the --out directory of a search (holds mlflow.db)")
    p.add_argument("--port", type=int, default=5000, help="port of the UI on 127.0.0.1")
    p.set_defaults(func=cmd_ui)


def _serve(proc, url, after: str | None = None) -> int:
    def _term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)  # `kill` stops the mlflow server too, not only this wrapper
    print(f"MLflow UI: {url}  (Ctrl-C stops the server)", flush=True)
    if after:
        print(after, flush=True)
    try:
        while proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(proc)
    return 0


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port={port} is invalid: 1..65535")


def cmd_server(args) -> int:
    _check_port(args.port)
    if not is_loopback(args.host) and not args.auth:
        print(f"bitsearch: warning: --host {args.host} exposes the tracking server beyond this machine without "
              "authentication: anyone who can reach it can read and delete runs; add --basic-auth", file=sys.stderr)
    try:
        proc, url, login = server.start(args.root, args.host, args.port, args.backend, args.artifacts, args.auth,
                                 allowed_hosts=args.allowed_hosts)
    except ServerError as e:
        raise UserError(str(e)) from None
    after = None
    if login:
        pw = f"password {login['password']} ({login['where']})" if login["password"] else f"password {login['where']}"
        after = f"basic auth: user {login['user']}, {pw}"
    return _serve(proc, url, after)


def _embedded_store(path: str) -> Path:
    """The --out folder of a search (holding mlflow.db), given it or an experiment inside it."""
    from tune.settings import load_settings
    out = Path(path)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory: give the --out of a search (or an experiment inside it)")
    if not (out / "mlflow.db").is_file() and (out / "bitsearch.json").is_file():  # an experiment: OUT/NAME
        s = load_settings(str(out.resolve()))
        if s.tracking_uri:
            raise UserError(f"{out} was logged to the tracking server {s.tracking_uri}: open that address instead")
        out = Path(s.out)
    if not (out / "mlflow.db").is_file():
        raise UserError(f"no embedded MLflow store at {out / 'mlflow.db'}: run a search with --out {path} first")
    return out


def cmd_ui(args) -> int:
    out = _embedded_store(args.out)
    _check_port(args.port)
    try:
        proc, url, _ = server.start(out / "mlflow-ui", port=args.port, backend=f"sqlite:///{(out / 'mlflow.db').resolve()}",
                             artifacts=str((out / ARTIFACTS_DIR).resolve()))
    except ServerError as e:
        raise UserError(str(e)) from None
    return _serve(proc, url)
