"""Throughput benchmarks (not tests). Prints a JSON object and writes it to --out.

1. Training images/s: the in-memory tensor pipeline (trainer.GpuLoader) vs a seed-style
   torchvision DataLoader with PIL transforms (RandomCrop(32, 4) + flip + ToTensor + Normalize,
   2 workers), same model, same steps.
2. Training step time with fake-quant (W4A4 QAT) vs FP32: with BN statistics live (the first
   freeze_bn_epoch epochs) and frozen (the exact folded form, after that).
3. Eval images/s fake-quant vs FP32.

    python bench/throughput.py --data ../shared/data/cifar10-jpeg.tar.gz --width 0.5 --steps 10 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not


def _steps(model, batches, device, steps, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    it = iter(batches)
    n, t0 = 0, None
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return n / dt, dt / steps


class _Frozen(nn.Module):
    """Keeps BN frozen although _steps calls .train() (as QATSchedule does each epoch)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def train(self, mode=True):
        from quantization import set_bn_frozen
        super().train(mode)
        set_bn_frozen(self.m, True)
        return self

    def forward(self, x):
        return self.m(x)


def _forever(loader):
    while True:
        yield from loader


def _dataloader_img_s(model, data, a, dev) -> float | None:
    """The torchvision DataLoader pipeline's training throughput, for comparison; None without torchvision
    (a bare GPU machine: bench/gpu_bundle.py does not carry it, its build is tied to torch's)."""
    try:
        import torchvision.transforms as T
    except ImportError:
        return None
    from PIL import Image

    from trainer import CIFAR10_MEAN, CIFAR10_STD

    class PilSet(torch.utils.data.Dataset):
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])

        def __len__(self):
            return len(data.train_y)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(data.train_x[i].permute(1, 2, 0).numpy())), int(data.train_y[i])

    dl = torch.utils.data.DataLoader(PilSet(), batch_size=a.batch_size, shuffle=True, num_workers=2,
                                     pin_memory=dev.type == "cuda", persistent_workers=True)
    return _steps(model, _forever(dl), dev, a.steps)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the step-time comparison")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench/throughput.json")
    a = ap.parse_args()

    from quantization import QuantConfig, calibrate, prepare, recalibrate_bn, set_bn_frozen
    from trainer import GpuLoader, MobileNetV2, load_dataset, resolve_device
    from trainer.train import evaluate

    dev = resolve_device(a.device)
    data = load_dataset(a.data, download=False)
    res = {"device": str(dev), "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "width": a.width, "batch_size": a.batch_size, "steps": a.steps, "rounds": a.rounds, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}

    # 1. pipelines
    torch.manual_seed(0)
    model = MobileNetV2(width=a.width).to(dev)
    tensor_loader = GpuLoader(data.train_x.to(dev), data.train_y.to(dev), a.batch_size, train=True)
    res["tensor_pipeline_img_s"], _ = _steps(model, _forever(tensor_loader), dev, a.steps)

    res["dataloader_img_s"] = _dataloader_img_s(model, data, a, dev)
    res["pipeline_speedup"] = (res["tensor_pipeline_img_s"] / res["dataloader_img_s"]
                               if res["dataloader_img_s"] else None)

    # 2. fake-quant training step vs FP32 (same data path), the three variants interleaved over
    # --rounds rounds and the median taken, so a slow spell of a shared machine hits all of them
    torch.manual_seed(0)
    fp = MobileNetV2(width=a.width).to(dev)
    calib = _forever(GpuLoader(data.train_x[:1024].to(dev), data.train_y[:1024].to(dev), a.batch_size, train=False))
    # BN statistics of real batches first, as a trained model has them: calibrated at BN's initial
    # statistics the deepest quantizers' scales came out at 1e-8..1e-6 (docs/lab/2026-12-03e-results-history.md, section 5)
    recalibrate_bn(fp, (x for x, _ in calib), 4)
    q = prepare(fp, QuantConfig(w_bits=4, a_bits=4, method="qat")).to(dev)
    calibrate(q, (x for x, _ in calib), 4)
    q_frozen = copy.deepcopy(q)
    set_bn_frozen(q_frozen, True)  # after freeze_bn_epoch the exact folded form runs: no separate BN
    variants = {"fp32": fp, "fakequant": q, "fakequant_frozen_bn": _Frozen(q_frozen)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for k, m in variants.items():
            times[k].append(_steps(m, _forever(tensor_loader), dev, a.steps)[1])
    for k, ts in times.items():
        res[f"{k}_step_s"] = statistics.median(ts)
        res[f"{k}_step_s_rounds"] = ts
        if k != "fp32":
            res[f"{k}_step_overhead"] = statistics.median(t / f for t, f in zip(ts, times["fp32"]))

    # 3. eval throughput
    n = min(len(data.test_y), 2000 if dev.type == "cpu" else 10000)
    for name, m in (("fp32", fp), ("fakequant", q)):
        m.eval()
        evaluate(m, data.test_x[:200], data.test_y[:200], device=dev)
        t0 = time.perf_counter()
        evaluate(m, data.test_x[:n], data.test_y[:n], device=dev)
        res[f"{name}_eval_img_s"] = n / (time.perf_counter() - t0)
    print(json.dumps(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
