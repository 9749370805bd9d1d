"""kimi::kda behind the TensorRT plugin ABI: the KDA token-loop kernel, its launch config and constants.

A TensorRT AOT plugin launches exactly one kernel, so the multi-kernel chunked prefill of ops/kda/
cannot be one; its token-loop kernel (``_kda_recurrent_kernel``: one program per (value block, sequence x
head), the fp32 state kept in registers) serves decode and prefill.  :func:`kda_plugin_kernel` only reorders
arguments into (inputs, int32 scalars, outputs); Triton inlines the call.

Everything the TensorRT lowering needs from the KDA kernels is imported here and nowhere else.
"""

# No ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations as objects.

from typing import Optional

from ..plugin_spec import KernelBinding

__all__ = ["kda_recurrent_launch_config", "kda_plugin_constexprs", "kda_binding"]


try:  # the adapter exists only where Triton does
    import triton
    import triton.language as tl

    from kimi_compile.ops.kda import recurrent as _kda_triton
    from kimi_compile.ops.kda.recurrent import kda_plugin_constexprs, kda_recurrent_launch_config

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
    cfg = _kda_triton.current_tuning()
    bv, warps = int(cfg.decode_bv), int(cfg.decode_warps)
    return KernelBinding(
        module=__name__, kernel="kda_plugin_kernel", launch_config="kda_recurrent_launch_config",
        launch_args=("q.0", "q.1", "@num_heads", "@key_dim", "@value_dim", bv, warps),
        scalars=(("T", "q.1"),), constexprs="kda_plugin_constexprs",
        constexpr_args=(("HV", "@num_heads"), ("K", "@key_dim"), ("V", "@value_dim"), ("scale", "@scale"),
                        ("decode_bv", bv)))
