"""Quantization of weights and activations: primitives, observers, fake-quant modules, prepare /
calibrate / QAT schedule, bit-packed model files, size and activation-memory accounting.

Imports only torch (and PyYAML for configs).
"""
from quantization.api import (CalibrationError, QATSchedule, calibrate, freeze, prepare, quant_layers, recalibrate_bn, set_act_observing,
                              set_bn_frozen)
from quantization.config import FP32, LayerOverride, QuantConfig, QuantConfigError

__all__ = ["CalibrationError", "FP32", "LayerOverride", "QATSchedule", "QuantConfig", "QuantConfigError", "calibrate", "freeze",
           "prepare", "quant_layers", "recalibrate_bn", "set_act_observing", "set_bn_frozen"]
