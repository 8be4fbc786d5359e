"""`bitsearch study`: the whole study in one resumable command, written up as REPORT.md (+ HTML).

Stages (each skipped when already finished, resumed when interrupted):
  baseline  FP32 training (config section ``train``; a validation split is required)
  sweep     the reference's grid W{8,4,2} x A{8,4,2} (section ``sweep``)
  search    single-objective QAT/LSQ search (section ``search``)
  mixed     multi-objective mixed-precision search, one weight bit-width per block (section ``mixed``)
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import markdown
import optuna
import pandas as pd
import ray
import torch
from ray import tune

from mlflow_server.tracking import default_tracking_uri, mlflow_version
from trainer import TrainConfig, load_checkpoint
from trainer.baseline import fit_baseline
from tune.results import records
from tune.search import resume, run
from tune.settings import settings_from

STAGES = ("baseline", "sweep", "search", "mixed")
DONE = "bitsearch-finished.json"


class StudyError(ValueError):
    pass

# The course report this project must beat (FP32 93.71%; weights only, activations never applied).
REFERENCE = [
    {"config": "FP32", "w_bits": 32, "a_bits": 32, "test_top1": 93.71, "ratio": 1.00},
    {"config": "W8", "w_bits": 8, "a_bits": "(not applied)", "test_top1": 93.78, "ratio": 3.61},
    {"config": "W4", "w_bits": 4, "a_bits": "(not applied)", "test_top1": 92.08, "ratio": 6.38},
    {"config": "W2", "w_bits": 2, "a_bits": "(not applied)", "test_top1": 10.0, "ratio": None},
]


def _sha256(p: Path) -> str | None:
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "optuna": optuna.__version__, "mlflow": mlflow_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "gpu": gpu, "git_commit": _git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def run_experiment(section: dict, mode: str, name: str, baseline: Path, data: str, out: Path,
                   log: Callable[[str], None], objectives: str | None = None) -> dict[str, Any]:
    """Run, resume or skip one search stage."""
    exp = out / name
    if (exp / DONE).exists():
        log(f"{name}: finished earlier, skipped")
        return json.loads((exp / "results.json").read_text())
    if exp.exists() and tune.Tuner.can_restore(str(exp)):
        log(f"{name}: resuming {exp}")
        summary = resume(exp)
    else:
        d = {**section, "mode": mode, "name": name, "baseline": str(baseline), "data": data, "out": str(out)}
        if objectives:
            d["objectives"] = objectives
        s = settings_from(d)
        summary = run(s, log=lambda m: log(f"{name}: running {s.num_samples if mode == 'search' else 'grid'} "
                                           f"trial(s); {m}"))
    if summary["trials"] and all(t["status"] in ("done", "stopped", "over budget") for t in summary["trials"]):
        (exp / DONE).write_text(json.dumps({"finished": time.time()}))
    return summary


def run_study(cfg: dict[str, Any], data: str, out: str | Path, *, stages=STAGES, log=print,
              callbacks=(), download: bool = True) -> dict[str, Any]:

    out = Path(out).resolve()
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise StudyError(f"unknown stage(s) {', '.join(unknown)}; allowed: {', '.join(STAGES)}")
    t0 = time.time()
    for section in ("train", "sweep", "search", "mixed"):
        if section in cfg and not isinstance(cfg[section], dict):
            raise StudyError(f"the {section}: section of the study config must be a mapping of options")
    tcfg = TrainConfig.from_dict(cfg.get("train", {}))
    if tcfg.val_size <= 0:
        raise StudyError("train.val_size must be > 0: the searches select on a validation split held out of train")
    out.mkdir(parents=True, exist_ok=True)
    bdir = out / "baseline"
    ck = bdir / "checkpoint.pt"
    if (bdir / "result.json").exists() and ck.exists() and load_checkpoint(ck)["epoch"] >= tcfg.epochs:
        log("baseline: finished earlier, skipped")
        base = json.loads((bdir / "result.json").read_text())
    else:
        log(f"baseline: training {tcfg.epochs} epoch(s) at width {tcfg.width}" + (" (resuming)" if ck.exists() else ""))
        base = fit_baseline(data, bdir, tcfg, callbacks=callbacks, resume=ck.exists(), download=download,
                            progress=log)
    runs = out / "runs"
    results: dict[str, Any] = {}
    if "sweep" in stages and "sweep" in cfg:
        results["sweep"] = run_experiment(cfg["sweep"], "sweep", "sweep", ck, data, runs, log)
    if "search" in stages and "search" in cfg:
        results["search"] = run_experiment(cfg["search"], "search", "search", ck, data, runs, log)
    if "mixed" in stages and "mixed" in cfg:
        results["mixed"] = run_experiment(cfg["mixed"], "search", "mixed", ck, data, runs, log, objectives="multi")
    report = write_study_report(out, cfg, data, base, results, time.time() - t0)
    return {"out_dir": str(out), "baseline": {k: base.get(k) for k in ("params", "epochs", "top1", "checkpoint")},
            "experiments": {k: v["experiment"] for k, v in results.items()}, **report}


# ------------------------------------------------------------------------------------------------
# report


def _md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".2f") if not df.empty else "(none)"


def _all_trials(results: dict[str, Any]) -> pd.DataFrame:
    frames = []
    for stage, summary in results.items():
        df = pd.DataFrame(summary["trials"])
        if df.empty:
            continue
        df.insert(0, "stage", stage)
        df["packed_model"] = [str(Path(summary["experiment"]) / t / "work" / "final" / "model.bsq") for t in df["trial_id"]]
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df[df["status"] == "done"]


def recommendations(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Smallest model within 0.5 and 1 point of FP32 (test top-1), and the smallest overall."""
    out = []
    if df.empty:
        return out
    for label, cond in (("smallest within 0.5 point of FP32", df["drop"] <= 0.5),
                        ("smallest within 1 point of FP32", df["drop"] <= 1.0),
                        ("smallest overall", df["drop"].notna())):
        d = df[cond].sort_values(["comp_mb", "drop"])
        if not d.empty:
            out.append({"choice": label, **records(d.head(1))[0]})
    return out


COLS = ["stage", "trial_id", "w_bits", "a_bits", "method", "lr", "test_top1", "val_top1", "drop", "orig_mb", "comp_mb",
        "ratio", "weight_ratio", "act_ratio"]


def write_study_report(out: Path, cfg: dict, data: str, base: dict, results: dict, seconds: float) -> dict[str, Any]:
    """OUT/REPORT.md and REPORT.html: environment, data, baseline, method, results next to the reference,
    ratios, recommendations, where MLflow has the runs."""
    env = environment()
    trials = _all_trials(results)
    recs = recommendations(trials)
    rel = lambda p: str(Path(p).relative_to(out)) if str(p).startswith(str(out)) else str(p)  # noqa: E731
    L = ["# bitsearch study report", "",
         f"Generated {env['date']} in {seconds / 60:.1f} min by `bitsearch study` (output: `{out}`).", ""]
    L += _report_provenance(env, cfg, data, out, base)
    L += _report_baseline(cfg, base, rel)
    L += _report_results(trials, results, rel)
    L += _report_recommendations(recs, out, results)
    text = "\n".join(L)
    (out / "REPORT.md").write_text(text)
    html = markdown.markdown(text, extensions=["tables", "fenced_code"])
    (out / "REPORT.html").write_text(f"<!doctype html><meta charset='utf-8'><title>bitsearch study</title>"
                                     f"<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
                                     f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px}}"
                                     f"</style>{html}")
    return {"report": str(out / "REPORT.md"), "report_html": str(out / "REPORT.html"), "recommended": recs}


def _report_provenance(env: dict, cfg: dict, data: str, out: Path, base: dict) -> list[str]:
    L = ["## 1. Environment and reproducibility", "", "| item | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in env.items()]
    L += [f"| seed | {cfg.get('train', {}).get('seed', 0)} |", "",
          f"Rerun: `bitsearch study --config <this config> --data {data} --out {out}` (finished stages are skipped).",
          "", "Configuration used:", "", "```yaml", json.dumps(cfg, indent=2), "```", "",
          "## 2. Data provenance", "",
          f"- source: `{data}` (sha256 `{_sha256(Path(data)) or 'n/a (directory)'}`)",
          f"- images: {base.get('data', {}).get('train')} train / {base.get('data', {}).get('val')} validation "
          f"(held out of train, used by the searches) / {base.get('data', {}).get('test')} test (reported)",
          "- the shared archive is CIFAR-10 re-encoded as JPEG (quality 75): accuracies are close to, not equal to, "
          "those on the original binary release.", ""]
    return L


def _report_baseline(cfg: dict, base: dict, rel) -> list[str]:
    rep = base.get("reports", {})
    summary_json = Path(rep["summary_json"]) if rep.get("summary_json") else None
    fm = json.loads(summary_json.read_text()) if summary_json and summary_json.exists() else {}
    L = ["## 3. Baseline (FP32)", "",
         f"MobileNet-v2, width {cfg.get('train', {}).get('width', 1.0)}, {base.get('params'):,} parameters, "
         f"{base.get('epochs')} epochs: **test top-1 {base.get('top1')}%** (train {base.get('train_top1')}%, "
         f"validation {base.get('val_top1')}%).", ""]
    if rep.get("curves"):
        L += [f"![curves]({rel(rep['curves'])})", ""]
    if rep.get("confusion"):
        L += [f"![confusion matrix]({rel(rep['confusion'])})", ""]
    if fm:
        L += ["Failure modes (most-confused pairs, test set):", "", "| true | predicted | count | % of class |",
              "|---|---|---|---|"]
        L += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['rate']} |" for p in fm.get("most_confused", [])]
        L += ["", f"Weakest classes: {', '.join(fm.get('worst_classes', []))}.", ""]
    return L


def _report_results(trials: pd.DataFrame, results: dict, rel) -> list[str]:
    L = ["## 4. Compression method", "",
         "Weights: BN folded into each conv, then per-channel (default) symmetric fake quantization with a "
         "straight-through estimator; activations: the input of every quantized layer is quantized (unsigned "
         "grid clipped at 6 after ReLU6), ranges calibrated on training batches (PTQ) or learned/fine-tuned (QAT, "
         "LSQ). The first conv and the classifier stay FP32 unless the config says otherwise. Sizes are those of "
         "the real bit-packed `.bsq` files (every scale and zero-point included).", "",
         "## 5. Results next to the reference", "", "Reference (course report, by hand):", "",
         _md_table(pd.DataFrame(REFERENCE)), "", "bitsearch (test top-1 %, sizes in MB = 10^6 bytes):", "",
         _md_table(trials[[c for c in COLS if c in trials]] if not trials.empty else trials), ""]
    for stage, summary in results.items():
        files = summary.get("files", {})
        if files.get("pareto_png"):
            L += [f"### {stage}: accuracy vs size", "", f"![pareto]({rel(files['pareto_png'])})", ""]
        if files.get("parallel_png"):
            L += [f"![parallel coordinates]({rel(files['parallel_png'])})", ""]
        if summary.get("pareto"):
            front = pd.DataFrame(summary["pareto"])
            L += ["Pareto front:", "", _md_table(front[[c for c in COLS[1:] if c in front]]), ""]
    L += ["## 6. Compression ratios and how they were measured", "",
          "- model ratio = FP32 parameters x 4 bytes / bytes stored in the packed file's payload (the file adds only "
          "its JSON header);",
          "- weight ratio = conv/linear weights at FP32 / the same weights as stored (packed or FP32), no metadata;",
          "- activation ratio = peak live activation bytes of one inference at FP32 / as stored at the chosen bits "
          "(tensor liveness over the traced graph; see docs/ARCHITECTURE.md).", ""]
    return L


def _report_recommendations(recs: list, out: Path, results: dict) -> list[str]:
    L = ["## 7. Recommended configurations", ""]
    if recs:
        rdf = pd.DataFrame(recs)
        L += [_md_table(rdf[[c for c in ["choice", *COLS, "packed_model"] if c in rdf]]), ""]
    else:
        L += ["(no finished trials)", ""]
    uri = default_tracking_uri(out / "runs")
    L += ["## 8. MLflow", "", f"Tracking store: `{uri}`. Open it with `bitsearch ui {out / 'runs'}`, switch the "
          "experiment view to **Model training**, and compare the child runs of each search (parent runs: "
          + ", ".join(f"`{k}` = {v.get('mlflow_parent_run_id', 'n/a')}" for k, v in results.items()) + ").", ""]
    return L
