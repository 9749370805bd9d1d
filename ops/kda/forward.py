"""Host launcher of the KDA Triton forward: the token loop for decode and very short sequences, otherwise the
chunked path (intra stage, then the chunk-to-chunk pass). No host syncs.

    kda_forward(q, k, v, g, beta, initial_state, scale, cu_seqlens) -> (o, final_state)

Inputs are validated by the op registration (ops/kda/__init__.py), which also keeps float64 on the reference:
q, k [B,T,H,K]; v [B,T,HV,V]; g [B,T,HV,K]; beta [B,T,HV]; initial_state [N,HV,K,V] float32 or None;
cu_seqlens int64 [N+1] or None. Returns o [B,T,HV,V] in v.dtype and a new float32 final_state [N,HV,K,V].
"""
from __future__ import annotations

import torch

from .chunk_pass import pass_forward
from .common import _modes
from .intra import forward_intermediates
from .recurrent import kda_forward_recurrent
from .tuning import current_tuning


def contiguous_inputs(q, k, v, g, beta, initial_state):
    """The kernels index dense row-major tensors; the state is float32."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
        if initial_state.dtype != torch.float32:
            initial_state = initial_state.float()
    return q, k, v, g, beta, initial_state


def use_recurrent(B, T, N, varlen):
    """Token loop when the sequences are at most recurrent_max_t tokens long (on average, for varlen)."""
    if varlen:
        return B * T <= current_tuning().recurrent_max_t * N
    return T <= current_tuning().recurrent_max_t


def kda_forward_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    cfg = current_tuning()
    fp32, bf16 = _modes(q, k, v)
    inter = forward_intermediates(q, k, v, g, beta, scale, cu_seqlens, cfg.intra_form == "tx")
    o = torch.empty_like(v)
    ht = pass_forward(inter, initial_state, o, N, HV, H, K, V, T, cu_seqlens,
                      lowp=bf16 and cfg.pass_lowp, prec="ieee" if fp32 else "tf32")
    return o, ht


def kda_forward(q, k, v, g, beta, initial_state, scale, cu_seqlens):
    """CUDA (Triton) forward of kimi::kda (float16 / bfloat16 / float32 inputs)."""
    q, k, v, g, beta, initial_state = contiguous_inputs(q, k, v, g, beta, initial_state)
    B, T = q.shape[0], q.shape[1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if use_recurrent(B, T, N, cu_seqlens is not None):
        return kda_forward_recurrent(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    return kda_forward_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens)
