"""ANIL: Almost No Inner Loop.

Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding the
Effectiveness of MAML." ICLR 2020. https://arxiv.org/abs/1909.09157

Only the head w adapts; the body phi (all other parameters) is shared by the inner loop
(Sec. 4.1). With features z = f_phi(x) of a task's support set S and query set Q:

    w_{s+1} = w_s - alpha * grad_w L(h_{w_s}(z_S), y_S)          s = 0..S-1
    (phi, w) <- outer step on  (1/T) sum_i L(h_{w_S}(z_Q), y_Q)   (second order through z_S)

Cached features (the saving that makes ANIL cheap): z_S and z_Q are computed ONCE per task
and every inner step runs the head alone on z_S. This is exact, not an approximation: the
body's parameters do not change in the inner loop, so f_phi(x_S) is the same at every step;
`cached=False` runs the whole model every step (the naive MAML-with-head-mask path) and a
test checks that both give the same meta-gradient. Declared for the engine: `cached_features`,
`embed` (the body) and `head_fn` (the head); the batched path runs the body of all tasks at once
and adapts their heads together (no hybrid path: the query pass is batched already).

Requires a model of the form head(features(x).flatten(1)) with submodules `features` and
`head` (conv4, mlp). Deviation: none beyond MAML's (see maml.py); non-transductive scoring
uses the naive path (each query is embedded together with the support set).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from torch import Tensor, nn

from ..errors import MetalearnError
from ..inner import forward
from ..types import Params
from .base import LossSpec, MetricSpec
from .maml import MAML
from .registry import Capabilities, register


def _sub(params: Params, prefix: str) -> Params:
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}


@register("anil")
class ANIL(MAML):
    capabilities = Capabilities(batchable=True)
    default_adapt = ("head.*",)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("head.*",),
                 loss: LossSpec = "cross_entropy", metric: MetricSpec = None, cached: bool = True):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         adapt=adapt, loss=loss, metric=metric)
        if not (hasattr(model, "features") and hasattr(model, "head")):
            raise MetalearnError("anil needs a model with `features` and `head` submodules (conv4, mlp)")
        outside = [n for n in self.adapt if not n.startswith("head.")]
        if outside:
            raise MetalearnError(f"anil adapts only the head; inner.adapt also selects {', '.join(outside)}")
        self.cached_features = cached
        if not cached:  # the naive path: MAML with a head mask, run per task
            self.capabilities = replace(self.capabilities, batchable=False)
            self.per_task_reason = "anil with cached=False runs the naive per-task path"

    def embed(self, params: Params, x: Tensor) -> Tensor:
        """Body features (B, D) at `params`: features(x).flatten(1)."""
        return forward(self.model.features, _sub(params, "features."), x).flatten(1)

    def head_fn(self, params: Params, z: Tensor, step: int) -> Tensor:
        """The head alone at `params` on features z (B, D)."""
        return forward(self.model.head, _sub(params, "head."), z)
