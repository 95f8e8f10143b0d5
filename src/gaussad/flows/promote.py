"""Prefect flow: promote the `challenger` of registered models to `champion` where it is as good.

The retrain flow (gaussad/flows/retrain.py) runs it after training. By hand, without Prefect:
`gaussad promote gaussad-mvtec-bottle gaussad-mvtec-cable [--metric aupro] [--force]`.

Each model's challenger and champion are scored on the same test split (see gaussad.registry);
the decision and its reason are written to the challenger version's tags and description.
"""

from __future__ import annotations

from dataclasses import asdict

from gaussad.flows.runtime import device_lock  # first: it sets Prefect's environment defaults

# isort: split
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from gaussad.registry import promote
from gaussad.tracking import tracking_uri


@task(cache_policy=NO_CACHE, task_run_name="promote-{name}")  # the registry decides, not the inputs
def promote_model(name: str, metric: str, dataset_root: str | None, force: bool) -> dict:
    with device_lock():  # scoring two models on the test split
        return asdict(promote(name, metric, dataset_root, force, uri=tracking_uri()))


@flow(name="gaussad-promote", log_prints=True)
def promote_models(names: list[str], metric: str = "image_auroc", dataset_root: str | None = None,
                   force: bool = False) -> list[dict]:
    """Promote each registered model's challenger (one task per model); return the decisions."""
    logger = get_run_logger()
    decisions = [promote_model(name, metric, dataset_root, force) for name in names]
    for decision in decisions:
        logger.info("%s v%s: %s (%s)", decision["name"], decision["challenger"],
                    "promoted to champion" if decision["promoted"] else "not promoted", decision["reason"])
    return decisions
