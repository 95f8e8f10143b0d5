"""The task cache of the train flow: content keys, the folder of each task's result, and the policy
that trusts a cached result only while its folder is complete.

Each task writes one folder under the cache (default `.gaussad-cache/`, or $GAUSSAD_CACHE_DIR) at a
path that is a function of its inputs, below, and returns that path: its Prefect result record
(under <cache>/results) holds only the path string. The folder appears whole or not at all
(`new_folder`), and a record is used only while its folder is complete (`WhileComplete`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gaussad.flows.runtime  # noqa: F401  (before prefect: it sets Prefect's environment defaults)

# isort: split
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from gaussad.data import Category
from gaussad.files import file_sha256
from gaussad.model_folder import remove_abandoned_scratch, scratch_folder

DEFAULT_CACHE = Path(os.environ.get("GAUSSAD_CACHE_DIR", ".gaussad-cache"))
FEATURES, MODELS, EVALUATIONS, CHECKPOINTS, RESULTS = "features", "models", "evaluations", "checkpoints", "results"
CACHE_FOLDERS = {FEATURES, MODELS, EVALUATIONS, CHECKPOINTS, RESULTS}  # all a cache folder may hold

# The files that make a folder complete (each written last)
FEATURE_FILES = ("meta.json",)
MODEL_FILES = ("config.json",)
EVALUATION_FILES = ("timings.json", "evaluation/metrics.json")


# ---- content keys ------------------------------------------------------------------------------

def file_digest(paths) -> str:
    """SHA-256 over the bytes of the files, in order; paths and modification times do not count."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"<no file>")
            continue
        file_sha256(path, digest)
        digest.update(b"<end of file>")
    return digest.hexdigest()


def test_split_digest(category: Category) -> str:
    """Content of the test split: images, masks and labels (defect type names)."""
    labels = hashlib.sha256(json.dumps(list(category.test.defect_types)).encode()).hexdigest()
    return hashlib.sha256(
        (file_digest(category.test.paths) + file_digest(category.test.mask_paths) + labels).encode()
    ).hexdigest()


def settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---- the folders -------------------------------------------------------------------------------
# Their arguments are named as the inputs of the task that writes them: WhileComplete calls them
# with all of a task's inputs (hence **_).

def features_folder(cache_dir: str, digest: str, features: dict, **_) -> Path:
    """Features of images with content `digest`, extracted with the `features` settings."""
    return Path(cache_dir) / FEATURES / f"{digest[:24]}-{settings_digest(features)}"


def model_folder(cache_dir: str, train_store: str, settings: dict, holdout: float, **_) -> Path:
    """A model fitted on the features in `train_store`."""
    return Path(cache_dir) / MODELS / f"{Path(train_store).name}-{settings_digest({**settings, 'holdout': holdout})}"


def training_folder(cache_dir: str, digest: str, model_type: str, settings: dict, holdout: float, **_) -> Path:
    """A model trained on images with content `digest`."""
    return Path(cache_dir) / MODELS / _training_key(digest, model_type, settings, holdout)


def checkpoint_folder(cache_dir: str, digest: str, model_type: str, settings: dict, holdout: float, **_) -> Path:
    """The checkpoints of that training, which a rerun resumes from."""
    return Path(cache_dir) / CHECKPOINTS / _training_key(digest, model_type, settings, holdout)


def _training_key(digest: str, model_type: str, settings: dict, holdout: float) -> str:
    return f"{model_type}-{digest[:24]}-{settings_digest({**settings, 'holdout': holdout})}"


def evaluation_folder(cache_dir: str, model_dir: str, digest: str, **_) -> Path:
    """The evaluation of the model in `model_dir` on a test split with content `digest`."""
    return Path(cache_dir) / EVALUATIONS / f"{Path(model_dir).name}-{digest[:16]}"


def results_folder(cache_dir: str) -> Path:
    """Prefect's result records: beside what they point to."""
    return Path(cache_dir) / RESULTS


def is_complete(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in files)


@dataclass
class WhileComplete(CachePolicy):
    """`policy`'s cache key, but a cached result is trusted only while the folder it points to
    (`folder(**task inputs)`) holds `files`.

    When a record exists and its folder is gone or incomplete (deleted by hand, or left by an older
    version), the key is None: Prefect then neither reads nor writes a record and the task runs. The
    key cannot simply include "is the folder complete", as it is computed before the task runs: the
    record written then would be keyed "incomplete" and missed by every later run. The stale record
    stays and is right again once the task has rewritten the folder (same inputs, same path)."""

    policy: CachePolicy | None = None
    folder: Callable[..., Path] | None = None
    files: tuple[str, ...] = ()

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict, flow_parameters: dict, **kwargs) -> str | None:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        if key and not is_complete(self.folder(**inputs), self.files) and task_ctx.result_store.exists(key):
            return None
        return key


@contextmanager
def new_folder(target: Path, files: tuple[str, ...]) -> Iterator[Path]:
    """A path to write `target` at, renamed to `target` when the block ends without an error, so
    that the folder appears whole or not at all (a flow killed midway leaves only a hidden scratch
    folder, which nothing reads). If another flow on the same cache completed `target` first, its
    folder is kept and this one discarded; an incomplete `target` is replaced."""
    remove_abandoned_scratch(target.parent, f".{glob.escape(target.name)}.partial-*")
    scratch = scratch_folder(target)
    try:
        yield scratch / target.name
        if target.exists() and not is_complete(target, files):
            try:
                target.rename(scratch / "replaced")  # deleted with the scratch folder, out of sight
            except FileNotFoundError:
                pass  # another flow moved it first
        try:
            (scratch / target.name).rename(target)
        except OSError:  # target is a non-empty folder again: another flow put its own in place
            if not is_complete(target, files):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
