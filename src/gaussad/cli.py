"""The `gaussad` command: demo-data, fit, evaluate, update, monitor, predict, export, demo (and schedule, log,
promote).

A user error (bad path, unreadable image, missing mask, unknown category, unloadable weights, bad
model folder, an output path holding files gaussad did not write) ends in one line
`gaussad: error: ...` and exit code 2, never a traceback.
The evaluation stack (matplotlib, pandas) and the demo's image synthesis (scipy)
take seconds to import: the commands that use them import them, so the others start without.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from PIL import Image

from gaussad import __version__
from gaussad.cli_arguments import (
    add_dataset_arguments,
    add_model_arguments,
    add_runtime_arguments,
    model_from_arguments,
    runtime_options,
)
from gaussad.cli_models import add_model_commands, format_table, pandas_module
from gaussad.cli_workflow import add_workflow_commands
from gaussad.data import list_categories, load_category
from gaussad.detectors import load_model
from gaussad.errors import GaussadError
from gaussad.model_folder import folder_megabytes
from gaussad.output_folders import check_model_destination, check_output_folder, claim_output_folder

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
    parser.add_argument("--version", action="version", version=f"gaussad {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", dest="command")

    demo_data = commands.add_parser("demo-data", help="write the synthetic demo dataset (MVTec AD layout)")
    demo_data.add_argument("directory", type=Path)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument("--categories", nargs="+", help="which demo categories (default: all)")
    demo_data.set_defaults(run=_demo_data)

    fit = commands.add_parser("fit", help="fit a model on a category's train/good images")
    add_dataset_arguments(fit)
    fit.add_argument("-o", "--out", "--model", dest="model", metavar="MODEL", type=Path, required=True,
                     help="model folder to write")
    add_model_arguments(fit)
    fit.set_defaults(run=_fit)

    ev = commands.add_parser("evaluate", help="score a category's test split; write metrics and pictures")
    ev.add_argument("model", type=Path, help="model folder written by `gaussad fit`")
    add_dataset_arguments(ev)
    ev.add_argument("-o", "--out", type=Path, required=True, help="folder for metrics.json, scores.csv, plots")
    ev.add_argument("--overlays", type=int, default=8, help="heat-map overlays to draw (default 8)")
    add_runtime_arguments(ev)
    ev.set_defaults(run=_evaluate)

    add_model_commands(commands)
    add_workflow_commands(commands)

    demo = commands.add_parser("demo", help="demo data -> fit and evaluate every category -> results table")
    demo.add_argument("--data", type=Path, default=Path("data"),
                      help="dataset root; the demo data is written there if it is missing or empty "
                           "(default data/, the folder data.dvc tracks)")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"))
    add_model_arguments(demo)
    demo.set_defaults(run=_demo)
    return parser


def _category(args: argparse.Namespace, needs_test: bool = True):
    """Resolve DATA [-c CATEGORY] to a validated Category (DATA may be the category folder itself)."""
    data: Path = args.data
    if args.category is None and (data / "train").is_dir():
        return load_category(data.parent, data.name, needs_test=needs_test)
    if args.category is None:
        raise ValueError(f"{data} holds categories {', '.join(list_categories(data))}: choose one with -c")
    return load_category(data, args.category, needs_test=needs_test)


def _demo_data(args: argparse.Namespace) -> None:
    from gaussad.demo import write_demo_dataset

    names = write_demo_dataset(args.directory, seed=args.seed, categories=args.categories)
    print(f"wrote demo categories {', '.join(names)} under {args.directory}")


def _fit(args: argparse.Namespace) -> None:
    check_model_destination(args.model)  # a user's folder or file is never replaced
    model, fit_options = model_from_arguments(args)  # every setting checked; no network built yet
    category = _category(args, needs_test=False)  # validated before any compute; defect-free images suffice
    model.fit(category.train, **fit_options)
    model.save(args.model)
    print(f"fitted {category.name} on {model.fit_info['n_train_images']} images -> {args.model} "
          f"({folder_megabytes(args.model):.1f} MB)")


def _evaluate(args: argparse.Namespace) -> None:
    if args.model.suffix == ".onnx":
        raise ValueError(f"evaluate takes a model folder, not an exported file ({args.model}): it saves the "
                         f"thresholds it calibrates into the folder; evaluate that, then export it again")
    check_output_folder(args.out, "evaluation")  # evaluate() creates it once the inputs are valid
    category = _category(args)  # validated before the model is even loaded
    model = load_model(args.model, **runtime_options(args))
    check_model_destination(args.model)  # evaluate saves the thresholds back into the model folder
    from gaussad.evaluate import evaluate

    metrics = evaluate(model, category, args.out, args.overlays)
    model.save(args.model)  # now with the thresholds calibrated on labelled test data
    print(format_table([_summary_row(metrics)]))
    print(f"{_rates_line(metrics)}\noutputs in {args.out}; decision threshold {model.decision_threshold_name} "
          f"{model.decision_threshold:.4g} saved in {args.model}")


def _rates_line(metrics: dict) -> str:
    """The test split's false-alarm and miss rates at the decision threshold, for people."""
    def rate(key):
        return "n/a" if metrics.get(key) is None else f"{metrics[key]:.3f}"

    budget = "" if metrics.get("false_alarm_budget") is None else f" (budget {metrics['false_alarm_budget']:g})"
    return (f"at the {metrics['decision_threshold']} threshold: false-alarm rate {rate('false_alarm_rate')}{budget}, "
            f"miss rate {rate('miss_rate')} on the test split")


def _demo(args: argparse.Namespace) -> None:
    from gaussad.demo import write_demo_dataset
    from gaussad.evaluate import evaluate

    pd = pandas_module()
    model_from_arguments(args)  # every setting checked before anything is written or computed
    claim_output_folder(args.out, "demo")  # before the demo data is written, so a bad --out costs nothing
    if not args.data.is_dir() or not any(args.data.iterdir()):
        write_demo_dataset(args.data)
    rows = []
    names = list_categories(args.data)
    for number, name in enumerate(names, 1):
        print(f"[{number}/{len(names)}] {name}", flush=True)
        category = load_category(args.data, name)
        model, fit_options = model_from_arguments(args)
        start = time.perf_counter()
        model.fit(category.train, **fit_options)
        fit_seconds = time.perf_counter() - start
        metrics = evaluate(model, category, args.out / name / "evaluation")
        model.save(args.out / name / "model")  # with the thresholds evaluate calibrated
        rows.append({**_summary_row(metrics), "fit s": round(fit_seconds, 1)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "results.csv", index=False)
    means = table.drop(columns="category").apply(pd.to_numeric, errors="coerce").mean().round(1)
    table = pd.concat([table, pd.DataFrame([{"category": "mean", **means.to_dict()}])], ignore_index=True)
    print(f"\n{model.describe()}")
    print(format_table(table))
    print(f"\nmodels, metrics.json, scores.csv, ROC curves and heat-map overlays under {args.out}/<category>/")


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


if __name__ == "__main__":
    sys.exit(main())
