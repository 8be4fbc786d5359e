"""glibc malloc settings and CPU training speed (not a test).

Runs the same training steps (width 0.5, batch 128, synthetic batches, 2 threads) in fresh processes,
with the allocator as glibc sets it (BITSEARCH_MALLOC=system) and with ``trainer.allocator``'s
settings (the default), alternating over --rounds rounds, and reports per variant the median img/s,
minor page faults and system CPU time per step. Variants: FP32 eager, FP32 torch.compile (--compile),
W4A4 QAT with BN live and with BN frozen (eager).

    python bench/allocator.py --rounds 3 --compile --out docs/bench/allocator-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"system": {"BITSEARCH_MALLOC": "system"}, "kept": {}}


def child(variant: str, width: float, batch: int, steps: int) -> dict:
    from trainer.allocator import keep_freed_memory
    state = keep_freed_memory()
    import torch
    from torch import nn

    from quantization import QuantConfig, calibrate, prepare, recalibrate_bn, set_bn_frozen
    from trainer import MobileNetV2

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MobileNetV2(width=width)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if variant.startswith("w4a4"):
        # BN statistics of the batches first: calibrated at BN's initial statistics the deepest quantizers'
        # scales come out at 1e-8..1e-6 (docs/lab/2026-12-03e-results-history.md, section 5)
        recalibrate_bn(model, [torch.randn(batch, 3, 32, 32) for _ in range(4)], 4)
        model = prepare(model, QuantConfig(w_bits=4, a_bits=4, method="qat"))
        calibrate(model, (torch.randn(batch, 3, 32, 32) for _ in range(2)), 2)
    model.train()
    if variant == "w4a4_frozen_bn":
        set_bn_frozen(model, True)
    f = torch.compile(model, dynamic=False) if variant == "fp32_compiled" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = nn.functional.cross_entropy(f(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {"allocator": state, "img_s": batch * steps / dt, "minflt_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "sys_ms_per_step": 1000 * (r1.ru_stime - r0.ru_stime) / steps,
            "max_rss_mb": r1.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement (after 3 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also the torch.compile FP32 step (compiles each round)")
    ap.add_argument("--out", default="bench/allocator.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.width, a.batch_size, a.steps)))
        return
    variants = ["fp32_eager"] + (["fp32_compiled"] if a.compile else []) + ["w4a4_live_bn", "w4a4_frozen_bn"]
    runs: dict = {v: {s: [] for s in SETTINGS} for v in variants}
    for r in range(a.rounds):
        for v in variants:
            for s, env in SETTINGS.items():
                e = {k: v_ for k, v_ in os.environ.items() if k != "BITSEARCH_MALLOC"} | env
                out = subprocess.run([sys.executable, __file__, "--child", v, "--width", str(a.width), "--batch-size",
                                      str(a.batch_size), "--steps", str(a.steps)], env=e, check=True,
                                     capture_output=True, text=True).stdout
                runs[v][s].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {r + 1} {v:>15} {s:>6}: {runs[v][s][-1]}", file=sys.stderr, flush=True)
    res = {"cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "width": a.width, "batch_size": a.batch_size, "steps": a.steps, "rounds": a.rounds, "threads": 2,
           "variants": {}}
    for v in variants:
        row = {}
        for s in SETTINGS:
            rs = runs[v][s]
            row[s] = {k: statistics.median(r[k] for r in rs) for k in ("img_s", "minflt_per_step", "sys_ms_per_step",
                                                                      "max_rss_mb")}
            row[s]["img_s_rounds"] = [round(r["img_s"], 1) for r in rs]
            row[s]["allocator"] = rs[0]["allocator"]
        row["speedup"] = statistics.median(k["img_s"] / s_["img_s"] for k, s_ in zip(runs[v]["kept"], runs[v]["system"]))
        res["variants"][v] = row
    print(json.dumps(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
