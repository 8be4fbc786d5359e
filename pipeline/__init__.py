"""The quantize pipeline: one quantization run on a trained baseline, measured (prepare -> calibrate ->
fine-tune -> evaluate -> size -> packed file). `bitsearch quantize` runs it once; every search trial
runs it with a callback that reports to Ray Tune. Imports trainer and quantization only."""
from pipeline.quantize import (Prepared, calibration_batches, load_baseline, packed_meta, prepare_quantized, public,
                               quantize_model, write_result)

__all__ = ["Prepared", "calibration_batches", "load_baseline", "packed_meta", "prepare_quantized", "public",
           "quantize_model", "write_result"]
