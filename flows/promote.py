"""Prefect flow: promote the `challenger` of registered models to `champion` where it is as good.

    python flows/promote.py gaussad-mvtec-bottle gaussad-mvtec-cable [--metric aupro] [--force]

Each model's challenger and champion are scored on the same test split (see gaussad.registry);
the decision and its reason are written to the challenger version's tags and description.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.train import device_lock  # noqa: E402
from gaussad.registry import PROMOTION_METRICS, promote  # noqa: E402
from gaussad.tracking import tracking_uri  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="registered model names, e.g. gaussad-mvtec-bottle")
    parser.add_argument("--metric", default="image_auroc", choices=PROMOTION_METRICS)
    parser.add_argument("--data", help="dataset root to compare on (default: the one the challenger was trained on)")
    parser.add_argument("--force", action="store_true", help="promote whatever the comparison says")
    args = parser.parse_args(argv)
    promote_models(args.names, args.metric, args.data, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
