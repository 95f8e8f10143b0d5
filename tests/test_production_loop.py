"""The production loop (gaussad.production, gaussad/flows/production.py) run for real: the retrain flow on a
Prefect test server, tracking and the registry on a real MLflow server over HTTP, new good images
arriving in a folder between runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from servers import tracking_to

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import mlflow  # noqa: E402
from gaussad.demo import write_demo_dataset  # noqa: E402
from gaussad.flows.production import watch_arrivals  # noqa: E402
from gaussad.flows.retrain import retrain  # noqa: E402
from gaussad.gaussian import GaussianAD  # noqa: E402
from gaussad.production import production_settings  # noqa: E402

GATE = 0.3


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def project(tmp_path: Path, experiment: str, **model) -> dict:
    """A small weave dataset, a folder for arrivals (empty) and a params file for a fast model."""
    data = tmp_path / "data"
    write_demo_dataset(data, seed=3, categories=["weave"], n_train=12, n_test_good=3, n_test_per_defect=2,
                       image_size=64)
    more = tmp_path / "more"  # the line's next good images: the same category, other draws
    write_demo_dataset(more, seed=11, categories=["weave"], n_train=16, n_test_good=1, n_test_per_defect=1,
                       image_size=64)
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["data"].update(root=str(data), name=experiment)  # a registered model per test
    params["model"].update(levels=[3], image_size=64, batch_size=8, holdout=0.2, **model)
    params["production"].update(arrivals=str(tmp_path / "arrivals"), update_after=6, gate_fraction=GATE)
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump(params))
    return {"data": data, "config": config, "arrivals": tmp_path / "arrivals" / "weave", "experiment": experiment,
            "new": sorted((more / "weave" / "train" / "good").iterdir()), "tmp": tmp_path}


def arrive(project: dict, images: list[Path]) -> None:
    project["arrivals"].mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy(image, project["arrivals"] / f"line-{image.name}")


def run_retrain(project: dict) -> dict:
    tmp = project["tmp"]
    return retrain(str(project["data"]), str(project["config"]), str(tmp / "pipeline"), str(tmp / "cache"),
                   project["experiment"], production_dir=str(tmp / "production"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(update share, gate share) of the arrivals, by content digest."""
    gate = [p for p in paths if int(sha256(p)[:15], 16) / 16**15 < GATE]
    return [p for p in paths if p not in gate], gate


def versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name = '{name}'"))


def loaded(name: str, version: str) -> GaussianAD:
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model().model


def test_arrivals_update_the_champion_exactly_and_an_unchanged_tick_does_nothing(mlflow_server, tmp_path):
    p = project(tmp_path, "loop-update", updatable=True)
    name = "gaussad-loop-update-weave"
    client = MlflowClient(mlflow_server)
    with tracking_to(mlflow_server):
        first = run_retrain(p)  # trains v1 and promotes it; no arrivals yet
        assert [t["action"] for t in first["ticks"]] == ["none"] and versions(client, name) == ["1"]

        arrive(p, p["new"][:12])
        tick = run_retrain(p)["ticks"][0]
        update_share, gate = split(sorted(p["arrivals"].iterdir()))
        assert (tick["action"], tick["n_new"], tick["n_pending"], tick["n_gate"]) == \
            ("updated", 12, len(update_share), len(gate))
        assert versions(client, name) == ["1", "2"] and tick["challenger"] == "2"

        # lineage: which images, by content, went into v2, in the version's tags and lineage.json
        v2 = client.get_model_version(name, "2")
        expected = hashlib.sha256(b"".join(bytes.fromhex(sha256(q)) for q in update_share)).hexdigest()
        assert (v2.tags["lineage.n_images"], v2.tags["lineage.images_sha256"]) == (str(len(update_share)), expected)
        assert v2.tags["lineage.parent_version"] == "1" and v2.tags["lineage.action"] == "updated"
        lineage = json.loads(Path(client.download_artifacts(v2.tags["lineage.run_id"], "lineage.json",
                                                            str(tmp_path))).read_text())
        assert [sha for _, sha in lineage["images"]] == [sha256(q) for q in update_share]

        # v2 is v1 with the update share added exactly: a fit of the same settings on the union
        model = loaded(name, "2")
        union = GaussianAD.from_settings({k: model.config[k] for k in GaussianAD.SETTINGS.names}, False,
                                         progress=False)
        held_out = [Path(path) for path, _ in model.fit_info["held_out_images"]]
        first_fit = loaded(name, "1")
        fitted = [q for q in sorted((p["data"] / "weave" / "train" / "good").iterdir())
                  + update_share if q not in held_out]
        assert model.fit_info["n_train_images"] == len(fitted) > first_fit.fit_info["n_train_images"]
        reference = union.fit(fitted, holdout=0).score(gate).image
        np.testing.assert_allclose(model.score(gate).image, reference, rtol=1e-6)

        # the gate: each version's false alarms on the gate images, recounted through the registry
        counts = {}
        for version in ("1", "2"):
            model = loaded(name, version)
            counts[version] = int((model.score(gate).image >= model.decision_threshold).sum())
        v2 = client.get_model_version(name, "2")
        assert v2.tags["promotion.challenger_false_alarms"] == f"{counts['2']}/{len(gate)}"
        assert v2.tags["promotion.champion_false_alarms"] == f"{counts['1']}/{len(gate)}"
        champion = str(client.get_registered_model(name).aliases["champion"])
        assert champion == ("2" if tick["promoted"] else "1")

        # monitoring: one step in the model's monitoring run, its files, the Prefect artifact
        run = client.get_run(tick["monitoring_run"])
        assert [m.value for m in client.get_metric_history(run.info.run_id, "n_images")] == [12]
        report = json.loads((tmp_path / "production" / "weave" / "monitor.json").read_text())
        assert report["n_images"] == 12 and {"drift", "p_value", "alarm_rate"} <= set(report)
        assert {a.path for a in client.list_artifacts(run.info.run_id, "ticks/0000")} == \
            {"ticks/0000/monitor.json", "ticks/0000/monitor.png"}
        assert name in production_table()

        # nothing changed: nothing computed, no version, no monitoring step, the loop's decision stands
        # (the retrain flow promotes only what it registered itself, not the loop's challenger)
        again = run_retrain(p)
        assert again["promotions"] == [] and again["ticks"][0]["action"] == "none"
        assert versions(client, name) == ["1", "2"]
        assert client.get_model_version(name, "2").tags == v2.tags
        assert len(client.get_metric_history(run.info.run_id, "n_images")) == 1

        # a few more: monitored, too few for an update (unless they drift)
        arrive(p, p["new"][12:14])
        few = watch_arrivals(str(p["data"]), None, str(p["config"]), str(tmp_path / "production"), p["experiment"])
        assert few[0]["n_new"] == 2 and len(client.get_metric_history(run.info.run_id, "n_images")) == 2
        assert few[0]["action"] == ("updated" if few[0]["drift"] else "monitored")

        # a broken arrival: the category fails in one line that names the file, and nothing is recorded
        broken = p["arrivals"] / "line-broken.png"
        broken.write_bytes(p["new"][14].read_bytes()[:200])
        with pytest.raises(RuntimeError, match="line-broken.png"):
            watch_arrivals(str(p["data"]), None, str(p["config"]), str(tmp_path / "production"), p["experiment"])
        assert len(client.get_metric_history(run.info.run_id, "n_images")) == 2


def production_table() -> str:
    """The markdown of the latest gaussad-production artifact on the Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        key = ArtifactFilter(key=ArtifactFilterKey(any_=["gaussad-production"]))
        artifacts = client.read_artifacts(artifact_filter=key)
    return artifacts[-1].data


def test_a_model_that_cannot_update_is_fitted_again_on_the_training_images_and_the_arrivals(mlflow_server, tmp_path):
    p = project(tmp_path, "loop-refit", updatable=False)
    name = "gaussad-loop-refit-weave"
    client = MlflowClient(mlflow_server)
    with tracking_to(mlflow_server):
        run_retrain(p)
        arrive(p, p["new"][:10])
        tick = run_retrain(p)["ticks"][0]
        update_share, gate = split(sorted(p["arrivals"].iterdir()))
        assert tick["action"] == "refitted" and versions(client, name) == ["1", "2"]
        model = loaded(name, "2")
        reference = GaussianAD.from_settings({k: model.config[k] for k in GaussianAD.SETTINGS.names}, False,
                                             progress=False)
        reference.fit([*sorted((p["data"] / "weave" / "train" / "good").iterdir()), *update_share], holdout=0.2)
        np.testing.assert_allclose(model.score(gate).image, reference.score(gate).image, rtol=1e-6)
        assert client.get_model_version(name, "2").tags["lineage.n_images"] == str(len(update_share))


def test_the_production_block_is_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"params.yaml: production.gate_fraction: .*1"):
        production_settings({"production": {"gate_fraction": 1.5}})
    with pytest.raises(ValueError, match=r"production.arrival is not a setting of the production block"):
        production_settings({"production": {"arrival": "x"}})
