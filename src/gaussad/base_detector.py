"""The interface every detector implements, and what they all share.

A detector is fitted on defect-free images and scores images: `Scores` holds one anomaly score per
image and one map per image at the model's image size. Each detector class names its `MODEL_TYPE`
(the key of the table in gaussad.detectors and of config.json's `model_type`), its `SETTINGS`
(gaussad.settings: the table of what its constructor takes and config.json keeps), its `PRESETS`,
the `PARAMS_BLOCK` of params.yaml it reads, and what it can do (EXPORTS_ONNX, FITS_FROM_FEATURES,
RECONSTRUCTS, its TENSORS_FILE and the NETWORK_SETTINGS that name its networks and weights); the
registry, the flows, output folders and the CLI read these rather than know the classes.
Constructors only check and keep the settings: networks are built when first needed.

Shared here: thresholds from defect-free scores, the seeded hold-out split, scoring image files in
batches, the not-fitted check, and saving to / loading from a model folder (gaussad.model_folder).
A subclass implements `fit`, `score_batch`, `is_fitted`, `_tensors` and `_load_tensors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Collection, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gaussad import __version__
from gaussad.data import ImageSet
from gaussad.errors import ModelFileError, NotFittedError
from gaussad.false_alarms import CONFIDENCE, budget_threshold, images_needed
from gaussad.features import image_batches
from gaussad.model_folder import read_model_folder, rewrite_config, write_model_folder
from gaussad.networks import resolve_device
from gaussad.settings import Setting, SettingsTable
from gaussad.validation import check_choice, check_number

FORMAT_VERSION = 2  # 2: config.json carries the digest of config + tensors
PIXEL_NORMAL_QUANTILE = 0.999
# config.json keys that describe the folder, not the detector's settings or its fit
FOLDER_KEYS = ("format_version", "gaussad_version", "model_type", "thresholds", "digest")
# Every detector's: the image threshold on a false-alarm budget (gaussad.false_alarms)
FALSE_ALARM_RATE = Setting(
    "false_alarm_rate", "float", None, "the image threshold at this false-alarm rate: the lowest whose 95 % upper "
    "bound from the held-out normal images is within it (none: the normal_quantile threshold decides)",
    minimum=0, maximum=1, open_low=True, open_high=True, optional=True, before=None)
# The image thresholds, first the one `predict` decides with (see Detector.decision_threshold)
THRESHOLD_ORDER = ("image_false_alarm", "image_f1_optimal", "image_normal_quantile")


@dataclass
class Scores:
    image: np.ndarray  # [N] image anomaly scores
    maps: np.ndarray  # [N, S, S] float32 pixel anomaly scores at the model's image size

    @classmethod
    def concatenate(cls, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> "Scores":
        """One Scores from per-batch (image scores, maps) pairs."""
        return cls(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


class Detector:
    """fit / score / save / load, thresholds and presets (see the module docstring)."""

    MODEL_TYPE: ClassVar[str]
    NAME: ClassVar[str]  # for people: messages, help, tables
    SETTINGS: ClassVar[SettingsTable]
    PRESETS: ClassVar[dict[str, dict]]
    PARAMS_BLOCK: ClassVar[str]
    TENSORS_FILE: ClassVar[str]
    RECONSTRUCTS: ClassVar[bool] = False  # whether it has reconstruct(images) for pictures
    EXPORTS_ONNX: ClassVar[bool] = False  # whether gaussad.export can write it as one ONNX graph
    # whether it fits from stored features (feature_settings, feature_extractor, fit_store, score_store),
    # so the flows extract them once as a task of their own; else it trains on the images (fit)
    FITS_FROM_FEATURES: ClassVar[bool] = False
    CHECKPOINTS: ClassVar[bool] = False  # whether fit() takes checkpoint_dir (trains in epochs, resumes)
    NETWORK_SETTINGS: ClassVar[tuple[str, ...]] = ()  # the settings naming its networks and weight sources

    config: dict  # the SETTINGS, validated
    thresholds: dict[str, float]
    fit_info: dict  # what fitting measured (timings, image counts, ...), saved with the config
    device: torch.device
    runtime: str | None  # of the backbone features (gaussad.features.RUNTIMES; None: the device's default)
    batch_size: int
    progress: bool

    def _configure(self, settings: dict, check_effect: bool | Collection[str] = True) -> None:
        """self.config from `settings` over the defaults, checked (a bad value or a setting without
        effect: ValueError); a saved folder's config is loaded with check_effect False."""
        self.config = self.SETTINGS.validate(settings, check_effect=check_effect)

    def record_fit(self, seconds: float, n_fit: int, n_holdout: int, **measured) -> None:
        """fit_info: the fit's time, the image counts, where the thresholds come from, and `measured`."""
        self.fit_info.update(
            fit_seconds=round(seconds, 3), **measured, n_train_images=n_fit, n_holdout_images=n_holdout,
            threshold_source="held-out training images" if n_holdout else "training images (in-sample)")

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "Detector":
        """A detector with PRESETS[preset] settings, any of them (or any other argument) overridden;
        an override without effect is refused, the preset's own values never are."""
        check_choice(f"{cls.NAME} preset", preset, cls.PRESETS)
        settings = {key: value for key, value in overrides.items() if key in cls.SETTINGS.names}
        runtime = {key: value for key, value in overrides.items() if key not in settings}
        return cls.from_settings({**cls.PRESETS[preset], **settings}, set(settings), **runtime)

    @classmethod
    def from_settings(cls, settings: dict, check_effect: bool | Collection[str] = True, **runtime) -> "Detector":
        """A detector with `settings`, their effect checked as SettingsTable.validate says; `runtime`:
        the constructor's other arguments (device, batch_size, progress, ...)."""
        model = cls(**runtime)
        model._configure(settings, check_effect)
        return model

    def _set_runtime(self, device, batch_size: int, progress: bool, runtime: str | None = None) -> None:
        """How the detector runs (not what it is, so not saved): device, feature runtime, scoring batch,
        progress bars."""
        self.device = resolve_device(device)
        self.runtime = runtime
        self.batch_size = check_number("batch_size", batch_size, int, 1)
        self.progress = progress
        self.thresholds, self.fit_info = {}, {}

    # ---- to implement ----------------------------------------------------------------------------

    def fit(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1) -> "Detector":
        raise NotImplementedError

    def score_batch(self, images_nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a preprocessed batch (RGB in [0, 1] at image size): ([n], [n, S, S] float32)."""
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the saved model needs, on the CPU, contiguous."""
        raise NotImplementedError

    def _load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Take the fitted state from a saved model's tensors (read from `path`), checking shapes."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for people: what the detector is (backbone, main settings)."""
        raise NotImplementedError

    # ---- scoring ---------------------------------------------------------------------------------

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"the model is not fitted: call fit() or {type(self).__name__}.load() first")

    def score(self, images: ImageSet | Sequence[str | Path]) -> Scores:
        """Image scores [N] and pixel maps [N, S, S] for image files."""
        self.check_fitted()
        paths = image_paths(images)
        batches = image_batches(paths, self.config["image_size"], self.batch_size, self.device)
        total = math.ceil(len(paths) / self.batch_size)
        progress = tqdm(batches, total=total, desc="scoring", unit="batch", disable=not self.progress)
        return Scores.concatenate([self.score_batch(batch) for batch in progress])

    # ---- thresholds ------------------------------------------------------------------------------

    def set_normal_thresholds(self, normal: Scores) -> None:
        """Thresholds from defect-free scores alone, usable where no defect is labelled; with a
        `false_alarm_rate`, the threshold on that budget (gaussad.false_alarms). The image scores
        are kept (fit_info `normal_image_scores`), and the mean of each one's map (`normal_map_means`):
        the evidence the thresholds rest on, which gaussad.monitoring tests production images against."""
        q = self.config["normal_quantile"]
        self.thresholds["image_normal_quantile"] = float(np.quantile(normal.image, q))
        self.thresholds["pixel_normal_quantile"] = float(np.quantile(normal.maps, PIXEL_NORMAL_QUANTILE))
        self.thresholds["pixel_normal_median"] = float(np.median(normal.maps))
        self.fit_info["normal_image_scores"] = [float(s) for s in normal.image]
        self.fit_info["normal_map_means"] = [float(m) for m in normal.maps.mean((1, 2), dtype=np.float64)]
        budget = self.config.get("false_alarm_rate")
        if budget is not None:
            chosen = budget_threshold(normal.image, budget)
            self.thresholds["image_false_alarm"] = chosen.threshold
            self.fit_info.update(false_alarm_bound=chosen.bound, false_alarm_confidence=CONFIDENCE,
                                 held_out_alarms=chosen.held_out_alarms)

    def check_false_alarm_evidence(self, n_images: int, holdout: float) -> None:
        """Before any compute: ValueError if a fit on `n_images` with this hold-out fraction keeps too
        few normal images back to certify the false_alarm_rate (the message says how many would)."""
        budget = self.config.get("false_alarm_rate")
        if budget is None:
            return
        fit_rows, held_rows = split_holdout(n_images, holdout, self.config["seed"])
        needed = images_needed(budget)
        if len(held_rows or fit_rows) < needed:
            raise ValueError(f"false_alarm_rate {budget:g} needs at least {needed} held-out normal images (at "
                             f"{CONFIDENCE:.0%} confidence); {n_images} training images with holdout {holdout:g} "
                             f"hold out {len(held_rows)}: add defect-free training images, raise the hold-out "
                             f"fraction to {min(0.9, needed / max(n_images, 1)):.2g} or more, or raise the budget")

    @property
    def decision_threshold(self) -> float:
        """The image threshold `predict` uses: the false-alarm budget's if one was set, else F1-optimal
        once evaluated on labelled data, else the normal quantile."""
        for name in THRESHOLD_ORDER:
            if name in self.thresholds:
                return self.thresholds[name]
        raise KeyError("the model has no image threshold")

    @property
    def decision_threshold_name(self) -> str:
        return next(name for name in THRESHOLD_ORDER if name in self.thresholds)

    def display_range(self) -> tuple[float, float]:
        """A fixed heat-map colour range per model, so pictures compare: from the median normal pixel
        score to 1.5 times as far above it as the pixel threshold (so red means well above normal)."""
        low, threshold = self.thresholds["pixel_normal_median"], self.thresholds["pixel_normal_quantile"]
        return low, low + 1.5 * (threshold - low)

    # ---- save / load -----------------------------------------------------------------------------

    def to_config(self) -> dict:
        """config.json: the folder's format, the settings, the thresholds and what fitting measured."""
        return {
            "format_version": FORMAT_VERSION,
            "gaussad_version": __version__,
            "model_type": self.MODEL_TYPE,
            **self.config,
            "thresholds": self.thresholds,
            **self.fit_info,
        }

    def save(self, directory: str | Path) -> Path:
        """Write config.json + the tensors file; the folder appears whole or not at all. Into a folder
        that holds the same tensors already (evaluate saving thresholds), only config.json is new."""
        if not self.is_fitted:
            raise NotFittedError("the model is not fitted: nothing to save")
        tensors = self._tensors()
        if (Path(directory) / "config.json").is_file():
            kept = rewrite_config(directory, tensors, self.TENSORS_FILE, self.to_config())
            if kept is not None:
                return kept
        return write_model_folder(directory, tensors, self.TENSORS_FILE, self.to_config())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None, progress: bool = True,
             batch_size: int = 16, runtime: str | None = None) -> "Detector":
        """Rebuild a saved model; its format, settings and tensor shapes are checked."""
        resolve_device(device)  # checked first: a bad device is the caller's error, not the folder's
        check_number("batch_size", batch_size, int, 1)
        directory = Path(directory)
        config_path = directory / "config.json"
        saved, tensors = read_model_folder(directory, cls.MODEL_TYPE, FORMAT_VERSION, cls.TENSORS_FILE)
        saved = {**cls.SETTINGS.added_since(), **saved}  # settings newer than the folder: their old meaning
        missing = [key for key in cls.SETTINGS.names if key not in saved]
        if missing:
            raise ModelFileError(f"{config_path} lacks the key(s) {', '.join(missing)}")
        try:
            settings = {key: saved[key] for key in cls.SETTINGS.names}
            model = cls._unfitted(settings, device, progress, batch_size, runtime)
            model._load_tensors(tensors, directory / cls.TENSORS_FILE)  # builds the networks
        except ModelFileError:
            raise
        except (ValueError, TypeError) as err:  # a bad value, or a backbone (or level) the network lacks
            raise ModelFileError(f"{config_path}: {err}") from None
        model.thresholds = dict(saved.get("thresholds", {}))
        model.fit_info = {k: v for k, v in saved.items() if k not in cls.SETTINGS.names and k not in FOLDER_KEYS}
        return model

    @classmethod
    def _unfitted(cls, config: dict, device, progress: bool, batch_size: int, runtime: str | None) -> "Detector":
        """The detector a saved config describes, before its tensors are loaded."""
        model = cls(device=device, progress=progress, batch_size=batch_size, runtime=runtime)
        model._configure(config, check_effect=False)
        return model


def split_holdout(n_images: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of training image indices into (fit, held out); no hold-out below 2 fit images."""
    check_number("holdout", holdout, float, 0, 1, open_high=True)
    if n_images < 2:
        raise ValueError(f"fitting needs at least 2 training images, got {n_images}")
    n_holdout = int(round(n_images * holdout))
    if n_images - n_holdout < 2:
        n_holdout = 0
    order = np.random.default_rng(seed).permutation(n_images)
    return sorted(order[n_holdout:].tolist()), sorted(order[:n_holdout].tolist())


def image_paths(images: ImageSet | Sequence[str | Path]) -> list[Path]:
    """The files of an ImageSet, or a sequence of paths, as Paths."""
    return list(images.paths) if isinstance(images, ImageSet) else [Path(p) for p in images]
