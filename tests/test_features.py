"""gaussad.features: image batches (each image decoded once, in order) and the on-disk feature store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from feature_helpers import LITE0, cpu_backbone

from gaussad import features
from gaussad.data import read_rgb
from gaussad.errors import DatasetError
from gaussad.features import FeatureStore, image_batches, to_tensor
from gaussad.networks import LITE0_PACKAGE

# ---- image batches ---------------------------------------------------------------------------------


def test_image_batches_decode_each_image_once_and_keep_the_order(demo_root, monkeypatch):
    paths = sorted((demo_root / "weave" / "train" / "good").glob("*.png"))[:11]
    decoded, read = [], features.read_rgb
    monkeypatch.setattr(features, "read_rgb", lambda path: decoded.append(path) or read(path))
    batches = list(image_batches(paths, 64, 4, torch.device("cpu")))
    assert [len(batch) for batch in batches] == [4, 4, 3]
    assert torch.equal(torch.cat(batches), torch.stack([to_tensor(read(path), 64) for path in paths]))
    assert sorted(decoded) == paths


def test_an_unreadable_image_in_a_batch_is_named(tmp_path, demo_root):
    paths = []
    for path in sorted((demo_root / "weave" / "train" / "good").glob("*.png"))[:7]:
        paths.append(tmp_path / path.name)
        paths[-1].write_bytes(path.read_bytes())
    paths[5].write_bytes(paths[5].read_bytes()[:300])
    with pytest.raises(DatasetError) as info:
        list(image_batches(paths, 64, 2, torch.device("cpu")))
    assert str(paths[5]) in str(info.value)


# ---- feature store ---------------------------------------------------------------------------------


def test_feature_store_round_trip(tmp_path, demo_root):
    paths = sorted((demo_root / "weave" / "train" / "good").glob("*.png"))[:5]
    backbone = cpu_backbone(LITE0, LITE0_PACKAGE, levels=(2, 3), image_size=64)
    store = FeatureStore.write(backbone, paths, tmp_path / "store", batch_size=2, progress=False)

    assert len(store) == 5 and store.levels == (2, 3)
    assert store.paths == tuple(str(p) for p in paths)
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.paths == store.paths and reopened.levels == store.levels
    images = torch.stack([to_tensor(read_rgb(p), 64) for p in paths])
    # the same batch composition as the store's (batch_size 2), so the numbers are bit-identical
    reference = [backbone.extract(images[i : i + 2]) for i in range(0, 5, 2)]
    for level in (2, 3):
        want = torch.cat([feats[level] for feats in reference])
        per_image = want[0].numel() * 4
        chunks = list(reopened.chunks(level, max_bytes=2 * per_image))
        assert [len(c) for c in chunks] == [2, 2, 1]
        assert torch.equal(torch.cat(chunks), want)
        singles = list(reopened.chunks(level, max_bytes=per_image // 3))  # less than one image: 1 each
        assert [len(c) for c in singles] == [1] * 5 and torch.equal(torch.cat(singles), want)
        whole = list(reopened.chunks(level))
        assert len(whole) == 1 and torch.equal(whole[0], want)
        assert reopened.level(level).shape == tuple(want.shape)


def test_feature_store_without_meta_is_refused(tmp_path):
    folder = tmp_path / "interrupted"
    folder.mkdir()
    np.save(folder / "level_2.npy", np.zeros((3, 4, 2, 2), np.float32))
    with pytest.raises(FileNotFoundError, match="meta.json") as info:
        FeatureStore(folder)
    assert str(folder) in str(info.value)
