"""Slow: the full demo run, pretrained ImageNet weights against the same run with random weights."""

from __future__ import annotations

import pandas as pd
import pytest

from gaussad.cli import main


@pytest.mark.slow
def test_pretrained_weights_clearly_beat_random_weights_on_the_demo(tmp_path):
    data = tmp_path / "data"
    for weights, out in (("package:efficientnet-lite0", "pretrained"), ("none", "random")):
        assert main(["demo", "--data", str(data), "--out", str(tmp_path / out), "--weights", weights, "--quiet"]) == 0
    pretrained = pd.read_csv(tmp_path / "pretrained" / "results.csv").set_index("category")
    random = pd.read_csv(tmp_path / "random" / "results.csv").set_index("category")
    for metric in ("image AUROC", "pixel AUROC", "AUPRO@0.3"):
        assert pretrained[metric].mean() > random[metric].mean() + 15, metric
    # above chance, below perfect: the demo data is meant to be neither trivial nor hopeless
    assert (pretrained["image AUROC"] > 65).all() and (pretrained["image AUROC"] < 100).any()
