"""One quantization run on a trained checkpoint: prepare -> calibrate -> (QAT/LSQ fine-tune) ->
evaluate -> size, activation memory, packed file. Used by `bitsearch quantize` and by every search
trial (which adds a callback that reports each epoch to Ray Tune). Imports trainer and quantization
only (no Ray, no MLflow)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from quantization import (QAT_LR, QATSchedule, QuantConfig, calibrate, freeze, prepare, recalibrate_bn, set_act_observing,
                          set_lr_scales)
from quantization.actmem import activation_memory
from quantization.packing import convert, save_packed, size_report
from trainer import (CheckpointError, Dataset, TrainConfig, evaluate, load_checkpoint, model_from_meta, resolve_device,
                     train)
from trainer.data import augment, normalize


def load_baseline(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """FP32 model + checkpoint dict from a local `bitsearch train` checkpoint (an MLflow artifact URI is
    fetched first by mlflow_server.tracking.fetch_artifact)."""
    ck = load_checkpoint(path)
    meta, state = ck.get("meta"), ck.get("model")
    if not isinstance(meta, dict) or not meta.get("arch") or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has no model description (meta) or weights: it was not written by "
                              "`bitsearch train`")
    try:
        model = model_from_meta(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: model description is invalid ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        missing = [k for k in model.state_dict() if k not in state]
        extra = [k for k in state if k not in model.state_dict()]
        shape = [k for k, v in model.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        why = (f"missing {len(missing)} tensors ({missing[0]}, ...)" if missing else
               f"{len(extra)} unexpected tensors ({extra[0]}, ...)" if extra else
               f"{len(shape)} tensors of another shape ({shape[0]}, ...)" if shape else str(e).splitlines()[0])
        raise CheckpointError(f"checkpoint {path} does not fit MobileNet-v2 width {meta.get('width')}: {why}") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or infinite weights ({bad[0]}{', ...' if len(bad) > 1 else ''}): "
                              "the training diverged; retrain or pick an earlier checkpoint")
    return model.eval(), ck


def packed_meta(ck: dict) -> dict:
    """What a packed file needs to rebuild the network from a training checkpoint: the architecture and
    the class names (no paths, no history: every header byte counts in the reported size)."""
    meta = ck.get("meta") or {}
    out = {k: meta[k] for k in ("arch", "width", "num_classes", "dropout") if k in meta}
    out["classes"] = list(ck.get("classes") or (meta.get("data") or {}).get("classes") or [])
    return out


def calibration_batches(data: Dataset, batch_size: int, seed: int, device, augmented: bool = False) -> Iterable[torch.Tensor]:
    """Normalised training batches in a seeded random order; un-augmented, or ``augmented`` as in training
    (random crop + flip: what BN running statistics are estimated on there)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train_y), generator=g)
    for i in range(0, len(order), batch_size):
        xb = data.train_x[order[i:i + batch_size]]
        yield augment(xb.to(device), g) if augmented else normalize(xb.to(device))


@dataclass
class Prepared:
    """A fake-quant copy of the baseline and the size of its packed file (which depends on the config
    only, so a search knows a trial's size, and whether it fits the budget, before any work)."""
    model: torch.nn.Module
    config: QuantConfig
    size: dict[str, Any]
    model_meta: dict[str, Any]


def prepare_quantized(fp32: torch.nn.Module, qcfg: QuantConfig, model_meta: dict | None = None,
                      device: str | torch.device = "cpu") -> Prepared:
    meta = model_meta or _default_meta(fp32)
    q = prepare(fp32, qcfg)
    return Prepared(q.to(resolve_device(device) if isinstance(device, str) else device), qcfg,
                    size_report(convert(q, meta), fp32), meta)


class DivergedError(ValueError):
    """The quantized model holds NaN or infinite values (the fine-tuning diverged)."""


def _check_finite(q: torch.nn.Module, history: list[dict]) -> None:
    bad = [n for n, t in [*q.named_parameters(), *q.named_buffers()] if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = " and more" if len(bad) > 1 else ""
        last = f", last epoch's train top-1 {history[-1]['train_top1']:.2f}%" if history else ""
        raise DivergedError(f"the quantized model holds NaN or infinite values ({bad[0]}{more}{last}): the fine-tuning "
                            "diverged; lower the QAT learning rate, or set bn_live_below_bits: 0 to keep BN frozen")


def quantize_model(fp32: torch.nn.Module, data: Dataset, qcfg: QuantConfig, *, qat_epochs: int = 0,
                   qat_lr: float = QAT_LR, batch_size: int = 128, seed: int = 0, device: str = "auto",
                   out_dir: str | Path | None = None, callbacks: Iterable = (), resume: bool = False,
                   export: str | Path | None = None, fp32_top1: float | None = None,
                   model_meta: dict | None = None, act_memory: bool = True,
                   prepared: Prepared | None = None, kd_weight: float = 0.0,
                   kd_temperature: float = 4.0) -> dict[str, Any]:
    """Quantize ``fp32`` per ``qcfg`` and measure it. ``qat_epochs`` > 0 (methods that fine-tune)
    trains through the trainer's loop (checkpointed in ``out_dir/qat``). ``prepared`` reuses a
    ``prepare_quantized`` result. ``kd_weight`` > 0: the fine-tuning distils from ``fp32`` (the teacher)
    at ``kd_temperature``. Returns the quantize JSON keys."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    fp32 = fp32.to(dev).eval()
    if fp32_top1 is None:
        fp32_top1 = evaluate(fp32, data.test_x, data.test_y, device=dev)["top1"]
    prepared = prepared or prepare_quantized(fp32, qcfg, model_meta, dev)
    q, size = prepared.model.to(dev), prepared.size
    n_cal = calibrate(q, calibration_batches(data, batch_size, seed, dev), qcfg.calib_batches)
    history: list[dict] = []
    n_bn = 0
    fine_tune = qcfg.method.fine_tunes and qat_epochs > 0
    if fine_tune:
        tcfg = TrainConfig(epochs=qat_epochs, lr=qat_lr, batch_size=batch_size, seed=seed, device=dev.type,
                           no_decay_bn_bias=True, eval_test=False, width=getattr(fp32, "width", 1.0),
                           dropout=float(getattr(getattr(fp32, "dropout", None), "p", 0.2)),
                           kd_weight=kd_weight, kd_temperature=kd_temperature)
        set_lr_scales(q, qcfg)  # layers that keep BN live: qcfg.live_bn_lr_factor x qat_lr
        res = train(q, data, tcfg, out_dir=Path(out_dir) / "qat" if out_dir else None,
                    callbacks=[QATSchedule(qcfg), *callbacks], resume=resume, write_reports=False,
                    teacher=fp32 if kd_weight > 0 else None)
        history = res["history"]
        set_act_observing(q, False)
        # re-estimated on augmented batches, the data BN trains on: with un-augmented ones (no black-bordered
        # crops) the cpu FP32 model itself falls from 84.39% to 81.70% (docs/RESULTS.md section 7)
        n_bn = recalibrate_bn(q, calibration_batches(data, batch_size, seed + 1, dev, augmented=True),
                              max(qcfg.calib_batches, 16))
    elif qcfg.bn_reestimate_batches:  # PTQ: BN statistics of the quantized model (the FP32 ones miss its shifts)
        n_bn = recalibrate_bn(q, calibration_batches(data, batch_size, seed + 1, dev, augmented=True),
                              qcfg.bn_reestimate_batches)
    freeze(q)
    q.eval()
    _check_finite(q, history)
    test = evaluate(q, data.test_x, data.test_y, device=dev)
    val = evaluate(q, data.val_x, data.val_y, device=dev) if data.val_y is not None else None
    am = activation_memory(q) if act_memory else None
    result: dict[str, Any] = {
        "w_bits": qcfg.w_bits, "a_bits": qcfg.a_bits, "method": str(qcfg.method),
        "granularity": str(qcfg.w_granularity),
        "top1": test["top1"], "val_top1": None if val is None else val["top1"], "fp32_top1": fp32_top1,
        "drop": fp32_top1 - test["top1"],
        "orig_mb": size["orig_mb"], "comp_mb": size["comp_mb"], "comp_bytes": size["comp_bytes"],
        "header_bytes": size["header_bytes"], "ratio": size["ratio"],
        "weight_ratio": size["weight_ratio"], "metadata_overhead": size["metadata_overhead"],
        "comp_kb": size["comp_kb"], "avg_w_bits": size["avg_w_bits"], "avg_a_bits": size["avg_a_bits"],
        "act_ratio": am["act_ratio"] if am else None, "quantized_fraction": size["quantized_fraction"],
        "calib_batches": n_cal, "bn_recalibration_batches": n_bn, "qat_epochs": qat_epochs if fine_tune else 0,
        "qat_lr": qat_lr if fine_tune else 0.0,
        "kd_weight": kd_weight if fine_tune else 0.0, "kd_temperature": kd_temperature if fine_tune and kd_weight else None,
        "history": history, "layers": size["layers"], "activation_memory": am, "config": qcfg.to_dict(),
        "seconds": time.perf_counter() - t0,
    }
    if export:
        info = save_packed(export, convert(q, prepared.model_meta))
        assert info["file_bytes"] == size["comp_bytes"], "the packed file differs from its predicted size"
        result["export"] = info["path"]
        result["export_bytes"] = info["file_bytes"]
        result["export_header_bytes"] = info["header_bytes"]
    result["_model"] = q
    return result


def _default_meta(fp32: torch.nn.Module) -> dict:
    from trainer import model_meta
    return model_meta(fp32)


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a quantize result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    p = Path(out_dir) / "quantize.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(public(result), indent=2, default=str))
    return p
