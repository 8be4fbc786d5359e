"""GPU searches without a GPU: a trial computes where Ray's reservation puts it, the default concurrency is
what the cluster holds, and a request no node can meet is refused at once. Ray runs here with fake GPU
resources (num_gpus=2); CUDA availability is mocked where the device choice is tested."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_baseline

pytestmark = pytest.mark.slow


def _settings(tmp_path, **kw):
    from tune.settings import settings_from
    d = dict(baseline="b.pt", data="d", out=str(tmp_path), mode="sweep", cpus_per_trial=0.25, gpus_per_trial=0.25,
             grid={"w_bits": [2, 4, 6, 8], "a_bits": [6, 8]})
    d.update(kw)
    return settings_from(d)


def test_fit_to_cluster_counts_per_node_and_refuses_what_no_node_holds(tmp_path):
    from tune.resources import Cluster, fit_to_cluster
    from tune.settings import SearchConfigError
    two_gpus = Cluster("head:6379", 16, 2, ({"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 0}))
    s, line = fit_to_cluster(_settings(tmp_path, cpus_per_trial=1), two_gpus)
    assert s.max_concurrent == 8 and line.startswith("8 trial(s) at once (1 CPU + 0.25 GPU each")  # GPU-bound
    s, _ = fit_to_cluster(_settings(tmp_path, cpus_per_trial=3), two_gpus)
    assert s.max_concurrent == 2  # CPU-bound on the only node with a GPU: 8 // 3
    s, _ = fit_to_cluster(_settings(tmp_path, gpus_per_trial=0, cpus_per_trial=2), two_gpus)
    assert s.max_concurrent == 8  # CPU trials use both nodes
    s, _ = fit_to_cluster(_settings(tmp_path, max_concurrent=3), two_gpus)
    assert s.max_concurrent == 3  # asked for: kept
    cpu_only = Cluster("head:6379", 8, 0, ({"CPU": 8, "GPU": 0},))
    with pytest.raises(SearchConfigError, match=r"--gpus-per-trial 0.25 but the Ray cluster at head:6379 has no GPU "
                                                r"\(8 CPUs\)"):
        fit_to_cluster(_settings(tmp_path), cpu_only)
    with pytest.raises(SearchConfigError, match="--cpus-per-trial 9 but the largest node .* has 8 CPUs"):
        fit_to_cluster(_settings(tmp_path, gpus_per_trial=0, cpus_per_trial=9), cpu_only)
    with pytest.raises(SearchConfigError, match="no node .* has that many GPUs"):
        fit_to_cluster(_settings(tmp_path, gpus_per_trial=3), two_gpus)
    s, line = fit_to_cluster(_settings(tmp_path, wait_for_resources=True), cpu_only)  # an autoscaler may add one
    assert s.max_concurrent == 1 and line.startswith("waiting for resources")


def test_a_trial_computes_where_ray_put_it(tmp_path, monkeypatch):
    """gpus_per_trial > 0: cuda:0 (the GPU Ray assigned), memory capped at the share; no CUDA on the worker:
    one clear error; gpus_per_trial 0: the CPU, without asking CUDA anything."""
    from tune.trial import TrialDeviceError, trial_device
    asked = []

    def no_cuda_call(*a, **k):
        raise AssertionError("a CPU trial touched CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda_call)
    assert trial_device(_settings(tmp_path, gpus_per_trial=0)) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: asked.append((f, d)))
    assert trial_device(_settings(tmp_path)) == torch.device("cuda", 0) and asked == [(0.25, 0)]
    assert trial_device(_settings(tmp_path, gpus_per_trial=1)) == torch.device("cuda", 0) and len(asked) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(TrialDeviceError, match=r"asked Ray for 0.25 GPU but its worker has no usable CUDA device "
                                               r"\(CUDA_VISIBLE_DEVICES='1'"):
        trial_device(_settings(tmp_path))


def _probe(config, settings, callbacks=()):
    """A stand-in trial: records the GPU Ray assigned it, then waits until every trial of the sweep has
    started (or 90 s: with fewer at once the last could not start before the first ended), so what runs at
    once is observed, not assumed."""
    import ray
    d = Path(settings.out) / "probe"
    d.mkdir(exist_ok=True)
    me = f"w{config['w_bits']}a{config['a_bits']}"
    seen = {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "start": time.time()}
    (d / f"{me}.start").write_text(json.dumps(seen))
    deadline = time.time() + 90
    while len(list(d.glob("*.start"))) < 8 and time.time() < deadline:
        time.sleep(0.2)
    seen["end"] = time.time()
    (d / f"{me}.end").write_text(json.dumps(seen))


def test_fake_gpus_run_quarter_gpu_trials_eight_at_a_time(tmp_path):
    import ray
    from tune.search import build_tuner, cluster
    from tune.resources import fit_to_cluster
    ray.init(num_cpus=2, num_gpus=2, object_store_memory=100 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module
    try:
        s, line = fit_to_cluster(_settings(tmp_path, name="gpus"), cluster(None))
        assert s.max_concurrent == 8 and "8 trial(s) at once (0.25 CPU + 0.25 GPU each" in line, line
        build_tuner(s, trial_fn=_probe).fit()
    finally:
        ray.shutdown()
    ends = [json.loads(p.read_text()) for p in (tmp_path / "probe").glob("*.end")]
    assert len(ends) == 8 and max(e["start"] for e in ends) < min(e["end"] for e in ends), ends  # all 8 at once
    gpus = [e["gpu_ids"] for e in ends]
    assert all(len(g) == 1 and e["visible"] == g[0] for g, e in zip(gpus, ends))  # Ray sets CUDA_VISIBLE_DEVICES
    assert sorted(g[0] for g in gpus) == ["0"] * 4 + ["1"] * 4  # four quarter-GPU trials per GPU


def test_a_gpu_search_on_a_machine_without_gpus_is_refused_at_once(tmp_path):
    tree, ck = tiny_baseline(tmp_path, epochs=1)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "bitsearch", "sweep", "--baseline", str(ck), "--data", str(tree),
                        "--out", str(tmp_path / "runs"), "--w-bits", "8", "--a-bits", "8", "--gpus-per-trial", "0.25"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    took = time.time() - t0
    assert r.returncode == 2 and took < 60, (took, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bitsearch: error: --gpus-per-trial 0.25 but the Ray cluster at ") and "has no GPU" in last
    assert not (tmp_path / "runs" / "sweep" / "bitsearch.json").exists()  # nothing written for a refused search
