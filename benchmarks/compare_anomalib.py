"""gaussad against anomalib's PaDiM and PatchCore on one MVTec-layout category, same backbone and weights.

    .venv/bin/python benchmarks/compare_anomalib.py DATA -c CATEGORY [--presets lite0 ...] \
        [--config-name NAME "GAUSSAD FLAGS" ...] [--anomalib padim patchcore mhpatchcore] \
        --output benchmarks/results/STEM

The harness, run in gaussad's virtualenv. Every tool runs in its own process, one after the other,
so its wall time and peak memory are its own:

  * gaussad: the real command line, `gaussad fit DATA -c CAT -o M <flags>` then
    `gaussad evaluate M DATA -c CAT -o E` (two processes: wall = the sum, peak RSS = the larger);
    a preset P gives the flags `--preset P`; `--config-name NAME "FLAGS"` any other flags (of them,
    --runtime, --device and --batch-size go to evaluate too);
  * anomalib 2.x PaDiM / PatchCore: run_anomalib.py, in the interpreter of a separate virtualenv
    (`--anomalib-python`, default .venv-compare/bin/python), so that anomalib's pins never touch the
    project's environment. It builds the model on timm `tf_efficientnet_lite0` with the weights
    gaussad's `lite0` preset uses, and brings back the raw scores and maps (see its docstring).

All metrics are computed here by gaussad's own functions (gaussad.metrics: image AUROC, pixel AUROC,
AUPRO@0.3) from each tool's raw image scores and maps at the model's image size, with the masks
resized to it by nearest neighbour, exactly as `gaussad evaluate` does. So the tools differ only in
their scores, not in how they are judged. Pixel metrics need `ground_truth/` masks.

Wall seconds are those of the whole process (start-up and imports included). Peak RSS is
`ru_maxrss` of the process from `os.wait4` (as /usr/bin/time -v reports it), and the sampled peak of
the sum over its process tree (0.2 s period). anomalib runs with `num_workers=0` by default, as
gaussad does on a CPU, so the two agree.

Output: STEM.md (a Markdown table plus the settings, by compare_report.py) and STEM.json
(everything, per tool).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare_report import NOTES, fmt, git_state, markdown
from memory import MB, PeakSampler, tree_rss_bytes
from run_anomalib import DEFAULT_LAYERS, NORMALIZATIONS

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().with_name("run_anomalib.py")
DEFAULT_ANOMALIB_PYTHON = REPO / ".venv-compare" / "bin" / "python"


# ----------------------------------------------------------------------------------------------
# Measuring a child process
# ----------------------------------------------------------------------------------------------

def run_measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` (output to `log_path`); wall seconds, ru_maxrss and sampled tree peak of RSS."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with PeakSampler(lambda: tree_rss_bytes(proc.pid), interval_s=0.2) as tree:
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": shlex.join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / MB, 1),  # ru_maxrss is in KiB on Linux
        "peak_tree_rss_mb": round(tree.peak / MB, 1),
        "load_average_at_start": round(load, 2),
        "log": str(log_path),
    }


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------
# gaussad through its command line
# ----------------------------------------------------------------------------------------------

def gaussad_command() -> list[str]:
    script = Path(sys.executable).parent / "gaussad"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from gaussad.cli import main; main()"]


def runtime_flags(flags: list[str]) -> list[str]:
    """The flags of `flags` that say how a model runs (--runtime, --device, --batch-size), which
    evaluate takes too: a configuration runs the same way in both processes."""
    taken = []
    for flag, value in zip(flags, flags[1:]):
        if flag in ("--runtime", "--device", "--batch-size"):
            taken += [flag, value]
    return taken


def run_gaussad(name: str, flags: list[str], data: Path, category: str, work: Path, env: dict) -> dict:
    model, evaluation = work / f"gaussad-{name}-model", work / f"gaussad-{name}-eval"
    base = gaussad_command()
    fit = run_measured([*base, "fit", str(data), "-c", category, "-o", str(model), "--quiet", *flags],
                       work / f"gaussad-{name}-fit.log", env)
    if fit["returncode"] != 0:
        return {"tool": "gaussad", "config": name, "flags": shlex.join(flags), "fit": fit,
                "error": f"gaussad fit failed:\n{_tail(fit['log'])}"}
    ev = run_measured([*base, "evaluate", str(model), str(data), "-c", category, "-o", str(evaluation), "--quiet",
                       *runtime_flags(flags)], work / f"gaussad-{name}-evaluate.log", env)
    row = {"tool": "gaussad", "config": name, "flags": shlex.join(flags), "fit": fit, "evaluate": ev,
           "wall_s": round(fit["wall_s"] + ev["wall_s"], 2),
           "peak_rss_mb": max(fit["peak_rss_mb"], ev["peak_rss_mb"]),
           "peak_tree_rss_mb": max(fit["peak_tree_rss_mb"], ev["peak_tree_rss_mb"]),
           "model_folder_mb": round(sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / MB, 2)}
    if ev["returncode"] != 0:
        row["error"] = f"gaussad evaluate failed:\n{_tail(ev['log'])}"
        return row
    metrics = json.loads((evaluation / "metrics.json").read_text())
    config = json.loads((model / "config.json").read_text())
    row.update(image_auroc=metrics.get("image_auroc"), pixel_auroc=metrics.get("pixel_auroc"),
               aupro=metrics.get("aupro"), n_test_images=metrics.get("n_test_images"),
               settings={k: config.get(k) for k in ("backbone", "weights", "levels", "pixel_levels", "image_size",
                                                    "reduction", "variance", "spatial", "image_score",
                                                    "smoothing") if k in config},
               # inside the processes: train features (decode + forward), Gaussians + held-out thresholds,
               # test scoring (decode + forward + distances); the rest of the wall time is start-up,
               # validation, saving, metrics and plots
               stage_seconds={"extract_train": config.get("extract_seconds"), "fit": config.get("fit_seconds"),
                              "score_test": metrics.get("score_seconds")})
    return row


# ----------------------------------------------------------------------------------------------
# anomalib, in the compare venv
# ----------------------------------------------------------------------------------------------

def run_anomalib_tool(model_name: str, args: argparse.Namespace, work: Path, env: dict) -> dict:
    out = work / f"anomalib-{model_name}"
    model_flags = {
        "padim": ["--layers", *args.padim_layers, "--n-features", str(args.padim_n_features)],
        "patchcore": ["--layers", *args.patchcore_layers, "--coreset-ratio", str(args.coreset_ratio),
                      "--num-neighbors", str(args.num_neighbors)],
        "mhpatchcore": ["--layers", *args.patchcore_layers, "--memory-bank-size", str(args.memory_bank_size),
                        "--local-coreset-size", str(args.local_coreset_size), "--pca-variance-ratio",
                        str(args.pca_variance_ratio), "--covariance-shrinkage", str(args.covariance_shrinkage),
                        "--num-neighbors", str(args.num_neighbors)],
    }[model_name]
    cmd = [str(args.anomalib_python), str(RUNNER), model_name, str(args.data), "-c", args.category,
           "--out", str(out), "--image-size", str(args.image_size), *model_flags,
           "--batch-size", str(args.anomalib_batch_size), "--workers", str(args.anomalib_workers),
           "--seed", str(args.seed), "--normalization", args.anomalib_normalization]
    if args.save_maps:
        cmd.append("--save-maps")
    run = run_measured(cmd, work / f"anomalib-{model_name}.log", env)
    row = {"tool": f"anomalib {model_name}", "config": model_name, "run": run, "wall_s": run["wall_s"],
           "peak_rss_mb": run["peak_rss_mb"], "peak_tree_rss_mb": run["peak_tree_rss_mb"]}
    if run["returncode"] != 0 or not (out / "result.json").is_file():
        row["error"] = f"anomalib {model_name} failed:\n{_tail(run['log'], 25)}"
        return row
    result = json.loads((out / "result.json").read_text())
    row.update(settings=result["settings"], phase_seconds=result["phase_seconds"],
               anomalib_version=result["anomalib_version"], versions=result["versions"],
               model_checkpoint_mb=result.get("checkpoint_mb"))
    row.update(score_outputs(args.data, args.category, out / "predictions.npz", args.image_size))
    return row


def score_outputs(data: Path, category: str, predictions: Path, size: int) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of anomalib's raw outputs, by gaussad's metric code, on
    gaussad's own index of the test split (the same images, the same masks, resized the same way)."""
    import numpy as np

    from gaussad.data import load_category, read_mask
    from gaussad.metrics import aupro, image_auroc, pixel_auroc

    test = load_category(data, category, validate=False).test
    saved = np.load(predictions)
    order = {str(Path(p).resolve()): i for i, p in enumerate(saved["paths"])}
    ours = [str(Path(p).resolve()) for p in test.paths]
    if sorted(order) != sorted(ours):
        missing, extra = set(ours) - set(order), set(order) - set(ours)
        raise RuntimeError(f"anomalib scored another test set: {len(missing)} missing, {len(extra)} extra")
    index = np.array([order[p] for p in ours])
    labels = np.asarray(test.labels)
    if not np.array_equal(saved["labels"][index].astype(int), labels.astype(int)):
        raise RuntimeError("anomalib's labels differ from gaussad's")
    scores = saved["scores"][index]
    result = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": None, "aupro": None,
              "n_test_images": len(labels)}
    if test.has_masks and "maps" in saved:
        maps = saved["maps"][index].astype(np.float64)
        masks = np.stack([read_mask(path, (size, size)) for path in test.mask_paths])
        result.update(pixel_auroc=pixel_auroc(masks, maps), aupro=aupro(masks, maps))
    return result


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------

def compare_main(args: argparse.Namespace, argv: list[str]) -> int:
    sys.path.insert(0, str(REPO / "src"))  # gaussad's metrics and data index (installed in the project venv)
    from gaussad.data import load_category

    category = load_category(args.data, args.category)  # validates the folder once, before any run
    has_masks = bool(category.test.has_masks)
    if args.save_maps is None:
        args.save_maps = has_masks
    configs: list[tuple[str, list[str]]] = [(p, ["--preset", p]) for p in args.presets]
    configs += [(name, shlex.split(flags)) for name, flags in args.config_name or []]
    anomalib_models = [m for m in args.anomalib if m != "none"]
    if anomalib_models and not Path(args.anomalib_python).is_file():
        sys.exit(f"compare_anomalib.py: no anomalib interpreter at {args.anomalib_python} "
                 f"(create .venv-compare, see benchmarks/README.md, or pass --anomalib-python; --anomalib none skips)")

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's busy-waiting threads distort timings on a shared machine
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset bar would fill its log
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    import torch

    report = {
        "data": str(args.data), "category": args.category,
        "n_train_images": len(category.train), "n_test_images": len(category.test),
        "n_defective": int(sum(category.test.labels)), "has_masks": has_masks,
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                   f"torch {torch.__version__} (gaussad venv), OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join([".venv/bin/python", "benchmarks/compare_anomalib.py", *argv]),
        "notes": NOTES if args.anomalib_normalization == "tf" else NOTES + (
            f" EXCEPT: anomalib ran with {args.anomalib_normalization} normalisation here, not the weights' TF "
            "normalisation (a sensitivity check)."), "json": str(output.with_suffix(".json")), "results": [],
        "gaussad_source": git_state(),
    }

    def save() -> None:
        output.with_suffix(".json").write_text(json.dumps(report, indent=1))
        output.with_suffix(".md").write_text(markdown(report))

    work_parent = args.work_dir
    with tempfile.TemporaryDirectory(prefix="compare_anomalib_", dir=work_parent) as tmp:
        work = Path(tmp)
        plan = [("gaussad", c) for c in configs] + [("anomalib", m) for m in anomalib_models]
        for kind, what in plan:
            label = what[0] if kind == "gaussad" else f"anomalib {what}"
            print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
            try:
                if kind == "gaussad":
                    row = run_gaussad(what[0], what[1], args.data, args.category, work, env)
                else:
                    row = run_anomalib_tool(what, args, work, env)
            except Exception as err:  # a failed tool still leaves the others' rows
                row = {"tool": label, "config": what[0] if kind == "gaussad" else what,
                       "error": f"{type(err).__name__}: {err}"}
            if "error" in row:
                print(f"  FAILED: {row['error']}", flush=True)
            else:
                print(f"  image AUROC {fmt(row.get('image_auroc'))}, pixel AUROC {fmt(row.get('pixel_auroc'))}, "
                      f"AUPRO {fmt(row.get('aupro'))}, {row['wall_s']} s, {row['peak_rss_mb']} MB", flush=True)
            report["results"].append(row)
            save()
        if args.keep_work:
            import shutil
            shutil.copytree(work, args.keep_work, dirs_exist_ok=True)
    print(markdown(report))
    print(f"written {output.with_suffix('.md')} and {output.with_suffix('.json')}")
    return 1 if any("error" in r for r in report["results"]) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="dataset root in MVTec AD layout")
    parser.add_argument("-c", "--category", required=True)
    parser.add_argument("--presets", nargs="*", default=["lite0"], help="gaussad presets (`--preset P` each)")
    parser.add_argument("--config-name", nargs=2, action="append", metavar=("NAME", "FLAGS"),
                        help='another gaussad configuration: a name and its fit flags as one string, '
                             'e.g. --config-name lite0-perloc "--preset lite0 --spatial per-location"')
    parser.add_argument("--anomalib", nargs="+", choices=["padim", "patchcore", "mhpatchcore", "none"],
                        default=["padim", "patchcore"])
    parser.add_argument("--anomalib-python", type=Path, default=DEFAULT_ANOMALIB_PYTHON)
    parser.add_argument("--image-size", type=int, default=224, help="anomalib's input size (gaussad's is its preset's)")
    parser.add_argument("--anomalib-normalization", choices=sorted(NORMALIZATIONS), default="tf",
                        help="anomalib's input normalisation: tf (x-0.5)/0.5, right for these weights, or "
                             "imagenet (anomalib's default; for a sensitivity check only)")
    parser.add_argument("--padim-layers", nargs="+", default=DEFAULT_LAYERS["padim"])
    parser.add_argument("--padim-n-features", type=int, default=176, help="176 = all channels of blocks.1/2/4")
    parser.add_argument("--patchcore-layers", nargs="+", default=DEFAULT_LAYERS["patchcore"])
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9, help="PatchCore's and MH-PatchCore's k")
    # MH-PatchCore (its layers are --patchcore-layers); anomalib's defaults, whose bank is bounded
    parser.add_argument("--memory-bank-size", type=int, default=1000)
    parser.add_argument("--local-coreset-size", type=int, default=256)
    parser.add_argument("--pca-variance-ratio", type=float, default=0.99)
    parser.add_argument("--covariance-shrinkage", type=float, default=0.07)
    parser.add_argument("--anomalib-batch-size", type=int, default=32)
    parser.add_argument("--anomalib-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-maps", action=argparse.BooleanOptionalAction, default=None,
                        help="bring anomalib's maps back for pixel metrics (default: when masks exist)")
    parser.add_argument("--output", default=None, help="results stem (default benchmarks/results/compare_<category>)")
    parser.add_argument("--work-dir", default=None, help="parent of the temporary work folder (system temp)")
    parser.add_argument("--keep-work", type=Path, default=None, help="copy the work folder (models, logs) here")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(REPO / "benchmarks" / "results" / f"compare_{args.category}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return compare_main(parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
