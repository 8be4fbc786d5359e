"""TrainConfig: every knob of a training run, frozen, validated, saved inside checkpoints."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value is out of range; the message names it and what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = "mobilenetv2"    # a built-in (mobilenetv2, resnet20) or FILE.py:FUNC (trainer/zoo.py)
    width: float = 1.0            # MobileNet-v2 width multiplier
    dropout: float = 0.2          # before the classifier
    # optimisation (the reference recipe)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1               # peak learning rate, cosine-annealed to 0 over `epochs`
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 4e-5
    no_decay_bn_bias: bool = False  # True: no weight decay on BN parameters and biases
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0     # linear warm-up before the cosine (0 = none, as the reference)
    ema_decay: float = 0.0         # exponential moving average of the weights (and BN statistics), e.g. 0.999:
                                   # evaluated, checkpointed and returned instead of the raw weights (0 = off)
    progressive: str = ""          # lower training resolution first: "SIZE:EPOCHS,..." e.g. "24:8" (then 32 px)
    kd_weight: float = 0.0         # knowledge distillation: loss = (1 - w) * label loss + w * T^2 * KL(teacher || student)
    kd_temperature: float = 4.0    # softening temperature T of both logits (needs a teacher passed to train)
    # data
    subset: int = 0               # stratified training subset size (0 = all)
    val_size: int = 0             # images held out of train for validation (0 = none)
    augment: bool = True
    # run
    seed: int = 0
    device: str = "auto"          # auto | cpu | cuda
    compile: bool = False         # torch.compile the model (static shapes: the last partial batch is dropped)
    amp: str = "auto"             # bf16 autocast: on | off | auto (= on with CUDA or a native-bf16 CPU; train.precision)
    channels_last: str = "auto"   # channels-last memory format: on | off | auto (same rule)
    bn_reestimate: str = "auto"   # re-estimate BN running statistics on the training images after the last epoch:
                                  # on | off | auto (= runs of fewer than train.SHORT_RUN_STEPS optimizer steps,
                                  # whose running averages still lag behind the weights)
    eval_every: int = 1           # evaluate the test set every N epochs (and at the last); val: every epoch
    eval_test: bool = True        # False: validation only (QAT inside a search: test is measured after)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        for k in ("amp", "channels_last", "bn_reestimate"):
            object.__setattr__(self, k, _switch(k, getattr(self, k)))
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an integer >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        need(isinstance(self.model, str) and (self.model in ("mobilenetv2", "resnet20") or ".py:" in self.model),
             "model", "a built-in (mobilenetv2, resnet20) or FILE.py:FUNCTION")
        need(_finite(self.width) and 0 < self.width <= 4, "width", "must be in (0, 4]")
        need(_finite(self.lr) and self.lr > 0, "lr", "must be a number > 0")
        need(_finite(self.momentum) and 0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(_finite(self.dropout) and 0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(_finite(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(_finite(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = no EMA)")
        need(_finite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be in [0, epochs)")
        try:
            phases = parse_progressive(self.progressive)
        except ValueError:
            phases = None
        need(phases is not None and sum(e for _, e in phases) < self.epochs, "progressive",
             "must be empty or SIZE:EPOCHS[,SIZE:EPOCHS...] with sizes 8-31 px and fewer epochs in all than "
             "`epochs` (the last epochs train at full size), e.g. 24:8")
        need(_finite(self.kd_weight) and 0 <= self.kd_weight <= 1, "kd_weight", "must be in [0, 1]")
        need(_finite(self.kd_temperature) and self.kd_temperature > 0, "kd_temperature", "must be a number > 0")
        need(isinstance(self.subset, int) and self.subset >= 0, "subset", "must be an integer >= 0 (0 = all)")
        need(isinstance(self.val_size, int) and self.val_size >= 0, "val_size", "must be an integer >= 0")
        need(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        need(isinstance(self.eval_every, int) and self.eval_every >= 1, "eval_every", "must be an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a (YAML/CLI) dict; unknown keys and wrong types are errors."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        out = {}
        for k, v in d.items():
            default = getattr(cls, k)
            out[k] = _coerce(k, v, type(default))
        return cls(**out)

    def replace(self, **kw: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **kw})


def parse_progressive(spec: str) -> list[tuple[int, int]]:
    """"24:8" -> [(24, 8)]; "16:3,24:5" -> [(16, 3), (24, 5)] (image side in pixels, epochs). ValueError if malformed."""
    phases = []
    for part in filter(None, (p.strip() for p in str(spec).split(","))):
        size, _, epochs = part.partition(":")
        size, epochs = int(size), int(epochs)
        if not (8 <= size < 32 and epochs >= 1):
            raise ValueError(part)
        phases.append((size, epochs))
    return phases


def _switch(name: str, v: Any) -> str:
    """on | off | auto. A boolean from an older checkpoint or config: True meant "where it pays off"."""
    if isinstance(v, bool):
        return "auto" if v else "off"
    s = str(v).lower()
    s = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}.get(s, s)
    if s not in ("on", "off", "auto"):
        raise ConfigError(f"{name}={v!r} is invalid: on, off or auto")
    return s


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _coerce(name: str, v: Any, typ: type) -> Any:
    """Coerce a YAML/CLI value to the field's type, or raise ConfigError naming it."""
    try:
        if typ is bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
                return v.lower() in ("true", "1", "yes")
            raise ValueError
        if typ is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if typ is float:
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        return typ(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={v!r} is invalid: expected {typ.__name__}") from None
