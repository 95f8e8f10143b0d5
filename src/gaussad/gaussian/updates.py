"""Adding defect-free images to a fitted Gaussian model exactly, without the images it was fitted on.

A model fitted with `updatable` keeps, per Gaussian, its float64 streaming sums (n, the shift K,
Σ(x-K), Σ(x-K)(x-K)ᵀ: gaussad.gaussian.statistics.MomentAccumulator). An update adds the new images'
features to those sums and decomposes them again, so with a ridge covariance the updated model is
the model a fit on all the images would give (NPCA's axes move with the covariance: they are found
again from the summed moments). Ledoit-Wolf shrinkage needs a second pass over every image in the
reduced space, which the sums cannot give: such a model is refused, with what to run instead.

Thresholds: the held-out normal images are their evidence. An update holds out the same seeded
fraction of the new images and scores them with the updated model together with the earlier
held-out images, read again from the paths recorded at fit when their content is unchanged
(SHA-256); those that are gone are left out, and counted. Memory does not grow with the images
already in the model: the sums have a fixed size.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import torch

from gaussad.base_detector import Detector, Scores, split_holdout
from gaussad.errors import ModelFileError
from gaussad.features import FeatureStore
from gaussad.files import file_sha256
from gaussad.gaussian.statistics import MomentAccumulator

MOMENT_FIELDS = ("n", "shift", "sum", "outer")


def check_updatable(model: Detector) -> None:
    """ValueError, before any compute, for a model (a GaussianAD) an update cannot add images to exactly."""
    model.check_fitted()
    if model.config["covariance"] != "ridge":
        raise ValueError("a Ledoit-Wolf model cannot be updated exactly (its shrinkage needs a second pass over "
                         "every image): fit it again on all the images (gaussad fit), or fit with --covariance ridge "
                         "--updatable to update later")
    if not model.config["updatable"]:
        raise ValueError("this model was fitted without its sums (updatable false), so images cannot be added: "
                         "fit it again with --updatable (gaussad fit ... --updatable)")


def update_store(model: Detector, store: FeatureStore, holdout: float) -> None:
    """Add the images of `store` to `model`, a GaussianAD (see the module docstring)."""
    check_updatable(model)
    started = time.perf_counter()
    new_rows, held_rows = split_holdout(len(store), holdout, model.config["seed"])
    model.fit_features(store, new_rows, add=True)
    earlier = [(path, digest) for path, digest in model.fit_info.get("held_out_images", [])
               if Path(path).is_file() and file_sha256(path) == digest]
    parts = [model._score_parts(feats) for feats in store.batches(held_rows or new_rows, model.batch_size)]
    if earlier:
        with tempfile.TemporaryDirectory(prefix="gaussad-held-out-") as tmp:
            earlier_store = FeatureStore.write(model.backbone, [Path(p) for p, _ in earlier], tmp, model.batch_size,
                                               model.progress, "earlier held-out images")
            parts += [model._score_parts(feats) for feats in earlier_store.batches(None, model.batch_size)]
    if model.config["image_score"] == "combined":
        model.score_scale = model._score_scale(parts)
    model.set_normal_thresholds(Scores.concatenate([model._scores(*part) for part in parts]))
    missing = len(model.fit_info.get("held_out_images", [])) - len(earlier)
    model.fit_info.update(
        n_train_images=model.fit_info["n_train_images"] + len(new_rows),
        n_holdout_images=len(earlier) + len(held_rows),
        held_out_images=earlier + held_out_images(store, held_rows),
    )
    model.fit_info.setdefault("updates", []).append({
        "n_images": len(store), "n_added": len(new_rows), "n_held_out": len(held_rows),
        "earlier_held_out_missing": missing, "images_sha256": images_digest(store.paths),
        "seconds": round(time.perf_counter() - started, 3),
    })


def held_out_images(store: FeatureStore, rows: list[int]) -> list[list[str]]:
    """[path, SHA-256] of the held-out rows' images: what an update scores again."""
    return [[store.paths[row], file_sha256(store.paths[row])] for row in rows]


def images_digest(paths) -> str:
    """SHA-256 over the images' contents in order: which images a version was updated with."""
    return digests_digest(file_sha256(path) for path in paths)


def digests_digest(hex_digests) -> str:
    """images_digest of the images whose SHA-256 digests (hex) these are, in order, without reading them."""
    digest = hashlib.sha256()
    for hex_digest in hex_digests:
        digest.update(bytes.fromhex(hex_digest))
    return digest.hexdigest()


def moment_tensors(moments: dict[str, MomentAccumulator]) -> dict[str, torch.Tensor]:
    return {f"moments.{name}.{field}": tensor.contiguous().cpu()
            for name, accumulator in moments.items() for field, tensor in accumulator.state().items()}


def load_moments(tensors: dict[str, torch.Tensor], names: list[str], path: Path) -> dict[str, MomentAccumulator]:
    """The saved sums of the Gaussians `names`; ModelFileError names what is missing or wrong."""
    moments = {}
    for name in names:
        try:
            state = {field: tensors[f"moments.{name}.{field}"] for field in MOMENT_FIELDS}
            moments[name] = MomentAccumulator.from_state(state)
        except KeyError as missing:
            raise ModelFileError(f"{path} lacks tensor {missing} (an updatable model keeps its sums)") from None
        except ValueError as err:
            raise ModelFileError(f"{path}: {name}: {err}") from None
    return moments
