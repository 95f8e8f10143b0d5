"""Scheduled retraining: serve the train flow as a Prefect deployment on a cron schedule.

    prefect server start                                          # terminal 1: the API and the UI
    export PREFECT_API_URL=http://127.0.0.1:4200/api              # terminal 2
    gaussad serve --cron "0 3 * * *" --data data/mvtec --params params.yaml --out outputs/pipeline

The deployment `gaussad-train/scheduled` runs at each cron tick and can also be started by hand
(`prefect deployment run gaussad-train/scheduled`, or "Run" in the UI at http://127.0.0.1:4200).
Runs, task states (cached or computed) and the results artifact are in the UI's Runs page.
`serve` needs a real server: on Prefect's ephemeral one it refuses to schedule.
"""

from __future__ import annotations

from pathlib import Path

from flows.train import train

DEPLOYMENT = "scheduled"


def serve(cron: str, dataset_root: str, config: str = "params.yaml", out_dir: str = "outputs/pipeline",
          cache_dir: str | None = None, name: str = DEPLOYMENT) -> None:
    """Block, serving the train flow on `cron`; scheduled and manual runs execute in this process."""
    parameters = {
        "dataset_root": str(Path(dataset_root).resolve()),
        "config": str(Path(config).resolve()),
        "out_dir": str(Path(out_dir).resolve()),
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None,
    }
    train.serve(name=name, cron=cron, parameters=parameters, tags=["gaussad"],
                description="Retrain and evaluate every category on a schedule (gaussad)")
