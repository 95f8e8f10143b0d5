"""The core library installs and imports without the workflow tools: Prefect and DVC come with the
`pipeline` extra, MLflow with `tracking` (pyproject.toml)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

WORKFLOW = {"pipeline": {"prefect", "prefect-dask", "fastapi", "sqlalchemy", "dvc"}, "tracking": {"mlflow"}}
CORE_MODULES = ("gaussad", "gaussad.detectors", "gaussad.evaluate", "gaussad.cli", "gaussad.demo")


def python(code: str, cwd) -> str:
    """Run `code` in a fresh interpreter (in `cwd`, away from any stale *.egg-info in the checkout)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_core_modules_import_without_workflow_tools(tmp_path):
    code = (
        f"import json, sys\nimport {', '.join(CORE_MODULES)}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = set(json.loads(python(code, tmp_path)))
    workflow = {name for name in loaded if name.split("_")[0] in {"prefect", "mlflow", "dvc"}}
    assert not workflow, f"importing {', '.join(CORE_MODULES)} loads {sorted(workflow)}"


def test_workflow_tools_are_extras(tmp_path):
    # the installed metadata (stale if pyproject.toml changed since `pip install -e '.[all,test]'`)
    code = "import importlib.metadata as m, json; print(json.dumps(m.requires('gaussad')))"
    lines = json.loads(python(code, tmp_path))
    requirements = [Requirement(line) for line in lines]
    core = {r.name.lower() for r in requirements if r.marker is None}
    workflow = set().union(*WORKFLOW.values())
    assert not core & workflow, f"core dependencies include {core & workflow}"
    assert {"torch", "timm", "numpy", "pillow", "pyyaml"} <= core
    for extra, names in WORKFLOW.items():
        listed = {r.name.lower() for r in requirements if r.marker and r.marker.evaluate({"extra": extra})}
        assert names <= listed, f"[{extra}] lacks {names - listed}; reinstall with pip install -e '.[all,test]'"
    everything = [r for r in requirements if r.marker and r.marker.evaluate({"extra": "all"})]
    assert [(r.name, r.extras) for r in everything] == [("gaussad", {"pipeline", "tracking"})]
    assert any(r.name == "pytest" and r.marker.evaluate({"extra": "test"}) for r in requirements if r.marker)


def test_the_wheel_ships_one_top_level_package_with_its_type_hints(tmp_path):
    """The flows ship inside gaussad (no top-level `flows` to clash with a user's), with py.typed."""
    root, source = Path(__file__).resolve().parents[1], tmp_path / "source"  # a copy: the build writes build/
    shutil.copytree(root / "src" / "gaussad", source / "src" / "gaussad", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("gaussad-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"gaussad"}
    assert {"gaussad/py.typed", "gaussad/flows/train.py", "gaussad/flows/retrain.py"} <= set(names)
