"""gaussad.data: indexing an MVTec-layout dataset, and one clear DatasetError per broken input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gaussad.data import DatasetError, ImageSet, list_categories, load_category, read_mask, read_rgb

# ---- a valid demo dataset --------------------------------------------------------------------------


@pytest.mark.parametrize("category", ["brushed", "weave"])
def test_load_demo_category(demo_root, demo_spec, category):
    cat = load_category(demo_root, category)
    defects = demo_spec["defects"][category]
    n_good, n_per_defect = demo_spec["n_test_good"], demo_spec["n_test_per_defect"]

    assert cat.name == category and cat.root == demo_root / category
    assert len(cat.train) == demo_spec["n_train"]
    assert all(p.parent == demo_root / category / "train" / "good" for p in cat.train.paths)
    assert cat.train.labels == (0,) * demo_spec["n_train"]
    assert cat.train.mask_paths == (None,) * demo_spec["n_train"]
    assert not cat.train.has_masks

    assert len(cat.test) == n_good + len(defects) * n_per_defect
    assert sum(cat.test.labels) == len(defects) * n_per_defect
    assert sorted(set(cat.test.defect_types)) == sorted(("good", *defects))
    for kind in ("good", *defects):
        assert cat.test.defect_types.count(kind) == (n_good if kind == "good" else n_per_defect)
    for path, label, kind, mask in zip(cat.test.paths, cat.test.labels, cat.test.defect_types, cat.test.mask_paths):
        assert path.parent.name == kind and path.is_file()
        assert label == (kind != "good")
        if kind == "good":
            assert mask is None
        else:
            assert mask == demo_root / category / "ground_truth" / kind / f"{path.stem}_mask.png"
            assert mask.is_file()
    assert cat.test.has_masks


def test_list_categories(demo_root):
    assert list_categories(demo_root) == ["brushed", "weave"]


def test_grayscale_images_load_as_rgb(demo_root):
    path = sorted((demo_root / "brushed" / "train" / "good").glob("*.png"))[0]
    with Image.open(path) as raw:
        assert raw.mode == "L"
        gray = np.asarray(raw)
    image = read_rgb(path)
    assert image.mode == "RGB" and image.size == gray.shape[::-1]
    pixels = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], gray)


def test_read_mask(demo_root):
    cat = load_category(demo_root, "weave", validate=False)
    index = cat.test.labels.index(1)
    mask_path = cat.test.mask_paths[index]
    with Image.open(mask_path) as raw:
        want = np.asarray(raw) == 255
    got = read_mask(mask_path, (96, 96))
    assert got.dtype == bool and got.any()
    np.testing.assert_array_equal(got, want)
    assert read_mask(None, (5, 3)).shape == (3, 5) and not read_mask(None, (5, 3)).any()


# ---- hand-made datasets ----------------------------------------------------------------------------


def write_png(path: Path, size=(32, 32), mode="RGB", value=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


def make_dataset(root: Path, category="widget", n_train=3, test=None, masks=True) -> Path:
    """<root>/<category> with train/good, test/good and test/<defect>, masks in ground_truth."""
    test = {"good": 2, "dent": 2} if test is None else test
    folder = root / category
    for i in range(n_train):
        write_png(folder / "train" / "good" / f"{i:03d}.png", seed=i)
    (folder / "train" / "good").mkdir(parents=True, exist_ok=True)
    for kind, count in test.items():
        for i in range(count):
            write_png(folder / "test" / kind / f"{i:03d}.png", seed=100 + i)
            if kind != "good" and masks:
                write_png(folder / "ground_truth" / kind / f"{i:03d}_mask.png", mode="L", value=255)
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def raises_naming(what, func, *args, **kwargs) -> str:
    """Call func, expect a DatasetError whose message names `what`; return the message."""
    with pytest.raises(DatasetError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert str(what) in message, message
    return message


def test_hand_made_dataset_loads(tmp_path):
    folder = make_dataset(tmp_path, test={"good": 2, "dent": 3, "scratch": 1})
    cat = load_category(tmp_path, "widget")
    assert len(cat.train) == 3 and len(cat.test) == 6
    assert cat.test.labels == (1, 1, 1, 0, 0, 1)  # defect folders in sorted order: dent, good, scratch
    assert cat.test.mask_paths[0] == folder / "ground_truth" / "dent" / "000_mask.png"
    assert cat.test.has_masks


def test_missing_root(tmp_path):
    root = tmp_path / "no_such_dataset"
    raises_naming(root, load_category, root, "widget")
    raises_naming(root, list_categories, root)


def test_root_without_categories(tmp_path):
    (tmp_path / "empty").mkdir()
    raises_naming(tmp_path / "empty", list_categories, tmp_path / "empty")


def test_missing_train_good(tmp_path):
    folder = make_dataset(tmp_path, n_train=0)
    (folder / "train" / "good").rmdir()
    (folder / "train" / "bad").mkdir()
    message = raises_naming(folder / "train" / "good", load_category, tmp_path, "widget")
    assert "missing" in message


def test_empty_train_good(tmp_path):
    folder = make_dataset(tmp_path, n_train=0)
    (folder / "train" / "good" / "readme.txt").write_text("no images here")
    message = raises_naming(folder / "train" / "good", load_category, tmp_path, "widget")
    assert "no training images" in message


def test_unknown_category_lists_available(tmp_path):
    make_dataset(tmp_path, category="widget")
    make_dataset(tmp_path, category="gadget")
    message = raises_naming("'gizmo'", load_category, tmp_path, "gizmo")
    assert "gadget" in message and "widget" in message


def test_missing_test_folder(tmp_path):
    folder = make_dataset(tmp_path, test={})
    raises_naming(folder / "test", load_category, tmp_path, "widget")


@pytest.mark.parametrize("where", ["train/good/001.png", "test/good/000.png", "test/dent/001.png"])
def test_truncated_png(tmp_path, where):
    folder = make_dataset(tmp_path)
    path = folder / where
    Image.open(path).verify()  # a valid PNG before we cut it
    truncate(path)
    raises_naming(path, load_category, tmp_path, "widget")


def test_truncated_mask(tmp_path):
    folder = make_dataset(tmp_path)
    mask = folder / "ground_truth" / "dent" / "001_mask.png"
    truncate(mask)
    raises_naming(mask, load_category, tmp_path, "widget")


@pytest.mark.parametrize("where", ["train/good/002.png", "test/dent/000.png"])
def test_non_image_with_png_suffix(tmp_path, where):
    folder = make_dataset(tmp_path)
    path = folder / where
    path.write_text("definitely not a PNG\n")
    raises_naming(path, load_category, tmp_path, "widget")
    raises_naming(path, read_rgb, path)


def test_missing_mask_while_ground_truth_folder_exists(tmp_path):
    folder = make_dataset(tmp_path)
    (folder / "ground_truth" / "dent" / "001_mask.png").unlink()
    image = folder / "test" / "dent" / "001.png"
    message = raises_naming(image, load_category, tmp_path, "widget", validate=False)
    assert "001_mask.png" in message


def test_mask_size_differs_from_image(tmp_path):
    folder = make_dataset(tmp_path)
    mask = write_png(folder / "ground_truth" / "dent" / "000_mask.png", size=(16, 32), mode="L", value=255)
    message = raises_naming(mask, load_category, tmp_path, "widget")
    assert str(folder / "test" / "dent" / "000.png") in message


def test_validate_false_skips_decoding(tmp_path):
    folder = make_dataset(tmp_path)
    truncate(folder / "train" / "good" / "000.png")
    assert len(load_category(tmp_path, "widget", validate=False).train) == 3


def test_dataset_without_ground_truth(tmp_path):
    make_dataset(tmp_path, test={"good": 2, "dent": 2, "scratch": 1}, masks=False)
    assert not (tmp_path / "widget" / "ground_truth").exists()
    cat = load_category(tmp_path, "widget")
    assert cat.test.mask_paths == (None,) * 5
    assert cat.test.labels.count(1) == 3
    assert not cat.test.has_masks


def test_has_masks_needs_every_defective_mask():
    paths = ("a.png", "b.png", "c.png")
    masks = (None, Path("b_mask.png"), None)
    assert not ImageSet(paths, (0, 1, 1), ("good", "x", "x"), masks).has_masks
    assert ImageSet(paths, (0, 1, 0), ("good", "x", "good"), masks).has_masks
    assert not ImageSet.from_paths(paths).has_masks  # no defective image: pixel metrics undefined
