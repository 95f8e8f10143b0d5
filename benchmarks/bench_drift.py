"""Drift watch on real shifts of the demo images: how many images until `monitor` says drift, and how
often it says so on unshifted images.

    python benchmarks/bench_drift.py [--category brushed] [--out benchmarks/results/drift.json]

Fits `lite0` on a demo category's training images (half held out: the normal evidence), then scores
streams of its good test images: unshifted, brighter (x1.1, x1.25), blurred (σ 1 and 2 px), and the
defective test images. For each stream: the fewest images (in steps of 5) whose test says drift at
alpha 0.01. False drift alarms: 1 000 windows of 10 unshifted images drawn at random (each window
without repeats), the share that drifts, against alpha.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from gaussad.data import load_category
from gaussad.demo import write_demo_dataset
from gaussad.gaussian import GaussianAD
from gaussad.monitoring import ALPHA, monitor

ROOT = Path(__file__).resolve().parents[1]
SHIFTS = {
    "brighter x1.1": lambda image: ImageEnhance.Brightness(image).enhance(1.1),
    "brighter x1.25": lambda image: ImageEnhance.Brightness(image).enhance(1.25),
    "blur 1 px": lambda image: image.filter(ImageFilter.GaussianBlur(1)),
    "blur 2 px": lambda image: image.filter(ImageFilter.GaussianBlur(2)),
}


def images_until_drift(model: GaussianAD, scores: np.ndarray, map_means: np.ndarray, step: int = 5) -> int | None:
    """The fewest images of the stream (a multiple of `step`) whose test says drift; None if never."""
    normal = model.fit_info["normal_image_scores"]
    for n in range(step, len(scores) + 1, step):
        report = monitor(scores[:n], normal, model.decision_threshold, map_means=map_means[:n],
                         normal_map_means=model.fit_info["normal_map_means"])
        if report["drift"]:
            return n
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="brushed")
    parser.add_argument("--n-train", type=int, default=120)
    parser.add_argument("--n-good", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "drift.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gaussad-bench-drift-") as tmp:
        root = Path(tmp)
        write_demo_dataset(root / "data", categories=[args.category], n_train=args.n_train, n_test_good=args.n_good,
                           n_test_per_defect=20)
        category = load_category(root / "data", args.category)
        model = GaussianAD.from_preset("lite0", progress=False).fit(category.train, holdout=0.5)
        good = [p for p, label in zip(category.test.paths, category.test.labels) if not label]
        defective = [p for p, label in zip(category.test.paths, category.test.labels) if label]
        streams = {"unshifted": good[:100], "defective": defective}
        for name, shift in SHIFTS.items():
            folder = root / name.replace(" ", "_")
            folder.mkdir()
            for path in good[:100]:
                shift(Image.open(path).convert("RGB")).save(folder / path.name)
            streams[name] = sorted(folder.iterdir())
        results = {}
        for name, paths in streams.items():
            scored = model.score(paths)
            results[name] = {"n_images": len(paths),
                             "images_until_drift": images_until_drift(model, scored.image, scored.maps.mean((1, 2)))}
        unshifted = model.score(good)
        rng = np.random.default_rng(0)
        windows = [rng.choice(len(good), 10, replace=False) for _ in range(1000)]
        drifted = sum(monitor(unshifted.image[w], model.fit_info["normal_image_scores"], model.decision_threshold,
                              map_means=unshifted.maps.mean((1, 2))[w],
                              normal_map_means=model.fit_info["normal_map_means"])["drift"] for w in windows)
    result = {
        "command": " ".join(["python", "benchmarks/bench_drift.py", *sys.argv[1:]]),
        "category": args.category, "preset": "lite0", "n_held_out_normal": len(model.fit_info["normal_image_scores"]),
        "alpha": ALPHA, "streams": results,
        "false_drift_alarms": {"windows": len(windows), "window_size": 10, "drifted": int(drifted),
                               "share": drifted / len(windows)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
