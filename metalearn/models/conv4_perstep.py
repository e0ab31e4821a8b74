"""conv4 with MAML++'s per-step BatchNorm (Antoniou, Edwards, Storkey. "How to train your MAML."
ICLR 2019, Sec. 4: "Per-step batch normalization running statistics" (BNRS) and "Per-step batch
normalization weights and biases" (BNWB)).

Same layout and parameter names as `Conv4` (features.{0..3}.conv.*, features.{0..3}.norm.*, head.*),
but every BatchNorm keeps one row of affine parameters and one row of running statistics per
inner step: norm.weight, norm.bias (S, C); buffers norm.running_mean, norm.running_var (S, C).
`forward(x, step=s, stats=...)` uses row min(s, S-1).

stats="batch" (default; transductive): normalise with the current batch's statistics, as
MAML++'s own code does at every step (it calls batch_norm with training=True); when the module
is in training mode the step's running statistics are updated with momentum 0.1 (under no_grad,
so they never enter a gradient). stats="running": normalise with the step's running statistics
(inductive evaluation; nothing is updated). The running statistics are model state saved in
state_dict, never read during meta-training, so no task's batch influences another's outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv4 import flat_features


class PerStepBatchNorm2d(nn.Module):
    def __init__(self, channels: int, steps: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.steps, self.eps, self.momentum = steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(steps, channels))
        self.bias = nn.Parameter(torch.zeros(steps, channels))
        self.register_buffer("running_mean", torch.zeros(steps, channels))
        self.register_buffer("running_var", torch.ones(steps, channels))

    def forward(self, x: Tensor, step: int = 0, stats: str = "batch") -> Tensor:
        r = min(step, self.steps - 1)
        if stats == "running":
            return F.batch_norm(x, self.running_mean[r], self.running_var[r], self.weight[r], self.bias[r],
                                training=False, eps=self.eps)
        if stats != "batch":
            raise ValueError(f"stats must be 'batch' or 'running', got {stats!r}")
        if self.training:
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                mean = x.detach().mean(dim=(0, 2, 3))
                var = x.detach().var(dim=(0, 2, 3), unbiased=False) * (n / max(n - 1, 1))
                self.running_mean[r].mul_(1 - self.momentum).add_(self.momentum * mean)
                self.running_var[r].mul_(1 - self.momentum).add_(self.momentum * var)
        return F.batch_norm(x, None, None, self.weight[r], self.bias[r], training=True, eps=self.eps)


class PerStepBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, steps: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = PerStepBatchNorm2d(out_channels, steps)

    def forward(self, x: Tensor, step: int = 0, stats: str = "batch") -> Tensor:
        return F.max_pool2d(self.norm(self.conv(x), step, stats), 2).relu()  # pool, then ReLU: as conv4


class Conv4PerStep(nn.Module):
    """conv4 whose BatchNorm layers are per inner step; forward(x, step, stats) -> logits (B, num_classes)."""

    per_step = True

    def __init__(self, in_channels: int = 1, num_classes: int = 5, hidden: int = 64, image_size: int = 28,
                 steps: int = 1, batchnorm: bool = True):
        super().__init__()
        if not batchnorm:
            raise ValueError("conv4_perstep is conv4 with per-step BatchNorm; use conv4 for a model without BatchNorm")
        self.features = nn.ModuleList([PerStepBlock(in_channels if i == 0 else hidden, hidden, steps)
                                       for i in range(4)])
        self.head = nn.Linear(flat_features(hidden, image_size), num_classes)

    def forward(self, x: Tensor, step: int = 0, stats: str = "batch") -> Tensor:
        for block in self.features:
            x = block(x, step, stats)
        return self.head(x.flatten(1))
