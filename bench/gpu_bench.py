"""Everything GPU-specific in one short run (a GPU is often lent for ~15 minutes at a time).

1. checks the GPU (nvidia-smi, torch.cuda);
2. throughput: tensor pipeline vs DataLoader, FP32 vs fake-quant step, eval images/s (bench/throughput.py);
3. 1, 4 and 8 concurrent quarter-GPU trials (Ray Tune sweeps of identical short QAT trials): trials per hour,
   images/s per trial and in total, each trial's GPU memory peak;
4. trains the baseline with the seed recipe for as many epochs as fit in --train-minutes;
5. a short PTQ + QAT sweep on it.
Every figure goes to OUT/gpu_bench.json (+ OUT/gpu_bench.md) and the baseline checkpoint to OUT/baseline.

    bash bench/gpu.sh OUT                      # on the GPU machine (DATA=... to point at CIFAR-10)
    bash bench/gpu.sh OUT --tiny               # CPU smoke setting (synthetic data, seconds)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def tiny_data(root: Path) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for ci, c in enumerate(("a", "b", "c")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(rng.normal(60, 30, (32, 32, 3)) + 150 * (np.arange(3) == ci), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke setting")
    ap.add_argument("--train-minutes", type=float, default=None)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray
    import torch

    from trainer import TrainConfig
    from trainer.baseline import fit_baseline
    from tune.results import load_trials
    from tune.search import run
    from tune.settings import settings_from

    tiny = a.tiny
    data = str(tiny_data(out / "tinydata")) if tiny else a.data
    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "tiny": tiny, "device": dev}

    # 1. GPU check
    if dev == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
        smi = shutil.which("nvidia-smi")
        res["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip() if smi else None
    log(f"device {dev} {res.get('gpu', '')}")

    # 2. throughput
    width = 0.25 if tiny else 1.0
    tp = out / "throughput.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--data", data, "--width", str(width),
                    "--steps", "3" if tiny else "30", "--batch-size", "16" if tiny else "128", "--device", dev,
                    "--rounds", "1" if tiny else "3",
                    "--out", str(tp)], check=True)
    res["throughput"] = json.loads(tp.read_text())
    log(f"throughput {res['throughput']}")

    # 4 (first, the rest needs it). baseline, as many epochs as fit
    n_train = 120 if tiny else 45000
    img_s = res["throughput"]["tensor_pipeline_img_s"]
    eval_s = 10000 / max(1.0, res["throughput"]["fp32_eval_img_s"]) if not tiny else 0.5
    minutes = a.train_minutes if a.train_minutes is not None else (0.01 if tiny else 7.0)
    epoch_s = 1.15 * n_train / img_s + eval_s / 5
    epochs = max(1, int(minutes * 60 / epoch_s))
    tcfg = TrainConfig(width=width, epochs=epochs, batch_size=16 if tiny else 128, lr=0.05 if tiny else 0.1,
                       val_size=15 if tiny else 5000, eval_every=5, device=dev)
    log(f"baseline: {epochs} epochs (~{epoch_s:.1f} s each) within {minutes} min")
    t = time.time()
    base = fit_baseline(data, out / "baseline", tcfg, download=False)
    res["baseline"] = {k: base[k] for k in ("params", "epochs", "top1", "val_top1", "checkpoint")}
    res["baseline"]["seconds"] = time.time() - t
    log(f"baseline {res['baseline']}")

    ray.init(num_cpus=2 if tiny else None, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024 if tiny else None)
    common = dict(baseline=base["checkpoint"], data=data, out=str(out / "runs"), batch_size=16 if tiny else 256)

    # 3. trials sharing one GPU: 1, 4 and 8 concurrent quarter-GPU trials (CPU smoke: 1 and 2 half-CPU trials)
    res["concurrency"] = {}
    for k in ((1, 2) if tiny else (1, 4, 8)):
        share = {"gpus_per_trial": 0.25, "cpus_per_trial": 1} if not tiny else {"gpus_per_trial": 0, "cpus_per_trial": 0.5}
        s = settings_from({**common, **share, "name": f"concurrency{k}", "mode": "sweep", "max_concurrent": k,
                           "qat_epochs": 1, "grid": {"w_bits": [4] * k, "method": ["qat"]}})
        t = time.time()
        summ = run(s)
        dt = time.time() - t
        reports = [r for tr in load_trials(s.path) for r in tr["reports"] if r.get("images_per_s")]
        per_trial = [r["images_per_s"] for r in reports]
        res["concurrency"][str(k)] = {
            "trials": len(summ["trials"]), "seconds": dt, "trials_per_hour": 3600 * len(summ["trials"]) / dt,
            "images_per_s_per_trial": per_trial, "images_per_s_total": sum(per_trial),
            "gpu_peak_memory_mb_per_trial": [r.get("gpu_peak_memory_mb") for r in reports]}
        log(f"{k} concurrent: {res['concurrency'][str(k)]}")

    # 5. short PTQ + QAT sweep
    s = settings_from({**common, "name": "sweep", "mode": "sweep", "max_concurrent": 2 if tiny else 4,
                       "gpus_per_trial": 0 if tiny else 0.25, "cpus_per_trial": 1 if tiny else 2,
                       "qat_epochs": 1 if tiny else 2,
                       "grid": ({"w_bits": [8, 2], "a_bits": [8], "method": ["ptq"]} if tiny else
                                {"w_bits": [8, 4, 2], "a_bits": [8, 4], "method": ["ptq", "qat"]})})
    summ = run(s)
    res["sweep"] = [{k: t[k] for k in ("W_bits", "A_bits", "method", "Accuracy", "Drop", "Comp_MB", "Ratio", "Act_ratio")}
                    for t in summ["trials"]]
    res["seconds"] = time.time() - T0
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=2, default=str))
    md = [f"# GPU benchmark ({res['date']}, {res.get('gpu', dev)}, tiny={tiny})", "",
          f"- tensor pipeline {img_s:.0f} img/s" + (f" vs DataLoader {res['throughput']['dataloader_img_s']:.0f} img/s "
                                                  f"({res['throughput']['pipeline_speedup']:.2f}x)"
                                                  if res["throughput"]["dataloader_img_s"] else ""),
          f"- fake-quant step {res['throughput']['fakequant_step_overhead']:.2f}x FP32 with BN statistics live, "
          f"{res['throughput']['fakequant_frozen_bn_step_overhead']:.2f}x with BN frozen",
          f"- baseline {res['baseline']['epochs']} epochs in {res['baseline']['seconds']:.0f} s: test top-1 "
          f"{res['baseline']['top1']}%"]
    md += [f"- {k} concurrent trial(s): {v['trials_per_hour']:.0f} trials/hour, {v['images_per_s_total']:.0f} img/s in all "
           f"({', '.join(f'{x:.0f}' for x in v['images_per_s_per_trial'])} per trial)" for k, v in res["concurrency"].items()]
    md += ["", "| W | A | method | top-1 | drop | MB | ratio | act ratio |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['W_bits']} | {r['A_bits']} | {r['method']} | {r['Accuracy']:.2f} | {r['Drop']:.2f} | {r['Comp_MB']:.3f} "
           f"| {r['Ratio']:.2f} | {r['Act_ratio']:.2f} |" for r in res["sweep"]]
    (out / "gpu_bench.md").write_text("\n".join(md) + "\n")
    log(f"done in {res['seconds']:.0f} s: {out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
