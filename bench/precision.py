"""CPU/GPU precision and layout levers for training steps, one at a time (not a test).

Variants, timed in turn over --rounds rounds (median of each): FP32; channels-last; bf16 autocast;
bf16 autocast + channels-last; optionally torch.compile of FP32, channels-last and the last. For the FP32 model and, with
--fakequant, a W4A4 QAT model with BN live and with BN frozen (its quantizers always compute in FP32).

    python bench/precision.py --data ../shared/data/cifar10-jpeg.tar.gz --width 0.5 --steps 6 --rounds 3 \\
        --out docs/bench/precision-cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not


def _step_time(model, batches, device, steps: int, amp: bool, channels_last: bool) -> float:
    """Seconds per training step (2 warm-up steps first)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    t0 = None
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        x, y = next(batches)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fakequant", action="store_true", help="also a W4A4 QAT model, BN live and BN frozen")
    ap.add_argument("--compile", action="store_true", help="also torch.compile (FP32, channels-last, bf16 + channels-last)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench/precision.json")
    a = ap.parse_args()

    from quantization import QuantConfig, calibrate, prepare
    from trainer import GpuLoader, MobileNetV2, load_dataset, resolve_device
    from trainer.train import cpu_has_native_bf16

    dev = resolve_device(a.device)
    data = load_dataset(a.data, download=False)
    loader = GpuLoader(data.train_x[:8192].to(dev), data.train_y[:8192].to(dev), a.batch_size, train=True)

    def batches():
        while True:
            yield from loader

    it = batches()
    torch.manual_seed(0)
    models = {"fp32": MobileNetV2(width=a.width).to(dev)}
    if a.fakequant:
        q = prepare(models["fp32"], QuantConfig(w_bits=4, a_bits=4, method="qat")).to(dev)
        calibrate(q, [next(it)[0] for _ in range(2)])
        models["w4a4_qat"] = q
        from throughput import _Frozen  # keeps BN frozen through .train(): the default at >= 4 weight bits
        models["w4a4_qat_frozen"] = _Frozen(copy.deepcopy(q))
    levers = {"fp32": (False, False), "channels_last": (False, True), "bf16": (True, False),
              "bf16_channels_last": (True, True)}
    variants = {}
    for mname, m in models.items():
        for lname, (amp, cl) in levers.items():
            mm = copy.deepcopy(m)
            if cl:
                mm = mm.to(memory_format=torch.channels_last)
            variants[f"{mname}/{lname}"] = (mm, amp, cl)
        if a.compile:  # torch.compile (inductor) alone, and with bf16 + channels-last; static shapes
            for lname, (amp, cl) in (("fp32_compiled", (False, False)), ("channels_last_compiled", (False, True)),
                                     ("bf16_channels_last_compiled", (True, True))):
                mm = copy.deepcopy(m)
                if cl:
                    mm = mm.to(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                cm = torch.compile(mm, dynamic=False)
                _step_time(cm, it, dev, 1, amp, cl)  # compiles
                variants[f"{mname}/{lname}"] = (cm, amp, cl)
                print(f"compiled {mname}/{lname} in {time.perf_counter() - t0:.0f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    data_s: list[float] = []  # the input pipeline alone: shuffle-gather, crop + flip, normalise (per batch)
    for r in range(a.rounds):
        for k, (m, amp, cl) in variants.items():
            times[k].append(_step_time(m, it, dev, a.steps, amp, cl))
            print(f"round {r + 1} {k}: {a.batch_size / times[k][-1]:.0f} img/s", flush=True)
        t0 = time.perf_counter()
        for _ in range(a.steps * 4):
            next(it)
        data_s.append((time.perf_counter() - t0) / (a.steps * 4))
    res = {"device": str(dev), "cpu": platform.processor() or platform.machine(),
           "native_bf16": cpu_has_native_bf16() if dev.type == "cpu" else None,
           "threads": torch.get_num_threads(), "width": a.width, "batch_size": a.batch_size, "steps": a.steps,
           "rounds": a.rounds, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "img_s": {}, "speedup": {}}
    for k, ts in times.items():
        res["img_s"][k] = a.batch_size / statistics.median(ts)
    for k in times:
        base = k.split("/")[0] + "/fp32"
        res["speedup"][k] = statistics.median(f / t for t, f in zip(times[k], times[base]))
    res["data_ms_per_batch"] = 1e3 * statistics.median(data_s)
    # the step times above include fetching their batch: the share of each step spent on its input
    res["data_share_of_step"] = {k: statistics.median(data_s) / statistics.median(ts) for k, ts in times.items()}
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
