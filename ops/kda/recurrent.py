"""The KDA token-loop kernel (decode and very short prefill), its launcher, and its TensorRT plugin launch
configuration (the plugin runs this kernel ahead of time: lowering/tensorrt.py imports the two functions below)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _launch
from .tuning import KDATuning, current_tuning


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


def kda_recurrent_launch_config(B, T, HV, K, V, decode_bv=64, decode_warps=4):
    """Launch of the KDA token-loop kernel for N = B sequences, v [B, T, HV, V]: the one place that decides it,
    for :func:`kda_forward_recurrent` and for the TensorRT plugin.

    ``B`` and ``T`` may be symbolic (only ``*`` touches ``B``); returns ``dict(grid, num_warps, BK, BV,
    shared_mem)``.  ``shared_mem`` is 0 here: the kernel's own (compiled) need is added from its metadata,
    as Triton's launcher does.  Self-contained (the plugin registration module embeds this source), so the
    defaults are written out: they equal KDATuning's decode_bv / decode_warps (a test checks it).
    """
    HV, K, V = int(HV), int(K), int(V)
    BK = 16
    while BK < K:
        BK *= 2
    BV = 16
    while BV < V:
        BV *= 2
    BV = min(int(decode_bv), BV)
    grid = ((V + BV - 1) // BV, B * HV, 1)
    return dict(grid=grid, num_warps=int(decode_warps), BK=BK, BV=BV, shared_mem=0)


def kda_plugin_constexprs(HV: int, K: int, V: int, scale: float, decode_bv: int = KDATuning.decode_bv) -> dict:
    """The compile-time constants of the TensorRT plugin's kernel (q / k already repeated to the HV heads)."""
    cfg = kda_recurrent_launch_config(1, 1, HV, K, V, decode_bv)
    return dict(HV=int(HV), K=int(K), V=int(V), BK=cfg["BK"], BV=cfg["BV"], SCALE=float(scale))


def kda_forward_recurrent(q, k, v, g, beta, initial_state, scale, cu_seqlens, out_state=None):
    """The token loop for q, k [B, T, H, K], v [B, T, HV, V] (contiguous); returns (o, final_state float32).
    ``out_state`` (contiguous float32 [N, HV, K, V]) receives the final state instead of a new tensor; it may be
    ``initial_state`` itself: each program loads its state tile whole before the token loop and stores it after,
    and no two programs share a tile, so the update in place is safe."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    o = torch.empty_like(v)
    ht = torch.empty(N, HV, K, V, device=v.device, dtype=torch.float32) if out_state is None else out_state
    cfg = current_tuning()
    launch = kda_recurrent_launch_config(N, T, HV, K, V, cfg.decode_bv, cfg.decode_warps)
    dummy = ht
    _launch(_kda_recurrent_kernel, launch["grid"][:2],
            q, k, v, g, beta, o, initial_state if initial_state is not None else dummy, ht,
            cu_seqlens if cu_seqlens is not None else dummy, T, float(scale),
            H=H, HV=HV, K=K, V=V, BK=launch["BK"], BV=launch["BV"], IS_VARLEN=cu_seqlens is not None,
            USE_H0=initial_state is not None, num_warps=launch["num_warps"], num_stages=1)
    return o, ht
