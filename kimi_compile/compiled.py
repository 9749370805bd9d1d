"""The model step under ``torch.compile``: :class:`CompiledStep` and the per-model cache :func:`compiled_step`.

``torch.compile(fullgraph=True)`` with the batch, sequence and past-length axes marked dynamic (``dynamic=True``
would also make every hidden / head / cache width symbolic and every float attribute a SymFloat, which costs
compile time and kernel quality for nothing); one graph for the prefill and one for decode steps (T == 1), reused
across prompt lengths and steps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .model import KimiForCausalLM

__all__ = ["compiled_step", "CompiledStep", "mark_dynamic_inputs"]


def mark_dynamic_inputs(input_ids: Tensor, state: Optional[dict[str, Tensor]]) -> None:
    """Mark the axes that vary between calls as dynamic: batch and sequence of ``input_ids``, batch of every
    piece of state, past length of the MLA caches. Sizes 0 / 1 still specialise (silently)."""
    for axis in (0, 1):
        torch._dynamo.maybe_mark_dynamic(input_ids, axis)
    for name, t in (state or {}).items():
        torch._dynamo.maybe_mark_dynamic(t, 0)
        if name.endswith(".key"):
            torch._dynamo.maybe_mark_dynamic(t, 2)


class CompiledStep:
    """``model(input_ids, state, position_ids)`` under ``torch.compile(fullgraph=True)`` with the varying axes
    marked dynamic before each call (so prompt lengths and decode steps reuse one graph each, and every other
    size -- hidden, heads, head dims, cache width -- stays static for the compiler)."""

    def __init__(self, model: KimiForCausalLM, **compile_kwargs) -> None:
        compile_kwargs.setdefault("fullgraph", True)
        self.compiled = torch.compile(model, **compile_kwargs)

    def __call__(self, input_ids: Tensor, state: Optional[dict[str, Tensor]] = None,
                 position_ids: Optional[Tensor] = None, **kwargs):
        mark_dynamic_inputs(input_ids, state)
        return self.compiled(input_ids, state, position_ids, **kwargs)


def compiled_step(model: KimiForCausalLM, **compile_kwargs) -> CompiledStep:
    """The compiled step of ``model`` (cached per model and compile kwargs, so nothing is compiled twice)."""
    key = tuple(sorted(compile_kwargs.items()))
    per_model = model.__dict__.get("_kimi_compiled_steps")
    if per_model is None:  # a plain attribute (not a registered submodule): dies with the model
        per_model = {}
        object.__setattr__(model, "_kimi_compiled_steps", per_model)
    if key not in per_model:
        per_model[key] = CompiledStep(model, **compile_kwargs)
    return per_model[key]
