"""gaussad.export and `gaussad export`: a fitted GaussianAD as one ONNX graph that scores as the model
does (image scores within 1e-4 relative, maps within 1e-3 of their largest value) on real images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
from PIL import Image

from gaussad.cli import main
from gaussad.data import load_category, read_rgb
from gaussad.errors import ModelFileError
from gaussad.export import ExportedDetector, export_onnx
from gaussad.features import to_tensor
from gaussad.gaussian import GaussianAD
from gaussad.onnx_features import cache_dir

SIZE = 96
CONFIGS = {
    # the offline preset: stacked per-position Gaussians, map maximum, smoothing
    "lite0": {"preset": "lite0"},
    # the paper's method: pooled image Gaussians, one shared pixel Gaussian per level, Ledoit-Wolf
    "paper-lite0": {"preset": "paper-lite0"},
    # two stacked Gaussians: the map the mean of both, the image score the first map's maximum
    "lite0-sharp": {"preset": "lite0-sharp"},
    # both image scores standardised, per-location Gaussians
    "combined": {"preset": "lite0", "image_score": "combined", "spatial": "per-location", "levels": [3, 4],
                 "pixel_levels": [3, 4]},
}


@pytest.fixture(scope="module")
def fitted(demo_root, tmp_path_factory):
    """{name: (model folder, loaded model)} fitted on the demo's weave at 96 px."""
    train = load_category(demo_root, "weave").train
    models = {}
    for name, settings in CONFIGS.items():
        settings = dict(settings)
        model = GaussianAD.from_preset(settings.pop("preset"), **settings, image_size=SIZE, device="cpu",
                                       progress=False).fit(train)
        models[name] = (model.save(tmp_path_factory.mktemp(name) / "model"), model)
    return models


def real_images(demo_root) -> torch.Tensor:
    """Photographs (skimage) and demo test images, defective and not, at the model's size."""
    photos = [Image.fromarray(getattr(skimage.data, name)()) for name in ("chelsea", "coffee", "astronaut")]
    demo = [read_rgb(path) for path in load_category(demo_root, "weave").test.paths[::5]]
    return torch.stack([to_tensor(image, SIZE) for image in photos + demo])


@pytest.mark.parametrize("name", CONFIGS)
def test_the_exported_graph_scores_as_the_model_on_real_images(fitted, demo_root, tmp_path, name):
    folder, model = fitted[name]
    path = export_onnx(model, tmp_path / "model.onnx")
    exported = ExportedDetector.load(path, progress=False)
    images = real_images(demo_root)  # 11 images: runs of 4, 4 and 3 in the session
    want_scores, want_maps = model.score_batch(images)
    got_scores, got_maps = exported.score_batch(images)
    assert got_scores.shape == want_scores.shape and got_maps.shape == want_maps.shape == (len(images), SIZE, SIZE)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4)
    assert np.abs(got_maps - want_maps).max() <= 1e-3 * np.abs(want_maps).max()
    # what predict needs comes with the file
    assert exported.thresholds == model.thresholds and exported.decision_threshold == model.decision_threshold
    assert exported.display_range() == model.display_range()
    assert exported.config["image_size"] == SIZE


def test_export_and_predict_from_the_command_line(fitted, demo_root, tmp_path, capsys):
    folder, _ = fitted["lite0"]
    assert main(["export", str(folder), "-o", str(tmp_path / "weave.onnx")]) == 0
    assert "weave.onnx" in capsys.readouterr().out
    images = [str(p) for p in load_category(demo_root, "weave").test.paths[::4]]
    assert main(["predict", str(folder), *images, "-o", str(tmp_path / "from-folder"), "--quiet"]) == 0
    assert main(["predict", str(tmp_path / "weave.onnx"), *images, "-o", str(tmp_path / "from-onnx"), "--quiet"]) == 0
    want = pd.read_csv(tmp_path / "from-folder" / "predictions.csv")
    got = pd.read_csv(tmp_path / "from-onnx" / "predictions.csv")
    assert list(got.path) == list(want.path) and list(got.label) == list(want.label)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-4)


def test_evaluate_refuses_an_exported_file(fitted, demo_root, tmp_path, capsys):
    folder, _ = fitted["lite0"]
    exported = export_onnx(GaussianAD.load(folder, device="cpu", progress=False), tmp_path / "m.onnx")
    assert main(["evaluate", str(exported), str(demo_root), "-c", "weave", "-o", str(tmp_path / "out")]) == 2
    assert "model folder" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_export_default_path_is_beside_the_folder(fitted, tmp_path, capsys):
    folder, _ = fitted["paper-lite0"]
    copy = tmp_path / "bottle"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert main(["export", str(copy)]) == 0
    assert (tmp_path / "bottle.onnx").is_file()
    assert main(["export", str(copy)]) == 0  # its own export is replaced


def test_export_never_overwrites_a_users_file(fitted, tmp_path, capsys):
    folder, _ = fitted["lite0"]
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    assert main(["export", str(folder), "-o", str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gaussad: error: ") and str(notes) in err and err.count("\n") == 1
    assert notes.read_text() == "my notes" and sorted(tmp_path.iterdir()) == [notes]


def test_an_onnx_file_gaussad_did_not_export_is_refused(fitted, tmp_path):
    GaussianAD.from_preset("lite0", image_size=SIZE, device="cpu")  # puts a feature export in the cache
    other = next(cache_dir().glob("*.onnx"))
    with pytest.raises(ModelFileError, match="did not export"):
        ExportedDetector.load(other)
    with pytest.raises(ValueError, match="--runtime"):
        ExportedDetector.load(other, runtime="torch")
