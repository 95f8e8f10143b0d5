"""MLflow tracking against a real `mlflow server` over HTTP, fed by a real flow run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.train import train  # noqa: E402
from gaussad.cli import main  # noqa: E402
from gaussad.demo import write_demo_dataset  # noqa: E402
from gaussad.registry import model_digest  # noqa: E402
from gaussad.tracking import TrackingError, log_run_folder  # noqa: E402
from servers import free_port, tracking_to  # noqa: E402

CATEGORIES = ["weave", "hexnut"]


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory, mlflow_server) -> dict:
    """The real Prefect flow on two small categories, tracking to the server, then to a closed port."""
    tmp = tmp_path_factory.mktemp("pipeline")
    write_demo_dataset(tmp / "data", seed=4, categories=CATEGORIES, n_train=8, n_test_good=3, n_test_per_defect=2,
                       image_size=64)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["model"].update(levels=[3, 4], image_size=64, batch_size=8)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    arguments = (str(tmp / "data"), None, str(tmp / "params.yaml"))
    runs = {}
    with prefect_test_harness(server_startup_timeout=120):
        with tracking_to(mlflow_server):
            runs["summary"] = train(*arguments, str(tmp / "out"), str(tmp / "cache"), track=True, experiment="flow")
        with tracking_to(f"http://127.0.0.1:{free_port()}"), pytest.raises(TrackingError) as refused:
            train(*arguments, str(tmp / "out-offline"), str(tmp / "cache"), track=True)
    runs.update(out=tmp / "out", offline_out=tmp / "out-offline", refused=str(refused.value))
    return runs


@pytest.fixture(scope="module")
def run_dir(flow_runs) -> Path:
    return flow_runs["out"]


def test_flow_logs_one_run_with_a_nested_run_per_category(mlflow_server, flow_runs):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("flow")
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(flow_runs["summary"]["mlflow_run_id"])
    assert len(runs) == 1 + len(CATEGORIES) and parent.data.tags["kind"] == "pipeline"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI shows runs
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(run.data.tags["category"] for run in children) == sorted(CATEGORIES)


def test_flow_registers_each_category_model_as_its_challenger(mlflow_server, flow_runs):
    client = MlflowClient(mlflow_server)
    assert flow_runs["summary"]["registered"] == {c: f"gaussad-data-{c}/1" for c in CATEGORIES}
    for category in CATEGORIES:
        name, folder = f"gaussad-data-{category}", flow_runs["out"] / category
        version = client.get_model_version_by_alias(name, "challenger")
        metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
        assert version.version == "1" and version.tags["category"] == category
        assert version.tags["model_type"] == "gaussian" and version.tags["dataset"] == "data"
        assert version.tags["model_digest"] == model_digest(folder / "model")
        assert float(version.tags["metric.image_auroc"]) == pytest.approx(metrics["image_auroc"])
        assert client.get_run(version.run_id).data.tags["category"] == category  # linked to its nested run
        info = mlflow.models.get_model_info(f"models:/{name}/1")
        assert info.signature.inputs.input_names() == ["image"] and info.saved_input_example_info is not None
        files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", tracking_uri=mlflow_server))
        stored = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
        assert {"artifacts/model/config.json", "artifacts/model/stats.safetensors", "MLmodel"} <= stored
        assert not [p for p in stored if p.endswith((".pkl", ".pickle", ".cloudpickle"))]  # model from code


def test_flow_with_tracking_server_down_fails_clearly_and_keeps_the_models(mlflow_server, flow_runs):
    out = flow_runs["offline_out"]
    assert "not reachable" in flow_runs["refused"] and f"gaussad log {out}" in flow_runs["refused"]
    for name in CATEGORIES:
        assert (out / name / "model" / "stats.safetensors").is_file()
    assert log_run_folder(out, experiment="logged-later", uri=mlflow_server)


def test_pipeline_run_is_logged_with_nested_category_runs(mlflow_server, run_dir):
    parent_id = log_run_folder(run_dir, experiment="test-nested", uri=mlflow_server, register=False).run_id
    client = MlflowClient(mlflow_server)
    parent = client.get_run(parent_id)
    record = json.loads((run_dir / "run.json").read_text())
    assert parent.data.params["git_commit"] == record["git_commit"]
    assert parent.data.params["model.variance"] == str(record["params"]["model"]["variance"])
    assert parent.data.tags["dataset"] == "data"

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(run.data.tags["category"] for run in children) == sorted(CATEGORIES)
    for child in children:
        category = child.data.tags["category"]
        metrics = json.loads((run_dir / category / "evaluation" / "metrics.json").read_text())
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1"):
            assert child.data.metrics[key] == pytest.approx(metrics[key])
        assert child.data.metrics["threshold_image_normal_quantile"] == pytest.approx(
            metrics["thresholds"]["image_normal_quantile"])
        timings = json.loads((run_dir / category / "timings.json").read_text())
        for stage in ("extract_train", "fit", "extract_test", "score"):
            assert child.data.metrics[f"{stage}_seconds"] == pytest.approx(timings[f"{stage}_seconds"])
        assert child.data.metrics["extract_train_images_per_second"] == pytest.approx(
            timings["n_train_images"] / timings["extract_train_seconds"])
        assert timings["n_train_images"] == 8 and timings["fit_seconds"] > 0
        assert child.data.params["reduction"] == "npca" and child.data.params["levels"] == "[3, 4]"
        assert child.data.tags["model_type"] == "gaussian"
        model_files = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
        assert model_files == {"model/config.json", "model/stats.safetensors"}
        evaluation_files = {a.path for a in client.list_artifacts(child.info.run_id, "evaluation")}
        assert {"evaluation/roc.png", "evaluation/scores.csv", "evaluation/histogram.png"} <= evaluation_files


def test_unreachable_server_keeps_results_and_says_how_to_log_them_later(mlflow_server, run_dir, monkeypatch, capsys):
    closed = f"http://127.0.0.1:{free_port()}"
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(TrackingError, match=rf"not reachable.*gaussad log {run_dir}"):
        log_run_folder(run_dir, uri=closed)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    # later, with the server up: the CLI logs the same folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert main(["log", str(run_dir), "--experiment", "test-later"]) == 0
    assert "logged" in capsys.readouterr().out
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("test-later")
    assert len(MlflowClient(mlflow_server).search_runs([experiment.experiment_id])) == 1 + len(CATEGORIES)


def test_default_store_is_local_sqlite_with_artifacts_beside_it(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_id = log_run_folder(run_dir, register=False).run_id
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "mlflow" / "artifacts").as_uri())
    assert list((tmp_path / "mlflow" / "artifacts").rglob("run.json"))
