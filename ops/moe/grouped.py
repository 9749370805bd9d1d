"""Triton prefill path of ``kimi::moe_experts``: the (token, slot) pairs sorted by expert, each expert's rows padded
to whole blocks of ``BLOCK_M``, and two grouped-GEMM kernels that read the tokens and the weights where they lie.

Why: at prefill sizes an expert gets ~T*k/E rows (128 at T=4096, Kimi Linear), which makes the grouped GEMM
bound by reading the experts' weights (128 FLOP a weight byte, under the H200's ~176 FLOP/B balance). What counts
is streaming each expert's weight tiles once while every row of that expert uses them. ``torch._grouped_mm`` also
needs the tokens gathered into a sorted copy and the gate and up outputs written and read back for ``silu(a) * b``.
H200, Kimi widths, the whole op (bench/bench_moe.py --prefill): T=4096 1755 us here against 1893 us through
``torch._grouped_mm`` (before the layout kernels and the down kernel's order; 1708 us after the order), T=1024 1007
against 1324 us. In the 48B prefill at T=4096 the two GEMM kernels take 862 + 474 us a layer, ~2.8 TB/s of weights.

Layout (every size a host int, no host sync: capturable in a CUDA graph)::

    x [T, D]    topk_ids [T, k]    w_gate, w_up [E, I, D]    w_down [E, D, I]      P = T*k slots (slot t*k + j)
    R = rows_bound(P, E, BLOCK_M)    an upper bound of sum_e ceil(count_e / BLOCK_M) * BLOCK_M
    slot_of_row  [R]             int64, the slot held by each row; P for the padding rows
    block_expert [R / BLOCK_M]   int64, each block's expert; E past the last used block (those programs return)
    row_of_slot  [P]             int64, the inverse: the row of each slot (read by the weighted sum)

0. ``align_rows``: the layout, by four small kernels (per-chunk expert counts; each expert's running sum down
   the chunks; each block's expert; each slot placed in its row).
1. ``_gate_up_kernel``, grid (R / BLOCK_M, cdiv(I, BLOCK_N)): ``h[row, n] = silu(x[tok] . w_gate[e, n]) *
   (x[tok] . w_up[e, n])``, tok = slot // k, both products accumulated in float32 from one load of the x tile,
   rounded once to x's dtype (h [R, I]).
2. ``_down_kernel``, grid (R / BLOCK_M * cdiv(D, BLOCK_N),), a row block's column tiles adjacent:
   ``y[row, d] = h[row] . w_down[e, d]`` (y [R, D], x's dtype).
3. ``combine.moe_combine_rows``: ``out[t] = sum_j topk_weights[t, j] * y[row_of_slot[t*k + j]]`` in float32.

The gate/up programs run along the row blocks first, so the blocks of one expert (adjacent) ask for the same
weight tile at about the same time and share it through L2 (x, ~19 MB at T=4096, stays in L2). The down programs
run along the column tiles first, so each row block's slice of h is read from HBM once.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels also run on CPU tensors, which is how the
tests check them without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import device_guard, device_properties
from .combine import moe_combine_rows

__all__ = ["PrefillBlocks", "prefill_blocks", "fit_blocks", "rows_bound", "align_rows", "launch_gate_up", "launch_down",
           "moe_experts_prefill"]

PREFILL_DTYPES = (torch.float16, torch.bfloat16)
# Triton's interpreter multiplies bf16 tl.dot operands as raw bits (3.7: errors ~1e10); there the kernels upcast
# the operands to float32 first (same products: bf16 x bf16 is exact in float32). Compiled kernels never do.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_UPCAST = _INTERPRET


@triton.jit
def _gate_up_kernel(
    X,  # [T, D] tokens, contiguous
    SlotOfRow,  # [R] int64
    BlockExpert,  # [R / BLOCK_M] int64
    Wg,  # [E, I, D] gate projections
    Wu,  # [E, I, D] up projections
    H,  # [R, I] out, x's dtype
    P,  # number of slots (T * K): the padding rows' slot
    E,
    D,
    I,
    sg_e, sg_i, sg_d,  # w_gate strides (elements)
    su_e, su_i, su_d,  # w_up strides
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # float32 operands for tl.dot (the interpreter only: see _UPCAST)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m)
    if e >= E:  # past the last used block
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SlotOfRow + rows)
    row_ok = slot < P
    tok = tl.where(row_ok, slot // K, 0)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = X + tok[:, None] * D + kk[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = Wg + e * sg_e + n.to(tl.int64)[None, :] * sg_i + kk[:, None] * sg_d  # [BLOCK_K, BLOCK_N]
    u_ptrs = Wu + e * su_e + n.to(tl.int64)[None, :] * su_i + kk[:, None] * su_d
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = kk < D - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * sg_d
        u_ptrs += BLOCK_K * su_d
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(a) * b; exp overflow at a << 0 gives -0, silu's limit
    h_ptrs = H + rows.to(tl.int64)[:, None] * I + n[None, :]
    tl.store(h_ptrs, h.to(H.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    H,  # [R, I] from _gate_up_kernel
    BlockExpert,  # [R / BLOCK_M] int64
    Wd,  # [E, D, I] down projections
    Y,  # [R, D] out, x's dtype
    E,
    D,
    I,
    sd_e, sd_d, sd_i,  # w_down strides (elements)
    n_blocks,  # R / BLOCK_M
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COLS_FASTEST: tl.constexpr,  # program order: a row block's column tiles adjacent (see PrefillBlocks)
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    if COLS_FASTEST:
        n_tiles = tl.cdiv(D, BLOCK_N)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
    else:
        pid_m = pid % n_blocks
        pid_n = pid // n_blocks
    e = tl.load(BlockExpert + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < D
    kk = tl.arange(0, BLOCK_K)
    # padding rows of h hold finite values (zero rows of x times the weights), so they need no mask
    h_ptrs = H + rows.to(tl.int64)[:, None] * I + kk[None, :]
    w_ptrs = Wd + e * sd_e + n.to(tl.int64)[None, :] * sd_d + kk[:, None] * sd_i
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = kk < I - k0
        a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * sd_i
    y_ptrs = Y + rows.to(tl.int64)[:, None] * D + n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=n_ok[None, :])


@dataclasses.dataclass(frozen=True)
class PrefillBlocks:
    """Tiles, warps and pipeline stages of the two kernels (tile sizes powers of two, at least 16)."""
    block_m: int
    gate_up_n: int
    gate_up_k: int
    gate_up_warps: int
    gate_up_stages: int
    down_n: int
    down_k: int
    down_warps: int
    down_stages: int
    # the down kernel's program order. Column tiles fastest: the ~D / down_n programs of a row block run together
    # and read its 64 x I slice of h once from HBM (h, ~80 MB at T=4096, does not stay in L2 across the sweep of
    # all row blocks that row blocks fastest makes for each column tile); an expert's 2-3 row blocks are still
    # in flight together and share each weight tile through L2.
    down_cols_fastest: bool = True


def prefill_blocks(D: int, I: int) -> PrefillBlocks:
    """The one place that picks the tiles: 64 rows a block (an expert's ~128 rows at T=4096 pad to 2-3 blocks);
    gate/up 256 output columns, 64 along the reduction, 8 warps, 3 stages (72 KB of bf16 tiles a stage); down 128
    columns, 4 warps, 3 stages. H200, Kimi widths, T=4096 (bench_moe.py --prefill --sweep), the whole op 1755 us
    with 256 down columns, rows fastest; 128 gate/up columns 1862-2057 us, 128 rows 1862 us (5.8 ms with 256
    gate/up columns, where two 128 x 256 float32 accumulators need 256 registers a thread), 32 rows 2427 us. Each
    kernel alone: gate/up 969 us (128 columns, 4 warps, 4 stages: 1098); down 535 us, against 590 with 256 columns
    and 700 with 256 columns and the row blocks fastest."""
    return PrefillBlocks(block_m=64, gate_up_n=min(256, max(16, triton.next_power_of_2(I))), gate_up_k=64,
                         gate_up_warps=8, gate_up_stages=3, down_n=min(128, max(16, triton.next_power_of_2(D))),
                         down_k=64, down_warps=4, down_stages=3)


# where the default's shared memory does not fit (3 x 72 KB of bf16 tiles for gate/up: an H100 / H200 holds 227 KB
# a block, an A100 163 KB): 128 output columns, 4 warps (H200, T=4096: 2057 us against the default's 1755)
_SMALL_SMEM_BLOCKS = PrefillBlocks(64, 128, 64, 4, 3, 128, 64, 4, 3)


def _smem_bytes(b: PrefillBlocks, elem: int) -> int:
    """Shared memory of the pipelined tiles of the larger of the two kernels."""
    gate_up = b.gate_up_stages * (b.block_m * b.gate_up_k + 2 * b.gate_up_k * b.gate_up_n) * elem
    down = b.down_stages * (b.block_m * b.down_k + b.down_k * b.down_n) * elem
    return max(gate_up, down)


def fit_blocks(b: PrefillBlocks, device: torch.device, elem: int = 2) -> PrefillBlocks:
    """``b``, or the smaller tiles where ``b``'s exceed one block's shared memory on ``device`` (host-side query,
    cached; no sync)."""
    if device.type != "cuda":
        return b
    if _smem_bytes(b, elem) + 8192 <= device_properties(device).shared_memory_per_block_optin:
        return b
    return _SMALL_SMEM_BLOCKS


def rows_bound(P: int, E: int, block_m: int) -> int:
    """Rows of the padded layout: each expert pads to whole blocks, at most ``block_m - 1`` rows an expert."""
    return triton.cdiv(P + E * (block_m - 1), block_m) * block_m


# the layout in four small kernels (``align_rows`` on CUDA / the interpreter): torch's sort, scatters, cumsums and
# searchsorted took 134 us a MoE layer at T=4096 (H200), ~13 launches. Slots are taken in chunks of LAYOUT_CHUNK;
# the running sums down the chunks run LAYOUT_EXPERTS experts a program. One program for all the offsets and
# block experts took 44 us a layer at T=4096 and 313 us at T=32768 (H200 profiles); spread over 8 programs for
# the sums and ~n_blocks / 32 for the block experts, a few us each is the prediction (not measured yet).
LAYOUT_CHUNK = 128
LAYOUT_EXPERTS = 32


@triton.jit
def _chunk_counts_kernel(Ids, ChunkCounts, P, E: tl.constexpr, BLOCK_E: tl.constexpr, C: tl.constexpr,
                         SUB: tl.constexpr):
    """ChunkCounts[c, e] = slots of chunk c routed to expert e (one-hot sums of SUB slots at a time)."""
    c = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for i0 in tl.static_range(0, C, SUB):
        s = c * C + i0 + tl.arange(0, SUB)
        ids = tl.load(Ids + s, mask=s < P, other=-1)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    tl.store(ChunkCounts + c * E + e, counts, mask=e < E)


@triton.jit
def _expert_scan_kernel(ChunkCounts, ChunkBase, Totals, n_chunks, E: tl.constexpr, EXPERTS: tl.constexpr,
                        CHUNKS: tl.constexpr):
    """Program p, experts [p * EXPERTS, (p + 1) * EXPERTS): ChunkBase[c, e] = expert e's slots in chunks before c
    (a running sum down the chunks), Totals[e] = all of expert e's slots."""
    e = tl.program_id(0) * EXPERTS + tl.arange(0, EXPERTS)
    e_ok = e < E
    total = tl.zeros([EXPERTS], dtype=tl.int32)
    for c0 in range(0, n_chunks, CHUNKS):
        c = c0 + tl.arange(0, CHUNKS)
        ok = (c < n_chunks)[:, None] & e_ok[None, :]
        counts = tl.load(ChunkCounts + c[:, None] * E + e[None, :], mask=ok, other=0)
        before = tl.cumsum(counts, axis=0) - counts + total[None, :]
        tl.store(ChunkBase + c[:, None] * E + e[None, :], before, mask=ok)
        total += tl.sum(counts, axis=0)
    tl.store(Totals + e, total, mask=e_ok)


@triton.jit
def _block_experts_kernel(Totals, PadStart, BlockExpert, n_blocks, E: tl.constexpr, BLOCK_E: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    """Program p, blocks [p * BLOCKS, (p + 1) * BLOCKS): each block's expert (E past the last used block), from the
    experts' padded row counts (each program sums all E); program 0 also writes each expert's first padded row
    (PadStart)."""
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    total = tl.load(Totals + e, mask=e_ok, other=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    if tl.program_id(0) == 0:
        tl.store(PadStart + e, pad_end - padded, mask=e_ok)
    pad_end = tl.where(e_ok, pad_end, 2147483647)  # lanes past E never count
    j = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    expert = tl.sum((pad_end[None, :] <= (j * BLOCK_M)[:, None]).to(tl.int32), axis=1)
    tl.store(BlockExpert + j, expert.to(tl.int64), mask=j < n_blocks)


@triton.jit
def _place_slots_kernel(Ids, ChunkBase, PadStart, SlotOfRow, RowOfSlot, P, E: tl.constexpr, C: tl.constexpr):
    """Row of each slot: its expert's first row + the expert's slots in earlier chunks + earlier ones in this chunk."""
    c = tl.program_id(0)
    i = tl.arange(0, C)
    s = c * C + i
    ok = s < P
    ids = tl.load(Ids + s, mask=ok, other=-1)
    rank = tl.sum(((ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    e = tl.where(ok, ids, 0)
    row = tl.load(PadStart + e, mask=ok, other=0) + tl.load(ChunkBase + c * E + e, mask=ok, other=0) + rank
    tl.store(SlotOfRow + row, s.to(tl.int64), mask=ok)
    tl.store(RowOfSlot + s, row.to(tl.int64), mask=ok)


def _align_rows_kernels(flat: Tensor, E: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    P, dev = flat.numel(), flat.device
    R = rows_bound(P, E, block_m)
    n_chunks, n_blocks = triton.cdiv(P, LAYOUT_CHUNK), R // block_m
    block_e = max(16, triton.next_power_of_2(E))
    experts = min(block_e, LAYOUT_EXPERTS)
    blocks = max(1, 8192 // block_e)  # a [blocks, block_e] comparison tile a program
    chunk_counts = torch.empty(n_chunks, E, dtype=torch.int32, device=dev)
    chunk_base = torch.empty_like(chunk_counts)
    totals = torch.empty(E, dtype=torch.int32, device=dev)
    pad_start = torch.empty(E, dtype=torch.int32, device=dev)
    block_expert = torch.empty(n_blocks, dtype=torch.int64, device=dev)
    slot_of_row = torch.full((R,), P, dtype=torch.int64, device=dev)
    row_of_slot = torch.empty(P, dtype=torch.int64, device=dev)
    with device_guard(flat):
        if n_chunks:  # no slots: the scan writes zero totals, every block is past the last used one
            _chunk_counts_kernel[(n_chunks,)](flat, chunk_counts, P, E=E, BLOCK_E=block_e, C=LAYOUT_CHUNK, SUB=32,
                                              num_warps=4)
        _expert_scan_kernel[(triton.cdiv(E, experts),)](chunk_counts, chunk_base, totals, n_chunks, E=E,
                                                        EXPERTS=experts, CHUNKS=max(1, 2048 // experts),
                                                        num_warps=4)
        _block_experts_kernel[(triton.cdiv(n_blocks, blocks),)](totals, pad_start, block_expert, n_blocks, E=E,
                                                                BLOCK_E=block_e, BLOCK_M=block_m, BLOCKS=blocks,
                                                                num_warps=8)
        if n_chunks:
            _place_slots_kernel[(n_chunks,)](flat, chunk_base, pad_start, slot_of_row, row_of_slot, P, E=E,
                                             C=LAYOUT_CHUNK, num_warps=8)
    return slot_of_row, block_expert, row_of_slot


def align_rows(topk_ids: Tensor, E: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(slot_of_row, block_expert, row_of_slot)`` of the padded expert-sorted layout (module docstring), on the
    device, without a host sync: four Triton kernels on CUDA (and under the interpreter), torch ops on the CPU.
    Both place an expert's slots in slot order, so they give the same layout."""
    flat = topk_ids.reshape(-1)
    if flat.is_cuda or _INTERPRET:
        return _align_rows_kernels(flat.contiguous(), E, block_m)
    P = flat.numel()
    dev = flat.device
    R = rows_bound(P, E, block_m)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    first = torch.cumsum(counts, 0) - counts  # each expert's first position in the sorted slots
    e_sorted = flat.index_select(0, order)
    row = (pad_end - padded).index_select(0, e_sorted) + torch.arange(P, device=dev) - first.index_select(0, e_sorted)
    slot_of_row = torch.full((R,), P, dtype=torch.int64, device=dev).scatter_(0, row, order)
    starts = torch.arange(0, R, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end, starts, right=True)  # E past the last used block
    row_of_slot = torch.empty_like(order).scatter_(0, order, row)
    return slot_of_row, block_expert, row_of_slot


def launch_gate_up(x: Tensor, slot_of_row: Tensor, block_expert: Tensor, w_gate: Tensor, w_up: Tensor, h: Tensor,
                   k: int, b: PrefillBlocks) -> None:
    """``_gate_up_kernel`` into ``h [R, I]`` (x contiguous; the layout from :func:`align_rows` at ``b.block_m``)."""
    (T, D), (E, I, _), R = x.shape, w_gate.shape, slot_of_row.numel()
    _gate_up_kernel[(R // b.block_m, triton.cdiv(I, b.gate_up_n))](
        x, slot_of_row, block_expert, w_gate, w_up, h, T * k, E, D, I, *w_gate.stride(), *w_up.stride(),
        K=k, BLOCK_M=b.block_m, BLOCK_N=b.gate_up_n, BLOCK_K=b.gate_up_k, UPCAST=_UPCAST,
        num_warps=b.gate_up_warps, num_stages=b.gate_up_stages)


def launch_down(h: Tensor, block_expert: Tensor, w_down: Tensor, y: Tensor, b: PrefillBlocks) -> None:
    """``_down_kernel`` from ``h [R, I]`` into ``y [R, D]``."""
    (E, D, I), n_blocks = w_down.shape, h.shape[0] // b.block_m
    _down_kernel[(n_blocks * triton.cdiv(D, b.down_n),)](
        h, block_expert, w_down, y, E, D, I, *w_down.stride(), n_blocks,
        BLOCK_M=b.block_m, BLOCK_N=b.down_n, BLOCK_K=b.down_k, COLS_FASTEST=b.down_cols_fastest, UPCAST=_UPCAST,
        num_warps=b.down_warps, num_stages=b.down_stages)


def moe_experts_prefill(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                        w_down: Tensor, blocks: Optional[PrefillBlocks] = None) -> Tensor:
    """``kimi::moe_experts`` (contract in ``__init__.py``) by the two grouped kernels; inputs already checked.
    ``blocks`` overrides :func:`prefill_blocks` (tests use small tiles to cover partial blocks)."""
    if x.dtype not in PREFILL_DTYPES:
        raise TypeError(f"x must be float16 or bfloat16 for the prefill kernels, got {x.dtype}")
    T, D = x.shape
    k = topk_ids.shape[1]
    E, I, _ = w_gate.shape
    if T * k == 0:
        return x.new_zeros(T, D)
    b = blocks if blocks is not None else fit_blocks(prefill_blocks(D, I), x.device, x.element_size())
    x = x.contiguous()
    slot_of_row, block_expert, row_of_slot = align_rows(topk_ids, E, b.block_m)
    R = slot_of_row.numel()
    h = torch.empty(R, I, dtype=x.dtype, device=x.device)
    y = torch.empty(R, D, dtype=x.dtype, device=x.device)
    with device_guard(x):
        launch_gate_up(x, slot_of_row, block_expert, w_gate, w_up, h, k, b)
        launch_down(h, block_expert, w_down, y, b)
    return moe_combine_rows(y, row_of_slot, topk_weights, x.dtype)
