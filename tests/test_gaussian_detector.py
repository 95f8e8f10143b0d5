"""GaussianAD end to end on a tiny demo category, with scores recomputed independently (NumPy/SciPy)
from the saved statistics."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from gaussad.data import load_category, read_rgb
from gaussad.errors import ModelFileError, OutputError
from gaussad.features import to_tensor
from gaussad.gaussian import GaussianAD
from gaussad.model_folder import model_digest
from gaussad.networks import LITE0_PACKAGE

LEVELS = (3, 4, 5)
SIZE = 96
MODES = ("shared", "per-location")


def make_model(spatial="shared", **kwargs):
    settings = dict(
        backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, levels=LEVELS, image_size=SIZE,
        reduction="npca", variance=0.05, spatial=spatial, device="cpu", progress=False, batch_size=8,
    )
    settings.update(kwargs)
    return GaussianAD(**settings)


@pytest.fixture(scope="module")
def category(demo_root):
    return load_category(demo_root, "brushed")


@pytest.fixture(scope="module")
def fitted(category):
    """One model per spatial mode, fitted on the 20 training images with the default 10 % holdout."""
    return {mode: make_model(mode).fit(category.train, holdout=0.1) for mode in MODES}


@pytest.fixture(scope="module")
def scores(fitted, category):
    return {mode: model.score(category.test) for mode, model in fitted.items()}


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    """Each fitted model saved once; tests that damage a model copy it first."""
    root = tmp_path_factory.mktemp("saved")
    return {mode: model.save(root / mode) for mode, model in fitted.items()}


def copy_model(saved_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(saved_dir, target)
    return target


def edit_config(directory: Path, **changes) -> None:
    """Change config.json and sign it again, as a consistent but wrong folder would be (the digest check
    itself is tested in test_reliability.py): the checks behind the digest are what these tests reach."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    resign(directory)


def resign(directory: Path) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "digest": model_digest(config, directory / "stats.safetensors")}))


def load(directory):
    return GaussianAD.load(directory, device="cpu", progress=False)


# ---- fit and score ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_fit_then_score(scores, category, mode):
    result = scores[mode]
    n = len(category.test)
    assert result.image.shape == (n,)
    assert result.maps.shape == (n, SIZE, SIZE)
    assert np.isfinite(result.image).all() and np.isfinite(result.maps).all()
    assert (result.image > 0).all() and (result.maps >= 0).all()
    labels = np.array(category.test.labels)
    assert result.image[labels == 1].mean() > result.image[labels == 0].mean()


def test_score_requires_a_fitted_model(category):
    with pytest.raises(RuntimeError, match="not fitted"):
        make_model().score(category.test.paths[:1])


# ---- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_save_load_gives_identical_scores(fitted, saved, scores, category, mode):
    directory = saved[mode]
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "stats.safetensors"]
    config = json.loads((directory / "config.json").read_text())  # plain JSON, no pickle
    assert config["spatial"] == mode and config["levels"] == list(LEVELS) and config["image_size"] == SIZE
    assert config["weights"] == LITE0_PACKAGE and config["thresholds"] == fitted[mode].thresholds
    raw = (directory / "stats.safetensors").read_bytes()  # safetensors: u64 header length, JSON header
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["image.3.mean"]["dtype"] == "F64"

    stats = load_numpy(str(directory / "stats.safetensors"))  # readable without torch
    assert {f"{kind}.{level}.{field}" for kind in ("image", "pixel") for level in LEVELS
            for field in ("mean", "projection", "precision", "shrinkage")} == set(stats)
    for level in LEVELS:
        np.testing.assert_array_equal(stats[f"image.{level}.mean"], fitted[mode].image_gaussians[level].mean.numpy())

    loaded = load(directory)
    assert loaded.config == fitted[mode].config and loaded.thresholds == fitted[mode].thresholds
    first_batch = slice(0, 8)  # the fixture's first batch (batch_size 8): same composition, same bits
    again = loaded.score(category.test.paths[first_batch])
    np.testing.assert_array_equal(again.image, scores[mode].image[first_batch])
    np.testing.assert_array_equal(again.maps, scores[mode].maps[first_batch])


# ---- independent recomputation of the scores from the saved statistics ----------------------------


def bilinear_upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize [h, w] -> [size, size], edges clamped (no antialias)."""

    def weights(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, src - low

    r0, r1, fy = weights(grid.shape[0])
    c0, c1, fx = weights(grid.shape[1])
    rows = grid[r0] * (1 - fy)[:, None] + grid[r1] * fy[:, None]
    return rows[:, c0] * (1 - fx)[None, :] + rows[:, c1] * fx[None, :]


def inverse_covariance(stats, key, group=0):
    projection = stats[f"{key}.projection"][group].astype(np.float64)
    precision = stats[f"{key}.precision"][group].astype(np.float64)
    return projection @ np.diag(precision) @ projection.T


@pytest.mark.parametrize("mode", MODES)
def test_scores_equal_independent_recomputation(fitted, saved, scores, category, mode):
    stats = load_numpy(str(saved[mode] / "stats.safetensors"))
    picks = [0, 1, len(category.test) - 2, len(category.test) - 1]  # good and defective images
    images = torch.stack([to_tensor(read_rgb(category.test.paths[i]), SIZE) for i in picks])
    feats = {level: f.numpy().astype(np.float64) for level, f in fitted[mode].backbone.extract(images).items()}

    want_image = np.zeros(len(picks))
    want_maps = np.zeros((len(picks), SIZE, SIZE))
    for level in LEVELS:
        pooled = feats[level].mean(axis=(2, 3))  # [n, C]
        vi = inverse_covariance(stats, f"image.{level}")
        mean = stats[f"image.{level}.mean"][0]
        want_image += [scipy_mahalanobis(v, mean, vi) for v in pooled]

        _, _, h, w = feats[level].shape
        pixel_vi = [inverse_covariance(stats, f"pixel.{level}", g) for g in range(len(stats[f"pixel.{level}.mean"]))]
        for i in range(len(picks)):
            grid = np.empty((h, w))
            for y, x in itertools.product(range(h), range(w)):
                g = y * w + x if mode == "per-location" else 0
                grid[y, x] = scipy_mahalanobis(feats[level][i, :, y, x], stats[f"pixel.{level}.mean"][g], pixel_vi[g])
            want_maps[i] += bilinear_upsample(grid, SIZE) / len(LEVELS)

    np.testing.assert_allclose(scores[mode].image[picks], want_image, rtol=1e-5)
    np.testing.assert_allclose(scores[mode].maps[picks], want_maps, rtol=1e-4, atol=1e-4)


# ---- thresholds and the holdout --------------------------------------------------------------------


def test_thresholds_come_from_the_held_out_images(fitted, category):
    model = fitted["shared"]
    n = len(category.train)
    held = int(round(0.1 * n))
    assert set(model.thresholds) >= {"image_normal_quantile", "pixel_normal_quantile", "pixel_normal_median"}
    assert model.fit_info["n_holdout_images"] == held == 2
    assert model.fit_info["n_train_images"] == n - held

    # which images were held out: the image Gaussian's mean is the mean pooled feature of the others
    images = torch.stack([to_tensor(read_rgb(p), SIZE) for p in category.train.paths])
    pooled = model.backbone.extract(images)[LEVELS[0]].numpy().astype(np.float64).mean(axis=(2, 3))
    fitted_mean = model.image_gaussians[LEVELS[0]].mean[0].numpy()
    matches = [
        pair for pair in itertools.combinations(range(n), held)
        if np.allclose(np.delete(pooled, pair, axis=0).mean(0), fitted_mean, rtol=1e-5, atol=1e-6)
    ]
    assert len(matches) == 1, matches
    held_paths = [category.train.paths[i] for i in matches[0]]

    normal = model.score(held_paths)
    assert model.thresholds["image_normal_quantile"] == pytest.approx(np.quantile(normal.image, 0.99), rel=1e-9)
    assert model.thresholds["pixel_normal_quantile"] == pytest.approx(np.quantile(normal.maps, 0.999), rel=1e-6)
    assert model.thresholds["pixel_normal_median"] == pytest.approx(np.median(normal.maps), rel=1e-6)
    assert model.thresholds["pixel_normal_median"] < model.thresholds["pixel_normal_quantile"]


# ---- loading errors --------------------------------------------------------------------------------


def test_saving_new_thresholds_keeps_the_tensors_file(fitted, saved, category, tmp_path):
    """Saved back over a folder holding the same tensors (evaluate's thresholds), only config.json
    is written: the tensors file is the same file (a hard link), the folder loads with the new
    thresholds. A refitted model's tensors differ, and replace the file."""
    folder = copy_model(saved["per-location"], tmp_path)
    before = (folder / "stats.safetensors").stat()
    model = load(folder)
    model.thresholds["image_f1_optimal"] = 1.5
    model.save(folder)
    after = (folder / "stats.safetensors").stat()
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    assert load(folder).thresholds["image_f1_optimal"] == 1.5  # the digest matches the linked tensors

    refitted = make_model("per-location").fit(category.train.paths[:12], holdout=0)
    refitted.save(folder)
    assert (folder / "stats.safetensors").stat().st_ino != before.st_ino
    again = load(folder)
    assert torch.equal(again.pixel_gaussians[3].mean, refitted.pixel_gaussians[3].mean)
    assert "image_f1_optimal" not in again.thresholds


def test_load_missing_config(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json") as info:
        load(directory)
    assert str(directory) in str(info.value)


def test_load_missing_folder(tmp_path):
    with pytest.raises(ModelFileError) as info:
        load(tmp_path / "no_model")
    assert str(tmp_path / "no_model") in str(info.value)


def test_load_corrupt_json(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    (directory / "config.json").write_text('{"format_version": 1, "backbone": ')
    with pytest.raises(ModelFileError, match="not valid JSON") as info:
        load(directory)
    assert str(directory / "config.json") in str(info.value)


@pytest.mark.parametrize("version", [0, 3, "2", None])
def test_load_wrong_format_version(saved, tmp_path, version):
    directory = copy_model(saved["shared"], tmp_path)
    edit_config(directory, format_version=version)
    with pytest.raises(ModelFileError, match="format version") as info:
        load(directory)
    assert str(directory / "config.json") in str(info.value)


def test_load_wrong_model_type(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    edit_config(directory, model_type="piade")
    with pytest.raises(ModelFileError, match="piade") as info:
        load(directory)
    assert str(directory / "config.json") in str(info.value)


def test_load_missing_stats(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    (directory / "stats.safetensors").unlink()
    with pytest.raises(ModelFileError) as info:
        load(directory)
    assert str(directory / "stats.safetensors") in str(info.value)


def test_load_corrupt_stats(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    path = directory / "stats.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFileError) as info:
        load(directory)
    assert str(path) in str(info.value)


def test_load_stats_with_wrong_shapes(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    path = directory / "stats.safetensors"
    tensors = load_torch(str(path))
    for field in ("mean", "projection"):  # level 4 as if it had 81 channels instead of 80
        t = tensors[f"image.4.{field}"]
        tensors[f"image.4.{field}"] = torch.cat([t, t[:, :1]], dim=1).contiguous()
    save_file(tensors, str(path))
    resign(directory)
    with pytest.raises(ModelFileError, match="level 4") as info:
        load(directory)
    assert str(directory) in str(info.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"backbone": "tf_efficientnet_lite2", "weights": "none"}, "level 3"),  # other channel counts
        ({"levels": [3, 4, 6]}, "image.6.mean"),  # no statistics for level 6
    ],
    ids=["other-backbone", "other-levels"],
)
def test_load_config_disagreeing_with_stats(saved, tmp_path, changes, message):
    directory = copy_model(saved["shared"], tmp_path)
    edit_config(directory, **changes)
    with pytest.raises(ModelFileError) as info:
        load(directory)
    assert str(directory) in str(info.value)
    assert message in str(info.value)


def test_load_per_location_at_another_image_size(saved, tmp_path):
    """Per-location statistics hold one Gaussian per feature-map position: 128 px has more positions."""
    directory = copy_model(saved["per-location"], tmp_path)
    edit_config(directory, image_size=128)
    with pytest.raises(ModelFileError, match="group") as info:
        load(directory)
    assert str(directory) in str(info.value)


def test_load_config_missing_a_key(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["levels"]
    (directory / "config.json").write_text(json.dumps(config))
    resign(directory)
    with pytest.raises(ModelFileError) as info:
        load(directory)
    assert str(directory) in str(info.value)


def test_load_config_rewritten_to_resnet18(saved, tmp_path):
    directory = copy_model(saved["shared"], tmp_path)
    edit_config(directory, backbone="resnet18", weights="none")
    with pytest.raises(ModelFileError) as info:
        load(directory)
    assert str(directory) in str(info.value)


# ---- saving is all or nothing ----------------------------------------------------------------------


def siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


def test_save_over_an_existing_model(fitted, tmp_path):
    directory = tmp_path / "model"
    fitted["shared"].save(directory)
    (directory / "notes.txt").write_text("a user's file")
    with pytest.raises(OutputError, match="not a gaussad model folder"):  # it is not only gaussad's any more
        fitted["per-location"].save(directory)
    assert (directory / "notes.txt").read_text() == "a user's file"
    (directory / "notes.txt").unlink()
    fitted["per-location"].save(directory)
    assert siblings(directory) == ["model"]
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "stats.safetensors"]
    assert load(directory).config["spatial"] == "per-location"


def test_save_unfitted_model_refused(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        make_model().save(tmp_path / "model")
    assert not (tmp_path / "model").exists()
