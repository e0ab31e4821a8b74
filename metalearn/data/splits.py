"""Class splits. Train, validation and test classes are disjoint by construction and checked."""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..errors import MetalearnError


def seeded_split(num_classes: int, sizes: Sequence[int], seed: int,
                 names: Sequence[str] = ("train", "val", "test")) -> Dict[str, torch.Tensor]:
    """A seeded random permutation of the classes cut into consecutive pieces.

    The last split takes the remainder when sum(sizes) < num_classes is given with one size
    fewer than names. Returns split name -> sorted int64 class indices.
    """
    sizes = list(sizes)
    if len(sizes) == len(names) - 1:
        sizes.append(num_classes - sum(sizes))
    if len(sizes) != len(names) or sum(sizes) != num_classes or min(sizes) <= 0:
        raise MetalearnError(f"split sizes {sizes} do not partition {num_classes} classes")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_classes, generator=g)
    out, start = {}, 0
    for name, n in zip(names, sizes):
        out[name] = perm[start:start + n].sort().values
        start += n
    check_disjoint(out)
    return out


def check_disjoint(splits: Dict[str, torch.Tensor]) -> None:
    seen: Dict[int, str] = {}
    for name, idx in splits.items():
        for c in idx.tolist():
            if c in seen:
                raise MetalearnError(f"class {c} is in both the {seen[c]} and the {name} split")
            seen[c] = name


def omniglot_maml_split(seed: int = 1) -> Dict[str, torch.Tensor]:
    """MAML's Omniglot protocol: 1200 characters for meta-training (1100 train + 100 val), 423 for test.

    Like MAML's code (random.seed(1); shuffle; cut), but the shuffle is torch's, so the exact
    characters differ from MAML's.
    """
    return seeded_split(1623, [1100, 100, 423], seed)
