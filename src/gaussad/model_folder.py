"""The on-disk format of a fitted model: a folder with config.json and one safetensors file.

config.json holds everything needed to rebuild the model, and a `digest`: SHA-256 over the rest of
the config and the bytes of the tensors file, written at save time and checked at load. A config
edited by hand, or a config and tensors from two different saves, fail to load with a clear
message instead of giving numbers from a model that was never fitted that way.
A folder is written beside its target and renamed into place, so it appears whole or not at all,
and it replaces only a gaussad model folder (gaussad.output_folders).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gaussad import __version__
from gaussad.errors import ModelFileError, OutputError
from gaussad.files import file_sha256
from gaussad.output_folders import check_model_destination

DIGEST_KEY = "digest"
# Format 1 folders were saved before the digest existed; registries hold them, so they still load
# (unchecked) and are saved again as the current format.
UNSIGNED_FORMAT_VERSION = 1
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def write_model_folder(directory: str | Path, tensors: dict[str, torch.Tensor], tensors_file: str,
                       config: dict) -> Path:
    """Write config.json (with its digest) + the tensors file; the folder appears whole or not at all,
    and an existing folder is replaced only if it is a gaussad model folder."""
    return _publish(directory, tensors_file, config, lambda target: save_file(tensors, str(target)))


def rewrite_config(directory: str | Path, tensors: dict[str, torch.Tensor], tensors_file: str,
                   config: dict) -> Path | None:
    """Give a model folder a new config.json (new thresholds, say) and keep its tensors file, linked
    into the new folder rather than written again (100 MB and more for per-position Gaussians).
    Only where that file holds exactly `tensors`; else nothing is written, and None says to save whole."""
    path = check_model_destination(directory) / tensors_file
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError):
        return None
    if saved.keys() != tensors.keys() or not all(
            saved[k].dtype == t.dtype and saved[k].shape == t.shape and torch.equal(saved[k], t)
            for k, t in tensors.items()):
        return None

    def link(target: Path) -> None:
        try:
            os.link(path, target)
        except OSError:  # a file system without hard links
            shutil.copy2(path, target)

    return _publish(directory, tensors_file, config, link)


def _publish(directory: str | Path, tensors_file: str, config: dict, write_tensors) -> Path:
    """Write a model folder beside `directory`: `write_tensors(path)` makes its tensors file, then
    config.json with the digest of both; flushed, then swapped into place (replace_folder)."""
    directory = check_model_destination(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_scratch(directory.parent, f".{glob.escape(directory.name)}.partial-*")
    partial = scratch_folder(directory)
    try:
        write_tensors(partial / tensors_file)
        signed = {**config, DIGEST_KEY: model_digest(config, partial / tensors_file)}
        (partial / "config.json").write_text(json.dumps(signed, indent=2))
        _sync(partial)
        check_model_destination(directory)  # again: the target may have appeared during the save
        replace_folder(partial, directory)
    except (OSError, SafetensorError) as err:  # a full disk, a read-only folder: what was there stays as it was
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).split(": ")[-1]
        raise OutputError(f"cannot save the model to {directory}: {reason}; "
                          f"{'the model already there is unchanged' if directory.exists() else 'nothing was written'}"
                          ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def model_digest(config: dict, tensors_path: Path) -> str:
    """SHA-256 over the config (without its digest, as JSON with sorted keys) and the tensors' bytes."""
    canonical = json.loads(json.dumps({k: v for k, v in config.items() if k != DIGEST_KEY}))
    return file_sha256(tensors_path, hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()))


def replace_folder(new: Path, target: Path) -> None:
    """Move `new` to `target`. An existing `target` is swapped with `new` in one atomic exchange
    (Linux renameat2), so a crash at any moment leaves either the old or the new folder at `target`;
    where the exchange is not supported, two renames (a crash between them leaves the old folder
    beside the target, as .<name>.old-<pid>)."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now holds the old folder
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):  # a file system without it
        return False
    raise OSError(error, os.strerror(error), str(b))


def scratch_folder(target: Path) -> Path:
    """A new hidden folder beside `target` to write it in: .<name>.partial-<host>-<pid>-<id>, unique per
    call (two threads or processes writing one target never share it), its owner known by name."""
    folder = target.with_name(f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    folder.mkdir(parents=True)
    return folder


def remove_abandoned_scratch(parent: Path, pattern: str) -> None:
    """Delete the scratch folders (see scratch_folder) matching `pattern` in `parent` whose process,
    on this machine, is gone: left by a process killed while writing."""
    host = socket.gethostname()
    for folder in parent.glob(pattern):
        owner = folder.name.split(".partial-", 1)[-1].rsplit("-", 2)  # [host, pid, id]; a host may hold '-'
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not process_alive(int(owner[1])):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with this id is running (its hidden folders are in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _sync(folder: Path) -> None:
    """Flush the folder's files to disk before the rename that publishes them (a crash of the
    machine must not leave a renamed folder of empty files)."""
    for path in folder.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def folder_megabytes(directory: Path) -> float:
    """The size of a model folder's files, in MB (2²⁰ bytes), to two decimals."""
    return round(sum(path.stat().st_size for path in directory.iterdir() if path.is_file()) / 2**20, 2)


def read_model_type(directory: Path) -> str | None:
    """The model_type a model folder's config.json names."""
    return read_json(directory / "config.json").get("model_type")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFileError(f"{path.parent} is not a gaussad model folder: {path.name} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path} holds a JSON {type(config).__name__}, not a model config")
    return config


def read_model_folder(directory: Path, model_type: str, format_version: int,
                      tensors_file: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A model folder's config and tensors, checked: model type, format version, and that the two
    belong together (the digest written at save time)."""
    config_path, tensors_path = directory / "config.json", directory / tensors_file
    config = read_json(config_path)
    if config.get("model_type") != model_type:
        raise ModelFileError(f"{config_path}: model_type {config.get('model_type')!r} is not {model_type!r}")
    version = config.get("format_version")
    if version not in (format_version, UNSIGNED_FORMAT_VERSION) or isinstance(version, bool):
        raise ModelFileError(
            f"{config_path}: format version {config.get('format_version')} is not {format_version} "
            f"(saved by gaussad {config.get('gaussad_version')}, this is {__version__}); train the model again"
        )
    tensors = read_tensors(tensors_path)
    if version != UNSIGNED_FORMAT_VERSION and config.get(DIGEST_KEY) != model_digest(config, tensors_path):
        raise ModelFileError(
            f"{config_path} does not match {tensors_path.name}: the config was edited after saving, or the "
            f"two files come from different saves; fit the model again (thresholds: use predict --threshold)"
        )
    return config, tensors


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A model folder's safetensors file; ModelFileError names it when missing or unreadable."""
    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"cannot read {path}: {err}") from None
