"""QAT training steps (W4A4) vs the FP32 step, eager and with torch.compile (inductor), interleaved
rounds, width 0.5, batch 128 (not a test): BN statistics live (the first ``freeze_bn_epoch`` epochs, and
layers below ``bn_live_below_bits`` throughout) and frozen (the folded form). The step and the frozen-BN
wrapper are bench/throughput.py's; glibc keeps freed memory as in training (trainer.allocator).

    python bench/qat_compile.py --data ../shared/data/cifar10-jpeg.tar.gz --out docs/bench/qat-compile-cpu.json
    python bench/qat_compile.py --data ../shared/data/cifar10-jpeg.tar.gz --eager-only --out docs/bench/qat-eager-cpu-amd.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from onnx_bench import _cpu_name
from throughput import _forever, _Frozen, _steps  # importing it also puts the repository on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="bench/qat-compile.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eager-only", action="store_true", help="skip the torch.compile variants")
    a = ap.parse_args()

    from quantization import QuantConfig, calibrate, prepare, recalibrate_bn
    from trainer import GpuLoader, MobileNetV2, load_dataset
    from trainer.allocator import keep_freed_memory

    keep_freed_memory()
    dev = torch.device("cpu")
    data = load_dataset(a.data, download=False)
    it = _forever(GpuLoader(data.train_x[:4096], data.train_y[:4096], 128, train=True))
    torch.manual_seed(0)
    fp = MobileNetV2(width=0.5)
    # BN statistics of real batches first, as a trained model has them: calibrated with BN at its initial
    # statistics the deepest quantizers' scales came out at 1e-8 to 1e-6 (docs/lab/2026-12-03e-results-history.md, section 5)
    recalibrate_bn(fp, [next(it)[0] for _ in range(4)], 4)
    q = prepare(fp, QuantConfig(w_bits=4, a_bits=4, method="qat"))
    calibrate(q, [next(it)[0] for _ in range(2)])
    variants = {"fp32_eager": copy.deepcopy(fp), "qat_live_eager": copy.deepcopy(q),
                "qat_frozen_eager": _Frozen(copy.deepcopy(q))}
    compile_s: dict[str, float] = {}
    to_compile = () if a.eager_only else (("fp32_compiled", copy.deepcopy(fp)), ("qat_live_compiled", copy.deepcopy(q)),
                                          ("qat_frozen_compiled", _Frozen(copy.deepcopy(q))))
    for name, model in to_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(model.train(), dynamic=False)
        try:
            _steps(compiled, it, dev, 1)
        except Exception as e:  # noqa: BLE001 - a failed compile is a result
            print(f"compile {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        variants[name] = compiled
        compile_s[name] = round(time.perf_counter() - t0, 1)
        print(f"compiled {name} in {compile_s[name]:.0f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for k, m in variants.items():
            times[k].append(_steps(m, it, dev, a.steps)[1])
            print(f"round {r + 1} {k}: {128 / times[k][-1]:.0f} img/s", flush=True)
    res: dict = {k: {"img_s": 128 / statistics.median(v), "rounds_img_s": [round(128 / t, 1) for t in v]}
                 for k, v in times.items()}
    for k in times:
        base = "fp32_compiled" if k.endswith("compiled") and "fp32_compiled" in times else "fp32_eager"
        res[k]["vs_fp32_same_mode"] = statistics.median(t / b for t, b in zip(times[k], times[base]))
        res[k]["vs_fp32_eager"] = statistics.median(t / b for t, b in zip(times[k], times["fp32_eager"]))
    res["compile_seconds"] = compile_s
    res.update(date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads(), cpu=_cpu_name(),
               allocator=keep_freed_memory())
    print(json.dumps(res, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
