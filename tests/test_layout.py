"""The layout: the repository's own imports point one way, down the data flow, and modules stay small.

Every module of src/gaussad has a place in LAYERS; a module may import (at the top or
inside a function) only modules above it in that list. A new module needs a place here, which is
where a reviewer sees which way its arrows point.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 300
LAYERS = [
    "gaussad",  # __init__: the version
    "gaussad.errors",
    "gaussad.validation",
    "gaussad.files",  # hashing a file, writing one atomically
    "gaussad.data",  # image files, datasets in MVTec AD layout
    "gaussad.output_folders",
    "gaussad.demo.scenes",  # the synthetic demo dataset
    "gaussad.demo.defects",
    "gaussad.demo",
    "gaussad.model_folder",  # the on-disk format of a fitted model
    "gaussad.metrics",
    "gaussad.false_alarms",  # thresholds on a false-alarm budget (Clopper-Pearson)
    "gaussad.plots",
    "gaussad.monitoring",  # drift tests of production scores
    "gaussad.networks",  # pretrained CNNs, weight sources, the part that computes chosen levels
    "gaussad.onnx_features",  # the onnxruntime runtime: levels exported to ONNX, cached by content
    "gaussad.features",  # features per level on a runtime, image batches, the feature store
    "gaussad.settings",  # the declarative settings tables
    "gaussad.base_detector",  # the interface every detector implements
    "gaussad.gaussian.map_operations",  # local averages, stacking, upsampling and smoothing maps
    "gaussad.gaussian.statistics",  # streaming moments, NPCA, Ledoit-Wolf, Mahalanobis
    "gaussad.gaussian.settings",
    "gaussad.gaussian.pixel_inputs",
    "gaussad.gaussian.updates",  # adding images to a fitted model exactly
    "gaussad.gaussian.detector",
    "gaussad.gaussian",
    "gaussad.piade.settings",
    "gaussad.piade.network",
    "gaussad.piade.loss",
    "gaussad.piade.training",
    "gaussad.piade.detector",
    "gaussad.piade",
    "gaussad.detectors",  # the table of detectors by model type
    "gaussad.export",  # a fitted detector as one ONNX graph, and its runner
    "gaussad.model",  # kept for registered models' pyfunc code
    "gaussad.evaluate",
    "gaussad.serving",  # the MLflow pyfunc model: what registered versions import
    "gaussad.pyfunc_model",  # the code stored with each registered version
    "gaussad.registry",  # MLflow from here down
    "gaussad.tracking",
    "gaussad.retention",  # deleting old registered versions
    "gaussad.production",  # the production loop's tick: monitor, update or refit, register, promote
    "gaussad.flows",
    "gaussad.flows.runtime",  # Prefect from here down
    "gaussad.flows.cache",
    "gaussad.flows.reporting",
    "gaussad.flows.train",
    "gaussad.flows.promote",
    "gaussad.flows.production",
    "gaussad.flows.retrain",
    "gaussad.cli_arguments",  # the flags that describe a model and how it runs
    "gaussad.cli_models",  # update, predict, export
    "gaussad.cli_workflow",  # serve, log, promote
    "gaussad.cli",
]


def modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "src", "gaussad"),):
        for path in sorted((base / package).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The repository modules a file imports, anywhere in it (`from a.b import c` counts a.b.c when
    that is a module, else a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def test_every_module_has_a_place_in_the_layers():
    assert sorted(modules()) == sorted(LAYERS)


def test_imports_point_down_the_layers_only():
    found = modules()
    rank = {name: index for index, name in enumerate(LAYERS)}
    upward = [f"{name} imports {target}" for name, path in found.items()
              for target in sorted(imported(path, set(found))) if rank[target] >= rank[name]]
    assert not upward, "\n".join(upward)


def test_no_module_is_longer_than_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_code_stored_with_registered_models_imports_one_stable_module():
    """MLflow stores gaussad/pyfunc_model.py with every registered version: each gaussad module it
    imports is a path users' registries depend on. It imports gaussad.serving alone."""
    found = modules()
    assert imported(found["gaussad.pyfunc_model"], set(found)) == {"gaussad.serving"}
