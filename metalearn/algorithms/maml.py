"""MAML and first-order MAML.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks."
ICML 2017. https://arxiv.org/abs/1703.03400

For a meta-batch of tasks T_i with support set S_i and query set Q_i (Algorithm 2):

    theta_i' = theta - alpha * grad_theta L_{S_i}(theta)           (inner loop, `inner.steps` times)
    theta   <- theta - beta * grad_theta (1/T) sum_i L_{Q_i}(theta_i')   (outer step; Adam here)

Second order: grad_theta L_Q(theta') differentiates through the inner updates, including the
Hessian-vector products. First order (FOMAML, Sec. 5.2): the inner gradients are treated as
constants, so grad_theta L_Q(theta') = grad_theta' L_Q(theta').

Deviations from the paper: Adam with the outer lr from the config (the paper also uses Adam);
conv4 with max-pooling on Omniglot (the paper's Omniglot net uses strided convolutions);
BatchNorm always uses the batch statistics (as in the paper's code). Only the parameters
matched by `adapt` move in the inner loop; the others are shared as in ANIL.

Execution: a per-task loop; each task's query loss / T is backpropagated before the next task
is adapted, so memory holds one task's graph at a time and the accumulated gradient equals
the gradient of the mean.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..inner import forward, inner_loop, select
from ..types import Examples, Params, TaskBatch


class MAML:
    """Second-order MAML (first_order=False) or FOMAML (first_order=True) over a module's parameters."""

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",)):
        self.model = model
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.adapt = select([n for n, _ in model.named_parameters()], adapt, what="inner.adapt")

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def adapt_task(self, params: Params, support: Examples, *, steps: Optional[int] = None,
                   lr: Optional[float] = None, first_order: Optional[bool] = None) -> Params:
        return inner_loop(self.model, params, support, adapt=self.adapt,
                          lr=self.inner_lr if lr is None else lr,
                          steps=self.inner_steps if steps is None else steps,
                          first_order=self.first_order if first_order is None else first_order)

    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss into the model's `.grad`s.

        Returns the mean query loss and accuracy of the adapted models (before the outer step).
        """
        params = self.params()
        total_loss, total_acc, T = 0.0, 0.0, batch.num_tasks
        for i in range(T):
            fast = self.adapt_task(params, batch.support.task(i))
            logits = forward(self.model, fast, batch.query.x[i])
            loss = F.cross_entropy(logits, batch.query.y[i])
            (loss / T).backward()
            total_loss += loss.item()
            total_acc += (logits.argmax(-1) == batch.query.y[i]).float().mean().item()
        return {"loss": total_loss / T, "accuracy": total_acc / T}

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None,
                       lr: Optional[float] = None) -> torch.Tensor:
        """Query accuracy of each task after adapting on its support set: (T,) float64."""
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in self.params().items()}
        accs = []
        for i in range(batch.num_tasks):
            fast = self.adapt_task(params, batch.support.task(i), steps=steps, lr=lr, first_order=True)
            logits = forward(self.model, fast, batch.query.x[i])
            accs.append((logits.argmax(-1) == batch.query.y[i]).double().mean())
        return torch.stack(accs).cpu()
