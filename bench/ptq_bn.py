"""PTQ and its BN statistics on a trained checkpoint (not a test): the FP32 model's statistics (plain PTQ);
statistics re-estimated on the quantized model over 16 augmented training batches (``bn_reestimate_batches``,
what ``quantize_model`` does now); and over 16 un-augmented ones (what it did before, 2026-12-01 morning).
Also the FP32 model itself with its statistics re-estimated both ways. Test top-1 on the 10,000 test
images; one JSON line per config. ``--seeds``: repeats with other calibration / re-estimation batches
(``quantize_model``'s seed), the spread of each figure.

    python bench/ptq_bn.py runs/cpu-F/checkpoint.pt w4a8,w4a4,w8a4,w2a8 [DATA] > docs/bench/cpu-profile-F/ptq-bn.jsonl
    python bench/ptq_bn.py runs/cpu-F/checkpoint.pt w8a8,w8a4,w8a2,w4a8,w4a4,w4a2,w2a8,w2a4,w2a2 --seeds 0,1 \
        --no-unaugmented > docs/bench/cpu-profile-F/ptq-bn-grid.jsonl
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.quantize import calibration_batches, load_baseline, prepare_quantized, quantize_model  # noqa: E402
from quantization import QuantConfig, calibrate, freeze, recalibrate_bn  # noqa: E402
from trainer import evaluate, load_dataset  # noqa: E402

BATCHES, BATCH_SIZE = 16, 128


def unaugmented(fp32, data, w: int, a: int) -> float:
    """quantize_model's PTQ steps and seeds, the BN statistics re-estimated over un-augmented batches."""
    q = prepare_quantized(fp32, QuantConfig(w_bits=w, a_bits=a)).model
    calibrate(q, calibration_batches(data, BATCH_SIZE, 0, "cpu"), BATCHES)
    recalibrate_bn(q, calibration_batches(data, BATCH_SIZE, 1, "cpu", augmented=False), BATCHES)
    freeze(q).eval()
    return evaluate(q, data.test_x, data.test_y)["top1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("configs", nargs="?", default="w8a8,w4a8,w8a4,w4a4")
    ap.add_argument("data", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"))
    ap.add_argument("--seeds", default="0", help="comma list of quantize_model seeds (calibration and re-estimation batches)")
    ap.add_argument("--no-unaugmented", action="store_true", help="skip the un-augmented re-estimation (the old form)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    src, cfgs, data_path = args.checkpoint, args.configs.split(","), args.data
    seeds = [int(v) for v in args.seeds.split(",")]
    fp32, _ = load_baseline(src)
    data = load_dataset(data_path, download=False, val_size=5000, seed=0)
    fp32_top1 = evaluate(fp32, data.test_x, data.test_y)["top1"]
    row = {"model": Path(src).parent.name, "fp32": round(fp32_top1, 2), "date": time.strftime("%Y-%m-%d %H:%M")}
    for aug in (True, False):
        fp = copy.deepcopy(fp32)
        recalibrate_bn(fp, calibration_batches(data, BATCH_SIZE, 1, "cpu", augmented=aug), BATCHES)
        row["fp32+bn_" + ("augmented" if aug else "unaugmented")] = round(evaluate(fp, data.test_x, data.test_y)["top1"], 2)
    print(json.dumps(row), flush=True)
    for c in cfgs:
        w, a = int(c[1]), int(c[3])
        for seed in seeds:
            row = {"model": Path(src).parent.name, "cfg": c, "fp32": round(fp32_top1, 2)}
            if len(seeds) > 1 or seed:
                row["seed"] = seed
            for mode, n in (("ptq", 0), ("ptq+bn_augmented", BATCHES)):
                t = time.time()
                cfg = QuantConfig(w_bits=w, a_bits=a, calib_batches=BATCHES, bn_reestimate_batches=n)
                r = quantize_model(fp32, data, cfg, batch_size=BATCH_SIZE, seed=seed, device="cpu", fp32_top1=fp32_top1,
                                   act_memory=False)
                row[mode], row[mode + "_s"] = round(r["top1"], 2), round(time.time() - t, 1)
            if not args.no_unaugmented:
                t = time.time()
                row["ptq+bn_unaugmented"] = round(unaugmented(fp32, data, w, a), 2)
                row["ptq+bn_unaugmented_s"] = round(time.time() - t, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
