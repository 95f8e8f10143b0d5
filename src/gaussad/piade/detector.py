"""PiadeAD: PIADE (piade.md) as a fit/score/save/load detector; the reconstruction loss is the score.

The settings are gaussad.piade.settings, the network gaussad.piade.network, the loss
gaussad.piade.loss, the training loop with its checkpoints gaussad.piade.training. The constructor
only checks and keeps the settings: the networks are built when first needed (fit, score, load).
Training follows Table 1 of the paper (the `paper` preset): Adam, learning rate 1e-3, weight decay
1e-4 (on every trainable weight, the trunk's included), batch 120, 400 epochs, 120 px. Weights: the
trunk and the perceptual network come from gaussad.networks weight sources; a saved model holds
every tensor, the perceptual network's too, so loading needs no weight source. A saved model is a
folder: config.json + weights.safetensors (no pickle).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gaussad.base_detector import Detector, Scores, image_paths, split_holdout
from gaussad.data import ImageSet, read_rgb
from gaussad.errors import ModelFileError, WeightsError
from gaussad.features import to_tensor
from gaussad.networks import seeded
from gaussad.output_folders import check_output_folder
from gaussad.piade.loss import PerceptualFeatures, ReconstructionLoss
from gaussad.piade.network import PiadeNet
from gaussad.piade.settings import PRESETS, SETTINGS
from gaussad.piade.training import TrainingRun, only_checkpoints, paths_digest
from gaussad.validation import check_number


class PiadeAD(Detector):
    """PIADE as a fit/score/save/load anomaly detector, with GaussianAD's interface. Its settings,
    their defaults and meaning: `PiadeAD.SETTINGS` (gaussad.piade.settings)."""

    MODEL_TYPE = "piade"
    NAME = "PIADE"
    SETTINGS = SETTINGS
    PRESETS = PRESETS
    PARAMS_BLOCK = "piade"
    TENSORS_FILE = "weights.safetensors"
    RECONSTRUCTS = True
    CHECKPOINTS = True
    NETWORK_SETTINGS = ("backbone", "weights", "perceptual", "perceptual_weights")

    def __init__(self, *, batch_size: int = 16, device: str | torch.device | None = None, progress: bool = True,
                 pretrained: bool = True, runtime: str | None = None, **settings):
        """`pretrained` False leaves the networks' weights random (seeded) and touches no weight
        source: for a saved state to replace (load). `runtime`: PIADE runs on torch only."""
        if runtime not in (None, "torch"):
            raise ValueError(f"runtime {runtime!r}: PIADE runs on torch only "
                             f"(onnxruntime is for the Gaussian detector)")
        self._set_runtime(device, batch_size, progress, "torch")
        self._configure(settings)
        self.pretrained = pretrained
        self.amp = self.device.type == "cuda"
        self._net: PiadeNet | None = None
        self._loss: ReconstructionLoss | None = None

    def _weight_source(self, setting: str) -> str:
        return self.config[setting] if self.pretrained else "none"

    @property
    def net(self) -> PiadeNet:
        """The reconstruction network, built on first use."""
        if self._net is None:
            c = self.config
            with seeded(c["seed"]):  # the same seed builds the same initial network
                self._net = PiadeNet(
                    c["backbone"], self._weight_source("weights"), c["image_size"], c["se_reduction"],
                    c["pyramid_sizes"], c["pyramid_channels"], c["capsule_dim"], c["n_vectors"], c["latent_dim"],
                    c["routing_iterations"], c["upsample_channels"], c["seed"],
                ).to(self.device).eval()
        return self._net

    @property
    def loss(self) -> ReconstructionLoss:
        """Eq. 5 with its perceptual network (none when lambda_perceptual is 0), built on first use."""
        if self._loss is None:
            c = self.config
            perceptual_network = None
            if c["lambda_perceptual"] > 0:
                perceptual_network = PerceptualFeatures(c["perceptual"], self._weight_source("perceptual_weights"),
                                                        c["seed"])
            self._loss = ReconstructionLoss(c["lambda_perceptual"], c["lambda_ssim"],
                                            perceptual_network).to(self.device)
        return self._loss

    def describe(self) -> str:
        c = self.config
        return (f"PIADE: {c['backbone']} trunk ({c['weights']}), perceptual {c['perceptual']}, {c['image_size']} px, "
                f"{self.fit_info.get('epochs_trained', 0)} epochs, λ1 {c['lambda_perceptual']}, λ2 {c['lambda_ssim']}")

    # ---- training --------------------------------------------------------------------------------

    def fit(self, images: ImageSet | Sequence[str | Path], holdout: float = 0.1,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1) -> "PiadeAD":
        """Train on defect-free images; a seeded `holdout` fraction is kept back to set the thresholds
        (and, with early stopping, to watch). With `checkpoint_dir`, a checkpoint is written every
        `checkpoint_every` epochs and at the end, and training resumes from the latest one there."""
        if self.is_fitted:
            raise RuntimeError("this PiadeAD is already trained: create a new one to train again")
        check_number("checkpoint_every", checkpoint_every, int, 1)
        if checkpoint_dir is not None:  # refused before any compute if it holds a user's files
            check_output_folder(checkpoint_dir, "checkpoints", adopt=only_checkpoints)
        started = time.perf_counter()
        paths = [str(p) for p in image_paths(images)]
        self.check_false_alarm_evidence(len(paths), holdout)
        fit_rows, held_rows = split_holdout(len(paths), holdout, self.config["seed"])
        train_x = self._load_images([paths[i] for i in fit_rows], "loading training images")
        held_x = self._load_images([paths[i] for i in held_rows], "loading held-out images")
        run = TrainingRun(self, train_x, held_x, paths_digest([paths[i] for i in fit_rows]),
                           Path(checkpoint_dir) if checkpoint_dir is not None else None, checkpoint_every)
        run.train()
        self.net.eval()
        self.set_normal_thresholds(self._score_tensor(held_x if len(held_x) else train_x))
        self.record_fit(time.perf_counter() - started, len(fit_rows), len(held_rows), device=str(self.device),
                        amp=self.amp, **run.summary())
        return self

    def _load_images(self, paths: Sequence[str], description: str) -> torch.Tensor:
        """[N, 3, S, S] float32 on the CPU, images in [0, 1]."""
        size = self.config["image_size"]
        tensors = [to_tensor(read_rgb(p), size) for p in tqdm(paths, desc=description, disable=not self.progress)]
        return torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.float16) if self.amp else nullcontext()

    # ---- scoring -----------------------------------------------------------------------------------

    @torch.no_grad()
    def score_batch(self, images_nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a preprocessed batch (RGB in [0, 1] at image size): ([n], [n, S, S] float32)."""
        images = images_nchw.to(self.device).float()
        terms = self.loss(images, self.reconstruct(images), maps=True)
        return terms.per_image["loss"].cpu().numpy(), terms.maps.float().cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, images_nchw: torch.Tensor) -> torch.Tensor:
        """Test-time reconstructions [n, 3, S, S] in [0, 1] (the longer vector decoded), on the device."""
        self.net.eval()
        with self.autocast():
            return self.net(images_nchw.to(self.device).float()).reconstruction.float()

    def _score_tensor(self, images_nchw: torch.Tensor) -> Scores:
        return Scores.concatenate([self.score_batch(images_nchw[i:i + self.batch_size])
                                   for i in range(0, len(images_nchw), self.batch_size)])

    @property
    def is_fitted(self) -> bool:
        return bool(self.fit_info)

    # ---- save / load ---------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The network's state and the perceptual network's, so loading needs no weight source."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        if self.loss.perceptual is not None:
            tensors.update({f"perceptual.{k}": v for k, v in self.loss.perceptual.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    @classmethod
    def _unfitted(cls, config: dict, device, progress: bool, batch_size: int, runtime: str | None) -> "PiadeAD":
        model = cls(device=device, progress=progress, batch_size=batch_size, runtime=runtime, pretrained=False)
        model._configure(config, check_effect=False)
        return model

    def _load_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        try:
            net, perceptual = self.net, self.loss.perceptual
        except WeightsError as err:  # a backbone timm does not know: the folder's fault (load says so)
            raise ValueError(str(err)) from None
        self._load_state(net, "net.", tensors, path)
        if perceptual is not None:
            self._load_state(perceptual, "perceptual.", tensors, path)
        net.eval()

    def _load_state(self, module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ModelFileError(f"{path} lacks {len(missing)} tensor(s) of {prefix.rstrip('.')}, e.g. {missing[:3]}")
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ModelFileError(
                    f"{path}: tensor {prefix}{key} has shape {tuple(state[key].shape)}, but "
                    f"{self.config['backbone']} at {self.config['image_size']} px needs {tuple(tensor.shape)}"
                )
        module.load_state_dict({k: state[k] for k in expected})

