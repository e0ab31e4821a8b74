"""Seeded N-way K-shot episode samplers over a uint8 image tensor.

`EpisodeSampler` draws a whole meta-batch at once with index operations on the tensor's
device; `fixed_episodes` enumerates a fixed list of evaluation episodes where episode i
depends only on (seed, i): the same on every run, device and process, whatever the
batch size.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from ..errors import MetalearnError
from ..types import Examples, TaskBatch


def check_episode_fits(split: str, num_classes: int, per_class: int, ways: int, shots: int, query_shots: int) -> None:
    if ways > num_classes:
        raise MetalearnError(f"ways={ways} is more than the {num_classes} classes in the {split} split")
    if shots + query_shots > per_class:
        raise MetalearnError(f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots} is more than "
                             f"the {per_class} examples per class in the {split} split")


def _assemble(images: Tensor, classes: Tensor, samples: Tensor, ways: int, shots: int, query_shots: int,
              dtype: torch.dtype) -> TaskBatch:
    """classes (T, N), samples (T, N, K+Q) index images (classes, per_class, C, H, W)."""
    T = classes.shape[0]
    picked = images[classes.unsqueeze(-1), samples]          # (T, N, K+Q, C, H, W) uint8
    picked = picked.to(dtype).div_(255.0)
    shape = picked.shape[3:]
    support_x = picked[:, :, :shots].reshape(T, ways * shots, *shape)
    query_x = picked[:, :, shots:].reshape(T, ways * query_shots, *shape)
    labels = torch.arange(ways, device=images.device)
    support_y = labels.repeat_interleave(shots).expand(T, -1)
    query_y = labels.repeat_interleave(query_shots).expand(T, -1)
    return TaskBatch(Examples(support_x, support_y), Examples(query_x, query_y), ways, shots, query_shots)


class EpisodeSampler:
    """Draws meta-batches of N-way K-shot tasks from one split.

    images: uint8 (classes, per_class, C, H, W), already restricted to the split's classes.
    Classes are drawn without replacement per task and labelled 0..N-1 in drawn order (a
    fresh random labelling per task); support and query examples are disjoint.
    """

    def __init__(self, images: Tensor, ways: int, shots: int, query_shots: int, *, seed: int,
                 split: str = "train", dtype: torch.dtype = torch.float32):
        check_episode_fits(split, images.shape[0], images.shape[1], ways, shots, query_shots)
        self.images, self.ways, self.shots, self.query_shots = images, ways, shots, query_shots
        self.dtype = dtype
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def sample(self, num_tasks: int) -> TaskBatch:
        C, P = self.images.shape[:2]
        dev, g = self.images.device, self.generator
        classes = torch.ones(num_tasks, C, device=dev).multinomial(self.ways, replacement=False, generator=g)
        samples = torch.rand(num_tasks, self.ways, P, device=dev, generator=g).argsort(-1)[..., : self.shots + self.query_shots]
        return _assemble(self.images, classes, samples, self.ways, self.shots, self.query_shots, self.dtype)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def episode_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)


def fixed_episodes(images: Tensor, ways: int, shots: int, query_shots: int, *, count: int, seed: int,
                   batch_size: int = 50, split: str = "test", dtype: torch.dtype = torch.float32,
                   start: int = 0) -> Iterator[TaskBatch]:
    """Episodes start..count-1 of the enumerated list fixed by `seed`, in batches of `batch_size`.

    Indices are drawn on the CPU from a generator seeded by (seed, i), so the list is the same on
    every device and does not depend on batch_size.
    """
    check_episode_fits(split, images.shape[0], images.shape[1], ways, shots, query_shots)
    C, P = images.shape[:2]
    for lo in range(start, count, batch_size):
        hi = min(count, lo + batch_size)
        classes, samples = [], []
        for i in range(lo, hi):
            g = torch.Generator().manual_seed(episode_seed(seed, i))
            classes.append(torch.randperm(C, generator=g)[:ways])
            samples.append(torch.rand(ways, P, generator=g).argsort(-1)[:, : shots + query_shots])
        yield _assemble(images, torch.stack(classes).to(images.device), torch.stack(samples).to(images.device),
                        ways, shots, query_shots, dtype)
