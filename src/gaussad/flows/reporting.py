"""What the train flow leaves in its output folder and in Prefect: each category's model and
evaluation, metrics.json, plots/roc_<category>.csv, run.json (provenance) and a results table.

    <out>/<category>/{model, evaluation, timings.json}   copied from the task cache
    <out>/metrics.json                                    per category and mean (DVC metrics)
    <out>/plots/roc_<category>.csv                        (DVC plots)
    <out>/run.json                                        git commit, data hash, params, timings, task states

`collect` waits for each category's chain of tasks and publishes what it computed, or its failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import yaml

import gaussad.flows.runtime  # noqa: F401  (before prefect: it sets Prefect's environment defaults)

# isort: split
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1", "balanced_accuracy")
TABLE_KEYS = ("image_auroc", "pixel_auroc", "aupro")


def publish(evaluation: Path, target: Path) -> dict:
    """Copy a category's cached model and evaluation to the output folder; return its metrics."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(evaluation, target)
    return json.loads((target / "evaluation" / "metrics.json").read_text())


def dataset_name(dataset_root: str, params: dict) -> str:
    """The name the run's models are registered under (gaussad-<name>-<category>): the params'
    data.name when the run read the params' data.root, else the dataset folder's name."""
    data = params.get("data") or {}
    if data.get("name") and data.get("root") and Path(data["root"]).resolve() == Path(dataset_root).resolve():
        return str(data["name"])
    return Path(dataset_root).resolve().name


def write_summary(out_dir: Path, results: dict, failures: dict, work: dict, params: dict, dataset_root: str,
                  seconds: float) -> dict:
    """metrics.json (per category and mean), plots/roc_<category>.csv and run.json (provenance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_category = {name: {k: m.get(k) for k in METRIC_KEYS} for name, m in sorted(results.items())}
    mean = {k: _mean([m[k] for m in per_category.values()]) for k in METRIC_KEYS}
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
        "data": {"root": dataset_root, "name": dataset_name(dataset_root, params),
                 "dvc_md5": dvc_data_hash(dataset_root)},
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


def report(logger, summary: dict) -> None:
    """The results table (metrics and task cache use per category) as a Prefect artifact and in the log."""
    lines = ["| category | image AUROC | pixel AUROC | AUPRO | tasks |", "|---|---|---|---|---|"]
    for name, metrics in summary["metrics"].items():
        cells = [_pct(metrics[k]) for k in TABLE_KEYS]
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


def collect(futures: dict[str, dict[str, PrefectFuture]], out_dir: Path, failures: dict[str, str],
            logger) -> tuple[dict, dict]:
    """Wait for each category's chain: publish its evaluation to `out_dir` (its metrics -> results)
    or record its first failure; the state of each step (work)."""
    results, work = {}, {}
    for name, steps in futures.items():
        steps["evaluate"].wait()
        states = {step: future.state for step, future in steps.items()}
        work[name] = {step: "cached" if state.name == "Cached" else state.name.lower()
                      for step, state in states.items()}
        if states["evaluate"].is_completed():
            results[name] = publish(Path(steps["evaluate"].result()), out_dir / name)
        else:
            failed = next(s for s in steps.values() if s.state.is_failed() or s.state.is_crashed())
            failures[name] = _failure_message(failed)
            logger.error("category %s failed: %s", name, failures[name])
    return results, work


def _failure_message(future: PrefectFuture) -> str:
    try:
        future.result()
    except Exception as err:  # the task's own exception, re-raised by result()
        return f"{type(err).__name__}: {err}"
    return future.state.message or future.state.name
