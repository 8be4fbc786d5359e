"""The activation quantizers' forward + backward on one activation-sized tensor (not a test): ReLU6 alone
(what the FP32 model runs), the fused ReLU6 + 4-bit quantizer (as it is now and as it was before
2026-12-01: kept below as the reference) and the signed 4-bit quantizer, eager and under torch.compile
(inductor). Interleaved rounds, medians; glibc keeps freed memory as in training.

    python bench/quantizer_step.py --compile --out docs/bench/quantizer-step-cpu-amd.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onnx_bench import _cpu_name
from throughput import ROOT  # noqa: F401 - importing it puts the repository on sys.path


class _PreviousReLU6Quant(torch.autograd.Function):
    """The fused ReLU6 quantizer before: tensor bounds in the clamp, torch.where in the backward."""

    @staticmethod
    def forward(ctx, x, s, qmax, top):
        ctx.save_for_backward((x > 0) & (x < torch.clamp(s * (qmax + 0.5), max=top)))
        return (x / s).round_().clamp_(min=0, max=torch.clamp(torch.round(top / s), max=qmax)).mul_(s)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="128,96,32,32", help="the activation (default: width 0.5, batch 128, block 1)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also the compiled (inductor) forms")
    ap.add_argument("--out", default="bench/quantizer-step.json")
    a = ap.parse_args()

    from quantization.primitives import fake_quantize, fake_quantize_relu6
    from trainer.allocator import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    x = torch.randn(*map(int, a.shape.split(","))).requires_grad_()
    g = torch.randn_like(x)
    s, s4 = torch.tensor(6.0 / 15), torch.tensor(3.0 / 7)
    fns = {
        "relu6": lambda x: F.relu6(x),
        "relu6_quant_4bit": lambda x: fake_quantize_relu6(x, s, 15),
        "relu6_quant_4bit_previous": lambda x: _PreviousReLU6Quant.apply(x, s, 15, 6.0),
        "signed_quant_4bit": lambda x: fake_quantize(x, s4, None, -7, 7),
    }
    if a.compile:
        for k in ("relu6", "relu6_quant_4bit", "signed_quant_4bit"):
            fns[k + "_compiled"] = torch.compile(fns[k], dynamic=False)
    for f in fns.values():  # warm-up (and compilation)
        for _ in range(2):
            f(x).backward(g)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(a.reps):
                x.grad = None
                f(x).backward(g)
            times[k].append((time.perf_counter() - t0) / a.reps * 1e3)
    res: dict = {k: {"ms_fwd_bwd": round(statistics.median(v), 2),
                     "vs_relu6": round(statistics.median(t / r for t, r in zip(v, times["relu6"])), 2)}
                 for k, v in times.items()}
    for k, v in res.items():
        print(f"{k:34s} {v['ms_fwd_bwd']:7.2f} ms  {v['vs_relu6']:5.2f}x ReLU6")
    res.update(shape=a.shape, date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(), cpu=_cpu_name())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
