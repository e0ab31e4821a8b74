"""A first convolution block (conv 3x3 on few input channels, BatchNorm with batch statistics, max-pool 2, ReLU)
with BatchNorm's statistics taken from the input's patches instead of the full-size activation.

Where it runs: conv4's first block (`ConvBlock.forward`, `ConvBlock.stem`) on a CPU where `stem_pays` (few input
channels against the block's width, a large activation: Omniglot at 32 or 64 filters, not mini-ImageNet's RGB
at 32) on the fast paths: channels-last batches (the hybrid path's query passes and ProtoNet's images,
metalearn/inner/layout.py) and the engine's vmap over tasks (hybrid's support passes, differentiated twice). The
per-task loop (NCHW images: the reference path) runs `ConvBlock`'s plain operations.

Why. The first layer's activation is the largest of the network (64 channels at full resolution: a 75-image
Omniglot query set is 15 MB in float32), and on a CPU every full-size pass over it costs memory traffic and,
for fresh tensors, page faults. BatchNorm on it takes about seven such passes (sum, centre, square, sum, affine,
and two in the backward), more than the convolution. With h = conv(x) and M = N*H*W positions per channel, the
statistics are exact functions of the patch matrix P (M x K, K = 9 * in_channels, `F.unfold`):

    mean_c = w_c . mu + b_c,          mu    = sum_m P_m / M
    var_c  = w_c^T Sigma w_c,         Sigma = sum_m (P_m - mu)(P_m - mu)^T / M      (the biased variance)

and for a per-channel affine y = a_c (h - mean_c) + beta_c (a_c = gamma_c / sqrt(var_c + eps)), a max over a
pooling window commutes with it: max(y) = a_c (max(h) - mean_c) + beta_c for a_c >= 0, and with the window's
minimum for a_c < 0. So with s_c = sign(gamma_c) (+1 at 0) and h' = conv(x; s_c w_c, s_c b_c) = s_c h,

    block(x) = relu( |a_c| * max_pool(h') + (beta_c - |a_c| s_c mean_c) )

which touches the full-size activation only in the convolution and the max-pool (forward and backward); the
statistics are a K x K matrix (9 x 9 for Omniglot) and the affine runs on the pooled quarter. Plain
differentiable operations: autograd gives exact first and second derivatives. mu and Sigma are accumulated in
float64 whatever the activations' dtype (P has M x K elements, h has M x 64 for conv4), so in float32 the
statistics are more accurate than the two-pass sums over h (on 75 real Omniglot images, three random
initialisations with 64 filters: the float32 gradient 2-3e-6 from float64, against 0.9-2.1e-4 for the plain block
on NCHW images, the loop's path; tests/test_stem.py).

Measured on this 2-core CPU, 1 thread (benchmarks/bench_stem.py, results/stem_cpu.json): the block's forward and
backward on 75 real Omniglot images in float32 took 23 ms against the plain block's 35 ms, and row 1's hybrid
meta-iteration (bench_meta_step.py's omniglot-5w1s-1step) 2466 ms against 2877 ms without it (medians of 8 rounds
alternating in one process; learn2learn 4128 ms). With 5 inner steps (results/stem_5step_cpu.json): 4590 against
6059 ms.

Deviations, both at points where the max is not differentiable: where two pixels of a window are tied in h the
first one gets the gradient, as in the plain block, but where they differ in h and tie in y only after rounding,
the plain block sends it to the first, this one to the larger h; at gamma_c == 0 exactly (y constant over the
window) the plain block sends gamma's gradient through the window's first pixel and this one through its
largest h: two valid subgradients. Values agree to float rounding (tests/test_stem.py: float64, first and
second order, against `ConvBlock`'s plain operations).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

STEM_MIN_ELEMENTS = 2**20
"""Activation size (N * H * W * width elements) from which `stem_pays` outside vmap."""


def stem_pays(in_channels: int, width: int, activation_elements: Optional[int]) -> bool:
    """Whether `conv_norm_pool` runs where it was measured faster than the plain block (benchmarks/bench_stem.py's
    grid, results/stem_cpu.json: 1 thread, float32, forward and backward). Its statistics cost M * K^2
    (K = 9 * in_channels) where the passes it saves cost M * width, so K <= width / 3: 75 Omniglot-sized images
    at 64 filters 1.49x faster, at 32 filters 1.04x, at 16 filters 0.93x; 3 channels at 32 filters (mini-ImageNet's
    conv4) 0.76-0.79x. The saved passes matter on large activations, so at least STEM_MIN_ELEMENTS elements:
    5 images 0.73-0.87x, 25 images at 32 filters (0.6M elements) 1.07x, left out. activation_elements None:
    unknown, under the engine's vmap, whose task chunks are large (row 1's support passes, 16 tasks of 5 images).
    """
    if 3 * 9 * in_channels > width:
        return False
    return activation_elements is None or activation_elements >= STEM_MIN_ELEMENTS


def is_channels_last(x: Tensor) -> bool:
    """Whether every image of x (..., C, H, W) has the channel as its fastest-moving dimension."""
    C, H, W = x.shape[-3:]
    s = x.stride()
    return s[-3] == 1 and (W == 1 or s[-1] == C) and (H == 1 or s[-2] == W * C)



def conv_norm_pool(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Tensor, beta: Tensor,
                   eps: float) -> Tensor:
    """relu(max_pool2d(batch_norm(conv2d(x, weight, bias, padding=1)), 2)) with batch statistics, computed as in
    the module docstring. x (N, C, H, W); weight (D, C, 3, 3); gamma, beta (D,). Returns (N, D, H // 2, W // 2)."""
    N, C, H, W = x.shape
    D, K = weight.shape[0], C * 9
    stats = torch.float64 if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.dtype
    P = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(N * H * W, K).to(stats)  # patches, (M, K)
    mu = P.sum(0) / P.shape[0]
    centred = P - mu
    sigma = centred.T @ centred / P.shape[0]
    w = weight.reshape(D, K).to(stats)
    mean = w @ mu if bias is None else w @ mu + bias.to(stats)
    var = ((w @ sigma) * w).sum(1)
    a = gamma.to(stats) * torch.rsqrt(var + eps)
    sign = torch.where(gamma >= 0, 1.0, -1.0).to(weight.dtype)
    h = F.conv2d(x, weight * sign.view(-1, 1, 1, 1), None if bias is None else bias * sign, padding=1)
    shift = beta.to(stats) - a.abs() * sign.to(stats) * mean
    shape = (1, -1, 1, 1)
    return torch.addcmul(shift.to(h.dtype).view(shape), F.max_pool2d(h, 2), a.abs().to(h.dtype).view(shape)).relu()


__all__ = ["STEM_MIN_ELEMENTS", "conv_norm_pool", "is_channels_last", "stem_pays"]
