"""A fitted detector that can export (EXPORTS_ONNX: the Gaussian one) as one ONNX graph: images [n, 3,
S, S] in [0, 1] -> (image scores [n] float64, anomaly maps [n, S, S] float32), the backbone, the
Mahalanobis distances, the map and its smoothing in one file that ONNX Runtime runs without torch's
model code.

    export_onnx(model, "bottle.onnx")      # writes it, after checking it scores as the model does
    exported = ExportedDetector.load("bottle.onnx")
    exported.score(paths)                   # Scores, as the model's own score()

The file carries the model's config.json (settings, thresholds, digest) in its metadata, so
`gaussad predict bottle.onnx ...` labels and draws exactly as `gaussad predict MODEL ...` does.
Parity is checked at export on seeded images, and in the tests on real ones: image scores within
1e-4 relative, maps within 1e-3 of their largest value.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gaussad.base_detector import FOLDER_KEYS, Detector
from gaussad.detectors import detector_class
from gaussad.errors import ModelFileError, OutputError
from gaussad.files import atomic_file
from gaussad.networks import LevelNetwork
from gaussad.onnx_features import OnnxSession, export_graph

CONFIG_KEY = "gaussad_config"  # the metadata entry holding the model's config.json
SCORE_TOLERANCE = 1e-4  # relative, per image
MAP_TOLERANCE = 1e-3  # relative to the largest |map| value of the batch


class DetectorGraph(torch.nn.Module):
    """The detector's score_batch as one module: LevelNetwork, then its score_tensors."""

    def __init__(self, model: Detector):
        super().__init__()
        c = model.config
        # built anew, not the torch runtime's own: that one is channels_last, and its traced graph
        # scores wrongly (image scores off by 25 %; the parity check refuses it)
        self.network = LevelNetwork(c["backbone"], c["weights"], model.backbone.levels, c["seed"]).eval()
        self.model = model

    def forward(self, images_nchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.score_tensors(dict(zip(self.network.levels, self.network(images_nchw))))


def export_onnx(model: Detector, path: str | Path, check_images: int = 2) -> Path:
    """Write the model as one ONNX graph at `path` (a new file, or one gaussad exported), once its
    scores and maps on `check_images` seeded random images match the model's within the tolerances."""
    if not model.EXPORTS_ONNX:
        raise ValueError(f"{model.NAME} models do not export to ONNX (only those of the Gaussian detector do)")
    model.check_fitted()
    path = Path(path)
    if path.exists() and not _is_gaussad_export(path):
        raise OutputError(f"{path} exists and is not an ONNX file gaussad exported: choose another path")
    if model.device.type != "cpu":
        raise ValueError(f"export a model loaded on the CPU (this one is on {model.device})")
    size = model.config["image_size"]
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        export_graph(DetectorGraph(model), example, partial, ["image_scores", "maps"])
        _add_metadata(partial, {CONFIG_KEY: json.dumps(model.to_config())})
        check = torch.rand(check_images, 3, size, size, generator=torch.Generator().manual_seed(1))
        parity(ExportedDetector.load(partial), model, check)
    return path


def parity(exported: "ExportedDetector", model: Detector, images_nchw: torch.Tensor) -> dict:
    """The largest relative differences of the exported graph's scores and maps from the model's on
    a batch; ValueError past SCORE_TOLERANCE or MAP_TOLERANCE."""
    want_scores, want_maps = model.score_batch(images_nchw)
    got_scores, got_maps = exported.score_batch(images_nchw)
    errors = {"image_scores": float(np.max(np.abs(got_scores - want_scores) / np.abs(want_scores))),
              "maps": float(np.abs(got_maps - want_maps).max() / np.abs(want_maps).max())}
    if errors["image_scores"] > SCORE_TOLERANCE or errors["maps"] > MAP_TOLERANCE:
        raise ValueError(f"the exported graph does not score as the model does (relative differences: "
                         f"image scores {errors['image_scores']:.2g}, maps {errors['maps']:.2g}); nothing written")
    return errors


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    graph = onnx.load(str(path))
    for key, value in entries.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _is_gaussad_export(path: Path) -> bool:
    try:
        return CONFIG_KEY in OnnxSession(path).metadata()
    except Exception:  # not an ONNX file at all
        return False


class ExportedDetector(Detector):
    """A model exported by export_onnx, scored by ONNX Runtime on the CPU: score(), thresholds,
    decision_threshold and display_range as the model it came from. It cannot be fitted or saved."""

    NAME = "exported Gaussian detector"

    def __init__(self, session: OnnxSession, config: dict, batch_size: int = 16, progress: bool = True):
        self._set_runtime("cpu", batch_size, progress, "exported")
        self.session = session
        self.thresholds = dict(config.get("thresholds", {}))
        names = detector_class(config["model_type"]).SETTINGS.names
        self.config = {key: config[key] for key in names if key in config}
        # what fitting measured, as the model's config.json keeps it (the held-out scores among it)
        self.fit_info = {key: value for key, value in config.items() if key not in FOLDER_KEYS and key not in names}

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 16, progress: bool = True, device: str | None = None,
             runtime: str | None = None) -> "ExportedDetector":
        """An exported file, run by ONNX Runtime on the CPU (the only `device` and `runtime` it takes)."""
        if runtime is not None or (device is not None and str(device) != "cpu"):
            raise ValueError(f"an exported model runs on ONNX Runtime on the CPU: --runtime and --device do not apply "
                             f"to {path}")
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"exported model {path} does not exist")
        session = OnnxSession(path)
        config = session.metadata().get(CONFIG_KEY)
        if config is None:
            raise ModelFileError(f"{path} is an ONNX file gaussad did not export (no {CONFIG_KEY} metadata)")
        return cls(session, json.loads(config), batch_size, progress)

    @property
    def is_fitted(self) -> bool:
        return True

    def score_batch(self, images_nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        image_scores, maps = self.session.run(images_nchw)  # the graph's two outputs
        return image_scores, maps

    def describe(self) -> str:
        return f"exported ONNX graph of {self.config.get('backbone')} at {self.config.get('image_size')} px"
