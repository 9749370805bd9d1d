"""Triton kernels for Attention Residuals (``kimi::attn_res`` and its two-phase helpers).

Everything here works on rows: ``sources`` ``[N, B, T, D]`` is viewed as ``[N, R, D]`` with
``R = B * T``; one program owns a block of ``BLOCK_R`` rows and the whole (masked, power-of-two
padded) feature axis ``BLOCK_D >= D``, and walks the ``N`` sources once with an online softmax,
accumulating in float32.  Per source and row:

    rstd  = 1 / sqrt(mean(x * x) + eps)
    score = (q . x) * rstd                    (= q . rmsnorm(x))
    m, l, acc  <-  online-softmax update with (score, x)

so ``out = acc / l``, ``m`` is the running max and ``l = sum exp(score - m)``.

The launchers (``attn_res_fwd``, ``attn_res_bwd``, ``attn_res_phase1_fwd``, ``attn_res_merge_fwd``)
take plain tensors and do no validation; ``ops/attn_res/__init__.py`` validates and registers them as the
CUDA kernels of the custom ops.  They also run on CPU tensors under ``TRITON_INTERPRET=1`` (the
interpreter is chosen when ``triton.jit`` decorates, i.e. when this module is imported), which is
how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import device_guard, device_properties

__all__ = [
    "attn_res_fwd",
    "attn_res_bwd",
    "attn_res_phase1_fwd",
    "attn_res_merge_fwd",
    "kernel_config",
]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(x, q, m, l, acc, inv_d, eps):
    """One source ``x`` [BLOCK_R, BLOCK_D] into the running max ``m``, sum ``l`` and weighted sum ``acc``."""
    ss = tl.sum(x * x, axis=1)
    dot = tl.sum(x * q[None, :], axis=1)
    score = dot / tl.sqrt(ss * inv_d + eps)
    m_new = tl.maximum(m, score)
    alpha = tl.exp(m - m_new)
    p = tl.exp(score - m_new)
    return m_new, l * alpha + p, acc * alpha[:, None] + p[:, None] * x


@triton.jit
def _attn_res_fwd_kernel(
    X,  # [N, R, D] sources, contiguous
    P,  # [R, D] the partial-sum source after the N (read when HAS_PARTIAL), contiguous
    Q,  # [S, D] queries, contiguous
    O,  # [S, R, D] outputs (normalised), sources' dtype
    M,  # [S, R] float32 running max (written when STORE_STATS)
    L,  # [S, R] float32 sum of exp(score - max) (written when STORE_STATS)
    R,
    D,
    N,
    S,
    stride_xn,  # elements between two sources (= R * D)
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_STATS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    HAS_PARTIAL: tl.constexpr,
):
    # One program per (block of rows, query); the query index varies fastest so that the S
    # programs reading the same rows run next to each other and share them through L2.
    pid = tl.program_id(0)
    s_idx = pid % S
    rb = pid // S

    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]

    q = tl.load(Q + s_idx.to(tl.int64) * D + cols, mask=cmask, other=0.0).to(tl.float32)
    inv_d = 1.0 / D

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    x_ptrs = X + offs
    for _n in tl.range(0, N, num_stages=NUM_STAGES):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        m, l, acc = _online_softmax_step(x, q, m, l, acc, inv_d, eps)
        x_ptrs += stride_xn
    if HAS_PARTIAL:  # one more source, read where it lies (the caller need not stack it behind the others)
        x = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        m, l, acc = _online_softmax_step(x, q, m, l, acc, inv_d, eps)

    out = acc / l[:, None]
    o_base = s_idx.to(tl.int64) * R * D
    tl.store(O + o_base + offs, out.to(O.dtype.element_ty), mask=mask)
    if STORE_STATS:
        st = s_idx.to(tl.int64) * R + rows
        tl.store(M + st, m, mask=rmask)
        tl.store(L + st, l, mask=rmask)


@triton.jit
def _attn_res_bwd_kernel(
    X,  # [N, R, D] sources, contiguous
    Q,  # [D] query
    G,  # [R, D] gradient of the output, contiguous
    DX,  # [N, R, D] gradient of the sources (sources' dtype)
    DQP,  # [num_programs, D] float32 partial gradients of the query
    R,
    D,
    N,
    stride_xn,
    eps,
    num_rb,  # number of row blocks
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent-style: program pid handles row blocks pid, pid + P, pid + 2P, ... and writes one
    # partial query gradient, so the buffer that is summed afterwards stays small.
    #
    # With a_n = g . x_n, delta = sum_n alpha_n a_n (= g . out), ds_n = alpha_n (a_n - delta):
    #   dx_n = alpha_n g + ds_n rstd_n q - ds_n score_n rstd_n^2 x_n / D
    #   dq   = sum_rows sum_n ds_n rstd_n x_n
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    q = tl.load(Q + cols, mask=cmask, other=0.0).to(tl.float32)
    inv_d = 1.0 / D
    dq_acc = tl.zeros([BLOCK_D], tl.float32)

    for rb in range(pid, num_rb, nprog):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)

        # pass 1: softmax statistics and delta = sum_n alpha_n (g . x_n), online
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        da = tl.zeros([BLOCK_R], tl.float32)
        x_ptrs = X + offs
        for _n in tl.range(0, N, num_stages=NUM_STAGES):
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            ss = tl.sum(x * x, axis=1)
            dot = tl.sum(x * q[None, :], axis=1)
            score = dot / tl.sqrt(ss * inv_d + eps)
            a = tl.sum(g * x, axis=1)
            m_new = tl.maximum(m, score)
            alpha = tl.exp(m - m_new)
            p = tl.exp(score - m_new)
            l = l * alpha + p
            da = da * alpha + p * a
            m = m_new
            x_ptrs += stride_xn
        inv_l = 1.0 / l
        delta = da * inv_l

        # pass 2: gradients
        x_ptrs = X + offs
        dx_ptrs = DX + offs
        for _n in tl.range(0, N, num_stages=NUM_STAGES):
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            ss = tl.sum(x * x, axis=1)
            dot = tl.sum(x * q[None, :], axis=1)
            rstd = 1.0 / tl.sqrt(ss * inv_d + eps)
            score = dot * rstd
            prob = tl.exp(score - m) * inv_l
            a = tl.sum(g * x, axis=1)
            ds = prob * (a - delta)
            coef = ds * rstd
            dx = prob[:, None] * g + coef[:, None] * q[None, :] - (coef * score * rstd * inv_d)[:, None] * x
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
            dq_acc += tl.sum(coef[:, None] * x, axis=0)
            x_ptrs += stride_xn
            dx_ptrs += stride_xn

    tl.store(DQP + pid.to(tl.int64) * D + cols, dq_acc, mask=cmask)


@triton.jit
def _attn_res_merge_kernel(
    O1,  # [R, D] phase-1 output (normalised), dtype of the sources
    M1,  # [R] float32 phase-1 max score
    L1,  # [R] float32 phase-1 sum of exp(score - max)
    P,  # [R, D] partial-sum source
    Q,  # [D] query
    H,  # [R, D] merged output
    R,
    D,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    inv_d = 1.0 / D

    q = tl.load(Q + cols, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    ss = tl.sum(x * x, axis=1)
    dot = tl.sum(x * q[None, :], axis=1)
    s2 = dot / tl.sqrt(ss * inv_d + eps)

    m1 = tl.load(M1 + rows, mask=rmask, other=0.0)
    l1 = tl.load(L1 + rows, mask=rmask, other=1.0)
    o1 = tl.load(O1 + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.maximum(m1, s2)
    w1 = l1 * tl.exp(m1 - m)
    w2 = tl.exp(s2 - m)
    inv = 1.0 / (w1 + w2)
    h = (w1 * inv)[:, None] * o1 + (w2 * inv)[:, None] * x
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------


def kernel_config(D: int, block_r: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                  forward: bool = False):
    """``(BLOCK_R, BLOCK_D, num_warps, num_stages)`` for feature size ``D``; ``forward``: the forward kernel's.

    The padded feature axis is held whole (``BLOCK_D = next_pow2(D)``); enough rows are packed into
    a program to make a tile of about 4096 elements (D = 2304 -> 1 row x 4096, D = 72 -> 32 x 128),
    with ~16 elements per thread.  ``num_stages`` pipelines the loop over the sources (the next
    sources' loads are issued, asynchronously into shared memory, before the current one is
    reduced): the kernels are memory-bound and otherwise keep too few bytes in flight.

    The forward takes ~32 elements a thread and 4 stages: H200, D = 2304, bf16, the model's read with the partial
    sum apart (bench_attn_res.py --sublayer-read, sweep): T=4096 N=11 87 us vs 122 us at 8 warps and 3 stages,
    N=4 43 vs 57; T=1 N=11 10 vs 29 us. The backward (more live tiles a thread) keeps 16 elements and 3 stages.
    """
    block_d = triton.next_power_of_2(max(int(D), 1))
    if block_r is None:
        block_r = max(1, min(64, 4096 // block_d))
    if num_warps is None:
        num_warps = min(16, max(4, (block_r * block_d) // (1024 if forward else 512)))
    if num_stages is None:
        num_stages = 4 if forward else 3
    return int(block_r), int(block_d), int(num_warps), int(num_stages)


# --------------------------------------------------------------------------------------------
# launchers (no validation: ops/attn_res/__init__.py does it)
# --------------------------------------------------------------------------------------------


def _phase1_launch(sources, queries, eps, store_stats, block_r=None, num_warps=None, num_stages=None,
                   partial=None):
    N, B, T, D = sources.shape
    S = queries.shape[0]
    R = B * T
    x = sources.contiguous()
    q = queries.contiguous()
    out = torch.empty((S, B, T, D), dtype=sources.dtype, device=sources.device)
    if store_stats:
        m = torch.empty((S, B, T), dtype=torch.float32, device=sources.device)
        l = torch.empty((S, B, T), dtype=torch.float32, device=sources.device)
    else:
        m = l = out  # unused placeholders (STORE_STATS is False)
    if R == 0 or D == 0:
        if store_stats and R > 0:
            m.fill_(float("-inf"))
            l.zero_()
        return out, m, l
    BLOCK_R, BLOCK_D, warps, stages = kernel_config(D, block_r, num_warps, num_stages, forward=True)
    grid = (triton.cdiv(R, BLOCK_R) * S,)
    with device_guard(x):
        _attn_res_fwd_kernel[grid](
            x, x if partial is None else partial.contiguous(), q, out, m, l,
            R, D, N, S, R * D, float(eps),
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, STORE_STATS=bool(store_stats), NUM_STAGES=stages,
            HAS_PARTIAL=partial is not None, num_warps=warps,
        )
    return out, m, l


def attn_res_fwd(sources: torch.Tensor, query: torch.Tensor, eps: float, partial: torch.Tensor | None = None, *,
                 block_r=None, num_warps=None, num_stages=None):
    """Forward of ``kimi::attn_res`` with the Triton kernel: ``[N,B,T,D], [D] (, partial [B,T,D]) -> [B,T,D]``."""
    out, _, _ = _phase1_launch(sources, query.reshape(1, -1), eps, False, block_r, num_warps, num_stages, partial)
    return out[0]


def attn_res_phase1_fwd(sources: torch.Tensor, queries: torch.Tensor, eps: float, *, block_r=None, num_warps=None,
                        num_stages=None):
    """Phase 1 with the Triton kernel: ``[N,B,T,D], [S,D] -> (out [S,B,T,D], max [S,B,T], sumexp [S,B,T])``."""
    return _phase1_launch(sources, queries, eps, True, block_r, num_warps, num_stages)


def attn_res_bwd(
    grad_out: torch.Tensor,
    sources: torch.Tensor,
    query: torch.Tensor,
    eps: float,
    *,
    block_r=None,
    num_warps=None,
    num_stages=None,
    max_programs: int | None = None,
):
    """Backward of ``kimi::attn_res`` with the Triton kernel: ``-> (grad_sources, grad_query)``."""
    N, B, T, D = sources.shape
    R = B * T
    x = sources.contiguous()
    q = query.contiguous()
    g = grad_out.to(sources.dtype).contiguous()
    dx = torch.empty_like(x)
    if R == 0 or D == 0:
        dx.zero_()
        return dx, torch.zeros_like(query)
    BLOCK_R, BLOCK_D, warps, stages = kernel_config(D, block_r, num_warps, num_stages)
    num_rb = triton.cdiv(R, BLOCK_R)
    if max_programs is None:
        max_programs = 4 * device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 8
    nprog = max(1, min(num_rb, int(max_programs)))
    dq_part = torch.empty((nprog, D), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _attn_res_bwd_kernel[(nprog,)](
            x, q, g, dx, dq_part,
            R, D, N, R * D, float(eps), num_rb,
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, NUM_STAGES=stages,
            num_warps=warps,
        )
    dq = dq_part.sum(0).to(query.dtype)
    return dx, dq


def attn_res_merge_fwd(
    out1: torch.Tensor,
    max1: torch.Tensor,
    sumexp1: torch.Tensor,
    partial: torch.Tensor,
    query: torch.Tensor,
    eps: float,
    *,
    block_r=None,
    num_warps=None,
):
    """Phase 2 with the Triton kernel: merge the partial-sum source into a phase-1 result."""
    B, T, D = partial.shape
    R = B * T
    h = torch.empty((B, T, D), dtype=partial.dtype, device=partial.device)
    if R == 0 or D == 0:
        return h
    BLOCK_R, BLOCK_D, warps, _ = kernel_config(D, block_r, num_warps)
    grid = (triton.cdiv(R, BLOCK_R),)
    with device_guard(partial):
        _attn_res_merge_kernel[grid](
            out1.contiguous(), max1.contiguous(), sumexp1.contiguous(), partial.contiguous(),
            query.contiguous(), h,
            R, D, float(eps),
            BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            num_warps=warps,
        )
    return h
