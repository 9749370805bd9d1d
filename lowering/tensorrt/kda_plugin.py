"""kimi::kda behind the TensorRT plugin ABI: the KDA token-loop kernel, its launch config and constants.

A TensorRT AOT plugin launches exactly one kernel, so the multi-kernel chunked prefill of ops/kda_triton.py
cannot be one; its token-loop kernel (``_kda_recurrent_kernel``: one program per (value block, sequence x
head), the fp32 state kept in registers) serves decode and prefill.  :func:`kda_plugin_kernel` only reorders
arguments into (inputs, int32 scalars, outputs); Triton inlines the call.

Everything the TensorRT lowering needs from the KDA kernels is imported here and nowhere else.
"""

# No ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations as objects.

from typing import Optional

from ..plugin_spec import KernelBinding

__all__ = ["kda_recurrent_launch_config", "kda_plugin_constexprs", "kda_binding"]


def kda_recurrent_launch_config(B, T, HV, K, V, decode_bv=32, decode_warps=4):
    """Launch of the KDA token-loop kernel for q [B, T, HV, K], v [B, T, HV, V] (no varlen): the choices of
    ``kda_triton.kda_forward_recurrent`` (``decode_bv`` / ``decode_warps`` are its ``_CFG`` entries).

    ``B`` and ``T`` may be symbolic (only ``*`` touches ``B``); returns ``dict(grid, num_warps, BK, BV,
    shared_mem)``.  ``shared_mem`` is 0 here: the kernel's own (compiled) need is added from its metadata,
    as Triton's launcher does.  Self-contained: the plugin registration module embeds this source.
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


def kda_plugin_constexprs(HV: int, K: int, V: int, scale: float, decode_bv: int = 32) -> dict:
    cfg = kda_recurrent_launch_config(1, 1, HV, K, V, decode_bv)
    return dict(HV=int(HV), K=int(K), V=int(V), BK=cfg["BK"], BV=cfg["BV"], SCALE=float(scale))


try:  # the adapter exists only where Triton and ops/kda_triton.py do
    import triton
    import triton.language as tl

    from kimi_compile.ops import kda_triton as _kda_triton

    _kda_recurrent_kernel = _kda_triton._kda_recurrent_kernel
except Exception:  # noqa: BLE001 - a broken Triton install behaves like an absent one
    _kda_triton = None

if _kda_triton is not None:

    @triton.jit
    def kda_plugin_kernel(q, k, v, g, beta, h0, T, o, ht, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr):
        # (q, k, v, g, beta, o, h0, ht, cu, T, scale, H, HV, K, V, BK, BV, IS_VARLEN, USE_H0); q stands in for
        # the unused cu_seqlens pointer; q / k arrive already repeated to the HV value heads (H == HV)
        _kda_recurrent_kernel(q, k, v, g, beta, o, h0, ht, q, T, SCALE, HV, HV, K, V, BK, BV, False, True)


def kda_binding() -> Optional[KernelBinding]:
    """The plugin's kernel binding with the launcher's current decode block / warps (None without Triton)."""
    if _kda_triton is None:
        return None
    cfg = getattr(_kda_triton, "_CFG", {})
    bv, warps = int(cfg.get("decode_bv", 32)), int(cfg.get("decode_warps", 4))
    return KernelBinding(
        module=__name__, kernel="kda_plugin_kernel", launch_config="kda_recurrent_launch_config",
        launch_args=("q.0", "q.1", "@num_heads", "@key_dim", "@value_dim", bv, warps),
        scalars=(("T", "q.1"),), constexprs="kda_plugin_constexprs",
        constexpr_args=(("HV", "@num_heads"), ("K", "@key_dim"), ("V", "@value_dim"), ("scale", "@scale"),
                        ("decode_bv", bv)))
