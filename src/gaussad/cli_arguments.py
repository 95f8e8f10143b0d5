"""The command line's flags that say which model to build and how to run it, and what they build.

A model's settings come from, lowest first: the preset, a params.yaml (--config), then the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from gaussad.detector import Detector
from gaussad.detectors import DEFAULT_MODEL_TYPE, DETECTORS, detector_class, model_spec
from gaussad.features import RUNTIMES


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="dataset root (MVTec AD layout) or one category's folder")
    parser.add_argument("-c", "--category", help="category name (not needed when DATA is a category folder)")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, help="scoring batch (default 16)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--runtime", choices=RUNTIMES,
                        help="how the backbone runs (default: onnxruntime on a CPU, torch on a GPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# The flags of one model type only, by type: (flag, argparse options). A flag's name is its setting's
# (--image-size: image_size), and it is refused with another model type.
MODEL_TYPE_FLAGS = {
    "gaussian": [
        ("--levels", dict(type=int, nargs="+", help="feature levels (paper: 3 4 5 6 7)")),
        ("--reduction", dict(choices=("npca", "pca", "none"), help="default npca")),
        ("--variance", dict(type=float, help="variance fraction kept (default 0.05)")),
        ("--spatial", dict(choices=("shared", "per-location", "stacked"),
                           help="one Gaussian per level shared by all positions (default), one per position, "
                                "or the pixel levels stacked at the finest one, one per position")),
        ("--local-average", dict(type=int, help="average pixel features over k×k first (odd k; default 1: off)")),
        ("--local-weights", dict(choices=("box", "binomial"),
                                 help="the k×k average's weights: all alike (default) or the centre most")),
        ("--map-local-average", dict(type=int, help="stacked, map-max: a second Gaussian on k×k-averaged features "
                                                  "(1: none), its map averaged into the anomaly map")),
        ("--covariance", dict(choices=("ledoit-wolf", "ridge"), help="default ledoit-wolf")),
        ("--ridge", dict(type=float, help="ε of --covariance ridge (Σ + εI; default 0.01)")),
        ("--image-score", dict(choices=("pooled", "map-max", "combined"),
                               help="pooled features (the paper), the map's maximum, or both standardised")),
        ("--pixel-levels", dict(type=int, nargs="+", help="levels of the anomaly map (default: --levels)")),
        ("--smoothing", dict(type=float, help="σ in pixels of the map's Gaussian smoothing (0: none)")),
        ("--pixel-channels", dict(type=int, help="keep this many of each pixel Gaussian's input channels, chosen "
                                           "at random (seeded), as PaDiM (default: all)")),
    ],
    "piade": [
        ("--epochs", dict(type=int)),
        ("--train-batch-size", dict(type=int)),
        ("--learning-rate", dict(type=float)),
        ("--lambda-perceptual", dict(type=float, help="weight of the perceptual term (0: off)")),
        ("--lambda-ssim", dict(type=float, help="weight of the SSIM term (0: off)")),
        ("--early-stopping-patience", dict(type=int, help="epochs without improvement before stopping")),
        ("--checkpoint-dir", dict(type=Path, help="checkpoint every epoch here; a rerun resumes from it")),
    ],
}
FIT_FLAGS = ("holdout", "checkpoint_dir")  # arguments of fit(), not of the detector


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    parser.set_defaults(default_preset=default_preset)
    parser.add_argument("--config", type=Path, help="a params.yaml: its model_type and that type's block "
                                                    "(flags given here override it)")
    parser.add_argument("--model-type", choices=DETECTORS,
                        help="gaussian (default: Gaussians of pretrained features) or piade (a reconstruction network)")
    presets = sorted({name for detector in DETECTORS.values() for name in detector.PRESETS})
    parser.add_argument("--preset", choices=presets,
                        help=f"backbone, weights, levels and size together (default {default_preset}, or the "
                             "--config block's); 'lite0' works offline")
    parser.add_argument("--backbone", help="timm model name, overrides the preset")
    parser.add_argument("--weights", help="timm | file:<path> | package:efficientnet-lite0 | none")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--holdout", type=float, help="train fraction held out for thresholds (default 0.1)")
    parser.add_argument("--seed", type=int)
    for model_type, flags in MODEL_TYPE_FLAGS.items():
        group = parser.add_argument_group(f"{DETECTORS[model_type].NAME} only (--model-type {model_type})")
        for flag, options in flags:
            group.add_argument(flag, **options)
    add_runtime_arguments(parser)


def runtime_options(args: argparse.Namespace) -> dict:
    """How a loaded model runs: device, feature runtime, progress bars, scoring batch."""
    return {"device": args.device, "runtime": args.runtime, "progress": not args.quiet,
            "batch_size": 16 if args.batch_size is None else args.batch_size}


def model_from_arguments(args: argparse.Namespace) -> tuple[Detector, dict]:
    """The unfitted detector the flags (over --config, over the preset) describe, and fit()'s options."""
    params = read_config(args.config) if args.config else {}
    params["model_type"] = args.model_type or params.get("model_type", DEFAULT_MODEL_TYPE)
    for model_type, flags in MODEL_TYPE_FLAGS.items():
        given = [flag for flag, _ in flags if getattr(args, flag_setting(flag)) is not None]
        if model_type != params["model_type"] and given:
            raise ValueError(f"{given[0]} applies to --model-type {model_type}, not {params['model_type']}")
    detector = detector_class(params["model_type"])
    has_block = bool(params.get(detector.PARAMS_BLOCK))
    preset = args.preset or (None if has_block else args.default_preset)
    spec = model_spec(params, str(args.config or "the command line"), preset)
    flags = [("--backbone", None), ("--weights", None), ("--image-size", None), ("--seed", None),
             *MODEL_TYPE_FLAGS[params["model_type"]]]
    for flag, _ in flags:
        if getattr(args, flag_setting(flag)) is not None and flag_setting(flag) not in FIT_FLAGS:
            spec.settings[flag_setting(flag)] = getattr(args, flag_setting(flag))
    spec.holdout = args.holdout if args.holdout is not None else spec.holdout
    spec.batch_size = args.batch_size if args.batch_size is not None else spec.batch_size
    fit_options = {"holdout": spec.holdout}
    if getattr(args, "checkpoint_dir", None) is not None:
        fit_options["checkpoint_dir"] = args.checkpoint_dir
    return spec.build(device=args.device, runtime=args.runtime, progress=not args.quiet), fit_options


def read_config(path: Path) -> dict:
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} holds no settings (a YAML mapping like params.yaml)")
    return params


def flag_setting(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
