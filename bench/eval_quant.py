"""Evaluation speed of a fake-quant model on a CPU: the quantizers' inference path as one compiled kernel
per large activation (the default) against the eager passes (``BITSEARCH_FUSED_QUANT=0``), every batch
through both in one process, with the FP32 model beside. The two must agree on every prediction.

    python bench/eval_quant.py --baseline runs/cpu/checkpoint.pt --data ../shared/data/cifar10-jpeg.tar.gz \
        --rounds 3 --out docs/bench/eval-quant-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--configs", default="W4A4,W8A8", help="comma-separated WxAy")
    ap.add_argument("--images", type=int, default=5000, help="test images per timed evaluation")
    ap.add_argument("--batch-size", type=int, default=100, help="as trainer.evaluate's default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from trainer.allocator import keep_freed_memory
    keep_freed_memory()
    import torch

    from pipeline import load_baseline
    from pipeline.quantize import calibration_batches
    from quantization import QuantConfig, calibrate, freeze, prepare
    from trainer import load_checkpoint, load_dataset
    from trainer.train import evaluate

    torch.set_num_threads(2)
    ck = load_checkpoint(a.baseline)
    tc = ck["config"]
    fp32, _ = load_baseline(a.baseline)
    data = load_dataset(a.data, subset=tc["subset"], val_size=tc["val_size"], seed=tc["seed"], download=False)
    x, y = data.test_x[:a.images], data.test_y[:a.images]
    models = {"fp32": fp32.eval()}
    for name in a.configs.split(","):
        w, act = name.upper().lstrip("W").split("A")
        q = prepare(fp32, QuantConfig(w_bits=int(w), a_bits=int(act)))
        calibrate(q, calibration_batches(data, 128, 0, torch.device("cpu")), 8)
        models[name] = freeze(q).eval()

    from trainer.data import normalize

    def forward_s(model, xb, fused: bool) -> float:
        os.environ["BITSEARCH_FUSED_QUANT"] = "1" if fused else "0"
        t0 = time.perf_counter()
        model(xb)
        return time.perf_counter() - t0

    # every batch through both arms back to back, the order alternating from batch to batch, so that the
    # VM's drift (20-30% over minutes here) falls on both alike; FP32 in the same rotation
    batches = [normalize(x[i:i + a.batch_size]) for i in range(0, len(y), a.batch_size)]
    arms = [("fp32", "fp32", True)] + [(f"{n} {arm}", n, arm == "fused") for n in models if n != "fp32"
                                        for arm in ("eager", "fused")]
    seconds = {label: [0.0] * a.rounds for label, _, _ in arms}
    with torch.no_grad():
        for label, name, fused in arms:  # warm-up: first calls, the kernel's build
            forward_s(models[name], batches[0], fused)
        for r in range(a.rounds):
            for i, xb in enumerate(batches):
                order = arms if (i + r) % 2 == 0 else arms[::-1]
                for label, name, fused in order:
                    seconds[label][r] += forward_s(models[name], xb, fused)
            print(f"round {r + 1}: " + ", ".join(f"{k} {len(y) / v[r]:.0f}" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)
    rows = {k: [len(y) / t for t in v] for k, v in seconds.items()}

    def predictions(model, fused: bool) -> torch.Tensor:  # through trainer.evaluate, the evaluation path
        os.environ["BITSEARCH_FUSED_QUANT"] = "1" if fused else "0"
        return evaluate(model, x, y, batch_size=a.batch_size, device=torch.device("cpu"))["pred"]
    agree = {n: bool(torch.equal(predictions(m, False), predictions(m, True))) for n, m in models.items() if n != "fp32"}
    med = {k: statistics.median(v) for k, v in rows.items()}
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "baseline": a.baseline,
           "width": tc["width"], "images": len(y), "batch_size": a.batch_size, "rounds": a.rounds,
           "timing": "model forward only, every batch through every arm in alternating order",
           "img_s": rows, "median_img_s": med,
           "fused_over_eager": {n: med[f"{n} fused"] / med[f"{n} eager"] for n in models if n != "fp32"},
           "vs_fp32": {k: med["fp32"] / v for k, v in med.items()},
           "same_predictions": agree}
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
