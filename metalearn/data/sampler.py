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
from .rotation import rotate_per_class, rotate_per_class_reference


def check_episode_fits(split: str, num_classes: int, per_class: int, ways: int, shots: int, query_shots: int) -> None:
    if ways > num_classes:
        raise MetalearnError(f"ways={ways} is more than the {num_classes} classes in the {split} split")
    if shots + query_shots > per_class:
        raise MetalearnError(f"shots + query_shots = {shots} + {query_shots} = {shots + query_shots} is more than "
                             f"the {per_class} examples per class in the {split} split")


def _assemble(flat: Tensor, per_class: int, classes: Tensor, samples: Tensor, ways: int, shots: int,
              query_shots: int, dtype: torch.dtype, quarter_turns: Tensor | None = None) -> TaskBatch:
    """The fast path: two row gathers from the flattened images, straight into support and query.

    flat: uint8 (classes * per_class, C, H, W), a view of images (classes, per_class, C, H, W);
    classes (T, N), samples (T, N, K+Q) choose the examples; quarter_turns (T, N) in 0..3, if given,
    rotates every image of class n in task t by 90k degrees. `_assemble_reference` is the plain
    advanced-indexing twin it is tested against.
    """
    T = classes.shape[0]
    shape = flat.shape[1:]
    rows = classes.unsqueeze(-1) * per_class + samples                     # (T, N, K+Q) flat row ids
    sides = []
    for part, m in ((rows[:, :, :shots], shots), (rows[:, :, shots:], query_shots)):
        x = flat.index_select(0, part.reshape(-1)).view(T, ways, m, *shape)  # (T, N, M, C, H, W) uint8
        if quarter_turns is not None:
            x = rotate_per_class(x, quarter_turns)
        sides.append(_to_unit(x.reshape(T, ways * m, *shape), dtype))
    labels = torch.arange(ways, device=flat.device)
    support_y = labels.repeat_interleave(shots).expand(T, -1)
    query_y = labels.repeat_interleave(query_shots).expand(T, -1)
    return TaskBatch(Examples(sides[0], support_y), Examples(sides[1], query_y), ways, shots, query_shots)


def _to_unit(x: Tensor, dtype: torch.dtype) -> Tensor:
    """uint8 -> dtype in [0, 1], x / 255 (convert, then divide in place: faster on CPU than the
    mixed-dtype torch.div(x, 255.0) kernel, measured)."""
    return x.to(dtype).div_(255.0)


def _assemble_reference(images: Tensor, classes: Tensor, samples: Tensor, ways: int, shots: int, query_shots: int,
                        dtype: torch.dtype, quarter_turns: Tensor | None = None) -> TaskBatch:
    """Reference twin of `_assemble`: advanced indexing on (classes, per_class, C, H, W), per-class rot90."""
    T = classes.shape[0]
    picked = images[classes.unsqueeze(-1), samples]          # (T, N, K+Q, C, H, W) uint8
    if quarter_turns is not None:
        picked = rotate_per_class_reference(picked, quarter_turns)
    picked = picked.to(dtype).div_(255.0)
    shape = picked.shape[3:]
    support_x = picked[:, :, :shots].reshape(T, ways * shots, *shape)
    query_x = picked[:, :, shots:].reshape(T, ways * query_shots, *shape)
    labels = torch.arange(ways, device=images.device)
    support_y = labels.repeat_interleave(shots).expand(T, -1)
    query_y = labels.repeat_interleave(query_shots).expand(T, -1)
    return TaskBatch(Examples(support_x, support_y), Examples(query_x, query_y), ways, shots, query_shots)


def _flatten(images: Tensor) -> Tensor:
    """(classes, per_class, C, H, W) -> (classes * per_class, C, H, W), a view when contiguous."""
    return images.reshape(images.shape[0] * images.shape[1], *images.shape[2:])


class EpisodeSampler:
    """Draws meta-batches of N-way K-shot tasks from one split.

    images: uint8 (classes, per_class, C, H, W), already restricted to the split's classes.
    Classes are drawn without replacement per task and labelled 0..N-1 in drawn order (a
    fresh random labelling per task); support and query examples are disjoint.
    rotate=True rotates all images of each drawn class by a random multiple of 90 degrees,
    drawn per class per task (MAML's Omniglot augmentation); images must be square.
    """

    def __init__(self, images: Tensor, ways: int, shots: int, query_shots: int, *, seed: int,
                 split: str = "train", dtype: torch.dtype = torch.float32, rotate: bool = False):
        check_episode_fits(split, images.shape[0], images.shape[1], ways, shots, query_shots)
        if rotate and images.shape[-1] != images.shape[-2]:
            raise MetalearnError(f"rotate=True needs square images, got {images.shape[-2]}x{images.shape[-1]}")
        self.images, self.ways, self.shots, self.query_shots = images, ways, shots, query_shots
        self.dtype, self.rotate = dtype, rotate
        self._flat = _flatten(images.contiguous())
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def sample(self, num_tasks: int, part: slice | None = None) -> TaskBatch:
        """A meta-batch of `num_tasks` tasks, or only tasks `part` of it (a process's slice of the
        global meta-batch under torchrun): the indices of the whole batch are drawn (cheap), so the
        generator advances as in a one-process run, and only the slice's images are assembled."""
        C, P = self.images.shape[:2]
        dev, g = self.images.device, self.generator
        # top-N of iid uniforms: N distinct classes, uniformly chosen, in uniformly random order
        classes = torch.rand(num_tasks, C, device=dev, generator=g).topk(self.ways, dim=-1).indices
        samples = torch.rand(num_tasks, self.ways, P, device=dev, generator=g).argsort(-1)
        samples = samples[..., : self.shots + self.query_shots]
        turns = (torch.randint(0, 4, (num_tasks, self.ways), device=dev, generator=g) if self.rotate else None)
        if part is not None:
            classes, samples, turns = classes[part], samples[part], (turns[part] if turns is not None else None)
        return _assemble(self._flat, P, classes, samples, self.ways, self.shots, self.query_shots, self.dtype, turns)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def episode_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)


def fixed_episodes(images: Tensor, ways: int, shots: int, query_shots: int, *, count: int, seed: int,
                   batch_size: int = 50, split: str = "test", dtype: torch.dtype = torch.float32,
                   start: int = 0, rotate: bool = False) -> Iterator[TaskBatch]:
    """Episodes start..count-1 of the enumerated list fixed by `seed`, in batches of `batch_size`.

    Indices are drawn on the CPU from a generator seeded by (seed, i), so the list is the same on
    every device and does not depend on batch_size. rotate=True: a rotation per class per
    episode, as in EpisodeSampler, drawn from the same per-episode generator.
    """
    check_episode_fits(split, images.shape[0], images.shape[1], ways, shots, query_shots)
    C, P = images.shape[:2]
    flat = _flatten(images.contiguous())
    for lo in range(start, count, batch_size):
        hi = min(count, lo + batch_size)
        classes, samples, turns = [], [], []
        for i in range(lo, hi):
            g = torch.Generator().manual_seed(episode_seed(seed, i))
            classes.append(torch.randperm(C, generator=g)[:ways])
            samples.append(torch.rand(ways, P, generator=g).argsort(-1)[:, : shots + query_shots])
            if rotate:
                turns.append(torch.randint(0, 4, (ways,), generator=g))
        dev = images.device
        yield _assemble(flat, P, torch.stack(classes).to(dev), torch.stack(samples).to(dev),
                        ways, shots, query_shots, dtype, torch.stack(turns).to(dev) if rotate else None)
