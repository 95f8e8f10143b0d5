"""Heat maps of real defects, gaussad beside anomalib PaDiM: one PNG from a kept comparison run.

    .venv/bin/python benchmarks/compare_anomalib.py DATA -c CATEGORY --presets lite0 --anomalib padim \
        --save-maps --keep-work WORK --output benchmarks/results/STEM
    .venv/bin/python benchmarks/gallery.py WORK DATA -c CATEGORY --out docs/img/gallery_CATEGORY.png [--rows 4]

Rows: defective test images chosen evenly by name (not by how well either tool does); columns: the
image (its ground truth outlined where there is a mask), gaussad's map over it, PaDiM's. Each
tool's colours span its own range on the same test split: from the median pixel of its maps of good
test images (blue) to the 99.5th percentile pixel of all its test maps (red), so each map reads
against that tool's own normal images. Under each map: the image score's rank among the test
split's scores (1 = the most anomalous).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gaussad.data import load_category, read_mask, read_rgb
from gaussad.detectors import load_model
from gaussad.plots import _boundary, jet

PANEL, GAP, LABEL = 224, 6, 22


def colour_range(maps: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    return float(np.median(maps[labels == 0])), float(np.percentile(maps, 99.5))


def panel(image: np.ndarray, heat: np.ndarray | None, low: float, high: float, mask: np.ndarray | None) -> Image.Image:
    base = np.asarray(Image.fromarray(image).resize((PANEL, PANEL), Image.Resampling.BILINEAR)).astype(np.float64)
    if heat is not None:
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((PANEL, PANEL), Image.Resampling.BILINEAR))
        base = 0.5 * base + 0.5 * jet((heat - low) / max(high - low, 1e-12))
    pixels = base.round().astype(np.uint8)
    if mask is not None:
        small = np.asarray(Image.fromarray(mask).resize((PANEL, PANEL), Image.Resampling.NEAREST))
        pixels[_boundary(small)] = (0, 255, 0)
    return Image.fromarray(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="the --keep-work folder of compare_anomalib.py")
    parser.add_argument("data", type=Path)
    parser.add_argument("-c", "--category", required=True)
    parser.add_argument("--preset", default="lite0", help="the gaussad configuration name in the run")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    test = load_category(args.data, args.category, validate=False).test
    labels = np.asarray(test.labels)
    model = load_model(args.work / f"gaussad-{args.preset}-model", progress=False)
    ours = model.score(test)
    saved = np.load(args.work / "anomalib-padim" / "predictions.npz")
    order = {str(Path(p).resolve()): i for i, p in enumerate(saved["paths"])}
    index = np.array([order[str(Path(p).resolve())] for p in test.paths])
    theirs_maps, theirs_scores = saved["maps"][index].astype(np.float64), saved["scores"][index]
    tools = [(f"gaussad {args.preset}", ours.maps, ours.image), ("anomalib PaDiM", theirs_maps, theirs_scores)]
    ranges = [colour_range(maps, labels) for _, maps, _ in tools]
    ranks = [np.argsort(np.argsort(-scores)) + 1 for _, _, scores in tools]

    defective = np.flatnonzero(labels == 1)
    rows = defective[np.linspace(0, len(defective) - 1, args.rows).round().astype(int)]
    font = ImageFont.load_default(size=14)
    width = 3 * PANEL + 4 * GAP
    canvas = Image.new("RGB", (width, LABEL + args.rows * (PANEL + LABEL + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate([f"{args.category}: defective test images", *(t for t, _, _ in tools)]):
        draw.text((GAP + column * (PANEL + GAP) + PANEL / 2, LABEL / 2), title, fill="black", font=font, anchor="mm")
    for row, i in enumerate(rows):
        top = LABEL + row * (PANEL + LABEL + GAP)
        image = np.asarray(read_rgb(test.paths[i]))
        mask = read_mask(test.mask_paths[i], image.shape[:2]) if test.mask_paths[i] else None
        cells = [(panel(image, None, 0, 1, mask), Path(test.paths[i]).name)]
        for (name, maps, _), (low, high), rank in zip(tools, ranges, ranks):
            cells.append((panel(image, maps[i], low, high, mask), f"score rank {rank[i]} of {len(labels)}"))
        for column, (picture, caption) in enumerate(cells):
            left = GAP + column * (PANEL + GAP)
            canvas.paste(picture, (left, top))
            draw.text((left + PANEL / 2, top + PANEL + LABEL / 2), caption, fill="black", font=font, anchor="mm")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, format="PNG", optimize=True)
    print(f"{args.out}: rows {[Path(test.paths[i]).name for i in rows]}")


if __name__ == "__main__":
    main()
