"""The `onnxruntime` runtime: a network's levels exported once to ONNX, cached by content, run by
ONNX Runtime (about 2.5x faster than torch on a CPU: it fuses the batch norms into the convolutions).

The exported graph is a `LevelNetwork` at one image size (TF-style "same" padding is fixed by the
size when traced), with any batch size. Its file is named by a key of everything that decides it
(gaussad.networks.weights_identity: the bytes of the weights, or the hub name or seed with the timm
and torch versions; the levels; the image size), under $GAUSSAD_ONNX_CACHE (default
~/.cache/gaussad/onnx). A cached file is used without building the network (nor importing timm).
`OnnxSession` runs any graph taking images, this one or a whole exported detector (gaussad.export).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gaussad.errors import RuntimeUnavailableError, first_line
from gaussad.files import atomic_file
from gaussad.networks import LevelNetwork, identity_key, weights_identity

EXPORT_FORMAT = 1  # bump when the exported graph changes for the same inputs
OPSET = 17
# Images per ONNX Runtime run. Its memory arena keeps the largest run's activations for good (about
# 400 MB at 16 Lite0 images at 224 px, 125 MB at 4), and runs of 4 are no slower on a CPU.
RUN_IMAGES = 4


def cache_dir() -> Path:
    return Path(os.environ.get("GAUSSAD_ONNX_CACHE") or Path.home() / ".cache" / "gaussad" / "onnx")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def exported_network(name: str, weights: str, levels: Sequence[int], image_size: int, seed: int = 0) -> Path:
    """The ONNX file of `LevelNetwork(name, weights, levels)` at `image_size`, exported on first use."""
    identity = {**weights_identity(name, weights, seed), "levels": sorted(int(level) for level in levels),
                "image_size": int(image_size), "export_format": EXPORT_FORMAT, "opset": OPSET}
    path = cache_dir() / f"{name.replace('/', '_')}-{identity_key(identity)}.onnx"
    if path.is_file():
        return path
    network = LevelNetwork(name, weights, levels, seed).eval()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as partial:
            _export(network, image_size, partial)
    except OSError as err:
        raise RuntimeUnavailableError(f"cannot write the ONNX export cache {path.parent} ({err.strerror or err}): "
                                      f"set GAUSSAD_ONNX_CACHE to a folder you can write, or use --runtime torch"
                                      ) from None
    return path


def _export(network: LevelNetwork, image_size: int, path: Path) -> None:
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))  # not the global RNG
    try:
        export_graph(network, example, path, [f"level_{level}" for level in network.levels])
    except Exception as err:  # the exporter's errors come in many types
        raise RuntimeUnavailableError(
            f"cannot export the levels {list(network.levels)} of this backbone to ONNX "
            f"({type(err).__name__}: {first_line(err)}); use --runtime torch") from None


def export_graph(module: torch.nn.Module, example: torch.Tensor, path: str | Path, output_names: Sequence[str]) -> None:
    """Trace `module` on the images `example` and write it to `path` as an ONNX graph OnnxSession
    runs: input `images`, outputs `output_names`, the batch axis of each left free."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=list(output_names),
                          dynamic_axes={name: {0: "batch"} for name in ["images", *output_names]})


class OnnxSession:
    """An ONNX graph taking `images` [n, 3, S, S] on ONNX Runtime's CPU provider, in runs of at most
    RUN_IMAGES images, threads sized to the usable cores. Calls from several threads at once are safe."""

    def __init__(self, path: str | Path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = usable_cores()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: it warns about every shape it infers otherwise
        # its threads otherwise spin after each run, taking the cores from the decoding and the scoring
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise RuntimeUnavailableError(f"ONNX Runtime cannot load {path} ({first_line(err)}); "
                                          f"delete it to export it again, or use --runtime torch") from None
        shape = self.session.get_inputs()[0].shape
        self.image_size = shape[-1] if isinstance(shape[-1], int) else None

    def run(self, images_nchw: torch.Tensor) -> list[np.ndarray]:
        """The graph's outputs for a batch, in the graph's order."""
        if self.image_size and tuple(images_nchw.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images of shape {tuple(images_nchw.shape)}: the exported graph takes "
                             f"[n, 3, {self.image_size}, {self.image_size}]")
        images = np.ascontiguousarray(images_nchw.detach().cpu().numpy(), dtype=np.float32)
        runs = [self.session.run(None, {"images": images[start:start + RUN_IMAGES]})
                for start in range(0, len(images), RUN_IMAGES)]
        return [np.concatenate([outputs[i] for outputs in runs]) for i in range(len(runs[0]))]

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)


class OnnxLevels:
    """Runs an exported LevelNetwork: {level: [n, C, h, w] float32 torch tensor} of images in [0, 1]."""

    def __init__(self, path: Path, levels: Sequence[int]):
        self.session, self.levels = OnnxSession(path), tuple(levels)

    def __call__(self, images_nchw: torch.Tensor) -> dict[int, torch.Tensor]:
        return {level: torch.from_numpy(feats) for level, feats in zip(self.levels, self.session.run(images_nchw))}
