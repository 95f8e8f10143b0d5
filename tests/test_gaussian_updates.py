"""gaussad.gaussian.updates: an updatable ridge model updated with new images equals a model fitted
on all of them (every spatial mode, the pooled image Gaussians too), without reading the old ones;
the thresholds after an update; what cannot be updated is refused in one line; the command line."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from gaussad.data import load_category
from gaussad.gaussian import GaussianAD
from gaussad.networks import LITE0_PACKAGE

BASE = dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, image_size=64, covariance="ridge", ridge=0.1,
            updatable=True, device="cpu", progress=False, batch_size=8)
MODES = {
    "shared, pooled": dict(levels=(3, 4), spatial="shared"),
    "per-location, map-max": dict(levels=(3, 4), spatial="per-location", image_score="map-max", local_average=3),
    "stacked, map-max (lite0)": dict(levels=(2, 3), spatial="stacked", image_score="map-max", local_average=3,
                                     local_weights="binomial", pixel_channels=24, smoothing=2.0),
    "stacked, a second map Gaussian": dict(levels=(2, 3), spatial="stacked", image_score="map-max",
                                           local_average=3, pixel_channels=24, map_local_average=1),
}


@pytest.fixture(scope="module")
def category(demo_root):
    return load_category(demo_root, "weave")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_update_equals_a_fit_on_all_the_images(category, mode):
    old, new = category.train.paths[:11], category.train.paths[11:]  # 11: the batches fall apart differently
    union = GaussianAD(**BASE, **MODES[mode]).fit(old + new, holdout=0)
    updated = GaussianAD(**BASE, **MODES[mode]).fit(old, holdout=0).update(new, holdout=0)
    test = category.test.paths[:8]
    want, got = union.score(test), updated.score(test)
    np.testing.assert_allclose(got.image, want.image, rtol=1e-6)
    np.testing.assert_allclose(got.maps, want.maps, rtol=1e-6, atol=1e-6 * np.abs(want.maps).max())
    assert updated.fit_info["n_train_images"] == len(old) + len(new)
    alone = GaussianAD(**BASE, **MODES[mode]).fit(old, holdout=0).score(test)
    assert not np.allclose(alone.image, want.image, rtol=1e-4)  # the new images did change the model


def test_the_sums_do_not_grow_with_the_images_and_survive_save_and_load(category, tmp_path):
    old, new = category.train.paths[:10], category.train.paths[10:]
    model = GaussianAD(**BASE, **MODES["stacked, map-max (lite0)"]).fit(old, holdout=0)
    sizes = {name: {k: tuple(t.shape) for k, t in m.state().items()} for name, m in model.moments.items()}
    model.save(tmp_path / "model")
    loaded = GaussianAD.load(tmp_path / "model", device="cpu", progress=False)
    in_memory, from_disk = model.update(new, holdout=0), loaded.update(new, holdout=0)
    assert {name: {k: tuple(t.shape) for k, t in m.state().items()} for name, m in in_memory.moments.items()} == sizes
    test = category.test.paths[:4]
    # float32 maps: the saved sums' two triangles are one, the in-memory ones may differ in the last bit
    np.testing.assert_allclose(from_disk.score(test).image, in_memory.score(test).image, rtol=1e-6)


def test_the_thresholds_after_an_update_come_from_all_the_held_out_images(category, tmp_path):
    """The earlier held-out images are read again when unchanged (one is changed here: left out), and
    join the new images' held-out share, all scored by the updated model."""
    train = tmp_path / "train"
    shutil.copytree(category.train.paths[0].parent, train)
    paths = sorted(train.iterdir())
    model = GaussianAD(**BASE, **MODES["shared, pooled"]).fit(paths[:12], holdout=0.25)
    earlier = [path for path, _ in model.fit_info["held_out_images"]]
    assert len(earlier) == 3
    (train / earlier[0]).write_bytes(paths[-1].read_bytes())  # changed since the fit: not the same evidence
    model.update(paths[12:], holdout=0.25)
    held = [path for path, _ in model.fit_info["held_out_images"]]
    assert earlier[1:] == held[:2] and len(held) == 2 + 2  # two kept, two of the 8 new ones
    assert model.fit_info["updates"][-1]["earlier_held_out_missing"] == 1
    normal = model.score(held).image
    assert model.thresholds["image_normal_quantile"] == pytest.approx(np.quantile(normal, 0.99), rel=1e-9)
    digest = hashlib.sha256(b"".join(hashlib.sha256(p.read_bytes()).digest() for p in paths[12:])).hexdigest()
    assert model.fit_info["updates"][-1]["images_sha256"] == digest


def test_what_cannot_be_updated_is_refused_before_any_compute(category):
    plain = GaussianAD(**{**BASE, "updatable": False}, levels=(3, 4)).fit(category.train.paths[:6], holdout=0)
    with pytest.raises(ValueError, match="fitted without its sums .*--updatable"):
        plain.update(["no/such/image.png"])
    lw = {key: value for key, value in BASE.items() if key != "ridge"} | {"covariance": "ledoit-wolf"}
    shrunk = GaussianAD(**{**lw, "updatable": False}, levels=(3, 4))
    shrunk.fit(category.train.paths[:6], holdout=0)
    with pytest.raises(ValueError, match="Ledoit-Wolf model cannot be updated exactly .*gaussad fit"):
        shrunk.update(["no/such/image.png"])
    with pytest.raises(ValueError, match="updatable needs covariance 'ridge'"):
        GaussianAD(**lw)


def test_update_on_the_command_line(category, tmp_path, capsys):
    from gaussad.cli import main

    old = tmp_path / "old"
    old.mkdir()
    for path in category.train.paths[:10]:
        shutil.copy(path, old)
    assert main(["fit", str(old), "-o", str(tmp_path / "m"), "--preset", "lite0", "--image-size", "64",
                 "--pixel-channels", "24", "--updatable", "--quiet"]) == 2  # old/ is no category folder
    capsys.readouterr()
    model = GaussianAD.from_preset("lite0", image_size=64, pixel_channels=24, updatable=True, progress=False)
    model.fit(category.train.paths[:10]).save(tmp_path / "m")
    new = category.train.paths[10:]
    assert main(["update", str(tmp_path / "m"), *map(str, new), "-o", str(tmp_path / "m2"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"added 9 images to {tmp_path / 'm'} (9 -> 18)" in out
    config = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert config["n_train_images"] == 18 and len(config["updates"]) == 1
    plain = GaussianAD.from_preset("lite0", image_size=64, pixel_channels=24, progress=False)
    plain.fit(category.train.paths[:10]).save(tmp_path / "plain")
    assert main(["update", str(tmp_path / "plain"), *map(str, new), "-o", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--updatable" in err and not (tmp_path / "p2").exists()
