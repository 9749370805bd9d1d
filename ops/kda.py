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

Chunked form used by the reference (chunk of C tokens, G_t = sum_{s<=t} g_s inside the chunk, S0 the state
at the chunk start, e_t = beta_t (v_t - k_t^T diag(exp g_t) S_{t-1}) the delta-rule update of token t):

    S_t = diag(exp G_t) S0 + sum_{j<=t} diag(exp(G_t - G_j)) k_j e_j^T
    (I + diag(beta) A) E = diag(beta) (V - (K * exp G) S0),  A_tj = sum_c k_tc k_jc exp(G_tc - G_jc), j < t
    O   = scale ((Q * exp G) S0 + P E),                     P_tj = sum_c q_tc k_jc exp(G_tc - G_jc), j <= t
    S_C = diag(exp G_C) S0 + (K * exp(G_C - G))^T E

Every exponent is a difference G_t - G_j with j <= t, which is <= 0 for g <= 0: nothing overflows, however
strong the decay, and no future gate reaches an earlier output.

Precision (CUDA): the state and every accumulation are float32. bf16 inputs keep the chunk intermediates and
the dot operands in bf16, forward and backward (relative error against float64 <= 5e-3 for outputs and
gradients, tested); float32 inputs stay float32 throughout (<= 1e-4 with TF32 off); float64 runs the
reference. docs/kda_kernels.md has the details.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_dim, check_float, check_same_device, check_tensor

CHUNK = 32  # reference chunk: the [C, C, K] decay tile costs T*C*K, so shorter chunks are faster on CPU
MAX_HEAD_DIM = 256  # the largest K or V the Triton kernels accept


def state_dtype(v_dtype: torch.dtype) -> torch.dtype:
    """The recurrent state is float32; float64 inputs keep a float64 state so references stay exact."""
    return torch.float64 if v_dtype == torch.float64 else torch.float32


def check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens) -> None:
    """Shape, dtype and device checks (no data reads, so no host sync)."""
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
        check_tensor("initial_state", initial_state, 4)
        want = (N, HV, K, V)
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must have shape [N, HV, K, V] = {want}, got {tuple(initial_state.shape)}")
        if initial_state.dtype != state_dtype(v.dtype):
            raise TypeError(f"initial_state must be {state_dtype(v.dtype)} (the KDA state dtype), got {initial_state.dtype}")
    check_same_device(dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens))


def check_cu_seqlens_values(cu_seqlens: Tensor, T: int) -> None:
    """Data checks on the offsets; called by host-side kernels only (reading them on a GPU would sync)."""
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {offsets[0]} ... {offsets[-1]}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")


# ---------------------------------------------------------------------------------------------------------------
# Reference implementation (any device; differentiable torch ops; exact in float64)
# ---------------------------------------------------------------------------------------------------------------

def _kda_chunked_dense(q, k, v, g, beta, state, scale: float, chunk: int = CHUNK):
    """One batch of equal-length sequences. q, k, g: [B, T, HV, K] (q/k already expanded to HV heads),
    v: [B, T, HV, V], beta: [B, T, HV], state: [B, HV, K, V]; all in the compute dtype."""
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))  # [B, HV, T, *]
    beta = beta.transpose(1, 2)
    T = q.shape[2]
    outs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        qc, kc, vc, gc, bc = (x[:, :, start:end] for x in (q, k, v, g, beta))
        C = end - start
        G = gc.cumsum(dim=-2)  # [B, HV, C, K]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        gap = G.unsqueeze(-2) - G.unsqueeze(-3)  # [B, HV, t, j, K] = G_t - G_j
        decay = torch.where(causal[..., None], gap, float("-inf")).exp()
        P = torch.einsum("bhtc,bhjc,bhtjc->bhtj", qc, kc, decay)
        A = torch.einsum("bhtc,bhjc,bhtjc->bhtj", kc, kc, decay).tril(-1)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        lhs = eye + bc[..., None] * A
        rhs = bc[..., None] * (vc - (kc * G.exp()) @ state)
        E = torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)
        outs.append(scale * ((qc * G.exp()) @ state + P @ E))
        G_last = G[:, :, -1:]  # [B, HV, 1, K]
        state = G_last.exp().transpose(-1, -2) * state + (kc * (G_last - G).exp()).transpose(-1, -2) @ E
    if not outs:
        return v.transpose(1, 2).new_zeros(v.shape[0], 0, v.shape[1], v.shape[3]), state
    return torch.cat(outs, dim=2).transpose(1, 2), state


def kda_reference_chunked(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None, chunk: int = CHUNK):
    """The KDA recurrence in chunked PyTorch (no per-token loop); float64 in, float64-exact out.

    Computes in float32 (float64 for float64 inputs); returns o in v's dtype and a new state."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    sdt = state_dtype(v.dtype)
    cdt = torch.float64 if v.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else float(scale)
    group = HV // H
    qx, kx = (x.to(cdt).repeat_interleave(group, dim=2) for x in (q, k))
    vx, gx, bx = v.to(cdt), g.to(cdt), beta.to(cdt)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        s0 = torch.zeros(N, HV, K, V, dtype=cdt, device=q.device)
    else:
        s0 = initial_state.to(cdt)
    if cu_seqlens is None:
        o, s = _kda_chunked_dense(qx, kx, vx, gx, bx, s0, scale, chunk)
    else:
        offsets = cu_seqlens.tolist()
        outs, states = [], []
        for n in range(N):
            lo, hi = offsets[n], offsets[n + 1]
            o_n, s_n = _kda_chunked_dense(qx[:, lo:hi], kx[:, lo:hi], vx[:, lo:hi], gx[:, lo:hi], bx[:, lo:hi],
                                          s0[n:n + 1], scale, chunk)
            outs.append(o_n)
            states.append(s_n)
        o, s = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    return o.to(v.dtype).contiguous(), s.to(sdt).contiguous()


def _kda_reference_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate):
    """Gradients of the chunked reference by reverse-mode AD (torch.func.vjp works inside an op kernel,
    where plain autograd is switched off)."""
    has_state = initial_state is not None
    if not has_state:
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        initial_state = torch.zeros(N, v.shape[2], q.shape[3], v.shape[3], dtype=state_dtype(v.dtype), device=q.device)

    def fwd(q_, k_, v_, g_, b_, s_):
        return kda_reference_chunked(q_, k_, v_, g_, b_, s_, scale, cu_seqlens)

    _, vjp = torch.func.vjp(fwd, q, k, v, g, beta, initial_state)
    return vjp((do.to(v.dtype), dstate.to(initial_state.dtype)))


def _triton_ready(t: Tensor) -> bool:
    return t.is_cuda and importlib.util.find_spec("triton") is not None


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
    if not _triton_ready(q):
        return kda_reference_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    from . import kda_triton

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return kda_triton.kda_forward(q, k, v, g, beta, initial_state, scale, cu_seqlens)


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
    """Gradients of kimi::kda for (q, k, v, g, beta, initial_state); the last is zeros when there is no state."""
    grads = _kda_reference_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate)
    return tuple(x.contiguous() for x in grads)


@_kda_backward_op.register_kernel("cuda")
def _kda_backward_cuda(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate):
    if not _triton_ready(q):
        grads = _kda_reference_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate)
        return tuple(x.contiguous() for x in grads)
    from . import kda_triton_bwd

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dq, dk, dv, dg, dbeta, ds0 = kda_triton_bwd.kda_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens,
                                                             do, dstate)
    if ds0 is None:
        ds0 = torch.zeros_like(dstate)
    return dq, dk, dv, dg, dbeta, ds0


@_kda_backward_op.register_fake
def _kda_backward_fake(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), torch.empty_like(dstate))


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


def kda(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor] = None,
        scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Kimi Delta Attention; see the module docstring for shapes and math. Returns (o, final_state)."""
    check_kda_args(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.kimi.kda(q, k, v, g, beta, initial_state, float(scale), cu_seqlens)
