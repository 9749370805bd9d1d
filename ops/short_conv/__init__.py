"""``kimi::short_conv`` — depthwise causal convolution with carried state, as a ``torch.library`` custom op.

Contract::

    short_conv(x, weight, bias=None, initial_state=None, activation="silu") -> (y, final_state)

    x              [B, T, C]
    weight         [C, W]
    bias           [C] or None
    initial_state  [B, C, W-1] in x's dtype, None for zeros (the W-1 inputs before x[:, 0])
    activation     "silu" or "none"
    y              [B, T, C] in x's dtype:  y[t, c] = act(bias[c] + sum_j weight[c, j] * xpad[t + j, c]),
                   xpad = concat(initial_state, x) along time
    final_state    [B, C, W-1]: the last W-1 entries of xpad (state entries included when T < W-1)

This is ONNX opset 27 CausalConvWithState up to layout ([B, C, T] there). Arithmetic runs in float32
(float64 for float64 inputs). The PyTorch implementation (CPU kernel and reference) is ``naive.py``, the Triton
kernel ``kernel.py``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .._checks import check_float, check_same_device, check_tensor
from .naive import short_conv_backward_reference, short_conv_reference

ACTIVATIONS = ("silu", "none")


def check_short_conv_args(x, weight, bias, initial_state, activation) -> None:
    check_tensor("x", x, 3)
    check_float("x", x)
    check_tensor("weight", weight, 2)
    check_float("weight", weight)
    B, T, C = x.shape
    if weight.shape[0] != C:
        raise ValueError(f"weight must have shape [C, W] with C = x.shape[2] = {C}, got {tuple(weight.shape)}")
    W = weight.shape[1]
    if W < 1:
        raise ValueError(f"weight.shape[1] (kernel width W) must be >= 1, got {W}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.shape[0] != C:
            raise ValueError(f"bias must have shape [C] = [{C}], got {tuple(bias.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 3)
        if tuple(initial_state.shape) != (B, C, W - 1):
            raise ValueError(f"initial_state must have shape [B, C, W-1] = {(B, C, W - 1)}, "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.dtype != x.dtype:
            raise TypeError(f"initial_state must have x's dtype {x.dtype}, got {initial_state.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_same_device(dict(x=x, weight=weight, bias=bias, initial_state=initial_state))


@functools.lru_cache(maxsize=None)
def _triton_kernel_module():
    """ops/short_conv/kernel.py, or None without Triton. Imported on first CUDA use, not with the op: Triton is
    optional, and its interpreter mode (TRITON_INTERPRET) is fixed when the kernel is decorated."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.kernel")


def _triton_ready(t: Tensor) -> bool:
    return t.is_cuda and _triton_kernel_module() is not None


@torch.library.custom_op("kimi::short_conv", mutates_args=())
def _short_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
                   activation: str = "silu") -> tuple[Tensor, Tensor]:
    check_short_conv_args(x, weight, bias, initial_state, activation)
    return short_conv_reference(x, weight, bias, initial_state, activation)


@_short_conv_op.register_kernel("cuda")
def _short_conv_cuda(x, weight, bias=None, initial_state=None, activation="silu"):
    check_short_conv_args(x, weight, bias, initial_state, activation)
    if not _triton_ready(x):
        return short_conv_reference(x, weight, bias, initial_state, activation)
    return _triton_kernel_module().short_conv_forward(x, weight, bias, initial_state, activation)


@_short_conv_op.register_fake
def _short_conv_fake(x, weight, bias=None, initial_state=None, activation="silu"):
    check_short_conv_args(x, weight, bias, initial_state, activation)
    B, T, C = x.shape
    return x.new_empty(B, T, C), x.new_empty(B, C, weight.shape[1] - 1)


@torch.library.custom_op("kimi::short_conv_backward", mutates_args=())
def _short_conv_backward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                            activation: str, dy: Tensor, dstate: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of kimi::short_conv for (x, weight, bias, initial_state); zeros for absent bias/state."""
    grads = short_conv_backward_reference(x, weight, bias, initial_state, activation, dy, dstate)
    return tuple(t.contiguous() for t in grads)


@_short_conv_backward_op.register_fake
def _short_conv_backward_fake(x, weight, bias, initial_state, activation, dy, dstate):
    dbias = x.new_empty(x.shape[2], dtype=weight.dtype if bias is None else bias.dtype)
    # contiguous, as the kernel returns them (empty_like would copy a permuted input's strides)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), dbias, dstate.new_empty(dstate.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, activation = inputs
    ctx.activation = activation
    ctx.has_bias, ctx.has_state = bias is not None, initial_state is not None
    ctx.save_for_backward(x, weight, bias, initial_state)


def _autograd_backward(ctx, dy, dstate):
    x, weight, bias, initial_state = ctx.saved_tensors
    dx, dw, db, ds0 = torch.ops.kimi.short_conv_backward(x, weight, bias, initial_state, ctx.activation, dy, dstate)
    return dx, dw, (db if ctx.has_bias else None), (ds0 if ctx.has_state else None), None


_short_conv_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def short_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, initial_state: Optional[Tensor] = None,
               activation: str = "silu") -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution with carried state; see the module docstring. Returns (y, final_state)."""
    check_short_conv_args(x, weight, bias, initial_state, activation)
    return torch.ops.kimi.short_conv(x, weight, bias, initial_state, activation)
