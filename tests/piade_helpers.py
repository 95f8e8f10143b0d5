"""What the tests of gaussad.piade (network, loss, training, detector) share."""

from __future__ import annotations

from pathlib import Path

from gaussad.data import Category, load_category
from gaussad.demo import write_demo_dataset
from gaussad.networks import LITE0_PACKAGE

SIZE = 64  # training tests: small images and the offline Lite0 weights keep them fast on a CPU
FAST = dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, perceptual="tf_efficientnet_lite0",
            perceptual_weights=LITE0_PACKAGE, image_size=SIZE, train_batch_size=4, upsample_channels=64,
            device="cpu", progress=False)  # 8 training images: 7 in two batches an epoch, 1 held out


def demo_category(root: Path) -> Category:
    """A small demo category (hexnut, 8 training images) at SIZE px."""
    write_demo_dataset(root, seed=0, categories=["hexnut"], n_train=8, n_test_good=4, n_test_per_defect=2,
                       image_size=SIZE)
    return load_category(root, "hexnut")
