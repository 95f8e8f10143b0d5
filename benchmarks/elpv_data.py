"""Lay out the ELPV solar-cell set (PyPI `elpv-dataset`) in MVTec AD layout, one category per cell type.

    python benchmarks/elpv_data.py OUT            # -> OUT/mono/..., OUT/poly/...

ELPV (Buerhop-Lutz et al. 2018; Deitsch et al. 2019) has 2,624 electroluminescence images of
solar cells, 300 x 300 px, 8-bit gray, each with a defect probability (0, 1/3, 2/3 or 1) and the
type of module it came from (mono- or polycrystalline). Per type:

    probability 0    -> 70 % OUT/<type>/train/good, 30 % OUT/<type>/test/good (seeded shuffle)
    probability 1    -> OUT/<type>/test/defect
    1/3 and 2/3      -> left out (uncertain labels)

No ground_truth/ folder: ELPV has image labels only, so pixel metrics are unavailable. The images
are written as given (8-bit gray PNG, file names as in the package: cellNNNN.png).

`--drawn-cracks` also writes OUT/<type>-cracks, real cells with drawn cracks and pixel masks (for
pixel AUROC and AUPRO on real backgrounds): the same train/good; the test/good cells split in two
(seeded), one half kept as test/good, the other with one crack each, drawn by gaussad's demo
`crack` (a jagged dark line 1-2 px wide, sometimes branched, 25-70 % darker), under test/crack with
masks under ground_truth/crack/<name>_mask.png.

The package is a benchmark-only dependency (`pip install elpv-dataset`, or gaussad's `compare`
extra); its images are licensed CC BY-NC-SA 4.0, so the laid-out data is not committed anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

TYPES = ("mono", "poly")
TRAIN_FRACTION = 0.7


def load_elpv() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(file names, images [N, 300, 300] uint8, defect probabilities [N], cell types [N]) through
    the package's documented loader `elpv_dataset.utils.load_dataset`. The loader does not return
    the file names; they are read from the same labels.csv it reads, in the same order."""
    try:
        import elpv_dataset.utils as elpv
    except ImportError:
        sys.exit("elpv_data.py: needs the ELPV package: pip install elpv-dataset (or gaussad[compare])")
    labels = os.path.join(os.path.dirname(elpv.__file__), "data", "labels.csv")
    images, probabilities, types = elpv.load_dataset(labels)
    names = [Path(line.split()[0]).name for line in Path(labels).read_text().splitlines() if line.strip()]
    if len(names) != len(images):
        raise RuntimeError(f"{labels}: {len(names)} rows but the loader returned {len(images)} images")
    return names, np.asarray(images), np.asarray(probabilities, dtype=float), np.asarray(types)


def split(names: list[str], probabilities: np.ndarray, types: np.ndarray, cell_type: str,
          seed: int, train_fraction: float) -> dict[str, list[int]]:
    """Indices per split of one cell type: {"train/good", "test/good", "test/defect"}."""
    of_type = types == cell_type
    good = np.flatnonzero(of_type & np.isclose(probabilities, 0.0))
    defect = np.flatnonzero(of_type & np.isclose(probabilities, 1.0))
    good = good[np.argsort([names[i] for i in good])]  # a fixed order before the seeded shuffle
    good = good[np.random.default_rng(seed).permutation(len(good))]
    n_train = int(round(train_fraction * len(good)))
    return {
        "train/good": sorted(good[:n_train].tolist()),
        "test/good": sorted(good[n_train:].tolist()),
        "test/defect": sorted(defect.tolist()),
    }


def write_category(out: Path, cell_type: str, splits: dict[str, list[int]], names: list[str],
                   images: np.ndarray) -> None:
    from PIL import Image

    for folder, indices in splits.items():
        target = out / cell_type / folder
        target.mkdir(parents=True, exist_ok=True)
        for i in indices:
            image = images[i]
            if image.dtype != np.uint8 or image.ndim != 2:
                raise RuntimeError(f"{names[i]}: expected 8-bit gray, got {image.dtype} {image.shape}")
            Image.fromarray(image, mode="L").save(target / names[i])


def write_drawn_cracks(out: Path, cell_type: str, splits: dict[str, list[int]], names: list[str],
                       images: np.ndarray, seed: int) -> dict[str, int]:
    """OUT/<type>-cracks (see the module docstring); returns the counts per split."""
    from PIL import Image

    from gaussad.demo.defects import crack
    from gaussad.demo.scenes import texture

    rng = np.random.default_rng(seed + 1)
    good = list(splits["test/good"])
    rng.shuffle(good)
    half = len(good) // 2
    cracks_splits = {"train/good": splits["train/good"], "test/good": sorted(good[:half])}
    write_category(out, f"{cell_type}-cracks", cracks_splits, names, images)
    root = out / f"{cell_type}-cracks"
    cracked, masks = root / "test" / "crack", root / "ground_truth" / "crack"
    cracked.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in sorted(good[half:]):
        clean = texture(images[i][..., None].astype(np.float64) / 255.0)
        drawn = crack(clean, rng)
        mask = ~np.isclose(drawn.fg, clean.fg)[..., 0]
        pixels = np.clip(np.rint(drawn.render()[..., 0] * 255), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(cracked / names[i])
        Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(masks / f"{Path(names[i]).stem}_mask.png")
    return {"train/good": len(splits["train/good"]), "test/good": half, "test/crack": len(good) - half}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="dataset root to write (OUT/mono, OUT/poly)")
    parser.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split of the good cells")
    parser.add_argument("--train-fraction", type=float, default=TRAIN_FRACTION)
    parser.add_argument("--drawn-cracks", action="store_true",
                        help="also write OUT/<type>-cracks: real cells with drawn cracks and pixel masks")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT/<type> if it exists (only a folder this script wrote)")
    args = parser.parse_args(argv)

    written = [*args.types, *(f"{t}-cracks" for t in args.types if args.drawn_cracks)]
    for cell_type in written:
        folder = args.out / cell_type
        if folder.exists() and any(folder.iterdir()):
            if not (args.overwrite and (folder / "elpv_split.json").is_file()):
                sys.exit(f"elpv_data.py: {folder} exists and is not empty "
                         f"(--overwrite replaces a folder this script wrote)")
            shutil.rmtree(folder)

    names, images, probabilities, types = load_elpv()
    print(f"ELPV: {len(names)} cells; left out (probability 1/3, 2/3): "
          f"{int(np.sum(~np.isclose(probabilities, 0) & ~np.isclose(probabilities, 1)))}")
    print(f"{'type':<5} {'train/good':>10} {'test/good':>9} {'test/defect':>11} {'test':>5}")
    for cell_type in args.types:
        splits = split(names, probabilities, types, cell_type, args.seed, args.train_fraction)
        write_category(args.out, cell_type, splits, names, images)
        counts = {k: len(v) for k, v in splits.items()}
        (args.out / cell_type / "elpv_split.json").write_text(json.dumps(
            {"source": "elpv-dataset (PyPI)", "seed": args.seed, "train_fraction": args.train_fraction,
             "counts": counts, "files": {k: [names[i] for i in v] for k, v in splits.items()}}, indent=1))
        print(f"{cell_type:<5} {counts['train/good']:>10} {counts['test/good']:>9} "
              f"{counts['test/defect']:>11} {counts['test/good'] + counts['test/defect']:>5}")
        if args.drawn_cracks:
            cracks = write_drawn_cracks(args.out, cell_type, splits, names, images, args.seed)
            (args.out / f"{cell_type}-cracks" / "elpv_split.json").write_text(json.dumps(
                {"source": "elpv-dataset (PyPI), cracks drawn by gaussad.demo.defects.crack", "seed": args.seed,
                 "counts": cracks}, indent=1))
            print(f"{cell_type}-cracks: {cracks}")
    print(f"written under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
