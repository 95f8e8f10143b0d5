"""GaussianAD's scoring options, each against an independent reference: smoothed maps
(scipy.ndimage.gaussian_filter), the map-max and combined image scores (NumPy on the parts), pixel
levels chosen apart from image levels, stacked per-location ridge Gaussians (PaDiM's, in NumPy),
channel subsets, the second map Gaussian; and saved models score the same when loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from gaussad.base_detector import split_holdout
from gaussad.data import load_category
from gaussad.gaussian import GaussianAD
from gaussad.gaussian.pixel_inputs import choose_channels
from gaussad.model_folder import model_digest
from gaussad.networks import LITE0_PACKAGE

SIZE = 64


def make_model(**settings) -> GaussianAD:
    base = dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, levels=(3, 4), image_size=SIZE,
                device="cpu", progress=False, batch_size=8)
    if settings.get("image_score") == "map-max" and "pixel_levels" in settings:
        del base["levels"]  # without effect then, and so refused
    return GaussianAD(**{**base, **settings})


@pytest.fixture(scope="module")
def category(demo_root):
    return load_category(demo_root, "weave")


@pytest.fixture(scope="module")
def models(category):
    """The same fit, scored five ways."""
    options = {"raw": {}, "smoothed": {"smoothing": 4}, "map-max": {"image_score": "map-max", "smoothing": 4},
               "combined": {"image_score": "combined", "smoothing": 4}, "fine-pixels": {"pixel_levels": (2,)}}
    return {name: make_model(**settings).fit(category.train) for name, settings in options.items()}


@pytest.fixture(scope="module")
def scores(models, category):
    return {name: model.score(category.test) for name, model in models.items()}


def test_smoothed_maps_are_the_raw_maps_filtered(scores):
    raw, smoothed = scores["raw"].maps, scores["smoothed"].maps
    reference = np.stack([gaussian_filter(m.astype(np.float64), 4, mode="mirror", truncate=4.0) for m in raw])
    np.testing.assert_allclose(smoothed, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scores["smoothed"].image, scores["raw"].image)  # pooled: the map plays no part


def test_map_max_is_the_maximum_of_the_smoothed_map(scores):
    expected = scores["smoothed"].maps.reshape(len(scores["smoothed"].maps), -1).max(1)
    np.testing.assert_allclose(scores["map-max"].image, expected, rtol=1e-6)
    np.testing.assert_array_equal(scores["map-max"].maps, scores["smoothed"].maps)


def test_combined_standardises_both_parts_by_the_held_out_normal_images(models, category, scores):
    """Reference: the held-out rows scored by the pooled and the map-max models of the same fit;
    mean and sample standard deviation in NumPy."""
    _, held = split_holdout(len(category.train), 0.1, seed=0)
    held_paths = [category.train.paths[i] for i in held]
    pooled, peak = models["smoothed"].score(held_paths).image, models["map-max"].score(held_paths).image
    expected = ((scores["smoothed"].image - pooled.mean()) / pooled.std(ddof=1)
                + (scores["map-max"].image - peak.mean()) / peak.std(ddof=1))
    np.testing.assert_allclose(scores["combined"].image, expected, rtol=1e-5, atol=1e-6)
    normal = models["combined"].score(held_paths).image
    assert abs(normal.mean()) < 1e-6  # by construction: the held-out images centre each part


def test_pixel_levels_apart_from_image_levels(scores, category):
    """The map from level 2 only, the image score from levels 3 and 4 as before."""
    np.testing.assert_array_equal(scores["fine-pixels"].image, scores["raw"].image)
    level_2 = make_model(levels=(2,)).fit(category.train).score(category.test)
    np.testing.assert_array_equal(scores["fine-pixels"].maps, level_2.maps)


@pytest.mark.parametrize("name", ["smoothed", "map-max", "combined", "fine-pixels"])
def test_saved_and_loaded_models_score_the_same(models, scores, category, name, tmp_path):
    loaded = GaussianAD.load(models[name].save(tmp_path / name), device="cpu", progress=False)
    assert loaded.config == models[name].config
    again = loaded.score(category.test)
    np.testing.assert_array_equal(again.image, scores[name].image)
    np.testing.assert_array_equal(again.maps, scores[name].maps)


def test_folders_saved_before_the_options_keep_their_meaning(models, scores, category, tmp_path):
    """A folder whose config lacks image_score, pixel_levels and smoothing (saved by an older
    gaussad) loads as the paper's scoring: pooled, the map from `levels`, no smoothing."""
    folder = models["raw"].save(tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    for key in ("image_score", "pixel_levels", "smoothing", "digest"):
        config.pop(key)
    digest = model_digest(config, folder / "stats.safetensors")
    (folder / "config.json").write_text(json.dumps({**config, "digest": digest}))
    loaded = GaussianAD.load(folder, device="cpu", progress=False)
    assert (loaded.config["image_score"], loaded.config["pixel_levels"], loaded.config["smoothing"]) == \
        ("pooled", [3, 4], 0.0)
    np.testing.assert_array_equal(loaded.score(category.test).maps, scores["raw"].maps)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="unknown image_score 'mean': use one of pooled, map-max, combined"):
        make_model(image_score="mean")
    with pytest.raises(ValueError, match="smoothing must be at least 0, got -1"):
        make_model(smoothing=-1)


# ---- stacked per-location Gaussians, local averaging, ridge covariance ---------------------------------

@pytest.mark.parametrize("channels", [None, 24])
def test_stacked_ridge_model_is_padims_gaussian_per_location(category, channels):
    """Reference in NumPy on the model's own features: levels 2 and 3, each 3×3 averaged (as
    PatchCore does), level 3 nearest-upsampled to level 2's grid, concatenated (with `channels`,
    the model's random subset of them, as PaDiM); at each position the mean and the biased
    covariance + εI of the training images, then the Mahalanobis distance of each test position."""
    settings = dict(pixel_levels=(2, 3), spatial="stacked", local_average=3, reduction="none",
                    covariance="ridge", ridge=0.01, pixel_channels=channels)
    model = make_model(**settings).fit(category.train, holdout=0)
    subset = slice(None)
    if channels is not None:  # 24 distinct channels of the 64 stacked ones, from both levels
        subset = model.channel_subsets["stacked"].numpy()
        assert len(set(subset)) == 24 and subset.min() < 24 <= subset.max() < 64
    train = np.stack([_stacked_numpy(model, p)[subset] for p in category.train.paths])  # [N, D, h, w]
    test_path = category.test.paths[-1]
    test = _stacked_numpy(model, test_path)[subset]
    n, d, h, w = train.shape
    expected = np.empty((h, w))
    for i in range(h):
        for j in range(w):
            x = train[:, :, i, j]
            mean = x.mean(0)
            cov = (x - mean).T @ (x - mean) / n + 0.01 * np.eye(d)
            diff = test[:, i, j] - mean
            expected[i, j] = np.sqrt(diff @ np.linalg.solve(cov, diff))
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(expected)[None, None].float(), size=(SIZE, SIZE),
                                                mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(model.score([test_path]).maps[0], upsampled, rtol=2e-3, atol=2e-3)
    assert model.pixel_gaussians["stacked"].mean.shape == (h * w, d)


def _stacked_numpy(model: GaussianAD, path) -> np.ndarray:
    """Level 2 and level 3 features of one image, each 3×3 averaged (borders: the positions that
    exist), level 3 repeated to level 2's grid, concatenated; by hand."""
    from gaussad.data import read_rgb
    from gaussad.features import to_tensor

    feats = model.backbone.extract(to_tensor(read_rgb(path), SIZE)[None])
    fine, coarse = (_average_3x3(feats[level][0].double().numpy()) for level in (2, 3))
    rows = np.arange(fine.shape[1]) * coarse.shape[1] // fine.shape[1]  # nearest: floor(i · scale)
    cols = np.arange(fine.shape[2]) * coarse.shape[2] // fine.shape[2]
    return np.concatenate([fine, coarse[:, rows][:, :, cols]])


def _average_3x3(x: np.ndarray) -> np.ndarray:
    averaged = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            averaged[:, i, j] = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean((1, 2))
    return averaged


@pytest.mark.parametrize("spatial, channels, weights", [("stacked", None, "box"), ("per-location", None, "box"),
                                                        ("stacked", 24, "binomial"), ("per-location", 30, "binomial")])
def test_stacked_and_ridge_models_save_and_load(category, spatial, channels, weights, tmp_path):
    model = make_model(pixel_levels=(2, 3), spatial=spatial, local_average=3, covariance="ridge",
                       pixel_channels=channels, local_weights=weights).fit(category.train)
    if channels is not None:  # per level, a subset where the level is wider (level 2 has 24 channels)
        widths = {key: g.mean.shape[1] for key, g in model.pixel_gaussians.items()}
        assert widths == ({"stacked": 24} if spatial == "stacked" else {2: 24, 3: 30})
    loaded = GaussianAD.load(model.save(tmp_path / "m"), device="cpu", progress=False)
    before, after = model.score(category.test.paths[:4]), loaded.score(category.test.paths[:4])
    np.testing.assert_array_equal(before.image, after.image)
    np.testing.assert_array_equal(before.maps, after.maps)


def test_channel_subsets_are_seeded():
    """The same seed picks the same channels, another seed others."""
    models = [make_model(pixel_levels=(2, 3), spatial="stacked", pixel_channels=24, seed=seed) for seed in (0, 0, 1)]
    first, again, other = (choose_channels(m.config, m.backbone.channels())["stacked"] for m in models)
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="pixel_channels must be at least 1, got 0"):
        make_model(pixel_channels=0)


def test_even_local_average_is_refused():
    with pytest.raises(ValueError, match="local_average must be odd"):
        make_model(local_average=2)
    with pytest.raises(ValueError, match="map_local_average must be odd"):
        make_model(spatial="stacked", image_score="map-max", map_local_average=2)


@pytest.mark.parametrize("spatial, image_score", [("per-location", "map-max"), ("stacked", "pooled")])
def test_a_second_map_gaussian_needs_the_stacked_map_max_model(spatial, image_score):
    with pytest.raises(ValueError, match=f"map_local_average needs spatial 'stacked' and image_score 'map-max', "
                                         f"got spatial '{spatial}', image_score '{image_score}'"):
        make_model(spatial=spatial, image_score=image_score, map_local_average=1)


def test_the_second_map_gaussian_is_a_second_model_averaged_into_the_map(category, tmp_path):
    """Reference: two one-Gaussian models fitted apart, with the two local averages: the anomaly map
    is the mean of their maps, the image score the first one's (its map's maximum); the second
    Gaussian is on the same channels. Saved and loaded, the model scores the same."""
    settings = dict(pixel_levels=(2, 3), spatial="stacked", local_average=3, local_weights="binomial",
                    pixel_channels=24, covariance="ridge", ridge=0.1, image_score="map-max", smoothing=2)
    model = make_model(**settings, map_local_average=1).fit(category.train)
    first = make_model(**settings).fit(category.train)
    second = make_model(**{**settings, "local_average": 1, "local_weights": "box"}).fit(category.train)  # no average
    paths = category.test.paths[:6]
    scores, want_first, want_second = (m.score(paths) for m in (model, first, second))
    np.testing.assert_allclose(scores.maps, (want_first.maps + want_second.maps) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.image, want_first.image, rtol=1e-6)
    np.testing.assert_allclose(scores.image, want_first.maps.reshape(len(paths), -1).max(1), rtol=1e-6)
    assert not np.allclose(want_first.maps, want_second.maps, rtol=1e-2)  # the average changes the map
    assert torch.equal(model.channel_subsets["stacked"], first.channel_subsets["stacked"])
    assert set(model.pixel_gaussians) == {"stacked", "stacked-map"}
    # the thresholds come from the held-out images' scores of the two-Gaussian model
    assert model.thresholds["pixel_normal_quantile"] != first.thresholds["pixel_normal_quantile"]
    assert model.thresholds["image_normal_quantile"] == pytest.approx(first.thresholds["image_normal_quantile"])

    loaded = GaussianAD.load(model.save(tmp_path / "m"), device="cpu", progress=False)
    again = loaded.score(paths)
    np.testing.assert_array_equal(again.image, scores.image)
    np.testing.assert_array_equal(again.maps, scores.maps)
    assert loaded.config["map_local_average"] == 1
