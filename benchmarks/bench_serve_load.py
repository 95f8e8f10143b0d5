"""Load on a served model: concurrent clients against `mlflow models serve`, latency and memory.

    .venv/bin/python benchmarks/bench_serve_load.py [--requests 500] [--clients 8]

It writes a small demo category, fits a Gaussian model on it (lite0, packaged weights, 64 px),
registers it in a throw-away MLflow store (SQLite in a temp folder) with gaussad.registry, and serves
`models:/<name>/1` with GAUSSAD_IMAGE_ROOTS set to the demo data. Then `--clients` threads send
`--requests` requests in all, one image each, alternating encoded PNG bytes (JSON, base64) and file
paths (CSV: in JSON MLflow base64-decodes every value of the binary `image` column, so a path only
reaches the model as a CSV string). Arrays are not sent: the served signature admits no array over
HTTP. It records each request's latency and status, samples the RSS of the server's process tree
every 0.5 s, and writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

import mlflow
from gaussad.data import load_category
from gaussad.demo import write_demo_dataset
from gaussad.gaussian import GaussianAD
from gaussad.registry import register_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory.py, also when a test loads this file by path
from memory import MB, PeakSampler, tree_rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "serve_load.json"
BIN = Path(sys.executable).parent
CATEGORY = "hexnut"
WARMUP = 8  # requests sent one by one before the clock starts; the RSS after them is the baseline


def register_demo_model(tmp: Path) -> tuple[str, str, Path]:
    """(tracking URI, model URI, data folder) of a small Gaussian model registered in `tmp`."""
    data = tmp / "data"
    write_demo_dataset(data, seed=0, categories=[CATEGORY], n_train=16, n_test_good=8, n_test_per_defect=4,
                       image_size=64)
    category = load_category(data, CATEGORY)
    model = GaussianAD(backbone="tf_efficientnet_lite0", weights="package:efficientnet-lite0", levels=(3, 4),
                       image_size=64, batch_size=8, progress=False).fit(category.train)
    model.save(tmp / "model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve-load", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        name, version, _ = register_model(tmp / "model", "demo", CATEGORY, str(data), {}, client)
    return uri, f"models:/{name}/{version}", data


def start_server(tracking: str, model_uri: str, port: int, image_root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "GAUSSAD_IMAGE_ROOTS": str(image_root),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # mlflow runs `uvicorn` from PATH
    command = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow models serve did not answer in {seconds} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def requests_for(paths: list[Path], count: int) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type), PNG bytes and paths alternating over the test images."""
    bodies = []
    for number in range(count):
        path = paths[number % len(paths)]
        if number % 2 == 0:
            encoded = base64.b64encode(path.read_bytes()).decode()
            body = {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}, "params": {"return_maps": False}}
            bodies.append(("png", json.dumps(body).encode(), "application/json"))
        else:
            bodies.append(("path", f"image\n{path}\n".encode(), "text/csv"))
    return bodies


def send(url: str, body: bytes, content_type: str) -> tuple[float, int, str]:
    """(seconds, HTTP status or 0 for no answer, error text or '')."""
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": content_type})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            json.loads(response.read())["predictions"][0]["score"]  # a 200 without a score is a failure too
            return time.perf_counter() - start, response.status, ""
    except urllib.error.HTTPError as err:
        return time.perf_counter() - start, err.code, err.read()[:300].decode(errors="replace")
    except OSError as err:
        return time.perf_counter() - start, 0, str(err)


def main(requests: int = 500, clients: int = 8, output: Path = OUTPUT) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tracking, model_uri, data = register_demo_model(tmp)
        paths = list(load_category(data, CATEGORY).test.paths)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = f"mlflow models serve -m {model_uri} --env-manager local --port {port}"
        server = start_server(tracking, model_uri, port, data, tmp / "serve.log")
        try:
            started = time.perf_counter()
            wait_until_up(url, server, tmp / "serve.log")
            startup = time.perf_counter() - started
            first = tree_rss_bytes(server.pid) / MB
            for kind, body, content_type in requests_for(paths, WARMUP):
                seconds, status, error = send(url, body, content_type)
                if status != 200:
                    raise RuntimeError(f"warm-up {kind} request failed ({status}): {error}")
            work = requests_for(paths, requests)
            # the server's whole tree: the CLI, its uvicorn server and workers
            with PeakSampler(lambda: tree_rss_bytes(server.pid), interval_s=0.5) as rss:
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    results = list(pool.map(lambda item: (item[0], *send(url, item[1], item[2])), work))
                wall = time.perf_counter() - start
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    latencies = np.array([seconds for _, seconds, _, _ in results]) * 1000
    errors = [(kind, status, error) for kind, _, status, error in results if status != 200]
    result = {
        "command": command,
        "benchmark": f"benchmarks/bench_serve_load.py --requests {requests} --clients {clients}",
        "requests": requests,
        "clients": clients,
        "kinds": {kind: sum(1 for k, *_ in results if k == kind) for kind in ("png", "path")},
        "errors": len(errors),
        "error_samples": errors[:5],
        "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 1),
                       "p99": round(float(np.percentile(latencies, 99)), 1),
                       "max": round(float(latencies.max()), 1)},
        "throughput_rps": round(requests / wall, 1),
        "wall_seconds": round(wall, 1),
        "startup_seconds": round(startup, 1),
        "rss_mb": {"first": round(first, 1), "after_warmup": round(rss.first / MB, 1),
                   "last": round(rss.last / MB, 1), "max": round(rss.peak / MB, 1), "samples": rss.count},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        "model": "GaussianAD tf_efficientnet_lite0 (package weights), levels 3-4, 64 px",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict) -> None:
    latency, rss = result["latency_ms"], result["rss_mb"]
    print(f"| requests | clients | p50 ms | p99 ms | req/s | errors | RSS MB after warm-up → last (max) |\n"
          f"|---:|---:|---:|---:|---:|---:|---|\n"
          f"| {result['requests']} | {result['clients']} | {latency['p50']} | {latency['p99']} | "
          f"{result['throughput_rps']} | {result['errors']} | {rss['after_warmup']} → {rss['last']} ({rss['max']}) |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    print_table(main(args.requests, args.clients, args.output))
