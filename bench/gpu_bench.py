"""Everything GPU-specific in one short run (a GPU is lent for ~15 minutes in all, 10 per call).

1. checks the GPU (nvidia-smi, torch.cuda);
2. throughput: tensor pipeline vs DataLoader, FP32 vs fake-quant step, eval images/s (bench/throughput.py);
3. trains the reference model, MobileNet-v2 width 1.0, with configs/gpu.yaml (the fast one-GPU recipe) for
   as many epochs as fit in --train-minutes, writes it weights-only as OUT/mobilenetv2-w1.0-cifar10.pt and
   measures it as `bitsearch eval --checkpoint` does (FP32);
4. 1, 4 and 8 concurrent quarter-GPU trials on it (Ray Tune sweeps of identical short QAT trials): trials
   per hour, images/s per trial and in total, each trial's GPU memory peak;
5. a short PTQ + QAT sweep on it, if time is left.
The whole run keeps to --deadline-minutes (a call lasts at most 10): a stage that would not fit is skipped
and says so. OUT/gpu_bench.json (+ .md) is rewritten after every stage, so a killed run still returns what
it measured; OUT holds only what should come back (at most 8 files); scratch goes to --work.

    bash bench/gpu.sh OUT                      # on the GPU machine (DATA=... to point at CIFAR-10)
    bash bench/gpu.sh OUT --tiny               # CPU smoke setting (synthetic data, about a minute)
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
REFERENCE = "mobilenetv2-w1.0-cifar10.pt"


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


class Bench:
    """The run's settings, its deadline and its results (written after every stage)."""

    def __init__(self, a: argparse.Namespace):
        import torch
        self.tiny, self.out, self.work = a.tiny, Path(a.out).resolve(), Path(a.work).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = str(tiny_data(self.work / "tinydata")) if self.tiny else a.data
        self.dev = "cuda" if torch.cuda.is_available() and not self.tiny else "cpu"
        self.deadline = T0 + 60 * a.deadline_minutes
        self.train_minutes = a.train_minutes if a.train_minutes is not None else (0.01 if self.tiny else 5.0)
        self.res: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "tiny": self.tiny, "device": self.dev,
                          "command": " ".join(sys.argv), "skipped": {}}

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, stage: str, seconds: float) -> bool:
        if self.left() >= seconds:
            return True
        self.res["skipped"][stage] = f"needs ~{seconds:.0f} s, {max(0.0, self.left()):.0f} s left"
        log(f"skipped {stage}: {self.res['skipped'][stage]}")
        return False

    def save(self) -> None:
        self.res["seconds"] = time.time() - T0
        (self.out / "gpu_bench.json").write_text(json.dumps(self.res, indent=2, default=str))
        (self.out / "gpu_bench.md").write_text(markdown(self.res))


def gpu_facts(b: Bench) -> None:
    import torch
    if b.dev == "cuda":
        b.res["gpu"] = torch.cuda.get_device_name()
        b.res["bf16"] = torch.cuda.is_bf16_supported()
        smi = shutil.which("nvidia-smi")
        b.res["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True).stdout.strip() if smi else None
    b.res["torch"] = torch.__version__
    log(f"device {b.dev} {b.res.get('gpu', '')}")


def throughput(b: Bench) -> None:
    tp = b.work / "throughput.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--data", b.data,
                    "--width", "0.25" if b.tiny else "1.0", "--steps", "3" if b.tiny else "20",
                    "--batch-size", "16" if b.tiny else "128", "--device", b.dev, "--rounds", "1",
                    "--out", str(tp)], check=True)
    b.res["throughput"] = json.loads(tp.read_text())
    log(f"throughput {b.res['throughput']}")


def reference_model(b: Bench) -> str:
    """Trains configs/gpu.yaml for what fits; returns the weights-only checkpoint's path."""
    import yaml

    from pipeline.quantize import evaluate_checkpoint
    from trainer import TrainConfig, save_weights_only
    from trainer.baseline import fit_baseline
    section = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())["train"]
    if b.tiny:
        section.update(width=0.25, batch_size=16, lr=0.05, warmup_epochs=0, val_size=15, compile=False, ema_decay=0.9)
    # epochs: the measured step rate (batch 128, scaled to the profile's batch by nothing: larger batches
    # run no slower per image) plus validation, minus a minute for torch.compile's first steps
    img_s = b.res["throughput"]["tensor_pipeline_img_s"]
    n_train = 120 - 15 if b.tiny else 50000 - section["val_size"]
    epoch_s = 1.1 * n_train / img_s + (0.2 if b.tiny else 1.0)
    budget = min(60 * b.train_minutes, b.left() - (30 if b.tiny else 200)) - (0 if b.tiny else 60)
    epochs = max(1, int(budget / epoch_s))
    cfg = TrainConfig.from_dict({**section, "epochs": epochs, "warmup_epochs": min(section["warmup_epochs"], epochs / 4),
                                 "device": b.dev})
    log(f"reference model: {epochs} epochs (~{epoch_s:.1f} s each) within {budget / 60:.1f} min")
    t = time.time()
    base = fit_baseline(b.data, b.work / "baseline", cfg, download=False)
    seconds = time.time() - t
    ref = save_weights_only(base["checkpoint"], b.out / REFERENCE)
    ev = evaluate_checkpoint(ref, b.data, device=b.dev, download=False)
    b.res["reference"] = {"config": cfg.to_dict(), "params": base["params"], "epochs": epochs, "seconds": seconds,
                          "val_top1": base["val_top1"], "train_top1": base["train_top1"], "test_top1": ev["top1"],
                          "file": ref.name, "file_bytes": ref.stat().st_size,
                          "history": [{k: round(v, 4) for k, v in h.items()} for h in base["history"]]}
    log(f"reference model: test top-1 {ev['top1']:.2f}% after {epochs} epochs in {seconds:.0f} s")
    return str(ref)


def concurrency(b: Bench, ref: str) -> None:
    from tune.results import load_trials
    from tune.search import run
    from tune.settings import settings_from
    b.res["concurrency"] = {}
    for k in ((2,) if b.tiny else (1, 4, 8)):  # tiny: the same code path once, two half-CPU trials at a time
        if not b.fits(f"concurrency{k}", 20 if b.tiny else 90):
            break
        share = {"gpus_per_trial": 0, "cpus_per_trial": 0.5} if b.tiny else {"gpus_per_trial": 0.25, "cpus_per_trial": 1}
        s = settings_from({**common(b, ref), **share, "name": f"concurrency{k}", "mode": "sweep", "max_concurrent": k,
                           "qat_epochs": 1, "grid": {"w_bits": [4] * k, "method": ["qat"]}})
        t = time.time()
        summ = run(s)
        dt = time.time() - t
        reports = [r for tr in load_trials(s.path) for r in tr["reports"] if r.get("images_per_s")]
        per_trial = [r["images_per_s"] for r in reports]
        b.res["concurrency"][str(k)] = {
            "trials": len(summ["trials"]), "seconds": dt, "trials_per_hour": 3600 * len(summ["trials"]) / dt,
            "images_per_s_per_trial": per_trial, "images_per_s_total": sum(per_trial),
            "gpu_peak_memory_mb_per_trial": [r.get("gpu_peak_memory_mb") for r in reports]}
        log(f"{k} concurrent: {b.res['concurrency'][str(k)]}")
        b.save()


def sweep(b: Bench, ref: str) -> None:
    if not b.fits("sweep", 20 if b.tiny else 150):
        return
    from tune.search import run
    from tune.settings import settings_from
    s = settings_from({**common(b, ref), "name": "sweep", "mode": "sweep", "max_concurrent": 2 if b.tiny else 6,
                       "gpus_per_trial": 0 if b.tiny else 0.16, "cpus_per_trial": 1 if b.tiny else 2, "qat_epochs": 1,
                       "grid": ({"w_bits": [8, 2], "a_bits": [8], "method": ["ptq"]} if b.tiny else
                                {"w_bits": [8, 4, 2], "a_bits": [8], "method": ["ptq", "qat"]})})
    b.res["sweep"] = [{k: t.get(k) for k in ("label", "w_bits", "a_bits", "method", "test_top1", "drop", "comp_mb", "ratio")}
                      for t in run(s)["trials"]]


def common(b: Bench, ref: str) -> dict:
    return dict(baseline=ref, data=b.data, out=str(b.work / "runs"), batch_size=16 if b.tiny else 256,
                finetune_subset=0 if b.tiny else 10000)


def markdown(res: dict) -> str:
    md = [f"# GPU benchmark ({res['date']}, {res.get('gpu', res['device'])}, tiny={res['tiny']})", "",
          f"    {res['command']}", ""]
    tp = res.get("throughput")
    if tp:
        md.append(f"- tensor pipeline {tp['tensor_pipeline_img_s']:.0f} img/s (batch 128, width of the run)"
                  + (f" vs DataLoader {tp['dataloader_img_s']:.0f} img/s" if tp.get("dataloader_img_s") else ""))
    ref = res.get("reference")
    if ref:
        md.append(f"- reference model (configs/gpu.yaml): {ref['epochs']} epochs in {ref['seconds']:.0f} s, "
                  f"test top-1 {ref['test_top1']:.2f}% (FP32), val {ref['val_top1']}%, {ref['file']} {ref['file_bytes']:,} B")
    md += [f"- {k} concurrent trial(s): {v['trials_per_hour']:.0f} trials/hour, {v['images_per_s_total']:.0f} img/s in all "
           f"({', '.join(f'{x:.0f}' for x in v['images_per_s_per_trial'])} per trial), peak GPU memory per trial "
           f"{v['gpu_peak_memory_mb_per_trial']} MB" for k, v in res.get("concurrency", {}).items()]
    md += [f"- skipped {k}: {v}" for k, v in res["skipped"].items()]
    if res.get("sweep"):
        md += ["", "| trial | method | top-1 | drop | MB | ratio |", "|---|---|---|---|---|---|"]
        md += [f"| {r['label']} | {r['method']} | {r['test_top1']:.2f} | {r['drop']:.2f} | {r['comp_mb']:.3f} | {r['ratio']:.2f} |"
               for r in res["sweep"]]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="what comes back: gpu_bench.json/.md and the reference checkpoint")
    ap.add_argument("--work", default=str(ROOT / "build" / "gpu-work"), help="scratch: runs, the full checkpoint")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke setting")
    ap.add_argument("--train-minutes", type=float, default=None, help="reference-model training (default 5; tiny 0.01)")
    ap.add_argument("--deadline-minutes", type=float, default=9.3, help="the whole run (a call lasts at most 10)")
    b = Bench(ap.parse_args())
    import ray
    gpu_facts(b)
    throughput(b)
    b.save()
    ref = reference_model(b)
    b.save()
    ray.init(num_cpus=2 if b.tiny else None, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024 if b.tiny else None)
    concurrency(b, ref)
    sweep(b, ref)
    b.save()
    log(f"done in {time.time() - T0:.0f} s: {b.out / 'gpu_bench.json'}")


if __name__ == "__main__":
    main()
