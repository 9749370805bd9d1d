"""kimi::short_conv against a plain float64 loop, state continuity, autograd, opcheck, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

from kimi_compile.ops import short_conv


def conv_loop(x, weight, bias=None, initial_state=None, activation="silu"):
    x, weight = x.double(), weight.double()
    B, T, C = x.shape
    W = weight.shape[1]
    history = torch.zeros(B, C, W - 1, dtype=torch.float64) if initial_state is None else initial_state.double()
    window = [history[:, :, j] for j in range(W - 1)]  # oldest first
    y = torch.zeros(B, T, C, dtype=torch.float64)
    for t in range(T):
        window.append(x[:, t])
        acc = torch.zeros(B, C, dtype=torch.float64) if bias is None else bias.double().expand(B, C).clone()
        for j in range(W):
            acc = acc + weight[:, j] * window[len(window) - W + j]
        y[:, t] = F.silu(acc) if activation == "silu" else acc
    state = torch.stack(window[len(window) - (W - 1):], dim=2) if W > 1 else torch.zeros(B, C, 0, dtype=torch.float64)
    return y, state


def make(B, T, C, W, dtype=torch.float64, bias=True, state=True):
    x = torch.randn(B, T, C, dtype=dtype)
    w = torch.randn(C, W, dtype=dtype)
    b = torch.randn(C, dtype=dtype) if bias else None
    s = torch.randn(B, C, W - 1, dtype=dtype) if state else None
    return x, w, b, s


@pytest.mark.parametrize("T", [1, 2, 3, 4, 17])
@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("activation", ["silu", "none"])
@pytest.mark.parametrize("bias,state", [(True, True), (False, False)])
def test_matches_loop(T, W, activation, bias, state):
    x, w, b, s = make(3, T, 5, W, bias=bias, state=state)
    y, fs = short_conv(x, w, b, s, activation)
    ry, rs = conv_loop(x, w, b, s, activation)
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fs, rs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision(dtype, tol):
    x, w, b, s = make(2, 33, 16, 4, dtype=dtype)
    y, fs = short_conv(x, w, b, s)
    ry, rs = conv_loop(x, w, b, s)
    assert y.dtype == dtype and fs.dtype == dtype
    torch.testing.assert_close(y.double(), ry, rtol=tol, atol=tol)
    torch.testing.assert_close(fs.double(), rs, rtol=0, atol=0)


@pytest.mark.parametrize("split", [1, 2, 3, 10])
def test_state_continuity(split):
    x, w, b, s = make(2, 12, 6, 4)
    y_all, s_all = short_conv(x, w, b, s)
    y_a, s_a = short_conv(x[:, :split], w, b, s)
    y_b, s_b = short_conv(x[:, split:], w, b, s_a)
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), y_all, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(s_b, s_all, rtol=0, atol=0)
    state, outs = s, []
    for t in range(12):
        y_t, state = short_conv(x[:, t:t + 1], w, b, state)
        outs.append(y_t)
    torch.testing.assert_close(torch.cat(outs, 1), y_all, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(state, s_all, rtol=0, atol=0)


def test_short_input_keeps_old_state():
    """T < W - 1: the final state still holds part of the initial state."""
    x, w, b, s = make(1, 2, 3, 4)
    _, fs = short_conv(x, w, b, s)
    torch.testing.assert_close(fs, torch.cat([s[:, :, 2:], x.transpose(1, 2)], dim=2), rtol=0, atol=0)


@pytest.mark.parametrize("bias,state", [(True, True), (False, False), (True, False)])
def test_gradcheck(bias, state):
    x, w, b, s = make(2, 5, 3, 4, bias=bias, state=state)
    args = tuple(t.requires_grad_() if t is not None else None for t in (x, w, b, s))
    assert torch.autograd.gradcheck(lambda *a: short_conv(*a), args)


@pytest.mark.parametrize("shape", [(1, 1, 3, 4), (2, 7, 5, 2), (3, 9, 4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype):
    x, w, b, s = make(*shape, dtype=dtype)
    args = [t.requires_grad_() for t in (x, w, b, s)]
    torch.library.opcheck(torch.ops.kimi.short_conv.default, (*args, "silu"))
    torch.library.opcheck(torch.ops.kimi.short_conv.default, (args[0], args[1], None, None, "none"))


@pytest.mark.parametrize("mutate,exc,name", [
    (lambda a: a.__setitem__(1, torch.randn(7, 4)), ValueError, "weight"),
    (lambda a: a.__setitem__(2, torch.randn(7)), ValueError, "bias"),
    (lambda a: a.__setitem__(3, torch.randn(2, 6, 4)), ValueError, "initial_state"),
    (lambda a: a.__setitem__(3, a[3].double()), TypeError, "initial_state"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "x"),
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "x"),
    (lambda a: a.__setitem__(4, "relu"), ValueError, "activation"),
    (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, "bias"),
])
def test_bad_input(mutate, exc, name):
    x, w, b, s = make(2, 5, 6, 4, dtype=torch.float32)
    args = [x, w, b, s, "silu"]
    mutate(args)
    with pytest.raises(exc, match=name):
        short_conv(*args)
