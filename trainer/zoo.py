"""Which network: a built-in by name, or a user's own from a Python file (``FILE.py:FUNC``).

``build_model(spec, num_classes, ...)`` makes the FP32 model and the meta that rebuilds it
(``model_from_meta``): checkpoints and packed files record it, so quantize, search, sensitivity, eval and
export need no flag. A user's network is ``FUNC(num_classes) -> nn.Module`` in FILE.py; its meta records
the file's absolute path and sha256, and a rebuild from a changed or missing file is refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from trainer.model import MobileNetV2
from trainer.model import model_from_meta as _mobilenet_from_meta
from trainer.model import model_meta as _mobilenet_meta
from trainer.resnet import ResNet20

BUILTIN = ("mobilenetv2", "resnet20")
DEFAULT = "mobilenetv2"


class ModelError(ValueError):
    """A --model that cannot be built (unknown name, missing file or function, not an nn.Module)."""


def _load_function(spec: str):
    """(FUNC, absolute path, sha256) of ``FILE.py:FUNC``."""
    file, sep, func = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not func.isidentifier():
        raise ModelError(f"--model {spec!r} is invalid: a built-in ({', '.join(BUILTIN)}) or FILE.py:FUNCTION")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"--model {spec}: no file {path}")
    source = path.read_bytes()
    name = f"bitsearch_user_model_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: any error, said in one line
        raise ModelError(f"--model {spec}: {path.name} failed to import ({type(e).__name__}: {e})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ModelError(f"--model {spec}: {path.name} has no function {func}")
    return fn, path, hashlib.sha256(source).hexdigest()


def build_model(spec: str, num_classes: int, *, width: float = 1.0, dropout: float = 0.2) -> tuple[nn.Module, dict]:
    """(the FP32 model, its meta; ``model_meta(model)`` gives it back). ``width`` and ``dropout`` apply to
    MobileNet-v2 only."""
    model, meta = _build(spec, num_classes, width, dropout)
    model.bitsearch_meta = meta
    return model, meta


def model_meta(model: nn.Module) -> dict:
    """What rebuilds ``model``'s architecture (``model_from_meta``)."""
    meta = getattr(model, "bitsearch_meta", None)
    if meta is not None:
        return dict(meta)
    if isinstance(model, MobileNetV2):
        return _mobilenet_meta(model)
    raise ModelError(f"{type(model).__name__} was not built by bitsearch (trainer.zoo.build_model): its "
                     "architecture cannot be recorded")


def _build(spec: str, num_classes: int, width: float, dropout: float) -> tuple[nn.Module, dict]:
    if spec == "mobilenetv2":
        model = MobileNetV2(num_classes=num_classes, width=width, dropout=dropout)
        return model, _mobilenet_meta(model)
    if spec == "resnet20":
        return ResNet20(num_classes), {"arch": "resnet20", "num_classes": num_classes}
    if ":" not in spec:
        raise ModelError(f"--model {spec!r} is unknown: a built-in ({', '.join(BUILTIN)}) or FILE.py:FUNCTION")
    fn, path, sha = _load_function(spec)
    try:
        model = fn(num_classes)
    except Exception as e:  # noqa: BLE001 - the user's function
        raise ModelError(f"--model {spec}: {fn.__name__}({num_classes}) failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {spec}: {fn.__name__}({num_classes}) returned a {type(model).__name__}, "
                         "not a torch nn.Module")
    return model, {"arch": "file", "file": str(path), "func": fn.__name__, "sha256": sha, "num_classes": num_classes}


def model_from_meta(meta: dict) -> nn.Module:
    """The FP32 architecture a checkpoint or packed file recorded (ModelError if it cannot be rebuilt)."""
    model = _from_meta(meta)
    model.bitsearch_meta = dict(meta)
    return model


def _from_meta(meta: dict) -> nn.Module:
    arch = meta.get("arch")
    if arch == "resnet20":
        return ResNet20(int(meta["num_classes"]))
    if arch == "file":
        fn, path, sha = _load_function(f"{meta['file']}:{meta['func']}")
        if sha != meta.get("sha256"):
            raise ModelError(f"{path} changed since the model was trained (sha256 {sha[:12]} != recorded "
                             f"{str(meta.get('sha256'))[:12]}): restore that file to rebuild the model")
        return fn(int(meta["num_classes"]))
    try:
        return _mobilenet_from_meta(meta)
    except ValueError as e:
        raise ModelError(str(e)) from None


def describe(meta: dict) -> str:
    """The architecture in a few words (progress lines, reports)."""
    arch = meta.get("arch")
    if arch == "file":
        return f"{Path(meta['file']).name}:{meta['func']}"
    if arch == "resnet20":
        return "ResNet-20"
    return f"MobileNet-v2 width {meta.get('width')}"
