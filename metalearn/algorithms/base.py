"""What every algorithm shares: the loss (classification or regression), metrics, the outer
optimiser and schedule hooks, per-task meta-steps, and transductive or non-transductive scoring.

An algorithm object holds the model (whose parameters are the meta-parameters theta) and,
for some algorithms, extra learnables (Meta-SGD's alpha, MAML++'s per-step lrs) returned by
`meta_parameters()` and saved with `state_dict()`. The training loop calls, per outer step:

    algorithm.schedule(step, total_steps, optimizer)   # annealing (Reptile's epsilon, MAML++)
    algorithm.meta_step(batch)                         # accumulates .grad, returns metrics
    optimizer.step()                                   # optimizer = algorithm.outer_optimizer(...)

BatchNorm policy at scoring time (`transductive`):
    True   the query set is one batch, so BatchNorm normalises with the query batch's statistics
           (MAML's and Reptile's transductive setting);
    False  each query example is scored alone in a batch with the support set
           (support + 1 example), so no query example sees another's statistics (Reptile's
           non-transductive setting, Nichol et al. 2018, Sec. 6).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MetalearnError
from ..inner import forward, run_inner_loop, select
from ..inner.rules import LRSpec
from ..types import Examples, Params, TaskBatch

LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
METRICS = {"cross_entropy": "accuracy", "mse": "mse"}


def metric(outputs: Tensor, y: Tensor, loss: str) -> Tensor:
    """Accuracy of logits (B, N) against labels (B,), or the mean squared error of (B, 1) regressions."""
    if loss == "mse":
        return F.mse_loss(outputs, y).double()
    return (outputs.argmax(-1) == y).double().mean()


def scored(predict_one, support_x: Tensor, query_x: Tensor, transductive: bool) -> Tensor:
    """Outputs on the query set (Q', ...) with `predict_one(x)` = the model on a batch x.

    transductive: predict_one(query_x); otherwise row j = predict_one(cat(support_x, query_x[j]))[-1].
    """
    if transductive:
        return predict_one(query_x)
    return torch.stack([predict_one(torch.cat([support_x, query_x[j:j + 1]]))[-1] for j in range(len(query_x))])


class MetaLearner:
    """Base class: loss, metric name, outer optimiser, schedule hook, extra learnables."""

    def __init__(self, model: nn.Module, *, loss: str = "cross_entropy"):
        if loss not in LOSSES:
            raise MetalearnError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.model, self.loss = model, loss
        self.loss_fn = LOSSES[loss]
        self.metric_name = METRICS[loss]

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def meta_parameters(self) -> List[nn.Parameter]:
        """Learnables besides the model's parameters (trained by the outer loop)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise MetalearnError(f"{type(self).__name__} has no state to load, got keys {sorted(state)}")

    def outer_optimizer(self, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
        """Adam over the trained model parameters and the algorithm's own learnables."""
        return torch.optim.Adam(list(params) + self.meta_parameters(), lr=lr)

    def schedule(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before outer step `step` (1-based) of `total_steps`; annealing goes here."""


class GradientMetaLearner(MetaLearner):
    """MAML-family learner: masks, lr spec, S inner steps, first or second order, per-task loop.

    Execution: a per-task loop; each task's query loss / T is backpropagated before the next
    task is adapted, so memory holds one task's graph at a time and the accumulated gradient
    equals the gradient of the mean. (No vmap: torch.func.vmap through BatchNorm gives a wrong
    second-order meta-gradient.)
    """

    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, first_order: bool = False,
                 adapt: Sequence[str] = ("*",), loss: str = "cross_entropy"):
        super().__init__(model, loss=loss)
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.adapt = select([n for n, _ in model.named_parameters()], adapt, what="inner.adapt")

    # --- hooks subclasses override --------------------------------------------------------
    def lr_spec(self, lr: Optional[float] = None) -> LRSpec:
        """The inner lr spec; `lr` (a test-time override) replaces a scalar inner lr."""
        return self.inner_lr if lr is None else lr

    def forward_fn(self, params: Params, x: Tensor, step: int) -> Tensor:
        """The model at `params` on a batch x; `step` = the inner step (for per-step BatchNorm)."""
        return forward(self.model, params, x)

    def adapt_task(self, params: Params, support: Examples, *, steps: Optional[int] = None,
                   lr: Optional[float] = None, first_order: Optional[bool] = None) -> Params:
        return run_inner_loop(self.model, params, support, adapt=self.adapt, lr=self.lr_spec(lr),
                              steps=self.inner_steps if steps is None else steps,
                              first_order=self.first_order if first_order is None else first_order,
                              loss_fn=self.loss_fn, forward_fn=self.forward_fn).params

    def task_loss(self, params: Params, batch: TaskBatch, i: int) -> tuple[Tensor, Tensor]:
        """(query loss of task i after adaptation, query outputs)."""
        fast = self.adapt_task(params, batch.support.task(i))
        out = self.forward_fn(fast, batch.query.x[i], max(self.inner_steps - 1, 0))
        return self.loss_fn(out, batch.query.y[i]), out

    # --- the two entry points ---------------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss into `.grad` (model and meta_parameters()).

        Returns the mean query loss and accuracy (or MSE) of the adapted models (before the outer step).
        """
        params = self.params()
        total_loss, total_metric, T = 0.0, 0.0, batch.num_tasks
        for i in range(T):
            loss, out = self.task_loss(params, batch, i)
            (loss / T).backward()
            total_loss += loss.item()
            total_metric += metric(out.detach(), batch.query.y[i], self.loss).item()
        return {"loss": total_loss / T, self.metric_name: total_metric / T}

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy (or MSE) of each task after adapting on its support set: (T,) float64."""
        steps = self.inner_steps if steps is None else steps
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in self.params().items()}
        out = []
        for i in range(batch.num_tasks):
            fast = self.adapt_task(params, batch.support.task(i), steps=steps, lr=lr, first_order=True)
            fast = {n: p.detach() for n, p in fast.items()}
            pred = scored(lambda x: self.forward_fn(fast, x, max(steps - 1, 0)), batch.support.x[i],
                          batch.query.x[i], transductive)
            out.append(metric(pred, batch.query.y[i], self.loss))
        return torch.stack(out).cpu()
