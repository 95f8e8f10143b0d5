"""Operations on feature maps and anomaly maps that the Gaussian detector composes.

    local_average(feats, k)   each position's features averaged over its k×k neighbourhood
    stack_levels(maps)        feature maps of several levels at the finest one's size, concatenated
    smooth(maps, sigma)       Gaussian smoothing of anomaly maps (σ in pixels), as
                              scipy.ndimage.gaussian_filter(mode="mirror", truncate=4) computes it
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRUNCATE = 4.0  # the kernel reaches 4σ on each side (scipy's default)


def local_average(feats_nchw: torch.Tensor, size: int) -> torch.Tensor:
    """Features averaged over each position's size×size neighbourhood (size odd; 1 = unchanged);
    at the borders over the positions that exist."""
    if size <= 1:
        return feats_nchw
    return F.avg_pool2d(feats_nchw, size, stride=1, padding=size // 2, count_include_pad=False)


def stack_levels(feats_nchw: list[torch.Tensor]) -> torch.Tensor:
    """[n, ΣC, H, W]: the maps resized (nearest, as PaDiM) to the largest one's H×W and concatenated."""
    size = max((f.shape[-2:] for f in feats_nchw), key=lambda hw: hw[0] * hw[1])
    return torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=tuple(size), mode="nearest")
                      for f in feats_nchw], 1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian of σ `sigma`, radius round(4σ), in float64."""
    radius = int(TRUNCATE * sigma + 0.5)
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (k / sigma) ** 2)
    return kernel / kernel.sum()


def smooth(maps_nhw: torch.Tensor, sigma: float) -> torch.Tensor:
    """Maps [n, H, W] smoothed by a Gaussian of σ `sigma` pixels (0: unchanged), separably, the
    borders mirrored (without repeating the edge pixel)."""
    if sigma <= 0:
        return maps_nhw
    kernel = gaussian_kernel(sigma).to(maps_nhw.device, maps_nhw.dtype)
    radius = len(kernel) // 2
    x = maps_nhw[:, None]
    for shape in ((1, 1, -1, 1), (1, 1, 1, -1)):  # down the columns, then along the rows
        pad = (0, 0, radius, radius) if shape[2] == -1 else (radius, radius, 0, 0)
        x = F.conv2d(_mirror_pad(x, pad), kernel.view(shape))
    return x[:, 0]


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
