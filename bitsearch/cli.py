"""The `bitsearch` command line: the parser and the error handling. Each command group lives in its own
module (bitsearch/cmd_*.py): it parses its flags, calls the library and prints.

Every result command takes --json and then prints one JSON object as the last line of stdout (the
same content it writes to its output directory). Errors: one line on stderr, exit 2; --debug
shows the traceback.

The library's error types are imported where an error is handled (_known_errors): most of them live in
modules that load torch, which `bitsearch --help` never needs.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from bitsearch import cmd_quantize, cmd_search, cmd_sensitivity, cmd_server, cmd_study, cmd_train
from bitsearch.common import Parser, UserError
from trainer.allocator import keep_freed_memory


D = "--data ../shared/data/cifar10-jpeg.tar.gz"
REF = "models/mobilenetv2-w0.5-cpu.pt"
# each command's --help ends with one of these
EXAMPLES = {
    "train": f"bitsearch train --profile cpu {D} --out runs/cpu-ref\n"
             f"  bitsearch train --model resnet20 --epochs 3 --subset 5000 --val-size 500 {D} --out runs/r20",
    "quantize": f"bitsearch quantize --checkpoint {REF} {D} --w-bits 4 --a-bits 8 --export runs/w4a8.bsq",
    "eval": f"bitsearch eval --packed runs/w4a8.bsq {D}",
    "export": "bitsearch export --packed runs/w4a8.bsq --out runs/w4a8.onnx --check ../shared/data/cifar10-jpeg.tar.gz",
    "sensitivity": f"bitsearch sensitivity --baseline {REF} {D} --estimator hessian --images 500",
    "allocate": "bitsearch allocate --sensitivity models/mobilenetv2-w0.5-cpu.sensitivity.json --budget-mb 0.35",
    "sweep": f"bitsearch sweep --baseline {REF} {D} --out runs/demo --w-bits 8,4 --a-bits 8 --method ptq",
    "search": f"bitsearch search --baseline {REF} --sensitivity models/mobilenetv2-w0.5-cpu.sensitivity.json \\\n"
              f"      --max-drop 1.0 --time-budget 480 {D} --out runs/demo --name within-1pt",
    "resume": "bitsearch resume runs/demo/within-1pt --more 4",
    "report": "bitsearch report runs/demo/within-1pt",
    "compare": "bitsearch compare runs/demo/within-1pt TRIAL_ID TRIAL_ID     (ids: bitsearch report)",
    "sync": "bitsearch sync runs/demo/within-1pt",
    "server": "bitsearch server --root mlflow --port 5000 --basic-auth",
    "ui": "bitsearch ui runs/demo            (the --out of make demo)",
    "study": f"bitsearch study --config configs/quick.yaml {D} --out runs/study",
}


def build_parser() -> argparse.ArgumentParser:
    from bitsearch import __version__
    p = Parser(prog="bitsearch", description="Quantization search for CNNs on CIFAR-10: train, quantize, search "
               "(Ray Tune + Optuna), track (MLflow), export (ONNX)")
    p.add_argument("--version", action="version", version=f"bitsearch {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    cmd_train.add_train(sub)
    cmd_quantize.add_quantize(sub)
    cmd_quantize.add_eval(sub)
    cmd_quantize.add_export(sub)
    cmd_sensitivity.add_sensitivity(sub)
    cmd_search.add_search(sub)
    cmd_server.add_server(sub)
    cmd_study.add_study(sub)
    for name, sp in sub.choices.items():
        sp.epilog = f"example:\n  {EXAMPLES[name]}"
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        quiet_libraries()
    keep_freed_memory()  # glibc: keep freed blocks in the process (trainer/allocator.py)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("bitsearch: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        from tune.settings import SearchInterrupted
        if isinstance(e, SearchInterrupted):  # Ray Tune caught the Ctrl-C and saved the search's state
            print(str(e), file=sys.stderr)
            return 130
        if debug:
            raise
        if isinstance(e, SystemExit):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, _known_errors()):
            msg = f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"
        print(f"bitsearch: error: {msg}", file=sys.stderr)
        return 2


# the libraries whose own warnings (torch's "No CUDA runtime is found" on every quantize, its pickle-protocol
# warning before a refused checkpoint, ...) say nothing to a user; --debug shows them
LIBRARIES = ("torch", "torchvision", "ray", "mlflow", "optuna", "onnx", "onnxruntime", "pydantic", "sqlalchemy", "alembic")


def quiet_libraries() -> None:
    """Library warnings and library log lines below ERROR stay out of the terminal; bitsearch's own warnings
    (e.g. an MLflow server that went away mid-search) still show."""
    warnings.filterwarnings("ignore", module=r"({})(\.|$)".format("|".join(LIBRARIES)))
    for name in ("torch", "torch.utils.cpp_extension", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _known_errors() -> tuple[type, ...]:
    """The errors that mean bad input: printed as their message alone."""
    from mlflow_server.server import ServerError
    from mlflow_server.tracking import TrackingError
    from pipeline.export import ExportError
    from pipeline.quantize import DivergedError
    from pipeline.sensitivity import SensitivityError
    from quantization import CalibrationError, QuantConfigError
    from quantization.packing import PackedFileError
    from trainer import CheckpointError, ConfigError, DataError, ModelError
    from tune.settings import SearchConfigError
    from tune.study import StudyError
    return (UserError, DataError, ConfigError, ModelError, CheckpointError, QuantConfigError, CalibrationError, PackedFileError,
            TrackingError, ExportError, DivergedError, SensitivityError, SearchConfigError, StudyError, ServerError)
