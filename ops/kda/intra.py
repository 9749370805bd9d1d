"""Stage 1 of the chunked KDA forward (and of the backward's recompute): the intra-chunk kernel.

Parallel over chunk slots x value heads. Per chunk of KERNEL_CHUNK = 64 tokens (sub-blocks of 16): the
in-chunk gate cumsum G (fp32); Akk = beta * (k e^G)(k e^-G)^T (strictly lower) and Aqk = scale * (q e^G)(k e^-G)^T
(lower), per key block, with exponents that cannot overflow: when the block's whole-chunk decay is <= span_max,
one anchor at the chunk start (left <= |x|, right <= e^span_max: two dots); otherwise anchors at the 16-block
boundaries (left <= |x|, right <= e^span of a 16-block), and a chunk where one 16-block alone decays by more
than span_max is recomputed exactly by the SLOW relaunch (per-column loop on the diagonal blocks; each of its
programs checks the flags of up to intra_slow_group chunk slots with one load).
T = (I + Akk)^-1 by block doubling; qg = scale q e^G, kg = k e^(G_last - G), gam = e^G_last.

Two output forms: TX (the forward's default) stores T, beta and k e^G and lets the pass form
U = T diag(beta) (v - k e^G h): one loop over key blocks plus the inverse. WU (the backward's recompute) also forms
w = T (beta k e^G) and u = T (beta v) in two more loops. Each loop issues the next block's loads before computing
the current one (PREFETCH: global-load waits were the largest stall in ncu), and with PREFETCH=2 the w and u
loops' first tiles load during the inverse and the w loop. docs/kda_kernels.md has the derivation and the numbers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (KERNEL_CHUNK, _anchor_rows, _block_ends, _block_mult, _blockdiag_to_2d, _finite,
                     _first_bad_row, _floor_gate, _gate_ok, _key_block, _launch, _modes, _np2, _seq_bounds,
                     _slow_tiles)
from .tuning import current_tuning


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
    to the pass in bf16 anyway (docs/kda_kernels.md has the error it adds)."""
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
def _kda_intra_kernel(q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags, poison,
                      cu, cseq, cidx, T, TT, NS, scale, span_max,
                      H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                      IS_VARLEN: tl.constexpr, A_LOWP: tl.constexpr, PREC: tl.constexpr,
                      STORE_T: tl.constexpr, SLOW: tl.constexpr, PREFETCH: tl.constexpr,
                      GROUP: tl.constexpr, WU: tl.constexpr, INV_LOWP_LEVELS: tl.constexpr,
                      NONFINITE: tl.constexpr):
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
                                     poison, cu, cseq, cidx, T, TT, NS, scale, span_max, H, HV, K, V, BK, BV, C,
                                     IS_VARLEN, A_LOWP, PREC, STORE_T, SLOW, PREFETCH, WU, INV_LOWP_LEVELS,
                                     NONFINITE)
    else:
        _intra_chunk(tl.program_id(0), hv, q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags, poison,
                     cu, cseq, cidx, T, TT, NS, scale, span_max, H, HV, K, V, BK, BV, C,
                     IS_VARLEN, A_LOWP, PREC, STORE_T, SLOW, PREFETCH, WU, INV_LOWP_LEVELS, NONFINITE)


@triton.jit
def _intra_chunk(s, hv, q, k, v, g, beta, w, u, qg, kg, aqk, gam, tinv, bsc, flags, poison,
                 cu, cseq, cidx, T, TT, NS, scale, span_max,
                 H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                 IS_VARLEN: tl.constexpr, A_LOWP: tl.constexpr, PREC: tl.constexpr,
                 STORE_T: tl.constexpr, SLOW: tl.constexpr, PREFETCH: tl.constexpr, WU: tl.constexpr,
                 INV_LOWP_LEVELS: tl.constexpr, NONFINITE: tl.constexpr):
    """One chunk slot s of value head hv (the fast path flags the chunk and stops where a 16-block's gate
    span exceeds span_max). NONFINITE (the default): k, g, beta (and v in the WU form) are made finite (NaN / inf -> 0, g below
    GATE_FLOOR -> GATE_FLOOR), so that no product reaches across rows with a NaN, and poison[hv, slot] gets the first
    row where one was not (NaN / +inf for g), or C; the pass turns that row's outputs and all later ones into NaN.
    q needs neither: it only ever multiplies from the left, so a NaN in q_t reaches o_t alone, as in the recurrence. WU: w = T (beta k e^G) and u = T (beta v) formed here (two loops after the
    inverse). Otherwise (the TX form) w's buffer gets k e^G in the first loop, tinv gets T, bsc gets beta per
    chunk slot, and the pass forms U = T diag(beta) (v - k e^G h) itself."""
    hq = hv // (HV // H)
    hv64 = hv.to(tl.int64)
    slot = s.to(tl.int64)
    bos, eos, c = _seq_bounds(s, cu, cseq, cidx, T, C, IS_VARLEN)
    r = tl.arange(0, C)
    tok = bos + c * C + r
    rmask = tok < eos

    # the TX form reads v in the pass; its rows are checked here, before the A tiles take their registers (in
    # the pass, latency-bound per chunk step, a reduction a step cost ~20 % of the forward), with the first
    # VCHK columns loaded at once, in flight together with beta and the first key block (checking in four
    # dependent 32-column loads cost the intra kernel +53 % at T=16384)
    VCHK: tl.constexpr = 128
    CHECK_V: tl.constexpr = NONFINITE and not WU
    vrow = v + (tok[:, None] * HV + hv) * V
    if CHECK_V:
        cv = tl.arange(0, VCHK)
        v0 = tl.load(vrow + cv[None, :], mask=rmask[:, None] & (cv < V)[None, :], other=0.)
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
    if NONFINITE:
        first_bad = tl.min(tl.where(_finite(b), C, r), 0)
        b = tl.where(_finite(b), b, 0.)
    if CHECK_V:
        first_bad = tl.minimum(first_bad, _first_bad_row(_finite(v0.to(tl.float32)), C))
        for vb in range(1, (V + VCHK - 1) // VCHK):  # V > 128 only
            cv = vb * VCHK + tl.arange(0, VCHK)
            vt = tl.load(vrow + cv[None, :], mask=rmask[:, None] & (cv < V)[None, :], other=0.).to(tl.float32)
            first_bad = tl.minimum(first_bad, _first_bad_row(_finite(vt), C))
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
        if NONFINITE:
            ok_k = _finite(kt)
            ok_g = _gate_ok(gt)
            first_bad = tl.minimum(first_bad, _first_bad_row(ok_k & ok_g, C))
            kt = tl.where(ok_k, kt, 0.)
            gt = tl.where(ok_g, _floor_gate(gt), 0.)
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
            # k e^-G <= e^span_max here, so kg = (k e^-G) e^Gl needs no exponential of its own (-3.5 %)
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
    if NONFINITE and not WU:
        tl.store(poison + hv64 * NS + slot, first_bad)
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
        # row (a strided 2-byte gather from beta itself was not pipelined and stalled each step)
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
            if NONFINITE:
                kt = tl.where(_finite(kt), kt, 0.)
                gt = tl.where(_gate_ok(gt), _floor_gate(gt), 0.)
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
            if NONFINITE:
                first_bad = tl.minimum(first_bad, _first_bad_row(_finite(vt), C))
                vt = tl.where(_finite(vt), vt, 0.)
            ut = tl.dot(Tm, vt * b[:, None], input_precision=PREC)
            tl.store(u + ((hv64 * TT + tok) * V)[:, None] + cv[None, :], ut.to(u.dtype.element_ty), mask=vm)
        if NONFINITE:
            tl.store(poison + hv64 * NS + slot, first_bad)


def chunk_table(cu_seqlens, TT):
    """Varlen chunk slots, computed on device (no host sync). Returns (cseq, cidx, cchunk, NS):
    slot -> sequence (-1 if unused) and chunk index; cchunk[n] = first slot of sequence n."""
    N = cu_seqlens.numel() - 1
    NS = TT // KERNEL_CHUNK + N
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    nchunks = (lens + KERNEL_CHUNK - 1) // KERNEL_CHUNK
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
    cfg = current_tuning()
    fit = triton.next_power_of_2(NS * HV // cfg.intra_slow_min_programs + 1) // 2
    return max(1, min(cfg.intra_slow_group, fit))


def intra_intermediates(q, k, v, g, beta, scale, cu_seqlens, *, store_dtype, a_lowp, prec, store_t, tx=False,
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
    cfg = current_tuning()
    if cu_seqlens is not None:
        cseq, cidx, cchunk, NS = chunk_table(cu_seqlens, TT)
    else:
        NS = B * triton.cdiv(T, KERNEL_CHUNK)
        cseq = cidx = cchunk = None
    w = torch.empty(HV, TT, K, device=dev, dtype=store_dtype)
    qg = torch.empty(HV, TT, K, device=dev, dtype=store_dtype)
    kg = torch.empty(HV, TT, K, device=dev, dtype=store_dtype)
    u = None if tx else torch.empty(HV, TT, V, device=dev, dtype=store_dtype)
    bsc = torch.empty(HV, NS, KERNEL_CHUNK, device=dev, dtype=torch.float32) if tx else None
    aqk = torch.empty(HV, TT, KERNEL_CHUNK, device=dev, dtype=store_dtype)
    gam = torch.empty(HV, NS, K, device=dev, dtype=torch.float32)
    tinv = torch.empty(HV, TT, KERNEL_CHUNK, device=dev, dtype=store_dtype if tx else torch.float32) \
        if (store_t or tx) else None
    flags = torch.zeros(HV, NS, device=dev, dtype=torch.int32)
    # first non-finite row per chunk slot (C if none), for the pass
    poison = torch.empty(HV, NS, device=dev, dtype=torch.int32) if cfg.nonfinite else None
    BK = min(_np2(K), cfg.intra_bk)
    BV = min(_np2(V), 64)
    dummy = cu_seqlens if cu_seqlens is not None else gam
    extra = {} if cfg.intra_maxnreg is None else {"maxnreg": cfg.intra_maxnreg}
    group = _slow_group(NS, HV)
    for slow in (False, True):
        _launch(_kda_intra_kernel, (triton.cdiv(NS, group) if slow else NS, HV),
                q, k, v, g, beta, w, u if u is not None else w, qg, kg, aqk, gam,
                tinv if tinv is not None else gam, bsc if bsc is not None else gam, flags,
                poison if poison is not None else flags, dummy, cseq if cseq is not None else dummy, cidx if cidx is not None else dummy,
                T, TT, NS, float(scale), float(cfg.span_max),
                H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=KERNEL_CHUNK,
                IS_VARLEN=cu_seqlens is not None, A_LOWP=a_lowp, PREC=prec, STORE_T=store_t, SLOW=slow,
                PREFETCH=int(cfg.intra_prefetch), GROUP=group if slow else 1, WU=not tx,
                INV_LOWP_LEVELS=inv_lowp, NONFINITE=cfg.nonfinite,
                num_warps=cfg.intra_warps, num_stages=1, **({} if slow else extra))
    return dict(w=w, qg=qg, kg=kg, u=u, aqk=aqk, gam=gam, tinv=tinv, flags=flags, poison=poison, NS=NS, cchunk=cchunk,
                cseq=cseq, cidx=cidx, TT=TT, tx=tx, v=v, bsc=bsc)


def forward_intermediates(q, k, v, g, beta, scale, cu_seqlens, tx):
    """The forward's intra stage (intra_intermediates), its dtypes and precisions chosen from the inputs' dtypes."""
    cfg = current_tuning()
    fp32, bf16 = _modes(q, k, v)
    store_dtype = torch.bfloat16 if (bf16 and cfg.store_lowp) else torch.float32
    return intra_intermediates(q, k, v, g, beta, scale, cu_seqlens, store_dtype=store_dtype,
                               a_lowp=bf16 and cfg.a_lowp, prec="ieee" if fp32 else "tf32", store_t=False, tx=tx,
                               inv_lowp=forward_inverse_lowp(tx, bf16))


def forward_inverse_lowp(tx: bool, bf16: bool) -> int:
    """How many levels of the forward's inverse take bf16 operands: inv_lowp for bf16 inputs in the TX form (which
    hands T to the pass in bf16); none in the WU form (the backward's recompute, with T in fp32)."""
    return int(current_tuning().inv_lowp) if (tx and bf16) else 0

