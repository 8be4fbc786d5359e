"""PTQ with and without BN re-estimation (bn_reestimate_batches) on a trained checkpoint (not a test).

For each config (wXaY): plain PTQ (the FP32 BN statistics), PTQ + BN statistics re-estimated on 16
calibration batches of the quantized model, and the same with the activation ranges calibrated again
afterwards. Test top-1 on the 10,000 test images; one JSON line per config.

    python bench/ptq_bn.py runs/cpu-F/checkpoint.pt w4a8,w4a4,w8a4,w2a8 > ptq-bn.jsonl
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantization import QuantConfig, calibrate, recalibrate_bn, freeze
from pipeline.quantize import prepare_quantized, calibration_batches, load_baseline
from trainer import evaluate, load_dataset
torch.set_num_threads(2)
src = sys.argv[1]
cfgs = sys.argv[2].split(",") if len(sys.argv) > 2 else ["w8a8", "w4a8", "w8a4", "w4a4"]
data_path = sys.argv[3] if len(sys.argv) > 3 else str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz")
fp32, ck = load_baseline(src)
data = load_dataset(data_path, download=False, val_size=5000, seed=0)
cases = [(Path(src).parent.name, fp32, data)]
for name, m, data in cases:
    base = evaluate(m, data.test_x, data.test_y)["top1"]
    for c in cfgs:
        w, a = int(c[1]), int(c[3])
        row = {"model": name, "cfg": c, "fp32": round(base, 2)}
        for mode in ("ptq", "ptq+bnre", "ptq+bnre+recal"):
            t = time.time()
            p = prepare_quantized(m, QuantConfig(w_bits=w, a_bits=a))
            q = p.model
            calibrate(q, calibration_batches(data, 128, 0, "cpu"), 16)
            if "bnre" in mode:
                recalibrate_bn(q, calibration_batches(data, 128, 1, "cpu"), 16)
            if "recal" in mode:
                calibrate(q, calibration_batches(data, 128, 0, "cpu"), 16)
            freeze(q); q.eval()
            row[mode] = round(evaluate(q, data.test_x, data.test_y)["top1"], 2)
            row[mode + "_s"] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
