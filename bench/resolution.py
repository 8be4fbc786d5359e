"""Training-step speed at lower input resolution, for choosing a progressive-resizing schedule (not a test).

The cpu profile's step (torch.compile, bf16 autocast + channels-last where the CPU has native bf16) at
32 px and at the smaller sides given, each batch resized as `bitsearch train --progressive` resizes it
(trainer.train.resize_batch, included in the step time). Timed in turn over --rounds rounds; medians.

    python bench/resolution.py --data ../shared/data/cifar10-jpeg.tar.gz --sizes 32 24 20 16 \\
        --out docs/bench/resolution-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 24, 20, 16])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--out", default="bench/resolution.json")
    a = ap.parse_args()

    from precision import _step_time
    from trainer import GpuLoader, MobileNetV2, TrainConfig, load_dataset, resolve_device
    from trainer.train import precision, resize_batch

    dev = resolve_device("auto")
    amp, cl, line = precision(TrainConfig(), dev)
    print(line, flush=True)
    data = load_dataset(a.data, download=False)
    loader = GpuLoader(data.train_x[:8192].to(dev), data.train_y[:8192].to(dev), a.batch_size, train=True,
                       drop_last=True)

    def batches(size):
        while True:
            for x, y in loader:
                yield (x if size == 32 else resize_batch(x, size)), y

    torch.manual_seed(0)
    model = MobileNetV2(width=a.width).to(dev)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model, dynamic=False) if a.compile else model
    its = {s: batches(s) for s in a.sizes}
    for s in a.sizes:  # compile each shape once before timing
        t0 = time.perf_counter()
        _step_time(fwd, its[s], dev, 1, amp, cl)
        print(f"{s} px: first steps (compile) {time.perf_counter() - t0:.0f} s", flush=True)
    times: dict[int, list[float]] = {s: [] for s in a.sizes}
    for r in range(a.rounds):
        for s in a.sizes:
            times[s].append(_step_time(fwd, its[s], dev, a.steps, amp, cl))
            print(f"round {r + 1} {s} px: {a.batch_size / times[s][-1]:.0f} img/s", flush=True)
    full = a.sizes[0]
    res = {"device": str(dev), "cpu": platform.processor() or platform.machine(), "precision": line,
           "compile": a.compile, "threads": torch.get_num_threads(), "width": a.width, "batch_size": a.batch_size,
           "steps": a.steps, "rounds": a.rounds, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "img_s": {str(s): a.batch_size / statistics.median(ts) for s, ts in times.items()},
           f"speedup_vs_{full}px": {str(s): statistics.median(f / t for t, f in zip(times[s], times[full]))
                                    for s in a.sizes}}
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
