"""The `bitsearch` command line: thin wrappers over trainer/, quantization/, tune/, mlflow_server/.

Every result command takes --json and then prints one JSON object as the last line of stdout (the
same content it writes to its output directory). Errors: one line on stderr, exit 2; --debug
shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from quantization.config import QAT_EPOCHS, QAT_LR, Granularity, Method
from trainer.allocator import keep_freed_memory

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class UserError(Exception):
    """Bad input: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + message
        raise UserError(f"{self.prog}: {message}")


# ------------------------------------------------------------------------------------------------
# shared helpers


def stderr_console():
    from rich.console import Console
    return Console(stderr=True, highlight=False)


def load_profile(profile: str | None, config: str | None) -> dict[str, Any]:
    """Sections of a YAML profile: --config FILE, or --profile NAME (configs/NAME.yaml)."""
    if profile and config:
        raise UserError("give --profile or --config, not both")
    if profile:
        path = REPO_CONFIGS / f"{profile}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
            raise UserError(f"unknown profile {profile!r}; available: {', '.join(names) or 'none'}")
    elif config:
        path = Path(config)
        if not path.is_file():
            raise UserError(f"config file {config} does not exist")
    else:
        return {}
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (train:, quantize:, ...)")
    return d


def writable_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".bitsearch-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {p} is not writable: {e.strerror or e}") from None
    return p


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any work, that ``path`` can be written as a file (its folder is created)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory: give a file path such as {p / 'model.bsq'}")
    writable_dir(p.parent)
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{flag} {p} exists and is not writable")
    return p


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> null, so the line is strict JSON."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def emit(result: dict[str, Any], as_json: bool, human: Callable[[], None] | None = None) -> None:
    """Human summary (unless --json quiets nothing: it still prints), then the JSON line last."""
    if human:
        human()
    if as_json:
        sys.stdout.write(json.dumps(_json_safe(result), default=str, allow_nan=False) + "\n")
        sys.stdout.flush()


def _explicit(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """CLI flags that were actually given, renamed to config keys."""
    return {key: getattr(args, dest) for dest, key in mapping.items() if getattr(args, dest, None) is not None}


class RichProgress:
    """trainer Callback: a progress bar over all steps, one line per epoch, on stderr."""

    def __init__(self, label: str = "train"):
        self.label = label
        self.console = stderr_console()
        self.progress = None

    def on_train_start(self, state):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        cfg = state["config"]
        total = (cfg.epochs - state["start_epoch"]) * state["steps_per_epoch"]
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
                                 transient=True)
        self.task = self.progress.add_task(self.label, total=total, info="")
        self.progress.start()

    def on_batch_end(self, epoch, step, steps, loss):
        if step % 10 == 0 or step + 1 == steps:
            self.progress.update(self.task, advance=0, info=f"epoch {epoch + 1} loss {loss.item():.3f}")
        self.progress.advance(self.task)

    def on_epoch_end(self, epoch, m, state):
        parts = [f"epoch {m['epoch']:>3}", f"loss {m['train_loss']:.4f}", f"train {m['train_top1']:.2f}%"]
        if "val_top1" in m:
            parts.append(f"val {m['val_top1']:.2f}%")
        if "test_top1" in m:
            parts.append(f"test {m['test_top1']:.2f}%")
        parts += [f"lr {m['lr']:.4g}", f"{m['images_per_s']:.0f} img/s"]
        self.progress.console.print("  ".join(parts))

    def on_train_end(self, result):
        if self.progress:
            self.progress.stop()


# ------------------------------------------------------------------------------------------------
# train

TRAIN_FLAGS = {"epochs": "epochs", "width": "width", "batch_size": "batch_size", "lr": "lr", "subset": "subset",
               "val_size": "val_size", "seed": "seed", "device": "device", "weight_decay": "weight_decay",
               "label_smoothing": "label_smoothing", "compile": "compile", "amp": "amp", "channels_last": "channels_last",
               "progressive": "progressive"}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the FP32 MobileNet-v2 baseline")
    p.add_argument("--data", required=True, help="torchvision root, image-folder tree, or .tar/.tar.gz of one")
    p.add_argument("--out", required=True, help="output directory (checkpoint, curves, confusion matrix, summary)")
    p.add_argument("--profile", help="preset from configs/: quick (CPU minutes), cpu (the CPU reference model, ~42 min on 2 native-bf16 cores) or seed (the reference recipe, GPU)")
    p.add_argument("--config", help="YAML file with a train: section")
    p.add_argument("--epochs", type=int)
    p.add_argument("--width", type=float, help="width multiplier (1.0 = 2.24M params)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float)
    p.add_argument("--progressive", help="train the first epochs at lower resolution (faster): SIZE:EPOCHS[,...], "
                   "e.g. 24:8 = 8 epochs at 24 px, then 32 px; evaluation is always at 32 px")
    p.add_argument("--subset", type=int, help="stratified subset of N training images")
    p.add_argument("--val-size", dest="val_size", type=int, help="images held out of train for validation")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--amp", dest="amp", action="store_const", const="on",
                   help="bf16 autocast, also on CPU (default: on with CUDA and on CPUs with native bf16)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off")
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const="on",
                   help="channels-last memory format, also on CPU (default: as --amp)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const="off")
    p.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--tracking-uri", help="also log the run to this MLflow tracking URI")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from trainer import TrainConfig, load_checkpoint
    from trainer.baseline import fit_baseline

    out = writable_dir(args.out)
    base = load_profile(args.profile, args.config).get("train") or {}
    if not isinstance(base, dict):
        raise UserError(f"the train: section of {args.config or args.profile} must be a mapping of options")
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise UserError(f"--resume: no checkpoint at {out / 'checkpoint.pt'} (start without --resume)")
    if args.resume:
        base = {**load_checkpoint(out / "checkpoint.pt")["config"], **base}
    cfg = TrainConfig.from_dict({**base, **_explicit(args, TRAIN_FLAGS)})
    con = stderr_console()
    callbacks: list = [RichProgress()]
    if args.tracking_uri:
        from mlflow_server.tracking import TrainRunLogger
        callbacks.append(TrainRunLogger(args.tracking_uri, run_name=f"baseline-{out.name}"))
    result = fit_baseline(args.data, out, cfg, download=not args.no_download, callbacks=callbacks, resume=args.resume,
                          progress=lambda s: con.print(s))
    result.pop("history")

    def human():
        print(f"test top-1 {result['top1']:.2f}%  (train {result['train_top1']}%, {result['params']:,} params, "
              f"{cfg.epochs} epochs)")
        print(f"checkpoint {result['checkpoint']}; curves, confusion matrix, summary in {out}")
    emit(result, args.json, human)
    return 0


# ------------------------------------------------------------------------------------------------
# quantize

QUANT_FLAGS = {"w_bits": "w_bits", "a_bits": "a_bits", "granularity": "w_granularity", "symmetric": "w_symmetric",
               "method": "method", "calib_batches": "calib_batches", "observer": "a_observer",
               "bn_reestimate": "bn_reestimate_batches"}


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a trained checkpoint (PTQ, QAT or LSQ) and measure it")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt from `bitsearch train`")
    p.add_argument("--data", required=True)
    p.add_argument("--w-bits", dest="w_bits", help="weight bits 2..8 (32 = FP32)")
    p.add_argument("--a-bits", dest="a_bits", help="activation bits 2..8 (32 = FP32)")
    p.add_argument("--granularity", choices=[g.flag for g in Granularity], help="weight scales")
    p.add_argument("--symmetric", action="store_const", const=True, help="symmetric weights (default)")
    p.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False, help="asymmetric weights")
    p.add_argument("--observer", choices=["minmax", "ema", "percentile", "mse"], help="activation observer")
    p.add_argument("--method", choices=list(Method))
    p.add_argument("--epochs", type=int, default=None, help=f"QAT/LSQ fine-tuning epochs (default {QAT_EPOCHS})")
    p.add_argument("--lr", type=float, default=None, help=f"QAT/LSQ learning rate (default {QAT_LR})")
    p.add_argument("--calib-batches", dest="calib_batches", type=int)
    p.add_argument("--bn-reestimate", dest="bn_reestimate", type=int, metavar="BATCHES",
                   help="PTQ: re-estimate BN statistics on the quantized model over this many augmented training "
                        "batches (default 16; 0 keeps the FP32 model's statistics)")
    p.add_argument("--kd-weight", dest="kd_weight", type=float, default=None,
                   help="QAT/LSQ: distil from the FP32 baseline, loss = (1-w) label loss + w KD loss (default 0: off)")
    p.add_argument("--kd-temperature", dest="kd_temperature", type=float, default=None, help="distillation temperature (default 4)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128)
    p.add_argument("--config", help="YAML with a quantize: section (per-layer overrides, exceptions, kd: {weight, temperature}, ...)")
    p.add_argument("--export", help="write the bit-packed model file here")
    p.add_argument("--out", help="output directory (default: next to the checkpoint, quant-W<w>A<a>-<method>; "
                   "mixed bits: W<lowest>-<highest>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    from quantization import QuantConfig
    from quantization.api import bits_label, plan_for
    from trainer import load_dataset
    from pipeline import load_baseline, packed_meta, public, quantize_model, write_result

    section = load_profile(None, args.config).get("quantize") or {}  # QuantConfig keys + epochs, lr
    if not isinstance(section, dict):
        raise UserError(f"the quantize: section of {args.config} must be a mapping of options (w_bits: 4, a_bits: 8, "
                        f"...), not a {type(section).__name__}")
    section = dict(section)
    try:
        yaml_epochs, yaml_lr = int(section.pop("epochs", QAT_EPOCHS)), float(section.pop("lr", QAT_LR))
    except (TypeError, ValueError):
        raise UserError(f"quantize.epochs / quantize.lr in {args.config} must be numbers") from None
    kd = section.pop("kd", None) or {}
    if not isinstance(kd, dict) or set(kd) - {"weight", "temperature"}:
        raise UserError(f"quantize.kd in {args.config} must be a mapping {{weight: W, temperature: T}}")
    kd_weight = args.kd_weight if args.kd_weight is not None else kd.get("weight", 0.0)
    kd_temp = args.kd_temperature if args.kd_temperature is not None else kd.get("temperature", 4.0)
    try:
        kd_weight, kd_temp = float(kd_weight), float(kd_temp)
    except (TypeError, ValueError):
        raise UserError("the distillation weight and temperature must be numbers") from None
    if not 0 <= kd_weight <= 1:
        raise UserError(f"--kd-weight={kd_weight} is invalid: allowed [0, 1]")
    if not (kd_temp > 0 and math.isfinite(kd_temp)):
        raise UserError(f"--kd-temperature={kd_temp} is invalid: a number > 0")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} is invalid: an integer >= 1")
    if args.export:
        writable_file(args.export, "--export")
    qat_epochs = args.epochs if args.epochs is not None else yaml_epochs
    qat_lr = args.lr if args.lr is not None else yaml_lr
    qcfg = QuantConfig.from_dict({**section, **_explicit(args, QUANT_FLAGS)})
    if kd_weight > 0 and not qcfg.method.fine_tunes:
        raise UserError(f"--kd-weight={kd_weight} needs a method that fine-tunes (qat or lsq), not {qcfg.method}")
    if qat_epochs < 1 and qcfg.method.fine_tunes:
        raise UserError(f"--epochs={qat_epochs} is invalid: QAT/LSQ need at least 1 epoch")
    if not (qat_lr > 0):
        raise UserError(f"--lr={qat_lr} is invalid: must be > 0")
    from mlflow_server.tracking import fetch_artifact
    fp32, ck = load_baseline(fetch_artifact(args.checkpoint))
    # layer patterns that match nothing: an error now, before the data is read; the label says what the
    # layers get (W2-8A8 for a mixed allocation, whose base w_bits says nothing)
    label = bits_label(plan_for(fp32, qcfg).values())
    tc = ck["config"]
    out = writable_dir(args.out or Path(args.checkpoint).parent / f"quant-{label}-{qcfg.method}")
    con = stderr_console()
    data = load_dataset(args.data, subset=tc.get("subset", 0), val_size=tc.get("val_size", 0), seed=tc.get("seed", 0),
                        download=not args.no_download, progress=lambda s: con.print(s))
    if tuple(ck.get("classes", data.classes)) != data.classes:
        raise UserError(f"checkpoint classes {ck.get('classes')} differ from the data's {list(data.classes)}")
    con.print(f"quantizing {label} {qcfg.method} ({qcfg.w_granularity}) on {data.summary()['train']} "
              "training images; evaluating on the test set")
    cbs = [RichProgress(f"{qcfg.method} {label}")] if qcfg.method.fine_tunes else []
    res = quantize_model(fp32, data, qcfg, qat_epochs=qat_epochs, qat_lr=qat_lr, batch_size=args.batch_size,
                         seed=tc.get("seed", 0), device=args.device, out_dir=out, callbacks=cbs,
                         export=args.export, model_meta=packed_meta(ck), kd_weight=kd_weight, kd_temperature=kd_temp)
    write_result(out, res)
    result = public(res)
    result["out_dir"] = str(out)

    def human():
        from rich.console import Console
        from rich.table import Table
        c = Console(highlight=False)
        c.print(f"{label} {result['method']}: top-1 {result['top1']:.2f}% "
                f"(FP32 {result['fp32_top1']:.2f}%, drop {result['drop']:+.2f})")
        t = Table("layer", "params", "w_bits", "a_bits", "packed B", "meta B", "fp32 B", "total B",
                  title="Size per layer (the totals sum to the file)")
        bits = lambda b: "-" if b is None else str(b)  # noqa: E731  (the file-header row has none)
        for r in result["layers"]:
            t.add_row(r["layer"], f"{r['params']:,}", bits(r["w_bits"]), bits(r["a_bits"]), f"{r['packed_bytes']:,}",
                      f"{r['metadata_bytes']:,}", f"{r['fp32_bytes']:,}", f"{r['total_bytes']:,}")
        c.print(t)
        c.print(f"size {result['orig_mb']:.3f} MB -> {result['comp_mb']:.3f} MB: ratio {result['ratio']:.2f}x, "
                f"weights {result['weight_ratio']:.2f}x, metadata {100 * result['metadata_overhead']:.2f}% of it, "
                f"{100 * result['quantized_fraction']:.1f}% of params quantized")
        am = result["activation_memory"]
        c.print(f"peak activation memory (batch 1): {am['batch1']['fp32_bytes']:,} B FP32 -> "
                f"{am['batch1']['quant_bytes']:,} B ({am['batch1']['ratio']:.2f}x); batch 128: "
                f"{am['batch128']['fp32_bytes']:,} -> {am['batch128']['quant_bytes']:,} B")
        if result.get("export"):
            c.print(f"packed model {result['export']}: {result['export_bytes']:,} B on disk = comp_mb "
                    f"(of which {result['export_header_bytes']:,} B header, tensor table and checksum)")
    emit(result, args.json, human)
    return 0


# ------------------------------------------------------------------------------------------------
# eval


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure a packed model file (.bsq) on its own: test top-1 and size on disk")
    p.add_argument("--packed", required=True, help="a .bsq file from `bitsearch quantize --export` or a search trial")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def _packed_with_data(packed: str | os.PathLike, data_path: str, download: bool):
    """The model of a packed file and the dataset at ``data_path``, checked to have the same classes."""
    from quantization.packing import load_packed
    from trainer import load_dataset, model_from_meta
    model = load_packed(packed, model_from_meta)  # PackedFileError: one line naming what is wrong
    header = model.bitsearch_header
    con = stderr_console()
    data = load_dataset(data_path, download=download, progress=lambda s: con.print(s))
    classes = header["model"].get("classes") or []
    if (classes and list(classes) != list(data.classes)) or data.num_classes != header["model"].get("num_classes"):
        raise UserError(f"{packed} was trained on classes {classes or header['model'].get('num_classes')}, "
                        f"the data at {data_path} has {list(data.classes)}")
    return model, data


def cmd_eval(args) -> int:
    from quantization.api import bits_label, quant_layers
    from trainer import evaluate, resolve_device

    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} is invalid: an integer >= 1")
    dev = resolve_device(args.device)
    model, data = _packed_with_data(args.packed, args.data, not args.no_download)
    header = model.bitsearch_header
    res = evaluate(model.to(dev), data.test_x, data.test_y, batch_size=args.batch_size, device=dev)
    size = Path(args.packed).stat().st_size
    cfg = header["config"]
    label = bits_label(quant_layers(model).values())  # W2-8A8 for a mixed-precision file: its layers' bits
    result = {"top1": res["top1"], "comp_mb": size / 1e6, "file_bytes": size, "w_bits": cfg["w_bits"],
              "a_bits": cfg["a_bits"], "method": cfg["method"], "test_images": len(data.test_y),
              "packed": str(args.packed)}
    emit(result, args.json, lambda: print(f"{args.packed}: {label} {cfg['method']}, "
                                          f"test top-1 {res['top1']:.2f}% on {len(data.test_y):,} images, "
                                          f"{size:,} B on disk ({size / 1e6:.4f} MB)"))
    return 0


# ------------------------------------------------------------------------------------------------
# export


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a packed model (.bsq, or a search trial's) to ONNX (QDQ, int8/int4 weights)")
    p.add_argument("source", nargs="*", metavar="EXPERIMENT TRIAL_ID",
                   help="a search's experiment directory and one of its trial ids (instead of --packed)")
    p.add_argument("--packed", help="a .bsq file from `bitsearch quantize --export` or a search trial")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--check", metavar="DATA", help="run the ONNX model in onnxruntime on DATA's test images and "
                   "compare with the packed model (top-1 and agreement of predictions)")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)


def _trial_packed(experiment: str, trial_id: str) -> Path:
    """The packed file of a finished trial of a local experiment."""
    from tune.results import load_trials
    trials = load_trials(_experiment_dir(experiment))
    match = [t for t in trials if t["trial_id"] == trial_id]
    if not match:
        known = ", ".join(t["trial_id"] for t in trials[:8]) or "none"
        raise UserError(f"no trial {trial_id!r} in {experiment}; trials: {known}")
    f = Path(match[0]["dir"]) / "work" / "final" / "model.bsq"
    if not f.is_file():
        raise UserError(f"trial {trial_id} of {experiment} has no packed model (it did not finish)")
    return f


def cmd_export(args) -> int:
    if bool(args.packed) == bool(args.source):
        raise UserError("give either --packed FILE.bsq or EXPERIMENT TRIAL_ID, not both or neither")
    if args.source and len(args.source) != 2:
        raise UserError(f"expected EXPERIMENT TRIAL_ID, got {len(args.source)} value(s): {' '.join(args.source)}")
    packed = Path(args.packed) if args.packed else _trial_packed(*args.source)
    out = writable_file(args.out, "--out")
    from pipeline.export import compare_onnx, export_packed
    checked = _packed_with_data(packed, args.check, not args.no_download) if args.check else None
    result = export_packed(packed, out)  # PackedFileError for a bad .bsq: one line
    if checked:
        result.update(compare_onnx(*checked, out))

    def human():
        print(f"{out}: {result['onnx_bytes']:,} B ONNX (opset {result['opset']}; {result['layers_int8']} int8, "
              f"{result['layers_int4']} int4, {result['layers_fp32']} FP32 layers) from {packed} "
              f"({result['packed_bytes']:,} B)")
        if "onnx_top1" in result:
            print(f"onnxruntime: test top-1 {result['onnx_top1']:.2f}% vs packed model {result['packed_top1']:.2f}%, "
                  f"same prediction on {result['agreement']:.2f}% of {result['test_images']:,} images")
    emit(result, args.json, human)
    return 0


# ------------------------------------------------------------------------------------------------
# sweep / search / resume / report / compare / sync

def add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer quantization sensitivity of a baseline (cached beside it)")
    p.add_argument("--baseline", required=True, help="checkpoint.pt from `bitsearch train` (with a validation split)")
    p.add_argument("--data", required=True)
    p.add_argument("--estimator", default="loss", choices=["loss", "hessian", "both"],
                   help="loss: measured increase of validation loss (weights and inputs); hessian: HAWQ-V2 "
                        "trace x ||dW||^2 (weights); both: the measured table plus the Hessian scores and their "
                        "rank correlation")
    p.add_argument("--images", type=int, default=1000, help="validation images to score on (default 1000)")
    p.add_argument("--config", help="YAML with a quantize: section: the base config (granularity, exceptions, ...)")
    p.add_argument("--force", action="store_true", help="recompute even if a cached table exists")
    p.add_argument("--tracking-uri", dest="tracking_uri",
                   help="log the table, CSV and plot to MLflow with the baseline: into the baseline's run for a "
                        "runs:/<id>/checkpoint.pt baseline, else into a run of the bitsearch-baselines experiment")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sensitivity)
    p = sub.add_parser("allocate", help="per-layer bit-widths minimising sensitivity within a packed-size budget")
    p.add_argument("--sensitivity", required=True, help="the JSON table `bitsearch sensitivity` wrote")
    p.add_argument("--budget-mb", dest="budget_mb", required=True,
                   help="packed-file budget in MB (10^6 bytes); a comma-separated list gives the front over budgets")
    p.add_argument("--a-bits", dest="a_bits", type=int, default=None, help="activation bits for every layer (default: the base config's)")
    p.add_argument("--estimator", choices=["loss", "hessian", "max"], default=None,
                   help="which scores to allocate with when the table has both; max: the larger of the two per layer "
                        "and bit-width (default: hessian, see docs/RESULTS.md section 10)")
    p.add_argument("--min-bits", dest="min_bits", type=int, default=None,
                   help="no layer below this many weight bits (default: the table's narrowest, 2)")
    p.add_argument("--out", help="folder for the quantize YAML(s) (default: beside the table)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_allocate)


def _base_qconfig(config: str | None):
    from quantization import QuantConfig
    section = dict(load_profile(None, config).get("quantize") or {}) if config else {}
    for k in ("epochs", "lr", "kd"):  # fine-tuning settings of `quantize`, not QuantConfig fields
        section.pop(k, None)
    return QuantConfig.from_dict(section)


def cmd_sensitivity(args) -> int:
    from mlflow_server.tracking import fetch_artifact
    from pipeline import load_baseline
    from pipeline.sensitivity import SensitivityError, sensitivity
    from quantization.api import plan_for
    from trainer import load_dataset
    base = _base_qconfig(args.config)
    if args.images < 1:
        raise UserError(f"--images={args.images} is invalid: an integer >= 1")
    if args.tracking_uri:
        from mlflow_server.tracking import TrackingError, check_reachable
        try:
            check_reachable(args.tracking_uri)  # before the work, not after it
        except TrackingError as e:
            raise UserError(str(e)) from None
    path = fetch_artifact(args.baseline, args.tracking_uri)
    fp32, ck = load_baseline(path)
    plan_for(fp32, base)
    tc = ck["config"]
    if not tc.get("val_size"):
        raise UserError(f"{args.baseline} was trained without a validation split: sensitivity is scored on validation "
                        "images, never on test; retrain with --val-size N")
    con = stderr_console()
    data = load_dataset(args.data, subset=tc.get("subset", 0), val_size=tc.get("val_size", 0), seed=tc.get("seed", 0),
                        download=not args.no_download, progress=lambda s: con.print(s))
    desc = {"path": str(Path(args.data).resolve()) if "://" not in args.data else args.data,
            **{k: tc.get(k, 0) for k in ("subset", "val_size", "seed")}}
    try:
        table = sensitivity(path, fp32.eval(), data, base, estimator=args.estimator, images=args.images,
                            data_desc=desc, progress=lambda s: con.print(s), force=args.force)
    except SensitivityError as e:
        raise UserError(str(e)) from None
    out = {k: table[k] for k in ("file", "estimator", "cached", "images", "seconds") if k in table}
    out.update({k: table[k] for k in ("fp32_val_loss", "spearman_loss_vs_hessian") if k in table})
    out["csv"], out["plot"] = str(Path(table["file"]).with_suffix(".csv")), str(Path(table["file"]).with_suffix(".png"))
    out["layers"] = [{k: r[k] for k in ("name", "params", "w", "a", "w_hessian", "hessian_trace") if k in r}
                     for r in table["layers"]]
    if args.tracking_uri:
        from mlflow_server.tracking import log_sensitivity
        out["mlflow_run_id"] = log_sensitivity(args.tracking_uri, args.baseline, table)

    def human():
        first = table["layers"][0]
        worst = sorted(table["layers"], key=lambda r: -float(r["w"][min(r["w"], key=int)]))[:3]
        print(f"{len(table['layers'])} layers x W{{{','.join(first['w'])}}}"
              + (f" x A{{{','.join(first['a'])}}}" if first.get("a") else "")
              + f" ({table['estimator']}{', cached' if table['cached'] else ''}): {table['file']}")
        print("most sensitive at the lowest weight bits: " + ", ".join(r["name"] for r in worst))
        if "spearman_loss_vs_hessian" in table:
            print(f"rank correlation loss vs Hessian estimator: {table['spearman_loss_vs_hessian']:.3f}")
        if "mlflow_run_id" in out:
            print(f"MLflow: run {out['mlflow_run_id']} at {args.tracking_uri} (artifacts under sensitivity/)")
    emit(out, args.json, human)
    return 0


def cmd_allocate(args) -> int:
    from mlflow_server.tracking import fetch_artifact
    from pipeline import load_baseline, packed_meta
    from pipeline.sensitivity import FORMAT, SensitivityError, allocate, check_min_bits, layer_bytes, weight_scores
    from quantization import QuantConfig
    p = Path(args.sensitivity)
    try:
        table = json.loads(p.read_text())
        assert table.get("format") == FORMAT
    except (OSError, ValueError, AssertionError):
        raise UserError(f"{args.sensitivity} is not a sensitivity table written by `bitsearch sensitivity`") from None
    try:
        budgets = [float(b) for b in str(args.budget_mb).split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--budget-mb={args.budget_mb!r} is invalid: a number of MB, or a comma-separated list") from None
    if not budgets or any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise UserError(f"--budget-mb={args.budget_mb!r} is invalid: every budget must be a number > 0 (MB)")
    if args.a_bits is not None and not (2 <= args.a_bits <= 8 or args.a_bits == 32):
        raise UserError(f"--a-bits={args.a_bits} is invalid: allowed 2..8, or 32 for FP32")
    try:
        check_min_bits(args.min_bits, "--min-bits")
        est, scores = weight_scores(table, args.estimator)
    except SensitivityError as e:
        raise UserError(str(e)) from None
    fp32, ck = load_baseline(fetch_artifact(table["baseline"]))
    base = QuantConfig.from_dict(table["settings"]["base"])
    meta = packed_meta(ck)
    out_dir = writable_dir(args.out or p.parent)
    layers = [r["name"] for r in table["layers"]]
    costs = layer_bytes(fp32, base, meta, layers, sorted({b for v in scores.values() for b in v}), args.a_bits)
    rows = []
    for b in budgets:
        try:
            r = allocate(table, fp32, base, meta, b, a_bits=args.a_bits, estimator=est, costs=costs, min_bits=args.min_bits)
        except SensitivityError as e:
            raise UserError(str(e)) from None
        path = out_dir / f"alloc-{b:g}MB.yaml"
        path.write_text(f"# bitsearch allocate: {b:g} MB budget, {r['predicted_bytes']} bytes packed, "
                        f"summed {est} sensitivity {r['sensitivity']:.6g}, average {r['avg_w_bits']:.3f} weight bits\n"
                        + yaml.safe_dump({"quantize": r["config"].to_dict()}, sort_keys=False))
        a_used = r["config"].a_bits
        rows.append({"budget_mb": b, "predicted_mb": r["predicted_mb"], "predicted_bytes": r["predicted_bytes"],
                     "sensitivity": r["sensitivity"], "config": str(path), "avg_w_bits": r["avg_w_bits"],
                     "layers": {n: {"w_bits": w, "a_bits": a_used} for n, w in r["bits"].items()}})
    res = dict(rows[0]) if len(rows) == 1 else {"front": rows}
    res["estimator"] = est

    def human():
        for r in rows:
            print(f"{r['budget_mb']:g} MB budget: {r['predicted_bytes']:,} bytes packed, avg {r['avg_w_bits']:.2f} "
                  f"weight bits, summed sensitivity {r['sensitivity']:.4g} -> {r['config']}")
    emit(res, args.json, human)
    return 0


def _int_list(text: str) -> list:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of integers") from None


def _common_search_args(p) -> None:
    p.add_argument("--baseline", required=True, help="FP32 checkpoint.pt from `bitsearch train` (with --val-size), "
                   "or an MLflow artifact URI such as runs:/<run_id>/checkpoint.pt")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="storage: a local/NFS path or s3://bucket/prefix; the experiment "
                   "lives in OUT/NAME")
    p.add_argument("--name", help="experiment name (default: sweep / search)")
    p.add_argument("--config", help="YAML with a search: (or sweep:) section")
    p.add_argument("--max-concurrent", dest="max_concurrent", type=int)
    p.add_argument("--cpus-per-trial", dest="cpus_per_trial", type=float)
    p.add_argument("--gpus-per-trial", dest="gpus_per_trial", type=float, help="fraction of a GPU, e.g. 0.25")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow server (default: OUT/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment the search logs to (default: bitsearch)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--finetune-subset", dest="finetune_subset", type=int,
                   help="QAT/LSQ fine-tune on a stratified subset of N training images (validation and test stay whole)")
    p.add_argument("--kd-weight", dest="kd_weight", type=float,
                   help="QAT/LSQ trials distil from the baseline with this weight (0..1; space key kd_weight samples it)")
    p.add_argument("--kd-temperature", dest="kd_temperature", type=float, help="distillation temperature (default 4)")
    p.add_argument("--sensitivity", help="table from `bitsearch sensitivity`: with space key size_budget_mb every trial "
                   "allocates per-layer weight bits within its sampled budget")
    p.add_argument("--estimator", choices=["loss", "hessian", "max"],
                   help="which scores of the sensitivity table to allocate with (default: hessian where the table has it)")
    p.add_argument("--min-bits", dest="min_bits", type=int,
                   help="budget trials: no layer below this many weight bits (default: the table's narrowest, 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")


SEARCH_FLAGS = {"name": "name", "max_concurrent": "max_concurrent", "cpus_per_trial": "cpus_per_trial",
                "gpus_per_trial": "gpus_per_trial", "tracking_uri": "tracking_uri", "address": "address",
                "batch_size": "batch_size", "device": "device", "num_samples": "num_samples",
                "objectives": "objectives", "size_budget_mb": "size_budget_mb",
                "qat_epochs": "qat_epochs", "qat_lr": "qat_lr", "finetune_subset": "finetune_subset",
                "kd_weight": "kd_weight", "kd_temperature": "kd_temperature", "sensitivity": "sensitivity",
                "estimator": "estimator", "min_bits": "min_bits", "experiment": "experiment"}


def add_search(sub) -> None:
    p = sub.add_parser("sweep", help="grid sweep (default: W{8,4,2} x A{8,4,2}) on Ray Tune")
    _common_search_args(p)
    p.add_argument("--w-bits", dest="w_bits", help="comma list, e.g. 8,4,2")
    p.add_argument("--a-bits", dest="a_bits", help="comma list")
    p.add_argument("--method", choices=list(Method))
    p.add_argument("--qat-epochs", dest="qat_epochs", type=int)
    p.add_argument("--qat-lr", dest="qat_lr", type=float)
    p.set_defaults(func=cmd_search, mode="sweep")
    p = sub.add_parser("search", help="Optuna search over bit-widths and learning rate on Ray Tune")
    _common_search_args(p)
    p.add_argument("--objectives", choices=["single", "multi"], help="single: accuracy under a size budget; "
                   "multi: accuracy vs size (Pareto front)")
    p.add_argument("--num-samples", dest="num_samples", type=int)
    p.add_argument("--size-budget-mb", dest="size_budget_mb", type=float)
    p.add_argument("--qat-epochs", dest="qat_epochs", type=int)
    p.add_argument("--qat-lr", dest="qat_lr", type=float)
    p.set_defaults(func=cmd_search, mode="search")
    for name, help_, func in (("resume", "continue an interrupted sweep/search", cmd_resume),
                              ("report", "results table, Pareto front and plots of an experiment", cmd_report),
                              ("compare", "chosen trials side by side", cmd_compare),
                              ("sync", "write the MLflow runs a dropped tracking server missed", cmd_sync)):
        p = sub.add_parser(name, help=help_)
        p.add_argument("path", help="experiment directory (OUT/NAME)")
        if name == "compare":
            p.add_argument("trials", nargs="+", help="trial ids (see `bitsearch report`)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)


def _search_result(summary: dict) -> dict:
    return {"experiment": summary["experiment"], "trials": summary["trials"], "best": summary["best"],
            "pareto": summary["pareto"], "mlflow_experiment_id": summary.get("mlflow_experiment_id"),
            "files": summary["files"], "seconds": summary.get("seconds"), "registry": summary.get("registry")}


def _print_table(summary: dict) -> None:
    import pandas as pd
    df = pd.DataFrame(summary["trials"])
    cols = [c for c in ("trial_id", "W_bits", "A_bits", "method", "lr", "Accuracy", "Val_Acc", "Drop", "Comp_MB", "Ratio",
                        "status") if c in df]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}") if len(df) else "(no trials)")
    print(f"report: {summary['files'].get('markdown')}")
    reg = summary.get("registry") or {}
    if reg.get("champion_version") is not None:
        print(f"model registry: {reg['registered_model']} ({len(reg['versions'])} Pareto version(s)), champion = "
              f"version {reg['champion_version']} (trial {reg['champion_trial']}): "
              f"mlflow.pyfunc.load_model(\"models:/{reg['registered_model']}@champion\")")
    hint = _mlflow_hint(summary)
    if hint:
        print(hint)


def _mlflow_hint(summary: dict) -> str | None:
    """How to open the search's trials in MLflow: the runs table of its experiment (the UI's default
    page for an experiment is its GenAI overview, which shows none of them)."""
    from tune.search import load_settings
    from tune import storage
    exp_id = summary.get("mlflow_experiment_id")
    if exp_id is None:
        return None
    try:
        s = load_settings(storage.normalize(summary["experiment"]))
    except Exception:  # noqa: BLE001 - a hint, never an error
        return None
    route = f"#/experiments/{exp_id}/runs"
    if s.tracking_uri and s.tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {s.tracking_uri.rstrip('/')}/{route}"
    return f"MLflow: run `bitsearch ui {s.out}`, then open http://127.0.0.1:5000/{route}"


def cmd_search(args) -> int:
    from mlflow_server.tracking import is_artifact_uri
    from tune.search import DEFAULT_GRID, SearchConfigError, run, settings_from
    section = load_profile(None, args.config).get(args.mode if args.mode == "sweep" else "search", {}) if args.config else {}
    if not isinstance(section, dict):
        raise UserError(f"the {args.mode} section of {args.config} must be a mapping")
    d = {**section, **_explicit(args, SEARCH_FLAGS)}
    d.setdefault("name", args.mode)
    baseline = args.baseline if is_artifact_uri(args.baseline) else str(Path(args.baseline).resolve())
    d.update(mode=args.mode, baseline=baseline, data=str(Path(args.data).resolve()), out=args.out)
    if args.mode == "sweep":
        grid = dict(d.get("grid") or DEFAULT_GRID)
        if args.w_bits:
            grid["w_bits"] = _int_list(args.w_bits)
        if args.a_bits:
            grid["a_bits"] = _int_list(args.a_bits)
        if args.method:
            grid["method"] = [args.method]
        d["grid"] = grid
    from tune import storage
    if not storage.is_remote(args.out):
        writable_dir(args.out)
    try:
        summary = run(settings_from(d), log=stderr_console().print)
    except SearchConfigError as e:
        raise UserError(str(e)) from None
    result = _search_result(summary)
    emit(result, args.json, lambda: _print_table(summary))
    return 0


def cmd_resume(args) -> int:
    from tune.search import SearchConfigError, resume
    try:
        summary = resume(_experiment_dir(args.path))
    except SearchConfigError as e:
        raise UserError(str(e)) from None
    if summary.get("nothing_to_resume"):
        n = len(summary["trials"])
        emit({**_search_result(summary), "nothing_to_resume": True}, args.json,
             lambda: print(f"nothing to resume: all {n} trials of {args.path} have finished; "
                           f"report: {summary['files'].get('markdown')}"))
        return 0
    emit(_search_result(summary), args.json, lambda: _print_table(summary))
    return 0


def _experiment_dir(path: str) -> str:
    """An experiment: a local path or an S3-compatible URI holding bitsearch.json."""
    from tune import storage
    p = storage.normalize(path)
    if not storage.exists(storage.join(p, "bitsearch.json")):
        raise UserError(f"{path} is not a bitsearch experiment directory (no bitsearch.json)")
    return p


def cmd_report(args) -> int:
    from tune.results import write_report
    summary = write_report(_experiment_dir(args.path))
    emit(_search_result(summary), args.json, lambda: _print_table(summary))
    return 0


def cmd_compare(args) -> int:
    from tune.results import load_trials, table
    from tune import storage
    df = table(load_trials(storage.local_copy(_experiment_dir(args.path))))
    missing = [t for t in args.trials if t not in set(df["trial_id"])]
    if missing:
        raise UserError(f"unknown trial id(s) {', '.join(missing)}; known: {', '.join(df['trial_id'])}")
    sel = df[df["trial_id"].isin(args.trials)]

    def cell(v):  # 39.47, not 39.469999; 8, not 8.0
        return f"{v:.4g}" if isinstance(v, float) else v
    emit({"trials": sel.to_dict("records")}, args.json,
         lambda: print(sel.set_index("trial_id").T.map(cell).to_string()))
    return 0


def cmd_sync(args) -> int:
    from tune.results import sync
    res = sync(_experiment_dir(args.path))
    def text():
        print(f"wrote {res['written']} missing MLflow run(s)")
        if res["champion_version"] is not None:
            print(f"registered model {res['registered_model']}: champion = version {res['champion_version']}")
    emit(res, args.json, text)
    return 0


# ------------------------------------------------------------------------------------------------
# server / ui

def add_server(sub) -> None:
    p = sub.add_parser("server", help="run an MLflow tracking server (SQLite + local artifacts by default)")
    p.add_argument("--root", default="mlflow", help="folder for the SQLite file and artifacts")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", dest="backend", help="e.g. postgresql://user:pw@host/db")
    p.add_argument("--artifacts-destination", dest="artifacts", help="e.g. s3://bucket/path")
    p.add_argument("--basic-auth", dest="auth", action="store_true")
    p.add_argument("--allowed-hosts", dest="allowed_hosts")
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("ui", help="open the MLflow UI on a search's embedded store")
    p.add_argument("out", help="the --out directory of a search (holds mlflow.db)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)


def _serve(proc, url, after: str | None = None) -> int:
    import signal
    import time
    from mlflow_server.server import stop

    def _term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)  # `kill` stops the mlflow server too, not only this wrapper
    print(f"MLflow UI: {url}  (Ctrl-C stops the server)", flush=True)
    if after:
        print(after, flush=True)
    try:
        while proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc)
    return 0


def cmd_server(args) -> int:
    from mlflow_server.server import ServerError, is_loopback, start
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port={args.port} is invalid: 1..65535")
    if not is_loopback(args.host) and not args.auth:
        print(f"bitsearch: warning: --host {args.host} exposes the tracking server beyond this machine without "
              "authentication: anyone who can reach it can read and delete runs; add --basic-auth", file=sys.stderr)
    try:
        proc, url, login = start(args.root, args.host, args.port, args.backend, args.artifacts, args.auth,
                                 allowed_hosts=args.allowed_hosts)
    except ServerError as e:
        raise UserError(str(e)) from None
    after = None
    if login:
        pw = f"password {login['password']} ({login['where']})" if login["password"] else f"password {login['where']}"
        after = f"basic auth: user {login['user']}, {pw}"
    return _serve(proc, url, after)


def cmd_ui(args) -> int:
    from mlflow_server.tracking import ARTIFACTS_DIR
    from mlflow_server.server import ServerError, start
    out = Path(args.out)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory: give the --out of a search (or an experiment inside it)")
    if not (out / "mlflow.db").is_file() and (out / "bitsearch.json").is_file():  # an experiment: OUT/NAME
        from tune.search import load_settings
        s = load_settings(str(out.resolve()))
        if s.tracking_uri:
            raise UserError(f"{out} was logged to the tracking server {s.tracking_uri}: open that address instead")
        out = Path(s.out)
    db = out / "mlflow.db"
    if not db.is_file():
        raise UserError(f"no embedded MLflow store at {db}: run a search with --out {args.out} first")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port={args.port} is invalid: 1..65535")
    try:
        proc, url, _ = start(out / "mlflow-ui", port=args.port, backend=f"sqlite:///{db.resolve()}",
                             artifacts=str((out / ARTIFACTS_DIR).resolve()))
    except ServerError as e:
        raise UserError(str(e)) from None
    return _serve(proc, url)


# ------------------------------------------------------------------------------------------------
# study

def add_study(sub) -> None:
    p = sub.add_parser("study", help="the whole study: baseline, sweep, searches, REPORT.md (resumable)")
    p.add_argument("--config", required=True, help="configs/quick.yaml (2-core CPU, minutes) or configs/seed.yaml (GPU)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="baseline,sweep,search,mixed", help="comma list of stages to run")
    p.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    from tune.search import SearchConfigError
    from tune.study import StudyError, run_study
    from trainer.data import source_kind
    cfg = load_profile(None, args.config)
    source_kind(args.data, download=not args.no_download)
    writable_dir(args.out)
    con = stderr_console()
    try:
        res = run_study(cfg, str(Path(args.data).resolve()) if Path(args.data).exists() else args.data, args.out,
                        stages=[s.strip() for s in args.stages.split(",") if s.strip()],
                        log=lambda m: con.print(f"[bold]study[/bold] {m}"), callbacks=[RichProgress("baseline")],
                        download=not args.no_download)
    except (SearchConfigError, StudyError) as e:
        raise UserError(str(e)) from None
    emit(res, args.json, lambda: print(f"report: {res['report']} (HTML: {res['report_html']})"))
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bitsearch", description="Quantization search for MobileNet-v2 on CIFAR-10")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_train(sub)
    add_quantize(sub)
    add_eval(sub)
    add_export(sub)
    add_sensitivity(sub)
    add_search(sub)
    add_server(sub)
    add_study(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    keep_freed_memory()  # glibc: keep freed blocks in the process (trainer/allocator.py)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("bitsearch: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if debug:
            raise
        if isinstance(e, SystemExit):
            raise
        known = _known_errors()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, known):
            msg = f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"
        print(f"bitsearch: error: {msg}", file=sys.stderr)
        return 2


def _known_errors() -> tuple[type, ...]:
    from trainer import CheckpointError, ConfigError, DataError
    errs: list[type] = [UserError, DataError, ConfigError, CheckpointError]
    try:
        from quantization import CalibrationError, QuantConfigError
        from quantization.packing import PackedFileError
        from mlflow_server.tracking import TrackingError
        from pipeline.export import ExportError
        from pipeline.quantize import DivergedError
        errs += [QuantConfigError, CalibrationError, PackedFileError, TrackingError, ExportError, DivergedError]
    except ImportError:
        pass
    return tuple(errs)
