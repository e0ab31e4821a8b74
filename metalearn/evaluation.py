"""Evaluation on a fixed, enumerated, seeded list of episodes.

Each episode: adapt on its support set (test-time inner steps and lr, set independently of
training), score accuracy on its query set. Report the mean over episodes with a 95%
confidence interval, 1.96 * s / sqrt(n), s the sample standard deviation (ddof=1).

BatchNorm: conv4's BatchNorm is transductive (batch statistics of the query set at scoring
time, as in MAML's code); the mode is recorded in the result.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from .data import fixed_episodes


@dataclass
class EvalResult:
    split: str
    episodes: int
    ways: int
    shots: int
    query_shots: int
    inner_steps: int
    inner_lr: Optional[float]
    """The scalar test-time lr; None for algorithms that adapt with their learned lrs (Meta-SGD, MAML++)."""
    seed: int
    batchnorm: str
    mean: float
    ci95: float
    accuracies: List[float] = field(repr=False)
    transductive: bool = True
    """True: each query set scored as one batch (BatchNorm uses its statistics); False: each query
    example scored in a batch with the support set only."""

    def summary(self) -> str:
        return (f"{self.split}: {100 * self.mean:.2f} ± {100 * self.ci95:.2f}% "
                f"({self.ways}-way {self.shots}-shot, {self.episodes} episodes, {self.inner_steps} inner steps)")

    def to_dict(self) -> dict:
        return asdict(self)


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) with the sample standard deviation; ci is 0 for one value."""
    v = values.double()
    n = v.numel()
    if n == 0:
        raise ValueError("no values")
    std = v.std(unbiased=True).item() if n > 1 else 0.0
    return v.mean().item(), 1.96 * std / math.sqrt(n)


def evaluate(algorithm, images: torch.Tensor, *, ways: int, shots: int, query_shots: int, episodes: int,
             seed: int, inner_steps: int, inner_lr: float, batch_size: int = 50, split: str = "test",
             batchnorm: str = "transductive", dtype: torch.dtype = torch.float32,
             progress: bool = False, transductive: bool = True) -> EvalResult:
    """images: uint8 (classes, per_class, C, H, W) of the split, on the evaluation device."""
    accs = []
    batches = fixed_episodes(images, ways, shots, query_shots, count=episodes, seed=seed,
                             batch_size=batch_size, split=split, dtype=dtype)
    with tqdm(total=episodes, desc=f"eval {split}", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for batch in batches:
            accs.append(algorithm.evaluate_batch(batch, steps=inner_steps, lr=inner_lr, transductive=transductive))
            bar.update(batch.num_tasks)
    acc = torch.cat(accs)
    mean, ci = mean_ci95(acc)
    recorded_lr = None if getattr(algorithm, "learns_inner_lr", False) else inner_lr
    return EvalResult(split, episodes, ways, shots, query_shots, inner_steps, recorded_lr, seed, batchnorm,
                      mean, ci, acc.tolist(), transductive)
