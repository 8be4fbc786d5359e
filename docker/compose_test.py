"""`make compose-test`: the deployment in docker-compose.yml, run for real.

Brings the stack up (Postgres, MLflow with basic auth and proxied artifacts, a Ray head, 2 CPU Ray workers),
runs a 4-trial PTQ search on the real data through it (the `search` job service, configs/compose-test.yaml),
kills one worker container while it runs a trial, restarts MLflow while the search goes on, and checks through
MLflow's REST API, Postgres and Ray's trial records: every trial done, the killed one retried on the other
worker, one MLflow child run per trial with its metrics, the packed model downloadable through MLflow at
the size the trial reported; MLflow refuses requests without the admin password; no Ray port is published
on the host. Tears everything down (containers, volumes, network) whatever happened, and prints one JSON
line last; exits 1 when a check fails.

Needs: a Docker daemon, `make env images` done (the Makefile target does both), the data and the reference
model (DATA_DIR / MODELS_DIR in .env).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PROJECT = os.environ.get("COMPOSE_TEST_PROJECT", "bitsearch-ct")
EXPERIMENT = "compose-test"
TRIALS = 4
LABEL = f"label=com.docker.compose.project={PROJECT}"


def log(msg: str) -> None:
    print(f"compose-test [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_env(path: Path) -> dict[str, str]:
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
    return out


def compose_cmd() -> list[str]:
    """Docker's compose plugin where there is one, else the docker-compose program (Debian's)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


class Stack:
    def __init__(self, env: dict[str, str]):
        self.env = {**os.environ, **env}
        self.base = [*compose_cmd(), "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml")]

    def dc(self, *args: str, check: bool = True, timeout: float = 900) -> str:
        r = subprocess.run([*self.base, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({r.returncode}): {(r.stderr or r.stdout)[-1500:]}")
        return r.stdout

    def containers(self, service: str) -> list[str]:
        out = subprocess.run(["docker", "ps", "-q", "--filter", LABEL, "--filter",
                              f"label=com.docker.compose.service={service}"], capture_output=True, text=True).stdout
        return [c for c in out.split() if c]

    def ray(self, code: str) -> str:
        return self.dc("exec", "-T", "ray-head", "python", "-c", code, timeout=120)


def docker(*args: str, check: bool = True) -> str:
    r = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {r.stderr[-500:]}")
    return r.stdout


def name_of(container: str) -> str:
    return docker("inspect", "-f", "{{.Name}}", container).strip().lstrip("/")


def wait_for(what: str, fn, timeout: float, every: float = 3.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = fn()
        except Exception:  # noqa: BLE001 - not there yet
            v = None
        if v:
            return v
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def trial_pids(container: str) -> list[str]:
    """Processes of Ray Tune trial actors in a worker container."""
    r = subprocess.run(["docker", "exec", container, "pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True)
    return r.stdout.split()


class Mlflow:
    def __init__(self, url: str, password: str):
        self.url, self.auth = url, ("admin", password)

    def api(self, route: str, **params):
        r = requests.get(f"{self.url}/api/2.0/mlflow/{route}", params=params, auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def runs(self, exp_id: str) -> list[dict]:
        r = requests.post(f"{self.url}/api/2.0/mlflow/runs/search", auth=self.auth, timeout=30,
                          json={"experiment_ids": [exp_id], "max_results": 500})
        r.raise_for_status()
        return r.json().get("runs", [])


def main() -> int:
    t0 = time.time()
    dotenv = read_env(ROOT / ".env")
    images = read_env(ROOT / "build" / "docker" / "images.env")
    for need in ("MLFLOW_ADMIN_PASSWORD", "POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"):
        if need not in dotenv:
            print(f"compose-test: .env has no {need}: run `make env` (it writes one with generated secrets)",
                  file=sys.stderr)
            return 2
    port = os.environ.get("COMPOSE_TEST_MLFLOW_PORT", "5055")
    stack = Stack({**images, "MLFLOW_PORT": port, "RUNS_VOLUME": "runs"})
    ml = Mlflow(f"http://127.0.0.1:{port}", dotenv["MLFLOW_ADMIN_PASSWORD"])
    result: dict = {"backend": None, "ray_nodes": 0, "trials_done": 0, "mlflow_child_runs": 0, "duplicates": None,
                    "worker_killed": None, "retried": False, "mlflow_restarted": False, "runs_complete": False,
                    "artifacts": False, "auth_required": False, "ray_ports_published": None, "mlflow_updates_lost": None}
    failures: list[str] = []
    search = f"{PROJECT}-search"
    try:
        stack.dc("down", "-v", "--remove-orphans", check=False)
        docker("rm", "-f", search, check=False)
        log("bringing the stack up: postgres, mlflow, ray-head, 2 ray-workers")
        stack.dc("up", "-d", "--scale", "ray-worker=2", "postgres", "mlflow", "ray-head", "ray-worker", timeout=900)
        def alive_nodes():  # the count once the head and both workers have joined (what Ray says, not 3)
            n = int(stack.ray("import ray; ray.init(address='auto', logging_level='ERROR'); "
                              "print(sum(n['Alive'] for n in ray.nodes()))").strip().splitlines()[-1])
            return n if n >= 3 else None
        result["ray_nodes"] = wait_for("3 Ray nodes (head and 2 workers)", alive_nodes, 240)

        r = requests.get(f"{ml.url}/api/2.0/mlflow/experiments/search", params={"max_results": 5}, timeout=30)
        result["auth_required"] = r.status_code == 401
        published = []
        for svc in ("ray-head", "ray-worker"):
            for c in stack.containers(svc):
                ports = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", c) or "null") or {}
                published += [f"{name_of(c)}:{p}" for p, binds in ports.items() if binds]
        result["ray_ports_published"] = published

        log("starting the 4-trial search (the job service)")
        stack.dc("run", "-d", "--name", search, "search", "--baseline", "/models/mobilenetv2-w0.5-cpu.pt",
                 "--data", "/data/cifar10-jpeg.tar.gz", "--config", "configs/compose-test.yaml", "--name", EXPERIMENT,
                 "--experiment", EXPERIMENT, "--json")

        def busy_worker():  # a worker that has run a trial for 20 s: mid-trial
            for c in stack.containers("ray-worker"):
                if trial_pids(c):
                    return c
            return None
        first = wait_for("a trial running on a worker", busy_worker, 900, every=2)
        time.sleep(20)
        victim = first if trial_pids(first) else wait_for("a trial running on a worker", busy_worker, 600, every=2)
        result["worker_killed"] = name_of(victim)
        log(f"killing worker {result['worker_killed']} mid-trial")
        docker("kill", victim)

        def one_done():
            return any(r2["info"]["status"] == "FINISHED" and _tags(r2).get("bitsearch.trial_id")
                       for r2 in ml.runs(_experiment_id(ml)))
        wait_for("a finished trial in MLflow", one_done, 1200, every=5)
        log("restarting MLflow mid-search")
        stack.dc("restart", "mlflow", timeout=300)
        wait_for("MLflow healthy again", lambda: requests.get(f"{ml.url}/health", timeout=5).ok, 240)
        result["mlflow_restarted"] = True

        log("waiting for the search to end")
        def exit_code():
            status, code = docker("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", search).split()
            return code if status == "exited" else None
        code = int(wait_for("the search to end", exit_code, 2400, every=5))
        logs = subprocess.run(["docker", "logs", search], capture_output=True, text=True)
        out, err = logs.stdout, logs.stderr
        if code != 0:
            failures.append(f"the search exited with {code}: {err[-1500:]}")
        # MLflow's restart lost nothing: no update was left for `bitsearch sync`
        result["mlflow_updates_lost"] = sum(w in err for w in ("MLflow not fully updated", "MLflow is still unreachable"))
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        trials = summary.get("trials", [])
        result["trials_done"] = sum(t.get("status") == "done" for t in trials)

        # Ray's trial records on the shared volume: a trial that failed (error.txt) and then finished
        records = stack.dc("run", "--rm", "--no-deps", "--entrypoint", "sh", "search", "-c",
                           f"for d in /runs/{EXPERIMENT}/*/; do [ -f $d/error.txt ] && echo ERR $(basename $d); "
                           "[ -f $d/result.json ] && grep -q '\"final\": true' $d/result.json && echo DONE $(basename $d); "
                           "done; true")
        errored = {line.split()[1] for line in records.splitlines() if line.startswith("ERR ")}
        finished = {line.split()[1] for line in records.splitlines() if line.startswith("DONE ")}
        result["retried"] = bool(errored & finished)

        exp_id = _experiment_id(ml)
        runs = ml.runs(exp_id)
        children = [r2 for r2 in runs if _tags(r2).get("bitsearch.trial_id")]
        ids = [_tags(r2)["bitsearch.trial_id"] for r2 in children]
        result["mlflow_child_runs"] = len(children)
        result["duplicates"] = len(ids) - len(set(ids))
        result["runs_complete"] = bool(children) and all(
            _tags(r2).get("bitsearch.complete") == "1" and {"val_top1", "comp_mb"} <= {m["key"] for m in
                                                                                        r2["data"].get("metrics", [])}
            for r2 in children)
        result["artifacts"] = _download_packed(ml, children)
        n_pg = int(stack.dc("exec", "-T", "postgres", "sh", "-c",
                            'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tAc "select count(*) from runs"').strip())
        result["backend"] = "postgresql" if n_pg >= len(runs) > 0 else None
    except Exception as e:  # noqa: BLE001 - reported in the JSON line, the stack still torn down
        failures.append(f"{type(e).__name__}: {e}")
    finally:
        log("tearing down")
        docker("rm", "-f", search, check=False)
        stack.dc("down", "-v", "--remove-orphans", check=False)
        left = docker("ps", "-aq", "--filter", LABEL, check=False).split() + \
            docker("volume", "ls", "-q", "--filter", LABEL, check=False).split()
        result["left_behind"] = len(left)
    expect = {"backend": "postgresql", "ray_nodes": 3, "trials_done": TRIALS, "mlflow_child_runs": TRIALS,
              "duplicates": 0, "retried": True, "mlflow_restarted": True, "mlflow_updates_lost": 0, "runs_complete": True,
              "artifacts": True,
              "auth_required": True, "ray_ports_published": [], "left_behind": 0}
    failures += [f"{k}={result.get(k)!r}, expected {v!r}" for k, v in expect.items() if result.get(k) != v]
    if not result["worker_killed"]:
        failures.append("no worker was killed")
    result.update(seconds=round(time.time() - t0), passed=not failures, failures=failures)
    print(json.dumps(result))
    return 0 if not failures else 1


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _experiment_id(ml: Mlflow) -> str:
    return ml.api("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]


def _download_packed(ml: Mlflow, children: list[dict]) -> bool:
    """Every child run's packed model, downloaded through MLflow's artifact proxy, is as large as the size
    the trial reported (comp_mb, in bytes / 1e6)."""
    if not children:
        return False
    for run in children:
        rid = run["info"]["run_id"]
        comp_mb = {m["key"]: m["value"] for m in run["data"]["metrics"]}.get("comp_mb")
        path = _find(ml, rid, "", "model.bsq")
        if path is None or comp_mb is None:
            log(f"run {rid}: no model.bsq artifact or no comp_mb")
            return False
        r = requests.get(f"{ml.url}/get-artifact", params={"run_uuid": rid, "path": path}, auth=ml.auth, timeout=120)
        if r.status_code != 200 or len(r.content) != round(comp_mb * 1e6):
            log(f"run {rid}: {path} gave HTTP {r.status_code}, {len(r.content)} bytes for comp_mb {comp_mb}")
            return False
    return True


def _find(ml: Mlflow, rid: str, path: str, name: str, depth: int = 0) -> str | None:
    if depth > 4:
        return None
    listed = ml.api("artifacts/list", run_id=rid, **({"path": path} if path else {})).get("files", [])
    for f in listed:
        if not f.get("is_dir") and f["path"].rsplit("/", 1)[-1] == name:
            return f["path"]
    for f in listed:
        if f.get("is_dir"):
            found = _find(ml, rid, f["path"], name, depth + 1)
            if found:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
