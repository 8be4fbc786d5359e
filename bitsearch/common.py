"""What every `bitsearch` command shares: the error type, YAML profiles, output checks, the JSON line and
the progress bar.

Imports of torch and the packages that load it are deferred to the commands that need them: `bitsearch
--help` and a bad flag answer in a fraction of a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tune import storage

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class UserError(Exception):
    """Bad input: printed as one line, exit 2."""


# the help of options that mean the same in every command that has them
COMMON_HELP = {
    "--json": "print one JSON object as the last line of stdout (default: human-readable lines)",
    "--data": "CIFAR-10: a torchvision root (downloaded when online), an image-folder tree, or a .tar/.tar.gz "
              "of one (e.g. ../shared/data/cifar10-jpeg.tar.gz)",
    "--no-download": "never try to download CIFAR-10",
    "--device": "where to compute (auto: CUDA when there is a GPU)",
    "--batch-size": "images per batch",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: the value when it has one, "off" for a flag; an option
    whose default is decided elsewhere (a profile, the checkpoint) says so in its own help. Epilogs (the
    examples) keep their lines."""

    def _get_help_string(self, action):
        h = action.help or ""
        if not action.option_strings or action.required or "default" in h or action.default is argparse.SUPPRESS:
            return h
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreConstAction)) and not action.default:
            return f"{h} (default: off)"
        if action.default is not None:
            return f"{h} (default: %(default)s)"
        return h


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and args and args[0] in COMMON_HELP:
            kwargs["help"] = COMMON_HELP[args[0]]
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):  # one line, not usage + message; "search: ...", not "bitsearch search: ..."
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UserError(f"{command}: {message}" if command else message)


# ------------------------------------------------------------------------------------------------
# shared helpers


def stderr_console() -> Console:
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
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML: {where}{what}") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (train:, quantize:, ...)")
    return d


def writable_dir(path: str | os.PathLike) -> Path:
    """Check, before any work, that ``path`` is a writable folder or can be made one; nothing is created (the
    command makes it once its input has been checked)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output directory {p} is not writable: it is a file")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory {p} is not writable: {existing} does not let this user write")
    return p


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Check, before any work, that ``path`` can be written as a file (nothing is created)."""
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


def explicit(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """CLI flags that were actually given, renamed to config keys."""
    return {key: getattr(args, dest) for dest, key in mapping.items() if getattr(args, dest, None) is not None}


class RichProgress:
    """trainer Callback: a progress bar over all steps, one line per epoch, on stderr."""

    def __init__(self, label: str = "train"):
        self.label = label
        self.console = stderr_console()
        self.progress = None

    def on_train_start(self, state):
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


def experiment_dir(path: str) -> str:
    """An experiment: a local path or an S3-compatible URI holding bitsearch.json."""
    p = storage.normalize(path)
    if not storage.exists(storage.join(p, "bitsearch.json")):
        raise UserError(f"{path} is not a bitsearch experiment directory (no bitsearch.json)")
    return p
