"""gaussad.settings: one table per detector, and bad settings refused before any compute.

Each row of each detector's table is given a value it must refuse (as scikit-learn's common tests
build invalid parameters from the constraints); the flow and `gaussad fit` are run for real on a
params.yaml with a bad value and must stop in seconds with one line, before any extraction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gaussad.detectors import DETECTORS, model_spec
from gaussad.gaussian import GaussianAD
from gaussad.settings import Setting, SettingsTable

REPO = Path(__file__).resolve().parents[1]
TABLE = SettingsTable([
    Setting("mode", "choice", "a", "which mode", choices=("a", "b")),
    Setting("size", "int", 3, "a size", minimum=1, odd=True),
    Setting("rate", "float", 0.5, "a rate", minimum=0, maximum=1, open_low=True),
    Setting("levels", "levels", (1, 2), "levels"),
    Setting("extra", "float", 1.0, "only with mode b", applies=lambda s: s["mode"] == "b", needs="mode 'b'",
            depends=("mode",), before=2.0),
], owner="Example")


def test_values_from_yaml_and_json_are_converted_and_defaults_filled():
    assert TABLE.validate({"size": 5.0, "rate": "0.25", "levels": [3, 1]}) == \
        {"mode": "a", "size": 5, "rate": 0.25, "levels": [1, 3], "extra": 1.0}
    assert TABLE.names == ("mode", "size", "rate", "levels", "extra")
    assert TABLE.added_since() == {"extra": 2.0}


@pytest.mark.parametrize("values, message", [
    ({"mode": "c"}, "unknown mode 'c': use one of a, b"),
    ({"size": 4}, "size must be odd"),
    ({"size": 0}, "size must be at least 1, got 0"),
    ({"rate": 0}, r"rate must be in \(0, 1\], got 0"),
    ({"levels": "1 2"}, "levels must be a list of whole numbers"),
    ({"colour": 1}, "colour is not a setting of Example"),
    ({"extra": 3.0}, "extra needs mode 'b', got mode 'a': leave extra out or change mode"),
])
def test_a_bad_value_is_one_error_naming_it(values, message):
    with pytest.raises(ValueError, match=message):
        TABLE.validate(values)
    with pytest.raises(ValueError, match=f"params.yaml: model.{list(values)[0]}"):
        TABLE.validate(values, "params.yaml: model.")


def test_a_setting_without_effect_is_refused_only_off_its_default_and_never_on_loading():
    assert TABLE.validate({"extra": 1.0})["extra"] == 1.0  # the default: nothing was asked
    assert TABLE.validate({"mode": "b", "extra": 3.0})["extra"] == 3.0
    assert TABLE.validate({"extra": 3.0}, check_effect=False)["extra"] == 3.0  # a saved folder


def invalid_value(row: Setting):
    """A value `row` must refuse, from its own constraints."""
    if row.kind == "choice":
        return "not-one-of-them"
    if row.kind in ("levels", "ints"):
        return "not a list"
    if row.kind == "text":
        return ""
    if row.odd:
        return 2
    return (row.minimum - 1) if row.minimum is not None else "not a number"


ROWS = [(model_type, name) for model_type, detector in DETECTORS.items() for name in detector.SETTINGS.names]


@pytest.mark.parametrize("model_type, name", ROWS)
def test_every_setting_of_every_detector_refuses_a_bad_value_naming_it(model_type, name):
    detector = DETECTORS[model_type]
    value = invalid_value(detector.SETTINGS.rows[name])
    with pytest.raises(ValueError, match=f"params.yaml: {detector.PARAMS_BLOCK}.{name}"):
        model_spec({"model_type": model_type, detector.PARAMS_BLOCK: {name: value}})


@pytest.mark.parametrize("model_type", sorted(DETECTORS))
def test_every_preset_is_valid_and_the_flags_come_from_the_table(model_type):
    detector = DETECTORS[model_type]
    for preset in detector.PRESETS.values():
        detector.SETTINGS.validate(preset)
    from gaussad.cli import _parser

    fit_help = _parser()._subparsers._group_actions[0].choices["fit"].format_help()
    for name in detector.SETTINGS.flag_names():
        assert detector.SETTINGS.rows[name].flag_name in fit_help, name


def test_the_constructor_builds_no_network():
    model = GaussianAD(backbone="no_such_net", weights="none")  # unknown to timm: only building would fail
    assert model._backbone is None


BAD_SETTINGS = [("spatial", "foo", "unknown spatial mode 'foo': use one of shared, per-location, stacked"),
                ("ridge", -1, "ridge must be > 0, got -1"),
                ("local_average", 2, "local_average must be odd")]


def bad_params(tmp_path: Path, key: str, value) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("key, value, message", BAD_SETTINGS)
def test_the_flow_stops_in_seconds_on_a_bad_setting_before_any_extraction(demo_root, tmp_path, key, value, message):
    params = bad_params(tmp_path, key, value)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gaussad.flows.train", "--params", str(params), "--data",
                           str(demo_root), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    seconds = time.monotonic() - started
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"gaussad-train: {params}: model.{key}: {message}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # nothing started
    assert seconds < 30, seconds


@pytest.mark.parametrize("key, value, message", BAD_SETTINGS)
def test_fit_stops_on_a_bad_setting_before_reading_any_image(demo_root, tmp_path, capsys, key, value, message):
    from gaussad.cli import main

    params = bad_params(tmp_path, key, value)
    assert main(["fit", str(demo_root / "weave"), "-o", str(tmp_path / "model"), "--config", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith(f"gaussad: error: {params}: model.{key}: {message}")
    assert not (tmp_path / "model").exists()


def test_a_bad_flag_value_names_the_flag(demo_root, tmp_path, capsys):
    from gaussad.cli import main

    assert main(["fit", str(demo_root / "weave"), "-o", str(tmp_path / "m"), "--ridge", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "gaussad: error: --ridge: ridge must be > 0, got -1.0"


def test_a_presets_own_values_are_never_refused_what_the_user_adds_is():
    from gaussad.piade import PiadeAD

    # lite0 names a perceptual network; with λ1 = 0 it has no effect, but the user did not set it
    assert PiadeAD.from_preset("lite0", lambda_perceptual=0).config["lambda_perceptual"] == 0
    assert model_spec({"model_type": "piade", "piade": {"preset": "lite0", "lambda_perceptual": 0}}).settings[
        "lambda_perceptual"] == 0
    with pytest.raises(ValueError, match="ridge needs covariance 'ridge', got covariance 'ledoit-wolf'"):
        GaussianAD.from_preset("paper", ridge=0.5)
    with pytest.raises(ValueError, match="params.yaml: piade.perceptual needs"):
        model_spec({"model_type": "piade", "piade": {"preset": "lite0", "lambda_perceptual": 0,
                                                     "perceptual": "resnet18"}})
