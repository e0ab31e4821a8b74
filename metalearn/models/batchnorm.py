"""BatchNorm with batch statistics written from reductions, for the models' channels-last activations and for the
engine (metalearn/inner/norm.py explains where each form runs and why).

    batch_norm_from_sums      the reference: plain differentiable reductions, exact first and second derivatives
                              (also under vmap), two-pass and accurate in float32
    BatchNormFirstOrder       the same forward with BatchNorm's closed-form gradient in fused passes; first order
                              only, used inside `first_order_norms()` (hybrid's query passes)
    channels_last_batch_norm  what conv4 and ResNet-12 call on channels-last activations: one of the two

Here, below metalearn.inner, so that the models can use it (tests/test_layering.py).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import Tensor


def _centred(h: Tensor, eps: float) -> "tuple[Tensor, Tensor, Tensor, Tensor]":
    """(mean, h - mean, 1 / sqrt(var + eps), (h - mean)**2) with batch statistics over every dimension but the
    channels (dim 1): two-pass (sum of squared deviations), accurate in float32. The squares are returned so
    that `BatchNormFirstOrder` can write its output into their memory."""
    dims = (0, *range(2, h.dim()))
    m = h.numel() // h.shape[1]
    mean = h.sum(dims, keepdim=True) / m
    d = h - mean
    squares = d * d
    return mean, d, torch.rsqrt(squares.sum(dims, keepdim=True) / m + eps), squares


def batch_norm_from_sums(h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """BatchNorm with batch statistics, written from reductions: h (N, C, ...) -> (N, C, ...). Exact first and
    second derivatives by autograd, also under vmap; two-pass (sum of squared deviations), accurate in float32."""
    _, d, scale, _ = _centred(h, eps)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    if weight is None:
        out = d * scale
        return out if bias is None else out + bias.view(shape)
    if bias is None:
        return d * (scale * weight.view(shape))
    return torch.addcmul(bias.view(shape), d, scale * weight.view(shape))


_FIRST_ORDER = contextvars.ContextVar("metalearn_norm_first_order", default=False)


@contextlib.contextmanager
def first_order_norms() -> Iterator[None]:
    """Inside: channels-last BatchNorm (`channels_last_batch_norm`) runs `BatchNormFirstOrder`, whose backward
    is BatchNorm's closed-form gradient in a few fused passes, and which refuses to be differentiated twice.
    For passes that are backpropagated once: hybrid's per-task query passes (metalearn/engine.py)."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


class BatchNormFirstOrder(torch.autograd.Function):
    """`batch_norm_from_sums` (4-d h, affine) for passes that are backpropagated once: the same forward, to the
    bit, and as its backward PyTorch's own kernel for BatchNorm's training-mode gradient
    (aten.native_batch_norm_backward), fed this forward's mean and scale = 1/sqrt(var + eps). With M = N*H*W and
    xhat = (h - mean) * scale (sums over every dimension but the channels):

        d bias = sum(g),   d weight = sum(g * xhat),
        d h    = weight * scale * (g - d bias / M - xhat * d weight / M)

    in two fused passes over h, where autograd's backward of the reduction form takes about nine (mixed or reduced
    precision, which that kernel refuses on a CPU, runs the same formula in torch ops). Against the
    reduction form's float64 gradient on a 75x64x28x28 batch of mean 5 and std 3: 6e-15 (global relative L2) in
    float64, 3e-6 in float32 (a six-pass backward written here in torch ops measured 2e-7, at 1.1x this one's
    meta-step time; row 1's float32 meta-gradient error stayed 1.21e-4 with either,
    benchmarks/bench_hybrid_bn_first_order.py). First order only: a backward with create_graph=True raises. Its
    reference is `batch_norm_from_sums` (tests/test_norm_first_order.py compares them in float64 and float32)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        mean, d, scale, squares = _centred(h, eps)  # batch_norm_from_sums's own forward operations
        ctx.save_for_backward(h, mean.view(-1), scale.view(-1), weight)
        ctx.eps = eps
        # into the squares' memory: on a CPU a fresh activation-sized tensor costs page faults (its pages are
        # new to the process), about as much as the arithmetic here
        return torch.addcmul(bias.view(1, -1, 1, 1), d, scale * weight.view(1, -1, 1, 1), out=squares)

    @staticmethod
    def backward(ctx, g: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would be silently missing
            raise RuntimeError("BatchNormFirstOrder is first order only and cannot be differentiated twice "
                               "(create_graph=True); run this pass outside first_order_norms()")
        h, mean, invstd, weight = ctx.saved_tensors
        if h.dtype == weight.dtype == g.dtype and h.dtype in (torch.float32, torch.float64):
            gi, gw, gb = torch.ops.aten.native_batch_norm_backward(g, h, weight, None, None, mean, invstd, True,
                                                                   ctx.eps, [True, True, True])
            return gi, gw, gb, None
        # mixed or reduced precision (e.g. bfloat16 activations with float32 parameters under autocast), which
        # the CPU kernel refuses: the same formula in torch ops, into one activation-sized buffer
        m = h.numel() // h.shape[1]
        d, scale = h - mean.view(1, -1, 1, 1), invstd.view(1, -1, 1, 1)
        g_bias = g.sum((0, 2, 3))
        t = g * d
        g_xhat_sum = t.sum((0, 2, 3), keepdim=True) * scale  # sum(g * xhat), per channel
        torch.addcmul(g, d, -(scale * g_xhat_sum) / m, out=t).sub_((g_bias / m).view(1, -1, 1, 1))
        return t.mul_(scale * weight.view(1, -1, 1, 1)), g_xhat_sum.view(-1), g_bias, None


def channels_last_batch_norm(h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """BatchNorm with batch statistics for a channels-last 4-d h: `batch_norm_from_sums`, or inside
    `first_order_norms()` (affine, gradients wanted) the same forward with the fused first-order backward."""
    if _FIRST_ORDER.get() and weight is not None and bias is not None and h.dim() == 4 and torch.is_grad_enabled():
        return BatchNormFirstOrder.apply(h, weight, bias, eps)
    return batch_norm_from_sums(h, weight, bias, eps)


__all__ = ["BatchNormFirstOrder", "batch_norm_from_sums", "channels_last_batch_norm", "first_order_norms"]
