"""Operations on feature maps and anomaly maps that the Gaussian detector composes.

    local_average(feats, k)   each position's features averaged over its k×k neighbourhood (box or binomial)
    stack_levels(maps)        feature maps of several levels at the finest one's size, concatenated
    split_channels(subset, widths)  a subset of stacked channels as each level's own channels
    map_operator(h, S, sigma) the matrix A that upsamples an h×h map d to S×S (bilinear) and smooths it
                              (σ in pixels) as A @ d @ Aᵀ, as F.interpolate and then
                              scipy.ndimage.gaussian_filter(mode="mirror", truncate=4) compute it
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

TRUNCATE = 4.0  # the kernel reaches 4σ on each side (scipy's default)


LOCAL_WEIGHTS = ("box", "binomial")


def local_average(feats_nchw: torch.Tensor, size: int, weights: str = "box") -> torch.Tensor:
    """Features averaged over each position's size×size neighbourhood (size odd; 1 = unchanged);
    at the borders over the positions that exist. `box`: every position alike; `binomial`: weights
    C(size-1, i)·C(size-1, j), the centre counting most (3×3: 1 2 1 / 2 4 2 / 1 2 1), which blurs
    thin defects less."""
    if size <= 1:
        return feats_nchw
    if weights == "box":
        return F.avg_pool2d(feats_nchw, size, stride=1, padding=size // 2, count_include_pad=False)
    # int(): while export traces, sizes may be tensors; the kernel and the border weights must be
    # the cached constants, not traced computations
    channels, height, width = (int(side) for side in feats_nchw.shape[1:])
    kernel = _binomial_kernel(size).to(feats_nchw.device, feats_nchw.dtype)
    weighted = F.conv2d(F.pad(feats_nchw, (size // 2,) * 4), kernel.expand(channels, 1, size, size), groups=channels)
    return weighted / _weights_present(height, width, size).to(feats_nchw.device, feats_nchw.dtype)


@lru_cache(maxsize=8)
def _binomial_kernel(size: int) -> torch.Tensor:
    """[size, size] float64: C(size-1, i)·C(size-1, j)."""
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    return row[:, None] * row[None, :]


@lru_cache(maxsize=32)
def _weights_present(height: int, width: int, size: int) -> torch.Tensor:
    """[height, width] float64: the sum of the binomial weights inside the map at each position."""
    ones = F.pad(torch.ones(1, 1, height, width, dtype=torch.float64), (size // 2,) * 4)
    return F.conv2d(ones, _binomial_kernel(size)[None, None])[0, 0]


def stack_levels(feats_nchw: list[torch.Tensor]) -> torch.Tensor:
    """[n, ΣC, H, W]: the maps resized (nearest, as PaDiM) to the largest one's H×W and concatenated."""
    size = max((f.shape[-2:] for f in feats_nchw), key=lambda hw: hw[0] * hw[1])
    return torch.cat([_nearest(f, tuple(size)) for f in feats_nchw], 1)


def _nearest(feats_nchw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resizing to `size`; by an integer factor, each value repeated in place
    (what F.interpolate's "nearest" gives then, 4x faster on the CPU)."""
    n, c, h, w = feats_nchw.shape
    if (h, w) == size:
        return feats_nchw
    if size[0] % h or size[1] % w:
        return F.interpolate(feats_nchw, size=size, mode="nearest")
    fh, fw = size[0] // h, size[1] // w
    return feats_nchw[:, :, :, None, :, None].expand(n, c, h, fh, w, fw).reshape(n, c, *size)


def split_channels(subset: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """Indices `subset` into channels stacked from maps of `widths` channels, as each map's own
    channel indices: the same channels, taken before stacking."""
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    chosen = subset.tolist()  # the model's constant: an exported graph gets the indices as constants
    return [torch.tensor([i - start for i in chosen if start <= i < start + width], dtype=torch.long)
            for start, width in zip(offsets, widths)]


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of σ `sigma`, radius round(4σ), in float64."""
    radius = int(TRUNCATE * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (k / sigma) ** 2)
    return kernel / kernel.sum()


@lru_cache(maxsize=32)
def map_operator(size: int, out_size: int, sigma: float) -> torch.Tensor:
    """[out_size, size] float64 A such that A @ d @ Aᵀ is a size×size map d upsampled bilinearly
    (F.interpolate, align_corners=False) to out_size and then smoothed with σ `sigma` (0: not),
    both are linear and separable, so two small matrix products replace the interpolation and the
    convolutions (a 17-tap convolution of 224 px maps cost 3 ms an image)."""
    eye = torch.eye(size, dtype=torch.float64)[None, None]
    upsample = F.interpolate(eye, size=(out_size, size), mode="bilinear", align_corners=False)[0, 0]
    if sigma <= 0:
        return upsample
    return smoothing_matrix(out_size, sigma) @ upsample


@lru_cache(maxsize=32)
def smoothing_matrix(size: int, sigma: float) -> torch.Tensor:
    """[size, size] float64 K: K @ x is x (a column of `size` values) smoothed by the Gaussian of σ
    `sigma`, its ends mirrored without repeating the edge value (scipy's "mirror" mode)."""
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    columns = _mirror_pad(torch.eye(size, dtype=torch.float64)[None, None], (0, 0, radius, radius))
    return F.conv2d(columns, kernel.view(1, 1, -1, 1))[0, 0]


def _mirror_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """torch's "reflect" padding, repeated while the pad is wider than the map (a kernel wider
    than a small map reflects more than once, as scipy's mirror mode does)."""
    left, right, top, bottom = pad
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return x
