"""Shared fixtures: a tiny demo dataset written once per test session; a real MLflow server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port, healthy, wait_for

from gaussad.demo import write_demo_dataset

_DEMO_SPEC = {
    "n_train": 20,
    "n_test_good": 6,
    "n_test_per_defect": 4,
    "image_size": 96,
    # category -> its defect types (brushed is grayscale, weave RGB)
    "defects": {"brushed": ("crack", "dent", "scratch"), "weave": ("hole", "stain", "thread")},
}


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """The backbones this session exports to ONNX go to a folder of its own, not ~/.cache (the
    environment variable reaches the command-line processes the tests start too)."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ["GAUSSAD_ONNX_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def demo_spec():
    """The arguments the shared demo dataset was written with (what the data tests expect back)."""
    return _DEMO_SPEC


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """<root>/{brushed, weave} in MVTec AD layout, written once; tests must treat it as read-only."""
    root = tmp_path_factory.mktemp("demo")
    spec = _DEMO_SPEC
    write_demo_dataset(
        root,
        seed=0,
        categories=list(spec["defects"]),
        n_train=spec["n_train"],
        n_test_good=spec["n_test_good"],
        n_test_per_defect=spec["n_test_per_defect"],
        image_size=spec["image_size"],
    )
    return root


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URL of a real `mlflow server` (SQLite backend, proxied artifacts in a temp dir), one per session."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    # the server's job runner would outlive it by ~20 s (TOOLING.md); one worker starts in ~10 s
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url) or server.poll() is not None, 120, "mlflow server")
        assert server.poll() is None, "mlflow server exited at start"
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def source_state():
    """The state of a Lite0 with random weights from seed 7: what a weights file holds (tests of
    weight sources and of the export cache)."""
    from gaussad.networks import build_model

    return build_model("tf_efficientnet_lite0", "none", seed=7).state_dict()
