"""The chunked KDA backward in Triton: gradients of kimi::kda for (q, k, v, g, beta, initial_state).

    kda_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dfinal_state)
        -> (dq, dk, dv, dg, dbeta, dinitial_state or None)

For float16 / bfloat16 / float32 inputs; the registration (ops/kda/__init__.py) sends float64, and float32 /
float16 at K > 128 (their float32 [C, K] tiles do not fit the reverse pass's shared memory), to the reference.

Stages (per chunk of KERNEL_CHUNK tokens; docs/kda_kernels.md has the derivation):

1. the intra kernel (WU form) recomputes w, u, qg, kg, Aqk, gam and stores T = (I+Akk)^-1 (float32);
   w, u, qg, kg, Aqk are bf16 for bf16 inputs (float32 otherwise), as in the forward.
2. the forward pass recomputes the chunk-start states h_c and U = u - w h_c (stored: bf16 for bf16 inputs at
   K <= 128, else float32; the state itself is carried in float32).
3. ``_kda_pass_bwd_kernel`` runs the chunks in reverse: stores dh'_c (gradient of the chunk-end state),
   dU = Aqk^T dO + kg dh'_c, and dh_c = qg^T dO + gam dh'_c - w^T dU; the last one is dinitial_state
   (dh carried in float32, stored like h).
4. ``_kda_chunk_bwd_kernel`` (parallel over chunks x heads): dv, dbeta, dq, dk, dg from
   dAqk = dO U^T, dBv = T^T dU, dAkk = -dBv U^T, dBk = -dBv h^T = -T^T (dU h^T), dQg = dO h^T,
   dKg = U dh'^T, dgam = sum_v h * dh', through the same three exponent regimes as the forward (one
   anchor per key block when its chunk decay is <= span_max, 16-block anchors, the slow exact path).

Tuning (KDATuning bwd_*): the numbers behind each default are in docs/benchmarks.md and docs/kda_kernels.md
(e.g. bf16 intermediates and states: kda_backward at T=8192 5.33 -> 3.40 ms, gradient error vs float64
2.2e-3 -> 3.7e-3, bound 5e-3).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_pass import fit_stages, pass_forward
from .common import (KERNEL_CHUNK, _anchor_rows, _block_ends, _block_mult, _blockdiag_from_2d, _gate2d, _key_block,
                     _launch, _load_state, _modes, _np2, _seq_bounds, _seq_span, _slow_tiles, _state_tile)
from .forward import contiguous_inputs
from .intra import intra_intermediates
from .tuning import current_tuning


def triton_backward_supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether kda_backward handles these inputs: not float64 (kept exact by the reference), and at K > 128 only
    bf16 (float32 [C, K] tiles of kg, qg, w do not fit the reverse pass's shared memory)."""
    if torch.float64 in (q.dtype, v.dtype):
        return False
    return q.shape[-1] <= 128 or (q.dtype == v.dtype == torch.bfloat16)


@triton.jit
def _kda_pass_bwd_kernel(w, qg, kg, aqk, gam, do, dht, dh0, dhs, dubuf,
                         cu, cchunk, T, TT, NS,
                         H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                         IS_VARLEN: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                         LOWP: tl.constexpr, PREC: tl.constexpr):
    pv = tl.program_id(0)
    nh = tl.program_id(1)
    n = nh // HV
    hv = nh % HV
    hv64 = hv.to(tl.int64)
    bos, eos, slot0 = _seq_span(n, cu, cchunk, T, C, IS_VARLEN)
    nt = tl.cdiv(eos - bos, C)
    rk, km, cv, vm, hm, hoff = _state_tile(pv, K, V, BK, BV)
    dh = _load_state(dht, nh, hoff, hm, USE_DHT, K, V, BK, BV)
    r = tl.arange(0, C)
    # LOWP: bf16 dot operands (dh, dU rounded for the dots only; accumulation and dh stay fp32)
    DT: tl.constexpr = tl.bfloat16 if LOWP else tl.float32
    for i in range(0, nt):
        c = nt - 1 - i
        tok = bos + c * C + r
        rm = tok < eos
        slot = slot0 + c
        tl.store(dhs + (hv64 * NS + slot) * K * V + hoff, dh, mask=hm)
        rowK = (hv64 * TT + tok) * K
        mk = rm[:, None] & km[None, :]
        mv = rm[:, None] & vm[None, :]
        dO = tl.load(do + ((tok * HV + hv) * V)[:, None] + cv[None, :], mask=mv, other=0.).to(DT)
        At = tl.load(aqk + ((hv64 * TT + tok) * C)[:, None] + r[None, :],
                     mask=rm[:, None] & (r[None, :] < C), other=0.).to(DT)
        kgt = tl.load(kg + rowK[:, None] + rk[None, :], mask=mk, other=0.).to(DT)
        qgt = tl.load(qg + rowK[:, None] + rk[None, :], mask=mk, other=0.).to(DT)
        wt = tl.load(w + rowK[:, None] + rk[None, :], mask=mk, other=0.).to(DT)
        gm = tl.load(gam + (hv64 * NS + slot) * K + rk, mask=km, other=0.)
        dU = tl.dot(tl.trans(At), dO, input_precision=PREC) + tl.dot(kgt, dh.to(DT), input_precision=PREC)
        tl.store(dubuf + ((hv64 * TT + tok) * V)[:, None] + cv[None, :], dU, mask=mv)
        dh = gm[:, None] * dh + tl.dot(tl.trans(qgt), dO, input_precision=PREC) \
            - tl.dot(tl.trans(wt), dU.to(DT), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + nh.to(tl.int64) * K * V + hoff, dh, mask=hm)


@triton.jit
def _chunk_dA(kt, qt, G, dAq, dAk, dAqT, dAkbT, PREC: tl.constexpr):
    """Gradients through Aqk / Akk for one key block whose whole-chunk gate span is <= span_max: one
    anchor at the chunk start (the forward's _chunk_A): X = e^G (dA (k e^-G)), Y = e^-G (dA^T (x e^G)),
    every operand <= e^span_max. Returns XQ, XK, YQ, YK as _fast_dA."""
    eG = tl.exp(G)
    eGi = tl.exp(-G)
    kR = kt * eGi
    XQ = tl.dot(dAq, kR, input_precision=PREC) * eG
    XK = tl.dot(dAk, kR, input_precision=PREC) * eG
    YQ = tl.dot(dAqT, qt * eG, input_precision=PREC) * eGi
    YK = tl.dot(dAkbT, kt * eG, input_precision=PREC) * eGi
    return XQ, XK, YQ, YK


@triton.jit
def _fast_dA(kt, qt, G, E0, E1, E2, dAq, dAk, dAqT, dAkbT, C: tl.constexpr, BK: tl.constexpr,
             PREC: tl.constexpr):
    """Gradients through Aqk / Akk when every 16-block's gate span is <= span_max.
    Left role  X[t] = sum_s dA[t,s] k_s e^(G_t - G_s): rows of block i, anchor E[i-1].
    Right role Y[s] = sum_t dA[t,s] x_t e^(G_t - G_s): columns of block j, anchor E[j-1]
    (dAqT, dAkbT: the transposed dAq, dAk * beta, so column blocks are row blocks there).
    Returns XQ (dAq, left), XK (dAk, left), YQ (dAq, right, x = q), YK (dAkb, right, x = k)."""
    r = tl.arange(0, C)
    blk = r // 16
    Ep = _anchor_rows(blk, E0, E1, E2)
    eL = tl.exp(G - Ep)
    eLi = tl.exp(Ep - G)
    kLi = kt * eLi
    qL = qt * eL
    kL = kt * eL
    XQ = tl.zeros([C, BK], tl.float32)
    XK = tl.zeros([C, BK], tl.float32)
    YQ = tl.zeros([C, BK], tl.float32)
    YK = tl.zeros([C, BK], tl.float32)
    for i in range(0, 4):
        right = kLi * _block_mult(i, blk, E0, E1, E2, False)
        rsel = blk[:, None] == i
        XQ = tl.dot(tl.where(rsel, dAq, 0.), right, XQ, input_precision=PREC)
        XK = tl.dot(tl.where(rsel, dAk, 0.), right, XK, input_precision=PREC)
        lm = _block_mult(i, blk, E0, E1, E2, True)
        YQ = tl.dot(tl.where(rsel, dAqT, 0.), qL * lm, YQ, input_precision=PREC)
        YK = tl.dot(tl.where(rsel, dAkbT, 0.), kL * lm, YK, input_precision=PREC)
    return XQ * eL, XK * eL, YQ * eLi, YK * eLi


@triton.jit
def _slow_dA(kt, qt, G, dAq, dAk, dAkb, C: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Same as _fast_dA for any gate: off-diagonal blocks with both factors <= 1, diagonal blocks
    by an explicit loop over the 16 positions (every exponent <= 0)."""
    NEG_INF: tl.constexpr = float("-inf")
    r = tl.arange(0, C)
    blk = r // 16
    i4 = tl.arange(0, 4)
    r16 = tl.arange(0, 16)
    G3, E, Ep, k3, q3, eL3, eR3 = _slow_tiles(kt, qt, G, BK)
    accXQ = tl.zeros([C, BK], tl.float32)
    accXK = tl.zeros([C, BK], tl.float32)
    kR3 = k3 * eR3
    for i in range(1, 4):
        Ep_i = tl.sum(tl.where(i4[:, None] == i, Ep, 0.), 0)
        Mi = tl.exp(tl.where(i4[:, None] < i, Ep_i[None, :] - E, NEG_INF))
        right = tl.reshape(kR3 * Mi[:, None, :], (C, BK))
        rsel = blk[:, None] == i
        accXQ += tl.dot(tl.where(rsel, dAq, 0.), right, input_precision=PREC)
        accXK += tl.dot(tl.where(rsel, dAk, 0.), right, input_precision=PREC)
    accYQ = tl.zeros([C, BK], tl.float32)
    accYK = tl.zeros([C, BK], tl.float32)
    qL3 = q3 * eL3
    kL3 = k3 * eL3
    for j in range(0, 3):
        E_j = tl.sum(tl.where(i4[:, None] == j, E, 0.), 0)
        Nj = tl.exp(tl.where(i4[:, None] > j, Ep - E_j[None, :], NEG_INF))
        lq = tl.reshape(qL3 * Nj[:, None, :], (C, BK))
        lk = tl.reshape(kL3 * Nj[:, None, :], (C, BK))
        csel = blk[None, :] == j
        accYQ += tl.dot(tl.trans(tl.where(csel, dAq, 0.)), lq, input_precision=PREC)
        accYK += tl.dot(tl.trans(tl.where(csel, dAkb, 0.)), lk, input_precision=PREC)
    XQ3 = tl.reshape(accXQ, (4, 16, BK)) * eL3
    XK3 = tl.reshape(accXK, (4, 16, BK)) * eL3
    YQ3 = tl.reshape(accYQ, (4, 16, BK)) * eR3
    YK3 = tl.reshape(accYK, (4, 16, BK)) * eR3
    dAq3 = _blockdiag_from_2d(dAq, C)
    dAk3 = _blockdiag_from_2d(dAk, C)
    dAkb3 = _blockdiag_from_2d(dAkb, C)
    for cc in range(0, 16):
        sel_r = r16[None, :, None] == cc
        sel_c = r16[None, None, :] == cc
        Gc = tl.sum(tl.where(sel_r, G3, 0.), 1)
        kc = tl.sum(tl.where(sel_r, k3, 0.), 1)
        qc = tl.sum(tl.where(sel_r, q3, 0.), 1)
        e1 = tl.exp(tl.where(r16[None, :, None] >= cc, G3 - Gc[:, None, :], NEG_INF))
        e2 = tl.exp(tl.where(r16[None, :, None] <= cc, Gc[:, None, :] - G3, NEG_INF))
        colq = tl.sum(tl.where(sel_c, dAq3, 0.), 2)
        colk = tl.sum(tl.where(sel_c, dAk3, 0.), 2)
        rowq = tl.sum(tl.where(sel_r, dAq3, 0.), 1)
        rowk = tl.sum(tl.where(sel_r, dAkb3, 0.), 1)
        XQ3 += colq[:, :, None] * kc[:, None, :] * e1
        XK3 += colk[:, :, None] * kc[:, None, :] * e1
        YQ3 += rowq[:, :, None] * qc[:, None, :] * e2
        YK3 += rowk[:, :, None] * kc[:, None, :] * e2
    return (tl.reshape(XQ3, (C, BK)), tl.reshape(XK3, (C, BK)),
            tl.reshape(YQ3, (C, BK)), tl.reshape(YK3, (C, BK)))


@triton.jit
def _kda_chunk_bwd_kernel(q, k, v, g, beta, do, tinv, ubuf, dubuf, hs, dhs, flags,
                          dq, dk, dv, dg, dbeta,
                          cu, cseq, cidx, T, TT, NS, scale, span_max,
                          H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                          IS_VARLEN: tl.constexpr, QK_PER_HV: tl.constexpr, PREC: tl.constexpr,
                          SLOW: tl.constexpr):
    s = tl.program_id(0)
    hv = tl.program_id(1)
    hq = hv // (HV // H)
    hv64 = hv.to(tl.int64)
    fl = tl.load(flags + hv64 * NS + s)
    if SLOW:
        if fl == 0:
            return
    else:
        if fl != 0:
            return
    bos, eos, c = _seq_bounds(s, cu, cseq, cidx, T, C, IS_VARLEN)
    slot = s.to(tl.int64)
    r = tl.arange(0, C)
    tok = bos + c * C + r
    rm = tok < eos
    NVB: tl.constexpr = (V + BV - 1) // BV

    b = tl.load(beta + tok * HV + hv, mask=rm, other=0.).to(tl.float32)
    rowC = (hv64 * TT + tok) * C
    Tm = tl.load(tinv + rowC[:, None] + r[None, :], mask=rm[:, None] & (r[None, :] < C), other=0.)
    TmT = tl.trans(Tm)

    # ---- value side: dv, dbeta (v part), dAqk, dAkk
    dAq = tl.zeros([C, C], tl.float32)
    dAk = tl.zeros([C, C], tl.float32)
    db = tl.zeros([C], tl.float32)
    for vb in range(0, NVB):
        cv = vb * BV + tl.arange(0, BV)
        mv = rm[:, None] & (cv < V)[None, :]
        rowV = (hv64 * TT + tok) * V
        dO = tl.load(do + ((tok * HV + hv) * V)[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
        Ub = tl.load(ubuf + rowV[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
        dUb = tl.load(dubuf + rowV[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
        vt = tl.load(v + ((tok * HV + hv) * V)[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
        UbT = tl.trans(Ub)
        dAq += tl.dot(dO, UbT, input_precision=PREC)
        dBv = tl.dot(TmT, dUb, input_precision=PREC)
        tl.store(dv + ((tok * HV + hv) * V)[:, None] + cv[None, :],
                 (dBv * b[:, None]).to(dv.dtype.element_ty), mask=mv)
        db += tl.sum(dBv * vt, 1)
        dAk += tl.dot(dBv, UbT, input_precision=PREC)
    dAq = tl.where(r[:, None] >= r[None, :], dAq, 0.) * scale
    dAk = -tl.where(r[:, None] > r[None, :], dAk, 0.)
    dAkb = dAk * b[:, None]
    if not SLOW:
        # transposed once here rather than per key block and anchor in _fast_dA / _chunk_dA
        dAqT = tl.trans(dAq)
        dAkbT = tl.trans(dAkb)

    # ---- key side, per key block
    for kb in range(0, (K + BK - 1) // BK):
        cols, cmask, m2 = _key_block(kb, rm, K, BK)
        kt = tl.load(k + (tok[:, None] * H + hq) * K + cols[None, :], mask=m2, other=0.).to(tl.float32)
        qt = tl.load(q + (tok[:, None] * H + hq) * K + cols[None, :], mask=m2, other=0.).to(tl.float32)
        dQg = tl.zeros([C, BK], tl.float32)
        dKg = tl.zeros([C, BK], tl.float32)
        dUh = tl.zeros([C, BK], tl.float32)
        dgm = tl.zeros([BK], tl.float32)
        for vb in range(0, NVB):
            cv = vb * BV + tl.arange(0, BV)
            vmask = cv < V
            mv = rm[:, None] & vmask[None, :]
            rowV = (hv64 * TT + tok) * V
            dO = tl.load(do + ((tok * HV + hv) * V)[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
            Ub = tl.load(ubuf + rowV[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
            dUb = tl.load(dubuf + rowV[:, None] + cv[None, :], mask=mv, other=0.).to(tl.float32)
            hoff = (hv64 * NS + slot) * K * V + cols[:, None] * V + cv[None, :]
            hm = cmask[:, None] & vmask[None, :]
            hb = tl.load(hs + hoff, mask=hm, other=0.).to(tl.float32)
            dhb = tl.load(dhs + hoff, mask=hm, other=0.).to(tl.float32)
            hbT = tl.trans(hb)
            dQg += tl.dot(dO, hbT, input_precision=PREC)
            dKg += tl.dot(Ub, tl.trans(dhb), input_precision=PREC)
            dUh += tl.dot(dUb, hbT, input_precision=PREC)
            dgm += tl.sum(hb * dhb, 1)
        # dBk = -dBv h^T = -T^T (dU h^T): one [C, C] x [C, BK] product per key block
        dBk = -tl.dot(TmT, dUh, input_precision=PREC)

        G, Gl = _gate2d(g, tok, rm, hv, cols, cmask, HV, K, C)
        eG = tl.exp(G)
        kdec = tl.exp(Gl[None, :] - G)
        dqt = scale * eG * dQg
        dkt = kdec * dKg + b[:, None] * eG * dBk
        dG = scale * qt * eG * dQg - kt * kdec * dKg + b[:, None] * kt * eG * dBk
        dGl = tl.sum(kt * kdec * dKg, 0) + tl.exp(Gl) * dgm
        db += tl.sum(kt * eG * dBk, 1)

        if SLOW:
            XQ, XKr, YQ, YK = _slow_dA(kt, qt, G, dAq, dAk, dAkb, C, BK, PREC)
        elif tl.max(-Gl, 0) <= span_max:
            XQ, XKr, YQ, YK = _chunk_dA(kt, qt, G, dAq, dAk, dAqT, dAkbT, PREC)
        else:
            E0, E1, E2, E3 = _block_ends(G, C)
            XQ, XKr, YQ, YK = _fast_dA(kt, qt, G, E0, E1, E2, dAq, dAk, dAqT, dAkbT, C, BK, PREC)
        XK = XKr * b[:, None]
        db += tl.sum(kt * XKr, 1)
        dqt += XQ
        dkt += YQ + XK + YK
        dG += qt * XQ - kt * YQ + kt * XK - kt * YK
        dG += tl.where(r[:, None] == C - 1, dGl[None, :], 0.)
        dgt = tl.cumsum(dG, 0, reverse=True)
        tl.store(dg + ((tok * HV + hv) * K)[:, None] + cols[None, :], dgt.to(dg.dtype.element_ty), mask=m2)
        if QK_PER_HV:
            qk_off = ((tok * HV + hv) * K)[:, None] + cols[None, :]
        else:
            qk_off = ((tok * H + hq) * K)[:, None] + cols[None, :]
        tl.store(dq + qk_off, dqt.to(dq.dtype.element_ty), mask=m2)
        tl.store(dk + qk_off, dkt.to(dk.dtype.element_ty), mask=m2)
    tl.store(dbeta + tok * HV + hv, db.to(dbeta.dtype.element_ty), mask=rm)


def kda_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dfinal_state):
    """CUDA (Triton) backward of kimi::kda. Returns (dq, dk, dv, dg, dbeta, dinitial_state); all contiguous."""
    cfg = current_tuning()
    q_dtype, k_dtype, v_dtype, g_dtype, b_dtype = q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype
    q, k, v, g, beta, initial_state = contiguous_inputs(q, k, v, g, beta, initial_state)
    do = do.contiguous()
    if dfinal_state is not None:
        dfinal_state = dfinal_state.contiguous().float()
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    TT = B * T
    dev = q.device
    fp32, bf16 = _modes(q, k, v)
    prec = "ieee" if fp32 else "tf32"
    varlen = cu_seqlens is not None
    store_dtype = torch.bfloat16 if (bf16 and cfg.bwd_store_lowp) else torch.float32
    if not triton_backward_supported(q, v):
        raise ValueError(f"kda_backward: no Triton backward for {q.dtype} inputs with K={K} (q.shape[3]); "
                         "the op registration sends these to the reference")
    if K > 128:  # the reverse pass holds [C, K] tiles of kg, qg, w in shared memory: only 16-bit ones fit at K = 256
        store_dtype = torch.bfloat16

    inter = intra_intermediates(q, k, v, g, beta, scale, cu_seqlens, store_dtype=store_dtype,
                                a_lowp=bf16 and cfg.bwd_a_lowp, prec=prec, store_t=True)
    NS = inter["NS"]
    lowp_inter = store_dtype == torch.bfloat16
    pass_lowp = lowp_inter and cfg.bwd_pass_lowp and K <= 128
    # the passes keep h, dh' in float32 registers; state_dtype is only what they store for the chunk kernel
    state_dtype = torch.bfloat16 if (lowp_inter and cfg.bwd_state_lowp and K <= 128) else torch.float32
    hs = torch.empty(HV, NS, K, V, device=dev, dtype=state_dtype)
    ubuf = torch.empty(HV, TT, V, device=dev, dtype=state_dtype)
    # bv / stages / warps apply at K <= 128 (pass_forward keeps K = 256 to its own tiles); one segment: more
    # measured slower here too (docs/kda_kernels.md)
    pass_forward(inter, initial_state, None, N, HV, H, K, V, T, cu_seqlens, lowp=pass_lowp,
                 prec=prec, store_o=False, hs=hs, ubuf=ubuf, bv=cfg.bwd_fpass_bv,
                 stages=cfg.bwd_fpass_stages, warps=cfg.bwd_fpass_warps)

    dhs = torch.empty(HV, NS, K, V, device=dev, dtype=state_dtype)
    dubuf = torch.empty(HV, TT, V, device=dev, dtype=state_dtype)
    dh0 = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32) if initial_state is not None else None
    BKp = _np2(K)
    BVp = min(cfg.bwd_pass_bv, _np2(V))
    rev_stages = 1
    if K <= 128:
        rev_stages = cfg.bwd_pass_stages or (3 if lowp_inter else 1)
        es = inter["w"].element_size()  # per stage: w, qg, kg, Aqk and the dO tile
        rev_stages = fit_stages(rev_stages, es * (3 * KERNEL_CHUNK * BKp + KERNEL_CHUNK * KERNEL_CHUNK) + do.element_size() * KERNEL_CHUNK * BVp,
                                dev)
    dummy = inter["gam"]
    _launch(_kda_pass_bwd_kernel, (triton.cdiv(V, BVp), N * HV),
            inter["w"], inter["qg"], inter["kg"], inter["aqk"], inter["gam"], do,
            dfinal_state if dfinal_state is not None else dummy, dh0 if dh0 is not None else dummy,
            dhs, dubuf, cu_seqlens if varlen else dummy, inter["cchunk"] if varlen else dummy,
            T, TT, NS,
            H=H, HV=HV, K=K, V=V, BK=BKp, BV=BVp, C=KERNEL_CHUNK, IS_VARLEN=varlen,
            USE_DHT=dfinal_state is not None, STORE_DH0=dh0 is not None, LOWP=pass_lowp,
            PREC=prec, num_warps=cfg.bwd_pass_warps, num_stages=rev_stages)

    per_hv = HV != H
    if per_hv:
        dq = torch.empty(B, T, HV, K, device=dev, dtype=torch.float32)
        dk = torch.empty(B, T, HV, K, device=dev, dtype=torch.float32)
    else:
        dq = torch.empty(B, T, H, K, device=dev, dtype=q_dtype)
        dk = torch.empty(B, T, H, K, device=dev, dtype=k_dtype)
    dv = torch.empty(B, T, HV, V, device=dev, dtype=v_dtype)
    dg = torch.empty(B, T, HV, K, device=dev, dtype=g_dtype)
    dbeta = torch.empty(B, T, HV, device=dev, dtype=b_dtype)
    BK = min(cfg.bwd_bk, _np2(K))
    BV = min(cfg.bwd_bv, _np2(V))
    for slow in (False, True):
        _launch(_kda_chunk_bwd_kernel, (NS, HV),
                q, k, v, g, beta, do, inter["tinv"], ubuf, dubuf, hs, dhs, inter["flags"],
                dq, dk, dv, dg, dbeta,
                cu_seqlens if varlen else dummy,
                inter["cseq"] if varlen else dummy, inter["cidx"] if varlen else dummy,
                T, TT, NS, float(scale), float(cfg.span_max),
                H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=KERNEL_CHUNK, IS_VARLEN=varlen, QK_PER_HV=per_hv,
                PREC=prec, SLOW=slow, num_warps=cfg.bwd_warps, num_stages=1)
    if per_hv:
        G = HV // H
        dq = dq.view(B, T, H, G, K).sum(3).to(q_dtype)
        dk = dk.view(B, T, H, G, K).sum(3).to(k_dtype)
    return dq, dk, dv, dg, dbeta, dh0

