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
test checks that both give the same meta-gradient.

Requires a model of the form head(features(x).flatten(1)) with submodules `features` and
`head` (conv4, mlp). Deviation: none beyond MAML's (see maml.py); non-transductive scoring
uses the naive path (each query is embedded together with the support set).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import MetalearnError
from ..inner import run_inner_loop
from ..inner.batched import batched_features, batched_head, batched_inner_loop
from ..inner.rules import LRSpec
from ..types import Examples, Params, TaskBatch
from .base import metric
from .maml import MAML
from .registry import Capabilities, register


def _sub(params: Params, prefix: str) -> Params:
    return {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}


@register("anil")
class ANIL(MAML):
    capabilities = Capabilities(batchable=True)
    default_adapt = ("head.*",)

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("head.*",), loss: str = "cross_entropy", cached: bool = True):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         adapt=adapt, loss=loss)
        if not (hasattr(model, "features") and hasattr(model, "head")):
            raise MetalearnError("anil needs a model with `features` and `head` submodules (conv4, mlp)")
        outside = [n for n in self.adapt if not n.startswith("head.")]
        if outside:
            raise MetalearnError(f"anil adapts only the head; inner.adapt also selects {', '.join(outside)}")
        self.cached = cached

    def embed(self, params: Params, x: Tensor) -> Tensor:
        """Body features (B, D) at `params`: features(x).flatten(1)."""
        return functional_call(self.model.features, _sub(params, "features."), (x,), strict=False).flatten(1)

    def head_fn(self, params: Params, z: Tensor, step: int) -> Tensor:
        """The head alone at `params` on features z (B, D)."""
        return functional_call(self.model.head, _sub(params, "head."), (z,), strict=False)

    def adapt_head(self, params: Params, z_support: Tensor, y_support: Tensor, *, steps: Optional[int] = None,
                   lr: Optional[float] = None, first_order: Optional[bool] = None) -> Params:
        """Inner loop on cached support features z_support (B, D)."""
        return run_inner_loop(self.model, params, Examples(z_support, y_support), adapt=self.adapt,
                              lr=self.lr_spec(lr), steps=self.inner_steps if steps is None else steps,
                              first_order=self.first_order if first_order is None else first_order,
                              loss_fn=self.loss_fn, forward_fn=self.head_fn).params

    def task_loss(self, params: Params, batch: TaskBatch, i: int) -> tuple[Tensor, Tensor]:
        if not self.cached:
            return super().task_loss(params, batch, i)
        z_s = self.embed(params, batch.support.x[i])
        z_q = self.embed(params, batch.query.x[i])
        fast = self.adapt_head(params, z_s, batch.support.y[i])
        out = self.head_fn(fast, z_q, 0)
        return self.loss_fn(out, batch.query.y[i]), out

    # --- batched execution: body features of all tasks at once, then the heads adapted together ---------
    def _batched_support(self) -> "tuple[bool, str]":
        if not self.cached:
            return False, "anil with cached=False runs the naive per-task path"
        if getattr(self, "lora", None) is not None:
            return False, "LoRA inner loop runs per task"
        if batched_features(self.model) is None:
            return False, f"no batched forward for model {type(self.model).__name__}"
        return True, ""

    def _batched_query_outputs(self, params: Params, batch: TaskBatch, sl: slice, *, steps: int, lr: LRSpec,
                               first_order: bool) -> Tensor:
        features, head = batched_features(self.model), batched_head(self.model)
        z_s, z_q = features(params, batch.support.x[sl]), features(params, batch.query.x[sl])  # (Tc, B, D)
        fast = batched_inner_loop(head, params, z_s, batch.support.y[sl], adapt=self.adapt, lr=lr, steps=steps,
                                  first_order=first_order, loss=self.loss, num_tasks=z_s.shape[0])
        return head(fast, z_q)

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        if transductive and self._batched():
            return self._batched_evaluate(batch, self.inner_steps if steps is None else steps, lr)
        if not (self.cached and transductive):
            return super().evaluate_batch(batch, steps=steps, lr=lr, transductive=transductive)
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in self.params().items()}
        out = []
        for i in range(batch.num_tasks):
            z_s, z_q = self.embed(params, batch.support.x[i]), self.embed(params, batch.query.x[i])
            fast = self.adapt_head(params, z_s, batch.support.y[i], steps=steps, lr=lr, first_order=True)
            out.append(metric(self.head_fn(fast, z_q, 0), batch.query.y[i], self.loss))
            self.episode_done()
        return torch.stack(out).cpu()
