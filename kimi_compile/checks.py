"""Input checks of :meth:`KimiForCausalLM.forward`: every message names the argument or the state key.

Shapes, dtypes and devices are checked always; under ``torch.compile`` / ``torch.export`` they become guards (or
are decided statically), never graph code. Token id *values* are checked only where that is free: eagerly on a
CPU tensor (a min/max over ``B x T`` ints, no device round trip). On an accelerator the check would be a host
sync per step, and under compile / export it would be data-dependent control flow, so there it is skipped; an
out-of-range id then still fails (the embedding's device-side index assert, or Inductor's bounds check), only
with the backend's message instead of this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import check_state

__all__ = ["check_forward_inputs", "check_token_ids"]

_ID_DTYPES = (torch.int64, torch.int32)


def check_token_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """``ids`` within ``[0, vocab_size)`` where checking is free (eager, plain CPU tensor); see the module doc."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(ids) is not Tensor:
        return
    if ids.device.type != "cpu" or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_forward_inputs(model, input_ids: object, state: object, position_ids: object,
                         logits_to_keep: object) -> None:
    """All checks of ``model.forward(input_ids, state, position_ids, logits_to_keep=...)``."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be an int64 tensor [B, T], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        empty = "sequence length T" if T == 0 else "batch B"
        raise ValueError(f"input_ids must hold at least one row and one token per row, got shape "
                         f"{list(input_ids.shape)} ({empty} = 0)")
    device = model.device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device}, the model on {device}")
    check_token_ids("input_ids", input_ids, model.config.vocab_size)
    if state is not None:
        check_state(model.config, state, B, model.dtype, device, model.state_specs())
    if position_ids is not None:
        _check_position_ids(position_ids, B, T, device)
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")


def _check_position_ids(position_ids: object, B, T, device: torch.device) -> None:
    if not isinstance(position_ids, Tensor):
        raise TypeError(f"position_ids must be a tensor [B, T] or [T], got {type(position_ids).__name__}")
    if position_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"position_ids must be int64, got {position_ids.dtype}")
    shape = tuple(position_ids.shape)
    ok = (position_ids.dim() == 1 and shape[0] == T) or (
        position_ids.dim() == 2 and shape[1] == T and (shape[0] == B or shape[0] == 1))
    if not ok:
        raise ValueError(f"position_ids must have shape [B, T], [1, T] or [T] with B, T = input_ids.shape = "
                         f"({B}, {T}), got {list(shape)}")
    if position_ids.device != device:
        raise ValueError(f"position_ids is on {position_ids.device}, the model on {device}")
