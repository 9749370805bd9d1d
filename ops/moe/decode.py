"""Triton decode path of ``kimi::moe_experts``: few (token, slot) pairs, each streams its expert's weights.

Layout (x, topk_ids, topk_weights contiguous; the weights may have any strides)::

    x [T, D]    topk_ids, topk_weights [T, k]    w_gate, w_up [E, I, D]    w_down [E, D, I]    out [T, D]

Two kernels, no sort, no host sync, every size a host int (capturable in a CUDA graph). The many-program axis
(slots, tokens) is grid axis 0 (up to 2**31 - 1 programs; axis 1 allows 65535):

1. ``_moe_gate_up_kernel``, grid (T*k, cdiv(I, BLOCK_I)): slot s = t*k + j reads e = topk_ids[t, j] and x[t]
   and writes h[s, i] = silu(w_gate[e, i] . x[t]) * (w_up[e, i] . x[t]) in float32 ([T*k, I], tiny).
2. ``_moe_down_combine_kernel``, grid (T, cdiv(D, BLOCK_D)): out[t, d] = sum_j topk_weights[t, j] *
   (w_down[e_j, d, :] . h[t*k + j, :]), accumulated in float32 and rounded once to x's dtype. Its tile holds the
   rows of all k slots, so the k experts stream together.

A slot reads its expert's rows whole along their contiguous axis (D for gate/up, I for down), so every load is a
wide coalesced row segment; all arithmetic is float32. The same expert in two slots is read twice: the path is
meant for few slots (``DECODE_MAX_SLOTS`` in ``__init__.py``), where the slots are mostly distinct experts (at 256
slots, 164 distinct of 256 experts, the op alone still measured faster than the grouped GEMM on the H200, but the
full-depth decode step at B=32 was 13 % slower with it).

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels also run on CPU tensors, which is how the
tests check them without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import device_guard

__all__ = ["DecodeBlocks", "decode_blocks", "moe_experts_decode"]

DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _moe_gate_up_kernel(
    X,  # [T, D] tokens, contiguous
    Ids,  # [T, K] int64 expert ids, contiguous
    Wg,  # [E, I, D] gate projections
    Wu,  # [E, I, D] up projections
    D,  # int32
    I,  # int32
    sg_e, sg_i, sg_d,  # w_gate strides (elements)
    su_e, su_i, su_d,  # w_up strides
    H,  # [T*K, I] float32 out: silu(gate) * up of each slot
    K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)  # the slot: token s // K, its (s % K)-th expert
    pid_i = tl.program_id(1)
    t = s // K
    e = tl.load(Ids + s)  # int64: e * stride stays 64-bit (E*I*D passes 2**31 at Kimi K2 widths)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < I
    g_rows = Wg + e * sg_e + i.to(tl.int64)[:, None] * sg_i
    u_rows = Wu + e * su_e + i.to(tl.int64)[:, None] * su_i
    x_row = X + t.to(tl.int64) * D
    # 2-D accumulators, reduced once after the loop: no cross-thread reduction inside it
    acc_g = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xv = tl.load(x_row + d, mask=d_ok, other=0.0).to(tl.float32)
        m = i_ok[:, None] & d_ok[None, :]
        g = tl.load(g_rows + d[None, :] * sg_d, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_rows + d[None, :] * su_d, mask=m, other=0.0).to(tl.float32)
        acc_g += g * xv[None, :]
        acc_u += u * xv[None, :]
    a = tl.sum(acc_g, axis=1)
    b = tl.sum(acc_u, axis=1)
    h = a / (1.0 + tl.exp(-a)) * b  # silu(a) * b; exp overflow at a << 0 gives a / inf = -0, silu's limit
    tl.store(H + s.to(tl.int64) * I + i, h, mask=i_ok)


@triton.jit
def _moe_down_combine_kernel(
    Hs,  # [T*K, I] float32 from _moe_gate_up_kernel
    Ids,  # [T, K] int64, contiguous
    Wts,  # [T, K] float32 / float64 combine weights, contiguous
    Wd,  # [E, D, I] down projections
    D,  # int32
    I,  # int32
    sd_e, sd_d, sd_i,  # w_down strides (elements)
    Out,  # [T, D] x's dtype
    K: tl.constexpr,
    KP: tl.constexpr,  # K rounded up to a power of two
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    t = tl.program_id(0)
    pid_d = tl.program_id(1)
    # one tile row per (slot j, output row d): every slot's expert streams in the same step, so a program makes
    # cdiv(I, BLOCK_I) dependent round trips to memory, not K times as many
    r = tl.arange(0, KP * BLOCK_D)
    j = r // BLOCK_D
    d = pid_d * BLOCK_D + r % BLOCK_D
    r_ok = (j < K) & (d < D)
    s = t.to(tl.int64) * K + j  # the slot of each row
    e = tl.load(Ids + s, mask=r_ok, other=0)
    w_rows = Wd + e * sd_e + d.to(tl.int64) * sd_d
    h_rows = Hs + s * I
    acc = tl.zeros([KP * BLOCK_D, BLOCK_I], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        m = r_ok[:, None] & (i < I)[None, :]
        w = tl.load(w_rows[:, None] + i[None, :] * sd_i, mask=m, other=0.0).to(tl.float32)
        hv = tl.load(h_rows[:, None] + i[None, :], mask=m, other=0.0)  # a slot's h row, re-read per d: L1 hits
        acc += w * hv
    wt = tl.load(Wts + s, mask=r_ok, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * wt  # topk_weights[t, j] * (w_down[e_j, d] . h[slot j]) per row
    out = tl.sum(tl.reshape(y, [KP, BLOCK_D]), axis=0)  # the sum over the slots, float32
    tl.store(Out + t.to(tl.int64) * D + pid_d * BLOCK_D + tl.arange(0, BLOCK_D), out.to(Out.dtype.element_ty),
             mask=pid_d * BLOCK_D + tl.arange(0, BLOCK_D) < D)


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    """Tiles and warps of the two kernels (powers of two). The down kernel's tile has KP * down_block_d rows."""
    gate_up_block_i: int
    gate_up_block_d: int
    gate_up_warps: int
    down_block_d: int
    down_block_i: int
    down_warps: int


def decode_blocks(D: int, I: int, k: int) -> DecodeBlocks:
    """The one place that picks the tiles. At Kimi Linear widths (D=2304, I=1024, top-8) and one token, every
    program is resident at once on 132 SMs (a late second wave would run at one program's memory latency):
    gate/up 16 rows x 256 columns, 4 warps: 8 slots x 64 row blocks = 512 programs (128 registers a thread: 4 an
    SM), 16 KB of bf16 weights a step, 9 steps along D; down 32 rows (8 slots x 4 outputs) x 128 columns, 4 warps:
    576 programs (96 registers: 5 an SM), 8 KB a step, 8 steps along I. Each thread loads 16-byte row pieces.
    Smaller D or I shrink the column blocks to fit."""
    kp = triton.next_power_of_2(k)
    return DecodeBlocks(gate_up_block_i=16, gate_up_block_d=min(256, triton.next_power_of_2(D)), gate_up_warps=4,
                        down_block_d=max(1, 32 // kp), down_block_i=min(128, triton.next_power_of_2(I)),
                        down_warps=4)


def moe_experts_decode(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                       w_down: Tensor, blocks: Optional[DecodeBlocks] = None) -> Tensor:
    """``kimi::moe_experts`` (contract in ``__init__.py``) by the two decode kernels; inputs already checked.
    ``blocks`` overrides :func:`decode_blocks` (tests use small tiles to cover partial and repeated blocks)."""
    if x.dtype not in DECODE_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32 for the decode kernels, got {x.dtype}")
    T, D = x.shape
    k = topk_ids.shape[1]
    I = w_gate.shape[1]
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if T * k == 0:
        return out.zero_()
    b = blocks if blocks is not None else decode_blocks(D, I, k)
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    h = torch.empty(T * k, I, dtype=torch.float32, device=x.device)
    with device_guard(x):
        _moe_gate_up_kernel[(T * k, triton.cdiv(I, b.gate_up_block_i))](
            x, topk_ids, w_gate, w_up, D, I, *w_gate.stride(), *w_up.stride(), h,
            K=k, BLOCK_I=b.gate_up_block_i, BLOCK_D=b.gate_up_block_d, num_warps=b.gate_up_warps)
        _moe_down_combine_kernel[(T, triton.cdiv(D, b.down_block_d))](
            h, topk_ids, topk_weights, w_down, D, I, *w_down.stride(), out,
            K=k, KP=triton.next_power_of_2(k), BLOCK_D=b.down_block_d, BLOCK_I=b.down_block_i,
            num_warps=b.down_warps)
    return out
