"""Tune GaussianAD's scoring options on one category: features extracted once, then each
configuration fitted and scored from them (so a configuration costs its fit, not an extraction).

    python benchmarks/tune_gaussian.py DATA CATEGORY [--image-size 224] [--out benchmarks/results/tune.json]

DATA is a folder in MVTec AD layout (benchmarks/elpv_data.py lays out ELPV so). Tune on ELPV
polycrystalline only: the monocrystalline cells are kept as a check. Prints image AUROC (and pixel
AUROC where masks exist), fit and score seconds per configuration, and the model's size in MB.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from gaussad.base_detector import Scores
from gaussad.data import load_category
from gaussad.evaluate import test_metrics
from gaussad.features import FeatureStore
from gaussad.gaussian import GaussianAD
from gaussad.networks import LITE0_PACKAGE

BASE = dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, levels=(3, 4, 5, 6, 7))
LITE0 = GaussianAD.PRESETS["lite0"]
# `lite0` of the first tuning session (stride 8): the base of the rows tuned from it, kept as it was
STRIDE8 = dict(backbone="tf_efficientnet_lite0", weights=LITE0_PACKAGE, levels=(3, 4, 5), pixel_levels=(3, 4, 5),
               image_size=224, spatial="stacked", local_average=3, covariance="ridge", ridge=0.1,
               image_score="map-max", smoothing=4.0)

PADIM = dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5), spatial="stacked", local_average=1, covariance="ridge",
             ridge=0.01, reduction="none", image_score="map-max", smoothing=4.0)


def stacked(levels: tuple[int, ...], average: int = 3, **settings) -> dict:
    """Pixel `levels` stacked, k×k `average`d, one Gaussian per position, the smoothed map's
    maximum as image score; `settings` on top."""
    return dict(pixel_levels=levels, spatial="stacked", local_average=average, image_score="map-max",
                smoothing=4) | settings


CONFIGS = {
    "paper-lite0": {},
    "map-max": dict(image_score="map-max", smoothing=4),
    "combined": dict(image_score="combined", smoothing=4),
    "per-location 2,3,5 map-max": dict(pixel_levels=(2, 3, 5), spatial="per-location", image_score="map-max",
                                       smoothing=4),
    "stacked 2,3,5 avg3 map-max": stacked((2, 3, 5)),
    "stacked 2,3,5 avg3 ridge none map-max": stacked((2, 3, 5), covariance="ridge", reduction="none"),
    "stacked 2,3,5 avg3 combined": stacked((2, 3, 5), image_score="combined"),
    "stacked 3,4,5 avg3 map-max": stacked((3, 4, 5)),
    "stacked 3,4,5 avg3 combined": stacked((3, 4, 5), image_score="combined"),
    "stacked 3,5 avg3 map-max": stacked((3, 5)),
    "stacked 3,4,5 avg3 ridge none map-max": stacked((3, 4, 5), covariance="ridge", reduction="none"),
    "stacked 3,4,5 avg5 map-max": stacked((3, 4, 5), average=5),
    "stacked 3,4,5 avg3 map-max σ2": stacked((3, 4, 5), smoothing=2),
    "stacked 2,3,5 ridge none map-max (PaDiM)": stacked((2, 3, 5), average=1, covariance="ridge", reduction="none"),
    "stacked 3,4,5 avg3 ridge npca map-max": stacked((3, 4, 5), covariance="ridge"),
    "stacked 3,4,5 avg3 ridge0.1 npca map-max": stacked((3, 4, 5), covariance="ridge", ridge=0.1),
    "stacked 3,4,5 avg3 ridge1 npca map-max": stacked((3, 4, 5), covariance="ridge", ridge=1.0),
    "stacked 2,3,5 avg3 ridge npca map-max": stacked((2, 3, 5), covariance="ridge"),
    "lite0": LITE0,
    "lite0 box average": LITE0 | dict(local_weights="box"),
    "stride 8 (lite0 before)": STRIDE8,
    "lite0 npca 0.02": STRIDE8 | dict(variance=0.02),
    "lite0 npca 0.01": STRIDE8 | dict(variance=0.01),
    "stacked 3,4,5 map-max": stacked((3, 4, 5), average=1),
    "lite0 stride 4": STRIDE8 | dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5)),
    "lite0 stride 4 σ2": STRIDE8 | dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5), smoothing=2),
    "lite0 stride 4 no average": STRIDE8 | dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5), local_average=1),
    **{f"lite0 stride 4 σ2 {c} channels": STRIDE8 | dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5), smoothing=2,
                                                      pixel_channels=c) for c in (64, 100, 128)},
    **{f"lite0 stride 4 {c} channels": STRIDE8 | dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5), pixel_channels=c)
       for c in (64, 100)},
    "lite0 stride 4 levels 2-5 σ2 128 channels": STRIDE8 | dict(levels=(2, 3, 4, 5), pixel_levels=(2, 3, 4, 5),
                                                              smoothing=2, pixel_channels=128),
    **{f"lite0 stride 4 levels 2-5 σ2 128 channels {name}": STRIDE8 | dict(
        levels=(2, 3, 4, 5), pixel_levels=(2, 3, 4, 5), smoothing=2, pixel_channels=128) | settings
       for name, settings in {"all axes": dict(reduction="none"), "npca 0.1": dict(variance=0.1),
                              "ridge 0.01": dict(ridge=0.01), "σ4": dict(smoothing=4.0),
                              "no average": dict(local_average=1)}.items()},
    # from lite0 one setting at a time towards PaDiM's model (levels 2,3,5 all channels, no average,
    # all axes, ridge 0.01, σ 4), which reproduces anomalib's PaDiM on the demo's weave
    "PaDiM's model": PADIM,
    **{f"lite0 {name}": LITE0 | settings for name, settings in {
        "σ4": dict(smoothing=4.0), "no average": dict(local_average=1), "all channels": dict(pixel_channels=None),
        "levels 2,3,5": dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5)), "all axes": dict(reduction="none"),
        "ridge 0.01": dict(ridge=0.01),
        **{f"no average {c} channels": dict(local_average=1, pixel_channels=c) for c in (64, 96)}}.items()},
    **{f"PaDiM's model {name}": PADIM | settings for name, settings in {
        "binomial average": dict(local_average=3, local_weights="binomial"), "σ2": dict(smoothing=2.0),
        "128 channels": dict(pixel_channels=128), "npca 0.05": dict(reduction="npca"),
        "ridge 0.1": dict(ridge=0.1), "levels 2-5": dict(levels=(2, 3, 4, 5), pixel_levels=(2, 3, 4, 5))}.items()},
    **{f"lite0 stride 4 σ2 {c} channels all axes": STRIDE8 | dict(levels=(2, 3, 5), pixel_levels=(2, 3, 5),
                                                               smoothing=2, pixel_channels=c, reduction="none")
       for c in (64, 100)},
}


# An experiment only: the Gaussians fitted without the local average, the test features averaged
SCORED_AVERAGE = "scored with local_average"
CONFIGS["lite0 fitted unaveraged, scored averaged"] = LITE0 | {"local_average": 1, SCORED_AVERAGE: 3}
CONFIGS["lite0 fitted unaveraged, scored averaged σ4"] = LITE0 | {"local_average": 1, SCORED_AVERAGE: 3,
                                                                  "smoothing": 4.0}

# Image scores of one configuration with the maps of another (or the mean of both maps): what two
# Gaussians in one model would give
HYBRIDS = {"unaveraged Gaussians: image score from averaged features, no-average map": (
               "lite0 fitted unaveraged, scored averaged", "lite0 no average"),
           "unaveraged Gaussians: image score from averaged features, mean map": (
               "lite0 fitted unaveraged, scored averaged",
               ("lite0 fitted unaveraged, scored averaged", "lite0 no average")),
           "lite0 image score, mean of its map and the no-average map": ("lite0", ("lite0", "lite0 no average")),
           "lite0 image score, no-average map": ("lite0", "lite0 no average"),
           "lite0 image score, PaDiM's map": ("lite0", "PaDiM's model"),
           **{f"lite0 image score, no-average {c}-channel map": ("lite0", f"lite0 no average {c} channels")
              for c in (64, 96)}}


def _row(name: str, metrics: dict, settings: dict, **extra) -> dict:
    rounded = {key: metrics[key] and round(metrics[key], 4) for key in ("image_auroc", "pixel_auroc", "aupro")}
    return {"config": name, **rounded, **extra, "settings": settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("category")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    category = load_category(args.data, args.category)
    all_levels = sorted({2, 3, 4, 5, 6, 7})
    extractor = GaussianAD(**{**BASE, "pixel_levels": all_levels}, image_size=args.image_size, progress=True)
    rows, scored_by = [], {}
    with tempfile.TemporaryDirectory(prefix="gaussad-tune-") as tmp:
        train = FeatureStore.write(extractor.backbone, category.train.paths, Path(tmp) / "train", 16, True, "train")
        test = FeatureStore.write(extractor.backbone, category.test.paths, Path(tmp) / "test", 16, True, "test")
        for name in args.configs:
            settings = dict(CONFIGS[name])
            scored_average = settings.pop(SCORED_AVERAGE, None)
            model = GaussianAD(**{**BASE, **settings, "image_size": args.image_size}, progress=False)
            model.backbone = extractor.backbone  # the features are in the stores; no second network
            started = time.perf_counter()
            model.fit_store(train)
            fitted = time.perf_counter()
            if scored_average:  # the Gaussians of unaveraged features score averaged ones
                model.config["local_average"] = scored_average
            scores = model.score_store(test)
            scored = time.perf_counter()
            metrics = test_metrics(category, scores, args.image_size)
            size_mb = sum(t.numel() * t.element_size() for t in model._tensors().values()) / 2**20
            row = _row(name, metrics, CONFIGS[name], fit_s=round(fitted - started, 1),
                       score_s=round(scored - fitted, 1), model_mb=round(size_mb, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
            scored_by[name] = scores
    for name, (image_from, maps_from) in HYBRIDS.items():
        maps_from = (maps_from,) if isinstance(maps_from, str) else maps_from
        if {image_from, *maps_from} <= set(scored_by):
            scores = Scores(scored_by[image_from].image, np.mean([scored_by[m].maps for m in maps_from], 0))
            rows.append(_row(name, test_metrics(category, scores, args.image_size),
                             {"image scores": image_from, "maps": maps_from}))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"data": args.data, "category": args.category, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
