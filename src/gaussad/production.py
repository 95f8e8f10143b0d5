"""The production loop of one registered model: new defect-free images in, drift watched, the
champion updated (or fitted again) and promoted on fresh normal images, no defect needed.

Each category has a folder of arrivals (params.yaml `production.arrivals`, then <category>/): images
from the line taken as good (a person has looked at the flagged ones and taken the defects out).
Every arrival belongs, by its content digest, to the gate share (`gate_fraction`) or the update
share, for good: gate images are fitted on by no version, so they stay fresh normal images for the
promotion gate. One tick (`watch`):

1. The arrivals not monitored before (by content, SHA-256) are scored by the champion and tested
   for drift (gaussad.monitoring). No new image: the tick ends here, and nothing is retrained.
2. When they drift, or `update_after` update-share images are not yet in the champion, those are
   added to it (an exact update, gaussad.gaussian.updates) or, when its settings cannot update, a
   model with its settings is fitted on its training images and every update-share arrival.
3. That model is registered as `challenger`, with its lineage (the arrivals it holds, their count
   and content digest, the version it came from) in its tags and in lineage.json, then promoted
   through the gate of gaussad.registry.promote: its false alarms on the gate images not
   significantly above its budget and no more than the champion's, and the labelled comparison
   where the category has a test split.
4. The tick's figures go to the model's monitoring run in MLflow, one step per tick (metric
   curves over time), with monitor.json and monitor.png of every tick as artifacts. They are logged
   last, so a tick that fails midway is done again whole by the next one.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from gaussad.base_detector import Detector
from gaussad.data import IMAGE_SUFFIXES, ImageSet, load_category, validate_images
from gaussad.detectors import detector_class
from gaussad.files import file_sha256
from gaussad.gaussian.updates import check_updatable, digests_digest
from gaussad.monitoring import ALPHA, monitor
from gaussad.plots import save_monitor_plot
from gaussad.registry import CHALLENGER, CHAMPION, promote, register_model
from gaussad.settings import Setting, SettingsTable
from gaussad.tracking import ensure_experiment

PRODUCTION = SettingsTable([
    Setting("arrivals", "text", None, "folder of new defect-free images, one subfolder per category "
            "(<arrivals>/<category>/); null: no production loop", optional=True, flag=False),
    Setting("update_after", "int", 100, "update-share images not yet in the champion that make a tick update "
            "it when there is no drift", minimum=1, flag=False),
    Setting("gate_fraction", "float", 0.2, "share of the arrivals (by content) that no version is fitted on: the "
            "promotion gate's fresh normal images", minimum=0, maximum=1, open_high=True, flag=False),
    Setting("window", "int", None, "monitoring: also test every window of N new images", minimum=1,
            optional=True, flag=False),
    Setting("alpha", "float", ALPHA, "monitoring: the drift tests' level", minimum=0, maximum=1, open_low=True,
            open_high=True, flag=False),
], owner="the production block")
MONITORED = "state/monitored.json"  # the monitoring run's record of the images it has seen (SHA-256)
LINEAGE = "lineage.json"  # in the run that registered a version: the arrivals that version holds


def production_settings(params: dict, source: str = "params.yaml") -> dict:
    """The params' `production` block, every setting checked (ValueError naming the key)."""
    return PRODUCTION.validate(params.get("production") or {}, f"{source}: production.")


def arrival_images(folder: Path) -> list[tuple[Path, str]]:
    """(path, SHA-256) of every image in `folder`, by name; none when it does not exist. A file
    that is no readable image is a DatasetError naming it."""
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    validate_images(ImageSet.from_paths(paths))
    return [(path, file_sha256(path)) for path in paths]


def in_gate(digest: str, fraction: float) -> bool:
    """Whether the image with this content digest belongs to the gate share: a fixed choice, by
    content, so an image stays on its side from tick to tick whatever else arrives."""
    return int(digest[:15], 16) / 16**15 < fraction


@dataclass
class Tick:
    name: str  # the registered model
    champion: str | None  # its champion version when the tick began
    action: str  # none | monitored | updated | refitted
    reason: str
    n_arrivals: int = 0
    n_new: int = 0  # arrivals monitored for the first time
    n_pending: int = 0  # update-share arrivals not in the champion
    n_gate: int = 0
    drift: bool | None = None
    p_value: float | None = None
    alarm_rate: float | None = None
    expected_alarm_rate: float | None = None
    challenger: str | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    monitoring_run: str | None = None


def watch(name: str, arrivals: Path, settings: dict, out: Path, experiment: str, uri: str, holdout: float = 0.1,
          batch_size: int = 16, metric: str = "image_auroc", export_onnx: bool = False) -> Tick:
    """One tick of the loop for the registered model `name` (see the module docstring); `out`: the
    folder for this tick's monitor.json and monitor.png; `holdout`: the share of new images an update
    or a refit holds out for the thresholds."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        aliases = {}
    if CHAMPION not in aliases:
        return Tick(name, None, "none", f"{name} has no champion yet: train and promote one first")
    champion = client.get_model_version(name, str(aliases[CHAMPION]))
    images = arrival_images(arrivals)
    run = monitoring_run(client, ensure_experiment(experiment, uri), name)
    monitored = set(_json_artifact(client, run.info.run_id, MONITORED) or [])
    new = [(path, digest) for path, digest in images if digest not in monitored]
    gate = [path for path, digest in images if in_gate(digest, settings["gate_fraction"])]
    update_share = [(path, digest) for path, digest in images if not in_gate(digest, settings["gate_fraction"])]
    lineage = (_lineage(client, champion) or {}).get("images", [])  # [path, SHA-256] the champion holds
    held = {digest for _, digest in lineage}
    pending = [(path, digest) for path, digest in update_share if digest not in held]
    tick = Tick(name, champion.version, "none", "no new images", len(images), len(new), len(pending),
                len(gate), monitoring_run=run.info.run_id)
    if not new:
        return tick

    model = _load_version(name, champion.version, batch_size)
    scores = model.score([path for path, _ in new])
    report = monitor(scores.image, model.fit_info.get("normal_image_scores", []), model.decision_threshold,
                     model.config.get("false_alarm_rate"), settings["window"], settings["alpha"],
                     scores.maps.mean((1, 2)), model.fit_info.get("normal_map_means"))
    report.update(model=f"{name}/{champion.version}", images=[str(path) for path, _ in new])
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor.json").write_text(json.dumps(report, indent=2))
    save_monitor_plot(scores.image, model.fit_info["normal_image_scores"], model.decision_threshold, report,
                      out / "monitor.png", f"{name} v{champion.version}: {len(new)} new images")
    tick.drift, tick.p_value = report["drift"], report["p_value"]
    tick.alarm_rate, tick.expected_alarm_rate = report["alarm_rate"], report["expected_alarm_rate"]

    trigger = "drift" if report["drift"] else (
        f"{len(pending)} images not in the champion" if len(pending) >= settings["update_after"] else None)
    if trigger is None or not pending:
        tick.action = "monitored"
        tick.reason = ("drift, but no update-share image to add" if trigger else
                       f"no drift, {len(pending)} of {settings['update_after']} images for an update")
    else:
        tick.action, tick.reason = _new_challenger(client, model, champion, lineage, update_share, pending, holdout,
                                                   batch_size, experiment, uri, export_onnx, tick)
        tick.reason = f"{trigger}: {tick.reason}"
        decision = promote(name, metric, uri=uri, normal_images=gate or None)
        tick.promoted, tick.promotion_reason = decision.promoted, decision.reason
    _log_tick(client, run.info.run_id, report, out, tick, monitored | {digest for _, digest in new})
    return tick


def _new_challenger(client: MlflowClient, model: Detector, champion, earlier: list[list[str]],
                    update_share: list[tuple[Path, str]], pending: list[tuple[Path, str]], holdout: float,
                    batch_size: int, experiment: str, uri: str, export_onnx: bool, tick: Tick) -> tuple[str, str]:
    """The champion (holding the arrivals `earlier`) updated with `pending`, or fitted again on its
    training images and `update_share`, and registered as challenger; returns (action, what was done)."""
    tags = champion.tags
    if can_update(model):
        model.update([path for path, _ in pending], holdout)
        action, held = "updated", [*earlier, *([str(p), d] for p, d in pending)]
        done = f"added {len(pending)} images to v{champion.version} exactly"
    else:
        category = load_category(tags["dataset_root"], tags["category"], validate=False)
        detector = detector_class(model.MODEL_TYPE)
        model = detector.from_settings({k: model.config[k] for k in detector.SETTINGS.names}, False,
                                       batch_size=batch_size, progress=False)
        model.fit([*category.train.paths, *(p for p, _ in update_share)], holdout)
        action, held = "refitted", [[str(p), d] for p, d in update_share]
        done = (f"v{champion.version}'s settings cannot update: fitted again on {len(category.train)} training "
                f"images and {len(update_share)} arrivals")
    lineage = {"parent_version": champion.version, "action": action, "n_images": len(held),
               "images_sha256": digests_digest(sha for _, sha in held), "images": held}
    with tempfile.TemporaryDirectory(prefix="gaussad-challenger-") as scratch:
        model_dir = model.save(Path(scratch) / "model")
        with mlflow.start_run(experiment_id=ensure_experiment(experiment, uri), run_name=f"{tags['category']}-{action}",
                              tags={"kind": action, "registered_model": tick.name, "category": tags["category"],
                                    "parent_version": champion.version}) as run:
            mlflow.log_dict(lineage, LINEAGE)
            mlflow.log_params({"n_train_images": model.fit_info["n_train_images"],
                               "n_holdout_images": model.fit_info["n_holdout_images"]})
            name, version, _ = register_model(model_dir, tags["dataset"], tags["category"], tags["dataset_root"], {},
                                              client, export_onnx)
    # a version found again (the same fit as an earlier challenger) is the challenger once more
    client.set_registered_model_alias(name, CHALLENGER, version)
    for key, value in {"lineage.run_id": run.info.run_id, "lineage.parent_version": champion.version,
                       "lineage.action": action, "lineage.n_images": len(held),
                       "lineage.images_sha256": lineage["images_sha256"]}.items():
        client.set_model_version_tag(name, version, key, str(value))
    tick.challenger = version
    return action, f"{done} -> v{version}"


def can_update(model: Detector) -> bool:
    """Whether images can be added to `model` exactly (an updatable ridge Gaussian model)."""
    try:
        check_updatable(model)
    except (ValueError, KeyError):  # a PIADE model has no `covariance`
        return False
    return True


def _load_version(name: str, version: str, batch_size: int) -> Detector:
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model
    model.batch_size, model.progress = batch_size, False
    return model


def _lineage(client: MlflowClient, version) -> dict | None:
    """The lineage.json of a version the loop registered (None for one the train flow registered)."""
    run_id = version.tags.get("lineage.run_id")
    return _json_artifact(client, run_id, LINEAGE) if run_id else None


def _json_artifact(client: MlflowClient, run_id: str, path: str):
    with tempfile.TemporaryDirectory(prefix="gaussad-artifact-") as scratch:
        try:
            local = client.download_artifacts(run_id, path, scratch)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(local).read_text())


def monitoring_run(client: MlflowClient, experiment: str, name: str):
    """The registered model's monitoring run (one for its whole life), created on first use."""
    runs = client.search_runs([experiment], f"tags.kind = 'monitoring' and tags.registered_model = '{name}'")
    if runs:
        return runs[0]
    run = client.create_run(experiment, run_name=f"monitor-{name}",
                            tags={"kind": "monitoring", "registered_model": name, "ticks": "0"})
    client.set_terminated(run.info.run_id)  # a record that grows, not a job that runs
    return run


def _log_tick(client: MlflowClient, run_id: str, report: dict, out: Path, tick: Tick, monitored: set[str]) -> None:
    """The tick's figures as step `ticks` of the monitoring run's curves, its files, the images seen."""
    step = int(client.get_run(run_id).data.tags.get("ticks", "0"))
    now = int(time.time() * 1000)
    values = {key: report[key] for key in ("n_images", "alarms", "alarm_rate", "expected_alarm_rate", "p_value",
                                           "alarm_p_value", "ks_statistic", "ks_p_value", "feature_p_value")
              if report[key] is not None}
    values.update(drift=float(report["drift"]), champion_version=float(tick.champion),
                  updated=float(tick.challenger is not None), promoted=float(bool(tick.promoted)))
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in values.items()])
    for name in ("monitor.json", "monitor.png"):
        client.log_artifact(run_id, str(out / name), f"ticks/{step:04d}")
    client.log_artifact(run_id, str(out / "monitor.png"))  # the latest, at the top
    client.log_text(run_id, json.dumps(sorted(monitored)), MONITORED)
    client.set_tag(run_id, "ticks", str(step + 1))
