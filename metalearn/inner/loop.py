"""The inner loop: rapid fine-tuning of selected parameters on a task's support set.

Pure function over a params dict (as in torch.func's MAML example): it returns new fast
parameters and never mutates the module or the input dict. For each step s = 1..S

    theta_s[n] = theta_{s-1}[n] - alpha * d L_support(theta_{s-1}) / d theta_{s-1}[n]   for n in `adapt`
    theta_s[n] = theta_{s-1}[n]                                                            otherwise

With first_order=False the graph of every step is kept (create_graph=True), so a loss on
theta_S differentiates through the whole inner loop (second-order MAML). With
first_order=True the inner gradients are constants: d theta_S / d theta_0 = I (FOMAML).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..types import Examples, Params

Loss = Callable[[Tensor, Tensor], Tensor]


def forward(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """model(x) evaluated at `params` (names missing from params fall back to the module's own)."""
    return functional_call(model, params, (x,), strict=False)


def inner_loop(model: nn.Module, params: Params, support: Examples, *, adapt: Sequence[str], lr: float,
               steps: int, first_order: bool = False, loss_fn: Loss = F.cross_entropy) -> Params:
    """Adapted parameters after `steps` SGD steps on one task's support set (x (B, C, H, W), y (B,))."""
    fast = dict(params)
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn(forward(model, fast, support.x), support.y)
            grads = torch.autograd.grad(loss, [fast[n] for n in adapt], create_graph=not first_order)
            fast.update({n: fast[n] - lr * g for n, g in zip(adapt, grads)})
    return fast
