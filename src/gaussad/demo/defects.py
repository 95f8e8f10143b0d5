"""The demo's defects: each draws one on a clean scene and returns the changed scene."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import pairwise
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage import draw

from gaussad.demo.scenes import Rng, Scene


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


def hole(scene: Scene, rng: Rng) -> Scene:
    """A hole: an irregular dark gap where the backing shows through."""
    at = _pick(rng, scene.region)
    mask, _ = _blob(rng, scene.region.shape, at, rng.uniform(0.012, 0.08) * len(scene.region))
    mask = _largest_piece(mask, scene.region)
    opacity, backing = rng.uniform(0.5, 1.0), rng.uniform(0.03, 0.25)
    fg = scene.fg.copy()
    fg[mask] = (1 - opacity) * fg[mask] + opacity * backing
    return replace(scene, fg=fg)


def stain(scene: Scene, rng: Rng, tints: Sequence[Sequence[float]]) -> Scene:
    """A discoloured blob, strongest in its middle, in one of ``tints`` (RGB multipliers)."""
    at = _pick(rng, scene.region)
    mask, rel = _blob(rng, scene.region.shape, at, rng.uniform(0.015, 0.1) * len(scene.region))
    mask = _largest_piece(mask, scene.region)
    tint = np.asarray(tints[rng.integers(len(tints))])
    weight = rng.uniform(0.15, 0.6) * (1 - 0.5 * rel[mask] ** 2)[:, None]
    fg = scene.fg.copy()
    fg[mask] *= 1 - weight * (1 - tint)
    return replace(scene, fg=fg)


def thread(scene: Scene, rng: Rng) -> Scene:
    """A stray fibre: a thin curved strand of another colour lying on the surface."""
    length, width = rng.uniform(0.08, 0.4) * len(scene.region), int(rng.integers(1, 3))
    mask = _curve(rng, scene.region.shape, _pick(rng, scene.region), length, width)
    mask = _largest_piece(mask, scene.region)
    colours = np.array([[0.1, 0.1, 0.1], [0.92, 0.92, 0.9], [0.7, 0.15, 0.1], [0.15, 0.25, 0.6]])
    opacity = rng.uniform(0.4, 0.95)
    fg = scene.fg.copy()
    fg[mask] = (1 - opacity) * fg[mask] + opacity * colours[rng.integers(len(colours))]
    return replace(scene, fg=fg)


def scratch(scene: Scene, rng: Rng) -> Scene:
    """A thin curved scratch, lighter or darker than the surface."""
    length, width = rng.uniform(0.06, 0.4) * len(scene.region), int(rng.integers(1, 4))
    mask = _curve(rng, scene.region.shape, _pick(rng, scene.region), length, width)
    mask = _largest_piece(mask, scene.region)
    fg = scene.fg.copy()
    fg[mask] += rng.choice([-1, 1]) * rng.uniform(0.05, 0.3)
    return replace(scene, fg=np.clip(fg, 0, 1))


def dent(scene: Scene, rng: Rng) -> Scene:
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


def crack(scene: Scene, rng: Rng) -> Scene:
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


def missing(scene: Scene, rng: Rng) -> Scene:
    """A piece broken off the rim: the object's coverage drops to zero in a blob on its
    outline, showing the background."""
    edge = (scene.alpha > 0) & (scene.alpha < 1)
    cy, cx = ndimage.center_of_mass(scene.alpha)
    dist = np.hypot(*np.nonzero(edge) - np.array([[cy], [cx]]))
    rim = np.zeros_like(edge)
    rim[edge] = dist > 0.8 * dist.max()  # the outer outline, not the hole's
    chip, _ = _blob(rng, edge.shape, _pick(rng, rim), rng.uniform(0.03, 0.11) * len(edge))
    return replace(scene, alpha=np.where(chip, 0.0, scene.alpha))
