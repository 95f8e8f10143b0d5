"""The MLflow pyfunc model of a saved gaussad model (logged as "model from code", never pickled).

MLflow copies gaussad/pyfunc_model.py into each logged model and runs it on load; that file imports
only `GaussadModel` from here, so this module's name and that class are what registered versions
depend on: keep both where they are. Its artifacts are the model folder (config.json +
stats.safetensors or weights.safetensors), read by `load_model`, and for a version registered with
`export_onnx` the exported graph (gaussad.export), which then scores: the same numbers within the
export's parity bounds, faster on a CPU. To score such a version with the folder instead:
`mlflow.pyfunc.load_model(uri, model_config={"use_exported": False})`.

    model = mlflow.pyfunc.load_model("models:/gaussad-mvtec-bottle@champion")
    model.predict(pd.DataFrame({"image": ["a.png", png_bytes, rgb_array]}))
    -> DataFrame: score, label ("anomalous"/"normal"), threshold, map ([S, S] pixel scores)

Each `image` value is encoded image bytes (PNG, JPEG, TIFF, 8 or 16 bits; over HTTP they are sent
base64-encoded, as MLflow does for binary columns), an H×W or H×W×3 array (uint8, uint16, or float
in [0, 1]), or a file path. Paths are refused unless the process that loads the model sets
GAUSSAD_IMAGE_ROOTS (folders separated by ':'), and then only files inside those folders are read:
a served model must not read any file a client names on the server. A bad value (undecodable,
NaN, wrong shape, larger than MAX_IMAGE_PIXELS) is a ValueError naming it; served, a 400 response
whose message says what is wrong. Served, the signature's binary `image` column means a JSON body
carries encoded bytes only (MLflow base64-decodes every value, and refuses lists); a path string
reaches the model only in a CSV body.
The param `return_maps=False` leaves out the maps, which are large in JSON.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

import mlflow
from gaussad.data import MAX_IMAGE_PIXELS, open_image, read_rgb, to_rgb8, unit_to_uint8
from gaussad.detectors import load_model
from gaussad.export import ExportedDetector
from gaussad.features import to_tensor

IMAGE_COLUMN = "image"
MODEL_ARTIFACT, EXPORTED_ARTIFACT = "model", "exported"
IMAGE_ROOTS_VARIABLE = "GAUSSAD_IMAGE_ROOTS"


class ImageInputError(MlflowException, ValueError):
    """A bad predict() input. A ValueError in-process; served, MLflow answers an MlflowException with
    400 and its message, where any other exception becomes a generic message plus the server's
    traceback."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(value) -> Image.Image:
    """One input value (encoded bytes, an array, or an allowed path) as an 8-bit RGB image;
    ValueError says what is wrong with it."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        name = f"in the request ({len(value)} bytes)"
        with open_image(io.BytesIO(bytes(value)), name) as img:
            return to_rgb8(img, name)
    if isinstance(value, (str, Path)):
        return read_rgb(allowed_path(value))
    if isinstance(value, (np.ndarray, list)):
        return _array_image(np.asarray(value))
    raise ValueError(f"an image must be encoded bytes, an array or a path, got {type(value).__name__}")


def _decode_input(index: int, value) -> Image.Image:
    try:
        return decode_image(value)
    except ValueError as err:
        raise ImageInputError(f"image {index}: {err}") from None


def allowed_path(value: str | Path) -> Path:
    """A path input, accepted only inside the folders listed in GAUSSAD_IMAGE_ROOTS (links resolved):
    a served model must not read whatever file a client names on the server's disk."""
    roots = [Path(r).resolve() for r in os.environ.get(IMAGE_ROOTS_VARIABLE, "").split(os.pathsep) if r]
    if not roots:
        raise ValueError(f"image paths are not accepted by this model (asked for {str(value)[:200]!r}): send "
                         f"the encoded image bytes or an array, or set {IMAGE_ROOTS_VARIABLE} to the folders "
                         f"it may read")
    path = Path(value).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise ValueError(f"image path {str(value)[:200]!r} is outside the folders in {IMAGE_ROOTS_VARIABLE}")
    return path


def _array_image(array: np.ndarray) -> Image.Image:
    """An H×W, H×W×1, H×W×3 or H×W×4 array: uint8 as is, uint16 scaled by 65535, floats in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ValueError(f"an image array must be H×W, H×W×1, H×W×3 or H×W×4, got shape {array.shape}")
    if array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"an image array of {array.shape[1]}×{array.shape[0]} pixels is larger than the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} million gaussad scores")
    if array.dtype == np.uint8:
        return Image.fromarray(array).convert("RGB")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"an image array must be of numbers, got dtype {array.dtype}")
    unit = array / 65535.0 if array.dtype == np.uint16 else array.astype(np.float64)
    return Image.fromarray(unit_to_uint8(unit, "an image array")).convert("RGB")


def images_from_input(model_input) -> list:
    """The image values of a predict() input: a DataFrame's `image` column, or a list / one value."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ImageInputError(f"the input needs a column {IMAGE_COLUMN!r}, got {list(model_input.columns)}")
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, dict):
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:  # a batch of arrays
        return list(model_input)
    return list(model_input) if isinstance(model_input, (list, tuple)) else [model_input]


class GaussadModel(mlflow.pyfunc.PythonModel):
    """Scores images with a saved gaussad model (Gaussian or PIADE)."""

    def load_context(self, context):
        exported = context.artifacts.get(EXPORTED_ARTIFACT)
        if exported is not None and (context.model_config or {}).get("use_exported", True):
            self.model = ExportedDetector.load(exported, progress=False)
        else:
            self.model = load_model(context.artifacts[MODEL_ARTIFACT], progress=False)
        # `mlflow models serve` calls predict from several threads at once: one batch on the device
        # at a time keeps its memory bounded (concurrent passes would add up); decoding runs in parallel
        self.lock = threading.Lock()

    # The hint is the logged signature's input (a DataFrame with an `image` column); MLflow infers
    # nothing from it, and the signature logged with the model does the validation.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        params = params or {}
        size = self.model.config["image_size"]
        values = images_from_input(model_input)
        if not values:
            raise ImageInputError("the input holds no images")
        threshold = self.model.decision_threshold
        batch_size = self.model.batch_size
        scores, maps = [], []
        for start in range(0, len(values), batch_size):
            batch = torch.stack([to_tensor(_decode_input(index, values[index]), size)
                                 for index in range(start, min(start + batch_size, len(values)))])
            with self.lock:
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
