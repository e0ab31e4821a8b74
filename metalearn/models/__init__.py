"""Models by name. Each takes (in_channels, num_classes, image_size) plus its own options."""
from __future__ import annotations

from torch import nn

from .conv4 import Conv4, ConvBlock
from .conv4_perstep import Conv4PerStep
from .mlp import MLP

MODELS = {"conv4": Conv4, "conv4_perstep": Conv4PerStep, "mlp": MLP}


def build_model(cfg, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """cfg: a ModelConfig."""
    extra = {"steps": cfg.bn_steps} if cfg.name == "conv4_perstep" else {}
    return MODELS[cfg.name](in_channels=in_channels, num_classes=num_classes, hidden=cfg.hidden,
                            image_size=image_size, batchnorm=cfg.batchnorm != "none", **extra)


__all__ = ["MODELS", "Conv4", "Conv4PerStep", "ConvBlock", "MLP", "build_model"]
