"""Sigmoid top-k routing (the router after its logits GEMM, one expert group) as one Triton kernel.

Contract (``route_topk``)::

    logits [N, E] float32, bias [E] float32 (e_score_correction_bias), 1 <= k <= E
    scores = sigmoid(logits);  choice = scores + bias
    ids    = the k columns of the largest ``choice``, largest first (NaN ranks above everything, as in torch.topk;
             equal values: the lower column first)                                          int64 [N, k]
    w      = (choice if weights_with_bias else scores) at ids;  w /= sum(w) + 1e-20 if renormalize;  w *= scaling
                                                                                            float32 [N, k]

Why: the model's router as tensor code is a float32 elementwise kernel, ``torch.topk`` (a gather-top-k and a
bitonic sort) and two gathers. H200, Kimi-Linear-48B: topk alone took 57 us a layer at T=4096 (1.5 ms of the
prefill) and 9.4 us at T=1 (0.24 ms of a decode step). Here a program holds BLOCK_T rows of E scores in
registers and takes the k largest by k max-reductions.

The model calls it as the op ``kimi::moe_route`` (``ops/moe/__init__.py``: checks, fake, the tensor-code reference
on the CPU), opaque to Inductor: traced at each MoE layer as a user Triton kernel, it doubled the first call's
compile of the 48B prefill (41.6 -> 102.6 s, H200). No autograd (the router's training path stays tensor code);
under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import device_guard
from . import check_route_inputs

__all__ = ["route_topk"]


@triton.jit
def _route_kernel(
    Logits,  # [N, E] float32, contiguous
    Bias,  # [E] float32
    Ids,  # [N, K] int64 out
    Weights,  # [N, K] float32 out
    N,
    scaling,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    WITH_BIAS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    x = tl.load(Logits + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)
    scores = 1.0 / (1.0 + tl.exp(-x))
    biased = scores + tl.load(Bias + cols, mask=col_ok, other=0.0)[None, :]
    if WITH_BIAS:
        value = biased
    else:
        value = scores
    choice = tl.where(biased != biased, float("inf"), biased)  # NaN first, as torch.topk ranks it
    choice = tl.where(col_ok[None, :], choice, float("-inf"))
    slot = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(choice, axis=1)
        pick = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest column of the max
        hit = cols[None, :] == pick[:, None]
        picked = tl.sum(tl.where(hit, value, 0.0), axis=1)
        ids = tl.where(slot[None, :] == j, pick[:, None], ids)
        w = tl.where(slot[None, :] == j, picked[:, None], w)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORMALIZE:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scaling
    out = rows.to(tl.int64)[:, None] * K + slot[None, :]
    ok = row_ok[:, None] & (slot[None, :] < K)
    tl.store(Ids + out, ids.to(tl.int64), mask=ok)
    tl.store(Weights + out, w, mask=ok)


def route_topk(logits: Tensor, bias: Tensor, k: int, *, renormalize: bool, scaling: float,
               weights_with_bias: bool) -> tuple[Tensor, Tensor]:
    """``(ids int64 [N, k], weights float32 [N, k])`` from router logits; contract in the module docstring."""
    check_route_inputs(logits, bias, k)
    N, E = logits.shape
    logits, bias = logits.contiguous(), bias.contiguous()
    ids = torch.empty(N, k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(N, k, dtype=torch.float32, device=logits.device)
    if N == 0:
        return ids, weights
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(16, 2048 // block_e))  # ~2048 scores a program (8 rows of Kimi's 256 experts)
    with device_guard(logits):
        _route_kernel[(triton.cdiv(N, block_t),)](
            logits, bias, ids, weights, N, float(scaling), E=E, K=k, BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(k), BLOCK_T=block_t, RENORMALIZE=bool(renormalize),
            WITH_BIAS=bool(weights_with_bias), num_warps=4)
    return ids, weights
