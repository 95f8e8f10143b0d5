"""The tracking server dies in the middle of `gaussad log`, then comes back: the rerun logs the run
folder completely, with no duplicate registered versions, and the half-logged run is marked FAILED.

This test runs its own `mlflow server` (SQLite store in a temp folder, a fixed port for the restart)
rather than the session's, since it kills it.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import free_port, healthy, wait_for

from gaussad.data import load_category
from gaussad.demo import write_demo_dataset
from gaussad.evaluate import evaluate
from gaussad.gaussian import GaussianAD
from gaussad.registry import fit_digest

CATEGORIES = ["brushed", "hexnut", "weave"]
SMALL = {"backbone": "tf_efficientnet_lite0", "levels": (3, 4), "image_size": 64, "batch_size": 8, "progress": False}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as gaussad/flows/train.py writes it (model, evaluation, run.json), made with the library:
    three categories, random-weight Gaussian models, 64 px."""
    tmp = tmp_path_factory.mktemp("tracking-faults")
    data = tmp / "faults"
    write_demo_dataset(data, seed=3, categories=CATEGORIES, n_train=8, n_test_good=2, n_test_per_defect=1,
                       image_size=64)
    out = tmp / "run"
    for name in CATEGORIES:
        category = load_category(data, name)
        model = GaussianAD(weights="none", seed=1, **SMALL).fit(category.train)
        evaluate(model, category, out / name / "evaluation", n_overlays=1)
        model.save(out / name / "model")
    record = {"data": {"root": str(data), "dvc_md5": None}, "params": {"model": model.config}, "seconds": 1.0,
              "git_commit": "test"}
    (out / "run.json").write_text(json.dumps(record))
    return out


def start_server(store: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}") or server.poll() is not None, 120, "mlflow server")
    assert server.poll() is None, "mlflow server exited at start"
    return server


def nested_runs(database: Path) -> int:
    """Nested runs created so far, read from the server's SQLite file (read-only, no lock taken)."""
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM tags WHERE key = 'mlflow.parentRunId'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or being written
        return 0


def gaussad_log(run_folder: Path, uri: str, **popen) -> subprocess.Popen:
    # MLflow retries a dead server for minutes by default; two quick retries keep the test short
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    return subprocess.Popen([str(BIN / "gaussad"), "log", str(run_folder), "--experiment", "faults"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_log_after_the_server_died_mid_logging_is_complete_and_not_duplicated(run_folder, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        first = gaussad_log(run_folder, uri)
        deadline = time.monotonic() + 180
        while nested_runs(tmp_path / "mlflow.db") == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "gaussad log ended before the server could be stopped"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        out, err = first.communicate(timeout=600)
        assert first.returncode == 2, err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("gaussad: error: ") and uri in last and f"gaussad log {run_folder}" in last, err

        server = start_server(tmp_path, port)
        second = gaussad_log(run_folder, uri)
        out, err = second.communicate(timeout=600)
        assert second.returncode == 0, err

        client = MlflowClient(uri)
        for name in CATEGORIES:
            versions = client.search_model_versions(f"name = 'gaussad-faults-{name}'")
            assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
        experiment = client.get_experiment_by_name("faults").experiment_id
        parents = client.search_runs([experiment], "tags.kind = 'pipeline'", order_by=["attributes.start_time DESC"])
        assert [run.info.status for run in parents] == ["FINISHED", "FAILED"]  # the half-logged run is marked
        children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
        assert sorted(run.data.tags["category"] for run in children) == CATEGORIES
        for run in children:
            metrics = json.loads((run_folder / run.data.tags["category"] / "evaluation" / "metrics.json").read_text())
            assert run.data.metrics["image_auroc"] == pytest.approx(metrics["image_auroc"])
            assert "evaluation" in {a.path for a in client.list_artifacts(run.info.run_id)}
            name, version = run.data.tags["registered_version"].split("/")  # the model is stored in its version
            assert client.get_model_version(name, version).tags["model_digest"] == fit_digest(
                run_folder / run.data.tags["category"] / "model")
            assert run.info.status == "FINISHED"
        stale = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[1].info.run_id}'")
        assert all(run.info.status == "FAILED" for run in stale)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
