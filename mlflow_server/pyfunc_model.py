"""The MLflow pyfunc model of a packed bitsearch file (MLflow "models from code": MLflow runs this file
when the model is loaded, so no pickled object is stored). Input: uint8 images [N, 3, 32, 32] (RGB,
channels first, 0-255); output: predicted class indices [N]. Needs bitsearch installed: the model is
read through pipeline.serving, the one loader mlflow_server uses."""
from __future__ import annotations

import mlflow.models
import mlflow.pyfunc

from pipeline.serving import PackedClassifier


class PackedModel(mlflow.pyfunc.PythonModel):
    _skip_type_hint_validation = True  # predict checks its input itself (shape, dtype); MLflow would only warn

    def load_context(self, context):
        self.classifier = PackedClassifier(context.artifacts["packed"])

    def predict(self, context, model_input, params=None):
        return self.classifier.predict(model_input)


mlflow.models.set_model(PackedModel())
