"""QAT training step (W4A4, BN frozen: the default at >= 4 bits) vs the FP32 step, eager and with
torch.compile (inductor), interleaved rounds, width 0.5, batch 128 (not a test).

    python bench/qat_compile.py --data ../shared/data/cifar10-jpeg.tar.gz --out docs/bench/qat-compile-cpu.json
"""
import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--out", default="bench/qat-compile.json")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--steps", type=int, default=6)
a = ap.parse_args()
from quantization import QuantConfig, calibrate, prepare, set_bn_frozen
from trainer import GpuLoader, MobileNetV2, load_dataset
data = load_dataset(a.data, download=False)
loader = GpuLoader(data.train_x[:4096], data.train_y[:4096], 128, train=True)
def forever():
    while True:
        yield from loader
it = forever()
torch.manual_seed(0)
fp = MobileNetV2(width=0.5)
q = prepare(fp, QuantConfig(w_bits=4, a_bits=4, method="qat"))
calibrate(q, [next(it)[0] for _ in range(2)])
class Frozen(nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def train(s, mode=True):
        super().train(mode); set_bn_frozen(s.m, True); return s
    def forward(s, x): return s.m(x)
def step_time(m, steps):
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9); m.train(); t0 = None
    for i in range(steps + 2):
        if i == 2: t0 = time.perf_counter()
        x, y = next(it)
        loss = nn.functional.cross_entropy(m(x), y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return (time.perf_counter() - t0) / steps
variants = {"fp32_eager": copy.deepcopy(fp), "qat_frozen_eager": Frozen(copy.deepcopy(q))}
for name, base in (("fp32_compiled", copy.deepcopy(fp)), ("qat_frozen_compiled", Frozen(copy.deepcopy(q)))):
    t0 = time.perf_counter()
    base.train()
    cm = torch.compile(base, dynamic=False)
    try:
        step_time(cm, 1)
        variants[name] = cm
        print(f"compiled {name} in {time.perf_counter()-t0:.0f} s", flush=True)
    except Exception as e:
        print(f"compile {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
times = {k: [] for k in variants}
for r in range(a.rounds):
    for k, m in variants.items():
        times[k].append(step_time(m, a.steps)); print(f"round {r+1} {k}: {128/times[k][-1]:.0f} img/s", flush=True)
res = {k: {"img_s": 128 / statistics.median(v)} for k, v in times.items()}
for k in times:
    base = "fp32_compiled" if k.endswith("compiled") and "fp32_compiled" in times else "fp32_eager"
    res[k]["vs_fp32_same_mode"] = statistics.median(t / b for t, b in zip(times[k], times[base]))
res["date"] = time.strftime("%Y-%m-%d %H:%M"); res["threads"] = torch.get_num_threads()
print(json.dumps(res, indent=2))
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
Path(a.out).write_text(json.dumps(res, indent=2))
