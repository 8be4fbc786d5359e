"""`bitsearch train`: the FP32 baseline.

The trainer (torch) is imported inside the command, so that the parser answers without loading it.
"""
from __future__ import annotations

from bitsearch.common import RichProgress, emit, explicit, load_profile, stderr_console, writable_dir
from trainer.config import TrainConfig

_T = TrainConfig()  # the defaults a flag falls back to when no profile sets it
P = "(default: the profile's, else "

TRAIN_FLAGS = {"model": "model", "epochs": "epochs", "width": "width", "batch_size": "batch_size", "lr": "lr", "subset": "subset",
               "val_size": "val_size", "seed": "seed", "device": "device", "weight_decay": "weight_decay",
               "label_smoothing": "label_smoothing", "compile": "compile", "amp": "amp", "channels_last": "channels_last",
               "progressive": "progressive"}


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the FP32 baseline (MobileNet-v2, ResNet-20 or your own network)")
    p.add_argument("--data", required=True, help="torchvision root, image-folder tree, or .tar/.tar.gz of one")
    p.add_argument("--out", required=True, help="output directory (checkpoint, curves, confusion matrix, summary)")
    p.add_argument("--profile", help="preset from configs/: quick (CPU minutes), cpu (the CPU reference model, ~42 min on 2 native-bf16 cores), seed (the reference recipe, GPU) or gpu (width 1.0 in minutes on one GPU: bench/gpu.sh); default: none, TrainConfig's values")
    p.add_argument("--config", help="YAML file with a train: section (default: none; flags override it)")
    p.add_argument("--model", help="the network: mobilenetv2 (default), resnet20, or FILE.py:FUNC, a function "
                   "FUNC(num_classes) returning a torch nn.Module (recorded in the checkpoint: later commands need no flag)")
    p.add_argument("--epochs", type=int, help=f"training epochs {P}{_T.epochs})")
    p.add_argument("--width", type=float, help=f"MobileNet-v2 width multiplier, 1.0 = 2.24M params {P}{_T.width:g})")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=f"images per batch {P}{_T.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak SGD learning rate, cosine schedule {P}{_T.lr:g})")
    p.add_argument("--weight-decay", dest="weight_decay", type=float, help=f"weight decay {P}{_T.weight_decay:g})")
    p.add_argument("--label-smoothing", dest="label_smoothing", type=float,
                   help=f"label smoothing of the loss {P}{_T.label_smoothing:g})")
    p.add_argument("--progressive", help="train the first epochs at lower resolution (faster): SIZE:EPOCHS[,...], "
                   "e.g. 24:8 = 8 epochs at 24 px, then 32 px; evaluation is always at 32 px (default: off)")
    p.add_argument("--subset", type=int, help=f"stratified subset of N training images {P}all: 0)")
    p.add_argument("--val-size", dest="val_size", type=int,
                   help=f"images held out of train for validation, which searches need {P}{_T.val_size})")
    p.add_argument("--seed", type=int, help=f"random seed {P}{_T.seed})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: the profile's, else "
                   "auto: CUDA when there is a GPU)")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    p.add_argument("--amp", dest="amp", action="store_const", const="on",
                   help="bf16 autocast, also on CPU (default: on with CUDA and on CPUs with native bf16)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="FP32 everywhere")
    p.add_argument("--channels-last", dest="channels_last", action="store_const", const="on",
                   help="channels-last memory format, also on CPU (default: as --amp)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_const", const="off",
                   help="contiguous (NCHW) memory format")
    p.add_argument("--no-download", action="store_true", help="never try to download CIFAR-10")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--tracking-uri", help="also log the run to this MLflow tracking URI (default: no MLflow)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from quantization.api import described_layers
    from trainer.baseline import train_baseline

    out = writable_dir(args.out)
    section = load_profile(args.profile, args.config).get("train") or {}
    con = stderr_console()
    callbacks: list = [RichProgress()]
    if args.tracking_uri:
        from mlflow_server.tracking import TrainRunLogger
        callbacks.append(TrainRunLogger(args.tracking_uri, run_name=f"baseline-{out.name}"))
    result = train_baseline(args.data, out, section, explicit(args, TRAIN_FLAGS), download=not args.no_download,
                            callbacks=callbacks, resume=args.resume, progress=lambda s: con.print(s),
                            source=args.config or args.profile,
                            check_model=described_layers)  # a network bitsearch cannot quantize: refused now
    result.pop("history")

    def human():
        print(f"test top-1 {result['top1']:.2f}%  (train {result['train_top1']}%, {result['params']:,} params, "
              f"{result['epochs']} epochs)")
        print(f"checkpoint {result['checkpoint']}; curves, confusion matrix, summary in {out}")
    emit(result, args.json, human)
    return 0
