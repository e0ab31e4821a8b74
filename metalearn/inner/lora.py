"""Low-rank adaptation (LoRA) as the thing an inner loop adapts.

Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models." ICLR 2022.
https://arxiv.org/abs/2106.09685

For each selected weight W (out, in) or (out, in, k, k), the inner loop adapts two small
matrices instead of W:

    A (r, in*k*k)   random, nn.Linear's init U(-1/sqrt(in*k*k), 1/sqrt(in*k*k)), from a seeded generator
    B (out, r)      zero
    W_eff = W + (alpha / r) * (B @ A).view_as(W)                                        (Hu et al., Eq. 3)

With B = 0 the model is exactly the base model at the start of every task; the inner loop
then takes its steps on {A, B} (named `<W's name>.lora_A` / `.lora_B` in the params dict)
and `merge` folds the deltas into ordinary weights, so any forward that takes a params dict
(the plain functional forward, the batched grouped-conv forward) runs unchanged. Adapted
deltas may carry a leading task dimension T (A (T, r, in*k*k), B (T, out, r)): the merged
weight then has one (T, *W.shape) copy per task.

The deltas start from the same (A0, 0) for every task, so they are not meta-learned: in
MAML the outer loop trains W through the merge, and the inner loop moves only the deltas.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import MetalearnError
from ..types import Params

SUFFIX_A, SUFFIX_B = ".lora_A", ".lora_B"


class LoRA:
    """Rank-`rank` deltas on the weights `names` (each with >= 2 dims) of a params dict.

    scale = alpha / rank (alpha = 0 means alpha = rank, scale 1). `seed` fixes A0.
    """

    def __init__(self, params: Params, names: Sequence[str], rank: int, alpha: float = 0.0, seed: int = 0):
        if rank < 1:
            raise MetalearnError(f"LoRA rank must be >= 1, got {rank}")
        bad = [n for n in names if params[n].dim() < 2]
        if bad:
            raise MetalearnError(f"LoRA needs weights with >= 2 dims; {', '.join(bad)} has fewer")
        self.names: List[str] = list(names)
        self.rank = rank
        self.scale = (alpha or rank) / rank
        self.shapes = {n: tuple(params[n].shape) for n in self.names}
        g = torch.Generator().manual_seed(seed)
        self._a0: Dict[str, Tensor] = {}
        for n in self.names:
            fan_in = math.prod(self.shapes[n][1:])
            bound = 1.0 / math.sqrt(fan_in)
            self._a0[n] = (torch.rand(rank, fan_in, generator=g, dtype=torch.float64) * 2 - 1) * bound

    @property
    def delta_names(self) -> List[str]:
        """The names the inner loop adapts: `<W>.lora_A`, `<W>.lora_B` for each target W."""
        return [n + s for n in self.names for s in (SUFFIX_A, SUFFIX_B)]

    def init(self, like: Tensor) -> Params:
        """{A0, B0 = 0} for every target, with `like`'s dtype and device (no task dimension)."""
        out = {}
        for n in self.names:
            out[n + SUFFIX_A] = self._a0[n].to(dtype=like.dtype, device=like.device, copy=True)
            out[n + SUFFIX_B] = torch.zeros(self.shapes[n][0], self.rank, dtype=like.dtype, device=like.device)
        return out

    def merge(self, params: Params) -> Params:
        """params without the delta entries, each target W replaced by W + scale * (B @ A).view_as(W).

        A (r, F) / B (O, r) give a (O, ...) weight; A (T, r, F) / B (T, O, r) give (T, O, ...) (a task
        dimension, for batched forwards). Differentiable in W, A and B.
        """
        out = {k: v for k, v in params.items() if not k.endswith((SUFFIX_A, SUFFIX_B))}
        for n in self.names:
            a, b = params[n + SUFFIX_A], params[n + SUFFIX_B]
            delta = b @ a  # (O, F) or (T, O, F)
            shape = self.shapes[n]
            out[n] = out[n] + self.scale * delta.reshape(*delta.shape[:-2], *shape)
        return out

    def counts(self) -> Dict[str, int]:
        """{'lora': adapted delta entries, 'full': entries of the target weights they replace}."""
        lora = sum(self.rank * (s[0] + math.prod(s[1:])) for s in self.shapes.values())
        return {"lora": lora, "full": sum(math.prod(s) for s in self.shapes.values())}


def lora_targets(params: Params, adapt: Sequence[str]) -> "tuple[List[str], List[str]]":
    """Split adapted names into (weights with >= 2 dims -> LoRA, the rest -> adapted in full)."""
    low = [n for n in adapt if params[n].dim() >= 2]
    return low, [n for n in adapt if params[n].dim() < 2]


def adapted_size(params: Params, names: Sequence[str], lora: Optional[LoRA] = None) -> Dict[str, int]:
    """Adapted entries per task and their bytes (x3 with an Adam state's two moments is the caller's business):
    {'parameters': full names' entries + LoRA deltas' entries, 'bytes': the same in bytes}."""
    n_full = sum(params[n].numel() for n in names)
    n_lora = lora.counts()["lora"] if lora is not None else 0
    item = next(iter(params.values())).element_size()
    return {"parameters": n_full + n_lora, "bytes": (n_full + n_lora) * item}


__all__ = ["LoRA", "adapted_size", "lora_targets"]
