"""The whole Prefect flow on generated data the size of MVTec AD, with the seconds of every stage.

    .venv/bin/python benchmarks/bench_mvtec_sized.py --data /tmp/mvtec-sized --out /tmp/mvtec-sized-run \
        [--image-size 1024] [--scale 1.0] [--params params.yaml] [--output benchmarks/results/mvtec_sized]

1. Writes the data once (kept and reused when --data already holds it): 15 categories named as
   MVTec AD's, each with MVTec AD's own counts of training, good test and defective test images
   (3 629 / 467 / 1 258: 5 354 PNGs), at --image-size px (MVTec AD's are mostly 1024). The scenes
   are the demo's three kinds (weave, brushed, hexnut) with a seed per category, written by a
   process per core. --scale shrinks every count (e.g. 0.02 for a quick check on a CPU).
2. Runs `gaussad/flows/train.py` on it (the params' model block: `lite0` by default) with a fresh task cache,
   in its own process, on the GPU when there is one.
3. Prints and writes (STEM.md, STEM.json): the generation and flow wall seconds, and per category
   the flow's timings.json (train and test extraction = decode + forward, fit, score) and image AUROC.

The issue's target on one H100: all 15 categories fitted and evaluated in at most 60 s of flow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# MVTec AD: category -> (train/good, test/good, test defective)
MVTEC_COUNTS = {
    "bottle": (209, 20, 63), "cable": (224, 58, 92), "capsule": (219, 23, 109), "carpet": (280, 28, 89),
    "grid": (264, 21, 57), "hazelnut": (391, 40, 70), "leather": (245, 32, 92), "metal_nut": (220, 22, 93),
    "pill": (267, 26, 141), "screw": (320, 41, 119), "tile": (230, 33, 84), "toothbrush": (60, 12, 30),
    "transistor": (213, 60, 40), "wood": (247, 19, 60), "zipper": (240, 32, 119),
}
SCENES = ("weave", "brushed", "hexnut")  # the demo's kinds, in turn
DEFECT_TYPES = 3  # the demo draws three defect types per category


def write_category(root: Path, number: int, name: str, counts: tuple[int, int, int], image_size: int,
                   scale: float) -> None:
    from gaussad.demo import write_demo_dataset

    n_train, n_good, n_defective = (max(2, round(count * scale)) for count in counts)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        scene = SCENES[number % len(SCENES)]
        write_demo_dataset(tmp, seed=number, categories=[scene], n_train=n_train, n_test_good=n_good,
                           n_test_per_defect=max(1, round(n_defective / DEFECT_TYPES)), image_size=image_size)
        os.replace(Path(tmp) / scene, root / name)


def write_data(root: Path, image_size: int, scale: float) -> float:
    """The data set under `root` (skipped when all its categories are there); seconds taken."""
    if all((root / name / "test").is_dir() for name in MVTEC_COUNTS):
        return 0.0
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        jobs = [pool.submit(write_category, root, number, name, counts, image_size, scale)
                for number, (name, counts) in enumerate(MVTEC_COUNTS.items()) if not (root / name / "test").is_dir()]
        for job in jobs:
            job.result()
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="where the generated data set is (or goes)")
    parser.add_argument("--out", type=Path, required=True, help="the flow's output folder (replaced)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of MVTec AD's image counts")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "mvtec_sized")
    args = parser.parse_args(argv)

    generation = write_data(args.data, args.image_size, args.scale)
    n_images = sum(1 for _ in args.data.rglob("*.png")) - sum(1 for _ in args.data.rglob("ground_truth/*/*.png"))
    print(f"data: {args.data} ({n_images} images at {args.image_size} px; generated in {generation:.1f} s)", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="mvtec-sized-cache-") as cache:
        command = [sys.executable, "-m", "gaussad.flows.train", "--params", str(args.params), "--data",
                   str(args.data), "--out", str(args.out), "--cache-dir", cache]
        started = time.perf_counter()
        returncode = subprocess.run(command, cwd=REPO).returncode
        flow_seconds = time.perf_counter() - started
    if returncode != 0:
        print(f"the flow failed (exit {returncode})", file=sys.stderr)
        return returncode

    run = json.loads((args.out / "run.json").read_text())
    metrics = json.loads((args.out / "metrics.json").read_text())["categories"]
    report = {"data": str(args.data), "image_size": args.image_size, "n_images": n_images, "scale": args.scale,
              "generation_seconds": round(generation, 1), "flow_wall_seconds": round(flow_seconds, 1),
              "flow_seconds_inside": run["seconds"], "device": _device(), "categories": {
                  name: {**timing, "image_auroc": metrics[name].get("image_auroc")}
                  for name, timing in run["timings"].items()}}
    stages = ["extract_train_seconds", "fit_seconds", "extract_test_seconds", "score_seconds"]
    lines = [f"# The flow on MVTec-AD-sized generated data ({n_images} images at {args.image_size} px)", "",
             f"{report['device']}; flow {report['flow_wall_seconds']} s wall ({run['seconds']} s inside the flow); "
             f"data generated in {report['generation_seconds']} s (0: reused).", "",
             "| category | train | test | " + " | ".join(s.replace("_seconds", " s") for s in stages)
             + " | image AUROC |",
             "| --- | ---: | ---: |" + " ---: |" * (len(stages) + 1)]
    for name, row in report["categories"].items():
        cells = [str(row.get(stage, "")) for stage in stages]
        lines.append(f"| {name} | {row['n_train_images']} | {row['n_test_images']} | " + " | ".join(cells)
                     + f" | {row['image_auroc']:.3f} |")
    lines += ["", "Command:", "", "```bash", " ".join([".venv/bin/python", "benchmarks/bench_mvtec_sized.py", *argv]),
              "```", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs"
    return f"CPU only, {os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
