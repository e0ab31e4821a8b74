"""ResNet-12, the few-shot backbone of MetaOptNet (Lee, Maji, Ravichandran, Soatto. "Meta-Learning with
Differentiable Convex Optimization." CVPR 2019) and FEAT (Ye, Hu, Zhan, Sha. "Few-Shot Learning via Embedding
Adaptation with Set-to-Set Functions." CVPR 2020), after TADAM (Oreshkin et al. 2018); DropBlock from Ghiasi,
Lin, Le. "DropBlock: A regularization method for convolutional networks." NeurIPS 2018.

    x (B, C, H, W)
    -> 4 residual blocks, widths `channels` (default 64-160-320-640), each:
         h = LeakyReLU_0.1(BN(conv3x3(x)));  h = LeakyReLU_0.1(BN(conv3x3(h)));  h = BN(conv3x3(h))
         s = BN(conv1x1(x))                                   # the shortcut
         y = MaxPool_2(LeakyReLU_0.1(h + s)), then dropout (blocks 1-2) or DropBlock (blocks 3-4)
    -> global average pooling (B, channels[-1]) -> linear head (B, num_classes)

84 px images leave 5x5 maps after the blocks (84 -> 42 -> 21 -> 10 -> 5); 28 px ones 1x1. The convolutions
have no bias (BatchNorm's shift stands in for it) and He-normal weights (fan-out, leaky ReLU), BatchNorm starts
at weight 1, bias 0, as in MetaOptNet's code.

Parameter names read well in masks:
    features.{0..3}.conv{1,2,3}.weight, features.{0..3}.norm{1,2,3}.{weight,bias},
    features.{0..3}.shortcut.conv.weight, features.{0..3}.shortcut.norm.{weight,bias}
    head.weight, head.bias
(`features.4` is the parameter-free global average pooling), and forward is head(features(x).flatten(1)), as
conv4's, so ANIL (adapt head.*), BOIL (adapt features.*) and the transfer baseline apply unchanged.

Constructor options (`model.kwargs`):
    channels        the four block widths, default [64, 160, 320, 640]
    drop_rate       0 = no dropout (default). > 0: MetaOptNet's regularisation: DropBlock in blocks 3 and 4
                    (the expected fraction of units dropped is about drop_rate) and ordinary dropout with the same
                    rate in blocks 1 and 2 (as MetaOptNet's code does). Both are identity in eval mode.
    dropblock_size  DropBlock's block side, default 5 (MetaOptNet: 5 on mini-ImageNet, 2 on CIFAR-FS/FC100);
                    clipped to the feature map when the map is smaller (28 px Omniglot leaves 3x3, then 1x1 maps).

Deviations from MetaOptNet's code, on purpose:
  * DropBlock's rate is constant. MetaOptNet ramps its drop rate linearly from 0 to drop_rate over the first
    40,000 forward passes of each block; a constant rate keeps the forward a pure function of (params, x, RNG)
    with no counter, which the inner loop and a vmap over tasks need.
  * The block mask is built with ordinary tensor operations (torch.rand_like, max_pool2d), so it works under
    `torch.func.vmap(..., randomness="different")` (a different mask for every task).
  * Global average pooling before the head (FEAT's form; MetaOptNet's mini-ImageNet model flattens 640x5x5).
  * model.hidden is not used: the widths are `channels` (so a preset's hidden=32 for conv4 does not silently
    shrink ResNet-12).
  * model.batchnorm=none: no normalisation, and the convolutions get biases instead.

BatchNorm follows model.batchnorm as conv4's does (metalearn/models/conv4.py): `transductive` =
`nn.BatchNorm2d(track_running_stats=False)`, batch statistics in every forward pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conv4 import normalise

WIDTHS = (64, 160, 320, 640)
SLOPE = 0.1  # LeakyReLU's negative slope


def check_options(channels: Sequence[int] = WIDTHS, drop_rate: float = 0.0, dropblock_size: int = 5) -> None:
    """ValueError naming the first bad option (model.kwargs of resnet12)."""
    if (not isinstance(channels, (list, tuple)) or len(channels) != 4
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
        raise ValueError(f"channels must be 4 positive integers (the block widths), got {channels!r}")
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be a number in [0, 1), got {drop_rate!r}")
    if isinstance(dropblock_size, bool) or not isinstance(dropblock_size, int) or dropblock_size < 1:
        raise ValueError(f"dropblock_size must be a positive integer, got {dropblock_size!r}")


def check_image_size(image_size: int) -> None:
    """Four 2x max-pools need at least 16x16 pixels."""
    if image_size is not None and image_size < 16:
        raise ValueError(f"resnet12 needs images of at least 16x16 pixels (four 2x max-pools), got {image_size}")


def drop_block(x: Tensor, rate: float, block_size: int) -> Tensor:
    """DropBlock (Ghiasi et al. 2018, Algorithm 1) on x (..., H, W): zero square blocks of side b, then rescale.

    Block seeds are drawn with probability gamma where a whole block fits (the top-left (H-b+1) x (W-b+1)
    positions; seed (i, j) drops [i, i+b) x [j, j+b)), with

        gamma = rate / b^2 * (H W) / ((H - b + 1)(W - b + 1)),

    so that about a `rate` fraction of the units is dropped (a little less where blocks overlap); every channel
    and every example draws its own seeds. The kept units are scaled by numel / kept, as in the paper.
    Plain tensor operations (rand_like, pad, max_pool2d), so it runs under
    `torch.func.vmap(..., randomness="different")`; b is clipped to the map (b = min(block_size, H, W)).
    """
    H, W = x.shape[-2], x.shape[-1]
    b = min(block_size, H, W)
    gamma = rate / (b * b) * (H * W) / ((H - b + 1) * (W - b + 1))
    seeds = (torch.rand_like(x[..., : H - b + 1, : W - b + 1]) < gamma).to(x.dtype)
    # a block covers the b x b positions to the bottom-right of its seed: max over the b x b seeds above-left
    dropped = F.max_pool2d(F.pad(seeds, (b - 1, b - 1, b - 1, b - 1)), b, stride=1)
    keep = 1 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp_min(1))


class DropBlock(nn.Module):
    """DropBlock(rate, block_size): `drop_block` in training mode; identity in eval mode or at rate 0."""

    def __init__(self, rate: float, block_size: int = 5):
        super().__init__()
        self.rate, self.block_size = rate, block_size

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0:
            return x
        return drop_block(x, self.rate, self.block_size)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, block_size={self.block_size}"


class ConvNorm(nn.Module):
    """conv then norm (the 1x1 shortcut): names shortcut.conv.*, shortcut.norm.*."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: Tensor) -> Tensor:
        return normalise(self.norm, self.conv(x))


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels, track_running_stats=False) if batchnorm else nn.Identity()


class ResBlock(nn.Module):
    """One ResNet-12 block: 3 x (conv 3x3, BN[, LeakyReLU]) plus a (conv 1x1, BN) shortcut, add, LeakyReLU,
    max-pool 2, then `drop` (identity, dropout or DropBlock)."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm: bool = True, drop: nn.Module | None = None):
        super().__init__()
        bias = not batchnorm  # BatchNorm's shift makes a conv bias redundant; without BatchNorm keep one
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm1 = _norm(out_channels, batchnorm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = _norm(out_channels, batchnorm)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm3 = _norm(out_channels, batchnorm)
        self.shortcut = ConvNorm(nn.Conv2d(in_channels, out_channels, 1, bias=bias), _norm(out_channels, batchnorm))
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H // 2, W // 2)
        h = F.leaky_relu(normalise(self.norm1, self.conv1(x)), SLOPE)
        h = F.leaky_relu(normalise(self.norm2, self.conv2(h)), SLOPE)
        h = normalise(self.norm3, self.conv3(h)) + self.shortcut(x)
        # max-pool, then LeakyReLU: the same values and gradients as the other order (max commutes with a
        # monotone activation), on 4x fewer elements (as conv4's ConvBlock)
        return self.drop(F.leaky_relu(F.max_pool2d(h, 2), SLOPE))


class ResNet12(nn.Module):
    """ResNet-12 (MetaOptNet / FEAT); see the module docstring. forward: (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5, hidden: int | None = None, image_size: int = 84,
                 batchnorm: bool = True, channels: Sequence[int] = WIDTHS, drop_rate: float = 0.0,
                 dropblock_size: int = 5):
        super().__init__()
        del hidden  # not used: the widths are `channels` (the module docstring says why)
        check_options(channels, drop_rate, dropblock_size)
        check_image_size(image_size)
        self.channels, self.drop_rate, self.dropblock_size = list(channels), float(drop_rate), dropblock_size
        blocks, width = [], in_channels
        for i, c in enumerate(channels):
            if drop_rate == 0:
                drop = None
            elif i < 2:  # MetaOptNet: ordinary dropout in the first two blocks, DropBlock in the last two
                drop = nn.Dropout(drop_rate)
            else:
                drop = DropBlock(drop_rate, dropblock_size)
            blocks.append(ResBlock(width, c, batchnorm, drop))
            width = c
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(width, num_classes)
        for m in self.features.modules():  # MetaOptNet's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W) -> logits (B, num_classes)
        return self.head(self.features(x).flatten(1))
