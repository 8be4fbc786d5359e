"""Range observers for calibration: they watch tensors and propose a [min, max] to quantize.

* ``minmax``      running min / max over everything seen
* ``ema``         moving average of per-batch min / max (momentum 0.1)
* ``percentile``  running mean of per-batch lower/upper percentiles (clips outliers)
* ``mse``         keeps a sample of values; picks the clip range that minimises the quantization MSE

Per-tensor (axis None) or per-channel (axis = channel dimension).
"""
from __future__ import annotations

import torch
from torch import nn

from quantization.config import OBSERVERS
from quantization.primitives import channel_rows, choose_qparams, fake_quantize, qrange, reduce_minmax



class Observer(nn.Module):
    def __init__(self, axis: int | None = None):
        super().__init__()
        self.axis = axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def reset(self) -> None:
        self.min_val = torch.tensor(float("inf"), device=self.min_val.device)
        self.max_val = torch.tensor(float("-inf"), device=self.max_val.device)

    def fresh(self, x: torch.Tensor) -> None:
        """Forget what was seen and observe ``x`` alone (a weight's range, recomputed every training step)."""
        self.reset()
        self(x)

    @property
    def seen(self) -> bool:
        return bool(torch.isfinite(self.min_val).all())

    def forward(self, x: torch.Tensor) -> None:
        lo, hi = reduce_minmax(x.detach().float(), self.axis)
        # from +-inf (nothing seen yet) the first batch gives its own range; no branch on the values, so a
        # weight quantizer's per-step range traces under torch.compile
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def range(self, bits: int, symmetric: bool, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MinMaxObserver(Observer):
    def fresh(self, x: torch.Tensor) -> None:
        # the same as reset() + forward(), in one reduction and no +-inf tensors: it runs for every
        # quantized layer's weight at every QAT step
        self.min_val, self.max_val = reduce_minmax(x.detach().float(), self.axis)


class EMAObserver(Observer):
    def __init__(self, axis: int | None = None, momentum: float = 0.1):
        super().__init__(axis)
        self.momentum = momentum

    def forward(self, x: torch.Tensor) -> None:
        lo, hi = reduce_minmax(x.detach().float(), self.axis)
        if not self.seen:
            self.min_val, self.max_val = lo, hi
        else:
            m = self.momentum
            self.min_val = (1 - m) * self.min_val + m * lo
            self.max_val = (1 - m) * self.max_val + m * hi


class PercentileObserver(Observer):
    def __init__(self, axis: int | None = None, percentile: float = 99.99):
        super().__init__(axis)
        self.q = percentile / 100.0
        self.register_buffer("count", torch.tensor(0))

    def reset(self) -> None:
        super().reset()
        self.count = torch.zeros_like(self.count)  # else the next range averages with the reset +-inf

    def forward(self, x: torch.Tensor) -> None:
        flat = channel_rows(x.detach().float(), self.axis)
        if flat.shape[1] > 1_000_000:  # torch.quantile's limit; a strided sample is plenty
            flat = flat[:, :: flat.shape[1] // 1_000_000 + 1]
        lo = torch.quantile(flat, 1 - self.q, dim=1)
        hi = torch.quantile(flat, self.q, dim=1)
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        n = int(self.count)
        if n == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = (self.min_val * n + lo) / (n + 1)
            self.max_val = (self.max_val * n + hi) / (n + 1)
        self.count += 1


class MSEObserver(Observer):
    """Keeps up to ``max_samples`` values (per channel when per-channel) and, when asked, searches the
    clip range ``alpha * [min, max]`` (alpha in [0.2, 1]) minimising the mean squared quantization error."""

    def __init__(self, axis: int | None = None, max_samples: int = 32768, steps: int = 40):
        super().__init__(axis)
        self.max_samples, self.steps = max_samples, steps
        self.samples: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.samples = None

    def forward(self, x: torch.Tensor) -> None:
        super().forward(x)
        flat = channel_rows(x.detach().float(), self.axis)
        if flat.shape[1] > self.max_samples:
            idx = torch.randperm(flat.shape[1], device=flat.device)[: self.max_samples]
            flat = flat[:, idx]
        self.samples = flat if self.samples is None else torch.cat([self.samples, flat], 1)[:, -4 * self.max_samples:]

    def range(self, bits: int, symmetric: bool, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.samples is None:
            return self.min_val, self.max_val
        lo0 = torch.clamp(self.min_val, max=0).reshape(-1)
        hi0 = torch.clamp(self.max_val, min=0).reshape(-1)
        qmin, qmax = qrange(bits, signed, symmetric) if symmetric else qrange(bits, False)
        best = torch.full_like(hi0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for alpha in torch.linspace(0.2, 1.0, self.steps).tolist():
            lo, hi = lo0 * alpha, hi0 * alpha
            s, z = choose_qparams(lo, hi, bits, symmetric, signed)
            err = (fake_quantize(self.samples, s, z, qmin, qmax, axis=0) - self.samples).pow(2).mean(1)
            better = err < best
            best = torch.where(better, err, best)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        if self.axis is None:
            return best_lo[0], best_hi[0]
        return best_lo, best_hi


def make_observer(name: str, axis: int | None, percentile: float = 99.99) -> Observer:
    if name == "minmax":
        return MinMaxObserver(axis)
    if name == "ema":
        return EMAObserver(axis)
    if name == "percentile":
        return PercentileObserver(axis, percentile)
    if name == "mse":
        return MSEObserver(axis)
    raise ValueError(f"unknown observer {name!r}; allowed: {', '.join(OBSERVERS)}")
