"""Datasets in MVTec AD layout, validated before any compute.

    <root>/<category>/train/good/*.png|jpg
    <root>/<category>/test/<defect type>/*        ("good" holds the normal test images)
    <root>/<category>/ground_truth/<defect type>/<name>_mask.png   (optional)

Every problem a user can cause ends in one `DatasetError` naming the path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from gaussad.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Pillow's own warning bound (about 89 million pixels, e.g. 9459×9459): larger files are refused
# from their header, so a small file that decodes to gigabytes cannot exhaust the memory.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
_FLOAT_SLACK = 1e-3  # float images a rounding error outside [0, 1] are clipped, not refused
GOOD = "good"
# pixel modes Pillow converts to 8-bit RGB itself (16-bit, 32-bit and float ones are scaled by to_rgb8)
_PIL_CONVERTIBLE = ("RGB", "L", "P", "1", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La")


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


def load_category(root: str | Path, category: str, validate: bool = True, needs_test: bool = True) -> Category:
    """Index one category; with `validate`, also open every image and mask before returning.
    Without `needs_test`, a category with no test/ folder has an empty test split (fitting needs
    only the defect-free training images)."""
    root = Path(root)
    available = list_categories(root)
    if category not in available:
        raise DatasetError(f"unknown category {category!r} in {root}; available: {', '.join(available)}")
    folder = root / category
    train = _train_split(folder)
    test = _test_split(folder) if needs_test or (folder / "test").exists() else ImageSet((), (), (), ())
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
    """Check every image and mask before any compute, without decoding their pixels (they are decoded
    once, where they are used): each opens as an image of at most MAX_IMAGE_PIXELS in a pixel mode
    gaussad reads; a PNG's chunks are all there with their checksums right (so a truncated or damaged
    PNG fails here); a mask has its image's size. A file that fails when it is decoded later (a
    damaged JPEG, float pixels outside [0, 1]) raises the same DatasetError naming it."""
    for path, mask in zip(images.paths, images.mask_paths):
        size = _checked_size(path)
        if mask is not None and _checked_size(mask, "mask") != size:
            raise DatasetError(f"mask {mask} is {_checked_size(mask, 'mask')} but its image {path} is {size}")


def _checked_size(path: Path, kind: str = "image") -> tuple[int, int]:
    with open_image(path, kind=kind, decode=False) as img:
        if img.mode not in _PIL_CONVERTIBLE and img.mode != "F" and not img.mode.startswith("I"):
            raise DatasetError(f"{kind} {path} has the pixel mode {img.mode!r}, which gaussad cannot read")
        img.verify()  # PNG: every chunk read and its CRC checked, nothing inflated
        return img.size


@contextmanager
def open_image(source: str | Path | BinaryIO, name: str | None = None, kind: str = "image",
               decode: bool = True) -> Iterator[Image.Image]:
    """An image file (a path, or a binary file of encoded bytes named `name`) fully decoded (or, with
    `decode` False, only opened). DatasetError names it (as an image, or a mask: `kind`) when it
    cannot be read or is larger than MAX_IMAGE_PIXELS."""
    name = name or str(source)
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:  # checked from the header, before any decoding
                raise DatasetError(f"{kind} {name} is {width}×{height} pixels, more than the "
                                   f"{MAX_IMAGE_PIXELS / 1e6:.0f} million gaussad decodes (a decompression bomb?)")
            if decode:
                img.load()  # a full decode: catches truncated files that open() alone accepts
            yield img
    except Image.DecompressionBombError as err:  # Pillow's own bound (twice ours), checked in open()
        raise DatasetError(f"{kind} {name} is more than the {MAX_IMAGE_PIXELS / 1e6:.0f} million pixels gaussad "
                           f"decodes (a decompression bomb?): {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"cannot read {kind} {name}: {err}") from None


def to_rgb8(img: Image.Image, name: str | Path, kind: str = "image") -> Image.Image:
    """An image of any mode as 8-bit RGB, scaled by its real range: 16-bit and 32-bit integer pixels
    by 65535 (0..65535 -> 0..255), float pixels taken as [0, 1]; grayscale is replicated to 3
    channels, alpha dropped, CMYK, palette and bilevel images converted."""
    if img.mode in _PIL_CONVERTIBLE:
        return img.convert("RGB")
    pixels = np.asarray(img)
    if img.mode == "F":
        gray = unit_to_uint8(pixels.astype(np.float64), f"float {kind} {name}")
    elif img.mode.startswith("I"):  # I;16, I;16B, ... and I (32-bit, how some files hold 16-bit data)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise DatasetError(f"{kind} {name} has integer values in [{low}, {high}], outside the 16-bit range")
        gray = unit_to_uint8(pixels / 65535.0, f"{kind} {name}")
    else:
        raise DatasetError(f"{kind} {name} has the pixel mode {img.mode!r}, which gaussad cannot read")
    return Image.fromarray(gray, mode="L").convert("RGB")


def unit_to_uint8(unit: np.ndarray, what: str) -> np.ndarray:
    """Intensities in [0, 1] as uint8 0..255; DatasetError naming `what` for NaN, infinities or values
    outside [0, 1] (beyond a rounding slack, which is clipped)."""
    if not np.isfinite(unit).all():
        raise DatasetError(f"{what} holds NaN or infinite values")
    low, high = float(unit.min()), float(unit.max())
    if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
        raise DatasetError(f"{what} has values in [{low:.4g}, {high:.4g}]: gaussad takes such values in [0, 1]; "
                           f"rescale it, or save it as 8- or 16-bit")
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB (see to_rgb8), fully decoded."""
    with open_image(path) as img:
        return to_rgb8(img, path)


def read_mask(path: str | Path | None, size: tuple[int, int]) -> np.ndarray:
    """A mask as a bool H×W array resized (nearest) to `size` = (width, height); all False if None.
    A pixel is defective when it is above half the range of the mask's bit depth."""
    if path is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    with open_image(path, kind="mask") as img:
        mask = to_rgb8(img, path, kind="mask").convert("L").resize(size, Image.NEAREST)
    return np.asarray(mask) > 127
