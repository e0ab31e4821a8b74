"""Models by name. Each takes (in_channels, num_classes, image_size) plus its own options."""
from __future__ import annotations

from torch import nn

from .conv4 import Conv4, ConvBlock

MODELS = {"conv4": Conv4}


def build_model(cfg, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """cfg: a ModelConfig."""
    return MODELS[cfg.name](in_channels=in_channels, num_classes=num_classes, hidden=cfg.hidden,
                            image_size=image_size, batchnorm=cfg.batchnorm != "none")


__all__ = ["MODELS", "Conv4", "ConvBlock", "build_model"]
