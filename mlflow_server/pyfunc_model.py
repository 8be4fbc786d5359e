"""The MLflow pyfunc model of a packed bitsearch file (MLflow "models from code": MLflow runs this file
when the model is loaded, so no pickled object is stored). Input: uint8 images [N, 3, 32, 32] (RGB,
channels first, 0-255); output: predicted class indices [N]. Needs bitsearch installed."""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np


class PackedModel(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True  # predict checks its input itself (shape, dtype); MLflow would only warn

    def load_context(self, context):
        from quantization.packing import load_packed
        from trainer import model_from_meta
        self.model = load_packed(context.artifacts["packed"], model_from_meta).eval()

    def predict(self, context, model_input, params=None):
        import torch

        from trainer.data import normalize
        x = torch.as_tensor(np.asarray(model_input))
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"expected images of shape [N, 3, 32, 32], got {list(x.shape)}")
        if x.dtype != torch.uint8:
            x = x.clamp(0, 255).round().to(torch.uint8)
        with torch.no_grad():
            out = [self.model(normalize(x[i:i + 256])).argmax(1) for i in range(0, len(x), 256)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


mlflow.models.set_model(PackedModel())
