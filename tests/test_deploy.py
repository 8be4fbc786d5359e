"""docker-compose.yml and `make env` as files (the stack itself runs in `make compose-test`,
docker/compose_test.py, which CI runs wherever a Docker daemon answers)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_stack_keeps_ray_private_and_mlflow_authenticated():
    c = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = c["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "ray-gpu-worker", "search", "minio"} <= set(s)
    for name in ("postgres", "mlflow", "ray-head"):
        assert "healthcheck" in s[name], name
    for name in ("ray-head", "ray-worker", "ray-gpu-worker", "search", "postgres"):
        assert "ports" not in s[name], f"{name} publishes ports on the host"
    assert s["mlflow"]["ports"] == ["127.0.0.1:${MLFLOW_PORT:-5000}:5000"]  # loopback only
    entry = s["mlflow"]["entrypoint"]
    assert "--basic-auth" in entry and "--allowed-hosts" in entry
    assert any(a.startswith("postgresql+psycopg2://") for a in entry)
    assert entry[entry.index("--artifacts-destination") + 1] == "${ARTIFACTS_DESTINATION:-/mlflow/artifacts}"
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # the GPU worker and S3 are options; CPU workers and the search job share the runs volume
    assert s["ray-gpu-worker"]["profiles"] == ["gpu"] and s["minio"]["profiles"] == ["s3"]
    dev = s["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    for name in ("ray-head", "ray-worker", "search"):
        assert "${RUNS_VOLUME:-runs}:/runs" in s[name]["volumes"]
        assert s[name]["environment"]["RAY_AUTH_MODE"] == "token"
    assert "--address auto" in s["search"]["entrypoint"][2]


def test_make_env_writes_every_secret_the_stack_requires(tmp_path):
    """`make env`: a .env (mode 600) with every variable docker-compose.yml requires, secrets generated and
    distinct; an existing .env is kept."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "models").mkdir()
    env = {**os.environ, "MAKEFLAGS": ""}
    subprocess.run(["make", "-s", "env", "DATA=/data/here/cifar.tar.gz"], cwd=tmp_path, check=True, env=env,
                   capture_output=True)
    f = tmp_path / ".env"
    assert f.stat().st_mode & 0o777 == 0o600
    values = dict(line.split("=", 1) for line in f.read_text().splitlines() if line)
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required and required <= set(values)
    secrets = [values[k] for k in values if k.endswith(("PASSWORD", "KEY", "TOKEN"))]
    assert len(secrets) == 4 and len(set(secrets)) == 4 and all(len(v) >= 32 for v in secrets)
    assert values["DATA_DIR"] == "/data/here" and values["MODELS_DIR"] == str((tmp_path / "models").resolve())
    f.write_text("POSTGRES_PASSWORD=mine\n")
    subprocess.run(["make", "-s", "env"], cwd=tmp_path, check=True, env=env, capture_output=True)
    assert f.read_text() == "POSTGRES_PASSWORD=mine\n"


def test_env_example_names_what_make_env_writes_and_holds_no_secret():
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required <= set(example)
    assert all(example[k] == "generated" for k in example if k.endswith(("PASSWORD", "KEY", "TOKEN")))
