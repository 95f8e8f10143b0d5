"""The PIADE loss (piade.md eq. 5) of an image x and its reconstruction x̂, both in [0, 1]:

    L = MSE + λ1 · perceptual + λ2 · (1 − SSIM),   λ1 = λ2 = 1 by default; λ = 0 drops a term
        (the perceptual network is then not even built).
Training minimises its batch mean; the score of an image is its L (section 4.2).

- Perceptual term: the mean squared difference of F(x) and F(x̂), F = the first four layers of a
  frozen ImageNet VGG-11 as the authors' code takes them (the first four modules of
  `vgg11.features`: conv3-64, ReLU, max-pool, conv3-128), so F is [128, S/2, S/2]; with the Lite0
  preset, the first four levels of tf_efficientnet_lite0 (stem, stages 0-2): [40, S/8, S/8].
- SSIM: per channel, Gaussian window 11x11 with σ = 1.5, C1 = 0.01², C2 = 0.03² (data range 1),
  population (co)variances; the image SSIM is the mean of the map over channels and over the
  positions whose window lies inside the image, exactly scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
- MSE: mean over channels and pixels.
- Pixel map [S, S]: the per-pixel form of each term, so its mean is close to the image score:
  squared error averaged over channels + λ2 · (1 − SSIM map averaged over channels; the 5 border
  pixels from a reflect-padded window) + λ1 · squared feature error averaged over channels,
  bilinearly upsampled to S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gaussad.networks import add_normalization, architecture, build_model

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K·L)² with data range L = 1


class PerceptualFeatures(nn.Module):
    """F of the perceptual loss: the first four layers of a frozen pretrained network (see the
    module docstring), on images in [0, 1]. Stays in eval mode: its batch norms never update."""

    def __init__(self, name: str = "vgg11", weights: str = "timm", seed: int = 0):
        super().__init__()
        model = build_model(name, weights, seed)
        family = architecture(model)
        if family == "vgg":
            self.layers = model.features[:4]
        elif family == "efficientnet":  # levels 0-3
            self.layers = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:3])
        else:
            raise ValueError(f"{name!r} is neither a VGG nor an EfficientNet: no perceptual features")
        add_normalization(self, model, weights)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualFeatures":
        return super().train(False)

    def forward(self, images_nchw: torch.Tensor) -> torch.Tensor:
        return self.layers((images_nchw - self.mean) / self.std)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian [size] of the SSIM window (scipy's, truncated at 3.5σ for 1.5)."""
    k = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(k**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-channel SSIM maps [n, C, H, W] of images in [0, 1] (Gaussian 11x11 window, σ 1.5); the
    windows of the 5 border pixels reach into a reflect padding."""
    c = x.shape[1]
    g = gaussian_window().to(x)
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)  # [n, 5C, H, W]
    stack = F.pad(stack, [SSIM_WINDOW // 2] * 4, mode="reflect")
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(5 * c, 1, -1, 1), groups=5 * c)  # separable window
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(5 * c, 1, 1, -1), groups=5 * c)
    mu_x, mu_y, xx, yy, xy = stack.split(c, 1)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    return ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )


@dataclass
class LossTerms:
    per_image: dict[str, torch.Tensor]  # "loss" (eq. 5) and each unweighted term, [n] each
    maps: torch.Tensor | None  # [n, S, S] pixel anomaly maps, when asked for


class ReconstructionLoss(nn.Module):
    """Eq. 5 per image: MSE + λ1 · perceptual + λ2 · (1 − SSIM); and the matching pixel maps."""

    def __init__(self, lambda_perceptual: float = 1.0, lambda_ssim: float = 1.0,
                 perceptual: PerceptualFeatures | None = None):
        super().__init__()
        if lambda_perceptual > 0 and perceptual is None:
            raise ValueError("a perceptual term (lambda_perceptual > 0) needs a perceptual network")
        self.lambda_perceptual, self.lambda_ssim = lambda_perceptual, lambda_ssim
        self.perceptual = perceptual if lambda_perceptual > 0 else None

    def forward(self, images: torch.Tensor, reconstructions: torch.Tensor, maps: bool = False) -> LossTerms:
        x, x_hat = images.float(), reconstructions.float()
        height, width = x.shape[2:]
        squared = ((x - x_hat) ** 2).mean(1)  # [n, S, S]
        per_image = {"mse": squared.mean((1, 2))}
        pixel_map = squared.clone() if maps else None
        total = per_image["mse"].clone()
        if self.lambda_ssim > 0:
            dissimilarity = 1 - ssim_map(x, x_hat).mean(1)  # [n, S, S]
            border = SSIM_WINDOW // 2  # the score, like scikit-image's, leaves out the padded border
            per_image["ssim"] = dissimilarity[:, border:-border, border:-border].mean((1, 2))
            total = total + self.lambda_ssim * per_image["ssim"]
            if maps:
                pixel_map += self.lambda_ssim * dissimilarity
        if self.perceptual is not None:
            with torch.no_grad():
                target = self.perceptual(x)
            feature_error = ((self.perceptual(x_hat) - target) ** 2).mean(1)  # [n, h, w]
            per_image["perceptual"] = feature_error.mean((1, 2))
            total = total + self.lambda_perceptual * per_image["perceptual"]
            if maps:
                upsampled = F.interpolate(feature_error[:, None], size=(height, width), mode="bilinear",
                                          align_corners=False)[:, 0]
                pixel_map += self.lambda_perceptual * upsampled
        per_image["loss"] = total
        return LossTerms(per_image, pixel_map)
