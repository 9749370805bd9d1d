"""Input checks shared by the kimi ops: every message names the offending argument."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(named: dict[str, Tensor | None]) -> None:
    present = {n: t for n, t in named.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for n, t in present.items():
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}: all inputs must share a device")


def check_dim(name: str, t: Tensor, axis: int, expected: int, what: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(f"{name}.shape[{axis}] ({what}) must be {expected}, got shape {tuple(t.shape)}")
