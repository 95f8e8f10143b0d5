"""The `gaussad` command: demo-data, fit, evaluate, predict, demo.

A user error (bad path, unreadable image, missing mask, unknown category, unloadable weights, bad
model folder, an output path holding files gaussad did not write) ends in one line
`gaussad: error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from gaussad.data import IMAGE_SUFFIXES, ImageSet, list_categories, load_category, read_rgb, validate_images
from gaussad.demo import DEMO_CATEGORIES, write_demo_dataset
from gaussad.evaluate import evaluate
from gaussad.errors import GaussadError
from gaussad.model import PRESETS, GaussianAD, load_model
from gaussad.output_folders import check_model_destination, check_output_folder, claim_output_folder
from gaussad.piade import PiadeAD
from gaussad.plots import save_overlay

# OSError: missing files, permissions, a full disk, an unreachable tracking server
USER_ERRORS = (GaussadError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # gaussad refuses images above Pillow's warning bound with an error of its own (gaussad.data)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        args.run(args)
    except USER_ERRORS as err:
        print(f"gaussad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gaussad: interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaussad", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo_data = commands.add_parser("demo-data", help="write the synthetic demo dataset (MVTec AD layout)")
    demo_data.add_argument("directory", type=Path)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument("--categories", nargs="+", choices=DEMO_CATEGORIES)
    demo_data.set_defaults(run=_demo_data)

    fit = commands.add_parser("fit", help="fit a model on a category's train/good images")
    _add_dataset_arguments(fit)
    fit.add_argument("-o", "--model", type=Path, required=True, help="model folder to write")
    _add_model_arguments(fit)
    fit.set_defaults(run=_fit)

    ev = commands.add_parser("evaluate", help="score a category's test split; write metrics and pictures")
    ev.add_argument("model", type=Path, help="model folder written by `gaussad fit`")
    _add_dataset_arguments(ev)
    ev.add_argument("-o", "--out", type=Path, required=True, help="folder for metrics.json, scores.csv, plots")
    ev.add_argument("--overlays", type=int, default=8, help="heat-map overlays to draw (default 8)")
    _add_runtime_arguments(ev)
    ev.set_defaults(run=_evaluate)

    predict = commands.add_parser("predict", help="score images (files or folders) with a fitted model")
    predict.add_argument("model", type=Path)
    predict.add_argument("images", type=Path, nargs="+")
    predict.add_argument("-o", "--out", type=Path, default=Path("predictions"), help="folder for overlays + CSV")
    predict.add_argument("--threshold", help="a number, or a threshold name in the model's config "
                                             "(default: image_f1_optimal if evaluated, else image_normal_quantile)")
    _add_runtime_arguments(predict)
    predict.set_defaults(run=_predict)

    serve = commands.add_parser("serve", help="retrain on a cron schedule as a Prefect deployment (needs a server)")
    serve.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (03:00 daily)')
    serve.add_argument("--data", type=Path, required=True, help="dataset root (MVTec AD layout)")
    serve.add_argument("--params", type=Path, default=Path("params.yaml"))
    serve.add_argument("--out", type=Path, default=Path("outputs/pipeline"))
    serve.add_argument("--cache-dir", type=Path)
    serve.set_defaults(run=_serve)

    log = commands.add_parser("log", help="log a pipeline run folder (flows/train.py --out) to MLflow and "
                                          "register its models")
    log.add_argument("run_dir", type=Path)
    log.add_argument("--experiment", default="gaussad")
    log.add_argument("--no-register", dest="register", action="store_false", help="log runs only")
    log.set_defaults(run=_log)

    promote = commands.add_parser("promote", help="make a registered model's challenger the champion if it is "
                                                  "at least as good on the same test data")
    promote.add_argument("name", help="registered model, e.g. gaussad-mvtec-bottle")
    promote.add_argument("--metric", default="image_auroc",
                         choices=("image_auroc", "pixel_auroc", "aupro", "f1", "balanced_accuracy"))
    promote.add_argument("--data", type=Path, help="dataset root to compare on (default: the challenger's)")
    promote.add_argument("--force", action="store_true", help="promote whatever the comparison says")
    promote.set_defaults(run=_promote)

    demo = commands.add_parser("demo", help="demo data -> fit and evaluate every category -> results table")
    demo.add_argument("--data", type=Path, default=Path("data/demo"))
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    _add_model_arguments(demo, default_preset="lite0")
    demo.set_defaults(run=_demo)
    return parser


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="dataset root (MVTec AD layout) or one category's folder")
    parser.add_argument("-c", "--category", help="category name (not needed when DATA is a category folder)")


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_model_arguments(parser: argparse.ArgumentParser, default_preset: str = "paper") -> None:
    parser.add_argument("--model-type", choices=("gaussian", "piade"), default="gaussian",
                        help="gaussian (default: Gaussians of pretrained features) or piade (a reconstruction network)")
    parser.add_argument("--preset", choices=PRESETS, default=default_preset,
                        help=f"backbone, weights, levels and size together (default {default_preset}); "
                             "'lite0' works offline")
    parser.add_argument("--backbone", help="timm model name, overrides the preset")
    parser.add_argument("--weights", help="timm | file:<path> | package:efficientnet-lite0 | none")
    parser.add_argument("--levels", type=int, nargs="+")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--reduction", choices=("npca", "pca", "none"), default="npca")
    parser.add_argument("--variance", type=float, default=0.05, help="variance fraction kept (default 0.05)")
    parser.add_argument("--spatial", choices=("shared", "per-location"), default="shared")
    parser.add_argument("--holdout", type=float, default=0.1, help="train fraction held out for thresholds")
    parser.add_argument("--seed", type=int, default=0)
    piade = parser.add_argument_group("PIADE (--model-type piade; defaults: the preset, i.e. Table 1 of the paper)")
    piade.add_argument("--epochs", type=int)
    piade.add_argument("--train-batch-size", type=int)
    piade.add_argument("--learning-rate", type=float)
    piade.add_argument("--lambda-perceptual", type=float, help="weight of the perceptual term (0: off)")
    piade.add_argument("--lambda-ssim", type=float, help="weight of the SSIM term (0: off)")
    piade.add_argument("--early-stopping-patience", type=int, help="epochs without improvement before stopping")
    piade.add_argument("--checkpoint-dir", type=Path, help="checkpoint every epoch here; a rerun resumes from it")
    _add_runtime_arguments(parser)


def _model_from_arguments(args: argparse.Namespace) -> GaussianAD | PiadeAD:
    if args.model_type == "piade":
        keys = ("backbone", "weights", "image_size", "epochs", "train_batch_size", "learning_rate",
                "lambda_perceptual", "lambda_ssim", "early_stopping_patience")
        overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        return PiadeAD.from_preset(args.preset, **overrides, seed=args.seed, batch_size=args.batch_size,
                                   device=args.device, progress=not args.quiet)
    settings = dict(PRESETS[args.preset])
    for key in ("backbone", "weights", "levels", "image_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    return GaussianAD(**settings, reduction=args.reduction, variance=args.variance, spatial=args.spatial,
                      seed=args.seed, batch_size=args.batch_size, device=args.device, progress=not args.quiet)


def _train(model: GaussianAD | PiadeAD, images, args: argparse.Namespace) -> None:
    if isinstance(model, PiadeAD):
        model.fit(images, holdout=args.holdout, checkpoint_dir=args.checkpoint_dir)
    else:
        model.fit(images, holdout=args.holdout)


def _category(args: argparse.Namespace):
    """Resolve DATA [-c CATEGORY] to a validated Category (DATA may be the category folder itself)."""
    data: Path = args.data
    if args.category is None and (data / "train").is_dir():
        return load_category(data.parent, data.name)
    if args.category is None:
        raise ValueError(f"{data} holds categories {', '.join(list_categories(data))}: choose one with -c")
    return load_category(data, args.category)


def _demo_data(args: argparse.Namespace) -> None:
    names = write_demo_dataset(args.directory, seed=args.seed, categories=args.categories)
    print(f"wrote demo categories {', '.join(names)} under {args.directory}")


def _fit(args: argparse.Namespace) -> None:
    check_model_destination(args.model)  # a user's folder or file is never replaced
    category = _category(args)  # validated before any compute
    model = _model_from_arguments(args)
    _train(model, category.train, args)
    model.save(args.model)
    print(f"fitted {category.name} on {model.fit_info['n_train_images']} images -> {args.model}")


def _evaluate(args: argparse.Namespace) -> None:
    check_output_folder(args.out, "evaluation")  # evaluate() creates it once the inputs are valid
    category = _category(args)  # validated before the model is even loaded
    model = load_model(args.model, device=args.device, progress=not args.quiet, batch_size=args.batch_size)
    check_model_destination(args.model)  # evaluate saves the thresholds back into the model folder
    metrics = evaluate(model, category, args.out, args.overlays)
    model.save(args.model)  # now with the thresholds calibrated on labelled test data
    print(_format_table(pd.DataFrame([_summary_row(metrics)])))
    print(f"outputs in {args.out}; decision threshold {model.decision_threshold:.4g} saved in {args.model}")


def _predict(args: argparse.Namespace) -> None:
    check_output_folder(args.out, "predictions")
    model = load_model(args.model, device=args.device, progress=not args.quiet, batch_size=args.batch_size)
    images = ImageSet.from_paths(_expand_image_arguments(args.images))
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
        rows.append({"path": str(path), "score": float(score), "label": label, "overlay": str(overlay)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "predictions.csv", index=False)
    print(_format_table(table[["path", "score", "label"]]))
    print(f"threshold {threshold:.4g}; overlays and predictions.csv in {args.out}")


def _expand_image_arguments(arguments: list[Path]) -> list[Path]:
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


def _threshold(model: GaussianAD | PiadeAD, choice: str | None) -> float:
    if choice is None:
        return model.decision_threshold
    if choice in model.thresholds:
        return model.thresholds[choice]
    try:
        return float(choice)
    except ValueError:
        raise ValueError(f"--threshold {choice!r} is neither a number nor one of {sorted(model.thresholds)}") from None


def _serve(args: argparse.Namespace) -> None:
    from flows.retrain import serve  # Prefect is imported only by the commands that use it

    serve(args.cron, str(args.data), str(args.params), str(args.out), str(args.cache_dir) if args.cache_dir else None)


def _log(args: argparse.Namespace) -> None:
    from gaussad.tracking import log_run_folder, tracking_uri  # MLflow only for the command that uses it

    logged = log_run_folder(args.run_dir, args.experiment, register=args.register)
    print(f"logged {args.run_dir} to {tracking_uri()}, experiment {args.experiment!r}, run {logged.run_id}")
    for category, version in logged.versions.items():
        name = version.rsplit("/", 1)[0]
        print(f"  {category}: {version} ({'new challenger' if name in logged.new_versions else 'already registered'})")


def _promote(args: argparse.Namespace) -> None:
    from gaussad.registry import promote  # MLflow only for the commands that use it
    from gaussad.tracking import tracking_uri

    decision = promote(args.name, args.metric, str(args.data) if args.data else None, args.force, tracking_uri())
    outcome = "promoted to champion" if decision.promoted else "not promoted"
    print(f"{decision.name} version {decision.challenger}: {outcome}: {decision.reason}")


def _demo(args: argparse.Namespace) -> None:
    claim_output_folder(args.out, "demo")  # before the demo data is written, so a bad --out costs nothing
    if not args.data.is_dir() or not any(args.data.iterdir()):
        write_demo_dataset(args.data)
    rows = []
    names = list_categories(args.data)
    for number, name in enumerate(names, 1):
        print(f"[{number}/{len(names)}] {name}", flush=True)
        category = load_category(args.data, name)
        model = _model_from_arguments(args)
        start = time.perf_counter()
        _train(model, category.train, args)
        fit_seconds = time.perf_counter() - start
        metrics = evaluate(model, category, args.out / name / "evaluation")
        model.save(args.out / name / "model")  # with the thresholds evaluate calibrated
        rows.append({**_summary_row(metrics), "fit s": round(fit_seconds, 1)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    means = table.drop(columns="category").apply(pd.to_numeric, errors="coerce").mean().round(1)
    table = pd.concat([table, pd.DataFrame([{"category": "mean", **means.to_dict()}])], ignore_index=True)
    print(f"\n{_describe(model)}")
    print(_format_table(table))
    print(f"\nmodels, metrics.json, scores.csv, ROC curves and heat-map overlays under {args.out}/<category>/")


def _describe(model: GaussianAD | PiadeAD) -> str:
    c = model.config
    if isinstance(model, PiadeAD):
        return (f"PIADE: {c['backbone']} trunk ({c['weights']}), perceptual {c['perceptual']}, {c['image_size']} px, "
                f"{model.fit_info['epochs_trained']} epochs, λ1 {c['lambda_perceptual']}, λ2 {c['lambda_ssim']}")
    return (f"{c['backbone']} ({c['weights']}), levels {c['levels']}, {c['image_size']} px, "
            f"{c['reduction']} {c['variance']}, {c['spatial']}")


def _summary_row(metrics: dict) -> dict:
    def pct(value):
        return "n/a" if value is None else round(100 * value, 1)

    return {
        "category": metrics["category"],
        "image AUROC": pct(metrics["image_auroc"]),
        "pixel AUROC": pct(metrics["pixel_auroc"]),
        "AUPRO@0.3": pct(metrics["aupro"]),
        "F1": pct(metrics.get("f1")),
        "img/s": metrics["images_per_second"],
    }


def _format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False)


if __name__ == "__main__":
    sys.exit(main())
