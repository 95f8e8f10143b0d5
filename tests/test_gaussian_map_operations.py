"""gaussad.gaussian.map_operations against independent references: scipy.ndimage's gaussian_filter,
torch's bilinear and nearest resizing, NumPy means over each neighbourhood."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from gaussad.gaussian.map_operations import local_average, map_operator, smoothing_matrix, split_channels, stack_levels


@pytest.mark.parametrize("sigma, size", [(4, 64), (1.5, 20), (4, 9), (2.5, 3)])
def test_smoothing_is_scipys_gaussian_filter(sigma, size):
    """Kernels wider than the map included (the mirror reflects more than once)."""
    maps = np.random.default_rng(size).random((3, size, size))
    reference = np.stack([gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in maps])
    operator = smoothing_matrix(size, sigma)
    np.testing.assert_allclose((operator @ torch.from_numpy(maps) @ operator.T).numpy(), reference, atol=1e-12)


@pytest.mark.parametrize("sigma, size, out", [(2, 14, 64), (4, 7, 64), (0, 14, 64), (1.5, 28, 28)])
def test_map_operator_is_bilinear_upsampling_then_smoothing(sigma, size, out):
    """Against F.interpolate's bilinear resizing and scipy's filter (σ 0: the resizing alone)."""
    maps = torch.from_numpy(np.random.default_rng(size).random((2, size, size)))
    upsampled = torch.nn.functional.interpolate(maps[:, None], size=(out, out), mode="bilinear",
                                                align_corners=False)[:, 0].numpy()
    reference = upsampled if sigma == 0 else np.stack(
        [gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in upsampled])
    operator = map_operator(size, out, sigma)
    np.testing.assert_allclose((operator @ maps @ operator.T).numpy(), reference, atol=1e-12)


def test_binomial_local_average_is_the_weighted_mean_over_each_neighbourhood():
    """Weights 1 2 1 / 2 4 2 / 1 2 1 (5×5: 1 4 6 4 1 outer itself), at the borders normalised over
    the positions that exist; by hand in NumPy."""
    feats = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    x = feats.numpy()
    for size, row in ((3, [1, 2, 1]), (5, [1, 4, 6, 4, 1])):
        weights, r = np.outer(row, row).astype(float), size // 2
        reference = np.empty_like(x)
        for i in range(5):
            for j in range(6):
                rows, cols = range(max(i - r, 0), min(i + r + 1, 5)), range(max(j - r, 0), min(j + r + 1, 6))
                w = np.array([[weights[a - i + r, b - j + r] for b in cols] for a in rows])
                window = x[:, :, rows.start:rows.stop, cols.start:cols.stop]
                reference[:, :, i, j] = (window * w).sum((2, 3)) / w.sum()
        np.testing.assert_allclose(local_average(feats, size, "binomial").numpy(), reference, atol=1e-12)


def test_local_average_is_the_mean_over_each_neighbourhood():
    feats = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    x = feats.numpy()
    reference = np.empty_like(x)
    for i in range(5):
        for j in range(6):  # the 3×3 window, cut at the borders
            reference[:, :, i, j] = x[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean((2, 3))
    np.testing.assert_allclose(local_average(feats, 3).numpy(), reference, atol=1e-12)
    assert local_average(feats, 1) is feats


@pytest.mark.parametrize("sizes", [[(8, 8), (4, 4), (2, 2)], [(6, 9), (3, 3)], [(7, 7), (3, 3)]])
def test_stacked_levels_are_torchs_nearest_resizing_concatenated(sizes):
    """By an integer factor (a repeat) or not (7 from 3: F.interpolate itself), as F.interpolate's
    "nearest" resizes to the largest map."""
    maps = [torch.randn(2, 3 + i, h, w) for i, (h, w) in enumerate(sizes)]
    expected = torch.cat([torch.nn.functional.interpolate(m, size=sizes[0], mode="nearest") for m in maps], 1)
    assert torch.equal(stack_levels(maps), expected)


def test_split_channels_takes_the_same_channels_before_stacking():
    maps = [torch.randn(2, 5, 4, 4), torch.randn(2, 7, 4, 4), torch.randn(2, 3, 4, 4)]
    subset = torch.tensor([0, 3, 5, 6, 11, 12, 14])
    parts = split_channels(subset, [5, 7, 3])
    assert [p.tolist() for p in parts] == [[0, 3], [0, 1, 6], [0, 2]]
    taken = torch.cat([m.index_select(1, p) for m, p in zip(maps, parts)], 1)
    assert torch.equal(taken, torch.cat(maps, 1).index_select(1, subset))
