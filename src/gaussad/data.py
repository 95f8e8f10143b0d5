"""Datasets in MVTec AD layout, validated before any compute.

    <root>/<category>/train/good/*.png|jpg
    <root>/<category>/test/<defect type>/*        ("good" holds the normal test images)
    <root>/<category>/ground_truth/<defect type>/<name>_mask.png   (optional)

Every problem a user can cause ends in one `DatasetError` naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the path."""


@dataclass(frozen=True)
class ImageSet:
    """Images of one split with their labels (0 normal, 1 defective) and mask paths (or None)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    defect_types: tuple[str, ...]
    mask_paths: tuple[Path | None, ...]

    @classmethod
    def from_paths(cls, paths) -> "ImageSet":
        """Unlabelled images (e.g. for `predict`): all marked normal, no masks."""
        paths = tuple(Path(p) for p in paths)
        return cls(paths, (0,) * len(paths), (GOOD,) * len(paths), (None,) * len(paths))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_masks(self) -> bool:
        """True when every defective image has a mask (pixel metrics are then defined)."""
        defective = [m for m, y in zip(self.mask_paths, self.labels) if y == 1]
        return bool(defective) and all(m is not None for m in defective)

    def subset(self, indices) -> "ImageSet":
        pick = lambda seq: tuple(seq[i] for i in indices)  # noqa: E731
        return ImageSet(pick(self.paths), pick(self.labels), pick(self.defect_types), pick(self.mask_paths))


@dataclass(frozen=True)
class Category:
    name: str
    root: Path
    train: ImageSet
    test: ImageSet


def list_categories(root: str | Path) -> list[str]:
    """Category folders under a dataset root (those holding a train/ folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    names = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    if not names:
        raise DatasetError(f"no category under {root}: expected <category>/train/good/ folders (MVTec AD layout)")
    return names


def load_category(root: str | Path, category: str, validate: bool = True) -> Category:
    """Index one category; with `validate`, also open every image and mask before returning."""
    root = Path(root)
    available = list_categories(root)
    if category not in available:
        raise DatasetError(f"unknown category {category!r} in {root}; available: {', '.join(available)}")
    folder = root / category
    train = _train_split(folder)
    test = _test_split(folder)
    if validate:
        validate_images(train)
        validate_images(test)
    return Category(category, folder, train, test)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _train_split(folder: Path) -> ImageSet:
    good = folder / "train" / GOOD
    if not good.is_dir():
        raise DatasetError(f"missing folder {good}: training images go in train/good/")
    paths = _image_files(good)
    if not paths:
        raise DatasetError(f"no training images in {good} (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return ImageSet.from_paths(paths)


def _test_split(folder: Path) -> ImageSet:
    test = folder / "test"
    if not test.is_dir():
        raise DatasetError(f"missing folder {test}: test images go in test/good/ and test/<defect type>/")
    paths, labels, kinds, masks = [], [], [], []
    for kind_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        kind = kind_dir.name
        for path in _image_files(kind_dir):
            paths.append(path)
            labels.append(0 if kind == GOOD else 1)
            kinds.append(kind)
            masks.append(None if kind == GOOD else _mask_path(folder, kind, path))
    if not paths:
        raise DatasetError(f"no test images under {test}")
    return ImageSet(tuple(paths), tuple(labels), tuple(kinds), tuple(masks))


def _mask_path(folder: Path, kind: str, image: Path) -> Path | None:
    """The MVTec mask of a defective test image, or None if this dataset has no masks for it."""
    gt_dir = folder / "ground_truth" / kind
    if not gt_dir.is_dir():
        return None
    for suffix in (".png", image.suffix):
        candidate = gt_dir / f"{image.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    raise DatasetError(f"missing mask for {image}: expected {gt_dir / (image.stem + '_mask.png')}")


def validate_images(images: ImageSet) -> None:
    """Decode every image and mask fully; raise on the first unreadable file or size mismatch."""
    for path, mask in zip(images.paths, images.mask_paths):
        size = _decoded_size(path)
        if mask is not None and _decoded_size(mask) != size:
            raise DatasetError(f"mask {mask} is {_decoded_size(mask)} but its image {path} is {size}")


def _decoded_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: catches truncated files that open() alone accepts
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


def read_rgb(path: str | Path) -> Image.Image:
    """An image as RGB (grayscale is replicated to 3 channels), fully decoded."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


def read_mask(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """A mask as a bool H×W array resized (nearest) to `size` = (width, height); all False if None."""
    if path is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    try:
        with Image.open(path) as img:
            mask = img.convert("L").resize(size, Image.NEAREST)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read mask {path}: {err}") from None
    return np.asarray(mask) > 127
