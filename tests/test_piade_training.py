"""gaussad.piade.training: the loss history, checkpoints, resumption equal to the uninterrupted run
(after a finished run and after an interruption), refused resumptions, early stopping."""

from __future__ import annotations

import shutil

import pytest
import torch
from piade_helpers import FAST, demo_category

from gaussad.errors import CheckpointError
from gaussad.piade import PiadeAD
from gaussad.piade.training import TrainingRun


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return demo_category(tmp_path_factory.mktemp("piade-demo"))


@pytest.fixture(scope="module")
def runs(category, tmp_path_factory):
    """The same seed trained 4 epochs at once; 2 epochs with a checkpoint, then resumed to 4; and a
    4-epoch run interrupted in epoch 3, then resumed."""
    checkpoints, interrupted = tmp_path_factory.mktemp("checkpoints"), tmp_path_factory.mktemp("interrupted")
    whole = PiadeAD(**FAST, epochs=4).fit(category.train)
    first_half = PiadeAD(**FAST, epochs=2).fit(category.train, checkpoint_dir=checkpoints)
    after_first_half = sorted(p.name for p in checkpoints.iterdir())
    resumed = PiadeAD(**FAST, epochs=4).fit(category.train, checkpoint_dir=checkpoints)

    train_epoch = TrainingRun._train_epoch

    def interrupt_in_epoch_3(run, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return train_epoch(run, epoch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingRun, "_train_epoch", interrupt_in_epoch_3)
        with pytest.raises(KeyboardInterrupt):
            PiadeAD(**FAST, epochs=4).fit(category.train, checkpoint_dir=interrupted)
    after_interruption = sorted(p.name for p in interrupted.iterdir())
    resumed_after_interruption = PiadeAD(**FAST, epochs=4).fit(category.train, checkpoint_dir=interrupted)
    return {"whole": whole, "first_half": first_half, "resumed": resumed, "checkpoints": checkpoints,
            "after_first_half": after_first_half, "after_interruption": after_interruption,
            "resumed_after_interruption": resumed_after_interruption}


def test_training_lowers_the_loss_and_records_its_history(runs):
    info = runs["whole"].fit_info
    history = info["loss_history"]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert {"epoch", "loss", "mse", "perceptual", "ssim", "seconds"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"]
    assert info["n_train_images"] == 7 and info["n_holdout_images"] == 1
    assert info["epochs_trained"] == 4 and info["fit_seconds"] > 0 and info["seconds_per_epoch"] > 0
    assert set(runs["whole"].thresholds) == {"image_normal_quantile", "pixel_normal_quantile", "pixel_normal_median"}


@pytest.mark.parametrize("resumed_run", ["resumed", "resumed_after_interruption"])
def test_resumed_training_equals_the_uninterrupted_run(runs, resumed_run):
    whole, resumed = runs["whole"], runs[resumed_run]
    assert runs["after_first_half"] == runs["after_interruption"] == ["epoch-0002"]
    assert resumed.fit_info["resumed_from_epoch"] == 2
    losses = [r["loss"] for r in whole.fit_info["loss_history"]]
    assert [r["loss"] for r in runs["first_half"].fit_info["loss_history"]] == losses[:2]  # same seed, same start
    assert [r["loss"] for r in resumed.fit_info["loss_history"]] == losses
    expected, actual = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert whole.thresholds == resumed.thresholds


def test_checkpoints_hold_the_latest_epoch_without_pickle(runs):
    folders = list(runs["checkpoints"].iterdir())
    assert [p.name for p in folders] == ["epoch-0004"]
    assert sorted(p.name for p in folders[0].iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]


def test_resuming_with_other_settings_or_images_or_a_broken_checkpoint_is_refused(runs, category, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs["checkpoints"], checkpoints)
    with pytest.raises(CheckpointError, match="other settings .*learning_rate"):
        PiadeAD(**FAST, epochs=4, learning_rate=1e-4).fit(category.train, checkpoint_dir=checkpoints)
    with pytest.raises(CheckpointError, match="other images"):
        PiadeAD(**FAST, epochs=4).fit(category.train.paths[:-1], checkpoint_dir=checkpoints)
    with pytest.raises(CheckpointError, match="beyond the 3 epochs"):
        PiadeAD(**FAST, epochs=3).fit(category.train, checkpoint_dir=checkpoints)
    weights = checkpoints / "epoch-0004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*epoch-0004"):
        PiadeAD(**FAST, epochs=4).fit(category.train, checkpoint_dir=checkpoints)


def test_early_stopping_stops_when_the_held_out_loss_stops_improving(category):
    model = PiadeAD(**FAST, epochs=6, early_stopping_patience=1, early_stopping_min_delta=1e6)
    model.fit(category.train)
    info = model.fit_info
    assert info["stopped_early"] and info["epochs_trained"] == 2 and info["best_epoch"] == 1
    assert all("holdout_loss" in record for record in info["loss_history"])
