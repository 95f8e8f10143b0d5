"""The detectors by model type: the one place that knows which classes there are.

    detector_class("piade")            -> PiadeAD
    load_model("outputs/bottle/model")  -> a GaussianAD or a PiadeAD, as its config.json says
    model_spec(params)                  -> the detector a params.yaml describes (flows and `--params`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gaussad.base_detector import Detector
from gaussad.errors import ModelFileError
from gaussad.gaussian import GaussianAD
from gaussad.model_folder import read_model_type
from gaussad.piade import PiadeAD
from gaussad.validation import check_choice, check_number

DETECTORS: dict[str, type[Detector]] = {cls.MODEL_TYPE: cls for cls in (GaussianAD, PiadeAD)}
DEFAULT_MODEL_TYPE = GaussianAD.MODEL_TYPE
# params.yaml settings of a model block that are not detector settings: how it is trained and run
TRAINING_KEYS = ("preset", "holdout", "batch_size")


def detector_class(model_type: str) -> type[Detector]:
    return DETECTORS[check_choice("model_type", model_type, DETECTORS)]


def load_model(directory: str | Path, **options) -> Detector:
    """Load a saved model of any type, as its config.json says; `options` are those of
    Detector.load (device, runtime, progress, batch_size)."""
    directory = Path(directory)
    model_type = read_model_type(directory)
    if model_type not in DETECTORS:
        raise ModelFileError(f"{directory / 'config.json'}: model_type {model_type!r} is not one of "
                             f"{', '.join(DETECTORS)}")
    return DETECTORS[model_type].load(directory, **options)


@dataclass
class ModelSpec:
    """What a params.yaml says to train: the detector class, its settings (the preset, if the block
    names one, with the block's values over it), the hold-out fraction and the scoring batch."""

    detector: type[Detector]
    settings: dict
    holdout: float = 0.1
    batch_size: int = 16

    def build(self, **runtime) -> Detector:
        """The unfitted detector (model_spec has checked the settings); `runtime`: device, runtime,
        progress."""
        return self.detector.from_settings(self.settings, False, batch_size=self.batch_size, **runtime)


def model_spec(params: dict, source: str | None = "params.yaml", preset: str | None = None) -> ModelSpec:
    """The ModelSpec of a parsed params.yaml: `model_type` (default gaussian) and that type's block,
    over the block's `preset` (or `preset`, which replaces it). Every setting is checked here, before
    any compute: an unknown key, a bad value or a setting without effect is a ValueError naming
    `source` (None: the settings were given one by one), the key, the value and what is allowed."""
    detector = detector_class(params.get("model_type", DEFAULT_MODEL_TYPE))
    block = dict(params.get(detector.PARAMS_BLOCK) or {})
    where = f"{source}: {detector.PARAMS_BLOCK}." if source else ""
    block_preset = block.pop("preset", None)
    preset = preset or block_preset
    settings = dict(detector.PRESETS[check_choice(f"{detector.NAME} preset", preset, detector.PRESETS)]) \
        if preset is not None else {}
    training = {key: block.pop(key) for key in ("holdout", "batch_size") if key in block}
    if "holdout" in training:
        training["holdout"] = check_number(f"{where}holdout", training["holdout"], float, 0, 1, open_high=True)
    if "batch_size" in training:
        training["batch_size"] = check_number(f"{where}batch_size", training["batch_size"], int, 1)
    spec = ModelSpec(detector, {**settings, **block}, **training)
    detector.SETTINGS.validate(spec.settings, where, check_effect=set(block))  # the preset's values pass
    return spec
