"""The production loop tick by tick on a simulated line: good images arrive, then the lighting changes.

    python benchmarks/bench_loop.py [--category brushed] [--batch 40] [--out benchmarks/results/loop.json]

Fits `lite0` with `updatable` on a demo category (half the training images held out), registers it
as the first champion in a local MLflow store, then runs one tick of gaussad.production.watch per
batch of arrivals: two batches of good images as they were, then two of good images 25 % brighter
(a lamp changed). Per tick: the verdict, what the loop did, the gate's counts, the seconds, and the
champion's false-alarm rate afterwards on good images of the current lighting that no model saw.
A last tick with no new image shows that nothing is done then.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance

import mlflow
from gaussad.data import load_category
from gaussad.demo import write_demo_dataset
from gaussad.gaussian import GaussianAD
from gaussad.production import PRODUCTION, watch
from gaussad.registry import promote, register_model
from gaussad.tracking import ensure_experiment

ROOT = Path(__file__).resolve().parents[1]
NAME = "gaussad-bench-{category}"


def brighter(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    for path in paths:
        ImageEnhance.Brightness(Image.open(path).convert("RGB")).enhance(1.25).save(folder / path.name)
    return sorted(folder.iterdir())


def false_alarm_rate(name: str, images: list[Path]) -> float:
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().model
    model.progress = False
    return float((model.score(images).image >= model.decision_threshold).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="brushed")
    parser.add_argument("--n-train", type=int, default=80)
    parser.add_argument("--batch", type=int, default=40, help="arrivals per tick")
    parser.add_argument("--update-after", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loop.json")
    args = parser.parse_args()
    name = NAME.format(category=args.category)
    settings = PRODUCTION.validate({"update_after": args.update_after})
    with tempfile.TemporaryDirectory(prefix="gaussad-bench-loop-") as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        write_demo_dataset(tmp / "data", categories=[args.category], n_train=args.n_train, n_test_good=20,
                           n_test_per_defect=5)
        write_demo_dataset(tmp / "line", seed=1, categories=[args.category], n_train=4 * args.batch + 40,
                           n_test_good=1, n_test_per_defect=1)
        line = sorted((tmp / "line" / args.category / "train" / "good").iterdir())
        batches = [line[:args.batch], line[args.batch:2 * args.batch],
                   brighter(line[2 * args.batch:3 * args.batch], tmp / "bright3"),
                   brighter(line[3 * args.batch:4 * args.batch], tmp / "bright4")]
        check = {"as they were": line[4 * args.batch:], "brighter": brighter(line[4 * args.batch:], tmp / "check")}

        category = load_category(tmp / "data", args.category)
        started = time.perf_counter()
        model = GaussianAD.from_preset("lite0", updatable=True, progress=False).fit(category.train, holdout=0.5)
        fit_seconds = time.perf_counter() - started
        model_dir = model.save(tmp / "model")
        with mlflow.start_run(experiment_id=ensure_experiment("bench-loop", uri)):  # artifacts beside the store
            register_model(model_dir, "bench", args.category, str(tmp / "data"), {}, mlflow.MlflowClient(uri))
        promote(name, uri=uri)
        arrivals = tmp / "arrivals" / args.category
        arrivals.mkdir(parents=True)
        ticks = []
        for index, batch in enumerate([*batches, []]):
            for path in batch:
                shutil.copy(path, arrivals / f"{index}-{path.name}")
            started = time.perf_counter()
            tick = watch(name, arrivals, settings, tmp / "production", "bench-loop", uri, holdout=0.5)
            seconds = time.perf_counter() - started
            lighting = "as they were" if index < 2 else "brighter"
            record = {k: v for k, v in vars(tick).items() if k != "monitoring_run"}
            ticks.append({"tick": index + 1, "arrived": f"{len(batch)} {lighting}" if batch else "nothing",
                          "seconds": round(seconds, 1), **record,
                          "champion_after": str(mlflow.MlflowClient(uri).get_registered_model(name)
                                                .aliases["champion"]),
                          "champion_false_alarm_rate": {k: false_alarm_rate(name, v) for k, v in check.items()}})
            print(json.dumps(ticks[-1]), flush=True)
    result = {"command": " ".join(["python", "benchmarks/bench_loop.py", *sys.argv[1:]]),
              "category": args.category, "preset": "lite0 (updatable)", "n_train": args.n_train,
              "fit_seconds": round(fit_seconds, 1), "settings": settings, "ticks": ticks,
              "check_images": {k: len(v) for k, v in check.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
