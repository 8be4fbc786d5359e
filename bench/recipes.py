"""Short-schedule recipe exploration (issue 10): many training recipes at once, one process each.

The CPU profile's goal is the best test top-1 within 45 minutes of training on 2 CPU cores, i.e. a
fixed number of epochs at a given width. What a recipe reaches after N epochs does not depend on
the device (same batches, same bf16 autocast), so a GPU can rank recipes in minutes that a CPU needs
45 minutes each for; the winner is then confirmed on the CPU. Each variant is `configs/cpu.yaml`'s
`train:` section with some keys changed, trained in its own process (several share one GPU); every
result is written to OUT/recipes.json as soon as it exists, so a run cut short keeps what finished.

    python bench/recipes.py --data ../shared/data/cifar10-jpeg.tar.gz --out runs/recipes [--parallel 12]
    python bench/recipes.py --tiny --out /tmp/r      # smoke setting: synthetic data, 2 tiny variants
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_bench import tiny_data  # noqa: E402 - the same synthetic smoke data (bench/ is on sys.path)

# name -> changes to configs/cpu.yaml's train section (compile is off here: it changes speed, not accuracy)
VARIANTS: dict[str, dict] = {
    "cpu_yaml": {},
    "wd5e-4": {"weight_decay": 5e-4},
    "wd5e-4_nobn": {"weight_decay": 5e-4, "no_decay_bn_bias": True},
    "wd5e-4_lr0.4": {"weight_decay": 5e-4, "lr": 0.4},
    "wd5e-4_lr0.1": {"weight_decay": 5e-4, "lr": 0.1},
    "wd5e-4_ls0": {"weight_decay": 5e-4, "label_smoothing": 0.0},
    "wd1e-3": {"weight_decay": 1e-3},
    "wd5e-4_b256_lr0.4": {"weight_decay": 5e-4, "batch_size": 256, "lr": 0.4},
    "wd5e-4_b64_lr0.1": {"weight_decay": 5e-4, "batch_size": 64, "lr": 0.1},
    "wd5e-4_lr0.3_wu1": {"weight_decay": 5e-4, "lr": 0.3, "warmup_epochs": 1.0},
    "wd5e-4_w0.35_e14": {"weight_decay": 5e-4, "width": 0.35, "epochs": 14},
    "wd5e-4_e15": {"weight_decay": 5e-4, "epochs": 15},
}
TINY = {"tiny_a": {}, "tiny_b": {"weight_decay": 5e-4}}


def base_train_config(tiny: bool) -> dict:
    import yaml
    d = yaml.safe_load((ROOT / "configs" / "cpu.yaml").read_text())["train"]
    d.update(compile=False, device="auto", eval_every=1000)  # test: at the last epoch only
    if tiny:
        d.update(width=0.25, epochs=2, batch_size=16, val_size=15, warmup_epochs=0.0)
    return d


def child(name: str, changes: dict, data: str, out: Path, tiny: bool) -> None:
    import torch
    torch.set_num_threads(1)
    from trainer import TrainConfig
    from trainer.baseline import fit_baseline
    cfg = TrainConfig.from_dict({**base_train_config(tiny), **changes})
    t = time.time()
    r = fit_baseline(data, out / name, cfg, download=False)
    h = r["history"]
    row = {"name": name, "changes": changes, "test_top1": r["top1"], "val_top1": r["val_top1"],
           "train_top1": r["train_top1"], "epochs": cfg.epochs, "width": cfg.width, "batch_size": cfg.batch_size,
           "seconds": round(time.time() - t, 1),
           "train_img_s": round(sum(e["images_per_s"] for e in h) / len(h), 1),
           "val_curve": [round(e.get("val_top1", 0.0), 2) for e in h]}
    (out / name / "row.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--parallel", type=int, default=len(VARIANTS), help="processes at once")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--tiny", action="store_true", help="smoke setting: synthetic data, two tiny variants")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants = TINY if a.tiny else VARIANTS
    if a.child:
        child(a.child, variants[a.child], a.data, out, a.tiny)
        return
    names = [n for n in a.only.split(",") if n] or list(variants)
    bad = [n for n in names if n not in variants]
    if bad:
        sys.exit(f"error: unknown variant(s) {', '.join(bad)}; known: {', '.join(variants)}")
    data = str(tiny_data(out / "tinydata")) if a.tiny else a.data
    t0 = time.time()
    from trainer.data import load_raw
    load_raw(data, download=False)  # decode once; the children read the cache
    print(f"[{time.time() - t0:5.1f}s] data ready; {len(names)} variants, {a.parallel} at a time", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pending, running, rows = list(names), {}, []

    def write() -> None:
        rows.sort(key=lambda r: -(r.get("test_top1") or 0))
        (out / "recipes.json").write_text(json.dumps({"base": base_train_config(a.tiny), "seconds": round(time.time() - t0, 1),
                                                       "parallel": a.parallel, "rows": rows}, indent=1))

    while pending or running:
        while pending and len(running) < a.parallel:
            n = pending.pop(0)
            log = open(out / f"{n}.log", "w")
            running[n] = (subprocess.Popen([sys.executable, __file__, "--child", n, "--data", data, "--out", str(out)]
                                           + (["--tiny"] if a.tiny else []), env=env, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.5)
        for n, (p, log) in list(running.items()):
            if p.poll() is None:
                continue
            log.close()
            del running[n]
            f = out / n / "row.json"
            rows.append(json.loads(f.read_text()) if p.returncode == 0 and f.exists() else
                        {"name": n, "error": (out / f"{n}.log").read_text()[-400:]})
            r = rows[-1]
            print(f"[{time.time() - t0:5.1f}s] {n}: " + (f"test {r['test_top1']} val {r['val_top1']} train {r['train_top1']} "
                                                         f"({r['seconds']} s, {r['train_img_s']} img/s)" if "error" not in r
                                                         else "FAILED " + r["error"][-200:]), flush=True)
            write()
    write()
    print(f"[{time.time() - t0:5.1f}s] done: {out / 'recipes.json'}", flush=True)


if __name__ == "__main__":
    main()
