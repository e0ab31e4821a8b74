"""Arithmetic precision of the meta-step: exact float32 by default, TF32 or bfloat16 on request.

    fp32   (default) full float32: on CUDA this also turns TF32 *off* for matmuls and cuDNN
           convolutions (PyTorch enables it for cuDNN by default), so GPU meta-gradients match the
           CPU and the float64 reference to float32 rounding (tests/test_batched.py: 1e-4).
    tf32   CUDA only: matmuls and convolutions on TensorFloat-32 tensor cores (10-bit mantissa
           products, float32 accumulation).
    bf16   torch.autocast(bfloat16) around the meta-step (inner loop, query loss, outer backward):
           convolutions and matmuls in bfloat16, reductions such as BatchNorm statistics and the
           losses in float32 (PyTorch's autocast policy). Parameters, their gradients and the Adam
           state stay float32. On a CPU without native bfloat16 (no AVX512-BF16/AMX) it is slower.

Only the meta-step changes; evaluation always runs in the run's dtype (float32 or float64), so
reported accuracies are never computed in reduced precision. How far reduced precision moves the
meta-gradient is measured by benchmarks/check_precision.py (README, "Reduced precision").
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .config import PRECISIONS
from .errors import MetalearnError


def set_precision(precision: str, device: torch.device) -> None:
    """Check `precision` for `device` and set the process-wide TF32 switches to match it."""
    if precision not in PRECISIONS:
        raise MetalearnError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "tf32" and device.type != "cuda":
        raise MetalearnError(f"precision=tf32 needs a CUDA device (device is {device}); use fp32 or bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"


def meta_step_context(precision: str, device: torch.device) -> ContextManager:
    """The context the meta-step runs in: autocast to bfloat16 for bf16, else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["PRECISIONS", "meta_step_context", "set_precision"]
