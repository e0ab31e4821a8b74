"""Batched inner loops: all tasks of a meta-batch adapted at once, tasks as a batch dimension.

The reference path (`run_inner_loop`, one task after another) costs one small forward and
backward per task and step, so on a meta-batch of 32 Omniglot tasks it is dominated by
per-operator overhead. Here every adapted parameter carries a leading task dimension T and
the model runs once for all tasks:

    conv     x (B, T*C, H, W) * w (T*Co, Ci, k, k), groups=T   -> each task sees only its weights
    BatchNorm F.batch_norm on (B, T*Co, H, W): statistics per channel over (B, H, W), i.e. per
             task and channel, exactly what each task's own forward computes; its double
             backward is PyTorch's ordinary (exact) one, unlike batch norm under torch.func.vmap
    linear   torch.baddbmm(b (T, 1, N), z (T, B, D), W^T (T, D, N))

The inner loop is the reference's own (`metalearn.inner.adapt(..., tasks=T)`): its loss is the sum
over tasks of each task's mean loss (`batched_loss`), so one autograd.grad call gives every task
its own gradient (task t's loss depends only on task t's parameters), and the rule's step, e.g.

    theta_t^{s+1} = theta_t^s - lr(n, s) * g_t^s       (lr: float, per-tensor or per-element spec)

is the reference update applied to all tasks at once (`lr` broadcasts over T). Parameters
that are not adapted stay shared, without a task dimension, so their gradient is the sum over
tasks as in the loop. Differentiating through the loop (create_graph=True) gives the
second-order meta-gradient, equal to the per-task reference's to float rounding (tests:
tests/test_batched.py, float64, <= 1e-10 relative, BatchNorm on).

Two ways to run a model on all tasks at once:

  task_vmap        any model, any forward function (CAVIA's context, ANIL's body and head, your own
                   nn.Module): `torch.func.vmap` over tasks of the per-task forward, with the
                   per-task parameters mapped over their task dimension and the shared ones not.
                   vmap turns a convolution with per-task weights into the same grouped convolution
                   as below. BatchNorm runs in the plain-reduction form of metalearn/inner/norm.py
                   (`vmap_safe_norms`): exact first and second derivatives under vmap.
  batched_forward  hand-written twins for conv4 (with or without BatchNorm) and the sinusoid MLP,
                   kept where they are measured faster than task_vmap (benchmarks/bench_meta_step.py);
                   None for anything else.
"""
from __future__ import annotations

from typing import AbstractSet, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import Params
from .loop import task_dim as _task
from .norm import vmap_safe_norms

BatchedForward = Callable[[Params, Tensor], Tensor]


def _linear(params: Params, name: str, mod: nn.Linear, z: Tensor) -> Tensor:
    """z (T, B, D) -> (T, B, N) with per-task or shared weight (N, D) / bias (N)."""
    T = z.shape[0]
    w = params.get(f"{name}.weight", mod.weight)
    b = params.get(f"{name}.bias", mod.bias)
    if w.dim() == 2 and (b is None or b.dim() == 1):  # shared: one ordinary matmul
        return F.linear(z, w, b)
    wt = _task(w, mod.weight.shape, T).transpose(1, 2)
    if b is None:
        return torch.bmm(z, wt)
    return torch.baddbmm(_task(b, mod.bias.shape, T).unsqueeze(1), z, wt)


def _conv4_features(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """conv4's body on x (T, B, C, H, W) with params[n] of shape (T, *shape) or shape -> (T, B, D)."""
    T, B = x.shape[:2]
    h = x.transpose(0, 1).reshape(B, T * x.shape[2], *x.shape[3:])  # (B, T*C, H, W)
    for i, block in enumerate(model.features):
        conv, prefix = block.conv, f"features.{i}"
        w = _task(params.get(f"{prefix}.conv.weight", conv.weight), conv.weight.shape, T)
        b = _task(params.get(f"{prefix}.conv.bias", conv.bias), conv.bias.shape, T)
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), stride=conv.stride, padding=conv.padding,
                     dilation=conv.dilation, groups=T)
        norm = block.norm
        if isinstance(norm, nn.BatchNorm2d):
            g = _task(params.get(f"{prefix}.norm.weight", norm.weight), norm.weight.shape, T)
            beta = _task(params.get(f"{prefix}.norm.bias", norm.bias), norm.bias.shape, T)
            h = F.batch_norm(h, None, None, g.reshape(-1), beta.reshape(-1), training=True, eps=norm.eps)
        h = F.max_pool2d(h, block.pool.kernel_size, block.pool.stride).relu()  # as ConvBlock.forward
    return h.reshape(B, T, -1).transpose(0, 1)  # (T, B, Co*h*w): each task's flatten(1), channel-major


def _mlp_features(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """The MLP's body on x (T, B, D_in) -> (T, B, hidden)."""
    h = x.flatten(2)
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.Linear):
            h = _linear(params, f"features.{i}", layer, h)
        elif isinstance(layer, nn.ReLU):
            h = h.relu()
        else:  # pragma: no cover - guarded by supports()
            raise TypeError(f"unsupported layer {type(layer).__name__}")
    return h


def batched_features(model: nn.Module) -> Optional[BatchedForward]:
    """fn(params, x (T, B, ...)) -> body features (T, B, D) (the input of `model.head`) for a supported
    model (conv4 with transductive or no BatchNorm, the MLP), else None."""
    from ..models.conv4 import Conv4
    from ..models.mlp import MLP

    if type(model) is Conv4 and all(isinstance(b.norm, (nn.BatchNorm2d, nn.Identity)) for b in model.features):
        if all(not b.norm.track_running_stats for b in model.features if isinstance(b.norm, nn.BatchNorm2d)):
            return lambda params, x: _conv4_features(model, params, x)
    if type(model) is MLP and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model.features):
        return lambda params, x: _mlp_features(model, params, x)
    return None


def batched_head(model: nn.Module) -> BatchedForward:
    """fn(params, z (T, B, D)) -> model.head at per-task or shared params: (T, B, N)."""
    return lambda params, z: _linear(params, "head", model.head, z)


def batched_forward(model: nn.Module) -> Optional[BatchedForward]:
    """fn(params, x (T, B, ...)) -> outputs (T, B, ...) for a supported model, else None."""
    features = batched_features(model)
    if features is None:
        return None
    head = batched_head(model)
    return lambda params, x: head(params, features(params, x))


def task_vmap(fn: Callable[[Params, Tensor], Tensor], per_task: AbstractSet[str]) -> BatchedForward:
    """fn(params, x) of one task -> fn(params, x (T, B, ...)) -> (T, B, ...) of all tasks at once.

    The parameters named in `per_task` carry a leading task dimension (T, *shape) (`adapt(..., tasks=T)`
    gives the adapted ones that form); the others are shared by all tasks. Random operations (dropout,
    DropBlock) draw independently per task (vmap's randomness="different"). BatchNorm layers run in the
    vmap-exact form of metalearn/inner/norm.py."""
    from torch.func import vmap

    def run(params: Params, x: Tensor) -> Tensor:
        dims = {n: 0 if n in per_task else None for n in params}
        with vmap_safe_norms():
            return vmap(fn, in_dims=(dims, 0), randomness="different")(params, x)

    return run


def task_losses(out: Tensor, y: Tensor, loss: str) -> Tensor:
    """Each task's mean loss: out (T, B, N) logits with y (T, B) labels, or (T, B, D) regressions -> (T,)."""
    T, B = out.shape[:2]
    if loss == "cross_entropy":
        return F.cross_entropy(out.reshape(T * B, -1), y.reshape(T * B), reduction="none").view(T, B).mean(1)
    if loss == "mse":
        return (out - y).pow(2).reshape(T, -1).mean(1)
    raise ValueError(f"unknown loss {loss!r}")


def batched_loss(loss: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The support loss of `adapt(..., tasks=T)`: the sum over tasks of each task's mean loss."""
    return lambda out, y: task_losses(out, y, loss).sum()


def task_metrics(out: Tensor, y: Tensor, loss: str) -> Tensor:
    """Each task's accuracy (classification) or MSE (regression): (T,) float64."""
    if loss == "mse":
        return (out - y).pow(2).reshape(out.shape[0], -1).mean(1).double()
    return (out.argmax(-1) == y).double().mean(1)


__all__ = ["BatchedForward", "batched_features", "batched_forward", "batched_head", "batched_loss", "task_losses",
           "task_metrics", "task_vmap"]
