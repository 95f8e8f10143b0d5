"""What the tests of gaussad.networks, gaussad.onnx_features and gaussad.features share."""

from __future__ import annotations

import torch

from gaussad.features import Backbone

LITE0 = "tf_efficientnet_lite0"


def cpu_backbone(name=LITE0, weights="none", levels=(0, 1), image_size=64, seed=0, runtime=None):
    """On the CPU's default runtime (onnxruntime) unless `runtime` says otherwise."""
    return Backbone(name, weights, levels, image_size, device="cpu", seed=seed, runtime=runtime)


def random_images(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
