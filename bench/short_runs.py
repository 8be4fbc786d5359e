"""Short training runs with the default recipe: test top-1 as trained, and with BN statistics
re-estimated at the end, over seeds and warm-up settings.

    python bench/short_runs.py --data ../shared/data/cifar10-jpeg.tar.gz --subset 2000 --epochs 1 \
        --seeds 0 1 2 --warmup 0 0.3
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.model import MobileNetV2
from trainer.train import evaluate, reestimate_bn, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--subset", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=float, nargs="+", default=[0.0])
    a = ap.parse_args()
    full = load_dataset(a.data)
    rows = []
    for wu in a.warmup:
        for seed in a.seeds:
            cfg = TrainConfig(epochs=a.epochs, subset=a.subset, width=a.width, seed=seed, warmup_epochs=wu,
                              bn_reestimate="off", amp="off", channels_last="off")
            data = full.with_train_subset(a.subset, seed)
            model = MobileNetV2(num_classes=10, width=a.width)
            res = train(model, data, cfg, write_reports=False)
            m2 = copy.deepcopy(model)
            reestimate_bn(m2, data.train_x)
            after = evaluate(m2, data.test_x, data.test_y)["top1"]
            rows.append({"warmup": wu, "seed": seed, "loss": res["history"][-1]["train_loss"],
                         "test_top1": res["top1"], "test_top1_bn": after})
            print(json.dumps(rows[-1]), flush=True)
    for wu in a.warmup:
        r = [x for x in rows if x["warmup"] == wu]
        for k in ("test_top1", "test_top1_bn"):
            v = [x[k] for x in r]
            print(f"warmup {wu}: {k} mean {statistics.mean(v):.2f} sd {statistics.pstdev(v):.2f} {v}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
