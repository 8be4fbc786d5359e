"""The search service end to end: real Ray (one local instance for the module), a real MLflow server
started with `bitsearch server`, tiny synthetic data, a narrow model."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from bitsearch.cli import main
from conftest import make_tree, tiny_baseline

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A local S3-compatible store (moto server); its credentials are in the environment before Ray
    starts, so trial workers can write to it too."""
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 120  # generous: a loaded CI machine starts Python servers slowly
    while True:
        try:
            requests.get(env["AWS_ENDPOINT_URL"], timeout=1)
            break
        except requests.RequestException:
            assert time.time() < deadline, "moto server did not start"
            time.sleep(0.2)
    import boto3
    boto3.client("s3").create_bucket(Bucket="bitsearch")
    yield "s3://bitsearch"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ray_session(s3, _server_start):
    import ray
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def _server_start(tmp_path_factory):
    """The module's MLflow server, started first (Ray and the baseline start while it comes up: ~20 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bitsearch", "server", "--root", str(root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    yield proc, port
    # SIGTERM, not SIGINT: a suite started in the background by a shell without job control inherits
    # SIGINT ignored (the shell's rule for background jobs), and the server would outlive the suite
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


@pytest.fixture(scope="module")
def server(_server_start, baseline):  # the baseline trains while the server comes up
    proc, port = _server_start
    line = proc.stdout.readline()  # printed once /health answers
    assert "MLflow UI: http://127.0.0.1:" in line, line
    # keep reading its log: a full pipe would block the server (and its shutdown) once many runs are logged
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, _server_start):
    return tiny_baseline(tmp_path_factory.mktemp("search"))


def _settings(baseline, out, **kw):
    from tune.settings import settings_from
    tree, ck = baseline
    d = dict(baseline=str(ck), data=str(tree), out=str(out), batch_size=16, device="cpu", max_concurrent=2,
             num_samples=4, space={"w_bits": [2, 8], "a_bits": [4, 8], "method": ["ptq"]})
    d.update(kw)
    return settings_from(d)


def _api(server, endpoint, **payload):
    r = requests.post(f"{server}/api/2.0/mlflow/{endpoint}", json=payload, timeout=30)
    r.raise_for_status()
    return r.json()


def _runs(server, exp_id):
    return _api(server, "runs/search", experiment_ids=[exp_id], max_results=100).get("runs", [])


def test_optuna_search_logs_parent_and_children_to_server(ray_session, server, baseline, tmp_path):
    from tune.search import run
    # weights of 4-8 bits: QAT with BN frozen. A 2-3 bit QAT trial keeps BN live, and on this barely trained
    # baseline its gradients start at ~1e6-1e7: at lr 0.036 the parameters grew 400x in 4 steps, ending NaN
    # (a failed trial) or finite depending on the baseline's last bits, which differ from run to run
    s = _settings(baseline, tmp_path, name="s4", tracking_uri=server, experiment="srv-search",
                  space={"w_bits": [4, 8], "a_bits": [4, 8], "method": ["ptq", "qat"], "qat_lr": [1e-3, 1e-1]},
                  qat_epochs=1)
    summary = run(s)
    # ASHA may stop a weak QAT trial after its first epoch: "stopped"; every other trial finishes
    statuses = [t["status"] for t in summary["trials"]]
    assert len(statuses) == 4 and set(statuses) <= {"done", "stopped"} and "done" in statuses
    exp = requests.get(f"{server}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "srv-search"},
                       timeout=30).json()["experiment"]
    from bitsearch.cmd_search import mlflow_hint  # what the CLI prints after the table: the runs table's address
    assert mlflow_hint(summary) == (f"MLflow: {server.rstrip('/')}/#/experiments/{exp['experiment_id']}/runs"
                                    f"?compareRunsMode=CHART&viewStateShareKey={summary['mlflow_view']}")
    runs = _runs(server, exp["experiment_id"])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("bitsearch.kind") == "search"]
    children = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]
    assert len(parents) == 1 and len(children) == 4
    done_ids = {t["trial_id"] for t in summary["trials"] if t["status"] == "done"}
    for c in children:
        tags = {t["key"]: t["value"] for t in c["data"].get("tags", [])}
        params = {p["key"]: p["value"] for p in c["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in c["data"]["metrics"]}
        # what the trial ran with: a PTQ trial has no fine-tuning params (not 0, not NaN)
        assert {"w_bits", "a_bits", "method", "granularity"} <= set(params)
        assert ({"qat_lr", "qat_epochs"} <= set(params)) == (params["method"] != "ptq")
        # size and bits are known before training: a trial ASHA stopped has them too
        assert {"val_top1", "comp_mb", "comp_kb", "ratio", "avg_w_bits", "avg_a_bits", "objective"} <= set(metrics)
        assert metrics["avg_w_bits"] == float(params["w_bits"]) and metrics["avg_a_bits"] == float(params["a_bits"])
        assert abs(metrics["comp_kb"] - 1000 * metrics["comp_mb"]) < 1e-6
        # system metrics sampled on the trial's worker, named as MLflow's own (the run's System metrics tab)
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/process_memory_usage_megabytes"} <= set(metrics)
        assert not {"pid", "timestamp", "time_this_iter_s", "iterations_since_restore", "training_iteration",
                    "time_total_s"} & set(metrics)  # Ray's bookkeeping is not a bitsearch metric
        name = c["info"]["run_name"]  # what the trial is, e.g. "W4A8 qat lr=0.012" (+ " (stopped early)")
        assert name.startswith(f"W{params['w_bits']}A{params['a_bits']} {params['method']}"), name
        if tags["bitsearch.trial_id"] in done_ids:
            assert c["info"]["status"] == "FINISHED" and tags["bitsearch.outcome"] == "done"
            assert tags["bitsearch.complete"] == "1" and {"test_top1"} <= set(metrics)
            arts = requests.get(f"{server}/api/2.0/mlflow/artifacts/list",
                                params={"run_id": c["info"]["run_id"], "path": "trial"}, timeout=30).json()
            names = {Path(f["path"]).name for f in arts.get("files", [])}
            assert {"model.bsq", "model.onnx", "quantize.json"} <= names
        else:  # stopped by ASHA: marked so (not as a failure), and nothing that looks like a final result
            assert c["info"]["status"] == "FINISHED" and tags["bitsearch.outcome"] == "stopped"
            assert name.endswith(" (stopped early)") and "bitsearch.complete" not in tags and "test_top1" not in metrics
    # the parent run: the settings that apply to a search (no grid), the best trial, the Pareto table
    parent = parents[0]
    pparams = {p["key"] for p in parent["data"]["params"]}
    pmetrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    ptags = {t["key"]: t["value"] for t in parent["data"].get("tags", [])}
    assert "space.w_bits" in pparams and not any(k.startswith("grid.") for k in pparams) and "address" not in pparams
    assert pmetrics["trials"] == 4 and pmetrics["best_val_top1"] == summary["best"]["val_top1"]
    assert pmetrics["pareto_trials"] == len(summary["pareto"])
    assert pmetrics["best_val_drop"] == pytest.approx(summary["best"]["val_drop"])
    assert "Pareto front" in ptags["mlflow.note.content"] and summary["best"]["trial_id"] in ptags["mlflow.note.content"]
    parent_arts = requests.get(f"{server}/api/2.0/mlflow/artifacts/list",
                               params={"run_id": parent["info"]["run_id"]}, timeout=30).json()
    assert {"results.csv", "pareto.png", "parallel.png"} <= {Path(f["path"]).name for f in parent_arts.get("files", [])}
    # the report
    p = Path(summary["experiment"])
    for f in ("results.csv", "results.md", "pareto.png", "parallel.png"):
        assert (p / f).stat().st_size > 0
    html = (p / "parallel.html").read_text()
    assert 'src="https://cdn.plot.ly' not in html and len(html) > 1_000_000  # plotly.js inside: works offline
    assert summary["best"] is not None and summary["pareto"]
    # the model registry: every Pareto trial a version, the champion loadable and as accurate as logged
    reg = summary["registry"]
    assert reg["registered_model"] == "srv-search-s4" and set(reg["versions"]) == {t["trial_id"] for t in summary["pareto"]}
    # the parent names them; versions carry rounded figures; the champion's rule names the budget
    assert ptags["bitsearch.registered_model"] == "srv-search-s4" and ptags["bitsearch.champion"].startswith("version ")
    model = requests.get(f"{server}/api/2.0/mlflow/registered-models/get", params={"name": "srv-search-s4"},
                         timeout=30).json()["registered_model"]
    assert "no size budget" in model["description"]
    for v in model.get("latest_versions", []):
        vt = {t["key"]: t["value"] for t in v.get("tags", [])}
        assert all(len(vt[k].split(".")[-1]) <= 2 for k in ("val_top1", "test_top1") if k in vt), vt
    champion = next(t for t in summary["pareto"] if t["trial_id"] == reg["champion_trial"])
    assert champion["val_top1"] == max(t["val_top1"] for t in summary["pareto"])
    import mlflow.pyfunc

    from trainer import load_dataset
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{reg['registered_model']}@champion")
    finally:
        mlflow.set_tracking_uri(before)
    data = load_dataset(baseline[0], download=False)
    pred = model.predict(data.test_x.numpy())
    acc = 100.0 * float((torch.as_tensor(pred) == data.test_y).float().mean())
    # the same packed model: equal up to one image whose logits tie within float summation order (thread
    # counts differ between this process and the trial's worker); a wrong or unpacked model misses by far more
    assert abs(acc - champion["top1"]) <= 100.0 / len(data.test_y) + 1e-4, (acc, champion["top1"])


def test_grid_sweep_two_trials(ray_session, baseline, tmp_path, capsys, monkeypatch):
    from tune.search import run
    s = _settings(baseline, tmp_path, name="sw", mode="sweep", grid={"w_bits": [8, 4], "a_bits": [8]})
    summary = run(s)
    got = sorted((t["w_bits"], t["a_bits"]) for t in summary["trials"])
    assert got == [(4, 8), (8, 8)]
    for t in summary["trials"]:  # the quantize JSON keys of shared/DESIGN.md, per trial
        assert {"w_bits", "a_bits", "top1", "fp32_top1", "drop", "orig_mb", "comp_mb", "ratio", "weight_ratio",
                "act_ratio", "quantized_fraction"} <= set(t)
    sizes = {t["w_bits"]: t["comp_mb"] for t in summary["trials"]}
    assert sizes[4] < sizes[8]
    # compare: side by side, floats to 4 significant digits (39.47, not 39.469999)
    ids = [t["trial_id"] for t in summary["trials"]]
    assert main(["compare", summary["experiment"], *ids]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids) and "test_top1" in out
    # the answer: the best trial next to FP32 (validation drop, ratio) and to the uniform W8A8 model
    best, w8 = summary["best"], next(t for t in summary["trials"] if t["w_bits"] == 8)
    fp32_val = torch.load(baseline[1], weights_only=True)["history"][-1]["val_top1"]
    assert best["val_drop"] == pytest.approx(fp32_val - best["val_top1"], abs=1e-3)
    assert best["ratio_vs_w8"] == pytest.approx(w8["comp_mb"] / best["comp_mb"], rel=1e-3)
    assert best["ratio_vs_fp32"] == best["ratio"]
    assert not re.search(r"\d\.\d{5,}", out), out
    # the MLflow hint for an embedded store: the UI command and the runs table's address
    from bitsearch.cmd_search import mlflow_hint
    hint = mlflow_hint(summary)
    assert f"bitsearch ui {tmp_path}" in hint and f"#/experiments/{summary['mlflow_experiment_id']}/runs" in hint
    # the embedded store has a model registry too: the Pareto trials registered, a champion chosen
    assert summary["registry"]["champion_version"] is not None
    # resume on a finished search: nothing to run, so Ray is not even asked for
    import tune.search as ts
    monkeypatch.setattr(ts, "_init_ray", lambda *a, **k: pytest.fail("Ray started"))
    capsys.readouterr()
    assert main(["resume", summary["experiment"]]) == 0
    out = capsys.readouterr().out
    assert "nothing to resume: all 2 trials" in out, out
    # `export EXPERIMENT TRIAL_ID`: a trial's packed model to ONNX without knowing where the search keeps it
    tid = summary["trials"][0]["trial_id"]
    onnx_out = tmp_path / "deploy" / "trial.onnx"
    assert main(["export", summary["experiment"], tid, "--out", str(onnx_out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["out"] == str(onnx_out) and r["onnx_bytes"] == onnx_out.stat().st_size
    assert Path(r["packed"]) == Path(summary["experiment"]) / tid / "work" / "final" / "model.bsq"
    assert r["w_bits"] == summary["trials"][0]["w_bits"] and r["packed_bytes"] == Path(r["packed"]).stat().st_size
    assert main(["export", summary["experiment"], "nosuchtrial", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no trial 'nosuchtrial'" in capsys.readouterr().err


def test_multi_objective_returns_pareto_front(ray_session, baseline, tmp_path):
    from tune.search import run
    s = _settings(baseline, tmp_path, name="mo", objectives="multi", num_samples=2)
    summary = run(s)
    assert len(summary["trials"]) == 2
    done = [t for t in summary["trials"] if t["status"] == "done"]
    dominated = {t["trial_id"] for t in done for o in done  # another trial is as good on both, better on one
                 if o["val_top1"] >= t["val_top1"] and o["comp_mb"] <= t["comp_mb"]
                 and (o["val_top1"] > t["val_top1"] or o["comp_mb"] < t["comp_mb"])}
    assert {p["trial_id"] for p in summary["pareto"]} == {t["trial_id"] for t in done} - dominated


def test_budget_search_allocates_bits_by_sensitivity(ray_session, baseline, tmp_path, capsys):
    """space.size_budget_mb + a sensitivity table: every trial quantizes with the exact allocation for
    its sampled budget, fits it, and logs its per-layer bits as MLflow params."""
    from mlflow.tracking import MlflowClient

    from pipeline import load_baseline, packed_meta, prepare_quantized
    from quantization import QuantConfig
    from tune.search import run
    tree, ck = baseline
    assert main(["sensitivity", "--baseline", str(ck), "--data", str(tree), "--estimator", "hessian", "--images", "9",
                 "--no-download", "--json"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["file"]
    fp32, c = load_baseline(str(ck))
    lo, hi = (prepare_quantized(fp32, QuantConfig(w_bits=b), packed_meta(c)).size["comp_mb"] for b in (2, 8))
    s = _settings(baseline, tmp_path, name="budget", objectives="multi", num_samples=2, sensitivity=table,
                  space={"size_budget_mb": [lo + 0.1 * (hi - lo), hi], "method": ["ptq"]})
    # budgets no allocation fits are refused before Ray starts: below all-2-bit, or below all-3-bit with min_bits 3
    import dataclasses

    from tune.settings import SearchConfigError, validate
    for bad in (dataclasses.replace(s, space={**s.space, "size_budget_mb": [0.9 * lo, hi]}),
                dataclasses.replace(s, min_bits=3)):
        with pytest.raises(SearchConfigError, match="below the smallest allocation"):
            validate(bad)
    with pytest.raises(SearchConfigError, match="min_bits=9 is invalid"):
        validate(dataclasses.replace(s, min_bits=9))
    summary = run(s)
    assert len(summary["trials"]) == 2 and all(t["status"] == "done" for t in summary["trials"])
    params = {json.loads((Path(summary["experiment"]) / t["trial_id"] / "params.json").read_text())["size_budget_mb"]:
              t for t in summary["trials"]}
    for budget, t in params.items():
        assert t["comp_mb"] <= budget and str(t["w_bits"]).startswith("alloc ")
        assert 2 <= t["avg_w_bits"] <= 8
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([summary["mlflow_experiment_id"]], "tags.`bitsearch.kind` = 'trial'")
    assert len(runs) == 2
    runs_by_trial = {r.data.tags["bitsearch.trial_id"]: r for r in runs}
    for r in runs:
        bits = {k: int(v) for k, v in r.data.params.items() if k.startswith("bits.")}
        assert len(bits) > 20 and set(bits.values()) <= {2, 3, 4, 5, 6, 8}
        assert "alloc_sensitivity" in r.data.metrics  # avg_w_bits: the parameter-weighted mean of those bits
        assert min(bits.values()) <= r.data.metrics["avg_w_bits"] <= max(bits.values())
        assert r.info.run_name.startswith("alloc ")
    parent = client.search_runs([summary["mlflow_experiment_id"]], "tags.`bitsearch.kind` = 'search'")[0]
    assert parent.data.params["estimator"] == "hessian"  # the only scores this table has
    # bench/fronts.py reads the finished search: every trial scored by the same table, its front, Spearman
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fronts.json"
    subprocess.run([sys.executable, str(root / "bench" / "fronts.py"), "--sensitivity", table, "--arm",
                    f"budget={summary['experiment']}", "--out", str(out), "--plot", str(tmp_path / "f.png")],
                   check=True, capture_output=True, cwd=root)
    arm = json.loads(out.read_text())["arms"]["budget"]
    assert len(arm["trials"]) == 2 and set(arm["front"]) <= {t["trial_id"] for t in arm["trials"]}
    for t in arm["trials"]:  # the predicted score is the allocator's own summed sensitivity
        assert t["predicted"] == pytest.approx(runs_by_trial[t["trial_id"]].data.metrics["alloc_sensitivity"], rel=1e-6)
    assert arm["spearman_predicted_vs_top1"] is None  # two trials: a rank correlation needs three
    assert (tmp_path / "f.png").stat().st_size > 0


@pytest.mark.parametrize("kw, message", [
    ({"space": {}}, "search space is empty"),
    ({"space": {"w_bits": [1, 8]}}, "bits must lie in 2..8"),
    ({"space": {"colour": [1, 2]}}, "unknown search parameter"),
    ({"metric": "val_top1"}, "unknown search option(s) metric"),
    ({"size_budget_mb": 0.001}, "below the smallest model"),
    ({"mode": "sweep", "grid": {"w_bits": []}}, "grid.w_bits"),
    ({"space": {"kd_weight": [0, 2]}}, "space.kd_weight"),
    ({"kd_weight": -0.1}, "kd_weight=-0.1 is invalid"),
    ({"space": {"size_budget_mb": [0.1, 0.2]}}, "give sensitivity: PATH"),
    ({"estimator": "hessian"}, "estimator and min_bits choose how"),
    ({"min_bits": 3}, "estimator and min_bits choose how"),
    ({"time_budget_s": 0}, "time_budget_s=0 is invalid: a number of seconds > 0"),
    ({"latency_budget_ms": -1}, "latency_budget_ms=-1 is invalid: a number of milliseconds > 0"),
    ({"max_drop": -1.0}, "max_drop=-1.0 is invalid: validation points below FP32, a number >= 0"),
    ({"time_budget_s": 1e-6}, "time_budget_s=1e-06 is shorter than one trial: each evaluates"),
    ({"max_drop": 1.0, "sensitivity": "t.json", "space": {"a_bits": [4, 8], "method": ["ptq"]}},
     "give space.a_bits one value"),
    ({"max_drop": 1.0, "objectives": "multi"}, "max_drop applies to single-objective searches only"),
])
def test_bad_search_configs_fail_before_ray(baseline, tmp_path, kw, message, capsys, monkeypatch):
    import tune.search as ts
    monkeypatch.setattr(ts, "_init_ray", lambda *a, **k: pytest.fail("Ray started"))
    tree, ck = baseline
    cfg = tmp_path / "c.yaml"
    import yaml
    section = "sweep" if kw.get("mode") == "sweep" else "search"
    kw = {k: v for k, v in kw.items() if k != "mode"}
    cfg.write_text(yaml.safe_dump({section: kw}))
    code = main([section, "--baseline", str(ck), "--data", str(tree), "--out", str(tmp_path), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_unreachable_tracking_server_is_a_clear_error(baseline, tmp_path, capsys):
    tree, ck = baseline
    code = main(["search", "--baseline", str(ck), "--data", str(tree), "--out", str(tmp_path),
                 "--tracking-uri", f"http://127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err
    assert code == 2 and "unreachable" in err


def test_train_logs_the_baseline_and_a_search_loads_it_from_mlflow(ray_session, server, tmp_path, capsys):
    from tune.search import run
    from tune.settings import settings_from
    tree = make_tree(tmp_path / "t", n_train=6, n_test=3)
    assert main(["train", "--data", str(tree), "--out", str(tmp_path / "b"), "--epochs", "1", "--width", "0.25",
                 "--batch-size", "8", "--val-size", "3", "--device", "cpu", "--no-download", "--tracking-uri",
                 server]) == 0
    exp = requests.get(f"{server}/api/2.0/mlflow/experiments/get-by-name",
                       params={"experiment_name": "bitsearch-baselines"}, timeout=30).json()["experiment"]
    runs = _runs(server, exp["experiment_id"])
    base_run = next(r for r in runs if r["info"]["run_name"] == "baseline-b")
    assert {m["key"] for m in base_run["data"]["metrics"]} >= {"train_loss", "test_top1", "final_top1"}
    assert {p["key"] for p in base_run["data"]["params"]} >= {"lr", "width", "epochs"}
    # the baseline as an MLflow artifact is a valid --baseline for a search
    s = settings_from(dict(baseline=f"runs:/{base_run['info']['run_id']}/checkpoint.pt", data=str(tree), out=str(tmp_path),
                           name="from-mlflow", mode="sweep", grid={"w_bits": [8]}, batch_size=8, device="cpu",
                           tracking_uri=server, experiment="srv-from-artifact"))
    summary = run(s)
    assert summary["trials"][0]["status"] == "done"


class _Relay:
    """A TCP relay in front of the module's MLflow server that can be switched off and on again: to the
    search, the tracking server goes away and comes back (without two more server starts)."""

    def __init__(self, target: str):
        self.target = int(target.rsplit(":", 1)[1])
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener, self._open = None, []

    def start(self):
        import threading
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(32)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def _accept(self, lst):
        import threading
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        for sock in [self._listener, *self._open]:  # shutdown wakes blocked accept/recv, drops kept-alive connections
            for fn in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
                try:
                    fn()
                except OSError:
                    pass
        self._open = []


def test_dropped_server_then_sync_writes_missing_runs_once(ray_session, server, baseline, tmp_path, monkeypatch, capsys):
    """The tracking server goes away right after the driver has logged the first trial; the search goes
    on; once it is back, `bitsearch sync` writes the missing runs, and a second sync writes nothing."""
    from tune.mlflow_callback import MlflowTrialCallback
    from tune.search import run
    relay = _Relay(server)
    relay.start()
    logged = MlflowTrialCallback.on_trial_complete
    up = [True]

    def log_then_drop(self, *a, **kw):  # runs on the driver's event loop, so no later trial is logged first
        logged(self, *a, **kw)
        self.flush()  # the callback logs from a background thread: let the first trial reach the server
        if up[0]:
            relay.stop()  # the server goes away mid-search
            up[0] = False

    monkeypatch.setattr(MlflowTrialCallback, "on_trial_complete", log_then_drop)
    s = _settings(baseline, tmp_path, name="drop", mode="sweep", grid={"w_bits": [8, 4, 2], "a_bits": [8]},
                  max_concurrent=1, tracking_uri=relay.url, experiment="srv-drop")
    exp = Path(s.path)
    summary = run(s)
    assert len(summary["trials"]) == 3 and all(t["status"] == "done" for t in summary["trials"])
    exp_id = requests.get(f"{server}/api/2.0/mlflow/experiments/get-by-name",
                          params={"experiment_name": "srv-drop"}, timeout=30).json()["experiment"]["experiment_id"]
    before = [t["value"] for r in _runs(server, exp_id) for t in r["data"].get("tags", [])
              if t["key"] == "bitsearch.trial_id"]
    assert len(before) == 1  # only the first trial reached the server
    relay.start()  # the server is back
    try:
        capsys.readouterr()
        assert main(["sync", str(exp), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 2
        assert main(["sync", str(exp), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 0
        runs = _runs(server, exp_id)
        ids = [t["value"] for r in runs for t in r["data"].get("tags", []) if t["key"] == "bitsearch.trial_id"]
        assert sorted(ids) == sorted(t["trial_id"] for t in summary["trials"])  # each trial once
        for r in runs:
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            if "bitsearch.trial_id" in tags:
                assert tags.get("bitsearch.complete") == "1"
            else:  # the parent run, closed by sync since the search ended while the server was down
                assert r["info"]["status"] == "FINISHED"
    finally:
        relay.stop()


def test_trials_validate_on_the_baselines_split_whatever_the_searchs_seed(baseline, tmp_path):
    """A baseline trained with seed 5, a search with seed 0: trials validate on the baseline's own validation
    split (a split drawn with the search's seed would hold images the baseline trained on)."""
    import torch

    from trainer import load_dataset
    from tune.settings import validate
    from tune.trial import _data
    tree, ck = baseline
    c = torch.load(ck, map_location="cpu", weights_only=True)
    c["config"]["seed"] = 5
    torch.save(c, tmp_path / "seed5.pt")
    s = validate(_settings((tree, tmp_path / "seed5.pt"), tmp_path, seed=0))
    assert s.seed == 0 and s.split_seed == 5
    used = _data(s.data, s.subset, s.val_size, s.split_seed)
    own = load_dataset(tree, subset=s.subset, val_size=s.val_size, seed=5, download=False)
    other = load_dataset(tree, subset=s.subset, val_size=s.val_size, seed=0, download=False)
    assert torch.equal(used.val_x, own.val_x) and not torch.equal(used.val_x, other.val_x)


def test_a_server_back_mid_search_gets_everything_it_missed(ray_session, server, baseline, tmp_path, monkeypatch,
                                                              capsys):
    """The tracking server goes away after the first trial and is back after the second (a restart): the
    updates it missed wait in order and are written once it answers - every trial's run complete, each once,
    with its metrics and packed model, and no `bitsearch sync` needed."""
    from tune.mlflow_callback import MlflowTrialCallback
    from tune.search import run
    relay = _Relay(server)
    relay.start()
    logged = MlflowTrialCallback.on_trial_complete
    done = [0]

    def log_then_restart(self, *a, **kw):
        logged(self, *a, **kw)
        self.flush()
        done[0] += 1
        if done[0] == 1:
            relay.stop()  # the server goes away mid-search ...
        elif done[0] == 2:
            relay.start()  # ... and is back before the last trial ends

    monkeypatch.setattr(MlflowTrialCallback, "on_trial_complete", log_then_restart)
    monkeypatch.setattr(MlflowTrialCallback, "retry_s", 0.2)
    s = _settings(baseline, tmp_path, name="restart", mode="sweep", grid={"w_bits": [8, 4, 2], "a_bits": [8]},
                  max_concurrent=1, tracking_uri=relay.url, experiment="srv-restart")
    try:
        summary = run(s)
        err = capsys.readouterr().err
        assert "MLflow answers again" in err and "MLflow not fully updated" not in err, err[-2000:]
        assert len(summary["trials"]) == 3 and all(t["status"] == "done" for t in summary["trials"])
        exp_id = requests.get(f"{server}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "srv-restart"}, timeout=30).json()["experiment"]["experiment_id"]
        runs = _runs(server, exp_id)
        trials = {}
        for r in runs:
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            if "bitsearch.trial_id" in tags:
                assert tags["bitsearch.trial_id"] not in trials  # each trial once
                trials[tags["bitsearch.trial_id"]] = r
                assert tags.get("bitsearch.complete") == "1" and r["info"]["status"] == "FINISHED"
                assert {m["key"] for m in r["data"]["metrics"]} >= {"val_top1", "comp_mb"}
            else:
                assert r["info"]["status"] == "FINISHED"  # the parent, closed at the end as usual
        assert sorted(trials) == sorted(t["trial_id"] for t in summary["trials"])
        for t in summary["trials"]:
            listed = requests.get(f"{server}/api/2.0/mlflow/artifacts/list", timeout=30,
                                  params={"run_id": trials[t["trial_id"]]["info"]["run_id"]}).json()
            assert listed.get("files"), t["trial_id"]  # its packed model and export reached the server
    finally:
        relay.stop()


def test_experiment_on_s3_compatible_storage(ray_session, s3, server, baseline, capsys):
    """--out s3://...: Ray's results, bitsearch.json and the report live in the bucket; report and resume
    read them back from there."""
    import boto3

    from tune.search import resume, run
    s = _settings(baseline, f"{s3}/runs", name="on-s3", mode="sweep", grid={"w_bits": [8, 4], "a_bits": [8]},
                  tracking_uri=server, experiment="srv-s3")
    summary = run(s)
    assert summary["experiment"] == f"{s3}/runs/on-s3"
    assert len(summary["trials"]) == 2 and all(t["status"] == "done" for t in summary["trials"])
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="bitsearch", Prefix="runs/on-s3/")["Contents"]]
    for name in ("bitsearch.json", "results.md", "results.csv", "pareto.png"):
        assert f"runs/on-s3/{name}" in keys, name
    assert sum(k.endswith("model.bsq") and "/checkpoint_" in k for k in keys) == 2  # each trial's final checkpoint
    capsys.readouterr()
    assert main(["report", f"{s3}/runs/on-s3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(t["w_bits"] for t in rep["trials"]) == [4, 8]
    again = resume(f"{s3}/runs/on-s3")  # a finished experiment: nothing reruns
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(t["trial_id"] for t in summary["trials"])


def _browser():
    """Headless Chromium (Debian's package) driven by playwright. Skipped on a machine without them,
    except where BITSEARCH_BROWSER_TEST=required (.ci/run installs both and sets it)."""
    import shutil
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe is None or sync_playwright is None:
        if os.environ.get("BITSEARCH_BROWSER_TEST") == "required":
            pytest.fail("BITSEARCH_BROWSER_TEST=required but chromium or playwright is missing")
        pytest.skip("needs Debian's chromium package and playwright")
    return sync_playwright, exe


ARTIFACTS = Path(os.environ.get("BITSEARCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def test_mlflow_ui_in_a_real_browser(server, baseline, tmp_path):
    """A sweep as a user runs it (its own local Ray), then the MLflow UI as a user sees it, in Chromium.
    The terminal stays plain: bitsearch's progress lines, its table and where to look, nothing from
    Ray's or MLflow's internals. The address it prints opens, with no further action, the search's trials
    (flat, named by their config) in the chart view with a parallel-coordinates chart whose axes are w_bits,
    a_bits, qat_lr, comp_mb and val_top1. Screenshots: test-artifacts/."""
    sync_playwright, exe = _browser()
    tree, ck = baseline
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "bitsearch", "sweep", "--baseline", str(ck), "--data", str(tree),
                           "--out", str(tmp_path), "--name", "ui", "--w-bits", "8,2", "--a-bits", "8",
                           "--method", "qat", "--qat-epochs", "1",
                           "--batch-size", "16", "--device", "cpu", "--max-concurrent", "2", "--cpus-per-trial", "1",
                           "--tracking-uri", server, "--experiment", "srv-ui"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, err = proc.stdout, proc.stderr
    for noise in ("tensorboard", "Token authentication", "View experiment at", "View run", "performance bottleneck",
                  "Configuration for experiment", "View detailed results", "Downloading artifacts", "Warning",
                  "WARNING", "INFO"):
        assert noise.lower() not in (out + err).lower(), (noise, out, err)
    assert err.count(" done (") == 2 and "sweep: experiment" in err
    lines = out.strip().splitlines()
    assert max(len(x) for x in lines[:8]) > 80  # the table is not wrapped at 80 columns
    assert sum(x.startswith("best: trial ") and " below FP32" in x and "x W8A8" in x for x in lines) == 1, out
    url = lines[-1].split("MLflow: ", 1)[1]
    assert url.startswith(server) and "/runs?compareRunsMode=CHART&viewStateShareKey=" in url, url
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    axes = ["w_bits", "a_bits", "qat_lr", "comp_mb", "val_top1"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)  # the only action: no clicks, no typing from the printed address to the chart
            page.get_by_text("bitsearch search").first.wait_for(timeout=90_000)
            page.get_by_text("W2A8 qat").first.wait_for(timeout=60_000)  # the trials, listed flat
            names = sorted({t.strip() for t in page.locator("[role=row] a").all_inner_texts() if " qat" in t})
            assert [n.split(" ")[0] for n in names] == ["W2A8", "W8A8"], names
            page.wait_for_function("(axes) => { const t = new Set([...document.querySelectorAll('svg text')]"
                                   ".map(e => e.textContent)); return axes.every(a => t.has(a)); }", arg=axes,
                                   timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow-parallel.png"))
        finally:
            browser.close()


def test_drop_constraint_reaches_optuna_before_it_is_told():
    """--max-drop without a table: Optuna minimises comp_mb, and each trial's excess drop (val drop minus the
    allowed, +1e9 for a trial that did not finish) is its constraint, feasible at <= 0; the queued point runs
    first."""
    import optuna

    from tune.bisect import DropConstrained
    from tune.space import DefineByRun
    se = DropConstrained(80.0, 1.0, space=DefineByRun({"w_bits": [2, 8]}), sampler=optuna.samplers.TPESampler(seed=0),
                         points_to_evaluate=[{"w_bits": 8}])
    assert se.suggest("a")["w_bits"] == 8
    se.on_trial_complete("a", {"val_top1": 79.5, "comp_mb": 0.8, "final": True})
    se.suggest("b")
    se.on_trial_complete("b", {"val_top1": 70.0, "comp_mb": 0.2, "final": True})
    se.suggest("c")
    se.on_trial_complete("c", {"val_top1": 79.9, "comp_mb": 0.3, "final": False})  # stopped before the end
    trials = se._ot_study.trials
    assert [t.values for t in trials] == [[0.8], [0.2], [0.3]]  # the size is what it minimises
    assert [t.constraints for t in trials] == [{"val_drop": -0.5}, {"val_drop": 9.0}, {"val_drop": 1e9}]
