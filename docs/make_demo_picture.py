"""docs/img/demo_dataset.png: the built-in demo data at a glance, per category a normal training
image and one test image of each defect type, the defect's mask outlined in red.

    .venv/bin/python docs/make_demo_picture.py [--data DIR] [--out docs/img/demo_dataset.png]

DIR is the demo data (`gaussad demo-data DIR`); without --data, the demo data is written to a
temporary folder first (seed 0, what data.dvc pins). `make screenshots` runs this too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from gaussad.data import list_categories, load_category  # noqa: E402
from gaussad.demo import write_demo_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def picture(data: Path, out: Path) -> None:
    categories = [load_category(data, name) for name in list_categories(data)]
    rows = []
    for category in categories:
        # one test image per defect type, the first in file order; its mask, when it has one
        test = category.test
        defects = {}
        for path, label, defect, mask in zip(test.paths, test.labels, test.defect_types, test.mask_paths):
            if label == 1 and defect not in defects:
                defects[defect] = (path, defect, mask)
        rows.append((category.name, category.train.paths[0], list(defects.values())))
    columns = 1 + max(len(defects) for _, _, defects in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.6 * len(rows)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for row, (name, normal, defects) in enumerate(rows):
        axes[row, 0].imshow(Image.open(normal).convert("RGB"))
        axes[row, 0].set_title(f"{name}: good (train)", fontsize=10)
        for column, (path, defect, mask_path) in enumerate(defects, start=1):
            axis = axes[row, column]
            axis.imshow(Image.open(path).convert("RGB"))
            if mask_path is not None:
                mask = np.asarray(Image.open(mask_path).convert("L")) > 127
                axis.contour(mask, levels=[0.5], colors="red", linewidths=1.0)
            axis.set_title(f"{name}: {defect}", fontsize=10)
    figure.suptitle("The demo data: a normal image and each defect type, its mask outlined in red", fontsize=12)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    print(f"written {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="the demo data (default: written to a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "demo_dataset.png")
    args = parser.parse_args()
    if args.data is not None:
        picture(args.data, args.out)
        return
    with tempfile.TemporaryDirectory(prefix="gaussad-demo-") as tmp:
        write_demo_dataset(Path(tmp), seed=0)
        picture(Path(tmp), args.out)


if __name__ == "__main__":
    main()
