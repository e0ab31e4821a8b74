"""Named containers for episodes and parameters.

Shapes use the papers' vocabulary:
  T = tasks in the meta-batch, N = ways, K = shots, Q = query_shots,
  C, H, W = image channels, height, width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor

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
        return Examples(self.x[i], self.y[i])

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

    def task(self, i: int) -> "TaskBatch":
        """Task i as a batch of one."""
        sl = slice(i, i + 1)
        return TaskBatch(
            Examples(self.support.x[sl], self.support.y[sl]),
            Examples(self.query.x[sl], self.query.y[sl]),
            self.ways, self.shots, self.query_shots,
        )

    def to(self, device: torch.device | str) -> "TaskBatch":
        return TaskBatch(self.support.to(device), self.query.to(device),
                         self.ways, self.shots, self.query_shots)
