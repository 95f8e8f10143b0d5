import numpy as np
import pytest
from PIL import Image

from gaussad.plots import save_overlay, save_roc_curve, save_score_histogram


def open_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert 200 <= png.width <= 2000 and 200 <= png.height <= 2000
        return png.size


def blob_image(height=96, width=128, gray=False):
    """A textured image with a bright blob, its mask, and a map that is high on the blob."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:height, :width]
    mask = (y - 40) ** 2 + (x - 70) ** 2 < 15**2
    image = (rng.integers(60, 120, (height, width)) + 100 * mask).astype(np.uint8)
    if not gray:
        image = np.stack([image, image // 2, 255 - image], axis=2)
    return image, mask


def test_roc_curve_writes_png_in_new_folder(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(100) < 0.4
    path = tmp_path / "new" / "roc.png"
    save_roc_curve(labels, rng.normal(size=100) + labels, path, "ROC")
    open_png(path)
    save_roc_curve(labels, rng.normal(size=100) + labels, path, "ROC", {"image_f1_optimal": 0.5})  # marked
    open_png(path)


def test_roc_curve_needs_both_classes(tmp_path):
    with pytest.raises(ValueError, match="both"):
        save_roc_curve([0, 0], [0.1, 0.2], tmp_path / "roc.png", "ROC")


@pytest.mark.parametrize("thresholds", [None, {"F1": 0.5, "99% normal": 1.2}])
def test_score_histogram_writes_png(tmp_path, thresholds):
    rng = np.random.default_rng(0)
    path = tmp_path / "hist.png"
    save_score_histogram(rng.normal(size=80), rng.normal(2, 1, 30), path, "scores", thresholds)
    open_png(path)


def test_score_histogram_accepts_no_defect_scores(tmp_path):
    path = tmp_path / "hist.png"
    save_score_histogram(np.random.default_rng(0).normal(size=50), [], path, "normal only")
    open_png(path)


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("map_size", [(96, 128), (24, 32)])
def test_overlay_writes_png(tmp_path, gray, map_size):
    image, mask = blob_image(gray=gray)
    small_mask = np.asarray(Image.fromarray(mask).resize(map_size[::-1]))
    anomaly_map = small_mask + 0.1 * np.random.default_rng(1).random(map_size)
    path = tmp_path / "sub" / "overlay.png"
    save_overlay(image, anomaly_map, path, "overlay", 0.0, 1.0, mask=mask, threshold=0.5)
    width, height = open_png(path)
    assert width > 2 * height  # three panels side by side


def test_overlay_without_mask_or_threshold_has_two_panels(tmp_path):
    image, mask = blob_image()
    path = tmp_path / "overlay.png"
    save_overlay(image, mask.astype(float), path, "overlay", 0.0, 1.0)
    width, height = open_png(path)
    assert height < width < 3 * height


def test_overlay_rejects_mask_of_wrong_size(tmp_path):
    image, mask = blob_image()
    with pytest.raises(ValueError, match="mask shape"):
        save_overlay(image, mask.astype(float), tmp_path / "o.png", "o", 0, 1, mask=mask[:10])


def test_overlay_colours_are_matplotlibs_jet():
    """The hand-drawn heat map's colours against matplotlib's "jet" map (within rounding)."""
    from matplotlib import colormaps

    from gaussad.plots import jet

    values = np.linspace(0, 1, 257)
    reference = colormaps["jet"].resampled(65536)(values)[:, :3] * 255  # finer than its 256-entry table
    assert np.abs(jet(values).astype(float) - reference).max() <= 1
