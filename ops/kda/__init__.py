"""``kimi::kda`` — the Kimi Delta Attention (KDA) recurrence as a ``torch.library`` custom op.

Contract (written once here; the fake, the CPU reference, the Triton kernels and the ONNX/TensorRT
lowerings all follow it)::

    kda(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None) -> (o, final_state)

    q, k           [B, T, H, K]   already L2-normalised over K by the caller
    v              [B, T, HV, V]  HV a multiple of H (value head hv reads q/k head hv // (HV // H))
    g              [B, T, HV, K]  log-space per-key-channel decay (g <= 0)
    beta           [B, T, HV]
    initial_state  [N, HV, K, V]  float32 (float64 when v is float64), None for zeros
    scale          float, default K ** -0.5
    cu_seqlens     int64 [N + 1] FlashAttention-style offsets packing N sequences along T (then B == 1)
    o              [B, T, HV, V]  in v's dtype
    final_state    [N, HV, K, V]  float32 (float64 for float64 inputs), a new tensor

Per head and token: S <- diag(exp(g_t)) S;  S <- S + beta_t k_t (v_t - k_t^T S)^T;  o_t = scale q_t^T S.
This is ONNX opset 27 LinearAttention, update_rule "gated_delta", with per-key-channel decay.

The in-place form, for decoding out of static state buffers (a CUDA graph replays the same addresses)::

    kda_decode_(q, k, v, g, beta, state, scale=None) -> o

    state          [B, HV, K, V]  float32 (float64 for float64 inputs), contiguous: read as the initial
                   state and overwritten with the final one (kimi::kda_decode_ mutates it)

Same math and shapes as kda without cu_seqlens, no autograd. It saves kda's copy of the new state into the
buffer: at decode B=256 of Kimi-Linear-48B that copy reads and writes 10.7 GB a step.

The chunked float64 form and a plain token loop are in ``naive.py`` (the oracle).

Precision (CUDA): the state and every accumulation are float32. bf16 inputs keep the chunk intermediates and
the dot operands in bf16, forward and backward (relative error against float64 <= 5e-3 for outputs and
gradients, tested); float32 inputs stay float32 throughout (<= 1e-4 with TF32 off); float64 runs the
reference (decided once, in the registration below). docs/kda_kernels.md has the details.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .._checks import check_dim, check_float, check_same_device, check_tensor
from .naive import REFERENCE_CHUNK, kda_reference_backward, kda_reference_chunked, kda_reference_loop, state_dtype
from .tuning import KDATuning, current_tuning, kda_tuning

__all__ = ["kda", "kda_decode_", "kda_reference_chunked", "kda_reference_loop", "check_kda_args", "state_dtype",
           "KDATuning", "current_tuning", "kda_tuning", "MAX_HEAD_DIM", "REFERENCE_CHUNK"]

MAX_HEAD_DIM = 256  # the largest K or V the Triton kernels accept


def check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens, state_name: str = "initial_state") -> None:
    """Shape, dtype and device checks (no data reads, so no host sync); messages call the state ``state_name``."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        check_tensor(name, t, 4)
        check_float(name, t)
    check_tensor("beta", beta, 3)
    check_float("beta", beta)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape [B, T, H, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_dim("v", v, 0, B, "batch B")
    check_dim("v", v, 1, T, "sequence length T")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"v.shape[2] (value heads HV={HV}) must be a multiple of q's heads H={H}")
    if g.shape != (B, T, HV, K):
        raise ValueError(f"g must have shape [B, T, HV, K] = {(B, T, HV, K)}, got {tuple(g.shape)}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"beta must have shape [B, T, HV] = {(B, T, HV)}, got {tuple(beta.shape)}")
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"head dims K={K} (q.shape[3]) and V={V} (v.shape[3]) must be <= {MAX_HEAD_DIM}")
    if scale is not None and not isinstance(scale, (float, int)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    N = B
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, 1)
        if cu_seqlens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"cu_seqlens must be int64 (or int32), got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs batch B == 1, got q.shape[0] = {B}")
        if cu_seqlens.shape[0] < 2:
            raise ValueError("cu_seqlens must hold at least 2 offsets [0, ..., T]")
        N = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        check_tensor(state_name, initial_state, 4)
        want = (N, HV, K, V)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"{state_name} must have shape [N, HV, K, V] = {want}, got {tuple(initial_state.shape)}")
        if initial_state.dtype != state_dtype(v.dtype):
            raise TypeError(f"{state_name} must be {state_dtype(v.dtype)} (the KDA state dtype), got "
                            f"{initial_state.dtype}")
    check_same_device({"q": q, "k": k, "v": v, "g": g, "beta": beta, state_name: initial_state,
                       "cu_seqlens": cu_seqlens})


def check_cu_seqlens_values(cu_seqlens: Tensor, T: int) -> None:
    """Data checks on the offsets; called by host-side kernels only (reading them on a GPU would sync)."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {offsets[0]} ... {offsets[-1]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")


# ---------------------------------------------------------------------------------------------------------------
# Backend choice, made once here: the Triton kernels for CUDA tensors (float16 / bfloat16 / float32), the
# reference for float64 (kept exact) and wherever Triton is missing.
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_modules():
    """(forward, backward) Triton modules, or None without Triton. Imported on first CUDA use, not with the op:
    Triton is optional, and its interpreter mode (TRITON_INTERPRET) is fixed when the kernels are decorated."""
    if importlib.util.find_spec("triton") is None:
        return None
    return (importlib.import_module(f"{__name__}.forward"), importlib.import_module(f"{__name__}.backward"))


def _use_triton(q: Tensor, v: Tensor) -> bool:
    return q.is_cuda and torch.float64 not in (q.dtype, v.dtype) and _triton_modules() is not None


def _default_scale(q: Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("kimi::kda", mutates_args=())
def _kda_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor] = None,
            scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    if cu_seqlens is not None:
        check_cu_seqlens_values(cu_seqlens, q.shape[1])
    return kda_reference_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens)


@_kda_op.register_kernel("cuda")
def _kda_cuda(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None):
    check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    if not _use_triton(q, v):
        return kda_reference_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    forward, _ = _triton_modules()
    return forward.kda_forward(q, k, v, g, beta, initial_state, _default_scale(q, scale), cu_seqlens)


@_kda_op.register_fake
def _kda_fake(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None):
    check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = v.new_empty(B, T, HV, V)
    final_state = v.new_empty(N, HV, K, V, dtype=state_dtype(v.dtype))
    return o, final_state


@torch.library.custom_op("kimi::kda_backward", mutates_args=())
def _kda_backward_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor],
                     scale: Optional[float], cu_seqlens: Optional[Tensor], do: Tensor, dstate: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of kimi::kda for (q, k, v, g, beta, initial_state); the last is zeros when there is no state.
    Every gradient is a new contiguous tensor (the fake says so too)."""
    return kda_reference_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate)


@_kda_backward_op.register_kernel("cuda")
def _kda_backward_cuda(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate):
    if not _use_triton(q, v) or not _triton_modules()[1].triton_backward_supported(q, v):
        return kda_reference_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate)
    _, backward = _triton_modules()
    dq, dk, dv, dg, dbeta, ds0 = backward.kda_backward(q, k, v, g, beta, initial_state, _default_scale(q, scale),
                                                       cu_seqlens, do, dstate)
    if ds0 is None:
        ds0 = torch.zeros_like(dstate, memory_format=torch.contiguous_format)
    return dq, dk, dv, dg, dbeta, ds0


@_kda_backward_op.register_fake
def _kda_backward_fake(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate):
    # contiguous, as every kernel returns them (empty_like would copy a permuted input's strides)
    return tuple(x.new_empty(x.shape) for x in (q, k, v, g, beta, dstate))


def _kda_setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, scale, cu_seqlens = inputs
    ctx.scale = scale
    ctx.has_state = initial_state is not None
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)


def _kda_autograd_backward(ctx, do, dstate):
    q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dg, dbeta, ds0 = torch.ops.kimi.kda_backward(q, k, v, g, beta, initial_state, ctx.scale,
                                                             cu_seqlens, do, dstate)
    return dq, dk, dv, dg, dbeta, (ds0 if ctx.has_state else None), None, None


_kda_op.register_autograd(_kda_autograd_backward, setup_context=_kda_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# The in-place op (decode out of static buffers)
# ---------------------------------------------------------------------------------------------------------------

def check_kda_decode_args(q, k, v, g, beta, state, scale) -> None:
    """kda's checks with ``state`` as the initial state, plus: present, contiguous (the kernel writes it whole)."""
    if state is None:
        raise TypeError("state must be a tensor [B, HV, K, V] (kda_decode_ updates it in place), got None")
    check_kda_args(q, k, v, g, beta, state, scale, None, state_name="state")
    if not state.is_contiguous():
        raise ValueError(f"state must be contiguous (it is overwritten in place), got strides {tuple(state.stride())}")


def _into_state(state: Tensor, o_and_final_state: tuple[Tensor, Tensor]) -> Tensor:
    """``o``, with the final state of a functional forward copied into ``state``."""
    o, final_state = o_and_final_state
    state.copy_(final_state)
    return o


@torch.library.custom_op("kimi::kda_decode_", mutates_args=("state",))
def _kda_decode_op(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                   scale: Optional[float] = None) -> Tensor:
    check_kda_decode_args(q, k, v, g, beta, state, scale)
    return _into_state(state, kda_reference_chunked(q, k, v, g, beta, state, scale, None))


@_kda_decode_op.register_kernel("cuda")
def _kda_decode_cuda(q, k, v, g, beta, state, scale=None):
    check_kda_decode_args(q, k, v, g, beta, state, scale)
    if not _use_triton(q, v):
        return _into_state(state, kda_reference_chunked(q, k, v, g, beta, state, scale, None))
    forward, _ = _triton_modules()
    q, k, v, g, beta, _ = forward.contiguous_inputs(q, k, v, g, beta, None)
    B, T = q.shape[0], q.shape[1]
    if forward.use_recurrent(B, T, B, False):  # the token loop writes the final state over the initial one
        return forward.kda_forward_recurrent(q, k, v, g, beta, state, _default_scale(q, scale), None,
                                             out_state=state)[0]
    return _into_state(state, forward.kda_forward_chunked(q, k, v, g, beta, state, _default_scale(q, scale), None))


@_kda_decode_op.register_fake
def _kda_decode_fake(q, k, v, g, beta, state, scale=None):
    check_kda_decode_args(q, k, v, g, beta, state, scale)
    return v.new_empty(v.shape)


def kda_decode_(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                scale: Optional[float] = None) -> Tensor:
    """KDA over ``[B, T]`` tokens on top of ``state``, which is overwritten with the final state; returns ``o``.
    See the module docstring. No autograd: with gradients recorded for any input it raises (use :func:`kda`)."""
    check_kda_decode_args(q, k, v, g, beta, state, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta, state)):
        raise RuntimeError("kda_decode_ updates state in place and has no backward: call it under torch.no_grad() "
                           "or use kda")
    return torch.ops.kimi.kda_decode_(q, k, v, g, beta, state, _default_scale(q, scale))


def kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor] = None,
        scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Kimi Delta Attention; see the module docstring for shapes and math. Returns (o, final_state)."""
    check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    return torch.ops.kimi.kda(q, k, v, g, beta, initial_state, _default_scale(q, scale), cu_seqlens)

