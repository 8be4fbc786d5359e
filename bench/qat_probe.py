"""One QAT fine-tuning of a baseline, measured (not a test): the probe behind docs/lab/2026-12-03e-results-history.md, section 7's
"QAT instability" table. Positional arguments:

    python bench/qat_probe.py CHECKPOINT PRECISION W_BITS A_BITS IMAGES THREADS LR BN_LIVE_BELOW_BITS [LIVE_BN_LR_FACTOR]
    python bench/qat_probe.py runs/cpu-D/checkpoint.pt on 8 8 10000 2 0.01 4    # 82.58 (collapsed to 10% before
                                                                                 # frozen-BN QAT trained the fold)
    python bench/qat_probe.py runs/cpu-D/checkpoint.pt on 4 4 10000 2 0.003 4   # 78.92

PRECISION: on = the default (bf16 autocast on a native-bf16 CPU), off = FP32 (as on a CPU without it).
LIVE_BN_LR_FACTOR: learning-rate multiple of the layers that keep BN live (QuantConfig.live_bn_lr_factor; default
its default).
IMAGES: stratified fine-tuning subset of the baseline's training split (val 5,000, test 10,000 as always).
Reads ../shared/data/cifar10-jpeg.tar.gz (BITSEARCH_DATA to override).
"""
import importlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, installed or not

T = importlib.import_module("trainer.train")
from pipeline.quantize import load_baseline, quantize_model  # noqa: E402
from quantization import FineTune, QuantConfig  # noqa: E402
from trainer.data import load_dataset  # noqa: E402

base, amp_mode, wb, ab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
images, threads = int(sys.argv[5]), int(sys.argv[6])
lr, live = float(sys.argv[7]), int(sys.argv[8])
factor = float(sys.argv[9]) if len(sys.argv) > 9 else QuantConfig().live_bn_lr_factor
torch.set_num_threads(threads)
fp32, ck = load_baseline(base)
data = load_dataset(os.environ.get("BITSEARCH_DATA", "../shared/data/cifar10-jpeg.tar.gz"), val_size=5000,
                    seed=0).with_train_subset(images, 0)
if amp_mode == "off":
    T.cpu_has_native_bf16 = lambda: False
t = time.time()
r = quantize_model(fp32, data, QuantConfig(w_bits=wb, a_bits=ab, method="qat", bn_live_below_bits=live,
                                           live_bn_lr_factor=factor),
                   fine_tune=FineTune(1, lr), batch_size=128, device="cpu", act_memory=False)
print(f"{base} precision={amp_mode} W{wb}A{ab} images={images} lr={lr} bn_live_below_bits={live} "
      f"live_bn_lr_factor={factor:g}: train top-1 "
      f"{[round(h['train_top1'], 2) for h in r['history']]}, val {r['val_top1']:.2f}, test {r['top1']:.2f} "
      f"({time.time() - t:.0f} s)", flush=True)
