"""The demo's normal images: each category's surface or object, rendered from a random generator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
from scipy import ndimage

Rng = np.random.Generator


@dataclass(frozen=True)
class Scene:
    """A clean render: surface ``fg`` composited over ``bg`` by ``alpha``."""

    fg: np.ndarray  # (H, W, C) surface colour in [0, 1]
    alpha: np.ndarray  # (H, W) coverage of fg over bg
    bg: np.ndarray  # (H, W, C) what shows where alpha < 1
    region: np.ndarray  # (H, W) bool: where surface defects may be placed

    def render(self) -> np.ndarray:
        a = self.alpha[..., None]
        return self.fg * a + self.bg * (1.0 - a)


def texture(fg: np.ndarray) -> Scene:
    """A scene that is all surface (a texture category)."""
    shape = fg.shape[:2]
    return Scene(fg, np.ones(shape), np.zeros_like(fg), np.ones(shape, bool))


@lru_cache(maxsize=4)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column coordinates, read-only float64 arrays of shape (size, size).

    Rendering is float64 throughout, so that the 8-bit images are the same bytes on every
    machine: in float32, numpy's AVX-512 and AVX2 code paths (exp, sin, ...) differ in the last
    bit often enough to move some pixels by one grey level, and data.dvc would not match."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def oriented_noise(rng: Rng, size: int, along: float, across: float, angle: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise, smoothed ``along`` px in direction ``angle``
    (radians, from the x axis) and ``across`` px across it; filtered in the Fourier domain."""
    fy = scipy.fft.fftfreq(size)[:, None]
    fx = scipy.fft.rfftfreq(size)[None, :]
    f_along = fx * math.cos(angle) + fy * math.sin(angle)
    f_across = fy * math.cos(angle) - fx * math.sin(angle)
    gain = np.exp(-2 * math.pi**2 * ((along * f_along) ** 2 + (across * f_across) ** 2))
    noise = rng.standard_normal((size, size), dtype=np.float32).astype(np.float64)  # the demo's draws are float32
    out = scipy.fft.irfft2(scipy.fft.rfft2(noise) * gain, s=(size, size))
    return (out - out.mean()) / (float(out.std()) + 1e-12)


def weave(rng: Rng, size: int) -> Scene:
    """Plain-weave fabric: interlaced warp and weft yarns with per-yarn brightness, fibre
    texture, slight waviness, and a random phase and small angle."""
    y, x = grid(size)
    period = size / 20 * rng.uniform(0.97, 1.03)
    t = rng.normal(0.0, 0.02)
    u = (x * math.cos(t) + y * math.sin(t)) / period + rng.uniform(0, 2)
    v = (y * math.cos(t) - x * math.sin(t)) / period + rng.uniform(0, 2)
    u += 0.08 * np.sin(2 * math.pi * v / rng.uniform(6, 10) + rng.uniform(0, 2 * math.pi))
    su, sv = np.sin(math.pi * (u % 1)), np.sin(math.pi * (v % 1))
    i, j = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    warp_gain, weft_gain = rng.normal(1.0, 0.07, (2, 64))
    fibre_warp = oriented_noise(rng, size, 0.06 * size, 0.8, t + math.pi / 2)
    fibre_weft = oriented_noise(rng, size, 0.06 * size, 0.8, t)
    warp = warp_gain[i % 64] * np.sqrt(su) * (0.7 + 0.3 * sv) * (1 + 0.12 * fibre_warp)
    weft = weft_gain[j % 64] * np.sqrt(sv) * (0.7 + 0.3 * su) * (1 + 0.12 * fibre_weft)
    warp_on_top = (i + j) % 2 == 0
    lum = 0.15 + 0.85 * np.where(warp_on_top, warp, weft)
    colours = np.array([[0.62, 0.50, 0.36], [0.72, 0.62, 0.47]]) * rng.normal(1, 0.02)
    warp_colour, weft_colour = colours
    return texture(np.where(warp_on_top[..., None], warp_colour, weft_colour) * lum[..., None])


def brushed(rng: Rng, size: int) -> Scene:
    """Brushed metal sheet (grayscale): long streaks in a slightly jittered direction,
    broad mottling, and a soft specular band in a random place."""
    y, x = grid(size)
    angle = rng.normal(0.0, 0.03)
    streaks = oriented_noise(rng, size, 0.25 * size, 0.6, angle)
    grain = oriented_noise(rng, size, 0.04 * size, 1.5, angle)
    mottle = oriented_noise(rng, size, 0.15 * size, 0.15 * size, 0.0)
    b = rng.uniform(0, math.pi)
    band = (x * math.cos(b) + y * math.sin(b)) / size - rng.uniform(-0.2, 1.2)
    sheen = np.exp(-(band**2) / (2 * rng.uniform(0.1, 0.25) ** 2))
    lum = rng.uniform(0.48, 0.55) + 0.04 * streaks + 0.025 * grain + 0.02 * mottle + 0.12 * sheen
    return texture(lum[..., None])


def hexnut(rng: Rng, size: int) -> Scene:
    """A zinc-plated hex nut on a matte table with its shadow; pose jitter in position,
    rotation (about +-10 degrees) and scale."""
    y, x = grid(size)
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
    rings = ndimage.gaussian_filter1d(rng.standard_normal(2 * size, dtype=np.float32).astype(np.float64), 1.0)
    tool_marks = rings[rad.astype(np.int32)]  # concentric turning marks
    face = 0.74 + 0.03 * tool_marks + 0.06 * lit * rad / flats
    chamfer = 0.55 + 0.25 * lit
    countersink = (0.35 + 0.25 * (rad - hole) / (sink - hole)) * (0.9 - 0.1 * lit)
    lum = np.where(rad > 0.96 * flats, chamfer, np.where(rad < sink, countersink, face))
    lum += 0.015 * oriented_noise(rng, size, 4.0, 1.0, rng.uniform(0, math.pi))
    zinc = np.array([0.86, 0.86, 0.80]) * rng.normal(1.0, 0.015, 3)  # with a white-balance jitter
    fg = lum[..., None] * zinc

    table = 1 + 0.05 * oriented_noise(rng, size, 1.5, 1.5, 0)
    table += 0.04 * oriented_noise(rng, size, 20, 20, 0)
    offset = int(round(0.02 * size))
    shadow = ndimage.gaussian_filter(np.roll(outline, (offset, offset), axis=(0, 1)), 0.02 * size)
    bg = (table * (1 - 0.45 * shadow))[..., None] * np.array([0.30, 0.34, 0.31])
    region = ndimage.binary_erosion(alpha >= 1, iterations=2)
    return Scene(fg, alpha, bg, region)
