"""Dtype policy: fp16/bf16 inputs are computed in fp32, fp64 stays fp64, autocast is switched off inside."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half precision (fp16/bf16) to fp32; fp32 and fp64 unchanged (no copy)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (reductions never run in half precision)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def no_autocast(t: Tensor) -> ContextManager[object]:
    """Context that turns autocast off on ``t``'s device, so protocl's maths runs in fp32/fp64."""
    if t.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()
