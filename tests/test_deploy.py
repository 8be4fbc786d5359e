"""docker-compose.yml structure (Docker cannot run here, so the file itself is checked)."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_healthchecks_and_gpu_reservations():
    c = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = c["services"]
    assert {"postgres", "minio", "createbucket", "mlflow", "ray-head", "ray-worker", "search"} <= set(s)
    for name in ("postgres", "minio", "mlflow", "ray-head"):
        assert "healthcheck" in s[name], name
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert s["mlflow"]["depends_on"]["createbucket"]["condition"] == "service_completed_successfully"
    assert "--allowed-hosts" in s["mlflow"]["entrypoint"]
    assert s["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    dev = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert "shm_size" in s["ray-worker"] and "shm_size" in s["ray-head"]
    assert {"pgdata", "miniodata"} <= set(c["volumes"])
    assert s["search"]["restart"] == "no" and "--tracking-uri" in s["search"]["entrypoint"]
    assert (ROOT / "Dockerfile").is_file()


def test_env_example_has_every_variable_and_no_real_secret():
    import re
    used = set(re.findall(r"\$\{(\w+)\}", (ROOT / "docker-compose.yml").read_text()))
    env = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert used <= set(env)
    assert all("change-me" in env[k] for k in env if "PASSWORD" in k or "SECRET" in k or "TOKEN" in k)
