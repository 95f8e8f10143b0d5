"""Hostile inputs to a registered model: served by `mlflow models serve`, loaded as pyfunc, and
through `gaussad predict`. Each is refused with a 400 / ValueError / exit 2 that says what is wrong,
nothing is read from the server's disk, and the next good request is scored as the library scores it.

Over HTTP the model's signature declares `image` a binary column: in a JSON body MLflow base64-decodes
every value before the model sees it, so a JSON path or array is refused by MLflow itself; a CSV body
carries strings through to the model, which is where its path check matters.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from servers import free_port, healthy, wait_for

import mlflow
from gaussad.cli import main
from gaussad.data import load_category
from gaussad.demo import write_demo_dataset
from gaussad.gaussian import GaussianAD
from gaussad.registry import register_model
from gaussad.serving import IMAGE_ROOTS_VARIABLE

CATEGORY = "hexnut"
SMALL = {"backbone": "tf_efficientnet_lite0", "levels": (3, 4), "image_size": 64, "batch_size": 8, "progress": False}
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header announces width×height 8-bit gray pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grayscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


BOMB_SIZE = r"(20000×20000|400000000 pixels)"  # the message gives the size, as W×H or as a pixel count
GARBAGE = b"\x00garbage\xff" * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory, mlflow_server) -> dict:
    """A small Gaussian model (random weights, 64 px) registered as gaussad-faults-hexnut."""
    tmp = tmp_path_factory.mktemp("faults")
    data = tmp / "faults"
    write_demo_dataset(data, seed=6, categories=[CATEGORY], n_train=10, n_test_good=2, n_test_per_defect=1,
                       image_size=64)
    category = load_category(data, CATEGORY)
    folder = tmp / "model"
    GaussianAD(weights="none", seed=1, **SMALL).fit(category.train).save(folder)
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("serving-faults")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("serving-faults")
    with mlflow.start_run(experiment_id=experiment_id):
        name, version, _ = register_model(folder, "faults", CATEGORY, str(data), {}, client)
    good = category.test.paths[0]
    expected = GaussianAD.load(folder, progress=False).score([good]).image[0]
    bomb = tmp / "bomb.png"
    bomb.write_bytes(bomb_png())
    return {"uri": f"models:/{name}/{version}", "folder": folder, "data": data, "good": good, "expected": expected,
            "bomb": bomb, "tmp": tmp}


@pytest.fixture(scope="module")
def served(model, mlflow_server, tmp_path_factory) -> str:
    """The model under `mlflow models serve`, as deployed by default: no GAUSSAD_IMAGE_ROOTS."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop(IMAGE_ROOTS_VARIABLE, None)
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", model["uri"], "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url, "/ping") or server.poll() is not None, 120, "mlflow models serve")
        assert server.poll() is None, log.read_text()[-2000:]
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def post(url: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def json_body(*values) -> str:
    """A dataframe_split request; bytes are sent base64-encoded, as MLflow expects for a binary column."""
    rows = [[base64.b64encode(v).decode() if isinstance(v, bytes) else v] for v in values]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}, "params": {"return_maps": False}})


def csv_body(*values: str) -> str:
    return "image\n" + "".join(f"{v}\n" for v in values)


HOSTILE_REQUESTS = {
    # name: (body, content type, what the message must say)
    "bomb": (json_body(bomb_png()), "application/json", BOMB_SIZE),
    "path in JSON": (json_body("/etc/passwd"), "application/json", "not compatible with model signature"),
    "path in CSV": (csv_body("/etc/passwd"), "text/csv", "image paths are not accepted"),
    "nan array": (json_body(np.full((5, 5), np.nan).tolist()), "application/json",
                  "not compatible with model signature"),
    "wrong shape": (json_body(np.zeros((5, 5, 7)).tolist()), "application/json", "not compatible with model signature"),
    "empty": (json_body(), "application/json", "the input holds no images"),
    "garbage": (json_body(GARBAGE), "application/json", "cannot read image"),
}


@pytest.mark.parametrize("name", list(HOSTILE_REQUESTS))
def test_served_model_refuses_hostile_input_and_keeps_serving(served, model, name):
    body, content_type, message = HOSTILE_REQUESTS[name]
    status, answer = post(served, body, content_type)
    assert status == 400, answer
    assert re.search(message, answer["message"]), answer
    assert "stack_trace" not in answer  # the server's traceback is not sent to clients
    status, answer = post(served, json_body(model["good"].read_bytes()))
    assert status == 200, answer
    assert answer["predictions"][0]["score"] == pytest.approx(model["expected"], rel=1e-5)


def test_served_model_does_not_read_a_real_image_path(served, model):
    """A path to a readable PNG, sent where the model sees it as a string: refused, not scored."""
    status, answer = post(served, csv_body(str(model["good"])), "text/csv")
    assert status == 400 and "image paths are not accepted" in answer["message"], answer


@pytest.fixture(scope="module")
def pyfunc(model, mlflow_server):
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow.pyfunc.load_model(model["uri"])


IN_PROCESS = {
    "bomb": (bomb_png(), BOMB_SIZE),
    "path": ("/etc/passwd", "image 0: image paths are not accepted"),
    "nan array": (np.full((64, 64, 3), np.nan, np.float32), "image 0: an image array holds NaN"),
    "wrong shape": (np.zeros((5, 5, 7), np.float32), r"image 0: .*got shape \(5, 5, 7\)"),
    "out of range": (np.full((8, 8), 3.0), r"image 0: .*values in \[0, 1\]"),
    "too large": (np.broadcast_to(np.uint8(0), (20000, 20000)), "image 0: .*20000×20000 pixels is larger"),
    "garbage": (GARBAGE, "image 0: cannot read image"),
}


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_pyfunc_refuses_hostile_input_naming_it(pyfunc, model, monkeypatch, name):
    monkeypatch.delenv(IMAGE_ROOTS_VARIABLE, raising=False)
    value, message = IN_PROCESS[name]
    with pytest.raises(ValueError, match=message):
        pyfunc.predict(pd.DataFrame({"image": [value]}))
    good = pyfunc.predict(pd.DataFrame({"image": [model["good"].read_bytes()]}), params={"return_maps": False})
    assert good["score"][0] == pytest.approx(model["expected"], rel=1e-5)


def test_pyfunc_names_the_bad_image_in_a_batch_and_refuses_empty_input(pyfunc, model):
    with pytest.raises(ValueError, match="image 1: cannot read image"):
        pyfunc.predict(pd.DataFrame({"image": [model["good"].read_bytes(), GARBAGE]}))
    with pytest.raises(ValueError, match="the input holds no images"):
        pyfunc.predict(pd.DataFrame({"image": pd.Series([], dtype=object)}))


def test_pyfunc_reads_paths_only_inside_the_allowed_folders(pyfunc, model, monkeypatch):
    monkeypatch.setenv(IMAGE_ROOTS_VARIABLE, str(model["data"]))
    scored = pyfunc.predict(pd.DataFrame({"image": [str(model["good"])]}), params={"return_maps": False})
    assert scored["score"][0] == pytest.approx(model["expected"], rel=1e-5)
    with pytest.raises(ValueError, match="image 0: image path '/etc/passwd' is outside the folders"):
        pyfunc.predict(pd.DataFrame({"image": ["/etc/passwd"]}))
    link = model["data"] / "passwd.png"  # a link inside an allowed folder to a file outside it
    link.symlink_to("/etc/passwd")
    try:
        with pytest.raises(ValueError, match="is outside the folders"):
            pyfunc.predict(pd.DataFrame({"image": [str(link)]}))
    finally:
        link.unlink()


@pytest.mark.slow  # the console script in a process of its own: what a user's terminal shows
def test_cli_predict_refuses_a_decompression_bomb_in_one_line(model, tmp_path):
    result = subprocess.run([str(BIN / "gaussad"), "predict", str(model["folder"]), str(model["bomb"]), "--quiet",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gaussad: error: ") and str(model["bomb"]) in lines[0], lines
    assert re.search(BOMB_SIZE, lines[0])


def test_cli_main_refuses_garbage_and_empty_folders(model, tmp_path, capsys):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(GARBAGE)
    assert main(["predict", str(model["folder"]), str(model["bomb"]), "--quiet", "-o", str(tmp_path / "a")]) == 2
    assert main(["predict", str(model["folder"]), str(garbage), "--quiet", "-o", str(tmp_path / "b")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(model["folder"]), str(tmp_path / "empty"), "--quiet", "-o", str(tmp_path / "c")]) == 2
    bomb, bad, empty = capsys.readouterr().err.strip().splitlines()
    assert str(model["bomb"]) in bomb and str(garbage) in bad and "cannot read image" in bad
    assert "no images found" in empty
    assert all(line.startswith("gaussad: error: ") for line in (bomb, bad, empty))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve_load", ROOT / "benchmarks" / "bench_serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_served_model_under_load_has_no_errors_and_flat_memory(tmp_path):
    """The issue's load: 8 concurrent clients, 500 requests mixing PNG bytes and paths."""
    result = _bench().main(requests=500, clients=8, output=tmp_path / "serve_load.json")
    assert result["errors"] == 0, result["error_samples"]
    assert result["rss_mb"]["last"] <= 1.5 * result["rss_mb"]["after_warmup"], result["rss_mb"]
