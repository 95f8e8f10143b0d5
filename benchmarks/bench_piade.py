"""PIADE on one category: training seconds per epoch, scoring speed, test AUROC and the paper's
measure, (TPR + TNR) / 2 at the best threshold (its Table 4).

    .venv/bin/python benchmarks/bench_piade.py [--category brushed] [--data DIR] [--preset lite0]
        [--image-size 120] [--epochs 5] [--train-batch-size 120] [--n-train 60] [--lambda-perceptual 1]
        [--lambda-ssim 1] [--threads N] [--figure PATH]

Without --data the demo category is written fresh into a temporary folder (n_train training images,
20 good and 8 per defect type in test, 256 px PNGs resized to the image size by the model); with it,
the category is read from DIR (MVTec AD layout, e.g. the ELPV cells of benchmarks/elpv_data.py;
pixel AUROC only where it has masks). The paper's schedule is `--epochs 400 --train-batch-size 120`
(about 6 s per epoch for 54 demo images on 2 cores: 40 min). The model is the
preset with the given overrides, fitted with the default 10 % hold-out, then scored on the test
split. Prints one Markdown table row per run. Threads: torch's default unless --threads is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gaussad.data import load_category, read_mask, read_rgb
from gaussad.demo import write_demo_dataset
from gaussad.features import to_tensor
from gaussad.metrics import best_balanced_accuracy, image_auroc, pixel_auroc
from gaussad.piade import PiadeAD
from gaussad.plots import save_reconstruction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="brushed")
    parser.add_argument("--data", type=Path, help="dataset root in MVTec AD layout (default: fresh demo data)")
    parser.add_argument("--preset", default="lite0")
    parser.add_argument("--image-size", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-batch-size", type=int, default=120)
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-perceptual", type=float, default=1.0)
    parser.add_argument("--lambda-ssim", type=float, default=1.0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--figure", type=Path, help="write the reconstruction of the first defective test image here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-piade-") as tmp:
        if args.data is None:
            write_demo_dataset(tmp, seed=0, categories=[args.category], n_train=args.n_train, n_test_good=20,
                               n_test_per_defect=8)
        category = load_category(args.data or tmp, args.category)
        model = PiadeAD.from_preset(args.preset, image_size=args.image_size, epochs=args.epochs,
                                    train_batch_size=args.train_batch_size, seed=args.seed, progress=False,
                                    lambda_perceptual=args.lambda_perceptual, lambda_ssim=args.lambda_ssim)
        model.fit(category.train)
        start = time.perf_counter()
        scores = model.score(category.test)
        score_seconds = time.perf_counter() - start
        size = args.image_size
        has_masks = any(path is not None for path in category.test.mask_paths)
        masks = np.stack([read_mask(path, (size, size)) for path in category.test.mask_paths]) if has_masks else None
        labels = np.asarray(category.test.labels)
        if args.figure:
            index = int(np.argmax(labels))
            image = to_tensor(read_rgb(category.test.paths[index]), size)
            reconstruction = model.reconstruct(image[None])[0].permute(1, 2, 0).cpu().numpy()
            save_reconstruction(image.permute(1, 2, 0).numpy(), reconstruction, scores.maps[index], args.figure,
                                f"{args.category} {category.test.defect_types[index]}", *model.display_range())

    info = model.fit_info
    losses = [record["loss"] for record in info["loss_history"]]
    print("| category | preset | λ1 | λ2 | px | epochs | train images | batch | threads | s/epoch | fit s | "
          "score img/s | loss first→last | image AUROC | (TPR+TNR)/2 | pixel AUROC |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    print(f"| {args.category} | {args.preset} | {args.lambda_perceptual:g} | {args.lambda_ssim:g} | {size} | "
          f"{args.epochs} | {info['n_train_images']} | "
          f"{args.train_batch_size} | {torch.get_num_threads()} | {info['seconds_per_epoch']:.2f} | "
          f"{info['fit_seconds']:.1f} | {len(labels) / score_seconds:.1f} | {losses[0]:.3g}→{losses[-1]:.3g} | "
          f"{image_auroc(labels, scores.image):.3f} | {best_balanced_accuracy(labels, scores.image)[1]:.3f} | "
          f"{pixel_auroc(masks, scores.maps) if masks is not None else float('nan'):.3f} |")


if __name__ == "__main__":
    main()
