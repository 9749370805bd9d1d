"""Triton CUDA kernels for ``kimi::kda`` (forward: chunked prefill, segment-parallel prefill, decode).

Entry point used by the op registration in ``ops/kda.py``::

    kda_forward(q, k, v, g, beta, initial_state, scale, cu_seqlens) -> (o, final_state)

Inputs are validated by the caller: q, k [B,T,H,K]; v [B,T,HV,V]; g [B,T,HV,K] (log decay <= 0, any
float dtype); beta [B,T,HV]; initial_state [N,HV,K,V] float32 or None; cu_seqlens int64 [N+1] or None.
Returns o [B,T,HV,V] in v.dtype and a new float32 final_state [N,HV,K,V].

Algorithm (chunk C = 64, sub-blocks of 16; docs/kda_kernels.md has the derivation and the floor):

* ``_kda_intra_kernel`` (parallel over chunks x value heads): in-chunk gate cumsum G (fp32), the
  matrices Akk = beta * (k e^G)(k e^-G)^T (strictly lower) and Aqk = scale * (q e^G)(k e^-G)^T (lower),
  per key block with exponents that cannot overflow: when the block's whole-chunk decay is <= span_max,
  one anchor at the chunk start (left <= |x|, right <= e^span_max: two dots); otherwise anchors at the
  16-block boundaries (left <= |x|, right <= e^span of a 16-block), and a chunk where one 16-block alone
  decays by more than span_max is recomputed exactly (SLOW relaunch: per-column loop on the diagonal
  blocks; each of its programs checks the flags of up to 8 chunk slots with one load).
  T = (I + Akk)^-1 by block doubling (10 dots; on bf16 operands in the bf16 forward since session 10),
  qg = scale q e^G, kg = k e^(G_last - G), gam = e^G_last,
  and, in the forward's TX form (default since session 9), T, beta and k e^G stored as they are: the kernel
  is one loop over key blocks and the inverse. The WU form (sessions 1-8; the backward's recompute and the
  segments) also forms w = T (beta k e^G) and u = T (beta v) in two more loops; each loop over key / value
  blocks issues the next block's loads before computing the current one (PREFETCH: global-load waits were
  the largest stall, ncu), and the w and u loops' first tiles load during the inverse and the w loop
  (PREFETCH=2).
* ``_kda_pass_kernel`` (sequential over chunks; parallel over sequences x heads x value blocks
  [x segments]): U = T diag(beta) (v - k e^G h) (TX form) or U = u - w h (WU form); o = qg h + Aqk U;
  h <- gam * h + kg^T U. Three pipeline stages: the next two chunks' tiles load while one is computed
  (fewer where shared memory is smaller: fit_stages).
* Long sequences at small batch: the sequence is cut into segments; ``_kda_seg_state_kernel`` runs
  every segment from a zero state and also carries the segment's K x K transition matrix,
  ``_kda_seg_combine_kernel`` chains the segments (h_s+1 = M_s h_s + b_s), then the pass kernel runs
  all segments in parallel from their true initial states.
* ``_kda_recurrent_kernel``: token loop for decode / very short T, the fp32 state streamed once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._device import device_properties

CHUNK = 64

# Tunables. Benchmarks may edit these; the defaults are what docs/kda_kernels.md measured.
_CFG = {
    "store_lowp": True,      # bf16 inputs: keep w, u, qg, kg, Aqk in bf16 (else float32)
    "pass_lowp": True,       # bf16 inputs: pass dots with bf16 operands (else tf32 on fp32 operands)
    "a_lowp": True,          # bf16 inputs: Akk / Aqk dots with bf16 operands (else tf32)
    "recurrent_max_t": 16,   # token loop when T (per sequence) <= this
    "segments": 1,           # -1 auto, 0/1 off, n>1 forced number of segments (non-varlen only);
                             # off by default: measured slower than one pass at BV=64 (docs/kda_kernels.md)
    "seg_min_chunks": 16,    # a segment holds at least this many chunks
    "target_programs": 528,  # auto segments: aim for about this many pass programs (4 per SM)
    "span_max": 60.0,        # largest in-block gate span (nats) for the anchored diagonal path
    "intra_warps": 4,
    "intra_bk": 32,
    "intra_maxnreg": None,   # register cap: 168 (3 CTAs/SM) was faster without prefetch; with it, it spills
    "intra_prefetch": 2,     # 1: issue the next key / value block's loads before computing the current one;
                             # 2: also the w and u loops' first loads before the inverse / the w loop (-1.3 %)
    "intra_form": "tx",      # "wu": the intra kernel forms w = T beta k e^G, u = T beta v; "tx": it stores
                             # T, beta and k e^G, the pass forms U = T diag(beta) (v - k e^G h) (segments: wu)
    "inv_lowp": 5,           # bf16 inputs, TX form: levels (of 5) of the inverse on bf16 operands (0: tf32)
    "intra_slow_group": 8,   # chunk slots per program of the SLOW relaunch (1: one program per slot, as before)
    "intra_slow_min_programs": 2048,
    "pass_bv": 32,           # 128 programs at B=1, H=32 (64: 1.615 / 6.308 ms, 32: 1.548 / 6.045 at T=16K / 64K)
    "pass_warps": 4,
    "pass_stages": 3,        # loads of the next two chunks in flight (2: 1.513 / 5.942 ms, 3: 1.373 / 5.335 at
                             # T=16K / 64K, docs/benchmarks.md run 10); fewer where shared memory is smaller
    "decode_bv": 64,
    "decode_warps": 4,
}

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


# ----------------------------------------------------------------------------------------------
# shared jit helpers
# ----------------------------------------------------------------------------------------------
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
def _unit_lower_inverse(Akk, C: tl.constexpr, PREC: tl.constexpr, LOWP_LEVELS: tl.constexpr):
    """(I + Akk)^-1 for strictly lower triangular Akk [C,C] (fp32 in, fp32 out) by block doubling.

    T_s = inverse of the block-diagonal part of I + Akk with s x s blocks. For a lower block-triangular
    [[X, 0], [Y, Z]], the inverse is D - D N D with D = diag(X^-1, Z^-1), N = [[0, 0], [Y, 0]], so
    T_2s = T_s - T_s (N_s T_s) with N_s the entries of Akk between the two s-halves of each 2s-block
    (exact, no power series: every intermediate is a true partial inverse). T_2 = I - N_1; then
    s = 2 ... C/2: two [C,C] dots per level, no reductions, no reshapes. The first LOWP_LEVELS levels (s = 2, 4,
    ...; 0 to 5) take bf16 operands (fp32 accumulation; T_s itself is carried in fp32, so each new off-diagonal
    block is rounded only by the operands of the product that forms it): the forward of bf16 inputs, whose T goes
    to the pass in bf16 anyway (session 10, docs/kda_kernels.md)."""
    tl.static_assert(C == 64, "the levels below are written out for a 64-token chunk")
    r = tl.arange(0, C)
    rr = r[:, None]
    cc = r[None, :]
    Tm = tl.where(rr == cc, 1., 0.) - tl.where((rr // 2) == (cc // 2), Akk, 0.)
    Tm = _doubling_level(Tm, Akk, rr, cc, 2, PREC, LOWP_LEVELS >= 1)
    Tm = _doubling_level(Tm, Akk, rr, cc, 4, PREC, LOWP_LEVELS >= 2)
    Tm = _doubling_level(Tm, Akk, rr, cc, 8, PREC, LOWP_LEVELS >= 3)
    Tm = _doubling_level(Tm, Akk, rr, cc, 16, PREC, LOWP_LEVELS >= 4)
    Tm = _doubling_level(Tm, Akk, rr, cc, 32, PREC, LOWP_LEVELS >= 5)
    return Tm


@triton.jit
def _doubling_level(Tm, Akk, rr, cc, S: tl.constexpr, PREC: tl.constexpr, LOWP: tl.constexpr):
    """T_2S = T_S - T_S (N_S T_S), N_S = Akk between the two S-halves of each 2S-block."""
    Ns = tl.where(((rr // S) != (cc // S)) & ((rr // (2 * S)) == (cc // (2 * S))), Akk, 0.)
    if LOWP:
        Tb = Tm.to(tl.bfloat16)
        out = Tm - tl.dot(Tb, tl.dot(Ns.to(tl.bfloat16), Tb).to(tl.bfloat16))
    else:
        out = Tm - tl.dot(Tm, tl.dot(Ns, Tm, input_precision=PREC), input_precision=PREC)
    return out


# ----------------------------------------------------------------------------------------------
# intra-chunk kernel
# ----------------------------------------------------------------------------------------------
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
    gt = tl.load(g + (tok[:, None] * HV + hv) * K + cols[None, :], mask=m2, other=0.).to(tl.float32)
    return tl.cumsum(gt, 0), tl.sum(gt, 0)


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
def _chunk_A(kt, qt, eL, right, Akk, Aqk, A_LOWP: tl.constexpr, PREC: tl.constexpr):
    """Accumulate one key block's Akk, Aqk (unmasked, unscaled) when the whole chunk's gate span in
    this block is <= span_max: one anchor at the chunk start, left x e^G <= |x| (eL = e^G), right =
    k e^-G <= e^span_max (no overflow in fp32 / bf16). Two dots instead of the eight of _fast_A."""
    if A_LOWP:
        kL = (kt * eL).to(tl.bfloat16)
        qL = (qt * eL).to(tl.bfloat16)
        right = right.to(tl.bfloat16)
    else:
        kL = kt * eL
        qL = qt * eL
    rt = tl.trans(right)
    Akk = tl.dot(kL, rt, Akk, input_precision=PREC)
    Aqk = tl.dot(qL, rt, Aqk, input_precision=PREC)
    return Akk, Aqk


@triton.jit
def _fast_A(kt, qt, G, E0, E1, E2, Akk, Aqk, C: tl.constexpr, BK: tl.constexpr,
            A_LOWP: tl.constexpr, PREC: tl.constexpr):
    """Accumulate Akk, Aqk (unmasked, unscaled) when every 16-block's gate span is <= span_max:
    rows of block i use the anchor E[i-1]: left = x e^(G - E[i-1]) <= |x|, right = k e^(E[i-1] - G)
    over columns of blocks <= i (<= e^span inside block i, <= 1 before it)."""
    r = tl.arange(0, C)
    blk = r // 16
    Ep = _anchor_rows(blk, E0, E1, E2)
    eL = tl.exp(G - Ep)
    if A_LOWP:
        kL = (kt * eL).to(tl.bfloat16)
        qL = (qt * eL).to(tl.bfloat16)
    else:
        kL = kt * eL
        qL = qt * eL
    kLi = kt * tl.exp(Ep - G)
    for i in range(0, 4):
        right = kLi * _block_mult(i, blk, E0, E1, E2, False)
        rsel = blk[:, None] == i
        if A_LOWP:
            right = right.to(tl.bfloat16)
        rt = tl.trans(right)
        Akk = tl.dot(tl.where(rsel, kL, 0.).to(kL.dtype), rt, Akk, input_precision=PREC)
        Aqk = tl.dot(tl.where(rsel, qL, 0.).to(qL.dtype), rt, Aqk, input_precision=PREC)
    return Akk, Aqk


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


@triton.jit
def _slow_A(kt, qt, G, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Exact Akk, Aqk (unmasked, unscaled) for any gate: off-diagonal blocks with both factors <= 1,
    diagonal blocks by an explicit loop over the 16 columns (every exponent <= 0)."""
    NEG_INF: tl.constexpr = float("-inf")
    i4 = tl.arange(0, 4)
    r16 = tl.arange(0, 16)
    G3, E, Ep, k3, q3, eL3, eR3 = _slow_tiles(kt, qt, G, BK)
    kL3 = k3 * eL3
    qL3 = q3 * eL3
    kR3 = k3 * eR3
    AkkO = tl.zeros([C, C], tl.float32)
    AqkO = tl.zeros([C, C], tl.float32)
    for i in range(1, 4):
        Ep_i = tl.sum(tl.where(i4[:, None] == i, Ep, 0.), 0)
        Mi = tl.exp(tl.where(i4[:, None] < i, Ep_i[None, :] - E, NEG_INF))
        right = tl.reshape(kR3 * Mi[:, None, :], (C, BK))
        sel = i4[:, None, None] == i
        lk = tl.reshape(tl.where(sel, kL3, 0.), (C, BK))
        lq = tl.reshape(tl.where(sel, qL3, 0.), (C, BK))
        AkkO += tl.dot(lk, tl.trans(right), input_precision=PREC)
        AqkO += tl.dot(lq, tl.trans(right), input_precision=PREC)
    AkkD = tl.zeros([4, 16, 16], tl.float32)
    AqkD = tl.zeros([4, 16, 16], tl.float32)
    for cc in range(0, 16):
        sel_c = r16[None, :, None] == cc
        kc = tl.sum(tl.where(sel_c, k3, 0.), 1)
        Gc = tl.sum(tl.where(sel_c, G3, 0.), 1)
        ex = tl.exp(tl.where(r16[None, :, None] >= cc, G3 - Gc[:, None, :], NEG_INF))
        p = kc[:, None, :] * ex
        AkkD += tl.where(r16[None, None, :] == cc, tl.sum(k3 * p, 2)[:, :, None], 0.)
        AqkD += tl.where(r16[None, None, :] == cc, tl.sum(q3 * p, 2)[:, :, None], 0.)
    return AkkO + _blockdiag_to_2d(AkkD, C), AqkO + _blockdiag_to_2d(AqkD, C)


@triton.jit
def _kda_intra_kernel(q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags,
                      cu, cseq, cidx, T, TT, NS, scale, span_max,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                      IS_VARLEN: tl.constexpr, A_LOWP: tl.constexpr, PREC: tl.constexpr,
                      STORE_T: tl.constexpr, SLOW: tl.constexpr, PREFETCH: tl.constexpr,
                      GROUP: tl.constexpr, WU: tl.constexpr, INV_LOWP_LEVELS: tl.constexpr):
    """Fast launch (SLOW=False): grid (NS, HV), one chunk slot per program. SLOW relaunch: grid
    (cdiv(NS, GROUP), HV); a program reads the flags of its GROUP slots at once and recomputes the flagged
    ones (usually none: a program per slot cost one dependent flag load per slot and head)."""
    hv = tl.program_id(1)
    if SLOW:
        s0 = tl.program_id(0) * GROUP
        sg = s0 + tl.arange(0, GROUP)
        fl = tl.load(flags + hv.to(tl.int64) * NS + sg, mask=sg < NS, other=0)
        if tl.max(fl, 0) != 0:
            for i in range(GROUP):
                if s0 + i < NS:
                    if tl.load(flags + hv.to(tl.int64) * NS + s0 + i) != 0:
                        _intra_chunk(s0 + i, hv, q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags,
                                     cu, cseq, cidx, T, TT, NS, scale, span_max, H, HV, K, V, BK, BV, C,
                                     IS_VARLEN, A_LOWP, PREC, STORE_T, SLOW, PREFETCH, WU, INV_LOWP_LEVELS)
    else:
        _intra_chunk(tl.program_id(0), hv, q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags,
                     cu, cseq, cidx, T, TT, NS, scale, span_max, H, HV, K, V, BK, BV, C,
                     IS_VARLEN, A_LOWP, PREC, STORE_T, SLOW, PREFETCH, WU, INV_LOWP_LEVELS)


@triton.jit
def _intra_chunk(s, hv, q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags,
                 cu, cseq, cidx, T, TT, NS, scale, span_max,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                 IS_VARLEN: tl.constexpr, A_LOWP: tl.constexpr, PREC: tl.constexpr,
                 STORE_T: tl.constexpr, SLOW: tl.constexpr, PREFETCH: tl.constexpr, WU: tl.constexpr,
                 INV_LOWP_LEVELS: tl.constexpr):
    """One chunk slot s of value head hv (the fast path flags the chunk and stops where a 16-block's gate
    span exceeds span_max). WU: w = T (beta k e^G) and u = T (beta v) formed here (two loops after the
    inverse). Otherwise (the TX form) w's buffer gets k e^G in the first loop, tinv gets T, bsc gets beta per
    chunk slot, and the pass forms U = T diag(beta) (v - k e^G h) itself."""
    hq = hv // (HV // H)
    hv64 = hv.to(tl.int64)
    slot = s.to(tl.int64)
    bos, eos, c = _seq_bounds(s, cu, cseq, cidx, T, C, IS_VARLEN)
    r = tl.arange(0, C)
    tok = bos + c * C + r
    rmask = tok < eos

    b = tl.load(beta + tok * HV + hv, mask=rmask, other=0.).to(tl.float32)

    Akk = tl.zeros([C, C], tl.float32)
    Aqk = tl.zeros([C, C], tl.float32)
    span = tl.zeros([1], tl.float32)
    kp = k + (tok[:, None] * H + hq) * K
    qp = q + (tok[:, None] * H + hq) * K
    gp = g + (tok[:, None] * HV + hv) * K
    if PREFETCH:  # loads of key block kb + 1 are in flight while block kb is computed
        c0 = tl.arange(0, BK)
        m0 = rmask[:, None] & (c0 < K)[None, :]
        kn = tl.load(kp + c0[None, :], mask=m0, other=0.)
        qn = tl.load(qp + c0[None, :], mask=m0, other=0.)
        gn = tl.load(gp + c0[None, :], mask=m0, other=0.)
    for kb in range(0, (K + BK - 1) // BK):
        cols, cmask, m2 = _key_block(kb, rmask, K, BK)
        if PREFETCH:
            kt = kn.to(tl.float32)
            qt = qn.to(tl.float32)
            gt = gn.to(tl.float32)
            cn = cols + BK  # past K after the last block: all masked off, no traffic
            if PREFETCH == 2 and WU:  # ... except that the last block loads k, g block 0 again: the w loop's tiles
                cn = cn % (((K + BK - 1) // BK) * BK)
            mn = rmask[:, None] & (cn < K)[None, :]
            kn = tl.load(kp + cn[None, :], mask=mn, other=0.)
            qn = tl.load(qp + cn[None, :], mask=mn & ((cols + BK) < K)[None, :], other=0.)  # no q in the w loop
            gn = tl.load(gp + cn[None, :], mask=mn, other=0.)
        else:
            kt = tl.load(kp + cols[None, :], mask=m2, other=0.).to(tl.float32)
            qt = tl.load(qp + cols[None, :], mask=m2, other=0.).to(tl.float32)
            gt = tl.load(gp + cols[None, :], mask=m2, other=0.).to(tl.float32)
        G = tl.cumsum(gt, 0)
        Gl = tl.sum(gt, 0)
        eG = tl.exp(G)
        # qg, kg, gam need no T: stored here, while q, k and G are in registers
        rowK = (hv64 * TT + tok) * K
        tl.store(qg + rowK[:, None] + cols[None, :], (qt * eG * scale).to(qg.dtype.element_ty), mask=m2)
        tl.store(gam + (hv64 * NS + slot) * K + cols, tl.exp(Gl), mask=cmask & (eos > bos))
        if not WU:
            tl.store(w + rowK[:, None] + cols[None, :], (kt * eG).to(w.dtype.element_ty), mask=m2)
        kgp = kg + rowK[:, None] + cols[None, :]
        if SLOW:
            tl.store(kgp, (kt * tl.exp(Gl[None, :] - G)).to(kg.dtype.element_ty), mask=m2)
            a1, a2 = _slow_A(kt, qt, G, C, BK, PREC)
            Akk += a1
            Aqk += a2
        elif tl.max(-Gl, 0) <= span_max:
            # k e^-G <= e^span_max here, so kg = (k e^-G) e^Gl needs no exponential of its own (-3.5 %, session 10)
            right = kt * tl.exp(-G)
            tl.store(kgp, (right * tl.exp(Gl)[None, :]).to(kg.dtype.element_ty), mask=m2)
            Akk, Aqk = _chunk_A(kt, qt, eG, right, Akk, Aqk, A_LOWP, PREC)
        else:
            tl.store(kgp, (kt * tl.exp(Gl[None, :] - G)).to(kg.dtype.element_ty), mask=m2)
            # some column of this key block decays by more than span_max over the chunk:
            # anchor every 16-block (and flag the chunk for the slow path if a block alone does)
            E0, E1, E2, E3 = _block_ends(G, C)
            Akk, Aqk = _fast_A(kt, qt, G, E0, E1, E2, Akk, Aqk, C, BK, A_LOWP, PREC)
            sp = tl.maximum(tl.maximum(-E0, E0 - E1), tl.maximum(E1 - E2, E2 - E3))
            span = tl.maximum(span, tl.max(sp, 0))
    if not SLOW:
        if tl.max(span, 0) > span_max:
            tl.store(flags + hv64 * NS + slot, 1)
            return

    Akk = tl.where(r[:, None] > r[None, :], Akk, 0.) * b[:, None]
    Aqk = tl.where(r[:, None] >= r[None, :], Aqk, 0.) * scale
    Tm = _unit_lower_inverse(Akk, C, PREC, INV_LOWP_LEVELS)

    rowC = (hv64 * TT + tok) * C
    cmC = rmask[:, None] & (r[None, :] < C)
    tl.store(aqk + rowC[:, None] + r[None, :], Aqk.to(aqk.dtype.element_ty), mask=cmC)
    if STORE_T:
        tl.store(tinv + rowC[:, None] + r[None, :], Tm, mask=cmC)
    if not WU:  # T (in the pass's dtype) and beta contiguous per chunk slot: the pass reads beta as one 256-byte
        # row (a strided 2-byte gather from beta itself was not pipelined and stalled each step: session 9)
        tl.store(tinv + rowC[:, None] + r[None, :], Tm.to(tinv.dtype.element_ty), mask=cmC)
        tl.store(bsc + (hv64 * NS + slot) * C + r, b)
    else:  # WU form: w = T (beta k e^G), u = T (beta v), key / value block by block
        if PREFETCH == 1:
            kn = tl.load(kp + c0[None, :], mask=m0, other=0.)
            gn = tl.load(gp + c0[None, :], mask=m0, other=0.)
        vp = v + (tok[:, None] * HV + hv) * V
        if PREFETCH == 2:  # the u loop's first tile, in flight during the w loop
            cv0 = tl.arange(0, BV)
            vn = tl.load(vp + cv0[None, :], mask=rmask[:, None] & (cv0 < V)[None, :], other=0.)
        for kb in range(0, (K + BK - 1) // BK):
            cols, cmask, m2 = _key_block(kb, rmask, K, BK)
            if PREFETCH:
                kt = kn.to(tl.float32)
                gt = gn.to(tl.float32)
                mn = rmask[:, None] & ((cols + BK) < K)[None, :]
                kn = tl.load(kp + (cols + BK)[None, :], mask=mn, other=0.)
                gn = tl.load(gp + (cols + BK)[None, :], mask=mn, other=0.)
            else:
                kt = tl.load(kp + cols[None, :], mask=m2, other=0.).to(tl.float32)
                gt = tl.load(gp + cols[None, :], mask=m2, other=0.).to(tl.float32)
            G = tl.cumsum(gt, 0)
            wt = tl.dot(Tm, kt * tl.exp(G) * b[:, None], input_precision=PREC)
            rowK = (hv64 * TT + tok) * K
            tl.store(w + rowK[:, None] + cols[None, :], wt.to(w.dtype.element_ty), mask=m2)

        if PREFETCH == 1:
            cv0 = tl.arange(0, BV)
            vn = tl.load(vp + cv0[None, :], mask=rmask[:, None] & (cv0 < V)[None, :], other=0.)
        for vb in range(0, (V + BV - 1) // BV):
            cv = vb * BV + tl.arange(0, BV)
            vm = rmask[:, None] & (cv < V)[None, :]
            if PREFETCH:
                vt = vn.to(tl.float32)
                vn = tl.load(vp + (cv + BV)[None, :], mask=rmask[:, None] & ((cv + BV) < V)[None, :], other=0.)
            else:
                vt = tl.load(vp + cv[None, :], mask=vm, other=0.).to(tl.float32)
            ut = tl.dot(Tm, vt * b[:, None], input_precision=PREC)
            tl.store(u + ((hv64 * TT + tok) * V)[:, None] + cv[None, :], ut.to(u.dtype.element_ty), mask=vm)


# ----------------------------------------------------------------------------------------------
# chunk-to-chunk pass
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kda_pass_kernel(w, u, tm, bsc, qg, kg, aqk, gam, o, h0, ht, hseg, hs, ubuf,
                     cu, cchunk, T, TT, NS, L,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NSEG: tl.constexpr,
                     IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr, STORE_O: tl.constexpr,
                     STORE_HT: tl.constexpr, STORE_H: tl.constexpr, STORE_U: tl.constexpr,
                     LOWP: tl.constexpr, PREC: tl.constexpr, TX: tl.constexpr):
    """TX=False: w, u are the intra kernel's T (beta k e^G) and T (beta v); U = u - w h. TX=True: w holds
    k e^G, u is the input v [B, T, HV, V], tm holds T [HV, TT, C] and bsc beta [HV, NS, C];
    U = T diag(beta) (v - k e^G h) (one dot more a step, two loops fewer in the intra kernel)."""
    pv = tl.program_id(0)
    pid = tl.program_id(1)
    nh = pid // NSEG
    sg = pid % NSEG
    n = nh // HV
    hv = nh % HV
    hv64 = hv.to(tl.int64)
    bos, eos, slot0 = _seq_span(n, cu, cchunk, T, C, IS_VARLEN)
    nt = tl.cdiv(eos - bos, C)
    c_lo = sg * L
    c_hi = tl.minimum(c_lo + L, nt)

    rk, km, cv, vm, hm, hoff = _state_tile(pv, K, V, BK, BV)
    if NSEG > 1:
        h = _load_state(hseg, nh * NSEG + sg, hoff, hm, True, K, V, BK, BV)
    else:
        h = _load_state(h0, nh, hoff, hm, USE_H0, K, V, BK, BV)
    r = tl.arange(0, C)
    # LOWP: bf16 dot operands (h, U rounded for the dots only; accumulation and h stay fp32)
    DT: tl.constexpr = tl.bfloat16 if LOWP else tl.float32
    for c in range(c_lo, c_hi):
        tok = bos + c * C + r
        rm = tok < eos
        rowK = (hv64 * TT + tok) * K
        mk = rm[:, None] & km[None, :]
        mv = rm[:, None] & vm[None, :]
        wt = tl.load(w + rowK[:, None] + rk[None, :], mask=mk, other=0.)
        kgt = tl.load(kg + rowK[:, None] + rk[None, :], mask=mk, other=0.)
        if TX:
            ut = tl.load(u + ((tok * HV + hv) * V)[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
            Tt = tl.load(tm + ((hv64 * TT + tok) * C)[:, None] + r[None, :],
                         mask=rm[:, None] & (r[None, :] < C), other=0.)
        else:
            ut = tl.load(u + ((hv64 * TT + tok) * V)[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
        gm = tl.load(gam + (hv64 * NS + slot0 + c) * K + rk, mask=km, other=0.)
        if STORE_H:
            tl.store(hs + ((hv64 * NS + slot0 + c) * K * V) + hoff, h, mask=hm)
        hd = h.to(DT)
        wt = wt.to(DT)
        kgt = kgt.to(DT)
        if TX:
            X = ut - tl.dot(wt, hd, input_precision=PREC)
            X = X * tl.load(bsc + (hv64 * NS + slot0 + c) * C + r)[:, None]
            U = tl.dot(Tt.to(DT), X.to(DT), input_precision=PREC)
        else:
            U = ut - tl.dot(wt, hd, input_precision=PREC)
        Ud = U.to(DT)
        if STORE_O:
            qgt = tl.load(qg + rowK[:, None] + rk[None, :], mask=mk, other=0.)
            At = tl.load(aqk + ((hv64 * TT + tok) * C)[:, None] + r[None, :],
                         mask=rm[:, None] & (r[None, :] < C), other=0.)
            qgt = qgt.to(DT)
            At = At.to(DT)
            ot = tl.dot(qgt, hd, input_precision=PREC) + tl.dot(At, Ud, input_precision=PREC)
            tl.store(o + ((tok * HV + hv) * V)[:, None] + cv[None, :], ot.to(o.dtype.element_ty), mask=mv)
        if STORE_U:
            tl.store(ubuf + ((hv64 * TT + tok) * V)[:, None] + cv[None, :], U, mask=mv)
        h = gm[:, None] * h + tl.dot(tl.trans(kgt), Ud, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + nh.to(tl.int64) * K * V + hoff, h, mask=hm)


# ----------------------------------------------------------------------------------------------
# segment parallelism (long sequences, small batch)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kda_seg_state_kernel(w, u, kg, gam, mseg, bseg, T, TT, NS, L,
                          HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NSEG: tl.constexpr,
                          LOWP: tl.constexpr, PREC: tl.constexpr):
    """Per segment, from a zero state: columns [0, K) carry the transition matrix M (start: I,
    no u), columns [K, K+V) the local end state b. End state of the segment = M h_start + b."""
    pb = tl.program_id(0)
    pid = tl.program_id(1)
    nh = pid // NSEG
    sg = pid % NSEG
    n = nh // HV
    hv = nh % HV
    hv64 = hv.to(tl.int64)
    NKB: tl.constexpr = (K + BV - 1) // BV
    bos = n.to(tl.int64) * T
    eos = bos + T
    slot0 = n.to(tl.int64) * tl.cdiv(T, C)
    nt = tl.cdiv(T, C)
    c_lo = sg * L
    c_hi = tl.minimum(c_lo + L, nt)
    is_m = pb < NKB
    rk = tl.arange(0, BK)
    km = rk < K
    col = tl.where(is_m, pb, pb - NKB) * BV + tl.arange(0, BV)
    colm = col < tl.where(is_m, K, V)
    X = tl.where((rk[:, None] == col[None, :]) & is_m, 1., 0.) + tl.zeros([BK, BV], tl.float32)
    r = tl.arange(0, C)
    DT: tl.constexpr = tl.bfloat16 if LOWP else tl.float32  # dot operands, as in _kda_pass_kernel
    for c in range(c_lo, c_hi):
        tok = bos + c * C + r
        rm = tok < eos
        rowK = (hv64 * TT + tok) * K
        mk = rm[:, None] & km[None, :]
        wt = tl.load(w + rowK[:, None] + rk[None, :], mask=mk, other=0.)
        kgt = tl.load(kg + rowK[:, None] + rk[None, :], mask=mk, other=0.)
        ut = tl.load(u + ((hv64 * TT + tok) * V)[:, None] + col[None, :],
                     mask=rm[:, None] & colm[None, :] & (pb >= NKB), other=0.).to(tl.float32)
        gm = tl.load(gam + (hv64 * NS + slot0 + c) * K + rk, mask=km, other=0.)
        U = ut - tl.dot(wt.to(DT), X.to(DT), input_precision=PREC)
        X = gm[:, None] * X + tl.dot(tl.trans(kgt.to(DT)), U.to(DT), input_precision=PREC)
    base = (nh * NSEG + sg).to(tl.int64)
    sm = km[:, None] & colm[None, :]
    tl.store(mseg + base * K * K + rk[:, None] * K + col[None, :], X, mask=sm & is_m)
    tl.store(bseg + base * K * V + rk[:, None] * V + col[None, :], X, mask=sm & (pb >= NKB))


@triton.jit
def _kda_seg_combine_kernel(mseg, bseg, h0, ht, hseg,
                            K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            NSEG: tl.constexpr, USE_H0: tl.constexpr, PREC: tl.constexpr):
    pv = tl.program_id(0)
    nh = tl.program_id(1)
    rk, km, cv, vm, hm, hoff = _state_tile(pv, K, V, BK, BV)
    h = _load_state(h0, nh, hoff, hm, USE_H0, K, V, BK, BV)
    for sg in range(0, NSEG):
        base = (nh * NSEG + sg).to(tl.int64)
        tl.store(hseg + base * K * V + hoff, h, mask=hm)
        M = tl.load(mseg + base * K * K + rk[:, None] * K + rk[None, :],
                    mask=km[:, None] & km[None, :], other=0.)
        bb = tl.load(bseg + base * K * V + hoff, mask=hm, other=0.)
        h = tl.dot(M, h, input_precision=PREC) + bb
    tl.store(ht + nh.to(tl.int64) * K * V + hoff, h, mask=hm)


# ----------------------------------------------------------------------------------------------
# token-loop kernel (decode, very short T)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kda_recurrent_kernel(q, k, v, g, beta, o, h0, ht, cu, T, scale,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr,
                          IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr):
    pv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // HV
    hv = nh % HV
    hq = hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu + n).to(tl.int64)
        eos = tl.load(cu + n + 1).to(tl.int64)
    else:
        bos = n.to(tl.int64) * T
        eos = bos + T
    rk = tl.arange(0, BK)
    km = rk < K
    cv = pv * BV + tl.arange(0, BV)
    vm = cv < V
    hm = km[:, None] & vm[None, :]
    # one int64 offset for the load and the store (written out, not _state_tile: keeps the measured
    # decode kernel's address arithmetic as it was)
    hoff = nh.to(tl.int64) * K * V + rk[:, None] * V + cv[None, :]
    if USE_H0:
        h = tl.load(h0 + hoff, mask=hm, other=0.)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    for t in range(bos, eos):
        qt = tl.load(q + (t * H + hq) * K + rk, mask=km, other=0.).to(tl.float32)
        kt = tl.load(k + (t * H + hq) * K + rk, mask=km, other=0.).to(tl.float32)
        gt = tl.load(g + (t * HV + hv) * K + rk, mask=km, other=0.).to(tl.float32)
        bt = tl.load(beta + t * HV + hv).to(tl.float32)
        vt = tl.load(v + (t * HV + hv) * V + cv, mask=vm, other=0.).to(tl.float32)
        h = h * tl.exp(gt)[:, None]
        kv = tl.sum(h * kt[:, None], 0)
        uu = bt * (vt - kv)
        h = h + kt[:, None] * uu[None, :]
        ot = tl.sum(h * qt[:, None], 0) * scale
        tl.store(o + (t * HV + hv) * V + cv, ot.to(o.dtype.element_ty), mask=vm)
    tl.store(ht + hoff, h, mask=hm)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _modes(q, k, v):
    """(fp32 mode, bf16 mode): fp32 if any of q, k, v is float32; bf16 if all three are bf16."""
    fp32 = torch.float32 in (q.dtype, k.dtype, v.dtype) or torch.float64 in (q.dtype, k.dtype, v.dtype)
    bf16 = q.dtype == k.dtype == v.dtype == torch.bfloat16
    return fp32, bf16


def _chunk_table(cu_seqlens, TT):
    """Varlen chunk slots, computed on device (no host sync). Returns (cseq, cidx, cchunk, NS):
    slot -> sequence (-1 if unused) and chunk index; cchunk[n] = first slot of sequence n."""
    N = cu_seqlens.numel() - 1
    NS = TT // CHUNK + N
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    nchunks = (lens + CHUNK - 1) // CHUNK
    cchunk = torch.zeros(N + 1, dtype=torch.int64, device=cu_seqlens.device)
    cchunk[1:] = torch.cumsum(nchunks, 0)
    slots = torch.arange(NS, dtype=torch.int64, device=cu_seqlens.device)
    seq = torch.searchsorted(cchunk, slots, right=True) - 1
    valid = slots < cchunk[N]
    seq_c = seq.clamp(0, N - 1)
    cidx = (slots - cchunk[seq_c]).to(torch.int32)
    cseq = torch.where(valid, seq_c, torch.full_like(seq_c, -1)).to(torch.int32)
    return cseq, cidx, cchunk, NS


def _slow_group(NS, HV):
    """Chunk slots per program of the SLOW relaunch (a power of two): up to intra_slow_group, keeping at least
    intra_slow_min_programs programs so that a launch where every chunk is flagged (g near -20 per step) still
    fills the GPU."""
    fit = triton.next_power_of_2(NS * HV // _CFG["intra_slow_min_programs"] + 1) // 2
    return max(1, min(_CFG["intra_slow_group"], fit))


def _intermediates(q, k, v, g, beta, scale, cu_seqlens, *, store_dtype, a_lowp, prec, store_t, tx=False,
                   inv_lowp=0):
    """Run the intra-chunk kernel. Returns a dict of intermediates (head-major layouts). tx: the TX form
    (w holds k e^G, no u, T stored in store_dtype and beta per chunk slot in bsc for the pass; see
    _intra_chunk); store_t: T in float32 for the backward (WU form only); inv_lowp: how many levels of the
    inverse take bf16 operands (_unit_lower_inverse)."""
    assert not (tx and store_t), "the backward reads the WU form's w and u"
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    TT = B * T
    dev = q.device
    if cu_seqlens is not None:
        cseq, cidx, cchunk, NS = _chunk_table(cu_seqlens, TT)
    else:
        NS = B * triton.cdiv(T, CHUNK)
        cseq = cidx = cchunk = None
    w = torch.empty(HV, TT, K, device=dev, dtype=store_dtype)
    qg = torch.empty(HV, TT, K, device=dev, dtype=store_dtype)
    kg = torch.empty(HV, TT, K, device=dev, dtype=store_dtype)
    u = None if tx else torch.empty(HV, TT, V, device=dev, dtype=store_dtype)
    bsc = torch.empty(HV, NS, CHUNK, device=dev, dtype=torch.float32) if tx else None
    aqk = torch.empty(HV, TT, CHUNK, device=dev, dtype=store_dtype)
    gam = torch.empty(HV, NS, K, device=dev, dtype=torch.float32)
    tinv = torch.empty(HV, TT, CHUNK, device=dev, dtype=store_dtype if tx else torch.float32) \
        if (store_t or tx) else None
    flags = torch.zeros(HV, NS, device=dev, dtype=torch.int32)
    BK = min(_np2(K), _CFG["intra_bk"])
    BV = min(_np2(V), 64)
    dummy = cu_seqlens if cu_seqlens is not None else gam
    extra = {} if _CFG["intra_maxnreg"] is None else {"maxnreg": _CFG["intra_maxnreg"]}
    group = _slow_group(NS, HV)
    for slow in (False, True):
        _launch(_kda_intra_kernel, (triton.cdiv(NS, group) if slow else NS, HV),
                q, k, v, g, beta, w, u if u is not None else w, qg, kg, aqk, gam,
                tinv if tinv is not None else gam, bsc if bsc is not None else gam, flags,
                dummy, cseq if cseq is not None else dummy, cidx if cidx is not None else dummy,
                T, TT, NS, float(scale), float(_CFG["span_max"]),
                H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=CHUNK,
                IS_VARLEN=cu_seqlens is not None, A_LOWP=a_lowp, PREC=prec, STORE_T=store_t, SLOW=slow,
                PREFETCH=int(_CFG["intra_prefetch"]), GROUP=group if slow else 1, WU=not tx,
                INV_LOWP_LEVELS=inv_lowp,
                num_warps=_CFG["intra_warps"], num_stages=1, **({} if slow else extra))
    return dict(w=w, qg=qg, kg=kg, u=u, aqk=aqk, gam=gam, tinv=tinv, flags=flags, NS=NS, cchunk=cchunk,
                cseq=cseq, cidx=cidx, TT=TT, tx=tx, v=v, bsc=bsc)


def _num_segments(N, HV, V, T, K, varlen):
    if varlen or K > 128:
        return 1
    seg = _CFG["segments"]
    nt = triton.cdiv(T, CHUNK)
    if seg >= 0:
        return max(1, min(seg, nt))
    nv = triton.cdiv(V, _CFG["pass_bv"])
    progs = N * HV * nv
    want = triton.cdiv(_CFG["target_programs"], progs)
    return max(1, min(want, nt // _CFG["seg_min_chunks"]))


def fit_stages(stages: int, stage_bytes: int, device: torch.device, fixed_bytes: int = 16384) -> int:
    """The largest pipeline depth <= stages whose buffers (stage_bytes each, plus fixed_bytes for the kernel's
    other shared tiles) fit one block's shared memory on this device: the pass's three stages take ~190 KB,
    which H100 / H200 (227 KB) hold and an A100 (163 KB) does not. Host-side query, cached; no sync."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return stages
    limit = device_properties(device).shared_memory_per_block_optin
    while stages > 1 and stages * stage_bytes + fixed_bytes > limit:
        stages -= 1
    return stages


def _pass_forward(inter, initial_state, o, N, HV, H, K, V, T, cu_seqlens, *, lowp, prec,
                  store_o=True, hs=None, ubuf=None, nseg=1, bv=None, stages=None, warps=None):
    """bv / stages / warps: value block, pipeline depth and warps at K <= 128 (default: pass_bv, pass_warps,
    and pass_stages for 16-bit intermediates, one stage for float32 ones)."""
    dev = o.device if o is not None else inter["w"].device
    BK = _np2(K)
    es = inter["w"].element_size()
    warps = warps or _CFG["pass_warps"]
    if K <= 128:
        BV = min(bv or _CFG["pass_bv"], _np2(V))
        if stages is None:
            stages = _CFG["pass_stages"] if es == 2 else 1
        # per stage: w, kg [, qg, Aqk] and u (or v) tiles [, T]
        stage_bytes = es * (CHUNK * BK * (3 if store_o else 2) + (CHUNK * CHUNK if store_o else 0) + CHUNK * BV
                            + (CHUNK * CHUNK if inter["tx"] else 0))
        stages = fit_stages(stages, stage_bytes, dev)
    else:  # K = 256: keep the [C, K] tiles of one stage inside shared memory
        BV = min(64 if es == 2 else 32, _np2(V))
        warps = 8 if es == 2 else 4
        stages = 1
    assert not (inter["tx"] and nseg > 1), "segments read the WU form's u"
    ht = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32)
    NS, TT = inter["NS"], inter["TT"]
    dummy = inter["gam"]
    varlen = cu_seqlens is not None
    nt = triton.cdiv(T, CHUNK)
    L = nt
    hseg = None
    if nseg > 1:
        L = triton.cdiv(nt, nseg)
        nseg = triton.cdiv(nt, L)
    if nseg > 1:
        mseg = torch.empty(N * HV * nseg, K, K, device=dev, dtype=torch.float32)
        bseg = torch.empty(N * HV * nseg, K, V, device=dev, dtype=torch.float32)
        hseg = torch.empty(N * HV * nseg, K, V, device=dev, dtype=torch.float32)
        nb = triton.cdiv(K, BV) + triton.cdiv(V, BV)
        _launch(_kda_seg_state_kernel, (nb, N * HV * nseg),
                inter["w"], inter["u"], inter["kg"], inter["gam"], mseg, bseg, T, TT, NS, L,
                HV=HV, K=K, V=V, BK=BK, BV=BV, C=CHUNK, NSEG=nseg, LOWP=lowp, PREC=prec,
                num_warps=warps, num_stages=stages)
        _launch(_kda_seg_combine_kernel, (triton.cdiv(V, BV), N * HV),
                mseg, bseg, initial_state if initial_state is not None else dummy, ht, hseg,
                K=K, V=V, BK=BK, BV=BV, NSEG=nseg, USE_H0=initial_state is not None,
                PREC=prec if prec == "ieee" else "tf32", num_warps=8, num_stages=1)
    tx = inter["tx"]
    _launch(_kda_pass_kernel, (triton.cdiv(V, BV), N * HV * nseg),
            inter["w"], inter["v"] if tx else inter["u"], inter["tinv"] if tx else dummy,
            inter["bsc"] if tx else dummy,
            inter["qg"], inter["kg"], inter["aqk"], inter["gam"],
            o if o is not None else dummy,
            initial_state if initial_state is not None else dummy, ht,
            hseg if hseg is not None else dummy,
            hs if hs is not None else dummy, ubuf if ubuf is not None else dummy,
            cu_seqlens if varlen else dummy, inter["cchunk"] if varlen else dummy,
            T, TT, NS, L,
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=CHUNK, NSEG=nseg, IS_VARLEN=varlen,
            USE_H0=initial_state is not None, STORE_O=store_o, STORE_HT=nseg == 1,
            STORE_H=hs is not None, STORE_U=ubuf is not None, LOWP=lowp, PREC=prec, TX=tx,
            num_warps=warps, num_stages=stages)
    return ht


def kda_forward_recurrent(q, k, v, g, beta, initial_state, scale, cu_seqlens):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o = torch.empty_like(v)
    ht = torch.empty(N, HV, K, V, device=v.device, dtype=torch.float32)
    BK = _np2(K)
    BV = min(_CFG["decode_bv"], _np2(V))
    dummy = ht
    _launch(_kda_recurrent_kernel, (triton.cdiv(V, BV), N * HV),
            q, k, v, g, beta, o, initial_state if initial_state is not None else dummy, ht,
            cu_seqlens if cu_seqlens is not None else dummy, T, float(scale),
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, IS_VARLEN=cu_seqlens is not None,
            USE_H0=initial_state is not None, num_warps=_CFG["decode_warps"], num_stages=1)
    return o, ht


def kda_forward_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens, nseg=None):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    fp32, bf16 = _modes(q, k, v)
    if nseg is None:
        nseg = _num_segments(N, HV, V, T, K, cu_seqlens is not None)
    tx = _CFG["intra_form"] == "tx" and nseg == 1
    inter = forward_intermediates(q, k, v, g, beta, scale, cu_seqlens, tx)
    o = torch.empty_like(v)
    ht = _pass_forward(inter, initial_state, o, N, HV, H, K, V, T, cu_seqlens,
                       lowp=bf16 and _CFG["pass_lowp"], prec="ieee" if fp32 else "tf32", nseg=nseg)
    return o, ht


def forward_intermediates(q, k, v, g, beta, scale, cu_seqlens, tx):
    """The forward's intra stage (_intermediates), its dtypes and precisions chosen from the inputs' dtypes."""
    fp32, bf16 = _modes(q, k, v)
    store_dtype = torch.bfloat16 if (bf16 and _CFG["store_lowp"]) else torch.float32
    return _intermediates(q, k, v, g, beta, scale, cu_seqlens, store_dtype=store_dtype,
                          a_lowp=bf16 and _CFG["a_lowp"], prec="ieee" if fp32 else "tf32", store_t=False, tx=tx,
                          inv_lowp=forward_inverse_lowp(tx, bf16))


def forward_inverse_lowp(tx: bool, bf16: bool) -> int:
    """How many levels of the forward's inverse take bf16 operands: inv_lowp for bf16 inputs in the TX form (which
    hands T to the pass in bf16); none in the WU form (segments, the backward's recompute with T in fp32)."""
    return int(_CFG["inv_lowp"]) if (tx and bf16) else 0


def _prep(q, k, v, g, beta, initial_state):
    q = q.contiguous()
    k = k.contiguous()
    v = v.contiguous()
    g = g.contiguous()
    beta = beta.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
        if initial_state.dtype != torch.float32:
            initial_state = initial_state.float()
    return q, k, v, g, beta, initial_state


def use_recurrent(B, T, N, varlen):
    if varlen:
        return B * T <= _CFG["recurrent_max_t"] * N
    return T <= _CFG["recurrent_max_t"]


def kda_forward(q, k, v, g, beta, initial_state, scale, cu_seqlens):
    """CUDA (Triton) forward of kimi::kda. See module docstring for shapes; no host syncs."""
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        # float64 stays exact: the kernels compute in float32 at most.
        from .kda import kda_reference_chunked
        return kda_reference_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    q, k, v, g, beta, initial_state = _prep(q, k, v, g, beta, initial_state)
    B, T = q.shape[0], q.shape[1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if use_recurrent(B, T, N, cu_seqlens is not None):
        return kda_forward_recurrent(q, k, v, g, beta, initial_state, scale, cu_seqlens)
    return kda_forward_chunked(q, k, v, g, beta, initial_state, scale, cu_seqlens)
