"""Prefect flow: one tick of the production loop per category (gaussad.production): the arrivals
monitored for drift, the champion updated or fitted again when they drift or are enough, the new
model registered as challenger and promoted through a gate that needs no defective image.

    python -m gaussad.flows.production --params params.yaml [--data DIR] [--categories a b] [--out outputs/production]

The arrivals are params.yaml's `production.arrivals`/<category>/; tracking goes to MLFLOW_TRACKING_URI
(else mlflow/). The retrain flow (gaussad/flows/retrain.py, the scheduled deployment) runs this after the
train flow when `production.arrivals` is set. A tick with no new image computes nothing. Each run
leaves a table artifact in the Prefect UI and, per category, monitor.json and monitor.png in
<out>/<category>/ and in the model's monitoring run in MLflow.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from gaussad.flows.runtime import device_lock  # first: it sets Prefect's environment defaults

# isort: split
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from gaussad.data import list_categories
from gaussad.detectors import model_spec
from gaussad.errors import GaussadError
from gaussad.flows.reporting import dataset_name
from gaussad.output_folders import claim_output_folder
from gaussad.production import production_settings, watch
from gaussad.registry import registered_name
from gaussad.tracking import tracking_uri


@task(cache_policy=NO_CACHE, task_run_name="watch-{category}")  # the registry and the arrivals decide, not the inputs
def watch_category(name: str, category: str, arrivals: str, settings: dict, out_dir: str, experiment: str,
                   holdout: float, batch_size: int, metric: str, export_onnx: bool) -> dict:
    with device_lock():  # scoring, updating, scoring again for the gate
        tick = watch(name, Path(arrivals) / category, settings, Path(out_dir) / category, experiment, tracking_uri(),
                     holdout, batch_size, metric, export_onnx)
    return asdict(tick)


@flow(name="gaussad-production", log_prints=True)
def watch_arrivals(dataset_root: str, categories: list[str] | None = None, config: str = "params.yaml",
                   out_dir: str = "outputs/production", experiment: str = "gaussad",
                   metric: str = "image_auroc") -> list[dict]:
    """One tick of the loop for every category (or `categories`) with a champion; the ticks' records."""
    logger = get_run_logger()
    params = yaml.safe_load(Path(config).read_text())
    settings = production_settings(params, config)
    if settings["arrivals"] is None:
        raise ValueError(f"{config}: production.arrivals is not set: name the folder of new good images")
    spec = model_spec(params, config)
    arrivals = str(Path(settings["arrivals"]).resolve())
    dataset = dataset_name(dataset_root, params)
    export_onnx = bool((params.get("registry") or {}).get("export_onnx", False))
    names = categories or params.get("data", {}).get("categories") or list_categories(dataset_root)
    claim_output_folder(out_dir, "production")  # refused before any compute if it holds files gaussad did not write
    futures = {category: watch_category.submit(registered_name(dataset, category), category, arrivals, settings,
                                               out_dir, experiment, spec.holdout, spec.batch_size, metric,
                                               export_onnx)
               for category in names}
    ticks, failures = [], {}
    for category, future in futures.items():
        try:
            ticks.append(future.result())
        except Exception as err:  # one category's failure (a corrupt arrival, no server) does not stop the others
            failures[category] = str(err)
            logger.error("category %s failed: %s", category, err)
    for tick in ticks:
        logger.info("%s: %s (%s)%s", tick["name"], tick["action"], tick["reason"],
                    f"; v{tick['challenger']} {'promoted' if tick['promoted'] else 'not promoted'}: "
                    f"{tick['promotion_reason']}" if tick["challenger"] else "")
    create_markdown_artifact(_table(ticks, failures), key="gaussad-production",
                             description="one tick of the production loop per category")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(names)} categories failed: "
                           + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return ticks


def _table(ticks: list[dict], failures: dict[str, str]) -> str:
    lines = ["| model | champion | arrivals | new | drift | p | alarm rate (normal) | did | challenger | promoted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in ticks:
        drift = "" if t["drift"] is None else ("**yes**" if t["drift"] else "no")
        p = "" if t["p_value"] is None else f"{t['p_value']:.3g}"
        rate = "" if t["alarm_rate"] is None else f"{t['alarm_rate']:.3f} ({t['expected_alarm_rate']:.3f})"
        promoted = "" if t["promoted"] is None else f"{'yes' if t['promoted'] else 'no'}: {t['promotion_reason']}"
        lines.append(f"| {t['name']} | {t['champion'] or ''} | {t['n_arrivals']} | {t['n_new']} | {drift} | {p} | "
                     f"{rate} | {t['action']}: {t['reason']} | {t['challenger'] or ''} | {promoted} |")
    lines += [f"| {category} | failed: {message} | | | | | | | | |" for category, message in failures.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", help="dataset root (default: data.root in the params file)")
    parser.add_argument("--categories", nargs="+")
    parser.add_argument("--out", default="outputs/production")
    parser.add_argument("--experiment", default="gaussad", help="MLflow experiment (default gaussad)")
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    try:
        production_settings(params, args.params)  # checked before the flow (or its server) starts
        model_spec(params, args.params)
        watch_arrivals(args.data or params["data"]["root"], args.categories, args.params, args.out, args.experiment)
    except (GaussadError, ValueError, RuntimeError, ConnectionError) as err:
        print(f"gaussad-production: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
