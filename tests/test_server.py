"""`bitsearch server --basic-auth` from a fresh install, the non-loopback warning, and `bitsearch ui`
finding a search's embedded store (artifacts under --out, not the working directory)."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bitsearch.cli import main

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Run `bitsearch ...` in ``cwd`` until it prints the UI address."""
    env = {**(env or os.environ), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "bitsearch", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    first = proc.stdout.readline()
    assert "MLflow UI: http://127.0.0.1:" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def _descendants(pid: int) -> list[str]:
    """Command lines of every process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for st in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = st.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(st.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            out.append((Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
        todo += children.get(p, [])
    return out


def test_basic_auth_works_from_a_fresh_install(tmp_path):
    root, port, cwd = tmp_path / "mlf", _free_port(), tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items()  # nothing given: the password and secret key are generated
           if k not in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}
    args = ["server", "--root", str(root), "--port", str(port), "--basic-auth"]
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
    proc = _start(args, cwd, env)
    try:
        login = proc.stdout.readline()
        pw_file = root / "admin-password"
        password = pw_file.read_text().strip()
        assert f"user admin, password {password} (generated now" in login  # printed once
        for f in (pw_file, root / "flask-secret-key", root / "basic_auth.ini"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert requests.post(url, json={"max_results": 5}, timeout=30).status_code == 401
        assert requests.post(url, json={"max_results": 5}, auth=("admin", "wrong"), timeout=30).status_code == 401
        assert requests.post(url, json={"max_results": 5}, auth=("admin", password), timeout=30).status_code == 200
        assert (root / "basic_auth.db").is_file() and not list(cwd.iterdir())  # nothing in the working directory
        procs = _descendants(proc.pid)  # the server, without MLflow's GenAI job runner and its consumers
        assert any("uvicorn" in c for c in procs) and not any("huey" in c or "_job_runner" in c for c in procs), procs
    finally:
        _stop(proc)
    # a restart reuses the saved secrets (and does not print the password again)
    from mlflow_server.server import auth_environment
    extra, login = auth_environment(root)
    assert extra["MLFLOW_AUTH_ADMIN_PASSWORD"] == password and login["password"] == "" and "admin-password" in login["where"]


def test_non_loopback_host_without_auth_warns(tmp_path, monkeypatch, capsys):
    import mlflow_server.server as srv

    def fake_start(*a, **k):  # the warning comes before the server starts; stop there
        raise srv.ServerError("not started in this test")
    monkeypatch.setattr(srv, "start", fake_start)
    assert main(["server", "--root", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "warning" in err and "--basic-auth" in err and "0.0.0.0" in err
    assert main(["server", "--root", str(tmp_path), "--host", "127.0.0.1"]) == 2
    assert "warning" not in capsys.readouterr().err


def test_embedded_store_keeps_artifacts_under_out_and_ui_accepts_the_experiment(tmp_path, monkeypatch):
    """A trial's artifacts logged through the embedded store land in OUT/mlartifacts, never in ./mlruns;
    `bitsearch ui OUT/NAME` serves OUT's store and lists them."""
    import json
    from mlflow_server.tracking import SearchLogger, default_tracking_uri
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "runs"
    exp = out / "search"
    (exp / "trial").mkdir(parents=True)
    (exp / "trial" / "model.bsq").write_bytes(b"x" * 10)
    (exp / "bitsearch.json").write_text(json.dumps({"baseline": "b", "data": "d", "out": str(out), "name": "search"}))
    lg = SearchLogger(default_tracking_uri(out), "bitsearch", str(exp))
    rid = lg.child_run("t1", "trial one")
    lg.log_metrics(rid, {"val_top1": 50.0}, 0)
    lg.finish_trial(rid, str(exp / "trial"))
    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())
    assert list((out / "mlartifacts").rglob("model.bsq"))
    port = _free_port()
    proc = _start(["ui", str(exp), "--port", str(port)], cwd)
    try:
        r = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/artifacts/list", params={"run_id": rid,
                         "path": "trial"}, timeout=30).json()
        assert "model.bsq" in {Path(f["path"]).name for f in r.get("files", [])}
    finally:
        _stop(proc)


def test_a_trial_the_saved_state_never_held_is_left_out_of_report_and_mlflow(tmp_path):
    """A driver killed just after starting a trial leaves its folder and an open MLflow run behind,
    though Ray Tune's saved state (what `resume` continues) never held it: the report skips the folder
    and the search's end deletes the run; closed runs and the state's trials stay."""
    import json
    from mlflow.tracking import MlflowClient
    from mlflow_server.tracking import SearchLogger, default_tracking_uri
    from tune.results import load_trials
    from tune.settings import SearchSettings
    exp = tmp_path / "search"
    exp.mkdir()
    (exp / "bitsearch.json").write_text(json.dumps(SearchSettings(baseline="b.pt", data="d", out=str(tmp_path)).to_dict()))
    for tid in ("kept", "orphan"):
        (exp / tid).mkdir(parents=True)
        (exp / tid / "params.json").write_text(json.dumps({"w_bits": 4, "a_bits": 8, "method": "ptq"}))
        (exp / tid / "result.json").write_text("")
    assert [t["trial_id"] for t in load_trials(exp)] == ["kept", "orphan"]  # no saved state: every folder
    (exp / "experiment_state-2026-12-01_10-00-00.json").write_text(
        json.dumps({"trial_data": [[json.dumps({"trial_id": "gone"}), "{}"]]}))
    (exp / "experiment_state-2026-12-01_10-00-05.json").write_text(  # the latest state counts
        json.dumps({"trial_data": [[json.dumps({"trial_id": "kept"}), "{}"]]}))
    assert [t["trial_id"] for t in load_trials(exp)] == ["kept"]

    uri = default_tracking_uri(tmp_path)
    lg = SearchLogger(uri, "bitsearch", str(exp))
    runs = {tid: lg.child_run(tid, tid) for tid in ("kept", "orphan", "closed")}
    lg.finish_trial(runs["closed"], None, outcome="stopped")
    assert lg.drop_orphans({"kept"}) == 1
    c = MlflowClient(uri)
    assert [c.get_run(runs[t]).info.lifecycle_stage for t in ("kept", "orphan", "closed")] == \
        ["active", "deleted", "active"]


def test_trial_system_metrics_are_mlflows_without_importing_mlflow():
    """A CPU trial worker samples what MLflow's CPUMonitor records, under the same names (the MLflow UI's
    system-metrics tab reads them), and never imports mlflow for it (1.2-1.4 s per worker)."""
    code = ("import sys, time\n"
            "from tune.sysmetrics import CPUMonitor, SystemSampler\n"
            "s = SystemSampler(interval_s=0.05); time.sleep(0.3); m = s.take(); s.close()\n"
            "assert 'mlflow' not in sys.modules, 'the sampler imported mlflow'\n"
            "from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor as Theirs\n"
            "ours, theirs = CPUMonitor(), Theirs()\n"
            "ours.collect_metrics(); theirs.collect_metrics()\n"
            "a, b = ours.aggregate_metrics(), theirs.aggregate_metrics()\n"
            "assert set(a) == set(b), (a, b)\n"
            "assert abs(a['system_memory_usage_megabytes'] - b['system_memory_usage_megabytes']) < 0.2 * b['system_memory_usage_megabytes']\n"
            "assert 0 <= a['cpu_utilization_percentage'] <= 100 and 0 < a['system_memory_usage_percentage'] < 100\n"
            "assert {'system/' + k for k in b} <= set(m) and 'system/process_memory_usage_megabytes' in m, m\n"
            "ours.clear_metrics(); assert ours.aggregate_metrics() == {}\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_ui_and_server_refuse_a_port_another_process_holds(tmp_path, capsys):
    """`bitsearch ui` / `server` on a port that something else listens on: exit 2 naming the port, no server
    started (it used to print its URL and exit 0 while the port served another store)."""
    import socket
    out = tmp_path / "out"
    out.mkdir()
    (out / "mlflow.db").write_bytes(b"")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for argv in (["ui", str(out), "--port", str(port)], ["server", "--root", str(tmp_path / "srv"), "--port", str(port)]):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"port {port} on 127.0.0.1 is in use by another process" in err[0], err
    assert not (out / "mlflow-ui").exists() and not (tmp_path / "srv").exists()  # nothing made before the check


def test_the_printed_ui_command_runs_in_a_fresh_shell(monkeypatch, tmp_path):
    """The hint after a search names a command a fresh shell can run: `bitsearch` only when PATH finds this
    one, else the script's path (make demo's venv is not activated)."""
    from bitsearch.cmd_search import bitsearch_command
    mine = Path(sys.executable).with_name("bitsearch")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    cmd = bitsearch_command()
    assert cmd != "bitsearch" and Path(cmd).resolve() == mine.resolve()
    r = subprocess.run(["/bin/sh", "-c", f"{cmd} --help"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"}, cwd=Path.cwd())
    assert r.returncode == 0 and "usage: bitsearch" in r.stdout
    monkeypatch.setenv("PATH", f"{mine.parent}:/usr/bin:/bin")
    assert bitsearch_command() == "bitsearch"
