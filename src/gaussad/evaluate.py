"""Evaluate a fitted model on a category's test split and write what a user looks at.

Outputs in one folder: metrics.json, scores.csv (one row per test image), roc.png + roc.csv,
histogram.png (normal vs defective scores) and overlays/ (heat maps over a sample of test images);
for a reconstruction model (PIADE) also reconstructions/ (input, reconstruction, difference).
Pixel metrics are computed at the model's image size, masks resized there (nearest).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from gaussad.base_detector import Detector, Scores
from gaussad.data import Category, read_mask, read_rgb
from gaussad.features import to_tensor
from gaussad.metrics import aupro, best_balanced_accuracy, f1_optimal_threshold, image_auroc, pixel_auroc, roc_points
from gaussad.output_folders import claim_output_folder
from gaussad.plots import save_overlay, save_reconstruction, save_roc_curve, save_score_histogram

# What test_metrics gives, for comparing models (promotion) and summing up runs
TEST_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1", "balanced_accuracy")


def evaluate(
    model: Detector,
    category: Category,
    out_dir: str | Path,
    n_overlays: int = 8,
    scores: Scores | None = None,
    score_seconds: float | None = None,
) -> dict:
    """Score the test split (or take `scores` computed elsewhere, with the `score_seconds` they took),
    compute the metrics, set the model's labelled-data thresholds, write the outputs."""
    out_dir = claim_output_folder(out_dir, "evaluation")
    test = category.test
    if scores is None:
        start = time.perf_counter()
        scores = model.score(test)
        score_seconds = time.perf_counter() - start

    metrics, labelled_thresholds = _metrics_and_thresholds(category, scores, model.config["image_size"])
    metrics.update(
        score_seconds=None if score_seconds is None else round(score_seconds, 3),
        images_per_second=None if not score_seconds else round(len(test) / score_seconds, 2),
    )
    model.thresholds.update(labelled_thresholds)
    metrics["thresholds"] = dict(model.thresholds)
    metrics.update(decision_rates(np.asarray(test.labels), scores.image, model))

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _scores_table(category, scores, model.decision_threshold).to_csv(out_dir / "scores.csv", index=False)
    _plots(model, category, scores, out_dir, n_overlays)
    return metrics


def decision_rates(labels: np.ndarray, image_scores: np.ndarray, model: Detector) -> dict:
    """The decision threshold (its name and value) and, on the test split, the false-alarm rate (of
    normal images at or above it) and the miss rate (of defective images below it); with a budget,
    the budget and its bound from the held-out images."""
    threshold = model.decision_threshold
    alarms = image_scores >= threshold
    rates = {"decision_threshold": model.decision_threshold_name, "decision_threshold_value": threshold,
             "false_alarm_rate": float(alarms[labels == 0].mean()) if (labels == 0).any() else None,
             "miss_rate": float((~alarms[labels == 1]).mean()) if (labels == 1).any() else None}
    if model.config.get("false_alarm_rate") is not None:
        rates.update(false_alarm_budget=model.config["false_alarm_rate"],
                     false_alarm_bound=model.fit_info.get("false_alarm_bound"))
    return rates


def test_metrics(category: Category, scores: Scores, size: int) -> dict:
    """Image AUROC, pixel AUROC, AUPRO and, with both classes present, the best F1 and balanced
    accuracy of the test split's `scores` (maps at `size` px)."""
    return _metrics_and_thresholds(category, scores, size)[0]


def _metrics_and_thresholds(category: Category, scores: Scores, size: int) -> tuple[dict, dict]:
    """test_metrics, and the image thresholds at which the best F1 and balanced accuracy are reached."""
    labels = np.asarray(category.test.labels)
    metrics = {
        "category": category.name,
        "n_test_images": len(labels),
        "n_defective": int(labels.sum()),
        "image_auroc": image_auroc(labels, scores.image),
        **_pixel_metrics(category, scores, size),
    }
    thresholds = {}
    if 0 < labels.sum() < len(labels):
        thresholds["image_f1_optimal"], metrics["f1"] = f1_optimal_threshold(labels, scores.image)
        thresholds["image_balanced_accuracy"], metrics["balanced_accuracy"] = best_balanced_accuracy(
            labels, scores.image)
    return metrics, thresholds


def _pixel_metrics(category: Category, scores: Scores, size: int) -> dict:
    if not category.test.has_masks:
        reason = "no ground_truth masks" if any(category.test.labels) else "no defective test images"
        return {"pixel_auroc": None, "aupro": None, "pixel_metrics_unavailable": reason}
    masks = np.stack([read_mask(path, (size, size)) for path in category.test.mask_paths])
    return {"pixel_auroc": pixel_auroc(masks, scores.maps), "aupro": aupro(masks, scores.maps)}


def _scores_table(category: Category, scores: Scores, threshold: float) -> pd.DataFrame:
    test = category.test
    return pd.DataFrame(
        {
            "path": [str(p) for p in test.paths],
            "defect_type": test.defect_types,
            "label": test.labels,
            "score": scores.image,
            "predicted": (scores.image >= threshold).astype(int),
            "max_pixel_score": scores.maps.reshape(len(test), -1).max(1),
        }
    )


def _plots(model: Detector, category: Category, scores: Scores, out_dir: Path, n_overlays: int) -> None:
    labels = np.asarray(category.test.labels)
    title = f"{category.name}: {model.config['backbone']}"
    thresholds = {k: v for k, v in model.thresholds.items() if k.startswith("image_")}
    if 0 < labels.sum() < len(labels):
        save_roc_curve(labels, scores.image, out_dir / "roc.png", title, thresholds)
        fpr, tpr, _ = roc_points(labels, scores.image)
        pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(out_dir / "roc.csv", index=False)
    save_score_histogram(scores.image[labels == 0], scores.image[labels == 1], out_dir / "histogram.png", title,
                         thresholds)
    vmin, vmax = model.display_range()
    sample = overlay_sample(category.test.defect_types, n_overlays)
    if model.RECONSTRUCTS:
        _reconstructions(model, category, scores, sample, out_dir / "reconstructions", (vmin, vmax))
    for index in sample:
        path = category.test.paths[index]
        image = read_rgb(path)
        mask_path = category.test.mask_paths[index]
        save_overlay(
            np.asarray(image),
            scores.maps[index],
            out_dir / "overlays" / f"{category.test.defect_types[index]}_{path.stem}.png",
            f"{category.test.defect_types[index]}/{path.name}  score {scores.image[index]:.2f}",
            vmin,
            vmax,
            mask=read_mask(mask_path, image.size) if mask_path else None,
            threshold=model.thresholds["pixel_normal_quantile"],
        )


def _reconstructions(model: Detector, category: Category, scores: Scores, sample: list[int], out_dir: Path,
                     colour_range: tuple[float, float]) -> None:
    """Input, reconstruction and difference map of the sampled test images, at the model's size."""
    size = model.config["image_size"]
    images = [to_tensor(read_rgb(category.test.paths[i]), size) for i in sample]
    if not images:
        return
    rebuilt = model.reconstruct(torch.stack(images)).cpu()
    for index, image, reconstruction in zip(sample, images, rebuilt):
        path = category.test.paths[index]
        kind = category.test.defect_types[index]
        save_reconstruction(image.permute(1, 2, 0).numpy(), reconstruction.permute(1, 2, 0).numpy(),
                            scores.maps[index], out_dir / f"{kind}_{path.stem}.png",
                            f"{kind}/{path.name}  score {scores.image[index]:.3f}", *colour_range)


def overlay_sample(defect_types, count: int) -> list[int]:
    """Up to `count` test images, taken in turn from each defect type (good included), first ones first."""
    by_type: dict[str, list[int]] = {}
    for index, kind in enumerate(defect_types):
        by_type.setdefault(kind, []).append(index)
    picked: list[int] = []
    queues = list(by_type.values())
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked
