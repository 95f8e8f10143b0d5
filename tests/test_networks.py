"""gaussad.networks (through Backbone): the level convention, the packaged ImageNet weights on real
photographs, weight sources (files, packages, random seeded weights), the truncated forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import timm
import torch
from feature_helpers import cpu_backbone, random_images
from PIL import Image
from safetensors.torch import save_file

from gaussad.features import to_tensor
from gaussad.networks import LITE0_PACKAGE, LevelNetwork, WeightsError, build_model, normalization

LITE0 = "tf_efficientnet_lite0"

# Published architectures: EfficientNet-Lite0 [stem, stage0..6, head] and ResNet-18 [stem(+maxpool), layer1..4]
LITE0_STRIDES = [2, 2, 4, 8, 16, 16, 32, 32, 32]
LITE0_CHANNELS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]
RESNET18_STRIDES = [4, 4, 8, 16, 32]
RESNET18_CHANNELS = [64, 64, 128, 256, 512]

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


@pytest.mark.parametrize("n, size", [(1, 240), (2, 260)])
def test_lite1_and_lite2_package_weights_classify_imagenet_photos_at_their_native_size(n, size):
    weights = f"package:efficientnet-lite{n}"
    model = build_model(f"tf_efficientnet_lite{n}", weights)
    mean, std = normalization(model, weights)
    assert np.allclose(mean, 0.5) and np.allclose(std, 0.5)  # TensorFlow's, as Lite0's
    for image, imagenet_class in (("chelsea", 285), ("coffee", 967)):
        x01 = to_tensor(Image.fromarray(getattr(skimage.data, image)()), size)[None]
        with torch.no_grad():
            probs = model((x01 - 0.5) / 0.5).softmax(-1)[0]
        assert int(probs.argmax()) == imagenet_class and float(probs[imagenet_class]) > 0.5


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


def test_packaged_weights_refuse_other_backbones():
    with pytest.raises(WeightsError, match="resnet18"):
        cpu_backbone("resnet18", LITE0_PACKAGE)
    with pytest.raises(WeightsError, match="package:efficientnet-lite1 holds weights for tf_efficientnet_lite1, "
                                           "not 'tf_efficientnet_lite0'"):
        build_model("tf_efficientnet_lite0", "package:efficientnet-lite1")


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
