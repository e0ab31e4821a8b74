"""Checkpoints: written atomically, loaded with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors and builtins:
    {"format": 1, "step": int, "config": dict, "model": state_dict, "optimizer": state_dict,
     "sampler": {"generator": ByteTensor}, "rng": {"torch": ByteTensor}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from ._io import atomic_torch_save
from .errors import MetalearnError

FORMAT = 1


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    return atomic_torch_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MetalearnError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise MetalearnError(f"checkpoint {path} is not a readable metalearn checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt or "config" not in ckpt:
        raise MetalearnError(f"checkpoint {path} is not a metalearn checkpoint (format {FORMAT})")
    return ckpt
