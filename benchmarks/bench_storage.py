"""Disk use of a pipeline run: the run folder, the flows' task cache and the MLflow store, after a
first tracked run, after a second, unchanged one (what a schedule does every night), after a third
with another model (`model.seed` changed: new versions), and after `gaussad prune --keep 1` and
`mlflow gc` (back to one version per category).

    .venv/bin/python benchmarks/bench_storage.py [--data DIR] [--output benchmarks/results/storage.json]

The train flow (gaussad.flows.train, params.yaml's model: `lite0`) runs twice with tracking to a
local MLflow store (SQLite and an artifact folder) in a temporary folder, on the demo data unless
--data is given. Sizes are bytes on disk as `du` counts them, in MB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def megabytes(path: Path) -> float:
    """Disk use of `path` (a file or a folder), as `du -s` counts it."""
    if not path.exists():
        return 0.0
    done = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return round(int(done.stdout.split()[0]) / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="dataset in MVTec AD layout (default: a fresh demo dataset)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "storage.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gaussad-storage-") as tmp:
        tmp = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        from gaussad.demo import write_demo_dataset
        from gaussad.flows.train import train

        data = args.data.resolve() if args.data else tmp / "data"
        if args.data is None:
            write_demo_dataset(data, seed=0)  # the demo data data.dvc pins
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        params["model"]["seed"] = 1  # another random channel subset: another model
        (tmp / "params-seed1.yaml").write_text(yaml.safe_dump(params))
        runs = []
        for label, config in (("first run", "params.yaml"), ("second run, nothing changed", "params.yaml"),
                              ("third run, model.seed 1", "params-seed1.yaml")):
            out = tmp / f"out-{len(runs)}"
            start = time.perf_counter()
            summary = train(str(data), None, str(tmp / config), str(out), str(tmp / "cache"), track=True)
            categories = sorted(summary["tasks"])
            runs.append({
                "run": label, "seconds": round(time.perf_counter() - start, 1),
                "new_versions": summary.get("new_versions", []),
                "run_folder_mb": megabytes(out),
                "model_folder_mb": {c: megabytes(out / c / "model") for c in categories},
                "evaluation_mb": {c: megabytes(out / c / "evaluation") for c in categories},
                "task_cache_mb": megabytes(tmp / "cache"),
                "mlflow_artifacts_mb": megabytes(tmp / "artifacts"),  # beside the database (ensure_experiment)
                "mlflow_database_mb": megabytes(tmp / "mlflow.db"),
            })
            print(json.dumps(runs[-1]))
        names = sorted(summary["registered"].values())
        prune = [str(Path(sys.executable).parent / "gaussad"), "prune", *[n.rsplit("/", 1)[0] for n in names],
                 "--keep", "1"]
        print(subprocess.run(prune, check=True, capture_output=True, text=True).stdout)
        store = os.environ["MLFLOW_TRACKING_URI"]
        gc = [str(Path(sys.executable).parent / "mlflow"), "gc", "--backend-store-uri", store]
        subprocess.run(gc, check=True, capture_output=True)
        runs.append({"run": "after gaussad prune --keep 1 and mlflow gc", "prune": prune[1:], "gc": gc[1:],
                     "mlflow_artifacts_mb": megabytes(tmp / "artifacts"),
                     "mlflow_database_mb": megabytes(tmp / "mlflow.db")})
        print(json.dumps(runs[-1]))
    result = {"data": str(args.data or "demo data (seed 0)"), "params": "params.yaml", "runs": runs,
              "command": "python benchmarks/bench_storage.py" + (f" --data {args.data}" if args.data else ""),
              "date": time.strftime("%Y-%m-%d")}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
