"""The MLflow pyfunc wrapper of a saved gaussad model (logged as "model from code", never pickled).

MLflow copies this file into the logged model and runs it on load; the model's only artifact is the
model folder (config.json + stats.safetensors or weights.safetensors), read by `load_model`.

    model = mlflow.pyfunc.load_model("models:/gaussad-mvtec-bottle@champion")
    model.predict(pd.DataFrame({"image": ["a.png", png_bytes, rgb_array]}))
    -> DataFrame: score, label ("anomalous"/"normal"), threshold, map ([S, S] pixel scores)

Each `image` value is a file path, encoded image bytes (PNG, JPEG, ...; over HTTP they are sent
base64-encoded, as MLflow does for binary columns) or an H×W or H×W×3 array (uint8, or float in
[0, 1]). The param `return_maps=False` leaves out the maps, which are large in JSON.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from gaussad.data import read_rgb
from gaussad.features import to_tensor
from gaussad.model import load_model

IMAGE_COLUMN = "image"


def decode_image(value) -> Image.Image:
    """One input value (path, encoded bytes or array) as an RGB image; ValueError says what is wrong."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(value))).convert("RGB")
        except OSError as err:
            raise ValueError(f"image bytes ({len(value)} bytes) cannot be decoded: {err}") from None
    if isinstance(value, (str, Path)):
        return read_rgb(value)  # DatasetError (a ValueError) names a missing or unreadable file
    if isinstance(value, (np.ndarray, list)):
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"an image array must be H×W or H×W×3, got shape {array.shape}")
        if array.dtype != np.uint8:  # floats are taken as [0, 1]
            array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    raise ValueError(f"an image must be a path, encoded bytes or an array, got {type(value).__name__}")


def images_from_input(model_input) -> list:
    """The image values of a predict() input: a DataFrame's `image` column, or a list / one value."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {IMAGE_COLUMN!r}, got {list(model_input.columns)}")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict):
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:  # a batch of arrays
        return list(model_input)
    return list(model_input) if isinstance(model_input, (list, tuple)) else [model_input]


class GaussadModel(mlflow.pyfunc.PythonModel):
    """Scores images with a saved gaussad model (Gaussian or PIADE)."""

    def load_context(self, context):
        self.model = load_model(context.artifacts["model"], progress=False)

    # The hint is the logged signature's input (a DataFrame with an `image` column); MLflow infers
    # nothing from it, and the signature logged with the model does the validation.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        params = params or {}
        size = self.model.config["image_size"]
        values = images_from_input(model_input)
        threshold = self.model.decision_threshold
        batch_size = self.model.batch_size
        scores, maps = [], []
        for start in range(0, len(values), batch_size):
            batch = torch.stack([to_tensor(decode_image(v), size) for v in values[start:start + batch_size]])
            image_scores, pixel_maps = self.model.score_batch(batch)
            scores.extend(float(s) for s in image_scores)
            maps.extend(pixel_maps)
        result = pd.DataFrame({
            "score": scores,
            "label": ["anomalous" if s >= threshold else "normal" for s in scores],
            "threshold": threshold,
        })
        if params.get("return_maps", True):
            result["map"] = [m.astype(np.float32) for m in maps]
        return result


mlflow.models.set_model(GaussadModel())
