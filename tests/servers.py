"""Helpers for tests that start real servers (Prefect, MLflow) on localhost."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str, path: str = "/health") -> bool:
    """Whether `<url><path>` answers 200 (Prefect's API and MLflow's server have /health, a model
    served by `mlflow models serve` has /ping)."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(check, seconds: float, what: str):
    """Poll `check()` every 2 s until it returns something true; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@contextmanager
def tracking_to(uri: str):
    """MLFLOW_TRACKING_URI set to `uri` inside the block, as a user would export it."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
