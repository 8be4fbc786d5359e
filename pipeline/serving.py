"""The one loader through which a deployment (mlflow_server's pyfunc model) reaches a packed model:
open a .bsq file and predict classes from uint8 images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from quantization.packing import load_packed
from trainer import model_from_meta, normalize


class PackedClassifier:
    """A packed .bsq model, ready to predict: uint8 images [N, 3, H, W] (RGB, channels first, 0-255) ->
    class indices [N]."""

    def __init__(self, packed: str | Path):
        self.model = load_packed(packed, model_from_meta).eval()  # PackedFileError: one line naming what is wrong

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images))
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"expected images of shape [N, 3, 32, 32], got {list(x.shape)}")
        if x.dtype != torch.uint8:
            x = x.clamp(0, 255).round().to(torch.uint8)
        out = [self.model(normalize(x[i:i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
