"""The PIADE network (piade.md section 3.1, Fig. 1); images in [0, 1] at image_size S (120 in the paper).

    trunk        a pretrained CNN (ResNet-18 in the paper), a Squeeze-and-Excitation block after each
                 of its stages (ResNet: layer1..layer4), fine-tuned       -> feats [n, C, mf, mf]
    pyramid      adaptive average pooling of feats to 8x8, 4x4, 2x2, 1x1, each followed by a 1x1 conv
                 to 64 channels and batch norm; flattened, concatenated and cut into 8-dim primary
                 capsules                                                  -> [n, 680, 8]
    routing      dynamic routing (Algorithm 1, squash of eq. 3, 3 iterations) to two 64-dim vectors
    upsampler    three linear layers 64 -> 128 -> 512 -> 512*mf*mf        -> [n, 512, mf, mf]
    decoder      transposed convolutions on concat(trunk feats, upsampled) -> [n, 3, S, S], sigmoid
Training decodes the first vector; at test time the one with the larger norm (section 3.1).
The choices the paper leaves open (SE placement, capsules, routing, initialisation) are listed in
docs/piade.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gaussad.networks import add_normalization, architecture, build_model

# Floats just below 1 are 6e-8 apart: capping the squash gain there keeps norms < 1 for any input.
_MAX_SQUASH_GAIN = 1.0 - 2.0**-20


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
        add_normalization(self, model, weights)  # saved with the model: the trunk weights' own
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
    family = architecture(model)
    if family == "resnet":
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        return stem, [getattr(model, f"layer{i}") for i in range(1, 5)]
    if family == "efficientnet":
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
