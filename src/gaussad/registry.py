"""The MLflow model registry: every fitted category model is a pyfunc version, promoted by alias.

One registered model per dataset and category, `gaussad-<dataset>-<category>`, whatever the model
type, so a PIADE model and a Gaussian one compete for the same `champion` alias. A new version
gets the alias `challenger`; `promote` scores challenger and champion on the same test images and
moves `champion` only if the challenger is at least as good on the chosen metric (or `force`),
and, given fresh defect-free images, only if its false alarms on them pass a gate that needs no
defective image; the figures and the reason go into the challenger version's tags and description.

A version holds the model folder as its artifact (config.json + safetensors, no pickle) and
gaussad/pyfunc_model.py as its code (MLflow "model from code"). With `export_onnx`, a Gaussian
model's version also holds the whole detector as one ONNX graph (gaussad.export, checked for parity
as it is written), and the pyfunc model, `mlflow models serve` included, scores with that graph.
A model already registered under the same name, identical tensor for tensor and with the same
artifacts, is not registered again: a cached pipeline rerun or a second `gaussad log` of one folder
adds no duplicate versions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

import mlflow
from gaussad import __version__
from gaussad.data import load_category
from gaussad.detectors import detector_class
from gaussad.evaluate import TEST_METRICS, test_metrics
from gaussad.files import file_sha256
from gaussad.monitoring import ALPHA, alarm_p_value
from gaussad.serving import EXPORTED_ARTIFACT, MODEL_ARTIFACT

# MLflow draws a progress bar per model download or upload: noise in flow logs. Users' settings win.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTION_METRICS = TEST_METRICS
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", "image")]),  # paths and arrays pass too, in-process
    outputs=Schema([ColSpec("double", "score"), ColSpec("string", "label"), ColSpec("double", "threshold"),
                    ColSpec(Array(Array("float")), "map", required=False)]),
    params=ParamSchema([ParamSpec("return_maps", "boolean", True)]),
)


def registered_name(dataset: str, category: str) -> str:
    return f"gaussad-{dataset}-{category}"


def fit_digest(model_dir: Path, export_onnx: bool = False) -> str:
    """SHA-256 of the model's type and tensors (and whether the version holds an exported graph):
    equal for the same fit, whatever its timings (the `model_digest` tag of a version). Not the
    folder's own digest (gaussad.model_folder.model_digest), which covers the config too."""
    config = json.loads((model_dir / "config.json").read_text())
    digest = hashlib.sha256(config["model_type"].encode())
    for tensors in sorted(model_dir.glob("*.safetensors")):
        file_sha256(tensors, digest)
    if export_onnx:
        digest.update(b"+onnx")
    return digest.hexdigest()


def register_model(model_dir: Path, dataset: str, category: str, dataset_root: str, metrics: dict,
                   client: MlflowClient, export_onnx: bool = False) -> tuple[str, str, bool]:
    """In the active run: log the model folder (with `export_onnx`, also its exported ONNX graph; a
    PIADE model has none) as a pyfunc model and register it as the challenger. Returns (registered
    name, version, whether the version is new)."""
    name = registered_name(dataset, category)
    config = json.loads((model_dir / "config.json").read_text())
    detector = detector_class(config["model_type"])
    export_onnx = export_onnx and detector.EXPORTS_ONNX
    digest = fit_digest(model_dir, export_onnx)
    existing = _version_with_digest(client, name, digest)
    if existing is not None:
        return name, existing.version, False
    with tempfile.TemporaryDirectory(prefix="gaussad-export-") as scratch:
        artifacts = {MODEL_ARTIFACT: str(model_dir)}
        if export_onnx:
            artifacts[EXPORTED_ARTIFACT] = str(_exported_graph(model_dir, Path(scratch)))
        info = mlflow.pyfunc.log_model(
            name="pyfunc",
            python_model=str(PYFUNC_CODE),
            artifacts=artifacts,
            # declared so that a loader may override it: load_model(uri, model_config={"use_exported": False})
            model_config={"use_exported": True} if export_onnx else None,
            signature=SIGNATURE,
            input_example=_input_example(config["image_size"]),
            pip_requirements=_requirements(),
        )
    version = mlflow.register_model(info.model_uri, name, tags={
        "dataset": dataset, "category": category, "dataset_root": dataset_root,
        "model_type": config["model_type"], "model_digest": digest,
        "scored_by": "exported ONNX graph" if export_onnx else "model folder",
        **{k: str(config[k]) for k in detector.NETWORK_SETTINGS},  # which networks and weights were used
        **{f"metric.{k}": str(metrics[k]) for k in PROMOTION_METRICS if metrics.get(k) is not None},
    })
    client.set_registered_model_tag(name, "dataset", dataset)
    client.set_registered_model_tag(name, "category", category)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return name, version.version, True


def _exported_graph(model_dir: Path, scratch: Path) -> Path:
    """The model folder exported as one ONNX graph into `scratch` (ValueError for a model type that
    does not export, or a graph that does not score as the model)."""
    from gaussad.detectors import load_model
    from gaussad.export import export_onnx

    model = load_model(model_dir, device="cpu", runtime="torch", progress=False)
    return export_onnx(model, scratch / f"{model_dir.name}.onnx")


def _version_with_digest(client: MlflowClient, name: str, digest: str):
    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.model_digest = '{digest}'")
    except MlflowException:
        return None
    return versions[0] if versions else None


def _input_example(image_size: int) -> pd.DataFrame:
    """One encoded PNG (mid grey, the model's size): what a client posts."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((image_size, image_size, 3), 128, np.uint8)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()]})


def _requirements() -> list[str]:
    """gaussad with its tracking extra (a served model runs MLflow) and its core dependencies, as
    installed here (MLflow would otherwise import the model in a subprocess to guess them)."""
    requirements = importlib.metadata.requires("gaussad") or []
    return [f"gaussad[tracking]=={__version__}", *(r for r in requirements if "extra ==" not in r)]


# ---- promotion ---------------------------------------------------------------------------------

@dataclass
class Promotion:
    name: str
    challenger: str  # version
    champion: str | None  # the champion version before this decision
    metric: str
    challenger_value: float | None
    champion_value: float | None
    promoted: bool
    reason: str
    # with fresh normal images: (alarms, images) of each version at its own decision threshold
    challenger_false_alarms: tuple[int, int] | None = None
    champion_false_alarms: tuple[int, int] | None = None


def promote(name: str, metric: str = "image_auroc", dataset_root: str | None = None, force: bool = False,
            uri: str | None = None, normal_images: Sequence[str | Path] | None = None) -> Promotion:
    """Make the `challenger` version `champion` if it scores at least as well as the current
    champion on `metric`, both scored now on the same test split (`dataset_root`, by default the
    challenger's own; with `normal_images` and no test split, the gate alone decides). With
    `normal_images` (fresh defect-free images neither version was fitted on), a gate that needs no
    defect as well: the challenger's false alarms on them, at its own decision threshold, not
    significantly above its false-alarm budget (the binomial test of gaussad.monitoring at 1 %) and
    no more than the champion's. `force` promotes whatever the
    figures say."""
    if metric not in PROMOTION_METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(PROMOTION_METRICS)}")
    uri = uri or mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # the versions are loaded from the same store
    client = MlflowClient(uri)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as err:
        raise ValueError(f"no registered model {name!r} in {uri}: {err.message}") from None
    if CHALLENGER not in aliases:
        raise ValueError(f"registered model {name!r} has no {CHALLENGER!r} version to promote")
    challenger = client.get_model_version(name, str(aliases[CHALLENGER]))
    champion = client.get_model_version(name, str(aliases[CHAMPION])) if CHAMPION in aliases else None
    challenger_value = champion_value = None
    if champion is None:
        promoted, reason = True, f"version {challenger.version} is the first champion of {name}"
    elif champion.version == challenger.version:
        promoted, reason = False, f"version {challenger.version} is already the champion"
    elif normal_images is not None and not _has_test_split(dataset_root or challenger.tags["dataset_root"],
                                                           challenger.tags["category"]):
        promoted, reason = True, "no labelled test split: the false-alarm gate alone decides"
    else:
        root = dataset_root or challenger.tags["dataset_root"]
        category = load_category(root, challenger.tags["category"])  # validated before any scoring
        challenger_value = _score_version(name, challenger.version, category, metric)
        champion_value = _score_version(name, champion.version, category, metric)
        on = f"on {len(category.test)} test images of {root}/{category.name}"
        if champion_value is not None and (challenger_value is None or challenger_value < champion_value):
            promoted = False
            reason = (f"{metric} {_format(challenger_value)} < champion v{champion.version}'s "
                      f"{_format(champion_value)} {on}")
        else:
            promoted = True
            reason = (f"{metric} {_format(challenger_value)} >= champion v{champion.version}'s "
                      f"{_format(champion_value)} {on}")
    alarms = {}
    if normal_images is not None and (champion is None or champion.version != challenger.version):
        alarms = {role: _false_alarms(name, version.version, normal_images)
                  for role, version in (("challenger", challenger), ("champion", champion)) if version is not None}
        passed, gate_reason = _false_alarm_gate(alarms, champion.version if champion else None)
        promoted, reason = promoted and passed, f"{reason}; {gate_reason}"
    if force and not promoted and champion is not None and champion.version != challenger.version:
        promoted, reason = True, f"forced: {reason}"
    counts = {role: found[:2] for role, found in alarms.items()}  # (alarms, images)
    decision = Promotion(name, challenger.version, champion.version if champion else None, metric,
                         challenger_value, champion_value, promoted, reason, counts.get("challenger"),
                         counts.get("champion"))
    if champion is None or champion.version != challenger.version:  # the champion keeps its own record
        _record(client, decision)
    return decision


def _has_test_split(root: str, category: str) -> bool:
    return (Path(root) / category / "test").is_dir()


def _false_alarms(name: str, version: str, images: Sequence[str | Path]) -> tuple[int, int, float | None]:
    """(alarms, images, false-alarm budget) of a registered version on defect-free `images`."""
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model
    scores = model.score(images).image
    return int((scores >= model.decision_threshold).sum()), len(scores), model.config.get("false_alarm_rate")


def _false_alarm_gate(alarms: dict, champion: str | None) -> tuple[bool, str]:
    """Whether the challenger's false alarms pass (its budget, the champion's), and why."""
    k, n, budget = alarms["challenger"]
    passed, reason = True, f"{k} false alarms in {n} fresh normal images"
    if budget is not None:
        p = alarm_p_value(k, n, budget)
        within = p >= ALPHA
        passed = passed and within
        reason += f" ({'within' if within else 'above'} its budget {budget:g}: p = {p:.2g})"
    if "champion" in alarms:
        champion_k = alarms["champion"][0]
        passed = passed and k <= champion_k
        reason += f", {'<=' if k <= champion_k else '>'} champion v{champion}'s {champion_k}"
    return passed, reason


def _score_version(name: str, version: str, category, metric: str) -> float | None:
    """`metric` of a registered version on `category`'s test split, through its pyfunc wrapper."""
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model
    scores = model.score(category.test)
    return test_metrics(category, scores, model.config["image_size"]).get(metric)


def _record(client: MlflowClient, decision: Promotion) -> None:
    version = decision.challenger
    if decision.promoted:
        client.set_registered_model_alias(decision.name, CHAMPION, version)
    tags = {
        "promotion.decision": "promoted" if decision.promoted else "not promoted",
        "promotion.metric": decision.metric,
        "promotion.reason": decision.reason,
        "promotion.champion_before": decision.champion or "none",
    }
    for key, value in (("challenger_value", decision.challenger_value), ("champion_value", decision.champion_value),
                       ("challenger_false_alarms", decision.challenger_false_alarms),
                       ("champion_false_alarms", decision.champion_false_alarms)):
        if value is not None:
            tags[f"promotion.{key}"] = str(value) if not isinstance(value, tuple) else f"{value[0]}/{value[1]}"
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, version, key, value)
    client.update_model_version(decision.name, version, description=f"{tags['promotion.decision']}: {decision.reason}")


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
