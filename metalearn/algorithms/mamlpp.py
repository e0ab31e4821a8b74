"""MAML++.

Antoniou, Edwards, Storkey. "How to train your MAML." ICLR 2019. https://arxiv.org/abs/1810.09502
(code: github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch)

MAML (see maml.py) with the paper's fixes (Sec. 4), each a switch here:

* LSLR, per-layer per-step learnable inner lrs: theta_{s+1}[n] = theta_s[n] - alpha[n][s] * g_s[n],
  alpha[n] (S,) initialised to inner_lr and trained by the outer optimiser (inner.PerStepLR).
* MSL, multi-step loss with annealed weights: the task loss is sum_s v_s * L_Q(theta_{s+1}) while
  outer step <= msl_iterations, then L_Q(theta_S) only. v follows the reference code's
  `get_per_step_loss_importance_vector` with "epoch" = completed outer steps: v_s = 1/S at the start;
  each non-final weight decays by k/(S*msl_iterations) (floor 0.03/S), the final one grows by
  k(S-1)/(S*msl_iterations) (cap 1 - 0.03(S-1)/S), k = step - 1.
* DA, derivative-order annealing: first order for outer steps <= first_order_until, second after.
* CA, cosine annealing of the outer lr: beta_step = beta_min + (beta_0 - beta_min)(1 + cos(pi (step-1)/total))/2.
* BNWB/BNRS, per-step BatchNorm weights, biases and running statistics: needs a model whose
  forward takes `step` (models.Conv4PerStep); with plain conv4 the other fixes still apply.
  Meta-training normalises with batch statistics at every step (as the reference code does);
  evaluation is transductive (batch statistics) or, with transductive=False, uses the per-step
  running statistics (inductive).

Deviations: "epochs" are counted in outer steps; the learned lrs are used at test time (a
scalar eval.inner_lr is ignored); steps beyond S at test time reuse step S-1's lr and BatchNorm.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import MetalearnError
from ..inner import PerStepLR, forward
from ..inner.rules import LRSpec
from ..types import Params
from .maml import MAML
from .base import LossSpec, MetricSpec
from .registry import Capabilities, register


def msl_weights(steps: int, step: int, msl_iterations: int) -> Optional[List[float]]:
    """Per-step query-loss weights v (S,) at outer step `step` (1-based), or None after annealing."""
    if msl_iterations <= 0 or step > msl_iterations or steps == 1:
        return None
    k = step - 1
    decay = 1.0 / steps / msl_iterations
    floor = 0.03 / steps
    w = [max(1.0 / steps - k * decay, floor) for _ in range(steps - 1)]
    w.append(min(1.0 / steps + k * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return w


@register("mamlpp")
class MAMLPlusPlus(MAML):
    capabilities = Capabilities(own_lr_schedule=True, learns_inner_lr=True)  # per task: the loop only

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",),
                 loss: LossSpec = "cross_entropy", metric: MetricSpec = None, msl_iterations: int = 0,
                 first_order_until: int = 0, final_lr: float = 0.0):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                         adapt=adapt, loss=loss, metric=metric)
        if inner_steps < 1:
            raise MetalearnError("mamlpp needs inner.steps >= 1")
        p0 = next(iter(self.params().values()))
        self.lrs = PerStepLR(self.adapt, inner_steps, inner_lr, dtype=p0.dtype, device=p0.device)
        self.msl_iterations, self.first_order_until, self.final_lr = msl_iterations, first_order_until, final_lr
        self.per_step = bool(getattr(model, "per_step", False))
        self.step, self.initial_lr = 1, None

    @classmethod
    def config_kwargs(cls, cfg) -> dict:
        return dict(super().config_kwargs(cfg), msl_iterations=cfg.mamlpp.msl_iterations,
                    first_order_until=cfg.mamlpp.first_order_until, final_lr=cfg.mamlpp.final_lr)

    # --- schedules ------------------------------------------------------------------------------
    def outer_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """Adam over the model's trained parameters and the per-step lrs; `lr` is the cosine's start."""
        self.initial_lr = lr  # recorded here, not read back from the optimizer (a resumed one holds the annealed lr)
        return super().outer_optimizer(params, lr)

    def schedule(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Records the outer step (for MSL and DA) and sets the cosine-annealed outer lr."""
        self.step = step
        if self.initial_lr is None:
            self.initial_lr = optimizer.param_groups[0]["lr"]
        lr = self.final_lr + (self.initial_lr - self.final_lr) * (1 + math.cos(math.pi * (step - 1) / total_steps)) / 2
        for g in optimizer.param_groups:
            g["lr"] = lr

    def current_first_order(self) -> bool:
        return self.first_order or self.step <= self.first_order_until

    # --- hooks ----------------------------------------------------------------------------------
    def lr_spec(self, lr: Optional[float] = None) -> LRSpec:
        return self.lrs

    def forward_fn(self, params: Params, x: Tensor, step: int, stats: str = "batch") -> Tensor:
        if self.per_step:
            return forward(self.model, params, x, step=step, stats=stats)
        return forward(self.model, params, x)

    def query_weights(self) -> Optional[List[float]]:
        """MSL: the per-step query-loss weights at the current outer step (None once annealed)."""
        return msl_weights(self.inner_steps, self.step, self.msl_iterations)

    def eval_forward(self, transductive: bool):
        """Inductive evaluation with per-step BatchNorm uses the per-step running statistics, the query
        set scored as one batch; otherwise MAML's (transductive, or each query example with the support set)."""
        if self.per_step and not transductive:
            return (lambda p, x, s: self.forward_fn(p, x, s, stats="running")), True
        return self.forward_fn, transductive

    @contextlib.contextmanager
    def evaluating(self):
        """No running-statistics updates while evaluating (model.eval())."""
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    # --- learnables -------------------------------------------------------------------------------
    def meta_parameters(self) -> List[nn.Parameter]:
        return list(self.lrs.parameters())

    def state_dict(self) -> dict:
        """{"lrs": {parameter name: (S,) lrs}} (per-step BatchNorm statistics live in the model's state_dict)."""
        return {"lrs": {n: a.detach().clone() for n, a in self.lrs.by_name().items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.lrs.by_name()
        if set(state.get("lrs", {})) != set(mine):
            raise MetalearnError("mamlpp state: lr names do not match the model's adapted parameters")
        with torch.no_grad():
            for n, a in state["lrs"].items():
                mine[n].copy_(a)
