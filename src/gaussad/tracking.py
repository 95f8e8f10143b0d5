"""MLflow tracking of a pipeline run folder: one run for the whole, a nested run per category.

A run folder is what gaussad/flows/train.py writes (run.json, <category>/model, <category>/evaluation).
Logging reads only that folder, so a result computed while the tracking server was down is logged
later with `gaussad log <run folder>`. Each category's model is also registered (gaussad.registry).
Without MLFLOW_TRACKING_URI the store is local: SQLite in mlflow/mlflow.db and artifacts in
mlflow/artifacts, under the current folder."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from gaussad.detectors import DEFAULT_MODEL_TYPE, detector_class
from gaussad.errors import TrackingError
from gaussad.evaluate import TEST_METRICS
from gaussad.model_folder import folder_megabytes
from gaussad.registry import register_model

DEFAULT_EXPERIMENT = "gaussad"
EXPERIMENT_KIND = "mlflow.experimentKind"
METRICS = (*TEST_METRICS, "score_seconds", "images_per_second")
# A PIADE run logs its epochs as curves, step = epoch: train_loss, train_mse, train_perceptual,
# train_ssim, epoch_seconds, and holdout_loss with early stopping.
CURVE_NAMES = {"holdout_loss": "holdout_loss", "seconds": "epoch_seconds"}


@dataclass
class LoggedRun:
    run_id: str  # the pipeline's (parent) run
    versions: dict[str, str] = field(default_factory=dict)  # category -> "<registered name>/<version>"
    new_versions: list[str] = field(default_factory=list)  # registered names that got a new version


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the local store mlflow/mlflow.db under the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow').resolve() / 'mlflow.db'}"


def log_run_folder(run_dir: str | Path, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None,
                   register: bool = True, export_onnx: bool = False) -> LoggedRun:
    """Log a pipeline run folder to MLflow and (with `register`) register each category's model,
    with `export_onnx` together with its exported ONNX graph, which the registered model then runs."""
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a pipeline run folder: {record_path.name} is missing")
    record = json.loads(record_path.read_text())
    uri = uri or tracking_uri()
    _check_reachable(uri, run_dir)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment, uri)
    dataset = record["data"].get("name") or Path(record["data"]["root"]).name  # no name: run folders before 0.2
    model_type = record["params"].get("model_type", DEFAULT_MODEL_TYPE)
    block = detector_class(model_type).PARAMS_BLOCK  # the params.yaml block that model type reads
    shared = {
        "git_commit": record.get("git_commit"),
        "dvc_data_md5": record["data"].get("dvc_md5"),
        "dataset_root": record["data"]["root"],
        "model_type": model_type,
        **{f"{block}.{k}": v for k, v in record["params"][block].items()},
    }
    client = MlflowClient(uri)
    folder = str(run_dir.resolve())
    _fail_interrupted_runs(client, experiment_id, folder)
    try:
        # tagged as it is created, so that a run cut short is still found by _fail_interrupted_runs
        tags = {"dataset": dataset, "model_type": model_type, "kind": "pipeline", "run_folder": folder}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"{dataset}-{run_dir.name}", tags=tags) as parent:
            logged = LoggedRun(parent.info.run_id)
            mlflow.log_params(_strings(shared))
            mlflow.log_metric("pipeline_seconds", record["seconds"])
            mlflow.log_artifact(str(record_path))
            for category in sorted(p.name for p in run_dir.iterdir() if (p / "evaluation" / "metrics.json").is_file()):
                registered = _log_category(run_dir / category, dataset, shared, experiment_id,
                                           record["data"]["root"] if register else None, client, export_onnx)
                if registered:
                    name, version, new = registered
                    logged.versions[category] = f"{name}/{version}"
                    if new:
                        logged.new_versions.append(name)
            return logged
    except (MlflowException, OSError):
        _check_reachable(uri, run_dir)  # the server went away mid-logging: say so in one line, with the way out
        raise


def _fail_interrupted_runs(client: MlflowClient, experiment_id: str, folder: str) -> None:
    """Mark FAILED the runs of this folder that an earlier `gaussad log` left RUNNING when its server
    went away (it could not close them), with their nested runs: the rerun is then the folder's only
    finished run. Filtered here, not in the search, as a path may hold quotes."""
    running = client.search_runs([experiment_id], "tags.kind = 'pipeline' and attributes.status = 'RUNNING'")
    for run in (r for r in running if r.data.tags.get("run_folder") == folder):
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for child in [c for c in children if c.info.status == "RUNNING"] + [run]:
            client.set_terminated(child.info.run_id, "FAILED")


def _log_category(folder: Path, dataset: str, shared: dict, experiment_id: str, register_from: str | None,
                  client: MlflowClient, export_onnx: bool = False) -> tuple[str, str, bool] | None:
    """The category's nested run; with `register_from` (the dataset root), also register its model
    and return (registered name, version, whether new). A registered model is stored once, in its
    version's logged model (a rerun that fitted the same model only names that version in the run's
    `registered_version` tag), since a scheduled rerun would otherwise add a copy of every model
    folder to the store each time; an unregistered one goes into the run's `model/` artifacts."""
    metrics = json.loads((folder / "evaluation" / "metrics.json").read_text())
    config = json.loads((folder / "model" / "config.json").read_text())
    with mlflow.start_run(experiment_id=experiment_id, run_name=folder.name, nested=True) as run:
        mlflow.set_tags({"dataset": dataset, "category": folder.name, "model_type": config["model_type"]})
        keys = detector_class(config["model_type"]).SETTINGS.names
        mlflow.log_params(_strings({**shared, **{k: config[k] for k in keys},
                                    "n_train_images": config.get("n_train_images")}))
        values = {k: metrics[k] for k in METRICS if metrics.get(k) is not None}
        values.update({f"threshold_{k}": v for k, v in metrics["thresholds"].items()})
        values.update(_stage_times(folder / "timings.json"))
        values["model_size_mb"] = folder_megabytes(folder / "model")
        mlflow.log_metrics(values)
        _log_loss_curves(client, run.info.run_id, config.get("loss_history", []))
        mlflow.log_artifacts(str(folder / "evaluation"), "evaluation")
        if register_from is None:
            mlflow.log_artifacts(str(folder / "model"), "model")
            return None
        name, version, new = register_model(folder / "model", dataset, folder.name, register_from, metrics, client,
                                            export_onnx)
        mlflow.set_tag("registered_version", f"{name}/{version}")
        return name, version, new


def _log_loss_curves(client: MlflowClient, run_id: str, history: list[dict]) -> None:
    """A trained network's per-epoch records as metric curves, in batches: one HTTP request per 1000
    values rather than one per value."""
    timestamp = int(time.time() * 1000)
    curves = [Metric(CURVE_NAMES.get(key, f"train_{key}"), float(value), timestamp, record["epoch"])
              for record in history for key, value in record.items() if key != "epoch"]
    for start in range(0, len(curves), 1000):
        client.log_batch(run_id, metrics=curves[start:start + 1000])


def _stage_times(path: Path) -> dict:
    """Seconds per stage (extraction, fit, scoring) and throughput, when the flow recorded them."""
    if not path.is_file():
        return {}
    timings = json.loads(path.read_text())
    values = {k: v for k, v in timings.items()
              if (k.endswith("_seconds") or k in ("seconds_per_epoch", "epochs_trained")) and v is not None}
    for split in ("train", "test"):
        seconds = timings.get(f"extract_{split}_seconds")
        if seconds:
            values[f"extract_{split}_images_per_second"] = timings[f"n_{split}_images"] / seconds
    return values


def _strings(params: dict) -> dict:
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it with an explicit artifact location for a local store."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the current folder
        location = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    # without this tag MLflow 3's UI opens the experiment on its GenAI (traces) pages, not the runs
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND: "custom_model_development"})


def _check_reachable(uri: str, run_dir: Path) -> None:
    """Fail fast, with the way out, when an HTTP tracking server does not answer (MLflow would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except OSError as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingError(
        f"tracking server {uri} is not reachable ({problem}). Nothing is lost: the models and metrics "
        f"are in {run_dir}; log them once it is up with `gaussad log {run_dir}`"
    )
