"""Scheduled retraining: train, log and register every category, promote where as good, watch arrivals.

    prefect server start                                          # terminal 1: the API and the UI
    export PREFECT_API_URL=http://127.0.0.1:4200/api              # terminal 2
    gaussad schedule --cron "0 3 * * *" --data data/mvtec --params params.yaml --out outputs/pipeline

The deployment `gaussad-retrain/scheduled` runs at each cron tick and can also be started by hand
(`prefect deployment run gaussad-retrain/scheduled`, or "Run" in the UI at http://127.0.0.1:4200).
Each run is the train flow with tracking (MLFLOW_TRACKING_URI, else mlflow/), which registers
each new model as `challenger`, then the promote flow on those registered models, then, with
`production.arrivals` in the params, one tick of the production loop (gaussad/flows/production.py). Runs,
task states (cached or computed) and the results artifacts are in the UI's Runs page.
`serve` needs a real server: on Prefect's ephemeral one it refuses to schedule.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import gaussad.flows.runtime  # noqa: F401  (first: it sets Prefect's environment defaults)

# isort: split
from prefect import flow

from gaussad.flows.production import watch_arrivals
from gaussad.flows.promote import promote_models
from gaussad.flows.train import train
from gaussad.production import production_settings

DEPLOYMENT = "scheduled"


@flow(name="gaussad-retrain", log_prints=True)
def retrain(dataset_root: str, config: str = "params.yaml", out_dir: str = "outputs/pipeline",
            cache_dir: str | None = None, experiment: str = "gaussad", metric: str = "image_auroc",
            production_dir: str = "outputs/production") -> dict:
    """Train with tracking and registration, then promote each newly registered challenger on `metric`;
    with `production.arrivals` in the params, then one tick of the production loop per category."""
    summary = train(dataset_root, None, config, out_dir, cache_dir, track=True, experiment=experiment)
    # only a version this run registered: a challenger the production loop left is the loop's to decide
    result = {"promotions": promote_models(sorted(summary["new_versions"]), metric)}
    if production_settings(yaml.safe_load(Path(config).read_text()), config)["arrivals"] is not None:
        result["ticks"] = watch_arrivals(dataset_root, None, config, production_dir, experiment, metric)
    return result


def serve(cron: str, dataset_root: str, config: str = "params.yaml", out_dir: str = "outputs/pipeline",
          cache_dir: str | None = None, name: str = DEPLOYMENT, production_dir: str = "outputs/production") -> None:
    """Block, serving the retrain flow on `cron`; scheduled and manual runs execute in this process."""
    parameters = {
        "dataset_root": str(Path(dataset_root).resolve()),
        "config": str(Path(config).resolve()),
        "out_dir": str(Path(out_dir).resolve()),
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
        "production_dir": str(Path(production_dir).resolve()),
    }
    retrain.serve(name=name, cron=cron, parameters=parameters, tags=["gaussad"],
                  description="Retrain, register and promote every category on a schedule (gaussad)")
