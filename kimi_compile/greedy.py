"""The one greedy decoding loop, over any step ``(ids, state) -> (logits, state)``.

:func:`kimi_compile.generate` (eager, compiled) and :class:`kimi_compile.export.ort_runtime.OrtKimiModel`
(ONNX Runtime) both run it; it imports nothing of the project, so neither imports the other.

The loop never reads device data on the host: the next token is an ``argmax`` kept on the device and fed back as
``[B, 1]``; with ``eos_token_id`` given, rows that produced it keep producing it (no early exit, no sync).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["greedy", "model_step", "check_request", "Step"]

#: ``step(ids [B, T] int64, state or None) -> (logits [B, T' >= 1, vocab], new_state)``; None starts fresh.
Step = Callable[[Tensor, Optional[Any]], tuple[Tensor, Any]]


def check_request(input_ids: Any, max_new_tokens: Any) -> None:
    """The argument checks every generation entry point shares."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be an int64 tensor [B, T] with T >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integers (int64), got {input_ids.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")


@torch.no_grad()
def greedy(step: Step, input_ids: Tensor, max_new_tokens: int, *, eos_token_id: Optional[int] = None) -> Tensor:
    """Greedy decoding with ``step``; returns int64 ``[B, T + max_new_tokens]`` (prompt, then the new tokens).

    The prompt goes in one call with ``state=None``; each new token is fed back as ``[B, 1]`` with the state the
    previous call returned. Only the last position of each call's logits is read.
    """
    check_request(input_ids, max_new_tokens)
    input_ids = input_ids.long()
    if max_new_tokens == 0:
        return input_ids.clone()
    logits, state = step(input_ids, None)
    token = logits[:, -1].argmax(dim=-1, keepdim=True).to(input_ids.device)
    done = token == eos_token_id if eos_token_id is not None else None
    out = [input_ids, token]
    for _ in range(max_new_tokens - 1):
        logits, state = step(token, state)
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True).to(input_ids.device)
        if done is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        token = nxt
        out.append(token)
    return torch.cat(out, dim=1)


def model_step(model, call: Optional[Callable] = None) -> Step:
    """A :data:`Step` over a KimiForCausalLM: a fresh call starts from ``model.empty_state(B)`` and keeps only the
    last position's logits; ``call`` (default the model) runs it, e.g. the model's compiled step."""
    call = model if call is None else call

    def step(ids: Tensor, state):
        if state is None:
            return call(ids, model.empty_state(ids.shape[0]), logits_to_keep=1)
        return call(ids, state)

    return step
