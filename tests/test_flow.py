"""The real Prefect flow (test harness server, no mocks) on generated data: caching and failure isolation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from gaussad.demo import write_demo_dataset  # noqa: E402
from gaussad.flows.train import train  # noqa: E402

CATEGORIES = ["weave", "hexnut"]
STEPS = ("train", "test", "fit", "evaluate")


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path) -> dict:
    """A small dataset, a params file for a fast model, an output folder and a task cache."""
    data = tmp_path / "data"
    write_demo_dataset(data, seed=3, categories=CATEGORIES, n_train=8, n_test_good=3, n_test_per_defect=2,
                       image_size=64)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["model"].update(levels=[3, 4], image_size=64, batch_size=8)
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(params))
    return {"data": data, "config": config, "out": tmp_path / "out", "cache": tmp_path / "cache", "params": params}


def run(project, **overrides) -> dict:
    return train(str(project["data"]), None, str(project["config"]), str(project["out"]), str(project["cache"]),
                 **overrides)


def work(project) -> dict:
    return json.loads((project["out"] / "run.json").read_text())["tasks"]


def set_params(project, **model) -> None:
    project["params"]["model"].update(model)
    project["config"].write_text(yaml.safe_dump(project["params"]))


def test_second_run_recomputes_nothing_and_results_match(project):
    first = run(project)
    assert all(state == "completed" for steps in work(project).values() for state in steps.values())
    assert set(first["metrics"]) == set(CATEGORIES)
    for name in CATEGORIES:
        assert (project["out"] / name / "model" / "stats.safetensors").is_file()
        assert (project["out"] / "plots" / f"roc_{name}.csv").is_file()
    second = run(project)
    assert work(project) == {name: dict.fromkeys(STEPS, "cached") for name in CATEGORIES}
    assert second["metrics"] == first["metrics"]
    run_record = json.loads((project["out"] / "run.json").read_text())
    assert run_record["git_commit"] and run_record["data"]["root"] == str(project["data"])


@pytest.mark.slow  # ~20 s: keeps the default run near 10 minutes
def test_changed_images_recompute_only_their_category(project):
    run(project)
    image = project["data"] / "weave" / "train" / "good" / "002.png"
    with Image.open(image) as original:
        original.rotate(90).save(image)  # same path, new content
    run(project)
    assert work(project) == {
        "weave": {"train": "completed", "test": "cached", "fit": "completed", "evaluate": "completed"},
        "hexnut": dict.fromkeys(STEPS, "cached"),
    }


def test_moved_dataset_with_same_content_stays_cached(project, tmp_path):
    run(project)
    moved = tmp_path / "moved"
    shutil.move(project["data"], moved)
    project["data"] = moved
    run(project)
    assert all(state == "cached" for steps in work(project).values() for state in steps.values())


@pytest.mark.slow  # ~20 s: keeps the default run near 10 minutes
def test_npca_fraction_change_refits_without_extracting(project):
    run(project)
    set_params(project, variance=0.2)
    run(project)
    for name in CATEGORIES:
        assert work(project)[name] == {"train": "cached", "test": "cached", "fit": "completed", "evaluate": "completed"}


def test_corrupt_image_fails_one_category_and_resume_after_fix(project):
    bad = project["data"] / "hexnut" / "test" / "good" / "001.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])
    with pytest.raises(RuntimeError, match=rf"1 of 2 categories failed: hexnut: .*{bad}"):
        run(project)
    record = json.loads((project["out"] / "run.json").read_text())
    assert list(record["failures"]) == ["hexnut"]
    assert (project["out"] / "weave" / "model" / "config.json").is_file()  # the other category finished
    bad.write_bytes(good_bytes)
    run(project)
    assert work(project) == {"weave": dict.fromkeys(STEPS, "cached"), "hexnut": dict.fromkeys(STEPS, "completed")}


@pytest.mark.slow  # 40 s: a local Dask cluster starting two worker processes
def test_dask_task_runner_on_a_local_cluster_gives_the_same_results(project, tmp_path):
    from gaussad.flows.runtime import dask_runner

    threads = run(project)
    on_dask = train.with_options(task_runner=dask_runner(workers=2))
    dask_summary = on_dask(str(project["data"]), None, str(project["config"]), str(tmp_path / "dask-out"),
                           str(tmp_path / "dask-cache"))
    # the same numbers up to float32 round-off (a Dask worker runs torch on one thread, not two)
    for name, metrics in threads["metrics"].items():
        assert dask_summary["metrics"][name] == pytest.approx(metrics, rel=1e-5)
    assert all(state == "completed" for steps in dask_summary["tasks"].values() for state in steps.values())
