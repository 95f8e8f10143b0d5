"""Slow: `gaussad schedule --cron` against a real `prefect server start`; a scheduled and a manual
retraining run complete, and the first one registered and promoted the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import free_port, healthy, wait_for

from gaussad.demo import write_demo_dataset

BIN = Path(sys.executable).parent


def completed_runs(url: str) -> int:
    """How many runs of the retrain flow (not counting its subflows) the server at `url` has completed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    completed = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])))
    retrain = FlowFilter(name=FlowFilterName(any_=["gaussad-retrain"]))
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return len(client.read_flow_runs(flow_filter=retrain, flow_run_filter=completed))


@pytest.mark.slow
def test_served_deployment_runs_on_schedule_and_by_hand(tmp_path):
    data = tmp_path / "data"
    write_demo_dataset(data, seed=5, categories=["weave"], n_train=6, n_test_good=2, n_test_per_defect=2, image_size=64)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["model"].update(levels=[3], image_size=64)
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(params))

    url = f"http://127.0.0.1:{free_port()}/api"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": mlflow_uri}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               url.split(":")[2].split("/")[0]], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    env["PREFECT_API_URL"] = url
    served = None
    try:
        wait_for(lambda: healthy(url), 120, "prefect server")
        served = subprocess.Popen([str(BIN / "gaussad"), "schedule", "--cron", "* * * * *", "--data", str(data),
                                   "--params", str(config), "--out", str(tmp_path / "out"),
                                   "--cache-dir", str(tmp_path / "cache")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # the schedule ticks every minute: its first run must complete on its own
        wait_for(lambda: completed_runs(url) >= 1, 240, "a scheduled run to complete")
        assert (tmp_path / "out" / "weave" / "model" / "config.json").is_file()
        registered = MlflowClient(mlflow_uri).get_registered_model("gaussad-data-weave")
        # trained, registered, promoted
        assert {alias: str(v) for alias, v in registered.aliases.items()} == {"champion": "1", "challenger": "1"}
        manual = subprocess.run([str(BIN / "prefect"), "deployment", "run", "gaussad-retrain/scheduled"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert manual.returncode == 0, manual.stderr
        wait_for(lambda: completed_runs(url) >= 2, 180, "the manual run to complete")
        # all cached: the same model is not registered twice
        assert len(MlflowClient(mlflow_uri).search_model_versions("name = 'gaussad-data-weave'")) == 1
    finally:
        for process in (served, server):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
