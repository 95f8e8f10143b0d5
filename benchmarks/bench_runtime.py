"""Per-image cost of each stage of scoring, for each feature runtime, on one fitted GaussianAD model.

    .venv/bin/python benchmarks/bench_runtime.py MODEL DATA -c CATEGORY [--runtimes torch onnxruntime] \
        [--exported MODEL.onnx] [--images 256] [--batch-size 16] --output benchmarks/results/STEM

For each runtime, in this process, one after the other, on the first --images test images of the category:

  * decode:   read + convert + resize one image (`read_rgb` + `to_tensor`), one thread, ms per image;
              and the thread pool of `image_batches` (what fit and score use), images per second;
  * forward:  `Backbone.extract` of batches of --batch-size images already decoded, ms per image;
  * distances: `score_features` (Mahalanobis per position, map, smoothing, image score), ms per image;
  * predict latency: one image at a time, decode included (`score` of one path), p50 and p99 ms;
  * throughput: `score` of all the paths at --batch-size (decoding overlapped), images per second.

With --exported (a file from `gaussad export MODEL`), a row for the exported graph: the same figures,
where "forward" is the whole graph (backbone, distances, map) and "distances" is empty.

Every figure is the median of the batches (or the listed percentile) after one warm-up batch. The
machine's load average at the start is recorded: on a shared machine timings drift by 10 % or more,
so compare runtimes within one run only. Output: STEM.md and STEM.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gaussad.data import load_category, read_rgb
from gaussad.detectors import load_model
from gaussad.export import ExportedDetector
from gaussad.features import image_batches, to_tensor


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(model_dir: Path, paths: list[Path], runtime: str, batch_size: int) -> dict:
    if runtime == "exported":
        model = ExportedDetector.load(model_dir, progress=False, batch_size=batch_size)
    else:
        model = load_model(model_dir, runtime=runtime, progress=False, batch_size=batch_size)
    size = model.config["image_size"]
    decode_ms = [1000 * timed(lambda p=p: to_tensor(read_rgb(p), size)) for p in paths]
    pool_seconds = timed(lambda: list(image_batches(paths, size, batch_size, torch.device("cpu"))))
    batches = list(image_batches(paths, size, batch_size, torch.device("cpu")))
    model.score_batch(batches[0])  # warm-up
    forward_ms, distance_ms = [], []
    for batch in batches[1:]:
        start = time.perf_counter()
        if runtime == "exported":
            model.score_batch(batch)
            forward_ms.append(1000 * (time.perf_counter() - start) / len(batch))
            continue
        feats = model.backbone.extract(batch)
        middle = time.perf_counter()
        model.score_features(feats)
        forward_ms.append(1000 * (middle - start) / len(batch))
        distance_ms.append(1000 * (time.perf_counter() - middle) / len(batch))
    latency_ms = [1000 * timed(lambda p=p: model.score([p])) for p in paths]
    throughput_seconds = timed(lambda: model.score(paths))
    return {
        "runtime": runtime,
        "decode_ms_per_image_one_thread": round(float(np.median(decode_ms)), 2),
        "decode_images_per_second_thread_pool": round(len(paths) / pool_seconds, 1),
        "forward_ms_per_image": round(float(np.median(forward_ms)), 2),
        "distances_ms_per_image": round(float(np.median(distance_ms)), 2) if distance_ms else None,
        "predict_latency_ms_p50": round(float(np.percentile(latency_ms, 50)), 2),
        "predict_latency_ms_p99": round(float(np.percentile(latency_ms, 99)), 2),
        "throughput_images_per_second": round(len(paths) / throughput_seconds, 1),
    }


COLUMNS = [("decode_ms_per_image_one_thread", "decode ms/img (1 thread)"),
           ("decode_images_per_second_thread_pool", "decode img/s (pool)"),
           ("forward_ms_per_image", "forward ms/img"), ("distances_ms_per_image", "distances ms/img"),
           ("predict_latency_ms_p50", "predict p50 ms"), ("predict_latency_ms_p99", "predict p99 ms"),
           ("throughput_images_per_second", "throughput img/s")]


def markdown(report: dict) -> str:
    lines = [f"# Scoring cost per stage and runtime: `{report['category']}` ({report['n_images']} test images)", "",
             f"{report['machine']}; {report['date']}; load average at start {report['load_average']}; "
             f"batch {report['batch_size']}; model {report['model']}.", "",
             "| runtime | " + " | ".join(title for _, title in COLUMNS) + " |",
             "| --- |" + " ---: |" * len(COLUMNS)]
    for row in report["results"]:
        lines.append(f"| {row['runtime']} | " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
    lines += ["", "Command:", "", "```bash", report["command"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a fitted GaussianAD model folder")
    parser.add_argument("data", type=Path)
    parser.add_argument("-c", "--category", required=True)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--exported", type=Path, help="an exported model (gaussad export) to measure too")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", required=True, help="results stem (STEM.md, STEM.json)")
    args = parser.parse_args(argv)
    paths = list(load_category(args.data, args.category).test.paths)[: args.images]
    report = {"category": args.category, "model": str(args.model), "n_images": len(paths),
              "batch_size": args.batch_size, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                         f"torch {torch.__version__}",
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "command": shlex.join([".venv/bin/python", "benchmarks/bench_runtime.py", *argv]), "results": []}
    for runtime in args.runtimes:
        print(f"[{time.strftime('%H:%M:%S')}] {runtime} ...", flush=True)
        report["results"].append(measure(args.model, paths, runtime, args.batch_size))
    if args.exported:
        print(f"[{time.strftime('%H:%M:%S')}] exported {args.exported} ...", flush=True)
        report["results"].append(measure(args.exported, paths, "exported", args.batch_size))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
