"""Where gaussad may write: it deletes or replaces only what it wrote itself.

- A model folder (`-o` of fit) is replaced whole by a new save only when it is a gaussad model
  folder: its config.json is gaussad's (a model type and a format version) and
  the folder holds nothing but config.json and safetensors files.
  Any other existing path (a user's folder, a plain file, a link) is refused before any compute.
- An output folder (evaluation, predictions, a pipeline run, the task cache, checkpoints, demo data)
  is used when it is new, empty, or carries the marker file a gaussad run of the same kind left in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from gaussad.errors import OutputError

MARKER = ".gaussad-output"


def is_model_folder(path: Path) -> bool:
    """True for a folder gaussad wrote as a model: a gaussad config.json and only model files
    (whatever the detector: the detectors are not known down here)."""
    config_path = path / "config.json"
    if path.is_symlink() or not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    only_model_files = all(entry.name == "config.json" or (entry.suffix == ".safetensors" and entry.is_file())
                           for entry in path.iterdir())
    return (isinstance(config, dict) and isinstance(config.get("model_type"), str)
            and "format_version" in config and only_model_files)


def check_model_destination(path: str | Path) -> Path:
    """`path` if a model may be saved there: it does not exist, is an empty folder, or is a gaussad
    model folder (which the save replaces). OutputError otherwise, before anything is computed."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link: give the model a new folder (gaussad does not replace links)")
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputError(f"{path} is an existing file, not a model folder: gaussad will not replace it; "
                          f"choose a new folder for the model")
    if any(path.iterdir()) and not is_model_folder(path):
        raise OutputError(f"{path} already exists and is not a gaussad model folder ({_some_names(path)}): "
                          f"gaussad replaces only its own model folders; choose a new or empty folder")
    return path


def check_output_folder(path: str | Path, kind: str, adopt: Callable[[list[str]], bool] | None = None) -> Path:
    """`path` if gaussad may write its `kind` outputs there: it does not exist, is an empty folder,
    carries the marker of the same kind, or (with `adopt`) holds only entries `adopt` recognises as
    gaussad's. OutputError otherwise. Nothing is created."""
    path = Path(path)
    if path.is_symlink() and not path.is_dir():
        raise OutputError(f"{path} is a broken symbolic link: choose a new folder for the {kind} outputs")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is an existing file: choose a new folder for the {kind} outputs")
    if path.is_dir() and any(path.iterdir()):
        marker = path / MARKER
        if marker.is_file():
            found = _marker_kind(marker)
            if found != kind:
                raise OutputError(f"{path} holds gaussad's {found} outputs, not {kind} outputs: choose another folder")
        elif not (adopt and adopt(sorted(entry.name for entry in path.iterdir()))):
            raise OutputError(f"{path} already holds files gaussad did not write ({_some_names(path)}): "
                              f"choose a new or empty folder for the {kind} outputs")
    return path


def claim_output_folder(path: str | Path, kind: str, adopt: Callable[[list[str]], bool] | None = None) -> Path:
    """Check `path` as check_output_folder does, then create it and mark it as gaussad's `kind` outputs."""
    path = check_output_folder(path, kind, adopt)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"kind": kind}) + "\n")
    return path


def _marker_kind(marker: Path) -> str:
    try:
        return str(json.loads(marker.read_text()).get("kind"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _some_names(path: Path, count: int = 3) -> str:
    names = sorted(entry.name for entry in path.iterdir())
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")
