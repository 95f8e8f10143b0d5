"""Prefect flow: per category, extract features -> fit the Gaussians -> evaluate, as cached tasks
(or, with `model_type: piade` in the params, train PIADE -> evaluate).

    python flows/train.py --params params.yaml --out outputs/pipeline [--data DIR] [--categories a b]

Every task's result is persisted under the cache folder (default `.gaussad-cache/`, or
$GAUSSAD_CACHE_DIR) and keyed by what determines it: the *content* of the images (and masks), the
settings the task uses, and the task's own source code. A rerun with nothing changed computes
nothing; a change of one category's images recomputes that category; a change of the reduction
recomputes fitting and evaluation, not extraction. A category that fails (e.g. a corrupt image)
fails alone: the others finish, their results are kept, and a rerun after the fix resumes from the
cache. The flow run fails at the end if any category did.

A task's result is the path of the folder it wrote in the cache. The folder appears whole or not at
all (it is written beside its place and renamed), so a flow killed midway, or two flows sharing one
cache, leave no half-written folder; and a cached result is used only while its folder is complete,
so a folder deleted from the cache is computed again.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml

# Prefect's ephemeral server needs 20-26 s to start on a fresh PREFECT_HOME here, past its 20 s
# default; and its analytics would call out to the internet. Users' own settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.futures import PrefectFuture  # noqa: E402

from gaussad.data import Category, list_categories, load_category  # noqa: E402
from gaussad.errors import DatasetError, GaussadError  # noqa: E402
from gaussad.evaluate import evaluate  # noqa: E402
from gaussad.features import Backbone, FeatureStore  # noqa: E402
from gaussad.model import GaussianAD  # noqa: E402
from gaussad.model_folder import remove_abandoned_scratch, scratch_folder  # noqa: E402
from gaussad.output_folders import claim_output_folder  # noqa: E402
from gaussad.piade import PiadeAD  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("GAUSSAD_CACHE_DIR", ".gaussad-cache"))
BACKBONE_KEYS = ("backbone", "weights", "levels", "image_size", "seed")
MODEL_KEYS = BACKBONE_KEYS + ("reduction", "variance", "spatial", "normal_quantile")
MODEL_TYPES = ("gaussian", "piade")
CACHE_FOLDERS = {"features", "models", "evaluations", "checkpoints", "results"}
# One extraction or scoring at a time per process: two categories must not fight over one GPU
# (or oversubscribe the CPU cores). Prefect's thread pool runs the categories' tasks concurrently.
_DEVICE_LOCK = threading.BoundedSemaphore(1)


def device_lock() -> threading.BoundedSemaphore:
    """This process's device lock. Tasks call this rather than name the lock: a task shipped to a
    Dask worker is pickled with the globals it names, and a lock cannot be pickled."""
    return _DEVICE_LOCK


# ---- content keys ------------------------------------------------------------------------------

def file_digest(paths) -> str:
    """SHA-256 over the bytes of the files, in order; paths and modification times do not count."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            digest.update(b"<no file>")
            continue
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
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


# ---- cache folders -----------------------------------------------------------------------------
# Each task writes one folder under the cache, at a path that is a function of its inputs, and
# returns that path: its Prefect result record holds only the path string.

FEATURE_FILES = ("meta.json",)  # the files that make a folder complete (each written last)
MODEL_FILES = ("config.json",)
EVALUATION_FILES = ("timings.json", "evaluation/metrics.json")


def features_folder(cache_dir: str, digest: str, backbone: dict, **_) -> Path:
    return Path(cache_dir) / "features" / f"{digest[:24]}-{settings_digest(backbone)}"


def model_folder(cache_dir: str, train_store: str, settings: dict, holdout: float, **_) -> Path:
    return Path(cache_dir) / "models" / f"{Path(train_store).name}-{settings_digest({**settings, 'holdout': holdout})}"


def evaluation_folder(cache_dir: str, model_dir: str, digest: str, **_) -> Path:
    return Path(cache_dir) / "evaluations" / f"{Path(model_dir).name}-{digest[:16]}"


def piade_key(digest: str, settings: dict) -> str:
    return f"{digest[:24]}-{settings_digest(settings)}"


def piade_folder(cache_dir: str, digest: str, settings: dict, **_) -> Path:
    return Path(cache_dir) / "models" / f"piade-{piade_key(digest, settings)}"


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


# ---- tasks -------------------------------------------------------------------------------------

@task(cache_policy=WhileComplete(policy=INPUTS - "paths" + TASK_SOURCE, folder=features_folder, files=FEATURE_FILES),
      persist_result=True, task_run_name="extract-{name}-{split}")
def extract_features(name: str, split: str, paths: list[str], digest: str, backbone: dict,
                     batch_size: int, cache_dir: str) -> str:
    """Features of one split's images -> a FeatureStore folder named by the content and settings."""
    directory = features_folder(cache_dir, digest, backbone)
    with device_lock(), new_folder(directory, FEATURE_FILES) as scratch:
        extractor = Backbone(backbone["backbone"], backbone["weights"], backbone["levels"], backbone["image_size"],
                             seed=backbone["seed"])
        FeatureStore.write(extractor, [Path(p) for p in paths], scratch, batch_size, progress=False)
    return str(directory)


@task(cache_policy=WhileComplete(policy=INPUTS + TASK_SOURCE, folder=model_folder, files=MODEL_FILES),
      persist_result=True, task_run_name="fit-{name}")
def fit_model(name: str, train_store: str, settings: dict, holdout: float, cache_dir: str) -> str:
    """Per-level Gaussians and normal thresholds from the training features -> a model folder."""
    model_dir = model_folder(cache_dir, train_store, settings, holdout)
    with device_lock():
        model = GaussianAD(**settings, progress=False).fit_store(FeatureStore(train_store), holdout)
    with new_folder(model_dir, MODEL_FILES) as scratch:
        model.save(scratch)
    return str(model_dir)


@task(cache_policy=WhileComplete(policy=INPUTS - "dataset_root" + TASK_SOURCE, folder=evaluation_folder,
                                 files=EVALUATION_FILES),
      persist_result=True, task_run_name="evaluate-{name}")
def evaluate_model(name: str, dataset_root: str, model_dir: str, test_store: str, digest: str,
                   cache_dir: str) -> str:
    """Metrics, thresholds and pictures on the test split -> an evaluation folder (with the model)."""
    out = evaluation_folder(cache_dir, model_dir, digest)
    model = GaussianAD.load(model_dir, progress=False)
    category = load_category(dataset_root, name, validate=False)
    with device_lock():
        start = time.perf_counter()
        scores = model.score_store(FeatureStore(test_store))
        seconds = time.perf_counter() - start
    with new_folder(out, EVALUATION_FILES) as scratch:
        evaluate(model, category, scratch / "evaluation", scores=scores, score_seconds=seconds)
        model.save(scratch / "model")  # with the thresholds calibrated on the labelled test split
        timings = {
            "extract_train_seconds": model.fit_info.get("extract_seconds"),
            "fit_seconds": model.fit_info.get("fit_seconds"),
            "extract_test_seconds": FeatureStore(test_store).seconds,
            "score_seconds": round(seconds, 3),
            "n_train_images": model.fit_info["n_train_images"] + model.fit_info["n_holdout_images"],
            "n_test_images": len(category.test),
        }
        (scratch / "timings.json").write_text(json.dumps(timings, indent=2))
    return str(out)


@task(cache_policy=WhileComplete(policy=INPUTS - "paths" + TASK_SOURCE, folder=piade_folder, files=MODEL_FILES),
      persist_result=True, task_run_name="train-{name}")
def train_piade(name: str, paths: list[str], digest: str, settings: dict, cache_dir: str) -> str:
    """PIADE trained on the training images -> a model folder. Checkpoints are kept in the cache, so
    an interrupted run resumes from its last epoch when the flow runs again."""
    options = {k: v for k, v in settings.items() if k not in ("preset", "holdout")}
    with device_lock():
        model = PiadeAD.from_preset(settings["preset"], **options, progress=False)
        model.fit(paths, settings["holdout"],
                  checkpoint_dir=Path(cache_dir) / "checkpoints" / piade_key(digest, settings))
    model_dir = piade_folder(cache_dir, digest, settings)
    with new_folder(model_dir, MODEL_FILES) as scratch:
        model.save(scratch)
    return str(model_dir)


@task(cache_policy=WhileComplete(policy=INPUTS - "dataset_root" + TASK_SOURCE, folder=evaluation_folder,
                                 files=EVALUATION_FILES),
      persist_result=True, task_run_name="evaluate-{name}")
def evaluate_piade(name: str, dataset_root: str, model_dir: str, digest: str, cache_dir: str) -> str:
    """Metrics, thresholds, reconstructions and heat maps on the test split -> an evaluation folder."""
    out = evaluation_folder(cache_dir, model_dir, digest)
    model = PiadeAD.load(model_dir, progress=False)
    category = load_category(dataset_root, name, validate=False)
    with new_folder(out, EVALUATION_FILES) as scratch:
        with device_lock():
            start = time.perf_counter()
            scores = model.score(category.test)
            seconds = time.perf_counter() - start
            evaluate(model, category, scratch / "evaluation", scores=scores, score_seconds=seconds)  # reconstructs too
        model.save(scratch / "model")
        timings = {
            "fit_seconds": model.fit_info["fit_seconds"],
            "seconds_per_epoch": model.fit_info["seconds_per_epoch"],
            "epochs_trained": model.fit_info["epochs_trained"],
            "score_seconds": round(seconds, 3),
            "n_train_images": model.fit_info["n_train_images"] + model.fit_info["n_holdout_images"],
            "n_test_images": len(category.test),
        }
        (scratch / "timings.json").write_text(json.dumps(timings, indent=2))
    return str(out)


# ---- the flow ----------------------------------------------------------------------------------

@flow(name="gaussad-train", log_prints=True)
def train(dataset_root: str, categories: list[str] | None = None, config: str = "params.yaml",
          out_dir: str = "outputs/pipeline", cache_dir: str | None = None, track: bool = False,
          experiment: str = "gaussad") -> dict:
    """Train and evaluate every category (or `categories`) of a dataset in MVTec AD layout; with
    `track`, log the run to MLflow (MLFLOW_TRACKING_URI, else the local store in mlflow/) and
    register each category's model as the `challenger` of `gaussad-<dataset>-<category>`."""
    logger = get_run_logger()
    params = yaml.safe_load(Path(config).read_text())
    model_type = params.get("model_type", "gaussian")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config}: model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    settings = {k: params["model"][k] for k in MODEL_KEYS}
    backbone = {k: settings[k] for k in BACKBONE_KEYS}
    cache = str(Path(cache_dir or DEFAULT_CACHE).resolve())
    names = categories or params.get("data", {}).get("categories") or list_categories(dataset_root)
    # Both are refused before any compute if they hold files gaussad did not write.
    claim_output_folder(out_dir, "pipeline-run")
    claim_output_folder(cache, "cache", adopt=lambda entries: set(entries) <= CACHE_FOLDERS)

    started = time.perf_counter()
    futures: dict[str, dict[str, PrefectFuture]] = {}
    failures: dict[str, str] = {}
    storage = {"result_storage": Path(cache) / "results"}  # cache records live beside what they point to
    extract, fit, assess = (t.with_options(**storage) for t in (extract_features, fit_model, evaluate_model))
    train_reconstruction, assess_reconstruction = (t.with_options(**storage) for t in (train_piade, evaluate_piade))
    for name in names:
        try:
            category = load_category(dataset_root, name)  # decodes every file: a corrupt one fails here
        except DatasetError as err:
            failures[name] = str(err)
            logger.error("category %s failed: %s", name, err)
            continue
        train_digest, test_digest = file_digest(category.train.paths), test_split_digest(category)
        steps = futures[name] = {}
        if model_type == "piade":
            train_paths = [str(p) for p in category.train.paths]
            steps["fit"] = train_reconstruction.submit(name, train_paths, train_digest, params["piade"], cache)
            steps["evaluate"] = assess_reconstruction.submit(name, dataset_root, steps["fit"], test_digest, cache)
            continue
        for split, images, digest in (("train", category.train, train_digest), ("test", category.test, test_digest)):
            steps[split] = extract.submit(
                name, split, [str(p) for p in images.paths], digest, backbone, params["model"]["batch_size"], cache
            )
        steps["fit"] = fit.submit(name, steps["train"], settings, params["model"]["holdout"], cache)
        steps["evaluate"] = assess.submit(name, dataset_root, steps["fit"], steps["test"], test_digest, cache)

    results, work = {}, {}
    for name, steps in futures.items():
        steps["evaluate"].wait()
        states = {step: future.state for step, future in steps.items()}
        work[name] = {step: "cached" if state.name == "Cached" else state.name.lower() for step, state in states.items()}
        if states["evaluate"].is_completed():
            results[name] = publish(Path(steps["evaluate"].result()), Path(out_dir) / name)
        else:
            failed = next(s for s in steps.values() if s.state.is_failed() or s.state.is_crashed())
            failures[name] = _failure_message(failed)
            logger.error("category %s failed: %s", name, failures[name])

    summary = write_summary(Path(out_dir), results, failures, work, params, dataset_root,
                            time.perf_counter() - started)
    _report(logger, summary)
    if track:
        from gaussad.tracking import log_run_folder  # MLflow is imported only when tracking

        logged = log_run_folder(out_dir, experiment)  # TrackingError: results stay on disk
        summary.update(mlflow_run_id=logged.run_id, registered=logged.versions)
        logger.info("logged to MLflow: experiment %r, run %s; registered %s (new: %s)", experiment, logged.run_id,
                    ", ".join(logged.versions.values()) or "nothing", ", ".join(logged.new_versions) or "none")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(names)} categories failed: "
                           + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return summary


def _failure_message(future: PrefectFuture) -> str:
    try:
        future.result()
    except Exception as err:  # the task's own exception, re-raised by result()
        return f"{type(err).__name__}: {err}"
    return future.state.message or future.state.name


def publish(evaluation: Path, target: Path) -> dict:
    """Copy a category's cached model and evaluation to the output folder; return its metrics."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(evaluation, target)
    return json.loads((target / "evaluation" / "metrics.json").read_text())


def write_summary(out_dir: Path, results: dict, failures: dict, work: dict, params: dict, dataset_root: str,
                  seconds: float) -> dict:
    """metrics.json (per category and mean), plots/roc_<category>.csv and run.json (provenance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ("image_auroc", "pixel_auroc", "aupro", "f1", "balanced_accuracy")
    per_category = {name: {k: m.get(k) for k in keys} for name, m in sorted(results.items())}
    mean = {k: _mean([m[k] for m in per_category.values()]) for k in keys}
    (out_dir / "metrics.json").write_text(json.dumps({"categories": per_category, "mean": mean}, indent=2))
    plots = out_dir / "plots"
    shutil.rmtree(plots, ignore_errors=True)
    plots.mkdir()
    for name in results:
        roc = out_dir / name / "evaluation" / "roc.csv"
        if roc.is_file():
            shutil.copy(roc, plots / f"roc_{name}.csv")
    run = {
        "git_commit": git_commit(),
        "timings": {name: json.loads((out_dir / name / "timings.json").read_text()) for name in sorted(results)},
        "data": {"root": dataset_root, "dvc_md5": dvc_data_hash(dataset_root)},
        "params": params,
        "tasks": work,
        "failures": failures,
        "seconds": round(seconds, 2),
    }
    (out_dir / "run.json").write_text(json.dumps(run, indent=2))
    return {"metrics": per_category, "mean": mean, **run}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def git_commit() -> str | None:
    """The commit of the code that ran, with '-dirty' when the work tree has changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def dvc_data_hash(dataset_root: str) -> str | None:
    """The md5 DVC recorded for the dataset folder: in <root>.dvc, or as an output in dvc.lock."""
    root = Path(dataset_root).resolve()
    for parent in [root, *root.parents]:
        pointer = parent.with_suffix(".dvc") if parent.name else None
        if pointer and pointer.is_file():
            outs = yaml.safe_load(pointer.read_text()).get("outs", [])
            if outs:
                return outs[0].get("md5")
        lock = parent / "dvc.lock"
        if lock.is_file():
            for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
                for out in stage.get("outs", []):
                    if (parent / out["path"]).resolve() == root:
                        return out.get("md5")
    return None


def _report(logger, summary: dict) -> None:
    lines = ["| category | image AUROC | pixel AUROC | AUPRO | tasks |", "|---|---|---|---|---|"]
    for name, metrics in summary["metrics"].items():
        cells = [_pct(metrics[k]) for k in ("image_auroc", "pixel_auroc", "aupro")]
        work = ", ".join(f"{step} {state}" for step, state in summary["tasks"][name].items())
        lines.append(f"| {name} | {' | '.join(cells)} | {work} |")
    for name, message in summary["failures"].items():
        lines.append(f"| {name} | failed: {message} | | | |")
    table = "\n".join(lines)
    create_markdown_artifact(table, key="gaussad-train-results", description="metrics and task cache use")
    all_cached = all(v == "cached" for w in summary["tasks"].values() for v in w.values())
    logger.info("results:\n%s", table)
    if summary["tasks"] and all_cached:
        logger.info("nothing recomputed: every task's result came from the cache")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def dask_runner(workers: int | None = None, address: str | None = None):
    """Prefect's Dask task runner: a local cluster of `workers` processes (one thread each, so a
    worker's torch threads have its core), or the cluster at `address`."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", help="dataset root (default: data.root in the params file)")
    parser.add_argument("--categories", nargs="+")
    parser.add_argument("--out", default="outputs/pipeline")
    parser.add_argument("--cache-dir", help=f"task cache (default {DEFAULT_CACHE}/)")
    parser.add_argument("--track", action="store_true", help="log the run to MLflow (MLFLOW_TRACKING_URI or mlflow/)")
    parser.add_argument("--experiment", default="gaussad", help="MLflow experiment (default gaussad)")
    dask = parser.add_mutually_exclusive_group()
    dask.add_argument("--dask-workers", type=int, help="run the tasks on a local Dask cluster of N worker processes")
    dask.add_argument("--dask-address", help="run the tasks on an existing Dask cluster (tcp://host:8786)")
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    flow_to_run = train
    if args.dask_workers or args.dask_address:
        flow_to_run = train.with_options(task_runner=dask_runner(args.dask_workers, args.dask_address))
    try:
        flow_to_run(args.data or params["data"]["root"], args.categories, args.params, args.out, args.cache_dir,
                    args.track, args.experiment)
    except (GaussadError, RuntimeError, ConnectionError) as err:  # bad input; failed categories; no server
        print(f"gaussad-train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
