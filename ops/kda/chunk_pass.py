"""Stage 2 of the chunked KDA forward: the chunk-to-chunk pass.

Sequential over chunks; parallel over sequences x heads x value blocks. TX form:
U = T diag(beta) (v - k e^G h); WU form (the backward's recompute): U = u - w h. Then o = qg h + Aqk U and
h <- gam * h + kg^T U. Pipelined: the next chunks' tiles load while one is computed (pass_stages; fewer where
shared memory is smaller: :func:`fit_stages`).

The kernel keeps the NSEG / hseg / L parameters of the segment-parallel path (measured slower and removed,
docs/kda_kernels.md); the launcher passes NSEG=1, so the compiled kernel is the one that was measured.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import device_properties
from .common import KERNEL_CHUNK, _finite, _launch, _load_state, _np2, _seq_span, _state_tile
from .tuning import current_tuning


@triton.jit
def _kda_pass_kernel(w, u, tm, bsc, qg, kg, aqk, gam, poison, o, h0, ht, hseg, hs, ubuf,
                     cu, cchunk, T, TT, NS, L,
                     H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, NSEG: tl.constexpr,
                     IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr, STORE_O: tl.constexpr,
                     STORE_HT: tl.constexpr, STORE_H: tl.constexpr, STORE_U: tl.constexpr,
                     LOWP: tl.constexpr, PREC: tl.constexpr, TX: tl.constexpr, NONFINITE: tl.constexpr):
    """TX=False: w, u are the intra kernel's T (beta k e^G) and T (beta v); U = u - w h. TX=True: w holds
    k e^G, u is the input v [B, T, HV, V], tm holds T [HV, TT, C] and bsc beta [HV, NS, C];
    U = T diag(beta) (v - k e^G h) (one dot more a step, two loops fewer in the intra kernel).
    NONFINITE: poison [HV, NS] holds the intra kernel's first non-finite row per chunk slot (C if none; v's rows
    included). From that row on, outputs are NaN, and so is the state after the chunk: a non-finite input reaches
    its own token and later ones only, and never through a 0 * NaN in a dot (the v tile is zeroed where not
    finite)."""
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
    NAN: tl.constexpr = float("nan")
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
        if NONFINITE:
            first_bad = tl.load(poison + hv64 * NS + slot0 + c)
            if TX:  # the intra kernel checked v's rows; zeroed here so that no dot meets a NaN
                ut = tl.where(_finite(ut), ut, 0.)
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
            if NONFINITE:
                ot = tl.where(r[:, None] >= first_bad, NAN, ot)
            tl.store(o + ((tok * HV + hv) * V)[:, None] + cv[None, :], ot.to(o.dtype.element_ty), mask=mv)
        if STORE_U:
            tl.store(ubuf + ((hv64 * TT + tok) * V)[:, None] + cv[None, :], U, mask=mv)
        h = gm[:, None] * h + tl.dot(tl.trans(kgt), Ud, input_precision=PREC)
        if NONFINITE:
            h = tl.where(first_bad < C, NAN, h)
    if STORE_HT:
        tl.store(ht + nh.to(tl.int64) * K * V + hoff, h, mask=hm)


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


def pass_forward(inter, initial_state, o, N, HV, H, K, V, T, cu_seqlens, *, lowp, prec,
                 store_o=True, hs=None, ubuf=None, bv=None, stages=None, warps=None):
    """Run the pass over the intra stage's intermediates ``inter``; returns the final state [N, HV, K, V] float32.
    o None: no output (the backward's recompute, which stores the chunk states in hs and U in ubuf instead).
    bv / stages / warps: value block, pipeline depth and warps at K <= 128 (default: pass_bv, pass_warps,
    and pass_stages for 16-bit intermediates, one stage for float32 ones)."""
    cfg = current_tuning()
    dev = o.device if o is not None else inter["w"].device
    BK = _np2(K)
    es = inter["w"].element_size()
    warps = warps or cfg.pass_warps
    C = KERNEL_CHUNK
    if K <= 128:
        BV = min(bv or cfg.pass_bv, _np2(V))
        if stages is None:
            stages = cfg.pass_stages if es == 2 else 1
        # per stage: w, kg [, qg, Aqk] and u (or v) tiles [, T]
        stage_bytes = es * (C * BK * (3 if store_o else 2) + (C * C if store_o else 0) + C * BV
                            + (C * C if inter["tx"] else 0))
        stages = fit_stages(stages, stage_bytes, dev)
    else:  # K = 256: keep the [C, K] tiles of one stage inside shared memory
        BV = min(64 if es == 2 else 32, _np2(V))
        warps = 8 if es == 2 else 4
        stages = 1
    ht = torch.empty(N, HV, K, V, device=dev, dtype=torch.float32)
    NS, TT = inter["NS"], inter["TT"]
    dummy = inter["gam"]
    varlen = cu_seqlens is not None
    nchunks = triton.cdiv(T, C)  # the kernel's L: chunks per segment, one segment
    tx = inter["tx"]
    _launch(_kda_pass_kernel, (triton.cdiv(V, BV), N * HV),
            inter["w"], inter["v"] if tx else inter["u"], inter["tinv"] if tx else dummy,
            inter["bsc"] if tx else dummy,
            inter["qg"], inter["kg"], inter["aqk"], inter["gam"],
            inter["poison"] if inter["poison"] is not None else dummy,
            o if o is not None else dummy,
            initial_state if initial_state is not None else dummy, ht,
            dummy,
            hs if hs is not None else dummy, ubuf if ubuf is not None else dummy,
            cu_seqlens if varlen else dummy, inter["cchunk"] if varlen else dummy,
            T, TT, NS, nchunks,
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, C=C, NSEG=1, IS_VARLEN=varlen,
            USE_H0=initial_state is not None, STORE_O=store_o, STORE_HT=True,
            STORE_H=hs is not None, STORE_U=ubuf is not None, LOWP=lowp, PREC=prec, TX=tx,
            NONFINITE=inter["poison"] is not None, num_warps=warps, num_stages=stages)
    return ht
