"""The `gaussad` commands that use a fitted model on images: update, monitor, predict, export; and the plain
tables the commands print.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from gaussad.base_detector import Detector
from gaussad.cli_arguments import add_runtime_arguments, runtime_options
from gaussad.data import IMAGE_SUFFIXES, ImageSet, read_rgb, validate_images
from gaussad.detectors import load_model
from gaussad.export import MAP_TOLERANCE, SCORE_TOLERANCE, ExportedDetector, export_onnx
from gaussad.gaussian.updates import check_updatable
from gaussad.model_folder import folder_megabytes
from gaussad.monitoring import ALPHA, monitor
from gaussad.output_folders import check_model_destination, check_output_folder, claim_output_folder
from gaussad.validation import check_number


def add_model_commands(commands) -> None:
    """update, monitor, predict and export, as subcommands of `commands` (argparse's subparsers)."""
    update = commands.add_parser("update", help="add defect-free images (files or folders) to a model fitted with "
                                                "--updatable, exactly, without its old images")
    update.add_argument("model", type=Path, help="model folder written by `gaussad fit --updatable`")
    update.add_argument("images", type=Path, nargs="+")
    update.add_argument("-o", "--out", "--output", dest="output", metavar="MODEL", type=Path, required=True,
                        help="the updated model folder to write")
    update.add_argument("--holdout", type=float, default=0.1,
                        help="fraction of the new images held out for the thresholds (default 0.1)")
    add_runtime_arguments(update)
    update.set_defaults(run=_update)

    monitor = commands.add_parser("monitor", help="test production images (or predict's scores) for drift "
                                                  "against the model's held-out normal images")
    monitor.add_argument("model", type=Path, help="model folder, or an ONNX file written by `gaussad export`")
    monitor.add_argument("images", type=Path, nargs="*", help="images or folders, in arrival order")
    monitor.add_argument("-o", "--out", type=Path, required=True, help="folder for monitor.json, monitor.png")
    monitor.add_argument("--scores", type=Path, help="predictions.csv of `gaussad predict`, instead of images")
    monitor.add_argument("--window", type=int, help="test each window of N images too (default: all at once)")
    monitor.add_argument("--alpha", type=float, default=ALPHA, help=f"test level (default {ALPHA})")
    add_runtime_arguments(monitor)
    monitor.set_defaults(run=_monitor)

    predict = commands.add_parser("predict", help="score images (files or folders) with a fitted model")
    predict.add_argument("model", type=Path, help="model folder, or an ONNX file written by `gaussad export`")
    predict.add_argument("images", type=Path, nargs="+")
    predict.add_argument("-o", "--out", type=Path, default=Path("predictions"), help="folder for overlays + CSV")
    predict.add_argument("--threshold", help="a number, or a threshold name in the model's config "
                                             "(default: image_f1_optimal if evaluated, else image_normal_quantile)")
    add_runtime_arguments(predict)
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="write a fitted Gaussian model as one ONNX graph (image -> score, map) "
                                                "that `predict` runs; checked to score as the model does")
    export.add_argument("model", type=Path, help="model folder written by `gaussad fit`")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("-o", "--out", "--output", dest="output", metavar="FILE", type=Path,
                        help="the file to write (default: MODEL.onnx beside the folder)")
    export.set_defaults(run=_export)


def _update(args: argparse.Namespace) -> None:
    check_model_destination(args.output)  # a user's folder or file is never replaced
    model = load_model(args.model, **runtime_options(args))
    if not hasattr(model, "update"):
        raise ValueError(f"{args.model} is a {model.NAME} model: only Gaussian models update (fit it again)")
    check_updatable(model)  # before any image is read
    images = ImageSet.from_paths(expand_image_arguments(args.images))
    validate_images(images)
    before = model.fit_info["n_train_images"]
    model.update(images, holdout=args.holdout)
    model.save(args.output)
    update = model.fit_info["updates"][-1]
    print(f"added {update['n_added']} images to {args.model} ({before} -> {model.fit_info['n_train_images']}), "
          f"{update['n_held_out']} held out; thresholds from {model.fit_info['n_holdout_images']} held-out images "
          f"-> {args.output} ({folder_megabytes(args.output):.1f} MB)")


def _export(args: argparse.Namespace) -> None:
    output = args.output or args.model.with_name(f"{args.model.name}.onnx")
    model = load_model(args.model, device="cpu", runtime="torch", progress=False)
    export_onnx(model, output)
    print(f"exported {args.model} -> {output} (scores as the model within {SCORE_TOLERANCE:g}, maps within "
          f"{MAP_TOLERANCE:g}); run it with `gaussad predict {output} IMAGES`")


def _monitor(args: argparse.Namespace) -> None:
    from gaussad.plots import save_monitor_plot

    if bool(args.images) == bool(args.scores):
        raise ValueError("give the production images or --scores predictions.csv (one of the two)")
    if args.window is not None:
        check_number("--window", args.window, int, 1)
    check_number("--alpha", args.alpha, float, 0, 1, open_low=True, open_high=True)
    check_output_folder(args.out, "monitoring")
    model = _load(args)
    normal = model.fit_info.get("normal_image_scores", [])
    if args.scores:
        table = pandas_module().read_csv(args.scores)
        if "score" not in table.columns:
            raise ValueError(f"{args.scores} has no `score` column (is it a predictions.csv of gaussad predict?)")
        names, scores = list(table.get("path", range(len(table)))), table["score"].to_numpy(float)
        map_means = table["map_mean"].to_numpy(float) if "map_mean" in table.columns else None
    else:
        images = ImageSet.from_paths(expand_image_arguments(args.images))
        validate_images(images)
        scored = model.score(images)
        names, scores, map_means = [str(p) for p in images.paths], scored.image, scored.maps.mean((1, 2))
    report = monitor(scores, normal, model.decision_threshold, model.config.get("false_alarm_rate"), args.window,
                     args.alpha, map_means, model.fit_info.get("normal_map_means"))
    report.update(model=str(args.model), decision_threshold_name=model.decision_threshold_name, images=names)
    claim_output_folder(args.out, "monitoring")
    (args.out / "monitor.json").write_text(json.dumps(report, indent=2))
    save_monitor_plot(scores, normal, model.decision_threshold, report, args.out / "monitor.png", args.model.name)
    verdict = "DRIFT" if report["drift"] else "no drift"
    print(f"{verdict}: {report['alarms']} alarms in {report['n_images']} images (rate {report['alarm_rate']:.3f}, "
          f"normal {report['expected_alarm_rate']:.3f}), scores against the normal ones: KS "
          f"{report['ks_statistic']:.3f}; p = {report['p_value']:.3g}; drift in {len(report['drift_windows'])} of "
          f"{len(report['windows'])} window(s); {args.out / 'monitor.json'}, monitor.png")


def _load(args: argparse.Namespace) -> Detector:
    """The model folder or exported file `args.model`, run as the runtime flags say."""
    if args.model.suffix == ".onnx":
        return ExportedDetector.load(args.model, **runtime_options(args))
    return load_model(args.model, **runtime_options(args))


def _predict(args: argparse.Namespace) -> None:
    from gaussad.plots import save_overlay

    check_output_folder(args.out, "predictions")
    model = _load(args)
    images = ImageSet.from_paths(expand_image_arguments(args.images))
    validate_images(images)
    threshold = _threshold(model, args.threshold)
    claim_output_folder(args.out, "predictions")
    scores = model.score(images)
    vmin, vmax = model.display_range()
    rows = []
    for path, score, anomaly_map in zip(images.paths, scores.image, scores.maps):
        label = "anomalous" if score >= threshold else "normal"
        overlay = args.out / f"{path.stem}_overlay.png"
        save_overlay(np.asarray(read_rgb(path)), anomaly_map, overlay, f"{path.name}: {label} ({score:.2f})",
                     vmin, vmax, threshold=model.thresholds["pixel_normal_quantile"])
        rows.append({"path": str(path), "score": float(score), "label": label, "overlay": str(overlay),
                     "map_mean": float(anomaly_map.mean(dtype=np.float64))})
    pd = pandas_module()
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "predictions.csv", index=False)
    print(format_table(table[["path", "score", "label"]]))
    name = model.decision_threshold_name if args.threshold is None else args.threshold
    print(f"threshold {name} {threshold:.4g}{_budget_note(model)}; overlays and predictions.csv in {args.out}")


def expand_image_arguments(arguments: list[Path]) -> list[Path]:
    paths: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            paths.extend(sorted(p for p in argument.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif argument.is_file():
            paths.append(argument)
        else:
            raise FileNotFoundError(f"no such image or folder: {argument}")
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, arguments))}")
    return paths


def _budget_note(model: Detector) -> str:
    """', at most 1 % false alarms (95 % bound 0.8 %)' for a model fitted on a false-alarm budget."""
    budget = model.config.get("false_alarm_rate")
    if budget is None:
        return ""
    bound = model.fit_info.get("false_alarm_bound")
    bound_text = f", {model.fit_info.get('false_alarm_confidence', 0.95):.0%} bound {bound:.3g}" if bound else ""
    return f" (false-alarm budget {budget:g}{bound_text})"


def _threshold(model: Detector, choice: str | None) -> float:
    if choice is None:
        return model.decision_threshold
    if choice in model.thresholds:
        return model.thresholds[choice]
    try:
        return float(choice)
    except ValueError:
        raise ValueError(f"--threshold {choice!r} is neither a number nor one of {sorted(model.thresholds)}") from None


def format_table(table) -> str:
    """A DataFrame, or a list of rows, as a plain text table."""
    return (table if hasattr(table, "to_string") else pandas_module().DataFrame(table)).to_string(index=False)


def pandas_module():
    """pandas, imported by the commands that print tables (see the module docstring)."""
    import pandas

    return pandas
