"""What each pixel Gaussian is fitted on: the feature maps of the pixel levels made into vectors.

Per pixel level (`shared`, `per-location`): its channel subset, locally averaged. Stacked: the
pixel levels' subsets, locally averaged, resized to the finest level's size and concatenated, for
one Gaussian (key STACKED) and, with `map_local_average`, a second one of otherwise-averaged
features on the same channels (key MAP_STACKED). Vectors are grouped per position (G = h·w) or
all in one group (`shared`).
"""

from __future__ import annotations

import torch

from gaussad.gaussian.map_operations import local_average, split_channels, stack_levels

STACKED = "stacked"  # the key of the (first) pixel Gaussian of the stacked mode
MAP_STACKED = "stacked-map"  # the key of the second one (`map_local_average`): the map's only


def pixel_keys(config: dict) -> list[int | str]:
    """The keys of the pixel Gaussians: the pixel levels, or the stacked Gaussian(s)."""
    if config["spatial"] != STACKED:
        return list(config["pixel_levels"])
    return [STACKED] if config["map_local_average"] is None else [STACKED, MAP_STACKED]


def choose_channels(config: dict, widths: dict[int, int]) -> dict[int | str, torch.Tensor]:
    """Per pixel Gaussian whose input has more than `pixel_channels` channels (`widths`: channels
    per level), a seeded random subset of that many, in order (PaDiM's reduction); none without
    `pixel_channels`. The second stacked Gaussian keeps the first one's."""
    count = config["pixel_channels"]
    if count is None:
        return {}
    pixel_levels = config["pixel_levels"]
    inputs = ({STACKED: sum(widths[level] for level in pixel_levels)} if config["spatial"] == STACKED
              else {level: widths[level] for level in pixel_levels})
    generator = torch.Generator().manual_seed(config["seed"])
    return {key: torch.randperm(width, generator=generator)[:count].sort().values
            for key, width in inputs.items() if width > count}


def channel_subset(subsets: dict, key: int | str, feats_nchw: torch.Tensor) -> torch.Tensor:
    """The kept channels of a pixel Gaussian's input (all, without a subset)."""
    subset = subsets.get(key)
    return feats_nchw if subset is None else feats_nchw.index_select(1, subset.to(feats_nchw.device))


def pixel_inputs(config: dict, subsets: dict, feats: dict[int, torch.Tensor], device: torch.device,
                 only: int | str | None = None) -> dict[int | str, torch.Tensor]:
    """The [n, C, h, w] input of each pixel Gaussian (or of the `only` one) from {level: features}."""
    levels, k, weights = config["pixel_levels"], config["local_average"], config["local_weights"]
    if config["spatial"] != STACKED:
        return {level: local_average(channel_subset(subsets, level, feats[level].to(device)), k, weights)
                for level in levels if only in (None, level)}
    maps = [feats[level].to(device) for level in levels]
    subset = subsets.get(STACKED)
    if subset is not None:  # each level's share of the subset taken first: fewer channels averaged and resized
        parts = split_channels(subset, [m.shape[1] for m in maps])
        maps = [m.index_select(1, part.to(m.device)) for m, part in zip(maps, parts)]
    averages = {STACKED: k}
    if config["map_local_average"] is not None:
        averages[MAP_STACKED] = config["map_local_average"]
    return {key: stack_levels([local_average(m, size, weights) for m in maps])
            for key, size in averages.items() if only in (None, key)}


def positions(feats_nchw: torch.Tensor, shared: bool) -> torch.Tensor:
    """Feature vectors per position as [n, G, C], contiguous: G = h·w groups, or (`shared`) one."""
    n, c, h, w = feats_nchw.shape
    # contiguous: the permuted view strides each vector by h·w, which makes the distances and the
    # moments 2-3x slower than the copy costs
    vectors = feats_nchw.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()
    return vectors.reshape(n * h * w, 1, c) if shared else vectors
