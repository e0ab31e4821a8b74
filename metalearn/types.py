"""Named containers for episodes and parameters.

Shapes use the papers' vocabulary:
  T = tasks in the meta-batch, N = ways, K = shots, Q = query_shots,
  C, H, W = image channels, height, width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor, nn

Params = Dict[str, Tensor]
"""A model's parameters by name, as `torch.func.functional_call` takes them."""


@dataclass(frozen=True)
class Examples:
    """Inputs and labels of one side (support or query) of a batch of tasks.

    x: (T, N*M, C, H, W) float images (M = K for support, Q for query)
    y: (T, N*M) int64 labels in 0..N-1
    """

    x: Tensor
    y: Tensor

    def task(self, i: int) -> "Examples":
        """Task i's examples, the task dimension dropped: x (N*M, C, H, W), y (N*M)."""
        return Examples(self.x[i], self.y[i])

    def tasks(self, sl: slice) -> "Examples":
        """Tasks `sl`, the task dimension kept: x (len, N*M, C, H, W)."""
        return Examples(self.x[sl], self.y[sl])

    def to(self, device: torch.device | str) -> "Examples":
        return Examples(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of N-way K-shot tasks.

    support: what the inner loop adapts on,   x (T, N*K, C, H, W), y (T, N*K)
    query:   what the adapted model is scored on, x (T, N*Q, C, H, W), y (T, N*Q)
    """

    support: Examples
    query: Examples
    ways: int
    shots: int
    query_shots: int

    @property
    def num_tasks(self) -> int:
        return self.support.x.shape[0]

    def task(self, i: int) -> "Task":
        """Task i, the task dimension dropped (as `Examples.task`): `batch.task(i).support` is what
        `metalearn.inner_loop` takes, and equals `batch.support.task(i)`."""
        return Task(self.support.task(i), self.query.task(i), self.ways, self.shots, self.query_shots)

    def tasks(self, sl: slice) -> "TaskBatch":
        """Tasks `sl` as a smaller meta-batch (the task dimension kept); `batch.tasks(slice(i, i + 1))` is task i
        as a batch of one, which `meta_step` and `evaluate_batch` take."""
        return TaskBatch(self.support.tasks(sl), self.query.tasks(sl), self.ways, self.shots, self.query_shots)

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(self.support.to(device), self.query.to(device),
                         self.ways, self.shots, self.query_shots)


@dataclass(frozen=True)
class Task:
    """One N-way K-shot task: support x (N*K, C, H, W), y (N*K); query x (N*Q, C, H, W), y (N*Q)."""

    support: Examples
    query: Examples
    ways: int
    shots: int
    query_shots: int


@runtime_checkable
class Adapter(Protocol):
    """What evaluation needs: something that adapts to each task's support set and scores its query set.
    The transfer baseline (metalearn/algorithms/finetune.py) is an Adapter and nothing more."""

    model: nn.Module
    metric_name: str
    """"accuracy" (classification) or "mse" (regression)."""
    capabilities: Any
    """metalearn.algorithms.registry.Capabilities: what it declares it supports."""
    on_episode: Optional[Callable[[], None]]
    """Called after each scored episode while evaluation shows a progress bar."""

    def evaluate_batch(self, batch: TaskBatch, *, steps: Optional[int] = None, lr: Optional[float] = None,
                       transductive: bool = True) -> Tensor:
        """(T,) float64: each task's query accuracy (or MSE) after adapting on its support set."""

    def execution_plan(self) -> Tuple[str, str]:
        """("loop" | "batched" | "hybrid", why): how a batch of tasks is run."""

    def state_dict(self) -> dict:
        """The algorithm's own state (learned lrs, Reptile's Adam state), saved in checkpoints."""

    def load_state_dict(self, state: dict) -> None:
        ...


@runtime_checkable
class MetaLearner(Adapter, Protocol):
    """The interface the training loop, evaluation, torchrun and the CLI use, written down once.
    `metalearn.engine.Engine` around any registered algorithm implements it. Per outer step:

        learner.schedule(step, total_steps, optimizer)   # annealing (Reptile's epsilon, MAML++)
        learner.meta_step(batch)                         # accumulates the meta-gradient into .grad
        optimizer.step()                                 # optimizer = learner.outer_optimizer(params, lr)
    """

    def meta_step(self, batch: TaskBatch) -> Dict[str, float]:
        """Accumulate the meta-gradient of the mean query loss into `.grad`; the batch's mean query loss
        and metric (of the adapted models, before the outer step)."""

    def outer_optimizer(self, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
        """The outer optimiser over `params` and the algorithm's own learnables."""

    def schedule(self, step: int, total_steps: int, optimizer: torch.optim.Optimizer) -> None:
        """Called before outer step `step` (1-based): sets the outer lr (and MAML++'s per-step schedules)."""

    def meta_parameters(self) -> List[nn.Parameter]:
        """Learnables besides the model's parameters (Meta-SGD's alpha, MAML++'s lrs)."""
