"""Quantization of weights and activations: primitives, observers, fake-quant modules, prepare /
calibrate / QAT schedule, bit-packed model files, size and activation-memory accounting.

Imports only torch, and that lazily: ``quantization.config`` (QuantConfig, Method, Granularity) loads
without it, so the command line starts fast.
"""
from quantization.config import (FP32, FineTune, Granularity, LayerOverride, Method, QuantConfig,
                                  QuantConfigError)

_API = ("CalibrationError", "QATSchedule", "calibrate", "freeze", "prepare", "quant_layers", "recalibrate_bn",
        "set_act_observing", "set_bn_frozen", "live_bn_layers", "lr_scales")

__all__ = ["FP32", "FineTune", "Granularity", "LayerOverride", "Method", "QuantConfig", "QuantConfigError",
           *_API]


def __getattr__(name: str):
    if name in _API:
        from quantization import api
        return getattr(api, name)
    raise AttributeError(f"module 'quantization' has no attribute {name!r}")
