"""Orchestration overhead: an N-trial sweep through Ray Tune + MLflow vs the same trials' work run
directly in one process (goal <= 1.15x), and the time to the first reported result.

    python bench/overhead.py --baseline runs/quick/baseline/checkpoint.pt \
        --data ../shared/data/cifar10-jpeg.tar.gz --out docs/bench/overhead-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def arguments(out: str) -> argparse.ArgumentParser:
    """This bench's arguments (bench/overhead_profile.py runs the same sweep and adds its own)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default=out)
    ap.add_argument("--w-bits", default="8,4,2,6")
    ap.add_argument("--batch-size", type=int, default=64)
    return ap


def sweep_settings(a: argparse.Namespace, out: Path, name: str):
    """The search arm: a Ray Tune sweep over --w-bits at A8, one trial at a time with both cores."""
    from tune.settings import settings_from
    return settings_from({"baseline": str(Path(a.baseline).resolve()), "data": str(Path(a.data).resolve()),
                          "out": str(out), "name": f"{name}-{int(time.time())}", "mode": "sweep",
                          "grid": {"w_bits": [int(v) for v in a.w_bits.split(",")], "a_bits": [8]},
                          "max_concurrent": 1, "cpus_per_trial": 2, "batch_size": a.batch_size, "device": "cpu"})


def main() -> None:
    a = arguments("docs/bench/overhead.json").parse_args()
    w_bits = [int(v) for v in a.w_bits.split(",")]

    from trainer.allocator import keep_freed_memory
    keep_freed_memory()  # as every trial does (tune/trial.py): both arms with the same allocator settings
    import ray
    import torch

    from quantization import QuantConfig
    from trainer import load_checkpoint, load_dataset
    from pipeline import load_baseline, quantize_model
    from tune.search import run

    ck = load_checkpoint(a.baseline)
    tc = ck["config"]
    fp32_top1 = ck["history"][-1]["test_top1"]
    torch.set_num_threads(2)

    # direct: the same work in one process (baseline and data loaded once)
    t0 = time.perf_counter()
    fp32, _ = load_baseline(a.baseline)
    data = load_dataset(a.data, subset=tc["subset"], val_size=tc["val_size"], seed=tc["seed"], download=False)
    for w in w_bits:
        quantize_model(fp32, data, QuantConfig(w_bits=w, a_bits=8), batch_size=a.batch_size, device="cpu",
                       fp32_top1=fp32_top1, export=Path("/tmp") / f"overhead-w{w}.bsq")
    direct = time.perf_counter() - t0

    # through the service: Ray Tune sweep, one trial at a time with both cores, MLflow logging on
    out = Path("/tmp/bitsearch-overhead")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024 * 1024)
    t_ray = time.perf_counter() - t0
    s = sweep_settings(a, out, "overhead")
    t1 = time.perf_counter()
    summ = run(s)
    searched = time.perf_counter() - t0
    first = min(json.loads((Path(summ["experiment"]) / t["trial_id"] / "result.json").read_text().splitlines()[0])
                ["timestamp"] for t in summ["trials"])
    res = {"date": time.strftime("%Y-%m-%d"), "machine": "2-core CPU (this project's dev/CI machine)",
           "trials": len(w_bits), "baseline": a.baseline, "width": tc["width"], "train_images": tc["subset"],
           "direct_s": direct, "search_s": searched, "ray_init_s": t_ray, "search_without_ray_init_s": searched - t_ray,
           "overhead": searched / direct, "overhead_without_ray_init": (searched - t_ray) / direct,
           "time_to_first_result_s": first - (time.time() - (time.perf_counter() - t1))}
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
