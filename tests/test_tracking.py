"""MLflow tracking against a real `mlflow server` over HTTP, fed by a real flow run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from mlflow.tracking import MlflowClient  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from servers import free_port, tracking_to  # noqa: E402

import mlflow  # noqa: E402
from gaussad.cli import main  # noqa: E402
from gaussad.demo import write_demo_dataset  # noqa: E402
from gaussad.flows.train import train  # noqa: E402
from gaussad.piade import PiadeAD  # noqa: E402
from gaussad.registry import fit_digest, promote  # noqa: E402
from gaussad.tracking import TrackingError, log_run_folder  # noqa: E402

CATEGORIES = ["weave", "hexnut"]


@pytest.fixture(scope="module")
def flow_runs(tmp_path_factory, mlflow_server) -> dict:
    """The real Prefect flow on two small categories, tracking to the server, then to a closed port;
    then weave's Gaussian model is promoted and the flow trains PIADE on weave (3 epochs, 64 px)."""
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
        runs["first_champion"] = promote("gaussad-data-weave", uri=mlflow_server)
        params.update(model_type="piade")
        params["piade"].update(image_size=64, epochs=3, train_batch_size=8)
        (tmp / "params-piade.yaml").write_text(yaml.safe_dump(params))
        with tracking_to(mlflow_server):
            runs["piade"] = train(str(tmp / "data"), ["weave"], str(tmp / "params-piade.yaml"), str(tmp / "out-piade"),
                                  str(tmp / "cache"), track=True, experiment="flow-piade")
        runs["piade_again"] = train(str(tmp / "data"), ["weave"], str(tmp / "params-piade.yaml"),
                                    str(tmp / "out-piade-again"), str(tmp / "cache"))
    runs.update(out=tmp / "out", offline_out=tmp / "out-offline", refused=str(refused.value), data=tmp / "data",
                piade_out=tmp / "out-piade")
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
        version = client.get_model_version(name, "1")
        metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
        assert version.version == "1" and version.tags["category"] == category
        assert version.tags["model_type"] == "gaussian" and version.tags["dataset"] == "data"
        assert version.tags["model_digest"] == fit_digest(folder / "model")
        assert float(version.tags["metric.image_auroc"]) == pytest.approx(metrics["image_auroc"])
        assert client.get_run(version.run_id).data.tags["category"] == category  # linked to its nested run
        info = mlflow.models.get_model_info(f"models:/{name}/1")
        assert info.signature.inputs.input_names() == ["image"] and info.saved_input_example_info is not None
        files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", tracking_uri=mlflow_server))
        stored = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
        assert {"artifacts/model/config.json", "artifacts/model/stats.safetensors", "MLmodel"} <= stored
        assert not [p for p in stored if p.endswith((".pkl", ".pickle", ".cloudpickle"))]  # model from code


def test_piade_flow_run_logs_loss_curves_and_reconstructions(mlflow_server, flow_runs):
    client = MlflowClient(mlflow_server)
    folder = flow_runs["piade_out"] / "weave"
    config = json.loads((folder / "model" / "config.json").read_text())
    [run] = client.search_runs([client.get_experiment_by_name("flow-piade").experiment_id],
                               "tags.category = 'weave'")
    assert flow_runs["piade"]["tasks"] == {"weave": {"fit": "completed", "evaluate": "completed"}}
    assert flow_runs["piade_again"]["tasks"] == {"weave": {"fit": "cached", "evaluate": "cached"}}
    assert run.data.tags["model_type"] == "piade" and run.data.params["lambda_ssim"] == "1.0"
    assert run.data.params["backbone"] == "tf_efficientnet_lite0" and run.data.params["epochs"] == "3"
    for curve in ("train_loss", "train_mse", "train_perceptual", "train_ssim", "epoch_seconds"):
        history = sorted(client.get_metric_history(run.info.run_id, curve), key=lambda m: m.step)
        key = {"train_loss": "loss", "epoch_seconds": "seconds"}.get(curve, curve.removeprefix("train_"))
        assert [m.step for m in history] == [r["epoch"] for r in config["loss_history"]] == [1, 2, 3]
        assert [m.value for m in history] == pytest.approx([r[key] for r in config["loss_history"]])
    assert run.data.metrics["seconds_per_epoch"] == pytest.approx(config["seconds_per_epoch"])
    # registered, the model is stored once: in its version's logged model, not again in the run's artifacts
    assert run.data.tags["registered_version"] == "gaussad-data-weave/2"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"evaluation"}
    files = Path(mlflow.artifacts.download_artifacts("models:/gaussad-data-weave/2", tracking_uri=mlflow_server))
    assert {p.name for p in (files / "artifacts" / "model").iterdir()} == {"config.json", "weights.safetensors"}
    reconstructions = client.list_artifacts(run.info.run_id, "evaluation/reconstructions")
    assert len(reconstructions) == 8 and all(a.path.endswith(".png") for a in reconstructions)


def test_piade_challenger_is_compared_with_the_gaussian_champion(mlflow_server, flow_runs, monkeypatch):
    """One registered model per dataset and category: PIADE v2 competes with the Gaussian v1."""
    assert flow_runs["first_champion"].promoted and flow_runs["first_champion"].challenger == "1"
    assert flow_runs["piade"]["registered"] == {"weave": "gaussad-data-weave/2"}
    client = MlflowClient(mlflow_server)
    tags = client.get_model_version("gaussad-data-weave", "2").tags
    assert tags["model_type"] == "piade"
    assert tags["weights"] == tags["perceptual_weights"] == "package:efficientnet-lite0"
    assert tags["backbone"] == tags["perceptual"] == "tf_efficientnet_lite0"
    decision = promote("gaussad-data-weave", "image_auroc", uri=mlflow_server)
    piade_auroc = json.loads((flow_runs["piade_out"] / "weave" / "evaluation" / "metrics.json").read_text())
    gaussian_auroc = json.loads((flow_runs["out"] / "weave" / "evaluation" / "metrics.json").read_text())
    assert decision.challenger == "2" and decision.champion == "1"
    assert decision.challenger_value == pytest.approx(piade_auroc["image_auroc"])
    assert decision.champion_value == pytest.approx(gaussian_auroc["image_auroc"])
    assert decision.promoted == (decision.challenger_value >= decision.champion_value)
    champion = client.get_registered_model("gaussad-data-weave").aliases["champion"]
    assert str(champion) == ("2" if decision.promoted else "1")

    # the PIADE version as pyfunc scores as the library does
    paths = [str(p) for p in sorted((flow_runs["data"] / "weave" / "test").rglob("*.png"))[:3]]
    library = PiadeAD.load(flow_runs["piade_out"] / "weave" / "model", progress=False).score(paths)
    mlflow.set_tracking_uri(mlflow_server)
    monkeypatch.setenv("GAUSSAD_IMAGE_ROOTS", str(flow_runs["data"]))  # paths are read only inside it
    predicted = mlflow.pyfunc.load_model("models:/gaussad-data-weave/2").predict(pd.DataFrame({"image": paths}))
    np.testing.assert_allclose(predicted["score"], library.image, rtol=1e-5)


def test_flow_with_tracking_server_down_fails_clearly_and_keeps_the_models(mlflow_server, flow_runs):
    out = flow_runs["offline_out"]
    assert "not reachable" in flow_runs["refused"] and f"gaussad log {out}" in flow_runs["refused"]
    for name in CATEGORIES:
        assert (out / name / "model" / "stats.safetensors").is_file()
    logged = log_run_folder(out, experiment="logged-later", uri=mlflow_server)
    # the same models as the first run's: no new version, and the runs store no second copy of them
    assert logged.versions == {c: f"gaussad-data-{c}/1" for c in CATEGORIES} and logged.new_versions == []
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("logged-later").experiment_id])
    categories = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(categories) == len(CATEGORIES)
    for run in categories:
        assert run.data.tags["registered_version"] == f"gaussad-data-{run.data.tags['category']}/1"
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"evaluation"}


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
        size = sum(f.stat().st_size for f in (run_dir / category / "model").iterdir())
        assert child.data.metrics["model_size_mb"] == pytest.approx(size / 2**20, abs=0.01)
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
