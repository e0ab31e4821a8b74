"""BOIL: Body Only update in Inner Loop.

Oh, Yoo, Kim, Yun. "BOIL: Towards Representation Change for Few-shot Learning." ICLR 2021.
https://arxiv.org/abs/2008.08882

The inner loop adapts the body (feature extractor) while the head's inner learning rate is 0
(Sec. 3): with theta = (theta_b, theta_h),

    theta_b' = theta_b - alpha_b * grad_{theta_b} L_S(theta_b, theta_h),   theta_h' = theta_h   (alpha_h = 0)
    (theta_b, theta_h) <- outer step on (1/T) sum_i L_{Q_i}(theta_b', theta_h)

The head is still meta-trained by the outer loop. Implementation: the inner mask selects
`features.*` only; this is exactly alpha_h = 0, including the second-order terms (the update
-0 * g_h has zero derivative), and a test checks it against an explicit {head: 0} lr spec.
Deviations: none beyond MAML's (see maml.py).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import MetalearnError
from .maml import MAML
from .base import LossSpec, MetricSpec
from .registry import Capabilities, register


@register("boil")
class BOIL(MAML):
    capabilities = Capabilities(batchable=True, hybrid=True, inner_checkpoint=True, compile=True)
    default_adapt = ("features.*",)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("features.*",), loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         adapt=adapt, loss=loss, metric=metric)
        head = [n for n in self.adapt if n.startswith("head.")]
        if head:
            raise MetalearnError("boil keeps the head fixed in the inner loop (lr 0); "
                                 f"inner.adapt selects {', '.join(head)}")
