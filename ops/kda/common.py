"""Pieces shared by the KDA Triton stages: the launch wrapper, the input-mode rule, the chunk length, and the
jit helpers that the intra kernel, the passes and the backward chunk kernel all inline."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: tokens per chunk of the Triton kernels (the jit helpers below are written out for 64 = 4 blocks of 16)
KERNEL_CHUNK = 64

#: gates at or below this are a full forget: any in-chunk exponent that spans one is <= GATE_FLOOR, whose exp
#: underflows to 0 in float32 (e^-120 is below the smallest subnormal), so g = -inf is exact and the in-chunk
#: cumsum of 64 gates stays far from float32's range
GATE_FLOOR = -120.0

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tracing(args) -> bool:
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args)


def _launch(kernel, grid, *args, **kwargs):
    """Plain Triton launch when running eagerly (the wrap_triton dispatch costs ~0.1 ms per launch);
    through torch.library.wrap_triton when traced (FakeTensor / functional tensors, torch.compile),
    so that a triton_op body stays traceable by Inductor."""
    if not _INTERPRET and _tracing(args):
        return torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    return kernel[grid](*args, **kwargs)


def _np2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


def _modes(q, k, v):
    """(fp32 mode, bf16 mode): fp32 if any of q, k, v is float32; bf16 if all three are bf16."""
    fp32 = torch.float32 in (q.dtype, k.dtype, v.dtype) or torch.float64 in (q.dtype, k.dtype, v.dtype)
    bf16 = q.dtype == k.dtype == v.dtype == torch.bfloat16
    return fp32, bf16



@triton.jit
def _seq_bounds(s, cu, cseq, cidx, T, C: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Chunk slot s -> (valid, bos, eos, chunk index in its sequence)."""
    if IS_VARLEN:
        n = tl.load(cseq + s)
        valid = n >= 0
        n = tl.maximum(n, 0)
        c = tl.load(cidx + s).to(tl.int64)
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
        eos = tl.where(valid, eos, bos)
    else:
        NT = tl.cdiv(T, C)
        n = s // NT
        c = (s % NT).to(tl.int64)
        bos = n.to(tl.int64) * T
        eos = bos + T
    return bos, eos, c


@triton.jit
def _seq_span(n, cu, cchunk, T, C: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Sequence n -> (bos, eos, first chunk slot) for the kernels that walk one sequence's chunks."""
    if IS_VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
        slot0 = tl.load(cchunk + n).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
        slot0 = n.to(tl.int64) * tl.cdiv(T, C)
    return bos, eos, slot0


@triton.jit
def _state_tile(pv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """Value block pv of a [K, V] fp32 state: key / value indices and masks, the tile's mask and its
    offsets inside one state."""
    rk = tl.arange(0, BK)
    km = rk < K
    cv = pv * BV + tl.arange(0, BV)
    vm = cv < V
    return rk, km, cv, vm, km[:, None] & vm[None, :], rk[:, None] * V + cv[None, :]


@triton.jit
def _load_state(ptr, idx, hoff, hm, USE: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr):
    """State tile of state number idx (zeros when USE is False)."""
    if USE:
        h = tl.load(ptr + idx.to(tl.int64) * K * V + hoff, mask=hm, other=0.)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    return h


@triton.jit
def _blockdiag_to_2d(D3, C: tl.constexpr):
    """[4,16,16] diagonal blocks -> [64,64] block-diagonal matrix."""
    i4 = tl.arange(0, 4)
    X = tl.where(i4[:, None, None, None] == i4[None, None, :, None], D3[:, :, None, :], 0.)
    return tl.reshape(X, (C, C))


@triton.jit
def _blockdiag_from_2d(A, C: tl.constexpr):
    """[64,64] -> its [4,16,16] diagonal blocks."""
    i4 = tl.arange(0, 4)
    A4 = tl.reshape(A, (4, 16, 4, 16))
    return tl.sum(tl.where(i4[:, None, None, None] == i4[None, None, :, None], A4, 0.), 2)


@triton.jit
def _block_ends(G, C: tl.constexpr):
    """The 16-block ends E0..E3 of the in-chunk gate cumsum G [C, BK] (G at rows 15, 31, 47, 63)."""
    r = tl.arange(0, C)
    E0 = tl.sum(tl.where(r[:, None] == 15, G, 0.), 0)
    E1 = tl.sum(tl.where(r[:, None] == 31, G, 0.), 0)
    E2 = tl.sum(tl.where(r[:, None] == 47, G, 0.), 0)
    E3 = tl.sum(tl.where(r[:, None] == 63, G, 0.), 0)
    return E0, E1, E2, E3


@triton.jit
def _key_block(kb, rmask, K: tl.constexpr, BK: tl.constexpr):
    """Key block kb of a chunk's [C, K] tiles: its columns, their mask, and the [C, BK] mask with the rows'."""
    cols = kb * BK + tl.arange(0, BK)
    cmask = cols < K
    return cols, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _gate2d(g, tok, rmask, hv, cols, cmask, HV: tl.constexpr, K: tl.constexpr, C: tl.constexpr):
    """In-chunk gate cumsum G [C, BK] (fp32) and the chunk's total gate Gl [BK] (= G at row 63: rows
    past the sequence end load g = 0)."""
    m2 = rmask[:, None] & cmask[None, :]
    gt = _floor_gate(tl.load(g + (tok[:, None] * HV + hv) * K + cols[None, :], mask=m2, other=0.).to(tl.float32))
    return tl.cumsum(gt, 0), tl.sum(gt, 0)


@triton.jit
def _floor_gate(gt):
    """Gates below GATE_FLOOR (g = -inf among them) become GATE_FLOOR: the same full forget in float32."""
    FLOOR: tl.constexpr = -120.0  # GATE_FLOOR (a jit function reads no plain globals)
    return tl.where(gt < FLOOR, FLOOR, gt)


@triton.jit
def _finite(x):
    """Elementwise: x is neither NaN nor +-inf."""
    INF: tl.constexpr = float("inf")
    return tl.abs(x) < INF


@triton.jit
def _gate_ok(gt):
    """Elementwise: a usable gate, i.e. not NaN and not +inf (g = -inf is a full forget)."""
    INF: tl.constexpr = float("inf")
    return (gt == gt) & (gt < INF)


@triton.jit
def _first_bad_row(ok, C: tl.constexpr):
    """The first row of a [C, N] tile with a False in ``ok`` (C if none)."""
    r = tl.arange(0, C)
    return tl.min(tl.where(tl.min(ok.to(tl.int32), 1) == 0, r, C), 0)


@triton.jit
def _anchor_rows(blk, E0, E1, E2):
    """Per row, the gate at the end of the previous 16-block (0 for the first block)."""
    return tl.where(blk[:, None] == 1, E0[None, :],
                    tl.where(blk[:, None] == 2, E1[None, :],
                             tl.where(blk[:, None] == 3, E2[None, :], 0.)))


@triton.jit
def _block_mult(i, blk, E0, E1, E2, UPPER: tl.constexpr):
    """Rows of block j get exp(E[i-1] - E[j-1]) (<= 1) where j <= i (UPPER=False) or
    exp(E[j-1] - E[i-1]) where j >= i (UPPER=True); 0 elsewhere. E[-1] = 0."""
    NEG_INF: tl.constexpr = float("-inf")
    Ea = tl.where(i == 1, E0, tl.where(i == 2, E1, tl.where(i == 3, E2, 0.)))
    if UPPER:
        m0 = tl.exp(tl.where(i <= 0, 0. - Ea, NEG_INF))
        m1 = tl.exp(tl.where(i <= 1, E0 - Ea, NEG_INF))
        m2 = tl.exp(tl.where(i <= 2, E1 - Ea, NEG_INF))
        m3 = tl.exp(tl.where(i <= 3, E2 - Ea, NEG_INF))
    else:
        m0 = tl.exp(Ea)
        m1 = tl.exp(tl.where(i >= 1, Ea - E0, NEG_INF))
        m2 = tl.exp(tl.where(i >= 2, Ea - E1, NEG_INF))
        m3 = tl.exp(tl.where(i >= 3, Ea - E2, NEG_INF))
    return tl.where(blk[:, None] == 0, m0[None, :],
                    tl.where(blk[:, None] == 1, m1[None, :],
                             tl.where(blk[:, None] == 2, m2[None, :], m3[None, :])))


@triton.jit
def _slow_tiles(kt, qt, G, BK: tl.constexpr):
    """The slow paths' [4, 16, BK] views: G3, its 16-block ends E [4, BK] and the previous block's end Ep
    (0 for block 0), k3, q3, and the factors e^(G - Ep) <= 1 (left) and e^(E - G) <= 1 (right)."""
    i4 = tl.arange(0, 4)
    r16 = tl.arange(0, 16)
    G3 = tl.reshape(G, (4, 16, BK))
    E = tl.sum(tl.where(r16[None, :, None] == 15, G3, 0.), 1)
    Ep = tl.sum(tl.where(i4[:, None, None] == i4[None, :, None] + 1, E[None, :, :], 0.), 1)
    k3 = tl.reshape(kt, (4, 16, BK))
    q3 = tl.reshape(qt, (4, 16, BK))
    return G3, E, Ep, k3, q3, tl.exp(G3 - Ep[:, None, :]), tl.exp(E[:, None, :] - G3)

