"""conv4 (Vinyals et al. 2016; Finn et al. 2017): 4 x [conv 3x3, BatchNorm, ReLU, max-pool 2] + linear head.

Parameter names read well in masks:
    features.0.conv.weight, features.0.conv.bias, features.0.norm.weight, features.0.norm.bias, ...
    head.weight, head.bias

BatchNorm is transductive (MAML's setting): `track_running_stats=False`, so every forward
pass, in training and at test time, normalises with the current batch's statistics and the
model holds no mutable buffer that tasks could share.
"""
from __future__ import annotations

from torch import Tensor, nn

from .batchnorm import channels_last_batch_norm
from .stem import conv_norm_pool, is_channels_last, stem_pays


def flat_features(hidden: int, image_size: int) -> int:
    """Size of the flattened feature map after four 2x max-pools: hidden * (image_size // 16)^2."""
    side = image_size
    for _ in range(4):
        side //= 2
    if side < 1:
        raise ValueError(f"conv4 needs images of at least 16x16 pixels, got {image_size}")
    return hidden * side * side


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, batchnorm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, track_running_stats=False) if batchnorm else nn.Identity()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        # max-pool, then ReLU: the same values as ReLU then max-pool (max commutes with the monotone ReLU)
        # and the same gradients (a window whose max is <= 0 passes no gradient either way), on 4x fewer
        # elements: about 12% faster per meta-step on CPU (measured).
        if self.stem(x):
            n = self.norm
            return conv_norm_pool(x, self.conv.weight, self.conv.bias, n.weight, n.bias, n.eps)
        return self.pool(normalise(self.norm, self.conv(x))).relu()

    def stem(self, x: Tensor) -> bool:
        """Whether this block runs as `conv_norm_pool` (metalearn/models/stem.py): CPU images into affine BatchNorm
        with batch statistics where `stem_pays`, on the fast paths only, which are

        - channels-last batches (the hybrid path's query sets, ProtoNet's images, metalearn/inner/layout.py);
        - the engine's vmap over tasks (hybrid's support sets), where the engine's view of the model has replaced
          this BatchNorm by its plain-reduction stand-in (`from_sums`, metalearn/inner/norm.py `BatchStats`).

        The per-task loop (NCHW images into the module's own BatchNorm: the reference path) never does."""
        n, conv = self.norm, self.conv
        if not (x.dim() == 4 and x.device.type == "cpu" and getattr(n, "weight", None) is not None
                and getattr(n, "bias", None) is not None):
            return False
        if getattr(n, "from_sums", False) is True:
            return stem_pays(conv.in_channels, conv.out_channels, None)
        elements = x.shape[0] * x.shape[2] * x.shape[3] * conv.out_channels
        return (type(n) is nn.BatchNorm2d and not n.track_running_stats and is_channels_last(x)
                and stem_pays(conv.in_channels, conv.out_channels, elements))


def normalise(norm: nn.Module, h: Tensor) -> Tensor:
    """norm(h); for BatchNorm on channels-last h, the same normalisation written from exact reductions.

    PyTorch's CPU BatchNorm kernel for channels-last float32 tensors accumulates each channel's
    statistics (and, in the backward, its gradient sums) over N*H*W elements in float32, one
    after another: on real Omniglot batches that put the hybrid path's float32 meta-gradient
    5e-3 away from float64 (relative L2), against 1.4e-6 for the per-task loop (issue #19;
    benchmarks/check_precision.py --real). The NCHW kernel is accurate but slow on channels-last
    activations (it needs two layout copies and its backward alone took 60 ms on a 75-image first
    layer here). So a channels-last h (the hybrid path's and ProtoNet's CPU images,
    metalearn/inner/layout.py) is normalised with batch statistics from `sum` (a cascade sum:
    accurate in float32, and fast over the outer dimensions of a channels-last tensor), two-pass:

        mean = sum(h) / M,  var = sum((h - mean)^2) / M,  y = (h - mean) * (weight / sqrt(var + eps)) + bias

    with M = N*H*W per channel: what BatchNorm computes in training mode (biased variance) without
    running statistics. Plain differentiable operations, so autograd gives the exact first and
    second derivatives. NCHW inputs, and BatchNorm that tracks running statistics, take the
    module's own path unchanged.
    """
    if isinstance(norm, nn.BatchNorm2d) and not norm.track_running_stats and h.dim() == 4 and not h.is_contiguous():
        return channels_last_batch_norm(h, norm.weight, norm.bias, norm.eps)
    return norm(h)


class Conv4(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 5, hidden: int = 64, image_size: int = 28,
                 batchnorm: bool = True):
        super().__init__()
        self.features = nn.Sequential(*[ConvBlock(in_channels if i == 0 else hidden, hidden, batchnorm)
                                        for i in range(4)])
        self.head = nn.Linear(flat_features(hidden, image_size), num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W) -> logits (B, num_classes)
        return self.head(self.features(x).flatten(1))
