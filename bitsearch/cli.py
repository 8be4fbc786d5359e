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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bitsearch", description="Quantization search for MobileNet-v2 on CIFAR-10")
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
