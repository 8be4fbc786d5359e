"""The trial: ``run_trial(config, settings, callbacks)``, run by Ray Tune on a worker.

``config`` holds only what the search sampled (w_bits, a_bits, method, qat_lr, qat_epochs,
granularity, w_bits_bNN); the fixed ``settings`` of the search (a frozen SearchSettings) come once
through ``tune.with_parameters``, as do extra trainer ``callbacks`` (tests inject failures that way).
The two become the trial's TrialSpec (tune/trial_spec.py) before anything runs.

It loads the FP32 baseline and the data once per worker process, prepares the quantized model (whose
packed size is known at once: over-budget trials stop there), calibrates, fine-tunes (QAT/LSQ) while
reporting every epoch to Ray Tune with a checkpoint, then reports the final metrics with a
checkpoint holding the packed model. Restarted from a checkpoint (FailureConfig retry or
`bitsearch resume`), it continues the fine-tuning where it stopped.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
import ray
from ray import tune

from mlflow_server.tracking import fetch_artifact
from pipeline import load_baseline, packed_meta, prepare_quantized, public, quantize_model, write_result
from pipeline.export import export_packed
from pipeline.sensitivity import allocate, layer_bytes
from quantization import QuantConfig
from trainer import load_dataset
from trainer.allocator import keep_freed_memory
from tune.results import QUANTITIES, SIZE_METRICS
from tune.settings import SearchSettings
from tune.sysmetrics import SystemSampler
from tune.trial_spec import TrialSpec, trial_spec


@functools.lru_cache(maxsize=2)
def _baseline(path: str, tracking_uri: str | None):
    return load_baseline(fetch_artifact(path, tracking_uri))


def _allocate(s, qcfg, budget_mb: float) -> dict[str, Any]:
    """The sensitivity allocation of ``budget_mb`` on top of the trial's config (its method, activation
    bits, granularity), scored by the search's estimator; the layer byte costs are computed once per
    worker and config."""
    fp32, ck = _baseline(s.baseline, s.tracking_uri)
    table, costs = _alloc_inputs(s.sensitivity, s.baseline, s.tracking_uri, json.dumps(qcfg.to_dict(), sort_keys=True))
    return allocate(table, fp32, qcfg, packed_meta(ck), budget_mb, estimator=s.estimator, costs=costs,
                    min_bits=s.min_bits)


@functools.lru_cache(maxsize=4)
def _alloc_inputs(table_path: str, baseline: str, tracking_uri: str | None, qcfg_json: str):
    fp32, ck = _baseline(baseline, tracking_uri)
    table = json.loads(Path(table_path).read_text())
    layers = [r["name"] for r in table["layers"]]
    bits = sorted({int(b) for r in table["layers"] for b in r["w"]})
    return table, layer_bytes(fp32, QuantConfig.from_dict(json.loads(qcfg_json)), packed_meta(ck), layers, bits)


@functools.lru_cache(maxsize=2)
def _data(path: str, subset: int, val_size: int, seed: int, finetune_subset: int = 0):
    """The baseline's split; with ``finetune_subset`` the training part shrinks to a stratified subset
    (what QAT/LSQ fine-tune and PTQ calibrate on), validation and test stay whole."""
    data = load_dataset(path, subset=subset, val_size=val_size, seed=seed, download=False)
    return data.with_train_subset(finetune_subset, seed) if finetune_subset else data


def objective(val_top1: float, comp_mb: float, budget_mb: float | None, onnx_ms: float | None = None,
              latency_budget_ms: float | None = None) -> float:
    """Single-objective score: validation top-1 if the model fits the budgets (size; latency where the
    search has one), else a penalty below any real accuracy that shrinks as the model approaches them."""
    over = max(comp_mb / budget_mb - 1.0 if budget_mb is not None else 0.0,
               onnx_ms / latency_budget_ms - 1.0 if latency_budget_ms is not None and onnx_ms is not None else 0.0)
    return val_top1 if over <= 0 else -100.0 * over


def final_step(epochs: int) -> int:
    """The step of a trial's final report: after its last fine-tuning epoch (whose own report has that
    epoch's step), 0 for a trial that does not fine-tune. Every metric is logged once per step."""
    return epochs + 1 if epochs else 0


class TrialDeviceError(RuntimeError):
    """A trial was given a GPU by Ray that its worker cannot use."""


def trial_device(s: SearchSettings) -> torch.device:
    """Where this trial computes: a trial that asked Ray for no GPU on the CPU, without touching CUDA; one
    that asked for a GPU (share) on the GPU Ray assigned it (Ray sets CUDA_VISIBLE_DEVICES, so it is
    cuda:0 here), its memory capped at its share (Ray does not enforce fractional GPU memory)."""
    if s.trial_device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrialDeviceError(f"this trial asked Ray for {s.gpus_per_trial:g} GPU but its worker has no usable CUDA "
                               f"device (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
                               f"{torch.__version__}, CUDA build {torch.version.cuda}): run the search with "
                               "--gpus-per-trial 0, or install a CUDA build of torch on the GPU nodes")
    if s.gpus_per_trial < 1:
        torch.cuda.set_per_process_memory_fraction(float(s.gpus_per_trial), 0)
    return torch.device("cuda", 0)


def gpu_metrics(device: torch.device) -> dict[str, float]:
    """The trial's own GPU memory peak (this process's allocations, not the whole GPU's), in MB."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_memory_mb": torch.cuda.max_memory_allocated(device) / 1e6}


class _Reporter:
    """trainer Callback: one tune.report per fine-tuning epoch, with the trainer checkpoint."""

    def __init__(self, ckpt_dir: Path, size: dict[str, float], budget: float | None, system: SystemSampler,
                 device: torch.device):
        self.ckpt_dir, self.size, self.budget, self.system, self.device = ckpt_dir, size, budget, system, device

    def on_epoch_end(self, epoch, m, state):
        val = m.get("val_top1", 0.0)
        metrics = {"epoch": m["epoch"], "train_loss": m["train_loss"], "train_top1": m["train_top1"],
                   "val_top1": val, "images_per_s": m["images_per_s"], **self.size,
                   "objective": objective(val, self.size["comp_mb"], self.budget), "final": False,
                   **gpu_metrics(self.device), **self.system.take()}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(self.ckpt_dir)))


def run_trial(config: dict[str, Any], settings: SearchSettings, callbacks: Iterable = ()) -> None:
    device = trial_device(settings)
    system = SystemSampler(gpu=device.type == "cuda")  # CPU / memory / GPU while the trial runs, with its metrics
    try:
        _run_trial(trial_spec(settings, config), settings, tuple(callbacks), system, device)
    finally:
        system.close()


def _run_trial(spec: TrialSpec, s: SearchSettings, callbacks: tuple, system: SystemSampler,
               device: torch.device) -> None:
    keep_freed_memory()  # before the trial's first large allocation (evaluation, calibration, fine-tuning)
    torch.set_num_threads(max(1, int(s.cpus_per_trial)))
    fp32, ck = _baseline(s.baseline, s.tracking_uri)
    data = _data(s.data, s.subset, s.val_size, s.split_seed, s.finetune_subset)
    qcfg, alloc = spec.quant, None
    if spec.size_budget_mb is not None:  # the weight bits of every layer: the exact allocation for this budget
        alloc = _allocate(s, qcfg, spec.size_budget_mb)
        qcfg = alloc["config"]
    work = Path(tune.get_context().get_trial_dir()) / "work"
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare_quantized(fp32, qcfg, packed_meta(ck), device)
    size = {k: prepared.size[k] for k in SIZE_METRICS}
    if alloc is not None:
        size["alloc_sensitivity"] = alloc["sensitivity"]
    if s.size_budget_mb is not None and size["comp_mb"] > s.size_budget_mb:
        tune.report({"objective": objective(0.0, size["comp_mb"], s.size_budget_mb), **size, "val_top1": 0.0,
                     "over_budget": True, "final": True, **system.take()})
        return
    resume = _restore_checkpoint(work)
    res = quantize_model(fp32, data, qcfg, fine_tune=spec.fine_tune, batch_size=s.batch_size, seed=s.seed,
                         device=device, out_dir=work,
                         callbacks=[_Reporter(work / "qat", size, s.size_budget_mb, system, device), *callbacks],
                         resume=resume, export=work / "final" / "model.bsq", fp32_top1=s.fp32_top1, prepared=prepared)
    _report_final(spec, res, work / "final", resume, s, alloc, system, device)


def _restore_checkpoint(work: Path) -> bool:
    """Copy the fine-tuning checkpoint of a restarted trial (FailureConfig retry, `bitsearch resume`) to
    where the trainer resumes from; whether there was one."""
    restored = tune.get_checkpoint()
    if restored is None:
        return False
    with restored.as_directory() as d:
        if not (Path(d) / "checkpoint.pt").exists():
            return False
        (work / "qat").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(d) / "checkpoint.pt", work / "qat" / "checkpoint.pt")
    return True


def _node_id() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside a Ray worker (a trial function called directly)
        return None


def _report_final(spec: TrialSpec, res: dict[str, Any], final: Path, resumed: bool, s: SearchSettings,
                  alloc: dict | None, system: SystemSampler, device: torch.device) -> None:
    """The trial's files (quantize.json, trial.json: the spec it ran, model.bsq and model.onnx beside it)
    and its last report to Ray Tune, with them as the checkpoint."""
    onnx = export_packed(final / "model.bsq", final / "model.onnx")  # beside it, for deployment
    res = {**res, "onnx_ms": onnx["latency_ms_b1"]}  # what it costs there: batch 1, 1 thread, this node's CPU
    write_result(final, res)
    (final / "trial.json").write_text(json.dumps(spec.to_dict(), indent=2))
    pub = public(res)
    named = {**{metric: pub.get(key) for metric, _, key in QUANTITIES},  # JSON vocabulary -> metric names
             "metadata_overhead": pub.get("metadata_overhead")}
    metrics = {k: v for k, v in named.items() if v is not None}
    metrics.update(objective=objective(pub["val_top1"] or 0.0, pub["comp_mb"], s.size_budget_mb, pub["onnx_ms"],
                                       s.latency_budget_ms),
                   resumed=resumed, final=True, epoch=final_step(pub["qat_epochs"]), **gpu_metrics(device))
    if s.latency_budget_ms is not None and pub["onnx_ms"] > s.latency_budget_ms:
        metrics["over_budget"] = True  # not the answer, not on the front (its latency was measured after training)
    extra = {"node_id": _node_id()}  # which Ray node ran it (hostname and node_ip, Ray's own keys, repeat on one machine)
    if alloc is not None:
        metrics["alloc_sensitivity"] = alloc["sensitivity"]
        extra["alloc_bits"] = dict(alloc["bits"])  # per-layer bits: MLflow params (tune/mlflow_callback.py)
    (final / "metrics.json").write_text(json.dumps(metrics))
    tune.report({**metrics, **system.take(), **extra}, checkpoint=tune.Checkpoint.from_directory(str(final)))
