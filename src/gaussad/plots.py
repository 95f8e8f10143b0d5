"""PNG figures for reports: ROC curve, score histograms and anomaly-map overlays.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, so nothing here touches
pyplot's global state or the user's backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

_PREDICTED_COLOUR = "yellow"
_GROUND_TRUTH_COLOUR = "lime"


def _save(figure: Figure, path) -> None:
    """Write the figure as a PNG at path, creating parent folders.

    The figure is not registered with pyplot, so it is freed once it goes out of scope.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")


def save_roc_curve(labels, scores, path, title: str) -> None:
    """ROC curve of N scores against N binary labels (1 = anomalous), AUROC in the legend."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("a ROC curve needs both normal and anomalous labels")
    fpr, tpr, _ = roc_curve(labels, scores)
    figure = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, lw=2, label=f"AUROC = {roc_auc_score(labels, scores):.4f}")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate",
             ylabel="True positive rate", title=title, aspect="equal")
    axes.legend(loc="lower right")
    _save(figure, path)


def save_score_histogram(
    normal_scores, defect_scores, path, title: str, thresholds: dict[str, float] | None = None
) -> None:
    """Overlaid density histograms of 1-D normal and defect scores, a vertical line per threshold.

    Either set of scores may be empty (then it is not drawn).
    """
    normal_scores = np.asarray(normal_scores, dtype=float).ravel()
    defect_scores = np.asarray(defect_scores, dtype=float).ravel()
    bins = np.histogram_bin_edges(np.concatenate([normal_scores, defect_scores]), bins=40)
    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for scores, name, colour in [(normal_scores, "normal", "tab:blue"),
                                 (defect_scores, "defect", "tab:red")]:
        if scores.size:
            axes.hist(scores, bins=bins, density=True, alpha=0.5, color=colour,
                      label=f"{name} (n={scores.size})")
    for (name, value), style in zip((thresholds or {}).items(), ["--", ":", "-.", "-"] * 8):
        axes.axvline(value, color="black", ls=style, label=f"{name} = {value:.4g}")
    axes.set(xlabel="anomaly score", ylabel="density", title=title)
    axes.legend()
    _save(figure, path)


def _as_rgb(image) -> np.ndarray:
    """H×W×3 uint8 from an H×W grayscale or H×W×3 uint8 image."""
    image = np.asarray(image)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"image must be H×W or H×W×3, got shape {image.shape}")


def _resize_bilinear(anomaly_map, height: int, width: int) -> np.ndarray:
    """h×w float map resized bilinearly to height×width."""
    resized = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized)


def _outline(axes, region: np.ndarray, colour: str) -> None:
    """Draw the boundary of a bool H×W region (nothing when it is empty or full)."""
    if region.any() and not region.all():
        axes.contour(region.astype(float), levels=[0.5], colors=colour, linewidths=1.5)


def save_overlay(
    image, anomaly_map, path, title: str, vmin: float, vmax: float,
    mask=None, threshold: float | None = None,
) -> None:
    """Panels: the image; the anomaly map over it; the predicted and true regions outlined.

    image: H×W×3 uint8 or H×W grayscale. anomaly_map: h×w float, resized bilinearly to H×W.
    vmin, vmax: fixed colour range of the heat map, so that overlays are comparable.
    mask: optional H×W bool ground truth. threshold: optional, predicted region = map >= it.
    The third panel is drawn when mask or threshold is given.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    heat = _resize_bilinear(anomaly_map, height, width)
    if mask is not None and np.shape(mask) != (height, width):
        raise ValueError(f"mask shape {np.shape(mask)} differs from image size {(height, width)}")
    n_panels = 2 if mask is None and threshold is None else 3
    # margins set by hand: a layout engine ("constrained", "tight") measures every text first, which
    # takes longer than drawing the whole figure (0.44 s against 0.25 s; evaluate draws several)
    figure = Figure(figsize=(4 * n_panels, 4.4), dpi=100)
    figure.subplots_adjust(left=0.01, right=0.99 if n_panels == 3 else 0.94, bottom=0.01, top=0.88, wspace=0.06)
    panels = figure.subplots(1, n_panels)
    for axes in panels:
        axes.imshow(rgb)
        axes.set_axis_off()
    panels[0].set_title("image")
    shown = panels[1].imshow(heat, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    panels[1].set_title("anomaly map")
    figure.colorbar(shown, ax=panels[1], fraction=0.046, pad=0.02)
    if n_panels == 3:
        legend = []
        if threshold is not None:
            _outline(panels[2], heat >= threshold, _PREDICTED_COLOUR)
            legend.append(Line2D([], [], color=_PREDICTED_COLOUR, label=f"map ≥ {threshold:.4g}"))
        if mask is not None:
            _outline(panels[2], np.asarray(mask, dtype=bool), _GROUND_TRUTH_COLOUR)
            legend.append(Line2D([], [], color=_GROUND_TRUTH_COLOUR, label="ground truth"))
        panels[2].legend(handles=legend, loc="lower right", fontsize="small")
        panels[2].set_title("regions")
    figure.suptitle(title)
    _save(figure, path)


def _as_uint8_rgb(image) -> np.ndarray:
    """H×W×3 uint8 from an H×W or H×W×3 image, uint8 or float in [0, 1]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return _as_rgb(image)


def save_reconstruction(
    image, reconstruction, difference_map, path, title: str = "",
    vmin: float | None = None, vmax: float | None = None,
) -> None:
    """Panels: the input image, its reconstruction and their difference map (a reconstruction model's
    pixel anomaly map), side by side at the same size.

    image, reconstruction: H×W×3 (or H×W), uint8 or float in [0, 1]. difference_map: h×w float,
    resized bilinearly to H×W. vmin, vmax: the heat map's colour range (its own range by default).
    """
    rgb, rebuilt = _as_uint8_rgb(image), _as_uint8_rgb(reconstruction)
    if rgb.shape != rebuilt.shape:
        raise ValueError(f"reconstruction shape {rebuilt.shape} differs from image shape {rgb.shape}")
    height, width = rgb.shape[:2]
    heat = _resize_bilinear(difference_map, height, width)
    figure = Figure(figsize=(12, 4.4), dpi=100, layout="constrained")
    panels = figure.subplots(1, 3)
    panels[0].imshow(rgb)
    panels[0].set_title("image")
    panels[1].imshow(rebuilt)
    panels[1].set_title("reconstruction")
    shown = panels[2].imshow(heat, cmap="jet", vmin=vmin, vmax=vmax)
    panels[2].set_title("difference")
    figure.colorbar(shown, ax=panels[2], fraction=0.046, pad=0.02)
    for axes in panels:
        axes.set_axis_off()
    if title:
        figure.suptitle(title)
    _save(figure, path)
