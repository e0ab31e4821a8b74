"""Normalisation state policy: how BatchNorm behaves inside metalearn's episodic code, for any model.

The policy (stated in the README, enforced here, tested in tests/test_generic_batched.py):

    Meta-training and evaluation never read or write a model's running statistics. Every BatchNorm
    layer normalises with the statistics of the batch it is given (training mode and evaluation mode
    alike): the support set during adaptation, the query set when it is scored as one batch
    (transductive), or the support set plus one query example (non-transductive, see
    metalearn/algorithms/base.py `scored`). So episode k's result does not depend on which episodes
    ran before it, even for `nn.BatchNorm2d(track_running_stats=True)`.

Running statistics are left exactly as they were: supervised pre-training (metalearn/transfer/) is
ordinary training and updates them, as PyTorch does; nothing episodic reads them.

How. `forward(model, params, x)` (metalearn/inner/loop.py) runs the model through `stateless(model)`,
a view of the module tree in which each BatchNorm layer that tracks running statistics is replaced by
`BatchStats`, which holds the SAME parameter and buffer objects (so `functional_call` names, masks,
state_dict and optimisers are unaffected) and normalises with batch statistics only. A model with no
such layer (conv4, whose BatchNorm has `track_running_stats=False`; the MLP) is its own view: the
reference path is unchanged to the bit.

Under `torch.func.vmap` (the generic batched path, metalearn/inner/batched.py `task_vmap`) the view
also replaces BatchNorm layers that do not track statistics, and `BatchStats` computes from plain
reductions,

    mean = sum(h) / M,   var = sum((h - mean)^2) / M,   y = (h - mean) * weight / sqrt(var + eps) + bias

over every dimension but the channels (M elements per channel; the biased variance, as BatchNorm's
training mode), whose first and second derivatives are autograd's own. BatchNorm's fused kernel is
not used under vmap: its backward's batching rule has been wrong in released PyTorch versions
(pytorch/functorch#534; the design notes measured a 1% second-order error), and the meta-gradient is
a second derivative of every normalisation layer. Other layers (GroupNorm, LayerNorm, InstanceNorm)
have no running state and are used as they are; tests/test_generic_batched.py checks their batched
meta-gradients against the per-task reference in float64.

Views are cached per model and rebuilt when its module tree changes (a replaced head); the modules'
`training` flags are copied from the model on every call, so `model.eval()` still switches Dropout
and DropBlock off.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.batchnorm import (BatchNormFirstOrder, batch_norm_from_sums, channels_last_batch_norm,  # noqa: F401
                                first_order_norms)

_UNDER_VMAP = contextvars.ContextVar("metalearn_norm_under_vmap", default=False)
# The same flag as a plain global, for code that torch.compile traces: its dynamo (torch 2.13 and older) cannot
# trace ContextVar.get, while a global's value is read at trace time and guarded. Only the tracing reads it.
_under_vmap_traced = False


@contextlib.contextmanager
def vmap_safe_norms() -> Iterator[None]:
    """Inside: `stateless` views also replace every BatchNorm layer, with the plain-reduction form (the
    generic batched path enters this around its vmap)."""
    global _under_vmap_traced
    token, traced = _UNDER_VMAP.set(True), _under_vmap_traced
    _under_vmap_traced = True
    try:
        yield
    finally:
        _UNDER_VMAP.reset(token)
        _under_vmap_traced = traced


class BatchStats(nn.Module):
    """Stands in for a BatchNorm layer: batch statistics always; running statistics never read or written.

    Holds the original layer's parameter and buffer objects under their own names. `from_sums`: the
    plain-reduction form (under vmap); otherwise PyTorch's kernel without running statistics (what
    BatchNorm computes in training mode), and the reduction form for a channels-last 4-d input (as conv4's
    `normalise`: the CPU kernel accumulates channels-last statistics in float32, one element after another).
    """

    def __init__(self, norm: _BatchNorm, from_sums: bool):
        super().__init__()
        self.eps, self.from_sums = norm.eps, from_sums
        for name, p in norm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        if "weight" not in self._parameters:
            self.weight = None
        if "bias" not in self._parameters:
            self.bias = None
        for name, b in norm.named_buffers(recurse=False):
            self.register_buffer(name, b)

    def forward(self, h: Tensor) -> Tensor:
        if self.from_sums:
            return batch_norm_from_sums(h, self.weight, self.bias, self.eps)
        if h.dim() == 4 and not h.is_contiguous():
            return channels_last_batch_norm(h, self.weight, self.bias, self.eps)
        return F.batch_norm(h, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, from_sums={self.from_sums}"


def _replace(norm: nn.Module, all_batch_norms: bool) -> bool:
    return isinstance(norm, _BatchNorm) and (all_batch_norms or norm.track_running_stats)


class _View:
    """A model's stateless view: the root of the copied tree and (original, copy) pairs whose flags follow."""

    def __init__(self, model: nn.Module, all_batch_norms: bool):
        self.pairs: List[Tuple[nn.Module, nn.Module]] = []
        self.root = self._copy(model, all_batch_norms)
        self.tree = _tree(model)

    def _copy(self, module: nn.Module, all_batch_norms: bool) -> nn.Module:
        if _replace(module, all_batch_norms):
            return BatchStats(module, from_sums=all_batch_norms)
        if not any(_replace(m, all_batch_norms) for m in module.modules()):
            return module  # nothing to replace below: shared as it is
        twin = copy.copy(module)  # a shallow copy: same parameters, buffers and attributes
        object.__setattr__(twin, "_modules", {k: None if c is None else self._copy(c, all_batch_norms)
                                              for k, c in module._modules.items()})
        self.pairs.append((module, twin))
        return twin

    def sync(self) -> nn.Module:
        for original, twin in self.pairs:
            twin.training = original.training
        return self.root


def _tree(model: nn.Module) -> Tuple[int, ...]:
    return tuple(id(m) for m in model.modules())


_VIEWS: "weakref.WeakKeyDictionary[nn.Module, Dict[bool, _View]]" = weakref.WeakKeyDictionary()


def stateless(model: nn.Module, all_batch_norms: Optional[bool] = None) -> nn.Module:
    """The module `forward` runs: `model` with its running-statistics BatchNorm layers replaced by
    `BatchStats` (all BatchNorm layers, in the reduction form, when `all_batch_norms`; default: inside
    `vmap_safe_norms()`). `model` itself when there is nothing to replace."""
    if all_batch_norms is None:
        all_batch_norms = _under_vmap_traced if torch.compiler.is_compiling() else _UNDER_VMAP.get()
    views = _VIEWS.get(model)
    if views is None:
        views = _VIEWS[model] = {}
    view = views.get(all_batch_norms)
    if view is None or view.tree != _tree(model):
        view = views[all_batch_norms] = _View(model, all_batch_norms)
    return view.sync()


def running_stats_layers(model: nn.Module) -> List[str]:
    """Names of the BatchNorm layers of `model` that track running statistics (which the policy leaves alone)."""
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


__all__ = ["BatchNormFirstOrder", "BatchStats", "batch_norm_from_sums", "channels_last_batch_norm", "first_order_norms",
           "running_stats_layers", "stateless", "vmap_safe_norms"]
