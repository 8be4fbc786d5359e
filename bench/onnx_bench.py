"""ONNX export measured (not a test): accuracy in ONNX Runtime vs the packed model, file sizes, and
ONNX Runtime latency / throughput of the FP32 graph and of each QDQ graph on this CPU.

    python bench/onnx_bench.py --baseline runs/cpu/checkpoint.pt --data ../shared/data/cifar10-jpeg.tar.gz \\
        --packed runs/cpu-q/w8a8.bsq runs/cpu-q/w4a8.bsq --threads 2 --out docs/bench/onnx-cpu.json

For every packed file: ONNX (QDQ) written to --onnx-dir, test top-1 of ONNX Runtime and of the packed
model in PyTorch on all test images, the share of identical predictions; sizes of the .bsq, the QDQ
.onnx and the FP32 .onnx; median latency at batch 1 and images/s at batch 128 (interleaved rounds).
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


def _session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(sess, x: np.ndarray, reps: int) -> float:
    sess.run(["logits"], {"image": x})  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        sess.run(["logits"], {"image": x})
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="the FP32 checkpoint the packed files were quantized from")
    ap.add_argument("--data", required=True)
    ap.add_argument("--packed", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="docs/bench/onnx-cpu.json")
    ap.add_argument("--onnx-dir", default="runs/onnx-bench", help="where the .onnx files go (not docs/: no models in git)")
    a = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from pipeline import load_baseline
    from pipeline.export import compare_onnx, export_packed, to_onnx
    from quantization.packing import load_packed
    from trainer import load_dataset, model_from_meta
    from trainer.data import CIFAR10_MEAN, CIFAR10_STD

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_dir = Path(a.onnx_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    fp32, ck = load_baseline(a.baseline)
    data = load_dataset(a.data, download=False)
    models = {}
    proto, _ = to_onnx(fp32.eval(), mean=CIFAR10_MEAN, std=CIFAR10_STD)
    onnx.save(proto, onnx_dir / "fp32.onnx")
    models["fp32"] = {"onnx": onnx_dir / "fp32.onnx", "onnx_bytes": (onnx_dir / "fp32.onnx").stat().st_size}
    for p in a.packed:
        name = Path(p).stem
        info = export_packed(p, onnx_dir / f"{name}.onnx")
        model = load_packed(p, model_from_meta)
        cmp = compare_onnx(model, data, info["out"])
        models[name] = {"onnx": Path(info["out"]), **{k: info[k] for k in (
            "onnx_bytes", "packed_bytes", "w_bits", "a_bits", "layers_int8", "layers_int4", "layers_fp32")}, **cmp}
        print(name, {k: v for k, v in models[name].items() if k != "onnx"}, flush=True)

    rng = np.random.default_rng(0)
    x1 = data.test_x[:1].float().div(255).numpy()
    x128 = data.test_x[:128].float().div(255).numpy()
    lat: dict[str, list] = {k: [] for k in models}
    thr: dict[str, list] = {k: [] for k in models}
    sessions = {k: _session(m["onnx"], a.threads) for k, m in models.items()}
    for _ in range(a.rounds):  # interleaved: every model once per round
        for k in rng.permutation(list(models)):
            lat[k].append(_time(sessions[k], x1, 50) * 1e3)
            thr[k].append(128 / _time(sessions[k], x128, 5))
    for k, m in models.items():
        m["latency_ms_b1"] = round(statistics.median(lat[k]), 3)
        m["images_per_s_b128"] = round(statistics.median(thr[k]), 1)
        m["onnx"] = str(m["onnx"])
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "cpu": _cpu_name(), "threads": a.threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
           "baseline": a.baseline, "test_images": len(data.test_y), "models": models}
    out.write_text(json.dumps(res, indent=1))
    f = models["fp32"]
    print(f"{'model':<12} {'onnx B':>10} {'bsq B':>9} {'ORT top1':>9} {'torch top1':>10} {'agree %':>8} "
          f"{'b1 ms':>7} {'b128 img/s':>10}")
    for k, m in models.items():
        print(f"{k:<12} {m['onnx_bytes']:>10,} {m.get('packed_bytes', 0):>9,} {m.get('onnx_top1', float('nan')):>9.2f} "
              f"{m.get('packed_top1', float('nan')):>10.2f} {m.get('agreement', float('nan')):>8.2f} "
              f"{m['latency_ms_b1']:>7.3f} {m['images_per_s_b128']:>10.1f}"
              + ("" if k == "fp32" else f"  ({m['images_per_s_b128'] / f['images_per_s_b128']:.2f}x FP32)"))


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
