"""Tests for the synthetic MVTec-layout demo dataset."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from gaussad import demo
from gaussad.demo import DEMO_CATEGORIES, write_demo_dataset

SMALL = dict(n_train=3, n_test_good=2, n_test_per_defect=2, image_size=64)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert write_demo_dataset(root, seed=0, **SMALL) == list(DEMO_CATEGORIES)
    return root


def test_categories_declared():
    assert len(DEMO_CATEGORIES) >= 3
    assert len(set(DEMO_CATEGORIES)) == len(DEMO_CATEGORIES)


def test_layout_is_mvtec(small_root):
    assert _names(small_root) == sorted(DEMO_CATEGORIES)
    for category in DEMO_CATEGORIES:
        base = small_root / category
        assert _names(base) == ["ground_truth", "test", "train"]
        assert _names(base / "train") == ["good"]
        assert _names(base / "train" / "good") == ["000.png", "001.png", "002.png"]
        defects = sorted(set(_names(base / "test")) - {"good"})
        assert len(defects) == 3
        assert _names(base / "test") == sorted(defects + ["good"])
        assert _names(base / "test" / "good") == ["000.png", "001.png"]
        assert _names(base / "ground_truth") == defects  # no ground truth for "good"
        for defect in defects:
            assert _names(base / "test" / defect) == ["000.png", "001.png"]
            assert _names(base / "ground_truth" / defect) == ["000_mask.png", "001_mask.png"]


def test_image_modes_and_masks_are_binary_connected_blobs(small_root):
    modes = {}
    for category in DEMO_CATEGORIES:
        images = sorted((small_root / category).glob("t*/*/*.png"))
        category_modes = {Image.open(p).mode for p in images}
        assert len(category_modes) == 1, category
        modes[category] = category_modes.pop()
        for image in images:
            assert Image.open(image).size == (64, 64)
            if image.parent.name == "good":
                continue
            truth = small_root / category / "ground_truth" / image.parent.name
            mask_path = truth / f"{image.stem}_mask.png"
            mask = Image.open(mask_path)
            assert mask.mode == "L" and mask.size == (64, 64)
            values = np.asarray(mask)
            assert set(np.unique(values)) == {0, 255}, mask_path
            assert (values == 255).mean() < 0.2, mask_path
            assert ndimage.label(values > 0, structure=np.ones((3, 3)))[1] == 1, mask_path
    assert list(modes.values()).count("L") == 1
    assert list(modes.values()).count("RGB") == len(DEMO_CATEGORIES) - 1


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_root):
    write_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    write_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    same, other = _files(tmp_path / "again"), _files(tmp_path / "other")
    assert same == _files(small_root)
    assert other.keys() == same.keys()
    assert all(other[k] != same[k] for k in same if not k.endswith("_mask.png"))


def test_images_do_not_depend_on_counts(tmp_path, small_root):
    few = dict(n_train=1, n_test_good=1, n_test_per_defect=1, image_size=64)
    assert write_demo_dataset(tmp_path, seed=0, categories=["brushed"], **few) == ["brushed"]
    assert _names(tmp_path) == ["brushed"]
    for path, data in _files(tmp_path).items():
        assert (small_root / path).read_bytes() == data


def test_rewrite_removes_stale_files(tmp_path):
    write_demo_dataset(tmp_path, categories="weave", **SMALL)
    fewer = {**SMALL, "n_train": 1, "n_test_per_defect": 1}
    write_demo_dataset(tmp_path, categories="weave", **fewer)
    assert _names(tmp_path / "weave" / "train" / "good") == ["000.png"]
    for folder in (tmp_path / "weave" / "ground_truth").iterdir():
        assert _names(folder) == ["000_mask.png"]


def test_unknown_category_raises(tmp_path):
    with pytest.raises(ValueError, match="carpet") as info:
        write_demo_dataset(tmp_path, categories=["weave", "carpet"])
    assert all(name in str(info.value) for name in DEMO_CATEGORIES)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="no demo categories"):
        write_demo_dataset(tmp_path, categories=[])


@pytest.mark.parametrize("arg", ["n_train", "n_test_good", "n_test_per_defect"])
@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_counts_must_be_positive_integers(tmp_path, arg, value):
    with pytest.raises(ValueError, match=arg):
        write_demo_dataset(tmp_path, **{**SMALL, arg: value})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_each_defect_alters_one_small_connected_region(category):
    spec = demo._CATEGORIES[category]
    for k, (defect, apply) in enumerate(spec.defects.items()):
        for index in range(5):
            seeds = np.random.SeedSequence([3, k, index]).spawn(2)
            scene_rng, defect_rng = map(np.random.default_rng, seeds)
            scene = spec.render(scene_rng, 128)
            altered = np.abs(apply(scene, defect_rng).render() - scene.render()).max(axis=-1) > 0
            assert 0 < altered.sum() < 0.05 * altered.size, defect
            assert ndimage.label(altered, structure=np.ones((3, 3)))[1] == 1, defect
