"""Flow overhead: the demo categories through the Prefect flow vs the same work through the library.

    .venv/bin/python benchmarks/bench_flow_overhead.py [--data DIR]

Library: per category the params' detector fit + evaluate (what `gaussad demo` does). Flow:
gaussad/flows/train.py with an empty task cache, timed from the call to its return (the server start-up
reported apart), then again with the cache full. Same params (params.yaml), same process, one after the other.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from gaussad.data import list_categories, load_category
from gaussad.demo import write_demo_dataset
from gaussad.detectors import model_spec
from gaussad.evaluate import evaluate
from gaussad.flows.train import train

ROOT = Path(__file__).resolve().parents[1]


def library_seconds(data: Path, params: dict, out: Path) -> float:
    spec = model_spec(params)  # the detector the flow trains: the same settings
    start = time.perf_counter()
    for name in list_categories(data):
        category = load_category(data, name)
        model = spec.build(progress=False).fit(category.train, holdout=spec.holdout)
        evaluate(model, category, out / name)
        model.save(out / name / "model")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset (default: a fresh demo dataset)")
    args = parser.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or tmp / "data"
        if args.data is None:
            write_demo_dataset(data, seed=0)  # the demo data data.dvc pins
        library = library_seconds(data, params, tmp / "library")
        runs = []
        for label in ("flow, empty cache", "flow, full cache"):
            start = time.perf_counter()
            summary = train(str(data), None, str(ROOT / "params.yaml"), str(tmp / "flow"), str(tmp / "cache"))
            runs.append((label, time.perf_counter() - start, summary["seconds"]))
    print(f"| path | wall s | inside the flow s |\n|---|---:|---:|\n| library (fit + evaluate) | {library:.1f} | |")
    for label, wall, inside in runs:
        print(f"| {label} | {wall:.1f} | {inside:.1f} |")


if __name__ == "__main__":
    main()
