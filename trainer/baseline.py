"""Train the FP32 baseline from a data path: load data, build the model, train, write result.json.
Shared by `bitsearch train` and `bitsearch study`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from trainer.allocator import ALLOCATOR_LINES, keep_freed_memory
from trainer.config import ConfigError, TrainConfig
from trainer.data import load_dataset
from trainer.model import count_params
from trainer.zoo import build_model, describe
from trainer.train import CheckpointError, load_checkpoint, precision, resolve_device, train


def _r(v):
    return None if v is None else round(v, 2)


def fit_baseline(data_path: str | Path, out: str | Path, cfg: TrainConfig, *, download: bool = True,
                 callbacks: Iterable = (), resume: bool = False,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Returns the `train` JSON keys (params, epochs, top1, train_top1, val_top1, checkpoint, out_dir, ...)."""
    out = Path(out)
    data = load_dataset(data_path, subset=cfg.subset, val_size=cfg.val_size, seed=cfg.seed, download=download,
                        progress=progress)
    model, meta = build_model(cfg.model, data.num_classes, width=cfg.width, dropout=cfg.dropout)
    params, summary = count_params(model), data.summary()
    if progress:
        progress(f"{describe(meta)}: {params:,} params; {summary['train']} train / "
                 f"{summary['val']} val / {summary['test']} test images")
        progress(precision(cfg, resolve_device(cfg.device))[2])
        progress(f"allocator: {ALLOCATOR_LINES[keep_freed_memory()]}")
    res = train(model, data, cfg, out_dir=out, callbacks=callbacks, resume=resume,
                meta={**meta, "data": summary})
    result = {"params": params, "epochs": cfg.epochs, "top1": _r(res["top1"]), "train_top1": _r(res["train_top1"]),
              "val_top1": _r(res["val_top1"]), "checkpoint": res["checkpoint"], "out_dir": str(out),
              "amp": res["amp"], "channels_last": res["channels_last"], "allocator": res["allocator"],
              "reports": res.get("reports", {}), "config": cfg.to_dict(), "data": summary,
              "history": res["history"]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def train_baseline(data_path: str | Path, out: str | Path, section: dict[str, Any], flags: dict[str, Any], *,
                   download: bool = True, callbacks: Iterable = (), resume: bool = False,
                   progress: Callable[[str], None] | None = None, source: str | None = None,
                   check_model: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """`bitsearch train`: a profile's ``train:`` section with the command line's ``flags`` on top
    (TrainConfig checks both); ``resume`` continues from OUT/checkpoint.pt with its recorded config.
    The model is built before the data loads (ModelError for a --model that cannot be) and handed to
    ``check_model`` (the command line: can it be quantized), so a bad network is refused before training."""
    if not isinstance(section, dict):
        raise ConfigError(f"the train: section of {source} must be a mapping of options")
    ck = Path(out) / "checkpoint.pt"
    if resume and not ck.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {ck} (start without --resume)")
    if resume:
        section = {**load_checkpoint(ck)["config"], **section}
    cfg = TrainConfig.from_dict({**section, **flags})
    model, _ = build_model(cfg.model, 10, width=cfg.width, dropout=cfg.dropout)
    if check_model is not None:
        check_model(model)
    return fit_baseline(data_path, out, cfg, download=download, callbacks=callbacks, resume=resume, progress=progress)
