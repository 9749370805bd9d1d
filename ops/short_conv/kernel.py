"""Triton kernel for ``kimi::short_conv`` (depthwise causal convolution with carried state).

Layout (all contiguous)::

    x      [B, T, C]        weight [C, W]        bias [C]        initial_state [B, C, W-1]
    y      [B, T, C]        final_state [B, C, W-1]

    y[b, t, c] = act(bias[c] + sum_j weight[c, j] * xpad[b, t + j, c]),   xpad = [state | x] along time

One program owns (a block of BLOCK_T steps, batch row b, a block of BLOCK_C channels) and accumulates
in float32 (float64 for float64 inputs).  The program holding the last time block also writes the
final state (the last W-1 entries of xpad).  No host sync: every size the kernel needs is a host int.

Calling convention.  The kernel's runtime parameters are ordered (input pointers..., int32 scalars...,
output pointers...), the argument order TensorRT's ahead-of-time plugins (``tensorrt.plugin.aot_impl``)
use, so the very same kernel compiled to PTX serves the TensorRT plugin ``kimi::short_conv``
(``lowering/tensorrt/``).  :func:`short_conv_launch_config` is the one place that decides grid,
block sizes, warps and shared memory; the Python launcher below and the plugin's ``aot_impl`` both
call it, so their launches cannot drift apart.  It only uses ``+``, ``-`` and ``//`` on ``B`` and ``T``,
so it also evaluates on TensorRT's symbolic shape expressions; block sizes depend only on the static
``C`` and ``W`` (they are compile-time constants of the kernel).

Offsets are computed in int64: ``B * T * C`` may exceed 2**31 at long context.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernel also runs on CPU tensors, which
is how the tests check it without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._device import device_guard

__all__ = ["short_conv_forward", "short_conv_launch_config", "short_conv_kernel", "short_conv_signature",
           "short_conv_constexprs", "short_conv_plugin_constexprs", "TRITON_DTYPES"]

#: torch dtype -> Triton signature type name (used for the ahead-of-time compile as well).
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# T = 1 (decode) would be specialised to a constant (Triton does so for integer arguments equal to 1) and lose `.to`
@triton.jit(do_not_specialize=["T", "C"])
def short_conv_kernel(
    X,  # [B, T, C] input
    Wt,  # [C, W] weight
    Bias,  # [C] bias (read only when HAS_BIAS)
    S0,  # [B, C, W-1] initial state (read only when HAS_STATE)
    T,  # int32: number of time steps
    C,  # int32: number of channels
    Y,  # [B, T, C] output, x's dtype
    SF,  # [B, C, W-1] final state, x's dtype
    W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    SILU: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    pid_t = tl.program_id(0)  # time blocks on x: the only axis that may exceed 65535 blocks
    pid_b = tl.program_id(1)
    pid_c = tl.program_id(2)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    b = pid_b.to(tl.int64)
    T64 = T.to(tl.int64)
    C64 = C.to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] output steps
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    t_ok = t < T
    c_ok = c < C

    x_base = X + b * T64 * C64
    s_base = S0 + b * C64 * (W - 1)

    if HAS_BIAS:
        bias = tl.load(Bias + c, mask=c_ok, other=0.0).to(acc_ty)
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=acc_ty) + bias[None, :]
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=acc_ty)

    for j in tl.static_range(W):
        # tap j reads xpad[t + j] = x[t + j - (W - 1)]; steps before the start come from the state below
        src = t + (j - (W - 1))
        xv = tl.load(x_base + src.to(tl.int64)[:, None] * C64 + c[None, :],
                     mask=((src >= 0) & t_ok)[:, None] & c_ok[None, :], other=0.0).to(acc_ty)
        wj = tl.load(Wt + c.to(tl.int64) * W + j, mask=c_ok, other=0.0).to(acc_ty)
        acc += xv * wj[None, :]

    if HAS_STATE:
        if W > 1:
            if pid_t == 0:
                # state entry p is xpad[p]: it reaches output step t = p - j through tap j (t >= 0).
                # One [BLOCK_C] vector per entry keeps every access channel-major (no layout shuffles).
                for p in tl.static_range(W - 1):
                    sv = tl.load(s_base + c.to(tl.int64) * (W - 1) + p, mask=c_ok, other=0.0).to(acc_ty)
                    for j in tl.static_range(p + 1):
                        wj = tl.load(Wt + c.to(tl.int64) * W + j, mask=c_ok, other=0.0).to(acc_ty)
                        hit = (t == (p - j)) & t_ok
                        acc += tl.where(hit[:, None], (sv * wj)[None, :], 0.0)

    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))

    y_ptrs = Y + b * T64 * C64 + t.to(tl.int64)[:, None] * C64 + c[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])

    if W > 1:
        if pid_t == tl.num_programs(0) - 1:
            # final_state[:, i] = xpad[T + i] = x[T - (W - 1) + i], or state[T + i] when T + i < W - 1
            for i in tl.static_range(W - 1):
                f_src = T - (W - 1) + i
                fv = tl.load(x_base + f_src.to(tl.int64) * C64 + c, mask=c_ok & (f_src >= 0), other=0.0)
                if HAS_STATE:
                    fs = tl.load(s_base + c.to(tl.int64) * (W - 1) + (T + i), mask=c_ok & (f_src < 0), other=0.0)
                    fv = tl.where(f_src >= 0, fv, fs.to(fv.dtype))
                tl.store(SF + b * C64 * (W - 1) + c.to(tl.int64) * (W - 1) + i, fv.to(SF.dtype.element_ty),
                         mask=c_ok)


def short_conv_launch_config(B, T, C, W):
    """Launch parameters of :data:`short_conv_kernel` for ``x [B, T, C]`` and a width-``W`` kernel.

    ``B`` and ``T`` may be ints or symbolic shape expressions (TensorRT ``ShapeExpr``): only ``+`` and
    ``//`` touch them.  ``C`` and ``W`` must be ints: they fix the compile-time block sizes.  Returns
    ``dict(grid=(ceil(T / BLOCK_T), B, ceil(C / BLOCK_C)), num_warps, BLOCK_T, BLOCK_C, shared_mem)``;
    a block has ``num_warps * 32`` threads.  ``shared_mem`` is 0: every access is channel-major, so
    Triton needs no shared-memory layout conversion (the ahead-of-time compile checks the metadata).

    Self-contained on purpose: the TensorRT plugin registration module embeds this very source.
    """
    C, W = int(C), int(W)
    if C < 1 or W < 1:
        raise ValueError(f"short_conv_launch_config needs C >= 1 and W >= 1, got C={C}, W={W}")
    block_c = 16
    while block_c < C and block_c < 128:
        block_c *= 2
    block_t = 16
    tile = block_t * block_c
    num_warps = 4 if tile >= 2048 else (2 if tile >= 512 else 1)
    grid = ((T + (block_t - 1)) // block_t, B, (C + (block_c - 1)) // block_c)
    return dict(grid=grid, num_warps=num_warps, BLOCK_T=block_t, BLOCK_C=block_c, shared_mem=0)


def short_conv_constexprs(C: int, W: int, activation: str, has_bias: bool, has_state: bool,
                          fp64: bool = False) -> dict:
    """The compile-time constants of :data:`short_conv_kernel` (block sizes from the launch config)."""
    cfg = short_conv_launch_config(1, 1, C, W)
    return dict(W=int(W), BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"], HAS_BIAS=bool(has_bias),
                HAS_STATE=bool(has_state), SILU=activation == "silu", ACC_FP64=bool(fp64))


def short_conv_plugin_constexprs(C: int, W: int, activation: str) -> dict:
    """Constants of the TensorRT plugin's kernel: the plugin always passes a bias and a state."""
    return short_conv_constexprs(C, W, activation, has_bias=True, has_state=True)


def short_conv_signature(x_dtype: str, w_dtype: Optional[str] = None, b_dtype: Optional[str] = None,
                         s_dtype: Optional[str] = None) -> dict:
    """Triton signature (runtime parameters, in order) for an ahead-of-time compile; dtype names as in
    :data:`TRITON_DTYPES` (``"fp32"``, ``"fp16"``, ``"bf16"``)."""
    w_dtype = w_dtype or x_dtype
    return {"X": f"*{x_dtype}", "Wt": f"*{w_dtype}", "Bias": f"*{b_dtype or w_dtype}", "S0": f"*{s_dtype or x_dtype}",
            "T": "i32", "C": "i32", "Y": f"*{x_dtype}", "SF": f"*{x_dtype}"}


def short_conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                       activation: str) -> tuple[Tensor, Tensor]:
    """Launch :data:`short_conv_kernel`; inputs are already validated by ``ops/short_conv/__init__.py``.

    Returns ``(y [B, T, C], final_state [B, C, W-1])`` in x's dtype (new tensors)."""
    B, T, C = x.shape
    W = weight.shape[1]
    y = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
    final_state = torch.empty((B, C, W - 1), dtype=x.dtype, device=x.device)
    if T == 0:  # no step to run: the state passes through
        if initial_state is None:
            final_state.zero_()
        else:
            final_state.copy_(initial_state)
        return y, final_state
    if B == 0 or C == 0:
        return y, final_state
    if T >= 2 ** 31 or C >= 2 ** 31 or B > 65535:
        raise ValueError(f"x.shape (B={B}, T={T}, C={C}) must have B <= 65535 (grid y) and T, C < 2**31")
    x_c = x.contiguous()
    w_c = weight.contiguous()
    b_c = bias.contiguous() if bias is not None else w_c  # dummy pointer, never read
    s_c = initial_state.contiguous() if initial_state is not None else x_c  # dummy pointer, never read
    cfg = short_conv_launch_config(B, T, C, W)
    consts = short_conv_constexprs(C, W, activation, bias is not None, initial_state is not None,
                                   fp64=x.dtype == torch.float64)
    with device_guard(x):
        short_conv_kernel[cfg["grid"]](x_c, w_c, b_c, s_c, T, C, y, final_state, num_warps=cfg["num_warps"],
                                       **consts)
    return y, final_state
