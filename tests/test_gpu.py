"""The CUDA path, skipped without a GPU (CI has none): the torch runtime with fp16 autocast, the
Gaussians fitted and the Mahalanobis distances computed in float64 on the device, images decoded by
the thread pool into pinned batches. Its scores must agree with the CPU's (fp16 features: close,
not equal)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaussad.data import load_category
from gaussad.features import image_batches
from gaussad.gaussian import GaussianAD
from gaussad.metrics import image_auroc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_gpu_fits_and_scores_as_the_cpu(demo_root, tmp_path):
    category = load_category(demo_root, "weave")
    gpu = GaussianAD.from_preset("lite0", image_size=96, device="cuda", progress=False).fit(category.train)
    assert gpu.runtime == "torch" and gpu.backbone.amp  # the defaults on a GPU
    gaussian = gpu.pixel_gaussians["stacked"]
    assert gaussian.mean.device.type == "cuda" and gaussian.mean.dtype == torch.float64
    batch = next(image_batches(category.test.paths[:4], 96, 4, torch.device("cuda")))
    assert batch.is_pinned()
    feats = gpu.backbone.extract(batch)
    assert all(f.device.type == "cuda" and f.dtype == torch.float32 for f in feats.values())

    on_gpu = gpu.score(category.test)
    cpu = GaussianAD.load(gpu.save(tmp_path / "model"), device="cpu", runtime="torch", progress=False)
    on_cpu = cpu.score(category.test)
    assert np.corrcoef(on_gpu.image, on_cpu.image)[0, 1] > 0.99
    np.testing.assert_allclose(on_gpu.image, on_cpu.image, rtol=0.05)
    labels = np.asarray(category.test.labels)
    assert abs(image_auroc(labels, on_gpu.image) - image_auroc(labels, on_cpu.image)) < 0.02
