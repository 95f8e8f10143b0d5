"""The `gaussad` commands of the workflow around the library: schedule (the retraining schedule, with
Prefect; `serve` is its old name), log and promote (MLflow). Prefect and MLflow are extras: each command checks that its
package is installed and says which extra to install when it is not.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from gaussad.validation import check_choice


def add_workflow_commands(commands) -> None:
    """schedule (alias serve), log and promote, as subcommands of `commands` (argparse's subparsers)."""
    schedule = commands.add_parser("schedule", aliases=["serve"],
                                   help="retrain on a cron schedule as a Prefect deployment (needs a server); "
                                        "`serve` is its old name")
    schedule.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *" (03:00 daily)')
    schedule.add_argument("--data", type=Path, required=True, help="dataset root (MVTec AD layout)")
    schedule.add_argument("--params", type=Path, default=Path("params.yaml"))
    schedule.add_argument("--out", type=Path, default=Path("outputs/pipeline"))
    schedule.add_argument("--cache-dir", type=Path)
    schedule.add_argument("--production-out", type=Path, default=Path("outputs/production"),
                          help="where the production loop (params.yaml `production`) writes each tick's monitoring")
    schedule.set_defaults(run=_schedule)

    log = commands.add_parser("log", help="log a pipeline run folder (python -m gaussad.flows.train --out) to "
                                          "MLflow and register its models")
    log.add_argument("run_dir", type=Path)
    log.add_argument("--experiment", default="gaussad")
    log.add_argument("--no-register", dest="register", action="store_false", help="log runs only")
    log.add_argument("--export-onnx", action="store_true",
                     help="register each Gaussian model with its exported ONNX graph, which the registered "
                          "model (and `mlflow models serve`) then runs")
    log.set_defaults(run=_log)

    promote = commands.add_parser("promote", help="make a registered model's challenger the champion if it is "
                                                  "at least as good on the same test data")
    promote.add_argument("names", nargs="+", help="registered models, e.g. gaussad-mvtec-bottle")
    promote.add_argument("--metric", default="image_auroc",
                         help="the test metric compared (default image_auroc); another name is refused with the list")
    promote.add_argument("--data", type=Path, help="dataset root to compare on (default: the challenger's)")
    promote.add_argument("--normal-images", type=Path,
                         help="a folder of fresh defect-free images: promote only if the challenger's false alarms "
                              "on them are within its budget and no more than the champion's")
    promote.add_argument("--force", action="store_true", help="promote whatever the comparison says")
    promote.set_defaults(run=_promote)

    prune = commands.add_parser("prune", help="delete a registered model's old versions and their stored models, "
                                              "keeping the newest and the champion and challenger")
    prune.add_argument("names", nargs="+", help="registered models, e.g. gaussad-mvtec-bottle")
    prune.add_argument("--keep", type=int, default=3, help="newest versions kept beside the aliased ones (default 3)")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    prune.set_defaults(run=_prune)


def _schedule(args: argparse.Namespace) -> None:
    if args.command == "serve":
        print("gaussad: `serve` is the old name of `schedule` (the retraining schedule; to serve a registered "
              "model over HTTP: mlflow models serve, see the README)", file=sys.stderr)
    _require("prefect", "pipeline", "schedule")  # Prefect and MLflow only for the commands that use them
    _require("mlflow", "tracking", "schedule")
    from gaussad.flows.retrain import serve

    serve(args.cron, str(args.data), str(args.params), str(args.out), str(args.cache_dir) if args.cache_dir else None,
          production_dir=str(args.production_out))


def _log(args: argparse.Namespace) -> None:
    _require("mlflow", "tracking", "log")
    from gaussad.tracking import log_run_folder, tracking_uri

    logged = log_run_folder(args.run_dir, args.experiment, register=args.register, export_onnx=args.export_onnx)
    print(f"logged {args.run_dir} to {tracking_uri()}, experiment {args.experiment!r}, run {logged.run_id}")
    for category, version in logged.versions.items():
        name = version.rsplit("/", 1)[0]
        print(f"  {category}: {version} ({'new challenger' if name in logged.new_versions else 'already registered'})")


def _promote(args: argparse.Namespace) -> None:
    _require("mlflow", "tracking", "promote")
    from gaussad.cli_models import expand_image_arguments
    from gaussad.data import ImageSet, validate_images
    from gaussad.evaluate import TEST_METRICS
    from gaussad.registry import promote
    from gaussad.tracking import tracking_uri

    check_choice("--metric", args.metric, TEST_METRICS)
    normal = None
    if args.normal_images is not None:
        normal = ImageSet.from_paths(expand_image_arguments([args.normal_images]))
        validate_images(normal)  # before any model is loaded
        normal = list(normal.paths)
    for name in args.names:
        decision = promote(name, args.metric, str(args.data) if args.data else None, args.force, tracking_uri(),
                           normal)
        outcome = "promoted to champion" if decision.promoted else "not promoted"
        print(f"{decision.name} version {decision.challenger}: {outcome}: {decision.reason}")


def _require(module: str, extra: str, command: str) -> None:
    """A one-line error, naming the extra to install, when `command` needs a package that is not here."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        raise ValueError(f"`gaussad {command}` needs {module}, which is not installed: "
                         f"pip install 'gaussad[{extra}]' (or gaussad[all])") from None


def _prune(args: argparse.Namespace) -> None:
    _require("mlflow", "tracking", "prune")
    from gaussad.retention import prune

    for name in args.names:
        pruned = prune(name, args.keep, dry_run=args.dry_run)
        kept = ", ".join(f"{version} ({', '.join(why)})" for version, why in pruned.kept.items()) or "none"
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{name}: {verb} versions {', '.join(pruned.deleted) or 'none'}; kept {kept}")
    if not args.dry_run:
        print("the deleted versions' files are freed by `mlflow gc` on the tracking store")
