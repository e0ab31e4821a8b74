"""The sinusoid-regression MLP of MAML (Finn et al. 2017, Sec. 5.1): 1 -> 40 -> 40 -> 1 with ReLU.

Laid out as head(features(x).flatten(1)) like conv4, so the same masks apply:
    features.0.weight, features.0.bias, features.2.weight, features.2.bias, head.weight, head.bias
No BatchNorm.
"""
from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 1, hidden: int = 40, image_size: int | None = None,
                 batchnorm: bool = False, layers: int = 2):
        super().__init__()
        mods = []
        for i in range(layers):
            mods += [nn.Linear(in_channels if i == 0 else hidden, hidden), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, in_channels) -> (B, num_classes)
        return self.head(self.features(x).flatten(1))
