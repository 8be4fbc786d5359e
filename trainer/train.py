"""The training loop: SGD + cosine, per-epoch metrics, atomic checkpoints, exact resume.

``train(model, data, cfg, out_dir, callbacks)`` trains any nn.Module on a ``Dataset`` and reports
through ``Callback`` objects (Ray Tune and MLflow attach from outside; nothing here imports them).
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from trainer.allocator import keep_freed_memory
from trainer.config import ConfigError, TrainConfig, parse_progressive
from trainer.data import Dataset, GpuLoader, normalize

# trainer.analysis (matplotlib) is imported where a run writes its reports: trial workers never do.

CHECKPOINT_FORMAT = "bitsearch-train-v1"
# config keys that may differ between a checkpoint and a resumed run (they do not change the result)
SHORT_RUN_STEPS = 500  # bn_reestimate "auto": runs with fewer optimizer steps in all re-estimate BN at the end
RESUME_FREE_KEYS = {"device", "amp", "channels_last", "eval_every", "eval_test", "bn_reestimate"}  # compile drops the last partial batch


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not match the run that wants to resume from it."""


class Callback:
    """Hooks the loop calls. Every hook is optional: any object with some of these methods is a callback."""

    def on_train_start(self, state: dict[str, Any]) -> None: ...
    def on_epoch_start(self, epoch: int, model: nn.Module) -> None: ...
    def on_batch_end(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None: ...
    def on_train_end(self, result: dict[str, Any]) -> None: ...


def _fire(callbacks: list, hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (avx512_bf16 or AMX on x86; Linux /proc/cpuinfo). Elsewhere bf16
    on CPU is emulated and slower than FP32, so autocast stays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool, str]:
    """(bf16 autocast, channels-last, a line saying which and why) for ``cfg`` on ``device``.

    ``auto`` turns both on with CUDA and on CPUs that compute bf16 natively (avx512_bf16 / AMX), where they
    are faster at the same accuracy (docs/RESULTS.md, training speed). Elsewhere bf16 is emulated and
    slower than FP32, so ``auto`` stays FP32 (``on`` still forces it)."""
    native = device.type == "cpu" and cpu_has_native_bf16()
    fast = device.type == "cuda" or native
    amp = cfg.amp == "on" or (cfg.amp == "auto" and fast)
    cl = cfg.channels_last == "on" or (cfg.channels_last == "auto" and fast)
    where = "CUDA" if device.type == "cuda" else f"CPU {'with' if native else 'without'} native bf16"
    kind = "fp16 (with a gradient scaler)" if amp_dtype(device) is torch.float16 else "bf16"
    line = (f"precision: {kind} autocast {'on' if amp else 'off'}, channels-last {'on' if cl else 'off'} "
            f"(amp={cfg.amp}, channels_last={cfg.channels_last}; {where})")
    return amp, cl, line


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast type on ``device``: bf16, except on a GPU that lacks it (before Ampere), where fp16
    (whose narrow range needs a gradient scaler)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def param_groups(model: nn.Module, weight_decay: float, no_decay_bn_bias: bool, lr: float | None = None,
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Optimiser groups: weight decay (none on 1-d parameters with ``no_decay_bn_bias``), and a learning rate
    of ``lr`` times ``lr_scales[name]`` for the parameters named there (QAT: layers that keep BN live,
    quantization.lr_scales); every other parameter trains at ``lr``."""
    scales = dict(lr_scales or {})
    named = dict(model.named_parameters())
    unknown = sorted(set(scales) - set(named))
    if unknown:
        raise ValueError(f"lr_scales names parameters the model lacks: {', '.join(unknown[:3])}")
    groups: dict[tuple[float, float], list] = {}
    for name, p in named.items():
        if p.requires_grad:
            wd = 0.0 if no_decay_bn_bias and p.ndim <= 1 else weight_decay  # BN weights/biases, biases, scales
            groups.setdefault((wd, float(scales.get(name, 1.0))), []).append(p)
    out = []
    for (wd, scale), ps in groups.items():
        g = {"params": ps, "weight_decay": wd}
        if scale != 1.0:
            if lr is None:
                raise ValueError("parameters with an lr_scale need the base learning rate")
            g["lr"] = lr * scale
        out.append(g)
    return out


def cosine_lambda(total_steps: int, warmup_steps: int = 0):
    """LR multiplier per optimiser step: linear warm-up, then cosine from 1 to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term: T^2 * KL(softmax(teacher / T) || softmax(student / T)), batch mean."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, 1), nn.functional.log_softmax(teacher / t, 1),
                                reduction="batchmean", log_target=True) * t * t


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 100,
             device: torch.device | None = None, amp: bool = False) -> dict[str, Any]:
    """Loss, top-1 (%) and predictions of ``model`` on uint8 images ``x`` (normalised here); ``amp``:
    under autocast (amp_dtype)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds = []
    for i in range(0, len(y), batch_size):
        xb = normalize(x[i:i + batch_size].to(device, non_blocking=True))
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
            out = model(xb)
        loss_sum += nn.functional.cross_entropy(out.float(), yb, reduction="sum")
        preds.append(out.argmax(1))
    model.train(was_training)
    pred = torch.cat(preds).cpu()
    n = max(1, len(y))
    return {"loss": loss_sum.item() / n, "top1": 100.0 * (pred == y.cpu()).float().mean().item() if len(y) else 0.0,
            "pred": pred}


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: torch.Tensor, *, batch_size: int = 250, max_batches: int = 40,
                  device: torch.device | None = None) -> int:
    """Replace every BN's running statistics by their plain average over train-mode passes of (up to
    ``max_batches`` batches of) the un-augmented uint8 ``images``; the number of batches used. After a few
    hundred steps the running averages (momentum 0.1) still describe earlier weights, and eval-mode
    predictions collapse to one class."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return 0
    device = device or next(model.parameters()).device
    was = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    n = 0
    for i in range(0, len(images), batch_size):
        if n >= max_batches:
            break
        model(normalize(images[i:i + batch_size].to(device, non_blocking=True)))
        n += 1
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.train(was)
    return n


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (weights_only) or raise CheckpointError saying why."""
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a directory: give the checkpoint file, e.g. {p / 'checkpoint.pt'}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {p} is corrupt or not a bitsearch checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {p} is not a bitsearch training checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


WEIGHTS_ONLY_KEYS = ("format", "config", "meta", "epoch", "model", "history", "classes")


def save_weights_only(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A training checkpoint without its optimiser, schedule, RNG and raw (pre-EMA) states: a reference
    model to quantize, search and evaluate (half the size or less), not to resume. Returns ``dst``."""
    ck = load_checkpoint(src)
    dst = Path(dst)
    _atomic_save({k: ck[k] for k in WEIGHTS_ONLY_KEYS if k in ck}, dst)
    return dst


def train(model: nn.Module, data: Dataset, cfg: TrainConfig, *, out_dir: str | os.PathLike | None = None,
          callbacks: Iterable[Callback] = (), resume: bool = False, meta: dict[str, Any] | None = None,
          write_reports: bool = True, teacher: nn.Module | None = None,
          lr_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` with ``cfg``; returns the final metrics and history.

    With ``out_dir``: a checkpoint (model, optimiser, scheduler, RNG states, config, history) is written
    atomically after every epoch to ``out_dir/checkpoint.pt``, so a killed run loses at most the
    current epoch; ``resume=True`` continues from it and ends with the same weights as an
    uninterrupted run. ``meta`` (JSON-able) is stored in the checkpoint (model description etc.).
    ``teacher`` (with ``cfg.kd_weight`` > 0): knowledge distillation from its logits (it stays in eval
    mode and is not trained). ``lr_scales`` (parameter name -> factor): those parameters train at
    factor x the learning rate.
    """
    if cfg.kd_weight > 0 and teacher is None:
        raise ConfigError(f"kd_weight={cfg.kd_weight} needs a teacher model (distillation from the FP32 baseline)")
    callbacks = list(callbacks)
    allocator = keep_freed_memory()  # CPU steps page-fault their activations in every step otherwise
    device = resolve_device(cfg.device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    seed_everything(cfg.seed)
    run = _Run(model, data, cfg, device, teacher if cfg.kd_weight > 0 else None, lr_scales)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if resume:
        history, start_epoch = _restore(run, ckpt_path)

    state = {"model": model, "optimizer": run.opt, "device": device, "config": cfg, "steps_per_epoch": run.steps,
             "amp": run.amp, "channels_last": run.channels_last, "precision": run.precision,
             "allocator": allocator, "start_epoch": start_epoch, "checkpoint": str(ckpt_path) if ckpt_path else None, "history": history,
             "data": data.summary()}
    _fire(callbacks, "on_train_start", state)
    if out:
        out.mkdir(parents=True, exist_ok=True)

    test_eval = None
    for epoch in range(start_epoch, cfg.epochs):
        m, test_eval = _epoch_with_eval(run, epoch, callbacks, test_eval)
        history.append(m)
        if ckpt_path:
            _save_checkpoint(run, ckpt_path, epoch + 1, history, meta)
        _fire(callbacks, "on_epoch_end", epoch, m, state)

    result = _final(run, history, test_eval, out, ckpt_path, allocator, write_reports)
    _fire(callbacks, "on_train_end", result)
    return result


def _final(run: "_Run", history: list[dict], test_eval: dict | None, out: Path | None, ckpt_path: Path | None,
           allocator: str, write_reports: bool) -> dict[str, Any]:
    """The run's result: final metrics (the test set measured in FP32), history, reports written."""
    cfg, data, model = run.cfg, run.data, run.model
    if run.ema is not None:  # the caller's model ends with the weights that were evaluated and saved
        model.load_state_dict(run.ema.module.state_dict())
    if test_eval is None and (cfg.eval_test or (out and write_reports)):  # e.g. resumed a finished run
        test_eval = evaluate(model, data.test_x, data.test_y, device=run.device)
    final = history[-1] if history else {}
    result: dict[str, Any] = {
        "epochs": cfg.epochs, "top1": test_eval["top1"] if test_eval else None,
        "test_loss": test_eval["loss"] if test_eval else None,
        "train_top1": final.get("train_top1"), "val_top1": final.get("val_top1"),
        "history": history, "checkpoint": str(ckpt_path) if ckpt_path else None,
        "out_dir": str(out) if out else None, "amp": run.amp, "channels_last": run.channels_last,
        "allocator": allocator,
    }
    if out and write_reports:
        from trainer.analysis import write_reports as _write
        result["reports"] = _write(out, history, data.test_y, test_eval["pred"], data.classes)
    return result


class WeightEMA:
    """An exponential moving average of a model's weights and BN statistics, updated after each optimiser
    step: ``avg = decay * avg + (1 - decay) * current`` for floating tensors, integer buffers (BN's batch
    count) copied. ``module`` is the averaged copy, in eval mode, never trained."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(_tensors(self.module), _tensors(model)))
        self._float = [(a, m) for a, m in pairs if a.is_floating_point()]
        self._other = [(a, m) for a, m in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_([a for a, _ in self._float], [m for _, m in self._float], 1.0 - self.decay)
        for a, m in self._other:
            a.copy_(m)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


class _Run:
    """What one training run works with: model (and its compiled form), optimiser, schedule, loader, RNG."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: TrainConfig, device: torch.device,
                 teacher: nn.Module | None = None, lr_scales: dict[str, float] | None = None):
        self.model, self.data, self.cfg, self.device = model, data, cfg, device
        self.teacher = teacher.to(device).eval() if teacher is not None else None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.amp, self.channels_last, self.precision = precision(cfg, device)
        self.dtype = amp_dtype(device)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range
        self.scaler = torch.amp.GradScaler(device.type) if self.amp and self.dtype is torch.float16 else None
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN picks its fastest kernels once
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.eval_model = self.ema.module if self.ema is not None else model  # what is evaluated and saved
        self.opt = torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.no_decay_bn_bias, cfg.lr, lr_scales), lr=cfg.lr,
                                   momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.loader = GpuLoader(data.train_x.to(device), data.train_y.to(device), cfg.batch_size, train=True,
                                generator=self.gen, do_augment=cfg.augment, drop_last=cfg.compile)
        self.steps = len(self.loader)
        self.reestimate_bn = cfg.bn_reestimate == "on" or (
            cfg.bn_reestimate == "auto" and cfg.epochs * self.steps < SHORT_RUN_STEPS)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, cosine_lambda(cfg.epochs * self.steps, int(cfg.warmup_epochs * self.steps)))
        self.forward = torch.compile(model, dynamic=False) if cfg.compile else model
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # progressive resizing: the training image side per epoch (None = as stored); evaluation is full size
        self.sizes: list[int | None] = [s for s, e in parse_progressive(cfg.progressive) for _ in range(e)]
        self.sizes += [None] * (cfg.epochs - len(self.sizes))


def _epoch_with_eval(run: "_Run", epoch: int, callbacks: list, test_eval: dict | None) -> tuple[dict, dict | None]:
    """One training epoch, then validation (every epoch: the split is small; curves, model selection) and
    the test set every ``eval_every`` epochs and at the last; the epoch's metrics and the latest test
    evaluation."""
    m = _train_epoch(run, epoch, callbacks)
    cfg, data, model = run.cfg, run.data, run.eval_model
    last = epoch + 1 == cfg.epochs
    if last and run.reestimate_bn:
        reestimate_bn(model, data.train_x, device=run.device)
    amp = run.amp and not last  # the final figures in FP32: what `bitsearch eval` and quantization measure
    if data.val_y is not None:
        v = evaluate(model, data.val_x, data.val_y, device=run.device, amp=amp)
        m.update(val_loss=v["loss"], val_top1=v["top1"])
    if (last or (epoch + 1) % cfg.eval_every == 0) and cfg.eval_test:
        test_eval = evaluate(model, data.test_x, data.test_y, device=run.device, amp=amp)
        m.update(test_loss=test_eval["loss"], test_top1=test_eval["top1"])
    return m, test_eval


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Downscale a batch of (normalised) images to size x size: bilinear with antialiasing, the way an
    image resize would, so a 24 px epoch sees the whole augmented 32 px crop at lower resolution."""
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _restore(run: _Run, ckpt_path: Path | None) -> tuple[list[dict], int]:
    """Load model, optimiser, schedule and RNG states from the checkpoint; (history, next epoch)."""
    if ckpt_path is None or not ckpt_path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path}")
    ck = load_checkpoint(ckpt_path)
    # a setting the checkpoint does not record came with a later version of bitsearch: the run was made
    # with its default (new settings default to the old behaviour), so an old checkpoint still resumes
    saved = {**TrainConfig().to_dict(), **ck["config"]}
    cfg = run.cfg
    diff = sorted(k for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS and saved.get(k) != v)
    if diff:
        raise CheckpointError("checkpoint was made with a different configuration: " + ", ".join(
            f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in diff))
    if "optimizer" not in ck:
        raise CheckpointError(f"checkpoint {ckpt_path} holds the weights only (a reference model): it cannot resume training")
    try:
        run.model.load_state_dict(ck["train_model"] if run.ema is not None else ck["model"])
        if run.ema is not None:
            run.ema.module.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit this model: {str(e).splitlines()[0]}") from None
    run.sched.load_state_dict(ck["scheduler"])
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    run.gen.set_state(ck["rng"]["data"])
    if run.device.type == "cuda" and ck["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(ck["rng"]["cuda"])
    return list(ck["history"]), int(ck["epoch"])


def _train_epoch(run: _Run, epoch: int, callbacks: list) -> dict[str, float]:
    """One pass over the training set; the epoch's training metrics."""
    run.model.train()
    _fire(callbacks, "on_epoch_start", epoch, run.model)
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    seen = 0
    size = run.sizes[epoch]
    for step, (xb, yb) in enumerate(run.loader):
        if size is not None:
            xb = resize_batch(xb, size)
        if run.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=run.dtype, enabled=run.amp):
            logits = run.forward(xb)
            loss = run.loss_fn(logits.float(), yb)
            if run.teacher is not None:
                with torch.no_grad():
                    soft = run.teacher(xb).float()
                loss = (1 - run.cfg.kd_weight) * loss + run.cfg.kd_weight * kd_loss(logits.float(), soft,
                                                                                    run.cfg.kd_temperature)
        run.opt.zero_grad(set_to_none=True)
        _step(run, loss)
        if run.ema is not None:
            run.ema.update()
        run.sched.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
        _fire(callbacks, "on_batch_end", epoch, step, run.steps, loss.detach())
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    m = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_top1": 100.0 * correct.item() / seen,
         "lr": run.opt.param_groups[0]["lr"], "epoch_s": train_s, "images_per_s": seen / train_s}
    if run.cfg.progressive:
        m["train_px"] = float(size or run.data.train_x.shape[-1])
    return m


def _step(run: _Run, loss: torch.Tensor) -> None:
    """Backward and optimiser step; with fp16 autocast through the gradient scaler (it skips a step whose
    gradients overflowed and lowers the scale)."""
    if run.scaler is None:
        loss.backward()
        run.opt.step()
        return
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()


def _save_checkpoint(run: _Run, path: Path, epoch: int, history: list[dict], meta: dict | None) -> None:
    _atomic_save({
        "format": CHECKPOINT_FORMAT, "config": run.cfg.to_dict(), "meta": meta or {}, "epoch": epoch,
        "model": run.eval_model.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        # with EMA, "model" holds the average (what quantize and eval read) and this the weights being trained
        "train_model": run.model.state_dict() if run.ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "data": run.gen.get_state(),
                "cuda": torch.cuda.get_rng_state() if run.device.type == "cuda" else None},
        "history": history, "classes": list(run.data.classes),
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
    }, path)
