"""Greedy generation: ``generate(model, input_ids, max_new_tokens, backend=...)``.

``model`` is a :class:`KimiForCausalLM`, or any step ``(ids, state) -> (logits, state)`` (state None = fresh;
see :data:`kimi_compile.greedy.Step`). Every backend runs the one loop of :func:`kimi_compile.greedy.greedy`.

Backends:

* ``"eager"``: the model (or the step) as is.
* ``"compile"``: the model's step under ``torch.compile(fullgraph=True)``, cached per model
  (:func:`kimi_compile.compiled.compiled_step`): one graph for the prefill and one for decode steps. The first
  call compiles for tens of seconds; a progress bar says so (on a terminal, or with ``progress=True``). On CUDA
  the decode steps run as one CUDA graph replayed per token over static state buffers
  (:class:`kimi_compile.compiled.CUDAGraphDecoder`).
* ``"onnx"``: a folder written by ``kimi-export --target onnx`` (``onnx_dir=``, or the folder as ``model``).
  It runs in onnxruntime-genai when that is installed and the folder has a ``genai_config.json``
  (``onnx_runtime="genai"``), else in an ONNX Runtime session (``onnx_runtime="onnxruntime"``). The folder holds
  the weights: passing a KimiForCausalLM with ``backend="onnx"`` is an error, since it would not run.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Optional

import torch
from torch import Tensor

from .compiled import CompiledStep, compiled_step, cuda_graph_decoder, mark_dynamic_inputs
from .greedy import check_request, greedy, model_step
from .model import KimiForCausalLM

__all__ = ["generate", "compiled_step", "CompiledStep", "mark_dynamic_inputs"]

BACKENDS = ("eager", "compile", "onnx")
ONNX_RUNTIMES = ("auto", "genai", "onnxruntime")

_compiled_before: "weakref.WeakSet[KimiForCausalLM]" = weakref.WeakSet()


def _progress_bar(total: int, enabled: Optional[bool], desc: str):
    from tqdm.auto import tqdm

    # enabled=None: tqdm shows the bar only on a terminal
    return tqdm(total=total, desc=desc, unit="tok", disable=None if enabled is None else not enabled, leave=False)


def _onnx_generate(model, input_ids: Tensor, max_new_tokens: int, onnx_dir, eos_token_id, onnx_runtime: str):
    if onnx_dir is None and not isinstance(model, (str, os.PathLike)):
        raise ValueError("backend='onnx' needs onnx_dir= (the folder written by kimi-export --target onnx); it runs "
                         "that folder's weights, so model must be None or the folder")
    if isinstance(model, KimiForCausalLM):
        raise TypeError("backend='onnx' runs the exported folder (its own weights), so model must be None or that "
                        "folder; got a KimiForCausalLM, which would be ignored: pass model=None, onnx_dir=DIR")
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"with backend='onnx', model must be None or the exported folder, got {type(model).__name__}")
    if model is not None and onnx_dir is not None:
        raise ValueError("backend='onnx': give the exported folder once, as model or as onnx_dir, not both")
    folder = onnx_dir if onnx_dir is not None else model
    if onnx_runtime not in ONNX_RUNTIMES:
        raise ValueError(f"onnx_runtime must be one of {ONNX_RUNTIMES}, got {onnx_runtime!r}")
    if onnx_runtime in ("auto", "genai"):
        from .export import genai_runtime

        reason = genai_runtime.unavailable_reason(folder)
        if reason is None:
            return genai_runtime.generate(folder, input_ids, max_new_tokens, eos_token_id=eos_token_id)
        if onnx_runtime == "genai":
            raise RuntimeError(f"onnx_runtime='genai': {reason}")
    from .export import ort_runtime

    return ort_runtime.generate(folder, input_ids, max_new_tokens, eos_token_id=eos_token_id)


@torch.no_grad()
def generate(model: Any, input_ids: Tensor, max_new_tokens: int, backend: str = "eager", *,
             onnx_dir: Optional[str] = None, eos_token_id: Optional[int] = None, onnx_runtime: str = "auto",
             progress: Optional[bool] = None) -> Tensor:
    """Greedy decoding. Returns int64 ``[B, T + max_new_tokens]`` (the prompt followed by the new tokens).

    With ``eos_token_id``, rows that produced it keep producing it. ``progress``: a bar over the new tokens
    (None: only while a first ``backend="compile"`` call compiles, and only on a terminal).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_request(input_ids, max_new_tokens)
    input_ids = input_ids.long()
    if backend == "onnx":
        return _onnx_generate(model, input_ids, max_new_tokens, onnx_dir, eos_token_id, onnx_runtime)
    if onnx_dir is not None:
        raise ValueError(f"onnx_dir is only used by backend='onnx' (backend={backend!r})")
    if isinstance(model, KimiForCausalLM):
        input_ids = input_ids.to(model.device)
        if backend == "compile" and model.device.type == "cuda" and max_new_tokens > 0:
            decoder = cuda_graph_decoder(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens, eos_token_id)
            return decoder.generate(input_ids, max_new_tokens)
        if backend == "compile":
            first = model not in _compiled_before
            _compiled_before.add(model)
            step = model_step(model, compiled_step(model))
            if progress is None and not first:
                progress = False
        else:
            step = model_step(model)
            progress = bool(progress)
    elif callable(model):
        if backend == "compile":
            raise TypeError("backend='compile' compiles a KimiForCausalLM; compile your own step and pass it with "
                            "backend='eager'")
        step = model
        progress = bool(progress)
    else:
        raise TypeError(f"model must be a KimiForCausalLM or a step (ids, state) -> (logits, state), "
                        f"got {type(model).__name__}")
    if max_new_tokens == 0 or progress is False:
        return greedy(step, input_ids, max_new_tokens, eos_token_id=eos_token_id)

    bar = _progress_bar(max_new_tokens, progress, "generate: torch.compile of the prefill graph"
                        if backend == "compile" else "generate")
    calls = 0

    def step_with_progress(ids, state):
        nonlocal calls
        out = step(ids, state)
        calls += 1
        bar.update(1)
        if backend == "compile":
            bar.set_description("generate: torch.compile of the decode graph" if calls == 1 else "generate")
        return out

    try:
        return greedy(step_with_progress, input_ids, max_new_tokens, eos_token_id=eos_token_id)
    finally:
        bar.close()
