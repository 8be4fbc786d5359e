"""ONNX export measured (not a test): on the CPU reference model, the FP32 graph, onnxruntime's own
quantize_static output (QDQ, per-channel: the anchor) and bitsearch's exports of PTQ-packed files, each in
every weight storage; test top-1 in onnxruntime vs the packed model, agreement of predictions, how many
convolutions onnxruntime runs as integer kernels, file sizes, and latency at batch 1 and 128 on 1 and 2
threads (interleaved rounds, medians; all in one run, so only the ratios carry over to another CPU).

    python bench/onnx_bench.py --baseline models/mobilenetv2-w0.5-cpu.pt \\
        --data ../shared/data/cifar10-jpeg.tar.gz --out docs/bench/onnx-int.json
    python bench/onnx_bench.py --baseline models/resnet20-cpu.pt --configs w8a8 w8a6 \\
        --data ../shared/data/cifar10-jpeg.tar.gz --out docs/bench/onnx-int-resnet20.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

CONFIGS = {  # PTQ (calibration only: the bench is about the export, not about reaching accuracy)
    "w8a8": {},
    "mixed": {"w_bits": 4, "overrides": ({"pattern": "blocks.[2-5].*", "w_bits": 8}, {"pattern": "blocks.1[4-6].*", "w_bits": 6})},
    "w8a6": {"a_bits": 6},
}


def _time(sess, x: np.ndarray, reps: int) -> float:
    sess.run(["logits"], {"image": x})  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run(["logits"], {"image": x})
    return (time.perf_counter() - t0) / reps


def _anchor(fp32_onnx: Path, out: Path, images: torch.Tensor) -> None:
    """onnxruntime's own static quantization of the FP32 graph: QDQ, per-channel int8 weights, uint8
    activations, calibrated (minmax) on ``images``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": images[i:i + 64].float().div(255).numpy()} for i in range(0, len(images), 64)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name("fp32-pre.onnx")
    quant_pre_process(str(fp32_onnx), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="models/mobilenetv2-w0.5-cpu.pt")
    ap.add_argument("--data", required=True)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calib-images", type=int, default=1024)
    ap.add_argument("--out", default="docs/bench/onnx-int.json")
    ap.add_argument("--onnx-dir", default="runs/onnx-bench", help="where the .onnx/.bsq files go (not docs/: no models in git)")
    a = ap.parse_args()

    import onnxruntime as ort

    from pipeline import load_baseline
    from pipeline.export import (WEIGHT_STORAGE, _session, compare_onnx, export_checkpoint, export_packed,
                                 optimized_ops, run_onnx)
    from quantization import QuantConfig, calibrate, prepare
    from quantization.packing import convert, load_packed, save_packed
    from trainer import load_dataset, model_from_meta, normalize

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    d = Path(a.onnx_dir)
    d.mkdir(parents=True, exist_ok=True)
    fp32, ck = load_baseline(a.baseline)
    data = load_dataset(a.data, download=False)
    calib = data.train_x[:a.calib_images]
    models: dict[str, dict] = {}
    info = export_checkpoint(a.baseline, d / "fp32.onnx", latency=False)
    models["fp32"] = {"onnx": d / "fp32.onnx", "onnx_bytes": info["onnx_bytes"]}
    _anchor(d / "fp32.onnx", d / "ort-static.onnx", calib)
    models["ort-static"] = {"onnx": d / "ort-static.onnx", "onnx_bytes": (d / "ort-static.onnx").stat().st_size}
    labels = data.test_y
    for k in ("fp32", "ort-static"):
        pred = run_onnx(models[k]["onnx"], data.test_x).argmax(1)
        models[k]["onnx_top1"] = 100.0 * (pred == labels).float().mean().item()
    for name in a.configs:
        q = prepare(fp32, QuantConfig(**CONFIGS[name]))
        calibrate(q, [normalize(calib[i:i + 128]) for i in range(0, len(calib), 128)])
        bsq = d / f"{name}.bsq"
        save_packed(bsq, convert(q, {**ck["meta"], "classes": list(data.classes)}))
        model = load_packed(bsq, model_from_meta)
        for w in WEIGHT_STORAGE:
            info = export_packed(bsq, d / f"{name}-{w}.onnx", weights=w, latency=False)
            models[f"{name}-{w}"] = {"onnx": Path(info["out"]), **{k: v for k, v in info.items() if k in (
                "onnx_bytes", "packed_bytes", "bits") or k.startswith("layers_")}, **compare_onnx(model, data, info["out"])}
            print(name, w, {k: v for k, v in models[f"{name}-{w}"].items() if k != "onnx"}, flush=True)
    for m in models.values():
        ops = optimized_ops(m["onnx"])
        m["convs"] = sum(ops.get(k, 0) for k in ("Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger"))
        m["integer_convs"] = ops.get("QLinearConv", 0) + ops.get("ConvInteger", 0)
        m["ops"] = ops

    rng = np.random.default_rng(0)
    xs = {1: data.test_x[:1].float().div(255).numpy(), 128: data.test_x[:128].float().div(255).numpy()}
    for threads in (1, 2):
        times: dict[tuple, list] = {}
        sessions = {k: _session(m["onnx"], threads) for k, m in models.items()}
        for _ in range(a.rounds):  # interleaved: every model once per round
            for k in rng.permutation(list(models)):
                for b, x in xs.items():
                    times.setdefault((k, b), []).append(_time(sessions[k], x, 50 if b == 1 else 4) * 1e3)
        for (k, b), t in times.items():
            models[k][f"ms_b{b}_t{threads}"] = round(statistics.median(t), 3)
    for m in models.values():
        m["onnx"] = str(m["onnx"])
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "flags": _flags(), "onnxruntime": ort.__version__,
           "torch": torch.__version__, "baseline": a.baseline, "test_images": len(labels), "models": models}
    out.write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    """The markdown table of a result file (docs/RESULTS.md)."""
    f = res["models"]["fp32"]
    a = res["models"]["ort-static"]
    lines = ["| model | ONNX bytes | integer convs | ORT top-1 | packed top-1 | agree % | b1 ms (1 thr) | b128 ms (2 thr) "
             "| b128 vs FP32 | b128 vs ORT static | b1 vs FP32 |", "|" + "---|" * 11]
    for k, m in res["models"].items():
        def num(key, fmt="{:.2f}"):
            return fmt.format(m[key]) if key in m else "-"
        lines.append(f"| {k} | {m['onnx_bytes']:,} | {m['integer_convs']}/{m['convs']} | {num('onnx_top1')} | "
                     f"{num('packed_top1')} | {num('agreement')} | {m['ms_b1_t1']:.3f} | {m['ms_b128_t2']:.1f} | "
                     f"{f['ms_b128_t2'] / m['ms_b128_t2']:.2f}x | {a['ms_b128_t2'] / m['ms_b128_t2']:.2f}x | "
                     f"{f['ms_b1_t1'] / m['ms_b1_t1']:.2f}x |")
    return "\n".join(lines)


def _flags() -> list[str]:
    try:
        words = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(w for w in words if w in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
