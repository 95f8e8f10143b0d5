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

import math
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from itertools import pairwise
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image
from scipy import ndimage
from skimage import draw

from gaussad.output_folders import check_output_folder

__all__ = ["DEMO_CATEGORIES", "write_demo_dataset"]

Rng = np.random.Generator


@dataclass(frozen=True)
class _Scene:
    """A clean render: surface ``fg`` composited over ``bg`` by ``alpha``."""

    fg: np.ndarray  # (H, W, C) surface colour in [0, 1]
    alpha: np.ndarray  # (H, W) coverage of fg over bg
    bg: np.ndarray  # (H, W, C) what shows where alpha < 1
    region: np.ndarray  # (H, W) bool: where surface defects may be placed

    def render(self) -> np.ndarray:
        a = self.alpha[..., None]
        return self.fg * a + self.bg * (1.0 - a)


def _texture(fg: np.ndarray) -> _Scene:
    """A scene that is all surface (a texture category)."""
    shape = fg.shape[:2]
    return _Scene(fg, np.ones(shape, np.float32), np.zeros_like(fg), np.ones(shape, bool))


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column coordinates, read-only float32 arrays of shape (size, size).

    Rendering is float32 throughout (scalars as Python floats, which keep it so): twice
    as fast as float64 and far finer than the 8-bit output."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _oriented_noise(rng: Rng, size: int, along: float, across: float, angle: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise, smoothed ``along`` px in direction ``angle``
    (radians, from the x axis) and ``across`` px across it; filtered in the Fourier domain."""
    fy = scipy.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = scipy.fft.rfftfreq(size).astype(np.float32)[None, :]
    f_along = fx * math.cos(angle) + fy * math.sin(angle)
    f_across = fy * math.cos(angle) - fx * math.sin(angle)
    gain = np.exp(-2 * math.pi**2 * ((along * f_along) ** 2 + (across * f_across) ** 2))
    noise = rng.standard_normal((size, size), dtype=np.float32)
    out = scipy.fft.irfft2(scipy.fft.rfft2(noise) * gain, s=(size, size))
    return (out - out.mean()) / (float(out.std()) + 1e-12)


# --- normal images -----------------------------------------------------------------


def _weave(rng: Rng, size: int) -> _Scene:
    """Plain-weave fabric: interlaced warp and weft yarns with per-yarn brightness, fibre
    texture, slight waviness, and a random phase and small angle."""
    y, x = _grid(size)
    period = size / 20 * rng.uniform(0.97, 1.03)
    t = rng.normal(0.0, 0.02)
    u = (x * math.cos(t) + y * math.sin(t)) / period + rng.uniform(0, 2)
    v = (y * math.cos(t) - x * math.sin(t)) / period + rng.uniform(0, 2)
    u += 0.08 * np.sin(2 * math.pi * v / rng.uniform(6, 10) + rng.uniform(0, 2 * math.pi))
    su, sv = np.sin(math.pi * (u % 1)), np.sin(math.pi * (v % 1))
    i, j = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    warp_gain, weft_gain = rng.normal(1.0, 0.07, (2, 64)).astype(np.float32)
    fibre_warp = _oriented_noise(rng, size, 0.06 * size, 0.8, t + math.pi / 2)
    fibre_weft = _oriented_noise(rng, size, 0.06 * size, 0.8, t)
    warp = warp_gain[i % 64] * np.sqrt(su) * (0.7 + 0.3 * sv) * (1 + 0.12 * fibre_warp)
    weft = weft_gain[j % 64] * np.sqrt(sv) * (0.7 + 0.3 * su) * (1 + 0.12 * fibre_weft)
    warp_on_top = (i + j) % 2 == 0
    lum = 0.15 + 0.85 * np.where(warp_on_top, warp, weft)
    colours = np.array([[0.62, 0.50, 0.36], [0.72, 0.62, 0.47]], np.float32) * rng.normal(1, 0.02)
    warp_colour, weft_colour = colours
    return _texture(np.where(warp_on_top[..., None], warp_colour, weft_colour) * lum[..., None])


def _brushed(rng: Rng, size: int) -> _Scene:
    """Brushed metal sheet (grayscale): long streaks in a slightly jittered direction,
    broad mottling, and a soft specular band in a random place."""
    y, x = _grid(size)
    angle = rng.normal(0.0, 0.03)
    streaks = _oriented_noise(rng, size, 0.25 * size, 0.6, angle)
    grain = _oriented_noise(rng, size, 0.04 * size, 1.5, angle)
    mottle = _oriented_noise(rng, size, 0.15 * size, 0.15 * size, 0.0)
    b = rng.uniform(0, math.pi)
    band = (x * math.cos(b) + y * math.sin(b)) / size - rng.uniform(-0.2, 1.2)
    sheen = np.exp(-(band**2) / (2 * rng.uniform(0.1, 0.25) ** 2))
    lum = rng.uniform(0.48, 0.55) + 0.04 * streaks + 0.025 * grain + 0.02 * mottle + 0.12 * sheen
    return _texture(lum[..., None])


def _hexnut(rng: Rng, size: int) -> _Scene:
    """A zinc-plated hex nut on a matte table with its shadow; pose jitter in position,
    rotation (about +-10 degrees) and scale."""
    y, x = _grid(size)
    dy = y - size * (0.5 + rng.uniform(-0.04, 0.04))
    dx = x - size * (0.5 + rng.uniform(-0.04, 0.04))
    theta = math.radians(rng.uniform(-10, 10))
    flats = size * 0.30 * rng.uniform(0.98, 1.02)  # half the width across flats
    rad, ang = np.hypot(dy, dx), np.arctan2(dy, dx)
    normals = [theta + k * math.pi / 3 for k in range(3)]
    hexdist = np.maximum.reduce([np.abs(dx * math.cos(n) + dy * math.sin(n)) for n in normals])
    hole, sink = 0.45 * flats, 0.62 * flats
    outline = np.clip(flats - hexdist + 0.5, 0, 1)
    alpha = outline * np.clip(rad - hole + 0.5, 0, 1)

    light = rng.uniform(-2.6, -2.0)  # light from the upper left
    lit = np.cos(ang - light)
    rings = ndimage.gaussian_filter1d(rng.standard_normal(2 * size, dtype=np.float32), 1.0)
    tool_marks = rings[rad.astype(np.int32)]  # concentric turning marks
    face = 0.74 + 0.03 * tool_marks + 0.06 * lit * rad / flats
    chamfer = 0.55 + 0.25 * lit
    countersink = (0.35 + 0.25 * (rad - hole) / (sink - hole)) * (0.9 - 0.1 * lit)
    lum = np.where(rad > 0.96 * flats, chamfer, np.where(rad < sink, countersink, face))
    lum += 0.015 * _oriented_noise(rng, size, 4.0, 1.0, rng.uniform(0, math.pi))
    zinc = np.array([0.86, 0.86, 0.80]) * rng.normal(1.0, 0.015, 3)  # with a white-balance jitter
    fg = lum[..., None] * zinc.astype(np.float32)

    table = 1 + 0.05 * _oriented_noise(rng, size, 1.5, 1.5, 0)
    table += 0.04 * _oriented_noise(rng, size, 20, 20, 0)
    offset = int(round(0.02 * size))
    shadow = ndimage.gaussian_filter(np.roll(outline, (offset, offset), axis=(0, 1)), 0.02 * size)
    bg = (table * (1 - 0.45 * shadow))[..., None] * np.array([0.30, 0.34, 0.31], np.float32)
    region = ndimage.binary_erosion(alpha >= 1, iterations=2)
    return _Scene(fg, alpha, bg, region)


# --- defects -------------------------------------------------------------------------


def _pick(rng: Rng, region: np.ndarray) -> tuple[int, int]:
    """A random pixel (row, col) inside ``region``."""
    flat = np.flatnonzero(region)
    return np.unravel_index(flat[rng.integers(flat.size)], region.shape)


def _largest_piece(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of ``mask & region`` (empty if that is)."""
    labels, count = ndimage.label(mask & region, structure=np.ones((3, 3)))
    if count == 0:
        return labels > 0
    return labels == 1 + np.argmax(np.bincount(labels.ravel())[1:])


def _blob(rng: Rng, shape: tuple[int, int], at: tuple[int, int], radius: float):
    """An irregular, elongated, star-shaped blob around ``at``; returns the mask and the
    relative radius (0 in the middle, 1 on the edge)."""
    y, x = np.ogrid[: shape[0], : shape[1]]
    rot, aspect = rng.uniform(0, math.pi), rng.uniform(1.0, 2.5)
    u = (x - at[1]) * math.cos(rot) + (y - at[0]) * math.sin(rot)
    v = ((y - at[0]) * math.cos(rot) - (x - at[1]) * math.sin(rot)) * aspect
    k = np.arange(2, 6)[:, None, None]
    phase = rng.uniform(0, 2 * math.pi, (4, 1, 1))
    wobble = rng.uniform(0, 0.12, (4, 1, 1)) * np.cos(k * np.arctan2(v, u) + phase)
    rel = np.hypot(u, v) / (radius * (1 + wobble.sum(axis=0)))
    return rel <= 1, rel


def _curve(rng: Rng, shape: tuple[int, int], at: tuple[int, int], length: float, width: int):
    """A gently bent quadratic Bezier stroke ``width`` px wide, centred near ``at``."""
    a = rng.uniform(0, 2 * math.pi)
    half = length / 2 * np.array([math.sin(a), math.cos(a)])
    bow = length * rng.uniform(-0.3, 0.3) * np.array([math.cos(a), -math.sin(a)])
    r0, c0, r1, c1, r2, c2 = np.rint([*(at - half), *(at + bow), *(at + half)]).astype(int)
    rr, cc = draw.bezier_curve(r0, c0, r1, c1, r2, c2, 1.0)
    return _stroke(shape, rr, cc, width)


def _stroke(shape: tuple[int, int], rr: np.ndarray, cc: np.ndarray, width: int) -> np.ndarray:
    """Mask of the pixels (rr, cc) that fall inside ``shape``, thickened to ``width`` px."""
    mask = np.zeros(shape, bool)
    inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    mask[rr[inside], cc[inside]] = True
    return ndimage.binary_dilation(mask, iterations=width - 1) if width > 1 else mask


def _hole(scene: _Scene, rng: Rng) -> _Scene:
    """A hole: an irregular dark gap where the backing shows through."""
    at = _pick(rng, scene.region)
    mask, _ = _blob(rng, scene.region.shape, at, rng.uniform(0.012, 0.08) * len(scene.region))
    mask = _largest_piece(mask, scene.region)
    opacity, backing = rng.uniform(0.5, 1.0), rng.uniform(0.03, 0.25)
    fg = scene.fg.copy()
    fg[mask] = (1 - opacity) * fg[mask] + opacity * backing
    return replace(scene, fg=fg)


def _stain(scene: _Scene, rng: Rng, tints: Sequence[Sequence[float]]) -> _Scene:
    """A discoloured blob, strongest in its middle, in one of ``tints`` (RGB multipliers)."""
    at = _pick(rng, scene.region)
    mask, rel = _blob(rng, scene.region.shape, at, rng.uniform(0.015, 0.1) * len(scene.region))
    mask = _largest_piece(mask, scene.region)
    tint = np.asarray(tints[rng.integers(len(tints))])
    weight = rng.uniform(0.15, 0.6) * (1 - 0.5 * rel[mask] ** 2)[:, None]
    fg = scene.fg.copy()
    fg[mask] *= 1 - weight * (1 - tint)
    return replace(scene, fg=fg)


def _thread(scene: _Scene, rng: Rng) -> _Scene:
    """A stray fibre: a thin curved strand of another colour lying on the surface."""
    length, width = rng.uniform(0.08, 0.4) * len(scene.region), int(rng.integers(1, 3))
    mask = _curve(rng, scene.region.shape, _pick(rng, scene.region), length, width)
    mask = _largest_piece(mask, scene.region)
    colours = np.array([[0.1, 0.1, 0.1], [0.92, 0.92, 0.9], [0.7, 0.15, 0.1], [0.15, 0.25, 0.6]])
    opacity = rng.uniform(0.4, 0.95)
    fg = scene.fg.copy()
    fg[mask] = (1 - opacity) * fg[mask] + opacity * colours[rng.integers(len(colours))]
    return replace(scene, fg=fg)


def _scratch(scene: _Scene, rng: Rng) -> _Scene:
    """A thin curved scratch, lighter or darker than the surface."""
    length, width = rng.uniform(0.06, 0.4) * len(scene.region), int(rng.integers(1, 4))
    mask = _curve(rng, scene.region.shape, _pick(rng, scene.region), length, width)
    mask = _largest_piece(mask, scene.region)
    fg = scene.fg.copy()
    fg[mask] += rng.choice([-1, 1]) * rng.uniform(0.05, 0.3)
    return replace(scene, fg=np.clip(fg, 0, 1))


def _dent(scene: _Scene, rng: Rng) -> _Scene:
    """A shallow dent: a blob with its grain smoothed away, shaded darker on one side."""
    at = _pick(rng, scene.region)
    radius = rng.uniform(0.012, 0.06) * len(scene.region)
    mask, _ = _blob(rng, scene.region.shape, at, radius)
    mask = _largest_piece(mask, scene.region)
    y, x = np.nonzero(mask)
    a = rng.uniform(0, 2 * math.pi)
    side = np.clip(((y - at[0]) * math.sin(a) + (x - at[1]) * math.cos(a)) / radius, -1, 1)
    smooth = ndimage.gaussian_filter(scene.fg, (2, 2, 0))
    fg = scene.fg.copy()
    fg[mask] = smooth[mask] * (1 - rng.uniform(0.08, 0.35) * (0.6 + 0.4 * side))[:, None]
    return replace(scene, fg=fg)


def _walk(rng: Rng, start: np.ndarray, heading: float, steps: int, step: float) -> np.ndarray:
    """A jagged random walk: ``steps + 1`` points (row, col) along a slowly turning heading."""
    turns = heading + np.cumsum(rng.normal(0, 0.15, steps)) + rng.normal(0, 0.6, steps)
    return np.vstack([start, start + np.cumsum(step * np.c_[np.sin(turns), np.cos(turns)], axis=0)])


def _crack(scene: _Scene, rng: Rng) -> _Scene:
    """A jagged dark crack, sometimes with a branch, of straight segments."""
    at, shape = _pick(rng, scene.region), scene.region.shape
    steps = int(rng.integers(10, 24))
    step = rng.uniform(0.1, 0.35) * len(scene.region) / steps
    heading = rng.uniform(0, 2 * math.pi)
    paths = [_walk(rng, np.array(at), heading, steps, step)]
    if rng.random() < 0.5:
        fork = paths[0][rng.integers(1, steps)]
        turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        paths.append(_walk(rng, fork, heading + turn, steps // 2, step))
    points = [np.rint(path).astype(int) for path in paths]
    segments = [draw.line(*p, *q) for path in points for p, q in pairwise(path)]
    rr, cc = np.concatenate(segments, axis=1)
    mask = _largest_piece(_stroke(shape, rr, cc, int(rng.integers(1, 3))), scene.region)
    fg = scene.fg.copy()
    fg[mask] *= 1 - rng.uniform(0.25, 0.7)
    return replace(scene, fg=fg)


def _missing(scene: _Scene, rng: Rng) -> _Scene:
    """A piece broken off the rim: the object's coverage drops to zero in a blob on its
    outline, showing the background."""
    edge = (scene.alpha > 0) & (scene.alpha < 1)
    cy, cx = ndimage.center_of_mass(scene.alpha)
    dist = np.hypot(*np.nonzero(edge) - np.array([[cy], [cx]]))
    rim = np.zeros_like(edge)
    rim[edge] = dist > 0.8 * dist.max()  # the outer outline, not the hole's
    chip, _ = _blob(rng, edge.shape, _pick(rng, rim), rng.uniform(0.03, 0.11) * len(edge))
    return replace(scene, alpha=np.where(chip, 0.0, scene.alpha))


_RUST_AND_OIL = ([0.75, 0.42, 0.22], [0.35, 0.33, 0.30], [0.55, 0.5, 0.25])
_SPILLS = ([0.55, 0.4, 0.25], [0.3, 0.3, 0.3], [0.5, 0.55, 0.95])


@dataclass(frozen=True)
class _Category:
    render: Callable[[Rng, int], _Scene]
    defects: dict[str, Callable[[_Scene, Rng], _Scene]]


_CATEGORIES: dict[str, _Category] = {
    "weave": _Category(
        _weave, {"hole": _hole, "stain": partial(_stain, tints=_SPILLS), "thread": _thread}
    ),
    "brushed": _Category(_brushed, {"scratch": _scratch, "dent": _dent, "crack": _crack}),
    "hexnut": _Category(
        _hexnut,
        {
            "scratch": _scratch,
            "contamination": partial(_stain, tints=_RUST_AND_OIL),
            "missing": _missing,
        },
    ),
}

DEMO_CATEGORIES: tuple[str, ...] = tuple(_CATEGORIES)


# --- writing -------------------------------------------------------------------------


def _camera(rng: Rng, size: int, channels: int) -> Callable[[np.ndarray], np.ndarray]:
    """One image's exposure: gain, a linear brightness gradient, sensor noise and 8-bit
    quantisation, fixed so that a clean and a defective render get exactly the same."""
    y, x = (c / size * 2 - 1 for c in _grid(size))
    gy, gx = rng.uniform(-0.08, 0.08, 2).tolist()
    light = (rng.uniform(0.9, 1.1) * (1 + gx * x + gy * y))[..., None]
    noise = rng.uniform(0.006, 0.02) * rng.standard_normal((size, size, channels), dtype=np.float32)
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
