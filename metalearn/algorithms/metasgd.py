"""Meta-SGD: a learnable learning rate for every adapted parameter element.

Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning." 2017.
https://arxiv.org/abs/1707.09835

Eq. (3)-(4): with alpha a tensor shaped like theta (elementwise product o),

    theta_i' = theta - alpha o grad_theta L_{S_i}(theta)
    (theta, alpha) <- (theta, alpha) - beta * grad_{(theta, alpha)} (1/T) sum_i L_{Q_i}(theta_i')

alpha is initialised to `inner_lr` everywhere (the paper samples it uniformly in [0.005, 0.1];
learn2learn and most reimplementations use a constant) and trained by the outer optimiser
together with theta. For several inner steps the same alpha is used at every step.

First-order mode: the inner gradient grad_theta L_S is detached (no Hessian terms), but alpha
never is: d theta' / d alpha = -grad_theta L_S still reaches the outer gradient.

At evaluation the learned alpha is used; a scalar test-time lr (eval.inner_lr) is ignored.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..errors import MetalearnError

from ..inner import PerElementLR
from ..inner.rules import LRSpec
from .maml import MAML
from .base import LossSpec, MetricSpec
from .registry import Capabilities, register


@register("metasgd")
class MetaSGD(MAML):
    capabilities = Capabilities(batchable=True, hybrid=True, inner_checkpoint=True, learns_inner_lr=True,
                                compile=True)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",), loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         adapt=adapt, loss=loss, metric=metric)
        self.alpha = PerElementLR(self.params(), self.adapt, inner_lr)

    def lr_spec(self, lr: Optional[float] = None) -> LRSpec:
        return self.alpha

    def meta_parameters(self) -> List[nn.Parameter]:
        return list(self.alpha.parameters())

    def state_dict(self) -> dict:
        """{"alpha": {parameter name: alpha tensor}}."""
        return {"alpha": {n: a.detach().clone() for n, a in self.alpha.by_name().items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.alpha.by_name()
        if set(state.get("alpha", {})) != set(mine):
            raise MetalearnError("meta-sgd state: alpha names do not match the model's adapted parameters")
        with torch.no_grad():
            for n, a in state["alpha"].items():
                mine[n].copy_(a)
