"""The pictures of docs/img/ from a real run: the demo through the scheduled flow, its MLflow and
Prefect pages in headless Chromium.

    make screenshots          # or: .venv/bin/python docs/make_screenshots.py [--out docs/img]

Writes the demo data, starts a real `mlflow server` and `prefect server start`, runs the retrain
flow twice with the repository's params.yaml (`lite0`), the second time with new good images of
one category arriving (so the registry holds a challenger updated from them, promoted or not
through the false-alarm gate), starts `gaussad schedule` so that the deployment exists, then takes
the screenshots with Playwright driving the system's Chromium (`apt-get install chromium`). Takes
about ten minutes on two CPU cores. The run (data, stores, models) stays in outputs/screenshots/,
so `--reuse` takes the pictures again without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CATEGORY = "brushed"  # the category that receives new good images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise SystemExit(f"{url} did not answer within {seconds} s")


def start(stack: ExitStack, command: list[str], env: dict, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    stack.callback(lambda: (os.killpg(process.pid, signal.SIGTERM), process.wait(timeout=60)))
    return process


def run_flows(work: Path, env: dict) -> Path:
    """The retrain flow on the demo data (train, register, promote; no arrivals yet), then three ticks
    of the production loop as batches of new good images of CATEGORY arrive, the last one brighter
    (a lamp changed): monitored, then updated and promoted, then drift."""
    from PIL import Image, ImageEnhance

    from gaussad.demo import write_demo_dataset

    write_demo_dataset(work / "data")
    write_demo_dataset(work / "line", seed=1, categories=[CATEGORY], n_train=45, n_test_good=1, n_test_per_defect=1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(root=str(work / "data"), name="demo")
    params["model"]["updatable"] = True
    params["production"].update(arrivals=str(work / "arrivals"), update_after=20)
    config = work / "params.yaml"
    config.write_text(yaml.safe_dump(params))
    code = ("from gaussad.flows.retrain import retrain; "
            f"retrain({str(work / 'data')!r}, {str(config)!r}, {str(work / 'pipeline')!r}, {str(work / 'cache')!r}, "
            f"production_dir={str(work / 'production')!r})")
    subprocess.run([str(BIN / "python"), "-c", code], env=env, cwd=ROOT, check=True)
    line = sorted((work / "line" / CATEGORY / "train" / "good").iterdir())
    arrivals = work / "arrivals" / CATEGORY
    arrivals.mkdir(parents=True)
    for batch, images in enumerate((line[:15], line[15:30], line[30:])):
        for image in images:
            picture = Image.open(image)
            (ImageEnhance.Brightness(picture.convert("RGB")).enhance(1.25) if batch == 2 else picture).save(
                arrivals / f"{batch}-{image.name}")
        subprocess.run([str(BIN / "python"), "-m", "gaussad.flows.production", "--params", str(config), "--out",
                        str(work / "production")], env=env, cwd=ROOT, check=True)
    subprocess.run([str(BIN / "python"), "-c", code], env=env, cwd=ROOT, check=True)  # all cached, nothing new
    return config


def take(page, url: str, path: Path, wait_for: str, prepare=None, size: tuple[int, int] = (1500, 900)) -> None:
    """A screenshot of `url` at `size` once `wait_for` shows, after `prepare(page)`."""
    page.set_viewport_size({"width": size[0], "height": size[1]})
    page.goto(url)
    page.get_by_text(wait_for).first.wait_for(timeout=60000)
    training = page.get_by_text("Model training")  # MLflow's classic view, not its GenAI pages
    if training.count():
        training.first.click()
        page.get_by_text(wait_for).first.wait_for(timeout=60000)
    close = page.locator("button[aria-label='Close']")  # MLflow's assistant panel, should it open
    if close.count() and close.first.is_visible():
        close.first.click()
    if prepare:
        prepare(page)
    page.wait_for_timeout(2500)  # charts and tables settle
    page.screenshot(path=str(path))
    print(f"wrote {path}")


def metric_columns(page) -> None:
    """The runs table with the pipeline run's category runs shown and the test metrics as columns."""
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the pipeline run's +
    page.get_by_role("button", name="Columns").first.click()
    search, menu = page.get_by_placeholder("Search columns"), page.locator("[data-radix-popper-content-wrapper]")
    for name in ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "model_size_mb", "Dataset", "Source"):
        search.fill(name)
        menu.get_by_text(name, exact=True).first.click()  # ticks the metrics, unticks the two attributes
    page.keyboard.press("Escape")


def newest(prefect: str, kind: str, query: dict, sort: str) -> list[dict]:
    """The flow runs or artifacts that `query` selects on the Prefect server (its REST API), newest first."""
    body = json.dumps({**query, "sort": sort, "limit": 20}).encode()
    request = urllib.request.Request(f"{prefect}/api/{kind}/filter", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def evaluation_pictures(work: Path, out: Path) -> None:
    """What `evaluate` drew in the run: brushed's ROC (thresholds marked) and score histogram, and
    one overlay per defect type of every demo category, side by side in one picture per category."""
    from PIL import Image

    evaluation = work / "pipeline" / CATEGORY / "evaluation"
    for name in ("roc.png", "histogram.png"):
        shutil.copy(evaluation / name, out / f"demo_{CATEGORY}_{name}")
    for category in sorted(p.name for p in (work / "pipeline").iterdir() if (p / "evaluation").is_dir()):
        overlays = sorted((work / "pipeline" / category / "evaluation" / "overlays").glob("*_000.png"))
        pictures = [Image.open(path).convert("RGB") for path in overlays if not path.name.startswith("good")]
        canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), "white")
        for index, picture in enumerate(pictures):
            canvas.paste(picture, (0, sum(p.height for p in pictures[:index])))
        canvas = canvas.resize((900, round(canvas.height * 900 / canvas.width)), Image.Resampling.LANCZOS)
        canvas.save(out / f"demo_{category}_overlays.png", optimize=True)
        print(f"wrote {out / f'demo_{category}_overlays.png'}")


def screenshots(mlflow: str, prefect: str, out: Path, profile: Path) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(mlflow)
    experiment = client.get_experiment_by_name("gaussad").experiment_id
    category_run = next(run for run in client.search_runs([experiment], f"tags.category = '{CATEGORY}'")
                        if "kind" not in run.data.tags)  # the pipeline's nested run, not an update's
    watched = f"tags.kind = 'monitoring' and tags.registered_model = 'gaussad-demo-{CATEGORY}'"
    monitoring = client.search_runs([experiment], watched)[0]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium: apt-get install chromium")
    base = f"{mlflow}/#/experiments/{experiment}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, viewport={"width": 1500, "height": 900},
            args=["--no-sandbox", "--disable-gpu"])
        # MLflow's assistant panel closed, the pipeline run's category runs shown under it
        browser.add_init_script(f"""localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
            localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
            localStorage.setItem('MLflowLocalStorage-1.1-ExperimentView-{experiment}-expandRows', 'true');""")
        page = browser.new_page()
        take(page, f"{base}/runs", out / "mlflow_runs.png", "demo-pipeline", metric_columns)
        take(page, f"{base}/runs/{category_run.info.run_id}", out / "mlflow_category_run.png", "image_auroc")
        take(page, f"{base}/runs/{category_run.info.run_id}/artifacts", out / "mlflow_artifacts.png", "evaluation")
        # tall: every version's tags, the loop's lineage and the gate's counts among them
        take(page, f"{mlflow}/#/models/gaussad-demo-{CATEGORY}", out / "mlflow_registry.png", "champion",
             size=(1500, 2300))
        take(page, f"{base}/runs/{monitoring.info.run_id}/model-metrics", out / "mlflow_monitoring.png", "alarm_rate")
        take(page, f"{prefect}/runs", out / "prefect_runs.png", "gaussad-retrain")
        cached_run = newest(prefect, "flow_runs", {"flows": {"name": {"any_": ["gaussad-train"]}}}, "START_TIME_DESC")
        take(page, f"{prefect}/runs/flow-run/{cached_run[0]['id']}", out / "prefect_train_run.png", "Cached")
        tables = newest(prefect, "artifacts", {"artifacts": {"key": {"any_": ["gaussad-production"]}}}, "CREATED_DESC")
        drifted = next(table for table in tables if "**yes**" in table["data"])  # the tick of the brighter images
        take(page, f"{prefect}/artifacts/artifact/{drifted['id']}", out / "prefect_production_artifact.png",
             "gaussad-demo-brushed", size=(2300, 600))  # the table is wide
        take(page, f"{prefect}/deployments", out / "prefect_deployments.png", "scheduled")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "screenshots",
                        help="where the run's data, servers' stores and models go (what the pictures show)")
    parser.add_argument("--reuse", action="store_true", help="take the pictures of an earlier run in --work")
    args = parser.parse_args()
    from gaussad.output_folders import check_output_folder, claim_output_folder

    work = args.work.resolve()
    if not args.reuse:
        check_output_folder(work, "screenshots run")  # a folder of anything else is refused, never deleted
        shutil.rmtree(work, ignore_errors=True)
    claim_output_folder(work, "screenshots run")
    with ExitStack() as stack:
        mlflow, prefect_port = f"http://127.0.0.1:{free_port()}", free_port()
        prefect = f"http://127.0.0.1:{prefect_port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow, "PREFECT_HOME": str(work / "prefect"),
               "PREFECT_API_URL": f"{prefect}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        start(stack, [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                      "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1",
                      "--port", mlflow.rsplit(":", 1)[1], "--workers", "1"], env, work / "mlflow.log")
        start(stack, [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
              env, work / "prefect.log")
        wait_healthy(f"{mlflow}/health")
        wait_healthy(f"{prefect}/api/health")
        config = work / "params.yaml" if args.reuse else run_flows(work, env)
        start(stack, [str(BIN / "gaussad"), "schedule", "--cron", "0 3 * * *", "--data", str(work / "data"),
                      "--params", str(config), "--out", str(work / "pipeline"), "--cache-dir", str(work / "cache"),
                      "--production-out", str(work / "production")], env, work / "schedule.log")
        time.sleep(20)  # the deployment registers itself
        screenshots(mlflow, prefect, args.out, work / "chromium")
    evaluation_pictures(work, args.out)
    print(f"the run behind the pictures is in {work}")


if __name__ == "__main__":
    main()
