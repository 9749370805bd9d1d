"""Training: the next-token loss from labels (chunked cross-entropy), per-layer activation checkpointing, and a
compiled training step.

* :func:`causal_lm_loss` ``(hidden, lm_head_weight, labels)`` -> mean next-token cross-entropy, transformers'
  convention: labels are shifted inside (position t predicts ``labels[:, t + 1]``), ``-100`` is ignored, the mean
  is over the labelled positions (0 when there are none, not NaN). The ``[tokens, vocab]`` float32 logits are never
  built whole: the tokens go through the lm_head in chunks of ``chunk_size`` rows, each chunk's cross-entropy under
  ``torch.utils.checkpoint`` so that autograd keeps only the chunk's input rows and recomputes its logits in the
  backward. Peak memory of the loss is one chunk's float32 logits and their gradient (at vocab 163840, 1024 rows:
  640 MiB each) instead of ``T x 163840 x 4`` bytes (2.5 GiB at T = 4096, per sequence).
  ``KimiForCausalLM.forward(input_ids, labels=...)`` calls it.
* :func:`set_activation_checkpointing` ``(model, True)``: every decoder layer (with Attention Residuals: every
  sublayer together with its depth-attention read) runs under ``torch.utils.checkpoint(use_reentrant=False)``, so
  the backward recomputes the layer and autograd keeps only the layer inputs. Works eager and under
  ``torch.compile(fullgraph=True)``; only active while autograd records (``torch.is_grad_enabled()``).
* :class:`TrainStep`: forward + loss, backward, optimizer step; the loss function (forward and, through
  AOTAutograd, its backward) compiled with ``torch.compile(fullgraph=True)``, the gradient clipping and optimizer
  step compiled as a second ``fullgraph`` graph (PyTorch's pattern for compiled optimizers). Returns the loss.

This module must not import :mod:`kimi_compile.model` at import time (the model imports the loss from here).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["IGNORE_INDEX", "DEFAULT_LOSS_CHUNK", "causal_lm_loss", "set_activation_checkpointing", "TrainStep",
           "clip_grad_norm", "shift_labels"]

IGNORE_INDEX = -100
# rows of the flattened [B*T, D] hidden per cross-entropy chunk: at vocab 163840 a chunk's float32 logits are
# 640 MiB (and as much again for their gradient); the tiny models' 256-wide vocabulary makes any size cheap
DEFAULT_LOSS_CHUNK = 1024


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Sum of the cross-entropy of ``hidden @ weight.T`` (float32, float64 for a float64 model) over ``labels``."""
    logits = F.linear(hidden, weight)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def shift_labels(labels: Tensor) -> Tensor:
    """``labels[:, 1:]`` padded on the right with -100: position t is scored against token t + 1 (the last
    position has no target). Same shape as ``labels``, so the hidden states need no slicing (no copy)."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def causal_lm_loss(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, *,
                   chunk_size: int = DEFAULT_LOSS_CHUNK) -> Tensor:
    """Mean next-token cross-entropy of ``hidden [B, T, D] @ lm_head_weight.T`` against ``labels [B, T]``.

    Labels are shifted inside (transformers' convention), -100 is ignored; the result is a float32 scalar
    (float64 for float64 hidden states), 0 when no position is labelled. The logits are computed ``chunk_size``
    rows at a time and recomputed in the backward (see the module docstring), never the full ``[B*T, V]``."""
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 tensor [B, T], got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(hidden.shape[:2])}, got "
                         f"{tuple(labels.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    targets = shift_labels(labels.long()).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    record = torch.is_grad_enabled() and (flat.requires_grad or lm_head_weight.requires_grad)
    total = None
    for h, t in zip(flat.split(chunk_size), targets.split(chunk_size)):
        part = (checkpoint(_chunk_loss_sum, h, lm_head_weight, t, use_reentrant=False) if record
                else _chunk_loss_sum(h, lm_head_weight, t))
        total = part if total is None else total + part
    count = (targets != IGNORE_INDEX).sum().clamp_min(1)
    return total / count.to(total.dtype)


def set_activation_checkpointing(model, enabled: bool = True):
    """Turn per-layer activation checkpointing of a :class:`~kimi_compile.KimiForCausalLM` on or off.
    Returns the model. A compiled step traced before the switch keeps what it traced: compile after switching."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "activation_checkpointing"):
        raise TypeError(f"model must be a KimiForCausalLM, got {type(model).__name__}")
    inner.activation_checkpointing = enabled
    return model


class TrainStep:
    """One optimizer step on a batch: ``step(input_ids, labels) -> loss`` (a detached scalar tensor).

    ``loss = model(input_ids, labels=labels)[0]`` compiled with ``torch.compile(fullgraph=True)`` (AOTAutograd
    compiles its backward from the same joint graph), ``loss.backward()``, then the gradient clipping (optional)
    and ``optimizer.step()`` compiled together as a second ``fullgraph`` graph, then ``zero_grad``.
    ``compile=False`` runs the same thing eagerly (the reference for the compiled one). Shapes are static: a new
    ``[B, T]`` compiles once more. ``compile_kwargs`` go to the loss's ``torch.compile`` (e.g. ``backend``,
    ``mode``); the optimizer graph uses the same ``backend``.

    Compiled, the optimizer's step function is called unwrapped (``inspect.unwrap``) under ``torch.no_grad``:
    ``Optimizer.step``'s wrapper contains a deliberate ``torch._dynamo.graph_break()`` (pytorch issue 104053),
    which a ``fullgraph`` compile refuses. So optimizer step hooks do not run in the compiled step.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, *, compile: bool = True,
                 max_grad_norm: Optional[float] = None, loss_chunk_size: int = DEFAULT_LOSS_CHUNK,
                 **compile_kwargs) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.model, self.optimizer = model, optimizer
        self.max_grad_norm = max_grad_norm
        self.loss_chunk_size = loss_chunk_size
        self.compiled = compile
        if compile:
            compile_kwargs.setdefault("fullgraph", True)
            compile_kwargs.setdefault("dynamic", False)
            self._raw_step = inspect.unwrap(type(optimizer).step)
            self._loss = torch.compile(self._loss_eager, **compile_kwargs)
            self._update = torch.compile(self._update_eager, fullgraph=True, dynamic=False,
                                         backend=compile_kwargs.get("backend", "inductor"))
        else:
            self._loss, self._update = self._loss_eager, self._update_eager

    def _loss_eager(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        return self.model(input_ids, labels=labels, loss_chunk_size=self.loss_chunk_size)[0]

    @torch.no_grad()
    def _update_eager(self) -> None:
        if self.max_grad_norm is not None:
            clip_grad_norm(self.optimizer, self.max_grad_norm)
        if self.compiled:
            self._raw_step(self.optimizer)
        else:
            self.optimizer.step()

    def loss_and_grads(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Forward and backward only: the loss, gradients accumulated into ``.grad`` (no optimizer step)."""
        loss = self._loss(input_ids, labels)
        loss.backward()
        return loss.detach()

    def __call__(self, input_ids: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``labels`` default to ``input_ids`` (plain language modelling)."""
        loss = self.loss_and_grads(input_ids, input_ids if labels is None else labels)
        self._update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Scale the gradients of ``optimizer``'s parameters so that their global L2 norm is at most ``max_norm``
    (as ``torch.nn.utils.clip_grad_norm_``, written plainly so that it traces inside a ``fullgraph`` compile; no
    host sync). Returns the norm before clipping."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm
