"""A deterministic synthetic anomaly-detection dataset in MVTec AD layout.

Three procedurally rendered categories, for the demo and the tests:

* ``weave``   texture, RGB:       plain-weave fabric; defects ``hole``, ``stain``, ``thread``.
* ``brushed`` texture, grayscale: brushed metal sheet; defects ``scratch``, ``dent``, ``crack``.
* ``hexnut``  object, RGB:        a hex nut on a matte table; defects ``scratch``,
  ``contamination``, ``missing``.

Normal images vary in lighting (gain and gradient), sensor noise, texture phase and
orientation, and object pose; defects range from obvious to small and low-contrast.
Every image has its own ``SeedSequence([seed, crc32(category), split, index])``, so one
seed writes byte-identical files and no image depends on how many others are written.
A defect's mask is exactly the pixels whose 8-bit values differ from the same image
rendered without the defect.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from gaussad.demo.defects import crack, dent, hole, missing, scratch, stain, thread
from gaussad.demo.scenes import Rng, Scene, brushed, grid, hexnut, weave
from gaussad.output_folders import check_output_folder

__all__ = ["DEMO_CATEGORIES", "write_demo_dataset"]


_RUST_AND_OIL = ([0.75, 0.42, 0.22], [0.35, 0.33, 0.30], [0.55, 0.5, 0.25])
_SPILLS = ([0.55, 0.4, 0.25], [0.3, 0.3, 0.3], [0.5, 0.55, 0.95])


@dataclass(frozen=True)
class _Category:
    render: Callable[[Rng, int], Scene]
    defects: dict[str, Callable[[Scene, Rng], Scene]]


_CATEGORIES: dict[str, _Category] = {
    "weave": _Category(
        weave, {"hole": hole, "stain": partial(stain, tints=_SPILLS), "thread": thread}
    ),
    "brushed": _Category(brushed, {"scratch": scratch, "dent": dent, "crack": crack}),
    "hexnut": _Category(
        hexnut,
        {
            "scratch": scratch,
            "contamination": partial(stain, tints=_RUST_AND_OIL),
            "missing": missing,
        },
    ),
}

DEMO_CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)


# --- writing -------------------------------------------------------------------------


def _camera(rng: Rng, size: int, channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """One image's exposure: gain, a linear brightness gradient, sensor noise and 8-bit
    quantisation, fixed so that a clean and a defective render get exactly the same."""
    y, x = (c / size * 2 - 1 for c in grid(size))
    gy, gx = rng.uniform(-0.08, 0.08, 2).tolist()
    light = (rng.uniform(0.9, 1.1) * (1 + gx * x + gy * y))[..., None]
    level = rng.uniform(0.006, 0.02)
    noise = level * rng.standard_normal((size, size, channels), dtype=np.float32).astype(np.float64)
    return lambda img: np.clip(np.rint((img * light + noise) * 255), 0, 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path) -> None:
    """Write a (H, W, 1) array as an 'L' PNG and a (H, W, 3) one as 'RGB'."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.save(path, compress_level=1)  # fast; the files are written once and read many times


def _fresh_dir(path: Path) -> Path:
    """Create ``path`` and delete the PNGs a previous run may have left in it."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.png"):
        old.unlink()
    return path


@dataclass(frozen=True)
class _Job:
    """One image to write, numbered by its folder (``split``) and its ``index`` in it."""

    category: str
    seed: int
    split: int
    index: int
    size: int
    image: Path
    defect: str | None
    mask: Path | None


def _category_jobs(
    root: Path, name: str, seed: int, counts: Sequence[int], size: int
) -> list[_Job]:
    """Prepare one category's folders and list the images to write into them."""
    n_train, n_test_good, n_test_per_defect = counts
    splits = [("train/good", None, n_train), ("test/good", None, n_test_good)]
    splits += [(f"test/{d}", d, n_test_per_defect) for d in _CATEGORIES[name].defects]
    jobs = []
    for split, (folder, defect, count) in enumerate(splits):
        images = _fresh_dir(root / name / folder)
        masks = _fresh_dir(root / name / "ground_truth" / defect) if defect else None
        for k in range(count):
            mask = masks / f"{k:03d}_mask.png" if masks else None
            jobs.append(_Job(name, seed, split, k, size, images / f"{k:03d}.png", defect, mask))
    return jobs


def _write_image(job: _Job) -> None:
    """Render and write one image (and its mask), from its own seed sequence."""
    category = _CATEGORIES[job.category]
    entropy = [job.seed, zlib.crc32(job.category.encode()), job.split, job.index]
    scene_rng, defect_rng, camera_rng = map(
        np.random.default_rng, np.random.SeedSequence(entropy).spawn(3)
    )
    scene = category.render(scene_rng, job.size)
    shoot = _camera(camera_rng, job.size, scene.fg.shape[-1])
    clean = shoot(scene.render())
    if job.defect is None:
        _save(clean, job.image)
        return
    mask = np.zeros((job.size, job.size), bool)
    while not mask.any():  # a defect that changes no 8-bit value is drawn again
        pixels = shoot(category.defects[job.defect](scene, defect_rng).render())
        mask = (pixels != clean).any(axis=-1)
    _save(pixels, job.image)
    _save(mask[..., None].astype(np.uint8) * 255, job.mask)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def write_demo_dataset(
    root: str | Path,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 60,
    n_test_good: int = 20,
    n_test_per_defect: int = 8,
    image_size: int = 256,
) -> list[str]:
    """Write the demo dataset under ``root`` in MVTec AD layout and return the category
    names written (all of ``DEMO_CATEGORIES`` by default).

    ``<root>/<category>/{train/good, test/good, test/<defect>}/NNN.png`` and
    ``<root>/<category>/ground_truth/<defect>/NNN_mask.png`` (mode 'L', 255 = defect).
    The same arguments write byte-identical files, and an image does not depend on the
    counts. PNGs already in the folders written to are deleted first, so ``root`` must be
    new, empty or a demo dataset gaussad wrote (OutputError otherwise, before anything is written).
    """
    if categories is None:
        categories = DEMO_CATEGORIES
    names = list(dict.fromkeys([categories] if isinstance(categories, str) else categories))
    unknown = [n for n in names if n not in _CATEGORIES]
    if unknown or not names:
        problem = f"unknown demo categories {unknown}" if unknown else "no demo categories given"
        raise ValueError(f"{problem}; valid ones are {list(DEMO_CATEGORIES)}")
    counts = (n_train, n_test_good, n_test_per_defect)
    for arg, value in zip(("n_train", "n_test_good", "n_test_per_defect"), counts):
        _check_int(arg, value, 1)
    _check_int("image_size", image_size, 32)
    _check_int("seed", seed, 0)
    # a dataset gets no marker file: a demo root is recognised by its category folders
    check_output_folder(root, "demo-data", adopt=lambda entries: set(entries) <= set(DEMO_CATEGORIES))
    jobs = [job for n in names for job in _category_jobs(Path(root), n, seed, counts, image_size)]
    with ThreadPoolExecutor() as pool:  # numpy, scipy and zlib release the GIL
        list(pool.map(_write_image, jobs))
    return names
