"""Prefect flow: per category, extract features -> fit the Gaussians -> evaluate, as cached tasks
(or, with `model_type: piade` in the params, train PIADE -> evaluate).

    python -m gaussad.flows.train --params params.yaml --out outputs/pipeline [--data DIR] [--categories a b]

Every task's result is persisted under the cache folder (default `.gaussad-cache/`, or
$GAUSSAD_CACHE_DIR) and keyed by what determines it: the *content* of the images (and masks), the
settings the task uses, and the task's own source code. A rerun with nothing changed computes
nothing; a change of one category's images recomputes that category; a change of the reduction
recomputes fitting and evaluation, not extraction. A category that fails (e.g. a corrupt image)
fails alone: the others finish, their results are kept, and a rerun after the fix resumes from the
cache. The flow run fails at the end if any category did.

A task's result is the path of the folder it wrote in the cache (gaussad/flows/cache.py). The folder appears
whole or not at all, so a flow killed midway, or two flows sharing one cache, leave no half-written
folder; and a cached result is used only while its folder is complete, so a folder deleted from the
cache is computed again. What the flow writes to its output folder: gaussad/flows/reporting.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gaussad.flows.runtime import dask_runner, device_lock  # first: it sets Prefect's environment defaults

# isort: split
from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.futures import PrefectFuture

from gaussad.base_detector import Detector
from gaussad.data import Category, ImageSet, list_categories, load_category
from gaussad.detectors import ModelSpec, detector_class, load_model, model_spec
from gaussad.errors import DatasetError, GaussadError
from gaussad.evaluate import evaluate
from gaussad.features import FeatureStore
from gaussad.flows.cache import (
    CACHE_FOLDERS,
    DEFAULT_CACHE,
    EVALUATION_FILES,
    FEATURE_FILES,
    MODEL_FILES,
    WhileComplete,
    checkpoint_folder,
    evaluation_folder,
    features_folder,
    file_digest,
    model_folder,
    new_folder,
    results_folder,
    test_split_digest,
    training_folder,
)
from gaussad.flows.reporting import collect, report, write_summary
from gaussad.output_folders import claim_output_folder

# What fitting measured (fit_info key -> timings.json key), as far as a model measures it
FIT_TIMINGS = {"extract_seconds": "extract_train_seconds", "fit_seconds": "fit_seconds",
               "seconds_per_epoch": "seconds_per_epoch", "epochs_trained": "epochs_trained"}


# ---- tasks -------------------------------------------------------------------------------------
# batch_size is how a model runs, not what it computes: it is no part of the fit, train and evaluate keys.

@task(cache_policy=WhileComplete(policy=INPUTS - "paths" + TASK_SOURCE, folder=features_folder, files=FEATURE_FILES),
      persist_result=True, task_run_name="extract-{name}-{split}")
def extract_features(name: str, split: str, paths: list[str], digest: str, model_type: str, features: dict,
                     batch_size: int, cache_dir: str) -> str:
    """Features of one split's images -> a FeatureStore folder named by the content and the
    settings they depend on (`features`: the detector's feature_settings)."""
    directory = features_folder(cache_dir, digest, features)
    with device_lock(), new_folder(directory, FEATURE_FILES) as scratch:
        extractor = detector_class(model_type).feature_extractor(features)
        FeatureStore.write(extractor, [Path(p) for p in paths], scratch, batch_size, progress=False)
    return str(directory)


@task(cache_policy=WhileComplete(policy=INPUTS - "batch_size" + TASK_SOURCE, folder=model_folder, files=MODEL_FILES),
      persist_result=True, task_run_name="fit-{name}")
def fit_model(name: str, train_store: str, model_type: str, settings: dict, holdout: float, batch_size: int,
              cache_dir: str) -> str:
    """A detector fitted from the training features (the Gaussian one: per-level Gaussians and normal
    thresholds) -> a model folder."""
    with device_lock():
        model = detector_class(model_type).from_settings(settings, False, batch_size=batch_size, progress=False)
        model.fit_store(FeatureStore(train_store), holdout)
    return save_model(model, model_folder(cache_dir, train_store, settings, holdout))


@task(cache_policy=WhileComplete(policy=INPUTS - "paths" - "batch_size" + TASK_SOURCE, folder=training_folder,
                                 files=MODEL_FILES),
      persist_result=True, task_run_name="train-{name}")
def train_model(name: str, paths: list[str], digest: str, model_type: str, settings: dict, holdout: float,
                batch_size: int, cache_dir: str) -> str:
    """A detector (PIADE) trained on the training images -> a model folder. Checkpoints are kept in
    the cache, so an interrupted run resumes from its last epoch when the flow runs again."""
    with device_lock():
        model = detector_class(model_type).from_settings(settings, False, batch_size=batch_size, progress=False)
        model.fit(paths, holdout, checkpoint_dir=checkpoint_folder(cache_dir, digest, model_type, settings, holdout))
    return save_model(model, training_folder(cache_dir, digest, model_type, settings, holdout))


def save_model(model: Detector, model_dir: Path) -> str:
    with new_folder(model_dir, MODEL_FILES) as scratch:
        model.save(scratch)
    return str(model_dir)


@task(cache_policy=WhileComplete(policy=INPUTS - "dataset_root" - "batch_size" + TASK_SOURCE,
                                 folder=evaluation_folder, files=EVALUATION_FILES),
      persist_result=True, task_run_name="evaluate-{name}")
def evaluate_model(name: str, dataset_root: str, model_dir: str, test_store: str | None, digest: str,
                   batch_size: int, cache_dir: str) -> str:
    """Metrics, thresholds and pictures on the test split, scored from its features where there are
    some (`test_store`), else from its images -> an evaluation folder, with the model and timings.json."""
    out = evaluation_folder(cache_dir, model_dir, digest)
    model = load_model(model_dir, progress=False, batch_size=batch_size)
    category = load_category(dataset_root, name, validate=False)
    store = FeatureStore(test_store) if test_store else None
    with new_folder(out, EVALUATION_FILES) as scratch:
        with device_lock():
            start = time.perf_counter()
            scores = model.score_store(store) if store else model.score(category.test)
            seconds = time.perf_counter() - start
            evaluate(model, category, scratch / "evaluation", scores=scores, score_seconds=seconds)  # may reconstruct
        model.save(scratch / "model")  # with the thresholds calibrated on the labelled test split
        (scratch / "timings.json").write_text(json.dumps(timings(model, store, seconds, len(category.test)), indent=2))
    return str(out)


def timings(model: Detector, test_store: FeatureStore | None, score_seconds: float, n_test_images: int) -> dict:
    """timings.json: what fitting measured, the test features' extraction (if any), scoring, image counts."""
    fitted = {to: model.fit_info[key] for key, to in FIT_TIMINGS.items() if key in model.fit_info}
    extracted = {"extract_test_seconds": test_store.seconds} if test_store else {}
    return {**fitted, **extracted, "score_seconds": round(score_seconds, 3),
            "n_train_images": model.fit_info["n_train_images"] + model.fit_info["n_holdout_images"],
            "n_test_images": n_test_images}


# ---- one category's chain of tasks -------------------------------------------------------------

@dataclass
class Job:
    """One category to train and evaluate with `spec`, its task results in the cache `cache`."""

    name: str
    category: Category
    dataset_root: str
    spec: ModelSpec
    cache: str
    train_digest: str = field(init=False)  # the content of the training images
    test_digest: str = field(init=False)  # the content of the test split

    def __post_init__(self):
        self.train_digest, self.test_digest = file_digest(self.category.train.paths), test_split_digest(self.category)

    def submit(self, task_to_run, *arguments) -> PrefectFuture:
        """The task submitted, its result record in the cache."""
        return task_to_run.with_options(result_storage=results_folder(self.cache)).submit(*arguments)


def file_names(images: ImageSet) -> list[str]:
    return [str(p) for p in images.paths]


def submit_feature_chain(job: Job) -> dict[str, PrefectFuture]:
    """A detector that fits from features (the Gaussian one): extract the train and test features ->
    fit on the train features -> evaluate on the test ones."""
    spec, model_type = job.spec, job.spec.detector.MODEL_TYPE
    features = spec.detector.feature_settings(spec.settings)
    steps = {split: job.submit(extract_features, job.name, split, file_names(images), digest, model_type, features,
                               spec.batch_size, job.cache)
             for split, images, digest in (("train", job.category.train, job.train_digest),
                                           ("test", job.category.test, job.test_digest))}
    steps["fit"] = job.submit(fit_model, job.name, steps["train"], model_type, spec.settings, spec.holdout,
                              spec.batch_size, job.cache)
    steps["evaluate"] = job.submit(evaluate_model, job.name, job.dataset_root, steps["fit"], steps["test"],
                                   job.test_digest, spec.batch_size, job.cache)
    return steps


def submit_training_chain(job: Job) -> dict[str, PrefectFuture]:
    """A detector that trains on the images (PIADE): train -> evaluate on the test images."""
    spec = job.spec
    steps = {"fit": job.submit(train_model, job.name, file_names(job.category.train), job.train_digest,
                               spec.detector.MODEL_TYPE, spec.settings, spec.holdout, spec.batch_size, job.cache)}
    steps["evaluate"] = job.submit(evaluate_model, job.name, job.dataset_root, steps["fit"], None, job.test_digest,
                                   spec.batch_size, job.cache)
    return steps




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
    spec = model_spec(params, config)  # an unknown model type or setting: ValueError, before any compute
    submit_chain = submit_feature_chain if spec.detector.FITS_FROM_FEATURES else submit_training_chain
    cache = str(Path(cache_dir or DEFAULT_CACHE).resolve())
    names = categories or params.get("data", {}).get("categories") or list_categories(dataset_root)
    # Both are refused before any compute if they hold files gaussad did not write.
    claim_output_folder(out_dir, "pipeline-run")
    claim_output_folder(cache, "cache", adopt=lambda entries: set(entries) <= CACHE_FOLDERS)

    started = time.perf_counter()
    futures: dict[str, dict[str, PrefectFuture]] = {}
    failures: dict[str, str] = {}
    for name in names:
        try:
            category = load_category(dataset_root, name)  # checks every file: a truncated PNG fails here
        except DatasetError as err:
            failures[name] = str(err)
            logger.error("category %s failed: %s", name, err)
            continue
        futures[name] = submit_chain(Job(name, category, dataset_root, spec, cache))
    results, work = collect(futures, Path(out_dir), failures, logger)

    summary = write_summary(Path(out_dir), results, failures, work, params, dataset_root,
                            time.perf_counter() - started)
    report(logger, summary)
    if track:
        from gaussad.tracking import log_run_folder  # MLflow is imported only when tracking

        export_onnx = bool((params.get("registry") or {}).get("export_onnx", False))
        logged = log_run_folder(out_dir, experiment, export_onnx=export_onnx)  # TrackingError: results stay on disk
        summary.update(mlflow_run_id=logged.run_id, registered=logged.versions, new_versions=logged.new_versions)
        logger.info("logged to MLflow: experiment %r, run %s; registered %s (new: %s)", experiment, logged.run_id,
                    ", ".join(logged.versions.values()) or "nothing", ", ".join(logged.new_versions) or "none")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(names)} categories failed: "
                           + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
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
    try:
        model_spec(params, args.params)  # every setting checked before a flow (or its server) starts
    except ValueError as err:
        print(f"gaussad-train: {err}", file=sys.stderr)
        return 1
    flow_to_run = train
    if args.dask_workers or args.dask_address:
        flow_to_run = train.with_options(task_runner=dask_runner(args.dask_workers, args.dask_address))
    try:
        flow_to_run(args.data or params["data"]["root"], args.categories, args.params, args.out, args.cache_dir,
                    args.track, args.experiment)
    except (GaussadError, ValueError, RuntimeError, ConnectionError) as err:  # bad input; failed categories; no server
        print(f"gaussad-train: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
