"""PIADE training (piade.md Table 1): the epochs, early stopping and resumable checkpoints.

Each epoch visits the images in an order drawn from (seed, epoch), so a run resumed from a checkpoint
continues exactly as the uninterrupted one. Mixed precision (float16 autocast + GradScaler) on CUDA;
routing and losses stay float32. Checkpoints: <checkpoint_dir>/epoch-NNNN/{model,optimizer}.safetensors
+ state.json, the latest kept; a fit with the same folder resumes from it. Optional early stopping
watches the held-out loss (the training loss without held-out images) and keeps the last weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from gaussad.errors import CheckpointError, first_line
from gaussad.model_folder import remove_abandoned_scratch, replace_folder, scratch_folder

CHECKPOINT_FORMAT_VERSION = 2
# Settings a resumed run may change: how long to train and when to stop, not what is trained.
RESUMABLE_CHANGES = ("epochs", "early_stopping_patience", "early_stopping_min_delta", "normal_quantile")


class TrainingRun:
    """One call of PiadeAD.fit (`model`, the PiadeAD being trained): the epochs, early stopping and
    checkpoints."""

    def __init__(self, model, train_x: torch.Tensor, held_x: torch.Tensor, data_digest: str,
                 checkpoint_dir: Path | None, checkpoint_every: int):
        self.model, self.train_x, self.held_x = model, train_x, held_x
        self.data_digest, self.checkpoint_dir, self.checkpoint_every = data_digest, checkpoint_dir, checkpoint_every
        trainable = [p for p in model.net.parameters() if p.requires_grad]
        c = model.config
        self.optimizer = torch.optim.Adam(trainable, lr=c["learning_rate"], weight_decay=c["weight_decay"])
        self.scaler = torch.amp.GradScaler(model.device.type, enabled=model.amp)
        self.history: list[dict] = []
        self.resumed_from = 0
        self.epoch_seconds: list[float] = []

    def train(self) -> None:
        if self.checkpoint_dir is not None:
            self.resumed_from = self._resume()
        epochs = self.model.config["epochs"]
        bar = tqdm(range(self.resumed_from + 1, epochs + 1), initial=self.resumed_from, total=epochs,
                   desc="training", unit="epoch", disable=not self.model.progress)
        for epoch in bar:
            if self._should_stop():  # a resumed run may have stopped early already
                break
            started = time.perf_counter()
            record = self._train_epoch(epoch)
            if self.model.config["early_stopping_patience"] is not None and len(self.held_x):
                record["holdout_loss"] = self._mean_loss(self.held_x)
            self.epoch_seconds.append(time.perf_counter() - started)
            record["seconds"] = round(self.epoch_seconds[-1], 3)
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            last = epoch == epochs or self._should_stop()
            if self.checkpoint_dir is not None and (epoch % self.checkpoint_every == 0 or last):
                self._save_checkpoint(epoch)

    def _train_epoch(self, epoch: int) -> dict:
        model, net, c = self.model, self.model.net, self.model.config
        net.train()
        n = len(self.train_x)
        # The order of epoch e depends on (seed, e) alone: a resumed run sees the same batches.
        order = np.random.default_rng([c["seed"], epoch]).permutation(n)
        sums: dict[str, float] = {}
        for rows in np.array_split(order, math.ceil(n / c["train_batch_size"])):  # no batch of 1 (batch norm)
            images = self.train_x[torch.from_numpy(rows)].to(model.device)
            with model.autocast():
                reconstructions = net(images).reconstruction
            terms = model.loss(images, reconstructions).per_image
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(terms["loss"].mean()).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for name, values in terms.items():
                sums[name] = sums.get(name, 0.0) + float(values.detach().sum())
        record = {"epoch": epoch, **{name: total / n for name, total in sums.items()}}
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"training diverged at epoch {epoch} (loss {record['loss']}): lower learning_rate")
        return record

    @torch.no_grad()
    def _mean_loss(self, images: torch.Tensor) -> float:
        self.model.net.eval()
        total = 0.0
        for start in range(0, len(images), self.model.batch_size):
            batch = images[start:start + self.model.batch_size].to(self.model.device)
            total += float(self.model.loss(batch, self.model.reconstruct(batch)).per_image["loss"].sum())
        return total / len(images)

    def _best_epoch(self) -> int:
        """The last epoch that improved the watched loss by more than min_delta: the held-out loss
        when there are held-out images, else the training loss."""
        best, best_epoch = math.inf, 0
        for record in self.history:
            value = record.get("holdout_loss", record["loss"])
            if value < best - self.model.config["early_stopping_min_delta"]:
                best, best_epoch = value, record["epoch"]
        return best_epoch

    def _should_stop(self) -> bool:
        """Early stopping: `patience` epochs without improvement (see _best_epoch)."""
        patience = self.model.config["early_stopping_patience"]
        if patience is None or not self.history:
            return False
        return self.history[-1]["epoch"] - self._best_epoch() >= patience

    def summary(self) -> dict:
        info = {
            "loss_history": self.history,
            "epochs_trained": self.history[-1]["epoch"] if self.history else 0,
            "stopped_early": self._should_stop() and self.history[-1]["epoch"] < self.model.config["epochs"],
            "resumed_from_epoch": self.resumed_from,
            "seconds_per_epoch": round(float(np.mean(self.epoch_seconds)), 3) if self.epoch_seconds else None,
        }
        if self.model.config["early_stopping_patience"] is not None:
            info["best_epoch"] = self._best_epoch()
        return info

    # ---- checkpoints: <dir>/epoch-NNNN/{model,optimizer}.safetensors + state.json (written last) ----

    def _save_checkpoint(self, epoch: int) -> None:
        directory = self.checkpoint_dir
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"epoch-{epoch:04d}"
        remove_abandoned_scratch(directory, ".epoch-*.partial-*")
        partial = scratch_folder(final)  # two flows training one model on one cache never share it
        net_state = {k: v.detach().cpu().contiguous() for k, v in self.model.net.state_dict().items()}
        save_file(net_state, str(partial / "model.safetensors"))
        optimizer_state = self.optimizer.state_dict()
        save_file({f"{index}.{name}": value.detach().cpu().contiguous()
                   for index, state in optimizer_state["state"].items() for name, value in state.items()},
                  str(partial / "optimizer.safetensors"))
        state = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "epoch": epoch,
            "config": self.model.config,
            "data_digest": self.data_digest,
            "loss_history": self.history,
            "optimizer_param_groups": optimizer_state["param_groups"],
            "grad_scaler": self.scaler.state_dict(),
        }
        (partial / "state.json").write_text(json.dumps(state, indent=1))
        replace_folder(partial, final)
        for older in directory.glob("epoch-*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)

    def _resume(self) -> int:
        """Restore the latest checkpoint, if any; returns its epoch (0 when there is none)."""
        done = sorted(p for p in self.checkpoint_dir.glob("epoch-*") if (p / "state.json").is_file()) \
            if self.checkpoint_dir.is_dir() else []
        if not done:
            return 0
        folder = done[-1]
        try:
            state = json.loads((folder / "state.json").read_text())
            net_state = load_file(str(folder / "model.safetensors"))
            optimizer_tensors = load_file(str(folder / "optimizer.safetensors"))
        except (OSError, json.JSONDecodeError, SafetensorError) as err:
            raise CheckpointError(f"cannot read checkpoint {folder}: {err}") from None
        self._check_compatible(state, folder)
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        try:
            for key, value in optimizer_tensors.items():
                index, name = key.split(".", 1)
                per_param.setdefault(int(index), {})[name] = value
            self.model.net.load_state_dict(net_state)
            self.optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer_param_groups"]})
            self.scaler.load_state_dict(state["grad_scaler"])
        except (KeyError, ValueError, RuntimeError) as err:  # torch reports a mismatch as RuntimeError
            raise CheckpointError(f"checkpoint {folder} does not fit this model: {first_line(err)}") from None
        self.history = state["loss_history"]
        return state["epoch"]

    def _check_compatible(self, state: dict, folder: Path) -> None:
        if not isinstance(state.get("epoch"), int) or not isinstance(state.get("loss_history"), list):
            raise CheckpointError(f"checkpoint {folder}: state.json lacks its epoch or loss history")
        saved, current = state.get("config", {}), self.model.config
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            raise CheckpointError(f"checkpoint {folder} was trained with other settings ({', '.join(changed)}): "
                                  f"use another checkpoint_dir or the same settings")
        if state.get("data_digest") != self.data_digest:
            raise CheckpointError(f"checkpoint {folder} was trained on other images (or another holdout split): "
                                  f"use another checkpoint_dir")
        if state["epoch"] > current["epochs"]:
            raise CheckpointError(f"checkpoint {folder} is at epoch {state['epoch']}, beyond the "
                                  f"{current['epochs']} epochs asked for")


def only_checkpoints(names: list[str]) -> bool:
    """A checkpoint folder is recognised by its layout (it gets no marker file): epoch folders only."""
    return all(name.startswith(("epoch-", ".epoch-")) for name in names)


def paths_digest(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()
