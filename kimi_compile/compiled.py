"""The model step under ``torch.compile``: :class:`CompiledStep` and the per-model cache :func:`compiled_step`.

``torch.compile(fullgraph=True)`` with the batch, sequence and past-length axes marked dynamic (``dynamic=True``
would also make every hidden / head / cache width symbolic and every float attribute a SymFloat, which costs
compile time and kernel quality for nothing): per batch class (B = 1, B >= 2) one graph for fresh prompts, one for
decode steps (T == 1) and one for prompt pieces on top of a state. :class:`CUDAGraphDecoder` replays static-shape
decode steps from a CUDA graph. :func:`save_compile_cache` / :func:`load_compile_cache` carry the compiled graphs
to a fresh process or machine.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor

from .model import KimiForCausalLM, mark_dynamic_inputs

__all__ = ["compiled_step", "CompiledStep", "CUDAGraphDecoder", "cuda_graph_decoder", "load_compile_cache",
           "mark_dynamic_inputs", "save_compile_cache"]


class CompiledStep:
    """``model(input_ids, state, position_ids)`` under ``torch.compile(fullgraph=True)``. The model marks its varying
    axes dynamic itself before each compiled call (``KimiForCausalLM._infer_parameters``), so prompt lengths,
    past lengths and batch sizes >= 2 reuse their graphs and every other size -- hidden, heads, head dims, cache
    width -- stays static for the compiler."""

    def __init__(self, model: KimiForCausalLM, **compile_kwargs) -> None:
        compile_kwargs.setdefault("fullgraph", True)
        self.compiled = torch.compile(model, **compile_kwargs)

    def __call__(self, input_ids: Tensor, state: Optional[dict[str, Tensor]] = None,
                 position_ids: Optional[Tensor] = None, **kwargs):
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


class CUDAGraphDecoder:
    """Greedy decoding of a fixed batch, on CUDA every decode step replayed from one CUDA graph.

    The state lives in static buffers: the KDA conv / recurrent states in their usual shapes, the MLA caches
    preallocated to ``max_len`` tokens and written in place at ``cache_position`` (see
    :meth:`KimiForCausalLM.forward`), the KDA recurrent states updated in place there too. One replay runs the
    compiled step on the token buffer, copies the new conv states back into their buffers, takes the argmax into
    the token buffer and advances the position, so nothing runs on the host between tokens. The prompt itself
    runs through :func:`compiled_step` (dynamic shapes) and is copied into the buffers.

    On other devices the same compiled static-shape step runs without a graph. Use :func:`cuda_graph_decoder` to
    get one cached per model.
    """

    def __init__(self, model: KimiForCausalLM, batch_size: int, max_len: int, *,
                 eos_token_id: Optional[int] = None, compile: bool = True) -> None:
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        device = model.device
        self.model, self.batch_size, self.max_len, self.eos_token_id = model, batch_size, max_len, eos_token_id
        self.state = {s.name: torch.zeros(s.concrete_shape(batch_size, max_len), dtype=s.dtype, device=device)
                      for s in model.state_specs()}
        self.token = torch.zeros(batch_size, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.done = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
        # batch (>= 2) and cache length symbolic: decoders of other sizes reuse the compiled step (a new graph
        # capture is cheap, a compile is not)
        for name, t in [("token", self.token), ("done", self.done), *self.state.items()]:
            if batch_size >= 2:
                torch._dynamo.mark_dynamic(t, 0)
            if name.endswith(".key"):
                torch._dynamo.mark_dynamic(t, 2)
        self._step_fn = torch.compile(self._step, fullgraph=True) if compile else self._step
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def _step(self) -> None:
        logits, new = self.model(self.token, self.state, logits_to_keep=1, cache_position=self.position)
        for name, t in new.items():
            if t is not self.state[name]:  # MLA caches and KDA recurrent states were updated in place
                self.state[name].copy_(t)
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        if self.eos_token_id is not None:  # finished rows keep producing eos (no early exit, no sync)
            nxt = torch.where(self.done, torch.full_like(nxt, self.eos_token_id), nxt)
            self.done |= nxt == self.eos_token_id
        self.token.copy_(nxt)
        self.position += 1

    def capture(self) -> None:
        """Compile and warm up the step on a side stream, then record it (the buffers' contents are scratch until
        :meth:`prefill` loads a prompt)."""
        if self.graph is not None or self.model.device.type != "cuda":
            return
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step_fn()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_fn()
        self.graph = graph

    def prefill(self, input_ids: Tensor) -> Tensor:
        """Run the prompt ``[batch_size, T]``, load its state into the buffers; returns the first new token
        ``[batch_size, 1]``."""
        B, T = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids has batch {B}, this decoder was built for batch_size {self.batch_size}")
        if T >= self.max_len:
            raise ValueError(f"input_ids has {T} tokens, this decoder holds max_len {self.max_len}")
        self.capture()
        logits, state = compiled_step(self.model)(input_ids, self.model.empty_state(B), logits_to_keep=1)
        for name, buf in self.state.items():
            if name.endswith(".key"):
                buf[:, :, :T].copy_(state[name])
            else:
                buf.copy_(state[name])
        first = logits[:, -1].argmax(dim=-1, keepdim=True)
        if self.eos_token_id is not None:
            self.done.copy_(first == self.eos_token_id)
        self.token.copy_(first)
        self.position.fill_(T)
        return first

    def decode(self, n: int) -> Tensor:
        """``n`` more tokens ``[batch_size, n]``, one graph replay each (after :meth:`prefill`)."""
        out = torch.empty(self.batch_size, n, dtype=torch.int64, device=self.token.device)
        for i in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step_fn()
            out[:, i:i + 1].copy_(self.token)
        return out

    def generate(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        if input_ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_len "
                             f"{self.max_len}")
        first = self.prefill(input_ids)
        return torch.cat([input_ids, first, self.decode(max_new_tokens - 1)], dim=1)


def cuda_graph_decoder(model: KimiForCausalLM, batch_size: int, max_len: int,
                       eos_token_id: Optional[int] = None) -> CUDAGraphDecoder:
    """The model's :class:`CUDAGraphDecoder` for ``batch_size`` and at least ``max_len`` tokens (rounded up to a
    multiple of 256 so nearby lengths share one graph). One decoder is kept per model: a new shape replaces it
    (its buffers are the size of a KV cache)."""
    max_len = -(-max_len // 256) * 256
    key = (batch_size, max_len, eos_token_id)
    cached = model.__dict__.get("_kimi_cuda_graph_decoder")
    if cached is None or cached[0] != key:
        object.__setattr__(model, "_kimi_cuda_graph_decoder", None)  # free the old buffers first
        cached = (key, CUDAGraphDecoder(model, batch_size, max_len, eos_token_id=eos_token_id))
        object.__setattr__(model, "_kimi_cuda_graph_decoder", cached)
    return cached[1]


def save_compile_cache(path: Union[str, os.PathLike]) -> int:
    """Write what this process compiled to ``path`` (``torch.compiler.save_cache_artifacts``: the AOTAutograd and
    Inductor caches of every graph, Inductor's Triton kernels included); returns the bytes written. The file is
    written under a temporary name and renamed when complete.

    A fresh process -- on this machine or another with the same GPU, torch and kimi-compile versions -- that
    calls :func:`load_compile_cache` before its first compiled call skips AOTAutograd and Inductor for the same
    graphs (Dynamo still traces, and the ops' own Triton kernels still compile on first use). Raises RuntimeError
    when this process has compiled nothing."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("save_compile_cache: this process has compiled nothing yet (run the compiled model, "
                           "e.g. generate(..., backend='compile'), first)")
    data = saved[0]
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def load_compile_cache(path: Union[str, os.PathLike]) -> int:
    """Load a file written by :func:`save_compile_cache` into this process's compile caches; call it before the
    first compiled call. Returns the number of cached graph pieces loaded. FileNotFoundError when ``path`` is
    missing, ValueError naming ``path`` when it is not such a file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        info = torch.compiler.load_cache_artifacts(data)
    except Exception as e:  # torch raises several types for a foreign or damaged file
        raise ValueError(f"path {path!r} is not a compile cache written by save_compile_cache: "
                         f"{type(e).__name__}: {e}") from e
    if info is None:  # torch logs why (a damaged or foreign file) and loads nothing
        raise ValueError(f"path {path!r} is not a compile cache written by save_compile_cache: torch read no "
                         "compiled graphs from it")
    return sum(len(v) for v in info.artifacts.values())
