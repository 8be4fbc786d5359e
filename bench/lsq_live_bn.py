"""LSQ with BN live in the 2-bit layers (not what bitsearch does: LSQ keeps every BN frozen), measured step by
step (not a test): the probe behind docs/lab/2026-12-03e-results-history.md, section 7, "LSQ at 2 bits and live BN".

    python bench/lsq_live_bn.py CHECKPOINT W_BITS A_BITS IMAGES LR [--hold-fold]

Fine-tunes one epoch with LSQ on a stratified IMAGES-image training subset, the layers below
bn_live_below_bits with live BN (as QAT runs them), then prints validation top-1 (5,000 images) after
calibration, after the epoch, after re-estimating the live BN statistics (16 augmented batches, as
pipeline.quantize does) and after freeze(); also the fraction of quantized weights at zero and how far the
learned weight steps moved. --hold-fold: the conv's fold gamma/sigma stays at its pre-re-estimation value
while the statistics are re-estimated (recalibrate_bn resets the running variance to 1 first). Two threads.
Reads ../shared/data/cifar10-jpeg.tar.gz (BITSEARCH_DATA to override).
"""
import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

import quantization.api as api  # noqa: E402
from pipeline.quantize import calibration_batches, load_baseline, prepare_quantized  # noqa: E402
from quantization import (QATSchedule, QuantConfig, calibrate, freeze, recalibrate_bn, set_act_observing,  # noqa: E402
                          lr_scales)
from quantization.config import Method  # noqa: E402
from quantization.modules import QuantConvBn2d  # noqa: E402
from trainer import TrainConfig, evaluate, train  # noqa: E402
from trainer.data import load_dataset  # noqa: E402

ap = argparse.ArgumentParser()
for name, typ in (("checkpoint", str), ("w_bits", int), ("a_bits", int), ("images", int), ("lr", float)):
    ap.add_argument(name, type=typ)
ap.add_argument("--hold-fold", action="store_true")
a = ap.parse_args()
torch.set_num_threads(2)
dev = torch.device("cpu")


qat_rule = api.live_bn_layers
# QAT's rule for LSQ too (QATSchedule and lr_scales look it up in quantization.api)
api.live_bn_layers = lambda model, cfg: qat_rule(model, dataclasses.replace(cfg, method=Method.QAT))
fp32, _ = load_baseline(a.checkpoint)
data = load_dataset(os.environ.get("BITSEARCH_DATA", "../shared/data/cifar10-jpeg.tar.gz"), val_size=5000,
                    seed=0).with_train_subset(a.images, 0)
cfg = QuantConfig(w_bits=a.w_bits, a_bits=a.a_bits, method="lsq")
q = prepare_quantized(fp32, cfg, None, dev).model
calibrate(q, calibration_batches(data, 128, 0, dev), cfg.calib_batches)
convs = [m for m in q.modules() if isinstance(m, QuantConvBn2d) and m.wq is not None]


def report(tag):
    q.eval()
    with torch.no_grad():
        zero = sum((m.quantized_weight_bias()[0] == 0).float().mean().item() for m in convs) / len(convs)
    print(f"{tag}: val top-1 {evaluate(q, data.val_x, data.val_y, device=dev)['top1']:.2f}, "
          f"quantized weights at zero {zero:.3f}", flush=True)


report("calibrated")
steps0 = [m.wq.step.detach().clone() for m in convs]
res = train(q, data, TrainConfig(epochs=1, lr=a.lr, batch_size=128, seed=0, device="cpu", no_decay_bn_bias=True,
                                 eval_test=False, width=getattr(fp32, "width", 1.0)),
            callbacks=[QATSchedule(cfg)], write_reports=False, lr_scales=lr_scales(q, cfg))
moved = [((m.wq.step.detach() - s0).abs() / s0.abs()).mean().item() for m, s0 in zip(convs, steps0)]
print(f"train top-1 {res['history'][-1]['train_top1']:.2f}; weight steps moved {100 * sum(moved) / len(moved):.2f}% "
      "on average (relative)", flush=True)
set_act_observing(q, False)
report("after the epoch")
held = []
if a.hold_fold:  # the fold factor from the variance as it was, while the statistics are re-estimated
    for m in api.live_bn_layers(q, cfg):
        var = m.bn.running_var.clone()
        m._bn_factor = (lambda m, var: lambda: m.bn.weight / torch.sqrt(var + m.bn.eps))(m, var)
        held.append(m)
n = recalibrate_bn(q, calibration_batches(data, 128, 1, dev, augmented=True), 16)
for m in held:
    del m._bn_factor
report(f"after re-estimating BN over {n} batches{' (fold held)' if a.hold_fold else ''}")
freeze(q)
report("after freeze")
