"""One quantization run on a trained checkpoint: prepare -> calibrate -> (QAT/LSQ fine-tune) ->
evaluate -> size, activation memory, packed file. Used by `bitsearch quantize` and by every search
trial (which adds a callback that reports each epoch to Ray Tune). Imports trainer and quantization
only (no Ray, no MLflow)."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from quantization import (FineTune, QATSchedule, QuantConfig, QuantConfigError, calibrate, freeze, lr_scales, prepare,
                          recalibrate_bn, set_act_observing)
from quantization.actmem import activation_memory
from quantization.api import bits_label, bits_summary, plan_for, quant_layers
from quantization.config import FP32
from quantization.packing import convert, load_packed, save_packed, size_report
from trainer import (CheckpointError, DataError, Dataset, TrainConfig, evaluate, load_checkpoint, load_dataset,
                     model_from_meta, model_meta, resolve_device, train)
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
    the class names (no history: every header byte counts in the reported size; a user's network is its
    file's path, function and sha256, trainer/zoo.py)."""
    meta = ck.get("meta") or {}
    out = {k: meta[k] for k in ("arch", "width", "num_classes", "dropout", "file", "func", "sha256") if k in meta}
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


def _quantizes_anything(q: torch.nn.Module) -> bool:
    return any(min(m.w_bits, m.a_bits) < FP32 for m in quant_layers(q).values())


def quantize_model(fp32: torch.nn.Module, data: Dataset, qcfg: QuantConfig, *, fine_tune: FineTune | None = None,
                   batch_size: int = 128, seed: int = 0, device: str = "auto",
                   out_dir: str | Path | None = None, callbacks: Iterable = (), resume: bool = False,
                   export: str | Path | None = None, fp32_top1: float | None = None,
                   model_meta: dict | None = None, act_memory: bool = True,
                   prepared: Prepared | None = None) -> dict[str, Any]:
    """Quantize ``fp32`` per ``qcfg`` and measure it. With ``fine_tune`` and a method that fine-tunes,
    trains through the trainer's loop (checkpointed in ``out_dir/qat``; distilling from ``fp32`` when
    ``fine_tune.kd_weight`` > 0). ``prepared`` reuses a ``prepare_quantized`` result. ``fp32`` itself is
    never changed (a copy goes to another device). Returns the quantize JSON keys."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    fp32 = _on_device(fp32, dev)
    if fp32_top1 is None:
        fp32_top1 = evaluate(fp32, data.test_x, data.test_y, device=dev)["top1"]
    prepared = prepared or prepare_quantized(fp32, qcfg, model_meta, dev)
    q, size = prepared.model.to(dev), prepared.size
    n_cal = calibrate(q, calibration_batches(data, batch_size, seed, dev), qcfg.calib_batches)
    ft = fine_tune if qcfg.method.fine_tunes else None
    history, n_bn = [], 0
    if ft is not None:
        history = _fine_tune(q, fp32, data, qcfg, ft, batch_size, seed, dev, out_dir, callbacks, resume)
        # re-estimated on augmented batches, the data BN trains on: un-augmented ones (no black-bordered crops)
        # give statistics the model never saw in training
        n_bn = recalibrate_bn(q, calibration_batches(data, batch_size, seed + 1, dev, augmented=True),
                              max(qcfg.calib_batches, 16))
    elif qcfg.bn_reestimate_batches and _quantizes_anything(q):  # PTQ: BN statistics of the quantized model
        # (the FP32 ones miss its shifts); W32A32 is the FP32 model, returned unchanged
        n_bn = recalibrate_bn(q, calibration_batches(data, batch_size, seed + 1, dev, augmented=True),
                              qcfg.bn_reestimate_batches)
    freeze(q)
    q.eval()
    _check_finite(q, history)
    result = _measure(q, data, qcfg, size, fp32_top1, dev, act_memory)
    result.update(calib_batches=n_cal, bn_recalibration_batches=n_bn, qat_epochs=ft.epochs if ft else 0,
                  qat_lr=ft.lr if ft else 0.0, kd_weight=ft.kd_weight if ft else 0.0,
                  kd_temperature=ft.kd_temperature if ft and ft.kd_weight else None, history=history,
                  seconds=time.perf_counter() - t0)
    if export:
        info = save_packed(export, convert(q, prepared.model_meta))
        assert info["file_bytes"] == size["comp_bytes"], "the packed file differs from its predicted size"
        result.update(export=info["path"], export_bytes=info["file_bytes"], export_header_bytes=info["header_bytes"])
    result["_model"] = q
    return result


def _on_device(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` in eval mode on ``dev``: itself if it is there already, else a copy (a caller's cached
    baseline stays where it was)."""
    p = next(model.parameters(), None)
    if p is not None and p.device != dev:
        model = copy.deepcopy(model).to(dev)
    return model.eval()


def _fine_tune(q, fp32, data: Dataset, qcfg: QuantConfig, ft: FineTune, batch_size: int, seed: int, dev, out_dir,
               callbacks: Iterable, resume: bool) -> list[dict]:
    """QAT / LSQ through the trainer's loop; the per-epoch history."""
    tcfg = TrainConfig(epochs=ft.epochs, lr=ft.lr, batch_size=batch_size, seed=seed, device=dev.type,
                       no_decay_bn_bias=True, eval_test=False, width=getattr(fp32, "width", 1.0),
                       dropout=float(getattr(getattr(fp32, "dropout", None), "p", 0.2)),
                       kd_weight=ft.kd_weight, kd_temperature=ft.kd_temperature,
                       bn_reestimate="off")  # the QAT schedule decides what BN does (QuantConfig, QATSchedule)
    res = train(q, data, tcfg, out_dir=Path(out_dir) / "qat" if out_dir else None,
                callbacks=[QATSchedule(qcfg), *callbacks], resume=resume, write_reports=False,
                teacher=fp32 if ft.kd_weight > 0 else None,
                lr_scales=lr_scales(q, qcfg))  # layers that keep BN live: qcfg.live_bn_lr_factor x lr
    set_act_observing(q, False)
    return res["history"]


def _measure(q, data: Dataset, qcfg: QuantConfig, size: dict, fp32_top1: float, dev, act_memory: bool) -> dict[str, Any]:
    """Test and validation top-1, sizes and activation memory of the finished quantized model."""
    test = evaluate(q, data.test_x, data.test_y, device=dev)
    val = evaluate(q, data.val_x, data.val_y, device=dev) if data.val_y is not None else None
    am = activation_memory(q) if act_memory else None
    return {
        "w_bits": qcfg.w_bits, "a_bits": qcfg.a_bits, "method": str(qcfg.method),
        "granularity": str(qcfg.w_granularity),
        "top1": test["top1"], "val_top1": None if val is None else val["top1"], "fp32_top1": fp32_top1,
        "drop": fp32_top1 - test["top1"],
        **{k: size[k] for k in ("orig_mb", "comp_mb", "comp_bytes", "header_bytes", "ratio", "weight_ratio",
                                "metadata_overhead", "comp_kb", "avg_w_bits", "avg_a_bits")},
        "act_ratio": am["act_ratio"] if am else None, "quantized_fraction": size["quantized_fraction"],
        "layers": size["layers"], "activation_memory": am, "config": qcfg.to_dict(),
    }


def _default_meta(fp32: torch.nn.Module) -> dict:
    return model_meta(fp32)


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a quantize result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    p = Path(out_dir) / "quantize.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(public(result), indent=2, default=str))
    return p


# what the `quantize:` YAML section and the command line call the fine-tuning settings -> FineTune's fields
FINE_TUNE_FLAGS = {"epochs": "--epochs", "lr": "--lr", "kd_weight": "--kd-weight", "kd_temperature": "--kd-temperature"}


def quantize_settings(section: dict[str, Any], quant: dict[str, Any], fine_tune: dict[str, Any],
                      source: str = "the config") -> tuple[QuantConfig, FineTune | None]:
    """The settings of one `bitsearch quantize`: a ``quantize:`` YAML ``section`` (QuantConfig fields, plus
    the fine-tuning's ``epochs``, ``lr`` and ``kd: {weight, temperature}``) with the command line's
    ``quant`` (QuantConfig fields) and ``fine_tune`` (FineTune fields) on top. FineTune is None for a
    method that does not fine-tune (distillation asked for with one is an error)."""
    if not isinstance(section, dict):
        raise QuantConfigError(f"the quantize: section of {source} must be a mapping of options (w_bits: 4, a_bits: 8, "
                               f"...), not a {type(section).__name__}")
    section = dict(section)
    kd = section.pop("kd", None) or {}
    if not isinstance(kd, dict) or set(kd) - {"weight", "temperature"}:
        raise QuantConfigError(f"quantize.kd in {source} must be a mapping {{weight: W, temperature: T}}")
    ft = {k: v for k, v in {"epochs": section.pop("epochs", None), "lr": section.pop("lr", None),
                            "kd_weight": kd.get("weight"), "kd_temperature": kd.get("temperature")}.items()
          if v is not None}
    ft.update(fine_tune)
    qcfg = QuantConfig.from_dict({**section, **quant})
    if not qcfg.method.fine_tunes:
        if ft.get("kd_weight"):
            raise QuantConfigError(f"--kd-weight={ft['kd_weight']} needs a method that fine-tunes (qat or lsq), "
                                   f"not {qcfg.method}")
        return qcfg, None
    return qcfg, FineTune.from_values(ft, FINE_TUNE_FLAGS)


def quantize_checkpoint(checkpoint: str | Path, data_path: str, qcfg: QuantConfig, fine_tune: FineTune | None, *,
                        batch_size: int = 128, device: str = "auto", out_dir: str | Path | None = None,
                        export: str | Path | None = None, download: bool = True,
                        log: Callable[[str], None] = lambda s: None, callbacks: Iterable = ()) -> dict[str, Any]:
    """`bitsearch quantize`: quantize a training checkpoint (a local file) on the data it was trained on
    (its split and seed), measure it, write OUT/quantize.json (OUT defaults to
    ``quant-<label>-<method>`` beside the checkpoint) and, with ``export``, the packed file. Returns the
    quantize JSON keys plus ``label`` (what the layers get: W2-8A8 for a mixed allocation) and ``out_dir``."""
    if batch_size < 1:
        raise QuantConfigError(f"--batch-size={batch_size} is invalid: an integer >= 1")
    fp32, ck = load_baseline(checkpoint)
    # layer patterns that match nothing: an error now, before the data is read
    label = bits_label(plan_for(fp32, qcfg).values())
    tc = ck["config"]
    out = Path(out_dir or Path(checkpoint).parent / f"quant-{label}-{qcfg.method}")
    data = load_dataset(data_path, subset=tc.get("subset", 0), val_size=tc.get("val_size", 0), seed=tc.get("seed", 0),
                        download=download, progress=log)
    if tuple(ck.get("classes", data.classes)) != data.classes:
        raise DataError(f"checkpoint classes {ck.get('classes')} differ from the data's {list(data.classes)}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"quantizing {label} {qcfg.method} ({qcfg.w_granularity}) on {data.summary()['train']} "
        "training images; evaluating on the test set")
    res = quantize_model(fp32, data, qcfg, fine_tune=fine_tune, batch_size=batch_size, seed=tc.get("seed", 0),
                         device=device, out_dir=out, callbacks=callbacks, export=export, model_meta=packed_meta(ck))
    write_result(out, res)
    return {**public(res), "label": label, "out_dir": str(out)}


def packed_with_data(packed: str | Path, data_path: str, download: bool = True,
                     log: Callable[[str], None] = lambda s: None) -> tuple[torch.nn.Module, Dataset]:
    """The model of a packed file and the dataset at ``data_path``, checked to have the same classes."""
    model = load_packed(packed, model_from_meta)  # PackedFileError: one line naming what is wrong
    header = model.bitsearch_header
    data = load_dataset(data_path, download=download, progress=log)
    classes = header["model"].get("classes") or []
    if (classes and list(classes) != list(data.classes)) or data.num_classes != header["model"].get("num_classes"):
        raise DataError(f"{packed} was trained on classes {classes or header['model'].get('num_classes')}, "
                        f"the data at {data_path} has {list(data.classes)}")
    return model, data


def evaluate_checkpoint(checkpoint: str | Path, data_path: str, *, batch_size: int = 256, device: str = "auto",
                        download: bool = True, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """`bitsearch eval --checkpoint`: a training checkpoint's FP32 test top-1 (no autocast), on CPU or GPU."""
    if batch_size < 1:
        raise QuantConfigError(f"--batch-size={batch_size} is invalid: an integer >= 1")
    dev = resolve_device(device)
    fp32, ck = load_baseline(checkpoint)
    data = load_dataset(data_path, download=download, progress=log)
    if list(ck.get("classes") or data.classes) != list(data.classes):
        raise DataError(f"checkpoint classes {ck.get('classes')} differ from the data's {list(data.classes)}")
    res = evaluate(fp32.to(dev), data.test_x, data.test_y, batch_size=batch_size, device=dev)
    meta = ck["meta"]
    return {"top1": res["top1"], "test_loss": res["loss"], "test_images": len(data.test_y), "label": "FP32",
            "checkpoint": str(checkpoint), "arch": meta.get("arch"), "width": meta.get("width"),
            "params": sum(p.numel() for p in fp32.parameters()), "epochs": ck.get("epoch"),
            "file_bytes": Path(checkpoint).stat().st_size, "device": str(dev)}


def evaluate_packed(packed: str | Path, data_path: str, *, batch_size: int = 256, device: str = "auto",
                    download: bool = True, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """`bitsearch eval`: a packed file measured on its own (test top-1) and its size on disk."""
    if batch_size < 1:
        raise QuantConfigError(f"--batch-size={batch_size} is invalid: an integer >= 1")
    dev = resolve_device(device)
    model, data = packed_with_data(packed, data_path, download, log)
    res = evaluate(model.to(dev), data.test_x, data.test_y, batch_size=batch_size, device=dev)
    size = Path(packed).stat().st_size
    bits = bits_summary(quant_layers(model).values())  # a mixed-precision file: its layers' range, W2-8A8
    return {"top1": res["top1"], "comp_mb": size / 1e6, "file_bytes": size, **bits, "label": bits["bits"],
            "method": model.bitsearch_header["config"]["method"], "test_images": len(data.test_y), "packed": str(packed)}
