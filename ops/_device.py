"""The device context for Triton launches: the tensor's CUDA device, or nothing for CPU tensors (the
Triton interpreter runs on CPU)."""
from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (launches go to its device, not the current one)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
