"""Updating a model with new images against fitting it again on all of them: time and peak memory.

    python benchmarks/bench_update.py --old 1000 --new 1000 [--image-size 224] [--out benchmarks/results/update.json]

Writes a demo category with old + new defect-free images (the demo generator, seed 0), fits the
`lite0` preset with `updatable` on the old ones and saves it, then, each in a fresh process so that
its peak memory is its own:
  refit:  `lite0` (updatable) fitted on old + new, as a retrain from scratch must;
  update: the saved model loaded and updated with the new images (`GaussianAD.update`).
Reports each step's time (the fit or update alone, and its whole process), its peak RSS, the
folder sizes with and without the sums, and both models' image AUROC on the demo test images (the
two hold out different images for their thresholds, so their Gaussians see different images; with
no hold-out they are equal: tests/test_gaussian_updates.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_step(step: str, work: Path, args: argparse.Namespace) -> dict:
    """One step in a process of its own: its wall time (with the imports and the model's loading)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--step", step, "--work", str(work), "--old", str(args.old),
                    "--new", str(args.new), "--image-size", str(args.image_size)], check=True)
    return {"process_seconds": round(time.perf_counter() - started, 1)}


def step(name: str, work: Path, args: argparse.Namespace) -> None:
    import numpy as np

    from gaussad.data import load_category
    from gaussad.gaussian import GaussianAD

    category = load_category(work / "data", "weave")
    paths = category.train.paths
    old, new = paths[:args.old], paths[args.old:args.old + args.new]
    settings = dict(image_size=args.image_size, updatable=True, progress=False)
    started = time.perf_counter()
    if name == "base":
        GaussianAD.from_preset("lite0", **settings).fit(old).save(work / "base")
        GaussianAD.from_preset("lite0", **{**settings, "updatable": False}).fit(old).save(work / "plain")
        return
    if name == "refit":
        model = GaussianAD.from_preset("lite0", **settings).fit(old + new)
    else:
        model = GaussianAD.load(work / "base", progress=False).update(new)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: this process's own peak
    np.save(work / f"{name}_scores.npy", model.score(category.test.paths).image)
    (work / f"{name}.json").write_text(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}))


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=int, default=1000)
    parser.add_argument("--new", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "update.json")
    parser.add_argument("--step", choices=["base", "refit", "update"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        return step(args.step, args.work, args)

    import numpy as np

    from gaussad.data import load_category
    from gaussad.demo import write_demo_dataset
    from gaussad.metrics import image_auroc

    with tempfile.TemporaryDirectory(prefix="gaussad-bench-update-") as tmp:
        work = Path(tmp)
        write_demo_dataset(work / "data", categories=["weave"], n_train=args.old + args.new, n_test_good=100,
                           n_test_per_defect=30)  # 190 test images: AUROC steps of 1/9 000
        base = run_step("base", work, args)
        refit = run_step("refit", work, args)
        update = run_step("update", work, args)
        labels = load_category(work / "data", "weave").test.labels
        auroc = {name: round(image_auroc(labels, np.load(work / f"{name}_scores.npy")), 4)
                 for name in ("refit", "update")}
        result = {
            "command": " ".join(["python", "benchmarks/bench_update.py", *sys.argv[1:]]),
            "old_images": args.old, "new_images": args.new, "image_size": args.image_size, "preset": "lite0",
            "refit": {**refit, **json.loads((work / "refit.json").read_text())},
            "update": {**update, **json.loads((work / "update.json").read_text())},
            "base_fit": base,
            "folder_mb": {"updatable": folder_mb(work / "base"), "plain": folder_mb(work / "plain")},
            "image_auroc": auroc,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
