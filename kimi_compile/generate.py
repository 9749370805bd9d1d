"""Greedy generation over the explicit state: ``generate(model, input_ids, max_new_tokens, backend=...)``.

Backends:

* ``"eager"``: the model as is.
* ``"compile"``: the model step under ``torch.compile(fullgraph=True)`` with the batch, sequence and past-length
  axes marked dynamic (:class:`CompiledStep`; ``dynamic=True`` would also make every hidden / head / cache width
  symbolic and every float attribute a SymFloat, which costs compile time and kernel quality for nothing); one
  graph for the prefill and one for decode steps (T == 1), reused across prompt lengths and steps. The compiled
  step is cached per model, so later calls do not recompile. On CUDA the decode steps run as one CUDA graph
  replayed per token over static state buffers (:class:`kimi_compile.compiled.CUDAGraphDecoder`).
* ``"onnx"``: an exported ONNX model run with ONNX Runtime (``onnx_dir=`` the export directory); implemented by
  ``kimi_compile.export.ort_runtime.generate(onnx_dir, input_ids, max_new_tokens)``, imported lazily.

The loop never reads device data on the host: the next token is an ``argmax`` kept on the device and fed back as
``[B, 1]``; with ``eos_token_id`` given, rows that produced it keep producing it (no early exit, no sync).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .compiled import CompiledStep, compiled_step, cuda_graph_decoder, mark_dynamic_inputs
from .model import KimiForCausalLM

__all__ = ["generate", "compiled_step", "CompiledStep", "mark_dynamic_inputs"]


@torch.no_grad()
def generate(model: KimiForCausalLM, input_ids: Tensor, max_new_tokens: int, backend: str = "eager", *,
             onnx_dir: Optional[str] = None, eos_token_id: Optional[int] = None) -> Tensor:
    """Greedy decoding. Returns int64 ``[B, T + max_new_tokens]`` (the prompt followed by the new tokens)."""
    if backend not in ("eager", "compile", "onnx"):
        raise ValueError(f"backend must be 'eager', 'compile' or 'onnx', got {backend!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be an int64 tensor [B, T] with T >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    input_ids = input_ids.long()
    if backend == "onnx":
        if onnx_dir is None:
            raise ValueError("backend='onnx' needs onnx_dir= (the directory written by the ONNX exporter)")
        try:
            from .export import ort_runtime
        except ImportError as e:
            raise NotImplementedError("backend='onnx' needs kimi_compile.export.ort_runtime, which is not "
                                      f"available: {e}") from e
        return ort_runtime.generate(onnx_dir, input_ids, max_new_tokens, eos_token_id=eos_token_id)
    if not isinstance(model, KimiForCausalLM):
        raise TypeError(f"model must be a KimiForCausalLM, got {type(model).__name__}")
    if max_new_tokens == 0:
        return input_ids.clone()

    if backend == "compile" and model.device.type == "cuda":  # decode steps replayed from one CUDA graph
        decoder = cuda_graph_decoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, eos_token_id)
        return decoder.generate(input_ids.to(model.device), max_new_tokens)
    step = compiled_step(model) if backend == "compile" else model
    input_ids = input_ids.to(model.device)
    state = model.empty_state(input_ids.shape[0])
    logits, state = step(input_ids, state, logits_to_keep=1)
    token = logits[:, -1].argmax(dim=-1, keepdim=True)
    done = token == eos_token_id if eos_token_id is not None else None
    out = [input_ids, token]
    for _ in range(max_new_tokens - 1):
        logits, state = step(token, state)
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        if done is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        token = nxt
        out.append(token)
    return torch.cat(out, dim=1)
