"""gaussad.features and gaussad.networks: level convention, weight sources, the two runtimes (torch and
ONNX Runtime, with their parity and the content-keyed export cache), the truncated forward pass,
image batches, and the on-disk feature store."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from gaussad.data import read_rgb
from gaussad import features
from gaussad.errors import DatasetError, RuntimeUnavailableError
from gaussad.features import Backbone, FeatureStore, image_batches, resolve_runtime, to_tensor
from gaussad.networks import LITE0_PACKAGE, LevelNetwork, WeightsError, build_model, normalization
from gaussad.onnx_features import cache_dir

LITE0 = "tf_efficientnet_lite0"

# Published architectures: EfficientNet-Lite0 [stem, stage0..6, head] and ResNet-18 [stem(+maxpool), layer1..4]
LITE0_STRIDES = [2, 2, 4, 8, 16, 16, 32, 32, 32]
LITE0_CHANNELS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]
RESNET18_STRIDES = [4, 4, 8, 16, 32]
RESNET18_CHANNELS = [64, 64, 128, 256, 512]


def cpu_backbone(name=LITE0, weights="none", levels=(0, 1), image_size=64, seed=0, runtime=None):
    """On the CPU's default runtime (onnxruntime) unless `runtime` says otherwise."""
    return Backbone(name, weights, levels, image_size, device="cpu", seed=seed, runtime=runtime)


def random_images(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- levels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
@pytest.mark.parametrize(
    "name, strides, channels",
    [(LITE0, LITE0_STRIDES, LITE0_CHANNELS), ("resnet18", RESNET18_STRIDES, RESNET18_CHANNELS)],
)
def test_level_convention(name, strides, channels, runtime):
    backbone = cpu_backbone(name, levels=range(len(strides)), image_size=224, runtime=runtime)
    feats = backbone.extract(random_images(1, 224))
    assert sorted(feats) == list(range(len(strides)))
    for level, (stride, width) in enumerate(zip(strides, channels)):
        assert feats[level].shape == (1, width, 224 // stride, 224 // stride), f"level {level}"
        assert feats[level].dtype == torch.float32
    assert backbone.channels() == dict(enumerate(channels))


@pytest.mark.parametrize(
    "name, levels, last",
    [(LITE0, [9], 8), (LITE0, [3, -1], 8), ("resnet18", [3, 4, 5], 4), ("resnet18", [], 4)],
)
def test_levels_out_of_range(name, levels, last):
    with pytest.raises(ValueError, match=rf"{name}: it has levels 0\.\.{last}"):
        cpu_backbone(name, levels=levels)


# ---- the packaged ImageNet weights classify real photographs ---------------------------------------


@pytest.fixture(scope="module")
def lite0_pretrained():
    return cpu_backbone(LITE0, LITE0_PACKAGE, levels=range(9), image_size=224, runtime="torch")


@pytest.fixture(scope="module")
def lite0_model():
    return build_model(LITE0, LITE0_PACKAGE)


@pytest.mark.parametrize("image, imagenet_class", [("chelsea", 285), ("coffee", 967)])
def test_lite0_package_weights_classify_imagenet_photos(lite0_pretrained, lite0_model, image, imagenet_class):
    model = lite0_model
    photo = Image.fromarray(getattr(skimage.data, image)())
    x01 = to_tensor(photo, 224)[None]
    assert x01.shape == (1, 3, 224, 224) and 0 <= x01.min() and x01.max() <= 1

    mean, std = normalization(model, LITE0_PACKAGE)
    x = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == imagenet_class
    assert float(probs[imagenet_class]) > 0.5

    # the packaged weights are TensorFlow's: (x - 0.5) / 0.5 (DESIGN.md, "Weights")
    assert np.allclose(mean, 0.5) and np.allclose(std, 0.5)

    # extract() normalises the same way: its head level, pooled and classified, gives the same logits
    head = lite0_pretrained.extract(x01)[8]
    with torch.no_grad():
        logits = model.forward_head(head)
    assert int(logits.argmax()) == imagenet_class
    torch.testing.assert_close(logits.softmax(-1)[0], probs, atol=1e-4, rtol=1e-4)


def test_extract_applies_tf_normalization(lite0_pretrained, lite0_model):
    """Level 0 (stem conv + BN + activation) of extract(x) equals the stem run by hand on (x - 0.5) / 0.5."""
    model = lite0_model
    x01 = random_images(1, 64)
    with torch.no_grad():
        want = model.bn1(model.conv_stem((x01 - 0.5) / 0.5))
    torch.testing.assert_close(lite0_pretrained.extract(x01)[0], want, rtol=1e-5, atol=1e-5)


def test_channels_last_features_equal_a_plain_forward(lite0_pretrained):
    """The backbone runs in channels_last (faster on a CPU); its features equal timm's own
    contiguous forward of the same weights, and come back in the usual contiguous layout."""
    plain = build_model(LITE0, LITE0_PACKAGE, 0)
    x01 = random_images(2, 96)
    with torch.no_grad():
        x = (x01 - 0.5) / 0.5
        want = plain.blocks[:3](plain.bn1(plain.conv_stem(x)))  # level 3 = the output of stage 2
    got = lite0_pretrained.extract(x01)
    assert all(feats.is_contiguous() for feats in got.values())
    torch.testing.assert_close(got[3], want, rtol=1e-4, atol=1e-4)


# ---- weights from a file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_backbone():
    """A Lite0 with random weights from seed 7: a backbone from a file must reproduce it exactly."""
    return cpu_backbone(LITE0, "none", levels=(2, 4), seed=7)


@pytest.fixture(scope="module")
def source_state():
    return build_model(LITE0, "none", seed=7).state_dict()


@pytest.mark.parametrize("fmt", ["pth", "pth-wrapped", "safetensors"])
def test_file_weights_round_trip(tmp_path, source_backbone, source_state, fmt):
    state = source_state
    if fmt == "safetensors":
        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "weights.pth"
        torch.save({"state_dict": state} if fmt == "pth-wrapped" else state, path)

    loaded = cpu_backbone(LITE0, f"file:{path}", levels=(2, 4), seed=0)
    images = random_images(2)
    want = source_backbone.extract(images)
    got = loaded.extract(images)
    for level in (2, 4):
        assert torch.equal(got[level], want[level])
    # and it is not what seed 0 alone would give (the file really was loaded)
    unloaded = cpu_backbone(LITE0, "none", levels=(2, 4), seed=0).extract(images)
    assert not torch.allclose(unloaded[4], want[4])


def test_file_weights_missing(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match="does not exist") as info:
        cpu_backbone("resnet18", f"file:{path}")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_file_weights_not_a_weights_file(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are not weights\n" * 20)
    with pytest.raises(WeightsError) as info:
        cpu_backbone("resnet18", f"file:{path}")
    assert str(path) in str(info.value)


def _other_state_dict(name, **kwargs):
    return timm.create_model(name, pretrained=False, **kwargs).state_dict()


def test_file_weights_of_a_bigger_architecture(tmp_path):
    """resnet34 holds all of resnet18's tensors, with the same shapes, plus more: unexpected keys."""
    path = tmp_path / "resnet34.pth"
    torch.save(_other_state_dict("resnet34"), path)
    with pytest.raises(WeightsError, match="unexpected") as info:
        cpu_backbone("resnet18", f"file:{path}")
    assert str(path) in str(info.value)


def test_file_weights_with_missing_tensors(tmp_path, source_state):
    state = source_state
    path = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in list(state.items())[: len(state) // 2]}, str(path))
    with pytest.raises(WeightsError, match="missing") as info:
        cpu_backbone(LITE0, f"file:{path}")
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "target, source, kwargs",
    [
        (LITE0, "resnet18", {}),
        ("resnet18", LITE0, {}),
        (LITE0, "tf_efficientnet_lite2", {}),
        ("resnet18", "resnet18", {"num_classes": 10}),
    ],
    ids=["resnet18-into-lite0", "lite0-into-resnet18", "lite2-into-lite0", "resnet18-10-classes"],
)
def test_file_weights_of_another_architecture(tmp_path, target, source, kwargs):
    path = tmp_path / f"{source}.pth"
    torch.save(_other_state_dict(source, **kwargs), path)
    with pytest.raises(WeightsError) as info:
        cpu_backbone(target, f"file:{path}")
    assert str(path) in str(info.value)


def test_file_weights_not_a_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError) as info:
        cpu_backbone("resnet18", f"file:{path}")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("weights", ["hub", "imagenet", "package:efficientnet-b0", "File:/tmp/x.pth", ""])
def test_unknown_weight_source(weights):
    with pytest.raises(WeightsError, match="unknown weight source"):
        cpu_backbone("resnet18", weights)


def test_lite0_package_refuses_other_backbones():
    with pytest.raises(WeightsError, match="resnet18"):
        cpu_backbone("resnet18", LITE0_PACKAGE)


def test_unknown_backbone_name():
    with pytest.raises(WeightsError, match="no_such_net"):
        cpu_backbone("no_such_net", "none")


# ---- random weights are reproducible ---------------------------------------------------------------


def test_none_weights_reproducible_and_seeded():
    images = random_images(2)
    a = cpu_backbone("resnet18", "none", levels=(1, 3), seed=3).extract(images)
    b = cpu_backbone("resnet18", "none", levels=(1, 3), seed=3).extract(images)
    c = cpu_backbone("resnet18", "none", levels=(1, 3), seed=4).extract(images)
    for level in (1, 3):
        assert torch.equal(a[level], b[level])
    assert not torch.allclose(a[3], c[3])


def test_building_a_backbone_leaves_global_rng_alone():
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    cpu_backbone("resnet18", "none", seed=5)
    assert torch.equal(torch.rand(3), want)


# ---- early stop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_early_stop_gives_the_same_features(runtime):
    images = random_images(2, 96)
    everything = cpu_backbone(LITE0, LITE0_PACKAGE, levels=range(9), image_size=96, runtime=runtime).extract(images)
    shallow = cpu_backbone(LITE0, LITE0_PACKAGE, levels=(1, 0), image_size=96, runtime=runtime).extract(images)
    assert sorted(shallow) == [0, 1]
    for level in (0, 1):
        torch.testing.assert_close(shallow[level], everything[level], rtol=1e-6, atol=1e-6)


def test_the_truncated_network_holds_no_layer_past_the_deepest_level():
    """Layers after the deepest requested level are not run: they are not even in the network."""
    network = LevelNetwork(LITE0, "none", levels=(1, 0))
    names = {name for name, _ in network.network.named_modules()}
    assert "blocks.0" in names and not any(name.startswith(("blocks.1", "conv_head")) for name in names)


# ---- the runtimes -----------------------------------------------------------------------------------


def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the level, relative to max |want| (elementwise ratios blow up near 0)."""
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("name, weights, levels", [(LITE0, LITE0_PACKAGE, range(9)), ("resnet18", "none", range(5))])
def test_onnxruntime_features_equal_the_torch_features_on_real_photos(name, weights, levels):
    """The parity the onnxruntime runtime promises: on every level, max |onnx - torch| <= 1e-4 max |torch|,
    on real photographs, at a batch size (3) other than the export's (2)."""
    photos = torch.stack([to_tensor(Image.fromarray(getattr(skimage.data, photo)()), 224)
                          for photo in ("chelsea", "coffee", "astronaut")])
    want = cpu_backbone(name, weights, levels, 224, runtime="torch").extract(photos)
    got = cpu_backbone(name, weights, levels, 224, runtime="onnxruntime").extract(photos)
    assert sorted(got) == sorted(want) == list(levels)
    for level in want:
        assert got[level].shape == want[level].shape and got[level].dtype == torch.float32
        assert max_relative_error(got[level], want[level]) <= 1e-4, f"level {level}"


def test_the_export_is_cached_by_the_content_of_the_weights(tmp_path, monkeypatch, source_state):
    monkeypatch.setenv("GAUSSAD_ONNX_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights.pth"
    torch.save(source_state, weights)
    first = cpu_backbone(LITE0, f"file:{weights}", levels=(2,))
    exported = sorted(cache_dir().glob("*.onnx"))
    assert len(exported) == 1 and cache_dir() == tmp_path / "cache"
    written = exported[0].stat().st_mtime_ns
    cpu_backbone(LITE0, f"file:{weights}", levels=(2,))  # the same bytes: the same file, not exported again
    assert sorted(cache_dir().glob("*.onnx")) == exported and exported[0].stat().st_mtime_ns == written

    torch.save(build_model(LITE0, "none", seed=8).state_dict(), weights)  # same name, other weights
    other = cpu_backbone(LITE0, f"file:{weights}", levels=(2,))
    assert len(list(cache_dir().glob("*.onnx"))) == 2
    images = random_images(2)
    assert not torch.allclose(other.extract(images)[2], first.extract(images)[2])
    cpu_backbone(LITE0, f"file:{weights}", levels=(2, 3))  # other levels, other size: exports of their own
    cpu_backbone(LITE0, f"file:{weights}", levels=(2,), image_size=96)
    assert len(list(cache_dir().glob("*.onnx"))) == 4 and not list(cache_dir().glob("*.partial"))


def test_a_damaged_export_in_the_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSAD_ONNX_CACHE", str(tmp_path / "cache"))
    cpu_backbone(LITE0, "none", levels=(1,))
    [path] = cache_dir().glob("*.onnx")
    path.write_bytes(b"not an ONNX graph")
    with pytest.raises(RuntimeUnavailableError, match="--runtime torch") as info:
        cpu_backbone(LITE0, "none", levels=(1,))
    assert str(path) in str(info.value)
    assert torch.equal(cpu_backbone(LITE0, "none", levels=(1,), runtime="torch").extract(random_images())[1].isnan(),
                       torch.zeros(2, 16, 32, 32, dtype=torch.bool))  # the way out works


def test_an_export_cache_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache folder would go")
    monkeypatch.setenv("GAUSSAD_ONNX_CACHE", str(tmp_path / "file" / "onnx"))
    with pytest.raises(RuntimeUnavailableError, match="GAUSSAD_ONNX_CACHE.*--runtime torch") as info:
        cpu_backbone(LITE0, "none", levels=(1,))
    assert str(tmp_path / "file" / "onnx") in str(info.value)


def test_the_runtime_choice():
    assert resolve_runtime(None, torch.device("cpu")) == "onnxruntime"
    assert resolve_runtime(None, torch.device("cuda")) == "torch"
    assert resolve_runtime("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="--runtime torch"):
        resolve_runtime("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt", torch.device("cpu"))


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
