"""A search against a 2-node local Ray cluster: `ray start --head` plus a second `ray start --address`."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import make_tree

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_nodes(temp_dir: str) -> None:
    """Stop this test's Ray nodes only: `ray stop` would stop every Ray on the machine (another test
    worker's, or the user's own searches). Every node process names its temp dir on its command line."""
    nodes = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or ())]
    procs = {p.pid: p for p in nodes}
    for p in nodes:  # and their children (workers, agents: renamed, no temp dir on their command line)
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    procs = list(procs.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.fixture
def cluster(tmp_path):
    port = _port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}  # joining nodes must present the token
    temp_dir = tempfile.mkdtemp(prefix="bsray", dir="/tmp")  # short: Ray's socket paths live under it
    common = ["--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    try:  # as docker-compose.yml lays it out: a head that runs no trials, a worker that runs them
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard=false", "--temp-dir",
                        temp_dir, "--num-cpus", "0", *common], check=True, capture_output=True, env=env)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2", *common], check=True,
                       capture_output=True, env=env)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_nodes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_search_on_two_node_cluster(cluster, tmp_path):
    import ray
    if ray.is_initialized():
        pytest.skip("a Ray session is already attached to this process")
    tree = make_tree(tmp_path / "tiny", n_train=20, n_test=6)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}
    from bitsearch.cli import main  # the baseline in this process: Ray is only the sweep's
    assert main(["train", "--data", str(tree), "--out", str(tmp_path / "b"), "--epochs", "1", "--width", "0.25",
                 "--batch-size", "16", "--val-size", "9", "--device", "cpu", "--no-download"]) == 0
    r = subprocess.run([sys.executable, "-m", "bitsearch", "sweep", "--baseline", str(tmp_path / "b" / "checkpoint.pt"),
                        "--data", str(tree), "--out", str(tmp_path / "runs"), "--w-bits", "8,4", "--a-bits", "8",
                        "--max-concurrent", "2", "--batch-size", "16", "--device", "cpu", "--address", cluster, "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["trials"]) == 2 and all(t["status"] == "done" for t in res["trials"])
    # the trials ran on the worker node, not where the driver and the head are: the head offers no CPU, so
    # every trial had to be placed on the node that joined (which two trials started together would not show
    # for a head with CPUs of its own: a trial that ends before the next starts frees the head's CPU again)
    exp = Path(res["experiment"])
    ran_on = [json.loads(ln)["node_id"] for d in exp.iterdir() if (d / "result.json").is_file()
              for ln in (d / "result.json").read_text().splitlines() if '"final": true' in ln]
    nodes = json.loads(subprocess.run([sys.executable, "-c",
                                       "import ray, json; ray.init(address=%r, log_to_driver=False); "
                                       "print(json.dumps({n['NodeID']: n['Resources'].get('CPU', 0) "
                                       "for n in ray.nodes() if n['Alive']}))" % cluster],
                                      capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
    workers = {n for n, cpus in nodes.items() if cpus > 0}
    assert len(nodes) == 2 and len(workers) == 1, nodes
    assert len(ran_on) == 2 and set(ran_on) == workers, (ran_on, nodes)
