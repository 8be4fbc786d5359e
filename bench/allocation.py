"""Sensitivity-guided allocation vs uniform bit-widths at equal packed size (issue 11), PTQ or QAT.

For each budget: the exact allocation (bitsearch allocate), quantized and measured; for each uniform
weight bit-width: the same pipeline. Every point is one quantize run on the same baseline, evaluated
on the full validation and test splits; sizes are the packed files' bytes.

    python bench/allocation.py --baseline runs/cpu-B/checkpoint.pt --data ../shared/data/cifar10-jpeg.tar.gz \\
        --sensitivity runs/cpu-B/sensitivity-KEY.json --budgets 0.25,0.3,0.35,0.4 --uniform 8,6,5,4,3 \\
        --a-bits 8 --method ptq --out docs/bench/allocation-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--sensitivity", required=True)
    ap.add_argument("--budgets", required=True, help="comma-separated MB")
    ap.add_argument("--uniform", default="8,6,5,4,3", help="comma-separated uniform weight bit-widths")
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--method", default="ptq", choices=["ptq", "qat", "lsq"])
    ap.add_argument("--epochs", type=int, default=1, help="QAT/LSQ epochs")
    ap.add_argument("--lr", type=float, default=0.005, help="QAT/LSQ learning rate")
    ap.add_argument("--kd-weight", type=float, default=0.0)
    ap.add_argument("--finetune-subset", type=int, default=10000)
    ap.add_argument("--min-bits", type=int, default=None, help="no layer below this many weight bits")
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning seed (batch order, augmentation)")
    ap.add_argument("--freeze-bn-epoch", type=int, default=None,
                    help="QAT: BN statistics update until this epoch (default: QuantConfig's, 0: frozen from the "
                         "start; layers below bn_live_below_bits keep BN live; LSQ freezes every BN)")
    ap.add_argument("--estimator", default=None, choices=["loss", "hessian", "max"])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from pipeline import load_baseline, packed_meta, public, quantize_model
    from pipeline.sensitivity import allocate, layer_bytes, weight_scores
    from quantization import FineTune, QuantConfig
    from trainer import load_dataset

    torch.set_num_threads(2)
    fp32, ck = load_baseline(a.baseline)
    tc = ck["config"]
    data = load_dataset(a.data, subset=tc.get("subset", 0), val_size=tc.get("val_size", 0), seed=tc.get("seed", 0),
                        download=False)
    tune_data = data.with_train_subset(a.finetune_subset, tc.get("seed", 0)) if a.method != "ptq" else data
    table = json.loads(Path(a.sensitivity).read_text())
    est, scores = weight_scores(table, a.estimator)
    base = QuantConfig.from_dict({**table["settings"]["base"], "a_bits": a.a_bits, "method": a.method,
                                  **({} if a.freeze_bn_epoch is None else {"freeze_bn_epoch": a.freeze_bn_epoch})})
    meta = packed_meta(ck)
    layers = [r["name"] for r in table["layers"]]
    costs = layer_bytes(fp32, base, meta, layers, sorted({b for v in scores.values() for b in v}))
    fp32_top1 = (ck.get("history") or [{}])[-1].get("test_top1")
    rows = []

    def run(label: str, cfg: QuantConfig, extra: dict) -> None:
        t = time.time()
        res = public(quantize_model(fp32, tune_data, cfg, fine_tune=FineTune(a.epochs, a.lr, a.kd_weight),
                                    fp32_top1=fp32_top1, model_meta=meta, act_memory=False,
                                    seed=a.seed, device="cpu"))
        row = {"label": label, **extra, **{k: res[k] for k in ("top1", "val_top1", "drop", "comp_bytes", "comp_mb",
                                                               "ratio", "avg_w_bits")}, "seconds": round(time.time() - t, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps({"baseline": a.baseline, "fp32_top1": fp32_top1, "method": a.method,
                                           "a_bits": a.a_bits, "estimator": est, "sensitivity": a.sensitivity,
                                           "epochs": a.epochs if a.method != "ptq" else 0, "lr": a.lr,
                                           "kd_weight": a.kd_weight, "seed": a.seed,
                                           "finetune_images": len(tune_data.train_y),
                                           "freeze_bn_epoch": base.freeze_bn_epoch, "min_bits": a.min_bits,
                                           "rows": rows}, indent=1))

    for b in [int(x) for x in a.uniform.split(",") if x]:
        run(f"uniform W{b}", base.replace(w_bits=b), {"kind": "uniform", "w_bits": b})
    for mb in [float(x) for x in a.budgets.split(",") if x]:
        alloc = allocate(table, fp32, base, meta, mb, estimator=est, costs=costs, min_bits=a.min_bits)
        run(f"alloc {mb:g} MB", alloc["config"], {"kind": "allocated", "budget_mb": mb,
                                                   "predicted_bytes": alloc["predicted_bytes"],
                                                   "bits": alloc["bits"], "sensitivity": alloc["sensitivity"]})
        assert rows[-1]["comp_bytes"] == alloc["predicted_bytes"], "packed size differs from the allocation's prediction"


if __name__ == "__main__":
    main()
