"""Pretrained CNN features per level (the networks: gaussad.networks), on one of two runtimes, and
the on-disk store of a data set's features.

Runtimes: `torch` (channels_last on a CPU, fp16 autocast on a GPU) and `onnxruntime` (the network
exported once, gaussad.onnx_features; on a CPU about 2.5x faster). The default is onnxruntime on a
CPU and torch on a GPU. Nothing falls back from one to the other: a runtime that cannot run a
backbone says so and names the other.
Images are decoded and resized by a pool of threads (decoding releases the GIL), a few batches
ahead of the network, so decoding overlaps the forward pass; each image is decoded once.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from gaussad.data import read_rgb
from gaussad.networks import LevelNetwork, resolve_device
from gaussad.onnx_features import OnnxLevels, exported_network, usable_cores
from gaussad.validation import check_choice

RUNTIMES = ("torch", "onnxruntime")
PREFETCH_BATCHES = 2  # batches decoded ahead of the one the network is on


def resolve_runtime(runtime: str | None, device: torch.device) -> str:
    """`runtime` checked against the device (None: onnxruntime on a CPU, torch on a GPU)."""
    if runtime is None:
        return "onnxruntime" if device.type == "cpu" else "torch"
    check_choice("runtime", runtime, RUNTIMES)
    if runtime == "onnxruntime" and device.type != "cpu":
        raise ValueError(f"runtime onnxruntime runs on the CPU here, not on {device}: use --runtime torch")
    return runtime


class Backbone:
    """A frozen CNN returning the feature maps of chosen levels: {level: N×C×h×w float32}."""

    def __init__(
        self,
        name: str,
        weights: str,
        levels: Sequence[int],
        image_size: int,
        device: str | torch.device | None = None,
        amp: bool | None = None,
        seed: int = 0,
        runtime: str | None = None,
    ):
        self.name, self.weights, self.image_size = name, weights, int(image_size)
        self.levels = tuple(sorted(int(level) for level in levels))
        self.device = resolve_device(device)
        self.runtime = resolve_runtime(runtime, self.device)
        self.amp = self.device.type == "cuda" if amp is None else amp
        if self.runtime == "onnxruntime":
            self.network = None
            path = exported_network(name, weights, self.levels, self.image_size, seed)
            self._onnx = OnnxLevels(path, self.levels)
        else:
            # channels_last: 2.3x faster convolutions on this CPU (36 -> 16 ms per 224 px Lite0 image, up to level 5)
            self.network = LevelNetwork(name, weights, self.levels, seed).eval()
            self.network.to(self.device, memory_format=torch.channels_last)

    @torch.no_grad()
    def extract(self, images_nchw: torch.Tensor) -> dict[int, torch.Tensor]:
        """Features of a batch of RGB images in [0, 1] at image_size × image_size, on the device.
        Threads may call it at once (a served model does)."""
        if self.runtime == "onnxruntime":
            return self._onnx(images_nchw)
        x = images_nchw.to(self.device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            outputs = self.network(x)
        # float32, back from channels_last to the usual N×C×h×w layout
        return {level: feats.float().contiguous() for level, feats in zip(self.levels, outputs)}

    def channels(self) -> dict[int, int]:
        """Channel count per level, from one forward pass."""
        probe = torch.zeros(1, 3, self.image_size, self.image_size)
        return {level: feats.shape[1] for level, feats in self.extract(probe).items()}


def image_batches(paths: Sequence[Path], image_size: int, batch_size: int,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """Preprocessed N×3×S×S batches in [0, 1] of image files, in order. A pool of threads (one per
    core) decodes one image per task, up to PREFETCH_BATCHES batches beyond the one being yielded."""
    paths = list(paths)
    pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="gaussad-decode")
    decode = lambda path: to_tensor(read_rgb(path), image_size)  # noqa: E731
    pending = deque(pool.submit(decode, path) for path in paths[:(PREFETCH_BATCHES + 1) * batch_size])
    queued = len(pending)
    try:
        for start in range(0, len(paths), batch_size):
            images = []
            for _ in range(min(batch_size, len(paths) - start)):
                images.append(pending.popleft().result())  # a file that cannot be read raises here
                if queued < len(paths):
                    pending.append(pool.submit(decode, paths[queued]))
                    queued += 1
            batch = torch.stack(images)
            yield batch.pin_memory() if device.type == "cuda" else batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB PIL image resized (bilinear, antialiased) to a 3×S×S float tensor in [0, 1]."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class FeatureStore:
    """Feature maps of a list of images on disk, one float32 `level_<l>.npy` [N, C, h, w] per level.

    Fitting reads the features twice (see gaussad.gaussian); keeping them on disk rather than in
    memory keeps memory flat however many training images there are. `meta.json` is written last,
    so a folder without it is an interrupted extraction and is refused.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory} holds no complete feature store (no meta.json)")
        meta = json.loads(meta_path.read_text())
        self.levels: tuple[int, ...] = tuple(meta["levels"])
        self.paths: tuple[str, ...] = tuple(meta["paths"])
        self.seconds: float | None = meta.get("seconds")  # how long the extraction took

    @classmethod
    def write(
        cls,
        backbone: Backbone,
        paths: Sequence[Path],
        directory: str | Path,
        batch_size: int,
        progress: bool = True,
        description: str = "extracting features",
    ) -> "FeatureStore":
        """Extract the features of `paths` batch by batch, appending each level to its .npy file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        files: dict[int, BinaryIO] = {}
        batches = image_batches(paths, backbone.image_size, batch_size, backbone.device)
        total = math.ceil(len(paths) / batch_size)
        try:
            for batch in tqdm(batches, total=total, desc=description, unit="batch", disable=not progress):
                for level, feats_nchw in backbone.extract(batch).items():
                    if level not in files:  # plain appends, not a memory map: pages written don't stay resident
                        files[level] = open(directory / f"level_{level}.npy", "wb")
                        header = {"descr": "<f4", "fortran_order": False, "shape": (len(paths), *feats_nchw.shape[1:])}
                        np.lib.format.write_array_header_2_0(files[level], header)
                    files[level].write(feats_nchw.cpu().numpy().astype("<f4", copy=False).tobytes())
        finally:
            for file in files.values():
                file.close()
        meta = {"levels": list(backbone.levels), "paths": [str(p) for p in paths],
                "seconds": round(time.perf_counter() - started, 3)}
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))
        return cls(directory)

    def __len__(self) -> int:
        return len(self.paths)

    def level(self, level: int) -> np.ndarray:
        """The [N, C, h, w] features of one level, memory-mapped (for inspection; fitting uses chunks)."""
        return np.load(self.directory / f"level_{level}.npy", mmap_mode="r")

    def chunks(self, level: int, rows: Sequence[int] | None = None,
               max_bytes: int = 8 * 2**20) -> Iterator[torch.Tensor]:
        """The level's features in [n, C, h, w] chunks of at most ~max_bytes each, read from the file;
        with `rows`, only those images (in file order)."""
        keep = None if rows is None else np.isin(np.arange(len(self)), np.asarray(rows, dtype=int))
        with open(self.directory / f"level_{level}.npy", "rb") as file:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                np.lib.format.read_magic(file), np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(file)
            per_image = max(1, int(np.prod(shape[1:])) * dtype.itemsize)
            step = max(1, max_bytes // per_image)
            for start in range(0, shape[0], step):
                n = min(step, shape[0] - start)
                feats = np.fromfile(file, dtype=dtype, count=n * int(np.prod(shape[1:]))).reshape(n, *shape[1:])
                if keep is not None:
                    feats = feats[keep[start : start + n]]
                if len(feats):
                    yield torch.from_numpy(feats)

    def batches(self, rows: Sequence[int] | None = None, batch_size: int = 16) -> Iterator[dict[int, torch.Tensor]]:
        """{level: [n, C, h, w]} for `rows` (all images by default), batch by batch, for scoring."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=int)
        levels = {level: self.level(level) for level in self.levels}
        for start in range(0, len(rows), batch_size):
            picked = rows[start : start + batch_size]
            yield {level: torch.from_numpy(np.array(feats[picked])) for level, feats in levels.items()}
