"""QAT, then its final BN re-estimation (the BNs that stay live: layers below bn_live_below_bits) three ways
on the same fine-tuned model: none, over un-augmented training batches (what quantize_model did before),
over augmented ones (what it does now). Not a test. Test top-1 on the 10,000 test images; one JSON line
per config.

    python bench/qat_bn.py runs/cpu-F/checkpoint.pt w2a8,w2a4 0.01 [DATA] > docs/bench/cpu-profile-F/qat-bn.jsonl
"""
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pipeline.quantize as PQ  # noqa: E402
from quantization import FineTune, QuantConfig, freeze, recalibrate_bn  # noqa: E402
from trainer import evaluate, load_dataset  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    src, cfgs, lr = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
    data_path = sys.argv[4] if len(sys.argv) > 4 else str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz")
    fp32, _ = PQ.load_baseline(src)
    # one epoch on a stratified 10,000-image subset, as the QAT sweeps of docs/lab/2026-12-03e-results-history.md, section 7
    data = load_dataset(data_path, download=False, val_size=5000, seed=0).with_train_subset(10000, seed=0)
    captured = {}

    def capture(q, batches, n):  # the model as fine-tuning left it, before quantize_model re-estimates
        captured["q"] = copy.deepcopy(q)
        return recalibrate_bn(q, batches, n)

    PQ.recalibrate_bn = capture
    for c in cfgs:
        w, a = int(c[1]), int(c[3])
        t = time.time()
        r = PQ.quantize_model(fp32, data, QuantConfig(w_bits=w, a_bits=a, method="qat"), fine_tune=FineTune(1, lr),
                              batch_size=128, device="cpu", act_memory=False)
        row = {"model": Path(src).parent.name, "cfg": c, "qat_lr": lr, "quantize_model": round(r["top1"], 2),
               "seconds": round(time.time() - t), "date": time.strftime("%Y-%m-%d %H:%M")}
        for mode in ("none", "unaugmented", "augmented"):
            q = copy.deepcopy(captured["q"])
            if mode != "none":
                recalibrate_bn(q, PQ.calibration_batches(data, 128, 1, "cpu", augmented=mode == "augmented"), 16)
            freeze(q).eval()
            row["bn_" + mode] = round(evaluate(q, data.test_x, data.test_y)["top1"], 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
