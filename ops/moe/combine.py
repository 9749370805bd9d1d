"""Triton weighted sum of ``kimi::moe_experts``' grouped-matmul path: the experts' outputs, left by the grouped
matmul in expert-sorted order, summed per token with the router weights in float32 and rounded once::

    y_sorted [T*k, D]   row r holds slot order[r] (slot s = t*k + j: token t's j-th expert)
    order    [T*k]      int64, the sort of the slots by expert (``_slots_by_expert``)
    weights  [T, k]     float32
    out      [T, D]     in ``out_dtype``:  out[t] = sum_j weights[t, j] * y_sorted[row of slot t*k + j]

One program per (token, block of D) gathers its token's k rows where they lie. It replaces an ``index_copy`` back
to (token, slot) order, a float32 copy of ``[T, k, D]``, a multiply and a sum, each a pass over T*k*D values
(~1.9 GB at T=4096 at Kimi widths, against ~0.17 GB here). Same arithmetic as ``_combine`` in ``__init__.py``:
float32 products and sum over j in order, one rounding.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel also runs on CPU tensors, which is how the
tests check it without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import device_guard

__all__ = ["COMBINE_BLOCK_D", "COMBINE_WARPS", "moe_combine", "moe_combine_rows"]

COMBINE_BLOCK_D = 512  # 1 KB of bf16 a row piece; Kimi's D = 2304 takes 5 programs a token (the last half full)
COMBINE_WARPS = 2      # 8 bf16 a thread: 16-byte loads (4 warps compile to 8-byte ones)


@triton.jit
def _moe_combine_kernel(Y, Pos, W, Out, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(K):
        row = tl.load(Pos + t * K + j)  # int64: row * D stays 64-bit
        w = tl.load(W + t * K + j).to(tl.float32)
        acc += w * tl.load(Y + row * D + d, mask=dm, other=0.).to(tl.float32)
    tl.store(Out + t * D + d, acc.to(Out.dtype.element_ty), mask=dm)


def moe_combine(y_sorted: Tensor, order: Tensor, topk_weights: Tensor, out_dtype: torch.dtype,
                block_d: int = COMBINE_BLOCK_D) -> Tensor:
    """``out[t] = sum_j topk_weights[t, j] * y_sorted[pos[t*k + j]]``, ``pos`` the inverse of ``order``."""
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return moe_combine_rows(y_sorted, pos, topk_weights, out_dtype, block_d)


def moe_combine_rows(y_rows: Tensor, row_of_slot: Tensor, topk_weights: Tensor, out_dtype: torch.dtype,
                     block_d: int = COMBINE_BLOCK_D) -> Tensor:
    """``out[t] = sum_j topk_weights[t, j] * y_rows[row_of_slot[t*k + j]]`` (int64 rows, any row count)."""
    T, k = topk_weights.shape
    D = y_rows.shape[1]
    out = torch.empty(T, D, dtype=out_dtype, device=y_rows.device)
    if T * k == 0 or D == 0:
        return out.zero_()
    with device_guard(y_rows):
        _moe_combine_kernel[(T, triton.cdiv(D, block_d))](
            y_rows.contiguous(), row_of_slot.contiguous(), topk_weights.contiguous(), out, D, K=k, BLOCK_D=block_d,
            num_warps=COMBINE_WARPS)
    return out
