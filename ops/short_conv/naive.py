"""``kimi::short_conv`` in plain PyTorch (any device): the op's CPU kernel, its backward, the path Triton-less
CUDA takes, and the reference the Triton kernel is tested against. Not ops, no validation
(``ops/short_conv/__init__.py`` checks the arguments and holds the contract)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["short_conv_reference", "short_conv_backward_reference"]


def short_conv_reference(x, weight, bias=None, initial_state=None, activation="silu"):
    """Depthwise causal conv1d over [state | x]; differentiable torch ops, no loop."""
    B, T, C = x.shape
    W = weight.shape[1]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if initial_state is None:
        initial_state = x.new_zeros(B, C, W - 1)
    xpad = torch.cat([initial_state.to(cdt), x.to(cdt).transpose(1, 2)], dim=2)  # [B, C, W-1+T]
    y = F.conv1d(xpad, weight.to(cdt).unsqueeze(1), None if bias is None else bias.to(cdt), groups=C)
    if activation == "silu":
        y = F.silu(y)
    final_state = xpad[:, :, xpad.shape[2] - (W - 1):]
    # clone: a new tensor with storage offset 0 even for the empty W == 1 state
    return y.transpose(1, 2).to(x.dtype).contiguous(), final_state.to(x.dtype).clone(memory_format=torch.contiguous_format)


def short_conv_backward_reference(x, weight, bias, initial_state, activation, dy, dstate):
    """Gradients for (x, weight, bias, initial_state): the vjp of the reference; zeros for an absent bias / state."""
    has_bias, has_state = bias is not None, initial_state is not None
    if not has_bias:
        bias = x.new_zeros(x.shape[2], dtype=weight.dtype)
    if not has_state:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], weight.shape[1] - 1)

    def fwd(x_, w_, b_, s_):
        return short_conv_reference(x_, w_, b_, s_, activation)

    _, vjp = torch.func.vjp(fwd, x, weight, bias, initial_state)
    return vjp((dy.to(x.dtype), dstate.to(x.dtype)))
