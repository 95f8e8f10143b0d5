"""Time and memory of GaussianAD's three stages as the number of training images grows.

    python benchmarks/bench_gaussian.py --device cpu --backbone tf_efficientnet_lite0 \
        --weights package:efficientnet-lite0 --image-size 224 --output benchmarks/results/cpu.csv

Stages, each measured on its own for every training-set size N:
  extract  FeatureStore.write(model.backbone, first N training paths, store dir, batch size)
  fit      model.fit_features(store)            (per-level Gaussians, features read back from disk)
  score    model.score(test paths)              (fixed test set, reported per image)

Every (N, stage) measurement runs in a fresh Python process (this script re-run with the hidden
`--worker` flag), so the peak memory of one stage never includes another's. A worker imports,
builds the model, runs one single-image forward pass (warm-up, identical in every worker) and
then takes its baseline; after the stage it reads
  - ru_maxrss (peak resident set size of the process; it includes memory-mapped file pages, e.g.
    the feature store's .npy files, which the kernel can drop under memory pressure),
  - the peak of RssAnon (private anonymous memory: tensors, NumPy arrays, the heap), sampled
    every few milliseconds by a thread, since the kernel keeps no peak of it,
  - on CUDA, torch.cuda.max_memory_allocated().
Training images come from gaussad.demo.write_demo_dataset, written once (for the largest N) into
a cache folder and reused; the first N images are used. Generating them is not timed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import MB, PeakSampler, anon_rss_bytes, max_rss_bytes

HERE = Path(__file__).resolve().parent
DEFAULT_COUNTS = (50, 100, 200, 400, 800, 1600)
STAGES = ("extract", "fit", "score")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- worker: one stage in a fresh process --------------------------------------------------------


def run_worker(args: argparse.Namespace) -> None:
    import torch

    from gaussad.features import FeatureStore
    from gaussad.gaussian import GaussianAD

    job = json.loads(Path(args.worker).read_text())
    stage, config = job["stage"], job["config"]
    cuda = config["device"].startswith("cuda")
    if job["stage"] == "score":
        model = GaussianAD.load(job["model_dir"], device=config["device"], progress=args.progress,
                                batch_size=config["batch_size"])
    else:
        model = GaussianAD(
            backbone=config["backbone"], weights=config["weights"], levels=config["levels"],
            image_size=config["image_size"], spatial=config["spatial"], batch_size=config["batch_size"],
            device=config["device"], progress=args.progress,
        )
    size = config["image_size"]
    model.backbone.extract(torch.zeros(1, 3, size, size))  # warm-up, the same in every worker
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss, base_anon = max_rss_bytes(), anon_rss_bytes()
    base_cuda = torch.cuda.memory_allocated() if cuda else None
    base_cpu, load = cpu_seconds(), os.getloadavg()[0]

    result: dict = {}
    with PeakSampler(anon_rss_bytes, interval_s=0.005) as sampler:  # the kernel keeps no peak of RssAnon
        start = time.perf_counter()
        if stage == "extract":
            paths = job["paths"]
            FeatureStore.write(model.backbone, paths, job["store_dir"], config["batch_size"],
                               progress=args.progress)
        elif stage == "fit":
            model.fit_features(FeatureStore(job["store_dir"]))
        else:
            model.score(job["paths"])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak_rss, cpu = max_rss_bytes(), cpu_seconds() - base_cpu

    result.update(
        seconds=seconds,
        cpu_seconds=cpu,  # user + system time of this process: less sensitive than `seconds` to other load
        load_avg_1m=load,  # the machine's 1-minute load average when the stage started
        images=len(job["paths"]) if "paths" in job else None,
        peak_rss_mb=peak_rss / MB,
        base_rss_mb=base_rss / MB,
        rss_increase_mb=(peak_rss - base_rss) / MB,
        peak_anon_mb=None if sampler.peak is None else sampler.peak / MB,
        anon_increase_mb=None if sampler.peak is None or base_anon is None else (sampler.peak - base_anon) / MB,
        cuda_peak_mb=torch.cuda.max_memory_allocated() / MB if cuda else None,
        cuda_increase_mb=(torch.cuda.max_memory_allocated() - base_cuda) / MB if cuda else None,
        torch_threads=torch.get_num_threads(),
    )
    if stage == "extract":
        store = Path(job["store_dir"])
        store_bytes = sum(f.stat().st_size for f in store.iterdir() if f.is_file())
        result.update(store_mb=store_bytes / MB, store_kb_per_image=store_bytes / 1024 / len(job["paths"]))
    if stage == "fit":
        model.save(job["model_dir"])  # for the score worker; after the measurement
    Path(job["result"]).write_text(json.dumps(result))


# ---- parent: data, one worker per measurement, table ---------------------------------------------


def demo_images(cache: Path, category: str, n_train: int, n_test: int, image_size: int) -> tuple[list[str], list[str]]:
    """Training and test image paths from a cached demo dataset, written if too small or absent.

    Each (category, image size, test-set size) has its own folder in the cache, so changing one
    option never overwrites another's images; a folder with at least n_train images is reused.
    """
    from gaussad.demo import write_demo_dataset

    per_split = math.ceil(n_test / 4)  # test/good + three defect types, ~n_test/4 each
    folder = cache / f"{category}-{image_size}px-test{per_split}x4"
    marker = folder / "dataset.json"
    cached = json.loads(marker.read_text()) if marker.is_file() else {}
    if cached.get("n_train", 0) < n_train:
        print(f"writing demo dataset ({category}, {n_train} training images) to {folder} ...", flush=True)
        start = time.perf_counter()
        marker.unlink(missing_ok=True)
        shutil.rmtree(folder / category, ignore_errors=True)
        write_demo_dataset(folder, seed=0, categories=[category], n_train=n_train, n_test_good=per_split,
                           n_test_per_defect=per_split, image_size=image_size)
        marker.write_text(json.dumps({"n_train": n_train, "n_test_per_split": per_split, "seed": 0}))
        print(f"  done in {time.perf_counter() - start:.0f} s (not part of any stage)", flush=True)
    root = folder / category
    numbered = lambda folder: sorted(folder.glob("*.png"), key=lambda p: int(p.stem))  # noqa: E731  1000.png after 999.png
    train = numbered(root / "train" / "good")[:n_train]
    test = [p for split in sorted((root / "test").iterdir()) for p in numbered(split)][:n_test]
    return [str(p) for p in train], [str(p) for p in test]


def run_stage(stage: str, job: dict, work: Path, args: argparse.Namespace) -> dict:
    """Run one stage in a fresh interpreter; returns the worker's result dict."""
    job_file = work / f"job_{stage}.json"
    job = {**job, "stage": stage, "result": str(work / f"result_{stage}.json")}
    job_file.write_text(json.dumps(job))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)]
    if args.progress:
        command.append("--progress")
    completed = subprocess.run(command, stdout=None if args.progress else subprocess.PIPE,
                               stderr=None if args.progress else subprocess.PIPE, text=True)
    if completed.returncode != 0:
        tail = (completed.stderr or "")[-3000:]
        raise RuntimeError(f"{stage} worker failed with exit code {completed.returncode}:\n{tail}")
    return json.loads(Path(job["result"]).read_text())


def measure_count(n: int, train: list[str], test: list[str], config: dict, args: argparse.Namespace,
                  step: list[int], total: int) -> dict:
    """All stages for N training images, each `--repeats` times in fresh processes."""
    row: dict = {"device": config["device"], "n_train": n, "n_test": len(test)}
    with tempfile.TemporaryDirectory(prefix=f"bench-n{n}-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        job = {"config": config, "store_dir": str(work / "store"), "model_dir": str(work / "model")}
        for stage in STAGES:
            paths = {"extract": train[:n], "score": test}.get(stage)
            runs = []
            for repeat in range(args.repeats):
                step[0] += 1
                label = f" run {repeat + 1}/{args.repeats}" if args.repeats > 1 else ""
                print(f"[{step[0]}/{total}] N={n:<5} {stage:<7} ({len(paths or train[:n])} images){label} ...",
                      end=" ", flush=True)
                if stage == "extract":
                    shutil.rmtree(job["store_dir"], ignore_errors=True)
                runs.append(run_stage(stage, {**job, **({"paths": paths} if paths else {})}, work, args))
                print(progress_summary(stage, runs[-1]), flush=True)
            for key, value in combine_runs(runs).items():
                row[f"{stage}_{key}"] = value
    row["extract_img_per_s"] = n / row["extract_seconds"]
    row["score_ms_per_img"] = 1000 * row["score_seconds"] / len(test)
    for stage in STAGES:
        row.pop(f"{stage}_images", None)
    return row


def combine_runs(runs: list[dict]) -> dict:
    """The fastest run's times; memory as the largest seen over all runs (peaks barely vary)."""
    fastest = min(runs, key=lambda r: r["seconds"])
    combined = dict(fastest)
    for key in fastest:
        if key.endswith("_mb") and all(r.get(key) is not None for r in runs):
            combined[key] = max(r[key] for r in runs)
    if len(runs) > 1:
        combined["seconds_all_runs"] = " ".join(f"{r['seconds']:.3g}" for r in runs)
    return combined


def progress_summary(stage: str, result: dict) -> str:
    parts = [f"{result['seconds']:.1f} s (CPU {result['cpu_seconds']:.1f} s, load {result['load_avg_1m']:.1f})",
             f"peak RSS {result['peak_rss_mb']:.0f} MB (+{result['rss_increase_mb']:.0f})"]
    if result.get("anon_increase_mb") is not None:
        parts.append(f"anon +{result['anon_increase_mb']:.0f} MB")
    if result.get("cuda_peak_mb") is not None:
        parts.append(f"CUDA peak {result['cuda_peak_mb']:.0f} MB")
    if stage == "extract":
        parts.append(f"store {result['store_kb_per_image']:.0f} KiB/img")
    return ", ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    cuda = any(r.get("extract_cuda_peak_mb") is not None for r in rows)
    header = ["device", "N", "extract s", "extract img/s", "extract peak MB", "fit s", "fit peak MB (+ increase)",
              "fit anon MB (+ increase)", "score ms/img", "score peak MB"]
    if cuda:
        header += ["extract CUDA MB", "fit CUDA MB", "score CUDA MB"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        anon = ("n/a" if r.get("fit_peak_anon_mb") is None
                else f"{r['fit_peak_anon_mb']:.0f} (+{r['fit_anon_increase_mb']:.0f})")
        cells = [
            r["device"], str(r["n_train"]), f"{r['extract_seconds']:.1f}", f"{r['extract_img_per_s']:.1f}",
            f"{r['extract_peak_rss_mb']:.0f}", f"{r['fit_seconds']:.1f}",
            f"{r['fit_peak_rss_mb']:.0f} (+{r['fit_rss_increase_mb']:.0f})", anon,
            f"{r['score_ms_per_img']:.1f}", f"{r['score_peak_rss_mb']:.0f}",
        ]
        if cuda:
            cells += [f"{r[f'{s}_cuda_peak_mb']:.0f}" for s in STAGES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
    partial.replace(path)


def machine_summary(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name()}"
    text += f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()[0]:.1f}"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=list(DEFAULT_COUNTS), help="training-set sizes N")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm model name")
    parser.add_argument("--weights", default="package:efficientnet-lite0",
                        help="timm, file:<path>, package:efficientnet-lite0 or none")
    parser.add_argument("--levels", type=int, nargs="+", default=[3, 4, 5, 6, 7], help="feature levels")
    parser.add_argument("--image-size", type=int, default=224, help="backbone input side, px")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--spatial", choices=("shared", "per-location"), default="shared", help="pixel Gaussians")
    parser.add_argument("--device", default=None, help="cpu or cuda; cuda when torch sees a GPU, else cpu")
    parser.add_argument("--n-test", type=int, default=64, help="test images scored in the score stage")
    parser.add_argument("--category", default="weave", help="demo dataset category (weave, brushed, hexnut)")
    parser.add_argument("--demo-size", type=int, default=256, help="side of the generated demo images, px")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache", help="where the demo dataset is kept")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where feature stores are written; the system temp folder if not given")
    parser.add_argument("--output", type=Path, default=None, help="CSV file for the results")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per (N, stage), each in a fresh process; the fastest time is reported")
    parser.add_argument("--progress", action="store_true", help="show the workers' own progress bars")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.counts) < 2:
        parser.error("every count must be at least 2 (a Gaussian needs 2 samples)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    config = {"backbone": args.backbone, "weights": args.weights, "levels": sorted(args.levels),
              "image_size": args.image_size, "spatial": args.spatial, "batch_size": args.batch_size,
              "device": device}
    counts = sorted(set(args.counts))
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    train, test = demo_images(args.cache, args.category, max(counts), args.n_test, args.demo_size)
    print(f"{machine_summary(device)}; {args.backbone} ({args.weights}) levels {config['levels']} at "
          f"{args.image_size} px, spatial {args.spatial}, batch {args.batch_size}, {len(test)} test images",
          flush=True)
    rows: list[dict] = []
    step = [0]
    for n in counts:
        row = measure_count(n, train, test, config, args, step, len(counts) * len(STAGES) * args.repeats)
        row.update(backbone=args.backbone, weights=args.weights, levels=" ".join(map(str, config["levels"])),
                   image_size=args.image_size, spatial=args.spatial, batch_size=args.batch_size,
                   omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""))
        rows.append(row)
        if args.output:
            write_csv(rows, args.output)  # after every N, so an interrupted run keeps what it measured
    print()
    print(markdown_table(rows))
    if args.output:
        print(f"\nCSV: {args.output}")


if __name__ == "__main__":
    main()
