"""Reptile.

Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms." 2018.
https://arxiv.org/abs/1803.02999   (code: github.com/openai/supervised-reptile)

Algorithm 2 (batched): for each task i of a meta-batch of T tasks, starting from theta,

    phi_i = U^k(theta)      k steps of Adam (beta1 = 0, Sec. 6) on task i's data
    theta <- theta + epsilon * (1/T) sum_i (phi_i - theta)

epsilon is annealed linearly from `outer.lr` (epsilon_0) at the first outer step to
`final_lr` (OpenAI's meta_step_size_final, default 0) at the last:
    epsilon_step = (1 - f) * epsilon_0 + f * epsilon_final,  f = (step - 1) / total_steps.

Implementation of the outer step: `meta_step` puts (1/T) sum_i (theta - phi_i) into `.grad`
and `outer_optimizer` is plain SGD with lr epsilon (set by `schedule`), so
optimizer.step() computes theta - epsilon * (theta - mean phi) = the interpolation above.

Adam state policy (as OpenAI's code, where the Adam slots are global variables that are not
part of the per-task save/restore): one Adam state (v and the step count t; m = g since
beta1 = 0) is carried on from task to task and from outer step to outer step; it is never
reset. Evaluation starts every task from a copy of the current training state and never
changes it (OpenAI saves and restores the full state around evaluation).

Inner mini-batches (`inner_batch_size` = b, OpenAI's --inner-batch): with b > 0 and smaller than
the support set, inner step j of meta-training uses examples stream[j*b : (j+1)*b] of a stream of
fresh random permutations of the support set laid end to end, so 5 steps of 10 over a 50-example
support set (OpenAI's Omniglot setting: --train-shots 10 --inner-batch 10 --inner-iters 5) see
every example exactly once. This is OpenAI's `_mini_batches(..., replacement=False)`, and it matters:
Sec. 5 of the paper shows that Reptile's within-task generalisation term comes from the inner
steps seeing *different* mini-batches, and full-batch steps on one set lose it. The permutations
come from the algorithm's own generator (seeded by `seed`, saved in the checkpoint). With b = 0
(the default) every step uses the whole support set. Evaluation always adapts on the whole
support set (OpenAI's --eval-batch 5 on a 5-way 1-shot support set is the whole set).

Deviations: Adam adds eps to sqrt(v_hat) (PyTorch) where TensorFlow adds eps_hat to sqrt(v);
OpenAI samples each task's "train shots" and its query example from one class pool, we sample the
support set (data.shots per class) and the query set independently of each other.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..inner import Adam, AdamState, forward, run_inner_loop, select
from ..types import Examples, Params, TaskBatch
from .base import LossSpec, MetaLearner, MetricSpec, scored
from .registry import Capabilities, register


def minibatch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> List[Tensor]:
    """`steps` index batches of `batch_size` into n examples, cut from random permutations of range(n)
    laid end to end (a batch may straddle two permutations), as OpenAI's `_mini_batches` without
    replacement: every block of n consecutive draws holds each example once."""
    need = steps * batch_size
    perms = [torch.randperm(n, generator=generator) for _ in range(-(-need // n))]
    stream = torch.cat(perms)
    return [stream[j * batch_size:(j + 1) * batch_size] for j in range(steps)]


@register("reptile")
class Reptile(MetaLearner):
    capabilities = Capabilities(shardable=False, own_lr_schedule=True)
    def __init__(self, model: nn.Module, *, inner_lr: float, inner_steps: int, adapt: Sequence[str] = ("*",),
                 final_lr: float = 0.0, betas: tuple[float, float] = (0.0, 0.999), inner_batch_size: int = 0,
                 seed: int = 0, loss: LossSpec = "cross_entropy", metric: MetricSpec = None):
        super().__init__(model, loss=loss, metric=metric)
        if inner_batch_size < 0:
            raise ValueError(f"Reptile: inner_batch_size must be >= 0 (0 = the whole support set), "
                             f"got {inner_batch_size}")
        self.inner_lr, self.inner_steps, self.final_lr, self.betas = inner_lr, inner_steps, final_lr, betas
        self.inner_batch_size = inner_batch_size
        self.generator = torch.Generator().manual_seed(seed)  # inner mini-batches (CPU: the same stream on any device)
        self.adapt = select([n for n, _ in model.named_parameters()], adapt, what="inner.adapt")
        self.adam_state: Optional[AdamState] = None
        self.initial_lr: Optional[float] = None

    @classmethod
    def from_config(cls, cfg, model: nn.Module, loss: str = "cross_entropy") -> "Reptile":
        cls.check_config(cfg)
        return cls(model, inner_lr=cfg.inner.lr, inner_steps=cfg.inner.steps, adapt=cls.configured_adapt(cfg),
                   final_lr=cfg.reptile.final_lr, inner_batch_size=cfg.reptile.inner_batch_size, seed=cfg.seed,
                   loss=loss)

    # --- outer loop ---------------------------------------------------------------------------
    def outer_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """Plain SGD with lr epsilon: theta - epsilon * (theta - mean phi)."""
        self.initial_lr = lr
        return torch.optim.SGD(list(params), lr=lr)

    def epsilon(self, step: int, total_steps: int) -> float:
        f = (step - 1) / total_steps
        return (1 - f) * self.initial_lr + f * self.final_lr

    def schedule(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        if self.initial_lr is None:
            self.initial_lr = optimizer.param_groups[0]["lr"]
        for g in optimizer.param_groups:
            g["lr"] = self.epsilon(step, total_steps)

    # --- inner loop ---------------------------------------------------------------------------
    def adapt_task(self, theta: Params, support, *, steps: Optional[int] = None, lr: Optional[float] = None,
                   state: Optional[AdamState] = None, batches: Optional[List[Tensor]] = None
                   ) -> tuple[Params, AdamState]:
        """phi = k Adam steps from theta on the support set (step j on support[batches[j]] when
        batches are given); returns (phi detached, new Adam state)."""
        params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in theta.items()}
        rule = Adam(self.inner_lr if lr is None else lr, self.betas)
        if batches is None:
            res = run_inner_loop(self.model, params, support, adapt=self.adapt,
                                 steps=self.inner_steps if steps is None else steps,
                                 rule=rule, state=state, first_order=True, loss_fn=self.loss_fn)
            return {n: p.detach() for n, p in res.params.items()}, res.state.detached()
        for idx in batches:
            res = run_inner_loop(self.model, params, Examples(support.x[idx], support.y[idx]), adapt=self.adapt,
                                 steps=1, rule=rule, state=state, first_order=True, loss_fn=self.loss_fn)
            params = {n: p.detach().requires_grad_(n in self.adapt) for n, p in res.params.items()}
            state = res.state.detached()
        return {n: p.detach() for n, p in params.items()}, state

    def inner_batches(self, n: int) -> Optional[List[Tensor]]:
        """This task's inner mini-batches during meta-training (None = full-batch steps)."""
        b = self.inner_batch_size
        if b == 0 or b >= n:
            return None
        return minibatch_indices(n, b, self.inner_steps, self.generator)

    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate (1/T) sum_i (theta - phi_i) into `.grad`; metrics are the query loss and
        accuracy (or MSE) of phi_i (they play no part in the update)."""
        params = self.params()
        theta = {n: p.detach() for n, p in params.items()}
        delta = {n: torch.zeros_like(p) for n, p in theta.items()}
        total_loss, total_metric, T = 0.0, 0.0, batch.num_tasks
        for i in range(T):
            support = batch.support.task(i)
            phi, self.adam_state = self.adapt_task(theta, support, state=self.adam_state,
                                                   batches=self.inner_batches(support.x.shape[0]))
            for n in self.adapt:
                delta[n] += (theta[n] - phi[n]) / T
            with torch.no_grad():
                out = forward(self.model, phi, batch.query.x[i])
                total_loss += self.loss_fn(out, batch.query.y[i]).item()
                total_metric += self.score(out, batch.query.y[i]).item()
        for n in self.adapt:
            p = params[n]
            p.grad = delta[n] if p.grad is None else p.grad + delta[n]
        return {"loss": total_loss / T, self.metric_name: total_metric / T}

    @torch.no_grad()
    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """Query accuracy (or MSE) per task, (T,) float64; every task starts from the training Adam state."""
        theta = {n: p.detach() for n, p in self.params().items()}
        out = []
        for i in range(batch.num_tasks):
            state = None if self.adam_state is None else self.adam_state.detached()
            phi, _ = self.adapt_task(theta, batch.support.task(i), steps=steps, lr=lr, state=state)
            pred = scored(lambda x: forward(self.model, phi, x), batch.support.x[i], batch.query.x[i], transductive)
            out.append(self.score(pred, batch.query.y[i]))
            self.episode_done()
        return torch.stack(out).cpu()

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state()}
        if self.adam_state is not None:
            state["adam"] = self.adam_state.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.adam_state = AdamState.from_state_dict(state["adam"]) if state.get("adam") else None
        if "generator" in state:  # checkpoints before inner mini-batches have none (and used none)
            self.generator.set_state(state["generator"])
