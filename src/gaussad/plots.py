"""PNG figures for reports: ROC curve, score histograms and anomaly-map overlays.

Charts are built with ``matplotlib.figure.Figure`` on an Agg canvas, so nothing here touches
pyplot's global state or the user's backend; overlays, drawn once per image, with Pillow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from gaussad.metrics import image_auroc, roc_points


def _save(figure: Figure, path) -> None:
    """Write the figure as a PNG at path, creating parent folders.

    The figure is not registered with pyplot, so it is freed once it goes out of scope.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")


def save_roc_curve(labels, scores, path, title: str, thresholds: dict[str, float] | None = None) -> None:
    """ROC curve of N scores against N binary labels (1 = anomalous), AUROC in the legend; each of
    `thresholds` marked at its operating point (an image flagged when its score >= the threshold)."""
    fpr, tpr, _ = roc_points(labels, scores)
    figure = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, lw=2, label=f"AUROC = {image_auroc(labels, scores):.4f}")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    labels, scores = np.asarray(labels), np.asarray(scores)
    for (name, value), marker in zip((thresholds or {}).items(), "osD^v" * 4):
        point = (np.mean(scores[labels == 0] >= value), np.mean(scores[labels == 1] >= value))
        axes.plot(*point, marker=marker, ms=8, ls="none", label=f"{name}: FPR {point[0]:.2f}, TPR {point[1]:.2f}")
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


# Overlays are drawn with Pillow, not matplotlib: evaluate and predict draw one per image, and a
# figure cost 0.55 s each (a third of evaluate's fixed cost on a 900-image category)
PANEL = 400  # pixels of a panel's longer side
TITLE_HEIGHT, LABEL_HEIGHT, COLOURBAR_WIDTH = 30, 22, 64
_RGB = {"yellow": (255, 255, 0), "lime": (0, 255, 0), "white": (255, 255, 255), "black": (0, 0, 0)}


# matplotlib's "jet" as its breakpoints (value, channel level), per channel
_JET = {"red": ((0, 0.35, 0.66, 0.89, 1), (0, 0, 1, 1, 0.5)),
        "green": ((0, 0.125, 0.375, 0.64, 0.91, 1), (0, 0, 1, 1, 0, 0)),
        "blue": ((0, 0.11, 0.34, 0.65, 1), (0.5, 1, 1, 0, 0))}


def jet(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] on matplotlib's "jet" colour map (blue, cyan, yellow, red),
    interpolated between its breakpoints."""
    values = np.clip(values, 0, 1)
    channels = [np.interp(values, *_JET[name]) for name in ("red", "green", "blue")]
    return (np.stack(channels, -1) * 255 + 0.5).astype(np.uint8)


def _boundary(region: np.ndarray) -> np.ndarray:
    """The pixels of a bool region next to its outside, two pixels wide; none when it is empty or full."""
    if not region.any() or region.all():
        return np.zeros_like(region)
    mask = Image.fromarray(region.astype(np.uint8) * 255)
    inner = np.asarray(mask.filter(ImageFilter.MinFilter(3))) > 0
    outer = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) > 0
    return outer & ~inner


def save_overlay(
    image, anomaly_map, path, title: str, vmin: float, vmax: float,
    mask=None, threshold: float | None = None,
) -> None:
    """Panels: the image; the anomaly map over it, with its colour bar; the predicted and true regions outlined.

    image: H×W×3 uint8 or H×W grayscale. anomaly_map: h×w float, resized bilinearly to the panel.
    vmin, vmax: fixed colour range of the heat map, so that overlays are comparable.
    mask: optional H×W bool ground truth. threshold: optional, predicted region = map >= it.
    The third panel is drawn when mask or threshold is given. Panels are PANEL px on the longer side.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    if mask is not None and np.shape(mask) != (height, width):
        raise ValueError(f"mask shape {np.shape(mask)} differs from image size {(height, width)}")
    scale = PANEL / max(height, width)
    ph, pw = max(1, round(height * scale)), max(1, round(width * scale))
    base = np.asarray(Image.fromarray(rgb).resize((pw, ph), Image.Resampling.BILINEAR))
    heat = _resize_bilinear(anomaly_map, ph, pw)
    span = vmax - vmin if vmax > vmin else 1.0
    blended = (0.5 * base + 0.5 * jet((heat - vmin) / span)).round().astype(np.uint8)
    panels = [("image", base), ("anomaly map", blended)]
    legend = []
    if mask is not None or threshold is not None:
        regions = base.copy()
        if threshold is not None:
            regions[_boundary(heat >= threshold)] = _RGB["yellow"]
            legend.append((f"map >= {threshold:.4g}", "yellow"))
        if mask is not None:
            small = np.asarray(Image.fromarray(np.asarray(mask, bool)).resize((pw, ph), Image.Resampling.NEAREST))
            regions[_boundary(small)] = _RGB["lime"]
            legend.append(("ground truth", "lime"))
        panels.append(("regions", regions))

    gap = 8
    canvas = Image.new("RGB", (len(panels) * (pw + gap) + COLOURBAR_WIDTH, TITLE_HEIGHT + LABEL_HEIGHT + ph + gap),
                       _RGB["white"])
    draw = ImageDraw.Draw(canvas)
    big, small_font = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    draw.text((canvas.width / 2, TITLE_HEIGHT / 2), title, fill=_RGB["black"], font=big, anchor="mm")
    top = TITLE_HEIGHT + LABEL_HEIGHT
    for index, (label, pixels) in enumerate(panels):
        left = gap // 2 + index * (pw + gap) + (COLOURBAR_WIDTH if index > 1 else 0)
        canvas.paste(Image.fromarray(pixels), (left, top))
        draw.text((left + pw / 2, TITLE_HEIGHT + LABEL_HEIGHT / 2), label, fill=_RGB["black"], font=small_font,
                  anchor="mm")
        if index == 1:
            _colour_bar(draw, canvas, left + pw + 6, top, ph, vmin, vmax, small_font)
        if label == "regions":
            for row, (text, colour) in enumerate(reversed(legend)):
                y = top + ph - 8 - 18 * row
                draw.rectangle((left + 6, y - 15, left + 20 + draw.textlength(text, small_font), y + 2),
                               fill=_RGB["black"])
                draw.text((left + 12, y), text, fill=_RGB[colour], font=small_font, anchor="ls")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", compress_level=1)  # zlib's fastest: 5x faster than the default, files 1.5x


def _colour_bar(draw: ImageDraw.ImageDraw, canvas: Image.Image, left: int, top: int, height: int,
                vmin: float, vmax: float, font) -> None:
    """A vertical jet bar from vmin (bottom) to vmax (top), with three values written beside it."""
    ramp = jet(np.linspace(1, 0, height))[:, None, :].repeat(12, axis=1)
    canvas.paste(Image.fromarray(ramp), (left, top))
    for fraction in (0.0, 0.5, 1.0):
        y = top + (1 - fraction) * (height - 1)
        draw.text((left + 16, y), f"{vmin + fraction * (vmax - vmin):.3g}", fill=_RGB["black"], font=font,
                  anchor="lm")


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


def save_monitor_plot(scores, normal, threshold: float, report: dict, path, title: str) -> None:
    """Production scores in arrival order against the held-out normal scores' 1-99 % band and the
    decision threshold; windows that drifted shaded red; the verdict (gaussad.monitoring) on top."""
    windows = report["windows"]
    scores, normal = np.asarray(scores), np.asarray(normal)
    figure = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    low, high = np.quantile(normal, [0.01, 0.99])
    axes.axhspan(low, high, color="tab:green", alpha=0.15, label="held-out normal images, 1-99 %")
    axes.axhline(threshold, color="tab:red", lw=1.5, label=f"decision threshold {threshold:.4g}")
    for window in windows:
        if window["drift"]:
            axes.axvspan(window["start"] - 0.5, window["start"] + window["n_images"] - 0.5, color="tab:red",
                         alpha=0.12, lw=0)
        if window["start"]:
            axes.axvline(window["start"] - 0.5, color="grey", lw=0.5, ls=":")
    alarms = scores >= threshold
    index = np.arange(len(scores))
    axes.scatter(index[~alarms], scores[~alarms], s=8, color="tab:blue", label="image")
    axes.scatter(index[alarms], scores[alarms], s=10, color="tab:red", label="alarm")
    verdict = "drift" if report["drift"] else "no drift"
    axes.set(xlabel="image, in arrival order", ylabel="anomaly score",
             title=f"{title}: {verdict} (p = {report['p_value']:.2g}); "
                   f"{len(report['drift_windows'])} of {len(windows)} window(s) drift")
    axes.legend(loc="best", fontsize=8)
    _save(figure, path)
