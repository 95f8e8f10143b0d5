"""The task cache of gaussad/flows/train.py under real faults, no mocks: a flow process killed with SIGKILL
midway, cache folders deleted by hand, two flow processes writing one cache at once. All flows use one
Prefect test server per module; a flow that is not killed or raced runs in this process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

import gaussad.flows.cache as task_cache  # a module: pytest would collect its test_split_digest as a test
import gaussad.flows.train as pipeline
from gaussad.data import load_category
from gaussad.detectors import model_spec

ROOT = Path(__file__).parents[1]
CATEGORIES = ["brushed", "weave"]  # the demo_root fixture's
STEPS = ("train", "test", "fit", "evaluate")
COMPLETE_WHEN = {"features": task_cache.FEATURE_FILES, "models": task_cache.MODEL_FILES,
                 "evaluations": task_cache.EVALUATION_FILES}


@pytest.fixture(scope="module", autouse=True)
def prefect_api(tmp_path_factory) -> dict:
    """One Prefect test server for the module (a flow process with no server would start its own
    ephemeral one: 11-26 s each); yields the environment of a flow process that uses it."""
    with prefect_test_harness(server_startup_timeout=120):
        yield {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect"))}


@pytest.fixture
def project(tmp_path, demo_root) -> dict:
    """The demo dataset, a params file for a fast model (as tests/test_flow.py) and a task cache."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(levels=[3, 4], image_size=64, batch_size=8)
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(params))
    return {"data": demo_root, "config": config, "params": params, "cache": tmp_path / "cache", "tmp": tmp_path}


def start_flow(project, env, out: str, categories: list[str]) -> subprocess.Popen:
    """gaussad/flows/train.py in a new process (group): one that can be killed. Its output goes to <tmp>/<out>.log."""
    with open(project["tmp"] / f"{out}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gaussad.flows.train", "--params", str(project["config"]), "--data",
             str(project["data"]), "--out", str(project["tmp"] / out), "--cache-dir", str(project["cache"]),
             "--categories", *categories],
            env=env, cwd=project["tmp"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(project, flow: subprocess.Popen, out: str) -> dict:
    """Wait for a flow process and assert that it succeeded; the metrics it wrote."""
    returncode = flow.wait(timeout=300)
    assert returncode == 0, (project["tmp"] / f"{out}.log").read_text()[-5000:]
    return json.loads((project["tmp"] / out / "metrics.json").read_text())


def run_here(project, categories: list[str]) -> dict:
    """The flow in this process (quicker to start); its summary (metrics, tasks)."""
    return pipeline.train(str(project["data"]), categories, str(project["config"]), str(project["tmp"] / "out"),
                          str(project["cache"]))


def finished_tasks(log: Path) -> dict[str, str]:
    """Task run name -> final state, from a flow's log (logged after the task's result record is written)."""
    return dict(re.findall(r"Task run '([^']+)' - Finished in state (\w+)", log.read_text()))


def cache_folders(cache: Path) -> dict[str, list[Path]]:
    """The folders a later run may trust (features/<key>, ...) and the hidden scratch folders."""
    found = {"trusted": [], "scratch": []}
    for kind in COMPLETE_WHEN:
        for folder in sorted((cache / kind).glob("*")) if (cache / kind).is_dir() else []:
            found["scratch" if folder.name.startswith(".") else "trusted"].append(folder)
    return found


def assert_every_folder_complete(cache: Path) -> None:
    for folder in cache_folders(cache)["trusted"]:
        missing = [f for f in COMPLETE_WHEN[folder.parent.name] if not (folder / f).is_file()]
        assert not missing, f"{folder} lacks {missing}"


def category_folders(project, name: str) -> dict[str, Path]:
    """Where the flow caches one category's features, model and evaluation."""
    category = load_category(project["data"], name)
    spec = model_spec(project["params"])
    backbone = spec.detector.feature_settings(spec.settings)
    cache = str(project["cache"].resolve())
    train = task_cache.features_folder(cache, task_cache.file_digest(category.train.paths), backbone)
    model = task_cache.model_folder(cache, str(train), spec.settings, spec.holdout)
    test_digest = task_cache.test_split_digest(category)
    return {"train": train, "test": task_cache.features_folder(cache, test_digest, backbone), "model": model,
            "evaluation": task_cache.evaluation_folder(cache, str(model), test_digest)}


def test_flow_killed_midway_resumes_from_what_had_finished(project, prefect_api):
    flow = start_flow(project, prefect_api, "killed", ["weave"])
    log = project["tmp"] / "killed.log"
    deadline = time.monotonic() + 240
    while not any(task.startswith("extract-") for task in finished_tasks(log)):  # one split's features done
        assert flow.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.2)
    os.killpg(flow.pid, signal.SIGKILL)
    flow.wait(timeout=30)
    done = finished_tasks(log)
    assert "Completed" in done.values() and len(done) < len(STEPS), done  # killed within the category
    assert_every_folder_complete(project["cache"])  # what was being written is only in hidden scratch folders

    tasks = run_here(project, ["weave"])["tasks"]["weave"]
    names = {"train": "extract-weave-train", "test": "extract-weave-test", "fit": "fit-weave",
             "evaluate": "evaluate-weave"}
    assert tasks == {step: "cached" if names[step] in done else "completed" for step in STEPS}, done
    assert_every_folder_complete(project["cache"])
    assert cache_folders(project["cache"])["scratch"] == []  # the killed process's were cleared on the rerun


def test_deleted_cache_folders_are_recomputed_with_the_same_metrics(project, prefect_api):
    before = run_here(project, ["weave"])["metrics"]
    folders = category_folders(project, "weave")

    shutil.rmtree(folders["train"])
    summary = run_here(project, ["weave"])
    # the model and evaluation made from those features stay valid: their folders are named by the
    # features' content, which the extraction reproduces
    assert summary["tasks"]["weave"] == {"train": "completed", "test": "cached", "fit": "cached", "evaluate": "cached"}
    assert summary["metrics"] == before and (folders["train"] / "meta.json").is_file()

    shutil.rmtree(folders["model"])
    (folders["evaluation"] / "timings.json").unlink()  # an incomplete folder is replaced, not trusted
    summary = run_here(project, ["weave"])
    assert summary["tasks"]["weave"] == {"train": "cached", "test": "cached", "fit": "completed",
                                         "evaluate": "completed"}
    assert summary["metrics"] == before
    assert_every_folder_complete(project["cache"])
    assert cache_folders(project["cache"])["scratch"] == []


@pytest.mark.slow
def test_two_flows_on_one_cache_at_once(project, prefect_api):
    flows = {out: start_flow(project, prefect_api, out, CATEGORIES) for out in ("out-a", "out-b")}
    results = [finish(project, flow, out) for out, flow in flows.items()]
    assert results[0] == results[1] and set(results[0]["categories"]) == set(CATEGORIES)
    assert_every_folder_complete(project["cache"])
    assert cache_folders(project["cache"])["scratch"] == []
    assert len(cache_folders(project["cache"])["trusted"]) == 4 * len(CATEGORIES)


def test_out_or_cache_holding_a_users_files_is_refused_before_any_compute(project):
    """--out and --cache-dir are refused, untouched, when they hold files gaussad did not write."""
    from gaussad.errors import OutputError

    work = project["tmp"] / "work"
    (work / "notes").mkdir(parents=True)
    (work / "thesis.txt").write_text("years of work")
    for out, cache in ((work, project["cache"]), (project["tmp"] / "out", work)):
        with pytest.raises(OutputError, match="gaussad did not write"):
            pipeline.train(str(project["data"]), ["weave"], str(project["config"]), str(out), str(cache))
        assert sorted(p.name for p in work.rglob("*")) == ["notes", "thesis.txt"]
    assert not (project["cache"] / "features").exists()  # nothing was extracted
