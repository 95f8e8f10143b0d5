"""gaussad.piade.loss: each term against an independent reference (NumPy, scikit-image, the
perceptual layers run by hand), the weighted total and the pixel map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from piade_helpers import FAST
from skimage.metrics import structural_similarity

from gaussad.networks import LITE0_PACKAGE, build_model
from gaussad.piade import PiadeAD
from gaussad.piade.loss import PerceptualFeatures, ReconstructionLoss


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """[n, 3, size, size] images in [0, 1] with structure at several scales (not white noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=generator)
    fine = torch.rand(n, 3, size, size, generator=generator)
    upsampled = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.8 * upsampled + 0.2 * fine).clamp(0, 1)



@pytest.fixture(scope="module")
def image_pair():
    x = smooth_images(3, 48, seed=1)
    noise = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    return x, (x + noise).clamp(0, 1)


def test_mse_term_against_numpy(image_pair):
    x, y = image_pair
    terms = ReconstructionLoss(0.0, 0.0)(x, y).per_image
    expected = ((x.double().numpy() - y.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(terms["mse"].numpy(), expected, rtol=1e-5)
    assert set(terms) == {"mse", "loss"}  # λ = 0: those terms are not computed
    torch.testing.assert_close(terms["loss"], terms["mse"])


@pytest.mark.parametrize("maps", [False, True])
def test_ssim_term_against_scikit_image(image_pair, maps):
    x, y = image_pair
    terms = ReconstructionLoss(0.0, 1.0)(x, y, maps=maps).per_image
    for image in range(len(x)):
        reference = structural_similarity(
            x[image].permute(1, 2, 0).double().numpy(), y[image].permute(1, 2, 0).double().numpy(),
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2,
        )
        assert abs(float(terms["ssim"][image]) - (1 - reference)) < 1e-4
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["ssim"])


@pytest.mark.parametrize("name", ["vgg11", "tf_efficientnet_lite0"])
def test_perceptual_term_against_the_layers_run_by_hand(image_pair, name):
    """VGG-11 (random weights: the hub is offline) and Lite0 (the packaged ImageNet weights)."""
    x, y = image_pair
    weights = "none" if name == "vgg11" else LITE0_PACKAGE
    perceptual = PerceptualFeatures(name, weights, seed=0)
    terms = ReconstructionLoss(1.0, 0.0, perceptual)(x, y).per_image

    model = build_model(name, weights, seed=0)
    if name == "vgg11":  # the first four modules of features: conv3-64, ReLU, max-pool, conv3-128
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        layers = [model.features[i] for i in range(4)]
        expected_shape = (3, 128, 24, 24)
    else:  # stem and stages 0-2, on TF-normalised inputs
        mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
        layers = [model.conv_stem, model.bn1, model.blocks[0], model.blocks[1], model.blocks[2]]
        expected_shape = (3, 40, 6, 6)

    def features(images):
        out = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        for layer in layers:
            out = layer(out)
        return out.double().numpy()

    with torch.no_grad():
        fx, fy = features(x), features(y)
    assert fx.shape == expected_shape
    expected = ((fx - fy) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(terms["perceptual"].numpy(), expected, rtol=1e-4)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["perceptual"])


def test_weighted_total_and_pixel_map(image_pair):
    x, y = image_pair
    perceptual = PerceptualFeatures("vgg11", "none")
    result = ReconstructionLoss(0.5, 2.0, perceptual)(x, y, maps=True)
    terms = result.per_image
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.5 * terms["perceptual"] + 2.0 * terms["ssim"])
    assert result.maps.shape == (3, 48, 48)

    # The map is squared error + λ2·(1 − SSIM map) + λ1·upsampled feature error, term by term.
    squared = ((x - y) ** 2).mean(1)
    with torch.no_grad():
        feature_error = ((perceptual(x) - perceptual(y)) ** 2).mean(1, keepdim=True)
    upsampled = torch.nn.functional.interpolate(feature_error, size=(48, 48), mode="bilinear", align_corners=False)
    dissimilarity = (result.maps - squared - 0.5 * upsampled[:, 0]) / 2.0
    for image in range(3):
        _, ssim_full = structural_similarity(
            x[image].permute(1, 2, 0).double().numpy(), y[image].permute(1, 2, 0).double().numpy(),
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2,
            full=True,
        )
        inside = slice(5, -5)  # the border depends on the padding mode; the score does not use it
        np.testing.assert_allclose(dissimilarity[image, inside, inside].numpy(),
                                   1 - ssim_full.mean(2)[inside, inside], atol=1e-4)


def test_lambda_zero_does_not_build_the_perceptual_network():
    # 'timm' weights cannot load offline: building the network would raise.
    model = PiadeAD(**{**FAST, "weights": "none", "perceptual": "vgg11", "perceptual_weights": "timm",
                       "lambda_perceptual": 0.0})  # the perceptual settings at their defaults: no effect at λ 0
    assert model.loss.perceptual is None
    with pytest.raises(ValueError, match="needs a perceptual network"):
        ReconstructionLoss(1.0, 1.0, None)
