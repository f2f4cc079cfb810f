"""The registered model's code (MLflow models-from-code): a pyfunc with pre- and post-processing inside.

MLflow loads this file by path; no class is pickled and the weights stay safetensors (or ONNX for INT8).
Input: a pandas DataFrame with an `image` column (the signature): file paths, or base64-encoded image files (for
REST serving). In Python, uint8 RGB HWC arrays go through `model.unwrap_python_model().detector.rows(arrays)`.
Output: a DataFrame, one row per detection: image_index, x1, y1, x2, y2 (original pixels), score, class_id,
class_name. Besides registry.py this is the only module that imports mlflow: it is MLflow's own model format.
"""

from __future__ import annotations

import base64
import binascii
import os

import cv2
import mlflow
import numpy as np
import pandas as pd

from yolofps.serving.detector import COLUMNS, Detector, ServingConfig


class YoloDetectorModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around yolofps.serving.detector.Detector."""

    def load_context(self, context) -> None:
        self.detector = Detector(context.artifacts["model"], ServingConfig.from_dict(context.model_config))

    def predict(self, context, model_input, params=None):  # untyped: MLflow would read hints as a schema
        if isinstance(model_input, pd.DataFrame):
            images = model_input["image"].tolist()
        elif isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
            images = list(model_input) if model_input.ndim == 4 else [model_input]
        else:
            images = list(model_input)
        return pd.DataFrame(self.detector.rows([_decode(image) for image in images]), columns=COLUMNS)


def _decode(image):
    """A path stays a path; a string that is no file is read as a base64-encoded image file."""
    if not isinstance(image, str) or os.path.exists(image) or len(image) < 256:
        return image
    try:
        data = np.frombuffer(base64.b64decode(image, validate=True), np.uint8)
    except (binascii.Error, ValueError):
        return image  # neither: the detector names the missing file
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return image if decoded is None else np.ascontiguousarray(decoded[:, :, ::-1])


mlflow.models.set_model(YoloDetectorModel())
