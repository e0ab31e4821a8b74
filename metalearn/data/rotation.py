"""Rotations by multiples of 90 degrees, the Omniglot augmentation of Santoro et al. (2016)
and MAML (Finn et al., 2017).

Two ways to use them:
  * `RotatedClasses`: rotations as *new classes*. The class pool of the chosen splits grows 4x:
    class c rotated by 90k degrees (counter-clockwise, torch.rot90) is class c + k * num_classes.
    All four rotations of a class stay in the split of the original, so splits stay disjoint.
  * `rotate_per_class`: a random rotation per class per task (MAML's code), applied by the
    sampler (`EpisodeSampler(..., rotate=True)`) to every image of a class in one task.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import Tensor

from ..errors import MetalearnError


def _rotation_index(h: int, w: int, device) -> Tensor:
    """(4, H*W) int64: pixel p of an image rotated by 90k degrees is pixel index[k, p] of the original."""
    if h != w:
        raise MetalearnError(f"rotations need square images, got {h}x{w}")
    grid = torch.arange(h * w, device=device).view(h, w)
    return torch.stack([torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)])


def rotate_per_class(picked: Tensor, quarter_turns: Tensor) -> Tensor:
    """picked (T, N, M, C, H, W), quarter_turns (T, N) in 0..3 -> each class's M images rotated by 90k degrees.

    One gather with a precomputed pixel permutation (no Python loop); `rotate_per_class_reference`
    is the per-class torch.rot90 loop it is tested against.
    """
    T, N, M, C, H, W = picked.shape
    index = _rotation_index(H, W, picked.device)[quarter_turns]           # (T, N, H*W)
    index = index.view(T, N, 1, 1, H * W).expand(T, N, M, C, H * W)
    return picked.reshape(T, N, M, C, H * W).gather(-1, index).view(T, N, M, C, H, W)


def rotate_per_class_reference(picked: Tensor, quarter_turns: Tensor) -> Tensor:
    out = picked.clone()
    for t in range(picked.shape[0]):
        for n in range(picked.shape[1]):
            out[t, n] = torch.rot90(picked[t, n], int(quarter_turns[t, n]), dims=(-2, -1))
    return out


class RotatedClasses:
    """A data set whose class pool is the original classes plus their 90/180/270-degree rotations.

    images: uint8 (4 * classes, per_class, C, H, W), built lazily from `base.images`;
    `split(splits, rotate_splits)` maps the base splits to this pool: the named splits get all
    four rotations of their classes, the others keep only the unrotated originals.
    """

    def __init__(self, base):
        self.base = base
        self.name = getattr(base, "name", "dataset")
        self.channels = base.channels
        self.samples_per_class = base.samples_per_class
        n = len(base.class_names)
        self.num_base_classes = n
        self.class_names = [f"{c}@rot{90 * k}" if k else c for k in range(4) for c in base.class_names]
        self._images: Tensor | None = None

    @property
    def images(self) -> Tensor:
        if self._images is None:
            base = self.base.images
            if base.shape[-1] != base.shape[-2]:
                raise MetalearnError(f"rotations need square images, got {base.shape[-2]}x{base.shape[-1]}")
            self._images = torch.cat([torch.rot90(base, k, dims=(-2, -1)) for k in range(4)]).contiguous()
        return self._images

    def split(self, splits: Dict[str, Tensor], rotate_splits: Sequence[str]) -> Dict[str, Tensor]:
        unknown = set(rotate_splits) - set(splits)
        if unknown:
            raise MetalearnError(f"data.rotation_splits: unknown split(s) {sorted(unknown)}; known: {sorted(splits)}")
        n = self.num_base_classes
        return {name: torch.cat([idx + k * n for k in range(4)]) if name in rotate_splits else idx.clone()
                for name, idx in splits.items()}
