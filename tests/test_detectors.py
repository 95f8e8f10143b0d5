"""The detector interface and the table of detectors: dispatch by model_type, presets, settings
checks and the not-fitted check, the same for every detector."""

from __future__ import annotations

import json

import pytest

from gaussad.base_detector import split_holdout
from gaussad.detectors import DETECTORS, detector_class, load_model, model_spec
from gaussad.errors import ModelFileError, NotFittedError
from gaussad.gaussian import GaussianAD
from gaussad.networks import LITE0_PACKAGE
from gaussad.piade import PiadeAD

TINY = {  # the cheapest detector of each type: offline weights, small images
    "gaussian": dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, levels=(3,), image_size=64),
    "piade": dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, perceptual="tf_efficientnet_lite0",
                  perceptual_weights=LITE0_PACKAGE, image_size=64, upsample_channels=16),
}


def test_the_table_holds_each_detector_under_its_model_type():
    assert DETECTORS == {"gaussian": GaussianAD, "piade": PiadeAD}
    for model_type, detector in DETECTORS.items():
        assert detector_class(model_type) is detector and detector.MODEL_TYPE == model_type
        assert {"paper", "lite0"} <= set(detector.PRESETS)
        assert all(set(preset) <= set(detector.SETTINGS.names) for preset in detector.PRESETS.values())
    with pytest.raises(ValueError, match="unknown model_type 'svm': use one of gaussian, piade"):
        detector_class("svm")


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_an_unfitted_detector_refuses_to_score_or_save(model_type, tmp_path):
    detector = DETECTORS[model_type](**TINY[model_type], device="cpu", progress=False)
    with pytest.raises(NotFittedError, match="not fitted"):
        detector.score([tmp_path / "any.png"])
    with pytest.raises(NotFittedError, match="nothing to save"):
        detector.save(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_load_model_names_an_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "svm", "format_version": 2}))
    with pytest.raises(ModelFileError, match=r"config.json: model_type 'svm' is not one of gaussian, piade"):
        load_model(tmp_path)


def test_model_spec_applies_the_preset_then_the_block():
    params = {"model_type": "piade", "piade": {"preset": "lite0", "epochs": 3, "holdout": 0.2, "batch_size": 4}}
    spec = model_spec(params)
    assert spec.detector is PiadeAD and (spec.holdout, spec.batch_size) == (0.2, 4)
    assert spec.settings == {**PiadeAD.PRESETS["lite0"], "epochs": 3}
    assert model_spec(params, preset="paper").settings["backbone"] == "resnet18"  # an explicit preset replaces it
    assert model_spec({}).detector is GaussianAD and model_spec({}).settings == {}


@pytest.mark.parametrize("params, message", [
    ({"model": {"levles": [3]}}, "params.yaml: model.levles is not a setting of GaussianAD"),
    ({"model_type": "piade", "piade": {"preset": "fast"}}, "unknown PIADE preset 'fast': use one of paper, lite0"),
    ({"model_type": "forest"}, "unknown model_type 'forest'"),
])
def test_model_spec_errors_name_the_key(params, message):
    with pytest.raises(ValueError, match=message):
        model_spec(params)


def test_the_hold_out_split_is_seeded_and_keeps_two_images_to_fit():
    fit, held = split_holdout(20, 0.1, seed=0)
    assert len(held) == 2 and sorted(fit + held) == list(range(20))
    assert (fit, held) == split_holdout(20, 0.1, seed=0) != split_holdout(20, 0.1, seed=1)
    assert split_holdout(2, 0.5, seed=0) == ([0, 1], [])  # no hold-out below 2 images to fit
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 1\), got 1"):
        split_holdout(20, 1, seed=0)


def test_params_yaml_holds_the_lite0_preset():
    """The pipeline's params.yaml runs the recommended offline configuration: the lite0 preset."""
    from pathlib import Path

    import yaml

    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    settings = model_spec(params).settings
    for key, value in GaussianAD.PRESETS["lite0"].items():
        assert settings[key] == (list(value) if isinstance(value, tuple) else value), key
