"""The model registry against a real `mlflow server`: pyfunc scores, promotion, `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import free_port, healthy, tracking_to, wait_for

import mlflow
from gaussad.cli import main
from gaussad.data import load_category
from gaussad.demo import write_demo_dataset
from gaussad.errors import DatasetError
from gaussad.evaluate import evaluate
from gaussad.gaussian import GaussianAD
from gaussad.registry import promote
from gaussad.tracking import log_run_folder

CATEGORY = "hexnut"
NAME = f"gaussad-promo-{CATEGORY}"  # the dataset folder is named "promo"
SMALL = {"backbone": "tf_efficientnet_lite0", "levels": (3, 4), "image_size": 64, "batch_size": 8, "progress": False}


def pipeline_folder(out: Path, data_root: Path, model: GaussianAD) -> Path:
    """A run folder as gaussad/flows/train.py writes it, for one category: model, evaluation, run.json."""
    category = load_category(data_root, CATEGORY)
    model.fit(category.train)
    evaluate(model, category, out / CATEGORY / "evaluation", n_overlays=2)
    model.save(out / CATEGORY / "model")
    record = {"data": {"root": str(data_root), "dvc_md5": None}, "params": {"model": model.config},
              "seconds": 1.0, "git_commit": "test"}
    (out / "run.json").write_text(json.dumps(record))
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_server) -> dict:
    """Three versions of one registered model, logged and promoted in turn:
    v1 random weights (first champion), v2 pretrained (better: promoted), v3 random again (worse: kept out)."""
    tmp = tmp_path_factory.mktemp("registry")
    data = tmp / "promo"
    write_demo_dataset(data, seed=6, categories=[CATEGORY], n_train=10, n_test_good=4, n_test_per_defect=3,
                       image_size=64)
    candidates = {
        1: GaussianAD(weights="none", seed=1, **SMALL),
        2: GaussianAD(weights="package:efficientnet-lite0", **SMALL),
        3: GaussianAD(weights="none", seed=2, **SMALL),
    }
    result = {"data": data, "folders": {}, "decisions": {}}
    for version, model in candidates.items():
        folder = pipeline_folder(tmp / f"run{version}", data, model)
        logged = log_run_folder(folder, experiment="registry", uri=mlflow_server)
        assert logged.versions == {CATEGORY: f"{NAME}/{version}"} and logged.new_versions == [NAME]
        result["folders"][version] = folder
        result["decisions"][version] = promote(NAME, "image_auroc", uri=mlflow_server)
    return result


def aliases(client: MlflowClient) -> dict[str, str]:
    """The model's aliases with versions as strings (MLflow gives ints from SQLite, strings over HTTP)."""
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


def metric(folder: Path, key: str = "image_auroc") -> float:
    return json.loads((folder / CATEGORY / "evaluation" / "metrics.json").read_text())[key]


def test_better_challenger_is_promoted_and_worse_is_not(mlflow_server, registry):
    first, better, worse = (registry["decisions"][v] for v in (1, 2, 3))
    assert first.promoted and first.champion is None and "first champion" in first.reason
    # the comparison re-scores both versions on the same test data: the figures match evaluate's
    assert better.promoted and better.champion == "1"
    assert better.challenger_value == pytest.approx(metric(registry["folders"][2]))
    assert better.champion_value == pytest.approx(metric(registry["folders"][1]))
    assert better.challenger_value >= better.champion_value
    assert not worse.promoted and worse.champion == "2" and worse.challenger_value < worse.champion_value

    client = MlflowClient(mlflow_server)
    assert aliases(client) == {"champion": "2", "challenger": "3"}
    kept_out = client.get_model_version(NAME, "3")
    assert kept_out.tags["promotion.decision"] == "not promoted"
    assert kept_out.tags["promotion.reason"] == worse.reason and "<" in worse.reason
    assert kept_out.description.startswith("not promoted: image_auroc")
    promoted = client.get_model_version(NAME, "2")
    assert promoted.tags["promotion.decision"] == "promoted"
    assert float(promoted.tags["promotion.challenger_value"]) == pytest.approx(better.challenger_value)


def test_force_promotes_and_says_so(mlflow_server, registry, capsys):
    with tracking_to(mlflow_server):
        assert main(["promote", NAME, "--force"]) == 0
    assert "promoted to champion: forced:" in capsys.readouterr().out
    client = MlflowClient(mlflow_server)
    assert aliases(client)["champion"] == "3"
    assert client.get_model_version(NAME, "3").tags["promotion.reason"].startswith("forced: image_auroc")
    with tracking_to(mlflow_server):  # put the better model back for the tests that follow
        client.set_registered_model_alias(NAME, "champion", "2")


def test_a_champion_that_is_also_the_challenger_keeps_its_record(mlflow_server, registry):
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(NAME, "challenger", aliases(client)["champion"])
    decision = promote(NAME, uri=mlflow_server)
    assert not decision.promoted and "already the champion" in decision.reason
    assert client.get_model_version(NAME, aliases(client)["champion"]).tags["promotion.decision"] == "promoted"


def test_promote_errors_name_the_problem(mlflow_server, registry, capsys):
    with tracking_to(mlflow_server):
        assert main(["promote", "gaussad-promo-nothing"]) == 2
    assert "no registered model 'gaussad-promo-nothing'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        promote(NAME, "accuracy", uri=mlflow_server)


def test_relogging_a_folder_adds_no_version(mlflow_server, registry):
    logged = log_run_folder(registry["folders"][2], experiment="registry", uri=mlflow_server)
    assert logged.versions == {CATEGORY: f"{NAME}/2"} and logged.new_versions == []


def test_champion_as_pyfunc_scores_paths_bytes_and_arrays_as_the_library_does(mlflow_server, registry, monkeypatch):
    monkeypatch.setenv("GAUSSAD_IMAGE_ROOTS", str(registry["data"]))  # path inputs are read only there
    test = load_category(registry["data"], CATEGORY).test
    paths = [str(p) for p in test.paths[:4]]
    library = GaussianAD.load(registry["folders"][2] / CATEGORY / "model", progress=False).score(paths)
    mlflow.set_tracking_uri(mlflow_server)
    champion = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    inputs = [paths[0], Path(paths[1]).read_bytes(), np.asarray(Image.open(paths[2]).convert("RGB")),
              np.asarray(Image.open(paths[3]).convert("RGB"), np.float32) / 255]
    result = champion.predict(pd.DataFrame({"image": inputs}))
    np.testing.assert_allclose(result["score"], library.image, rtol=1e-5)
    np.testing.assert_allclose(np.stack(result["map"]), library.maps, rtol=1e-4, atol=1e-4)
    threshold = json.loads((registry["folders"][2] / CATEGORY / "model" / "config.json").read_text())[
        "thresholds"]["image_f1_optimal"]
    assert (result["threshold"] == threshold).all()
    assert list(result["label"]) == ["anomalous" if s >= threshold else "normal" for s in library.image]
    without_maps = champion.predict(pd.DataFrame({"image": paths[:1]}), params={"return_maps": False})
    assert "map" not in without_maps.columns
    with pytest.raises(Exception, match="cannot read image in the request"):
        champion.predict(pd.DataFrame({"image": [b"not an image"]}))


@pytest.mark.parametrize("scored_by", ["folder", "exported"])
def test_mlflow_models_serve_scores_a_posted_image(mlflow_server, registry, tmp_path, request, scored_by):
    """The champion (scored by its model folder), and a version registered with its exported graph."""
    path = load_category(registry["data"], CATEGORY).test.paths[-1]
    if scored_by == "folder":
        uri, model_dir, tolerance = f"models:/{NAME}@champion", registry["folders"][2] / CATEGORY / "model", 1e-5
    else:
        (uri, model_dir), tolerance = request.getfixturevalue("exported_version"), 1e-4
    expected = GaussianAD.load(model_dir, progress=False).score([path]).image[0]
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", uri,
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}", "/ping") or server.poll() is not None, 120,
                 "mlflow models serve")
        assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        encoded = base64.b64encode(path.read_bytes()).decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}, "params": {"return_maps": False}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            prediction = json.loads(response.read())["predictions"][0]
        assert prediction["score"] == pytest.approx(expected, rel=tolerance)
        assert prediction["label"] in ("anomalous", "normal") and "map" not in prediction
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_png_round_trip_matches_the_file(registry, monkeypatch):
    """The encoded-bytes path decodes exactly what the file path reads (PNG is lossless)."""
    monkeypatch.setenv("GAUSSAD_IMAGE_ROOTS", str(registry["data"]))
    from gaussad.serving import decode_image

    path = load_category(registry["data"], CATEGORY).test.paths[0]
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(decode_image(buffer.getvalue())), np.asarray(decode_image(str(path))))


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_and_the_registered_model(mlflow_server, registry, tmp_path):
    """Headless Chromium renders the MLflow UI's runs page and the model's registry page (the
    pictures of docs/img/ come from a real demo run instead: make screenshots)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium")
    experiment = MlflowClient(mlflow_server).get_experiment_by_name("registry")
    pages = {
        "mlflow_runs": (f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs", f"promo-run{2}"),
        "mlflow_registry": (f"{mlflow_server}/#/models/{NAME}", "champion"),
    }
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1800,1300"]
    for picture, (url, expected_text) in pages.items():
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert expected_text in dom.stdout, f"{url} does not show {expected_text!r}"
        png = tmp_path / f"{picture}.png"
        subprocess.run([chromium, *flags, f"--screenshot={png}", url], capture_output=True, timeout=120, check=True)
        pixels = np.asarray(Image.open(png).convert("L"), np.float32)
        assert pixels.shape == (1300, 1800) and pixels.std() > 10  # rendered, not a blank page



@pytest.fixture(scope="module")
def exported_version(mlflow_server, registry, tmp_path_factory) -> tuple[str, Path]:
    """The pretrained model's run folder logged again with `export_onnx`, as a registered model of its
    own (apart from the promotion tests'): (its version's URI, the model folder)."""
    folder = shutil.copytree(registry["folders"][2], tmp_path_factory.mktemp("exported") / "run")
    record = json.loads((folder / "run.json").read_text())
    record["data"]["name"] = "promo-onnx"
    (folder / "run.json").write_text(json.dumps(record))
    logged = log_run_folder(folder, experiment="registry", uri=mlflow_server, export_onnx=True)
    assert logged.versions == {CATEGORY: f"gaussad-promo-onnx-{CATEGORY}/1"}
    again = log_run_folder(folder, experiment="registry", uri=mlflow_server, export_onnx=True)
    assert again.versions == logged.versions and again.new_versions == []
    return f"models:/gaussad-promo-onnx-{CATEGORY}/1", folder / CATEGORY / "model"


def test_a_version_registered_with_its_exported_graph_scores_with_it(mlflow_server, registry, exported_version):
    """The version holds the ONNX graph too, and its pyfunc model scores with it, as the library does
    within the export's parity bounds; the folder stays available."""
    from gaussad.export import MAP_TOLERANCE, SCORE_TOLERANCE, ExportedDetector

    uri, model_dir = exported_version
    name = uri.split("/")[1]
    assert MlflowClient(mlflow_server).get_model_version(name, "1").tags["scored_by"] == "exported ONNX graph"
    paths = load_category(registry["data"], CATEGORY).test.paths[:4]
    library = GaussianAD.load(model_dir, progress=False)
    expected = library.score(paths)
    mlflow.set_tracking_uri(mlflow_server)
    exported = mlflow.pyfunc.load_model(uri)
    assert isinstance(exported.unwrap_python_model().model, ExportedDetector)
    result = exported.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    scores, maps = np.asarray(result["score"]), np.stack(result["map"])
    assert np.max(np.abs(scores - expected.image) / np.abs(expected.image)) <= SCORE_TOLERANCE
    assert np.abs(maps - expected.maps).max() <= MAP_TOLERANCE * np.abs(expected.maps).max()
    assert (result["threshold"] == library.decision_threshold).all()

    from_folder = mlflow.pyfunc.load_model(uri, model_config={"use_exported": False})
    assert isinstance(from_folder.unwrap_python_model().model, GaussianAD)


def test_the_false_alarm_gate_needs_the_budget_and_the_champion():
    from gaussad.registry import _false_alarm_gate

    assert _false_alarm_gate({"challenger": (2, 20, 0.05)}, None)[0]  # P(X >= 2 | 20, 0.05) = 0.26
    passed, reason = _false_alarm_gate({"challenger": (5, 20, 0.05)}, None)  # P(X >= 5) = 0.0026
    assert not passed and "above its budget 0.05" in reason
    passed, reason = _false_alarm_gate({"challenger": (2, 20, None), "champion": (1, 20, None)}, "4")
    assert not passed and "> champion v4's 1" in reason


def test_promotion_on_fresh_normal_images_counts_each_versions_false_alarms(mlflow_server, registry, tmp_path):
    """Fresh defect-free images of the category (another seed): each version's alarms at its own
    decision threshold, counted again here through the registry's pyfunc models."""
    write_demo_dataset(tmp_path / "fresh", seed=9, categories=[CATEGORY], n_train=12, n_test_good=1,
                       n_test_per_defect=1, image_size=64)
    fresh = sorted((tmp_path / "fresh" / CATEGORY / "train" / "good").iterdir())
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(NAME, "champion", "2")
    client.set_registered_model_alias(NAME, "challenger", "1")
    decision = promote(NAME, uri=mlflow_server, normal_images=fresh)
    for version, counted in (("1", decision.challenger_false_alarms), ("2", decision.champion_false_alarms)):
        with tracking_to(mlflow_server):
            model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}").unwrap_python_model().model
        want = int((model.score(fresh).image >= model.decision_threshold).sum())
        assert counted == (want, len(fresh))
    assert f"false alarms in {len(fresh)} fresh normal images" in decision.reason
    labelled_ok = decision.challenger_value >= decision.champion_value
    fewer_alarms = decision.challenger_false_alarms[0] <= decision.champion_false_alarms[0]
    assert decision.promoted == (labelled_ok and fewer_alarms)
    tags = client.get_model_version(NAME, "1").tags
    assert tags["promotion.challenger_false_alarms"] == f"{decision.challenger_false_alarms[0]}/{len(fresh)}"
    client.set_registered_model_alias(NAME, "champion", "2")  # as the tests after this one expect


def test_without_a_labelled_split_the_false_alarm_gate_alone_decides(mlflow_server, registry, tmp_path):
    write_demo_dataset(tmp_path / "fresh", seed=9, categories=[CATEGORY], n_train=6, n_test_good=1,
                       n_test_per_defect=1, image_size=64)
    fresh = sorted((tmp_path / "fresh" / CATEGORY / "train" / "good").iterdir())
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(tmp_path / "fresh" / CATEGORY / "train", unlabelled / CATEGORY / "train")  # no test split
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(NAME, "champion", "2")
    client.set_registered_model_alias(NAME, "challenger", "1")
    decision = promote(NAME, dataset_root=str(unlabelled), uri=mlflow_server, normal_images=fresh)
    assert decision.challenger_value is None and decision.champion_value is None
    assert decision.reason.startswith("no labelled test split: the false-alarm gate alone decides; ")
    assert decision.promoted == (decision.challenger_false_alarms[0] <= decision.champion_false_alarms[0])
    with pytest.raises(DatasetError, match=f"unlabelled/{CATEGORY}/test: "):  # no fresh images: nothing to go on
        promote(NAME, dataset_root=str(unlabelled), uri=mlflow_server)
    client.set_registered_model_alias(NAME, "champion", "2")  # as the tests after this one expect
