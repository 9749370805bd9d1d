"""The device context for Triton launches (the tensor's CUDA device, or nothing for CPU tensors: the
Triton interpreter runs on CPU) and the cached properties that launch configurations read."""
from __future__ import annotations

import contextlib
import functools

import torch


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (launches go to its device, not the current one)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA device (index None: the current device), cached: a
    host-side lookup, no sync, cheap enough for every launch."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())
