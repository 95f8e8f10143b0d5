"""GaussianAD: the detector of gaussian-deep-features.md as a fit/score estimator.

Per level of a pretrained CNN, Gaussians are fitted on defect-free images:
  image: over the level's average-pooled feature vectors -> image score = Σ over levels of distances
  pixel: over the feature vectors at each position (gaussad.gaussian.pixel_inputs) -> distance maps,
         bilinearly upsampled to the image size, averaged over the Gaussians and smoothed.
The settings are gaussad.gaussian.settings; the statistics (streaming moments, NPCA, Ledoit-Wolf,
Mahalanobis) gaussad.gaussian.statistics. Like a scikit-learn estimator, the constructor only checks
and keeps the settings: the network is built when first needed (fit, score, load).
A saved model is a folder: config.json (all needed to rebuild it) + stats.safetensors (no pickle).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gaussad.base_detector import Detector, Scores, image_paths, split_holdout
from gaussad.data import ImageSet
from gaussad.errors import ModelFileError
from gaussad.features import Backbone, FeatureStore, resolve_runtime
from gaussad.gaussian.map_operations import map_operator
from gaussad.gaussian.pixel_inputs import MAP_STACKED, STACKED, choose_channels, pixel_inputs, pixel_keys, positions
from gaussad.gaussian.settings import PRESETS, SETTINGS
from gaussad.gaussian.statistics import Gaussian, MomentAccumulator, fit_gaussian
from gaussad.gaussian.updates import check_updatable, held_out_images, load_moments, moment_tensors, update_store

GAUSSIAN_FIELDS = ("mean", "projection", "precision", "shrinkage")


class GaussianAD(Detector):
    """Anomaly detector from per-level Gaussians of pretrained CNN features (fit/score/save/load).
    Its settings, their defaults and meaning: `GaussianAD.SETTINGS` (gaussad.gaussian.settings)."""

    MODEL_TYPE = "gaussian"
    NAME = "Gaussian"
    SETTINGS = SETTINGS
    PRESETS = PRESETS
    PARAMS_BLOCK = "model"
    TENSORS_FILE = "stats.safetensors"
    EXPORTS_ONNX = True
    FITS_FROM_FEATURES = True
    NETWORK_SETTINGS = ("backbone", "weights")

    def __init__(self, *, batch_size: int = 16, device: str | torch.device | None = None, progress: bool = True,
                 runtime: str | None = None, **settings):
        self._set_runtime(device, batch_size, progress, runtime)
        self.runtime = resolve_runtime(runtime, self.device)
        self._configure(settings)
        self._backbone: Backbone | None = None
        self.image_gaussians: dict[int, Gaussian] = {}  # on `levels`, unless the image score is map-max
        self.pixel_gaussians: dict[int | str, Gaussian] = {}  # see pixel_inputs.pixel_keys
        self.channel_subsets: dict[int | str, torch.Tensor] = {}  # per pixel Gaussian: the kept channels
        self.moments: dict[str, MomentAccumulator] = {}  # per Gaussian ("pixel.stacked"), if updatable
        # mean and standard deviation of the held-out (pooled, map-max) scores, for `combined`
        self.score_scale = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)

    def _configure(self, settings: dict, check_effect: bool | Collection[str] = True) -> None:
        config = self.SETTINGS.validate(settings, check_effect=check_effect)
        if config["pixel_levels"] is None:
            config["pixel_levels"] = config["levels"]
        self.config = config

    @classmethod
    def feature_settings(cls, settings: dict) -> dict:
        """What the features of a fit with `settings` depend on (the flows key their cache on it)."""
        c = cls.SETTINGS.validate(settings, check_effect=False)  # a saved config is checked as it loads
        c["pixel_levels"] = c["pixel_levels"] or c["levels"]
        uses_pooled = c["image_score"] != "map-max"
        levels = sorted(set(c["pixel_levels"]) | (set(c["levels"]) if uses_pooled else set()))
        return {"backbone": c["backbone"], "weights": c["weights"], "levels": levels,
                "image_size": c["image_size"], "seed": c["seed"]}

    @staticmethod
    def feature_extractor(features: dict, device: str | torch.device | None = None, runtime: str | None = None):
        """The network (a Backbone) that extracts the features `feature_settings` describes."""
        return Backbone(features["backbone"], features["weights"], features["levels"], features["image_size"],
                        device=device, seed=features["seed"], runtime=runtime)

    @property
    def backbone(self) -> Backbone:
        """The feature network, built on first use (loading weights, or exporting it for ONNX Runtime)."""
        if self._backbone is None:
            self._backbone = self.feature_extractor(self.feature_settings(self.config), self.device, self.runtime)
        return self._backbone

    def describe(self) -> str:
        c = self.config
        pooled = "" if c["image_score"] == "map-max" else f"levels {c['levels']}, "
        return (f"{c['backbone']} ({c['weights']}), {pooled}{c['image_size']} px, "
                f"{c['reduction']} {c['variance']}, {c['spatial']}; image score {c['image_score']}, "
                f"map from levels {c['pixel_levels']}, smoothing σ {c['smoothing']}"
                + ("" if (k := c["map_local_average"]) is None else f", mean with a map of {k}×{k}-averaged features"))

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1) -> "GaussianAD":
        """Fit on defect-free images; a seeded `holdout` fraction is kept back to set thresholds."""
        paths = image_paths(images)
        self.check_false_alarm_evidence(len(paths), holdout)
        with tempfile.TemporaryDirectory(prefix="gaussad-features-") as tmp:
            store = FeatureStore.write(self.backbone, paths, tmp, self.batch_size, self.progress, "train features")
            self.fit_store(store, holdout)
        return self

    def fit_store(self, store: FeatureStore, holdout: float = 0.1) -> "GaussianAD":
        """Fit from extracted training features: Gaussians on most rows, thresholds on the held-out rest."""
        started = time.perf_counter()
        self.check_false_alarm_evidence(len(store), holdout)
        fit_rows, holdout_rows = split_holdout(len(store), holdout, self.config["seed"])
        self.fit_features(store, fit_rows)
        # the normal images scored once: their parts set the combined score's scale, then the thresholds
        parts = [self._score_parts(feats) for feats in store.batches(holdout_rows or fit_rows, self.batch_size)]
        if self.config["image_score"] == "combined":
            self.score_scale = self._score_scale(parts)
        self.set_normal_thresholds(Scores.concatenate([self._scores(*part) for part in parts]))
        self.record_fit(time.perf_counter() - started, len(fit_rows), len(holdout_rows), extract_seconds=store.seconds)
        if self.config["updatable"]:  # what an update scores again
            self.fit_info["held_out_images"] = held_out_images(store, holdout_rows)
        return self

    def update(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1) -> "GaussianAD":
        """Add defect-free images to an updatable ridge model exactly, without the images it was fitted
        on; a `holdout` share of them sets the thresholds with the earlier ones (gaussian.updates)."""
        check_updatable(self)
        paths = image_paths(images)
        with tempfile.TemporaryDirectory(prefix="gaussad-features-") as tmp:
            store = FeatureStore.write(self.backbone, paths, tmp, self.batch_size, self.progress, "new features")
            update_store(self, store, holdout)
        return self

    def fit_features(self, store: FeatureStore, rows: Sequence[int] | None = None, add: bool = False) -> "GaussianAD":
        """Fit the per-level Gaussians from extracted training features (all rows, or `rows`); with
        `add`, add them to the sums an updatable model keeps (gaussad.gaussian.updates)."""
        c = self.config
        shared = c["spatial"] == "shared"
        if not add:
            self.moments, self.channel_subsets = {}, choose_channels(c, self.backbone.channels())

        def fit(name, batches, per_position=False):  # one Gaussian per position: its [h·w, D, k] axes in float32
            moments = self.moments.setdefault(name, MomentAccumulator(torch.float64)) if c["updatable"] else None
            return fit_gaussian(batches, c["reduction"], c["variance"], self.device, c["covariance"], c["ridge"],
                                torch.float32 if per_position else torch.float64, moments)

        image_levels = c["levels"] if c["image_score"] != "map-max" else []
        jobs = [("image", level) for level in image_levels] + [("pixel", key) for key in pixel_keys(c)]
        for kind, key in tqdm(jobs, desc="fitting levels", disable=not self.progress):
            name = f"{kind}.{key}"
            if kind == "image":
                self.image_gaussians[key] = fit(name, lambda level=key: (
                    chunk.mean((2, 3))[:, None, :] for chunk in store.chunks(level, rows)))
            elif key in (STACKED, MAP_STACKED):  # all pixel levels of the same images at once
                self.pixel_gaussians[key] = fit(name, lambda key=key: (
                    positions(self._pixel_inputs(feats, key)[key], shared)
                    for feats in store.batches(rows, self.batch_size)), not shared)
            else:  # one level, read in chunks
                self.pixel_gaussians[key] = fit(name, lambda level=key: (
                    positions(self._pixel_inputs({level: chunk}, level)[level], shared)
                    for chunk in store.chunks(level, rows)), not shared)
        self.fit_info["channels"] = {str(key): int(g.mean.shape[1]) for key, g in self.pixel_gaussians.items()}
        return self

    def _pixel_inputs(self, feats: dict[int, torch.Tensor], only: int | str | None = None) -> dict:
        return pixel_inputs(self.config, self.channel_subsets, feats, self.device, only)

    @staticmethod
    def _score_scale(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """[[mean, std] of the pooled scores, [mean, std] of the map maxima] of normal images, from
        their _score_parts."""
        pooled = torch.cat([p[0] for p in parts]).double()
        maxima = torch.cat([p[1] for p in parts])
        scale = [[float(x.mean()), float(x.std()) if len(x) > 1 else 1.0] for x in (pooled, maxima)]
        return torch.tensor([[mean, std if std > 0 else 1.0] for mean, std in scale], dtype=torch.float64)

    def score_store(self, store: FeatureStore, rows: Sequence[int] | None = None) -> Scores:
        """Scores of images whose features were already extracted (all rows, or `rows`)."""
        self.check_fitted()
        return Scores.concatenate([self.score_features(feats) for feats in store.batches(rows, self.batch_size)])

    def score_batch(self, images_nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a preprocessed batch (RGB in [0, 1] at image size): ([n], [n, S, S])."""
        return self.score_features(self.backbone.extract(images_nchw))

    @torch.no_grad()
    def score_features(self, feats: dict[int, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores from {level: [n, C, h, w]} features: ([n] image scores, [n, S, S] maps)."""
        return self._scores(*self._score_parts(feats))

    def score_tensors(self, feats: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """score_features in torch, on the device: ([n] float64 image scores, [n, S, S] float32 maps).
        All torch operations, so gaussad.export can trace it into one graph with the backbone."""
        pooled, peak, pixel_map = self._score_parts(feats)
        return self._image_scores(pooled, peak), pixel_map

    def _scores(self, pooled: torch.Tensor | None, peak: torch.Tensor, pixel_map: torch.Tensor) -> tuple:
        """(image scores, maps) as numpy from the parts."""
        return self._image_scores(pooled, peak).cpu().numpy(), pixel_map.cpu().numpy()

    def _image_scores(self, pooled: torch.Tensor | None, peak: torch.Tensor) -> torch.Tensor:
        """[n] float64: the image score the config asks for, from the parts."""
        if self.config["image_score"] == "pooled":
            return pooled
        if self.config["image_score"] == "map-max":
            return peak
        scale = self.score_scale.to(peak.device)  # combined: each part in units of the normal images' spread
        return (pooled - scale[0, 0]) / scale[0, 1] + (peak - scale[1, 0]) / scale[1, 1]

    def _score_parts(self, feats: dict[int, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """([n] Σ over levels of the pooled features' distances, or None for map-max; [n] float64
        the maximum of the image score's map; [n, S, S] the anomaly map: the pixel Gaussians'
        distance maps upsampled, averaged and smoothed). The image score's map is the anomaly map,
        or with a second stacked Gaussian (map_local_average) the first one's map alone."""
        size, device = self.config["image_size"], self.device
        pooled = None
        for level, gaussian in self.image_gaussians.items():
            distance = gaussian.mahalanobis(feats[level].to(device).mean((2, 3))[:, None, :])[:, 0]
            pooled = distance if pooled is None else pooled + distance
        level_maps = {}
        gaussian_inputs = self._pixel_inputs(feats)
        for key, gaussian in self.pixel_gaussians.items():
            feats_nchw = gaussian_inputs[key]
            n, _, h, w = feats_nchw.shape
            vectors = positions(feats_nchw, self.config["spatial"] == "shared")
            distances = gaussian.mahalanobis(vectors).reshape(n, h, w).float()
            # upsampled bilinearly and smoothed (both linear: the mean over levels commutes with the
            # smoothing) by one matrix per side; int(): while export traces, a side may be a tensor,
            # and the matrices must be the cached constants, not traced computations
            rows, columns = (map_operator(int(side), size, self.config["smoothing"]).to(distances.device, torch.float32)
                             for side in (h, w))
            level_maps[key] = rows @ distances @ columns.T
        pixel_map = torch.stack(list(level_maps.values())).mean(0)
        peak_map = level_maps[STACKED] if MAP_STACKED in level_maps else pixel_map
        return pooled, peak_map.flatten(1).amax(1).double(), pixel_map

    @property
    def is_fitted(self) -> bool:
        return bool(self.pixel_gaussians)

    # ---- save / load --------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for kind, gaussians in (("image", self.image_gaussians), ("pixel", self.pixel_gaussians)):
            for level, gaussian in gaussians.items():
                for field in GAUSSIAN_FIELDS:
                    tensors[f"{kind}.{level}.{field}"] = getattr(gaussian, field).contiguous().cpu()
        for key, subset in self.channel_subsets.items():
            tensors[f"pixel.{key}.channels"] = subset.contiguous().cpu()
        if self.config["image_score"] == "combined":
            tensors["score_scale"] = self.score_scale.contiguous().cpu()
        return tensors | moment_tensors(self.moments)

    def _load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        c = self.config
        image_levels = c["levels"] if c["image_score"] != "map-max" else []
        pixel_gaussians = pixel_keys(c)
        for kind, target, levels in (("image", self.image_gaussians, image_levels),
                                     ("pixel", self.pixel_gaussians, pixel_gaussians)):
            for level in levels:
                try:
                    fields = [tensors[f"{kind}.{level}.{field}"] for field in GAUSSIAN_FIELDS]
                except KeyError as missing:
                    raise ModelFileError(f"{path} lacks tensor {missing}") from None
                target[level] = Gaussian(*fields).to(self.device)
        self.channel_subsets = {key: tensors[f"pixel.{key}.channels"] for key in pixel_gaussians
                                if f"pixel.{key}.channels" in tensors}
        if c["image_score"] == "combined":
            if "score_scale" not in tensors:
                raise ModelFileError(f"{path} lacks tensor 'score_scale'")
            self.score_scale = tensors["score_scale"].double()
        if c["updatable"]:
            names = [f"image.{level}" for level in image_levels] + [f"pixel.{key}" for key in pixel_gaussians]
            self.moments = load_moments(tensors, names, path)
        self._check_shapes(path.parent)

    def _check_shapes(self, directory: Path) -> None:
        """Each Gaussian against the features the backbone gives at this image size."""
        size, shared = self.config["image_size"], self.config["spatial"] == "shared"
        probe = self.backbone.extract(torch.zeros(1, 3, size, size))
        expected = [("image", level, self.image_gaussians.get(level), feats) for level, feats in probe.items()]
        expected += [("pixel", key, self.pixel_gaussians.get(key), f) for key, f in self._pixel_inputs(probe).items()]
        for kind, level, gaussian, feats_nchw in expected:
            if gaussian is None:  # a level of the other kind only
                continue
            _, channels, h, w = feats_nchw.shape
            want_groups = h * w if kind == "pixel" and not shared else 1
            g, d = gaussian.mean.shape
            k = gaussian.precision.shape[1]
            if (g, d) != (want_groups, channels) or tuple(gaussian.projection.shape) != (g, d, k):
                raise ModelFileError(
                    f"{directory}: {kind} statistics of level {level} have mean {tuple(gaussian.mean.shape)}, "
                    f"projection {tuple(gaussian.projection.shape)}, but {self.config['backbone']} at "
                    f"{size} px gives {want_groups} group(s) of {channels} channels"
                )
