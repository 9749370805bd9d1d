"""The Triton kernel of kimi::short_conv (ops/short_conv/kernel.py).

CPU: the kernel runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported) and is compared with a plain float64 loop written in that script.  GPU: ``@pytest.mark.cuda``
tests compare the kernel with the op's reference and check the op dispatches to it.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from symbolic_dims import Sym, ev

INTERPRETER_SCRIPT = textwrap.dedent(r'''
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from kimi_compile.ops.short_conv import kernel as sct

    def loop_reference(x, w, b, s, activation):
        """y[b, t, c] = act(bias[c] + sum_j w[c, j] * xpad[b, t + j, c]), xpad = [state | x]; float64 loops."""
        B, T, C = x.shape
        W = w.shape[1]
        x, w = x.double(), w.double()
        s = torch.zeros(B, C, W - 1, dtype=torch.float64) if s is None else s.double()
        y = torch.zeros(B, T, C, dtype=torch.float64)
        fs = torch.zeros(B, C, W - 1, dtype=torch.float64)
        for bi in range(B):
            for c in range(C):
                xpad = [float(s[bi, c, i]) for i in range(W - 1)] + [float(x[bi, t, c]) for t in range(T)]
                for t in range(T):
                    acc = 0.0 if b is None else float(b[c])
                    for j in range(W):
                        acc += float(w[c, j]) * xpad[t + j]
                    if activation == "silu":
                        acc = acc / (1.0 + torch.exp(torch.tensor(-acc, dtype=torch.float64)).item())
                    y[bi, t, c] = acc
                for i in range(W - 1):
                    fs[bi, c, i] = xpad[T + i]
        return y, fs

    # record every launch of the kernel (grid, warps, constants) to compare with the launch config
    launches = []
    real_kernel = sct.short_conv_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(dict(grid=list(grid), num_warps=kwargs["num_warps"],
                                     BLOCK_T=kwargs["BLOCK_T"], BLOCK_C=kwargs["BLOCK_C"], T=args[4], C=args[5]))
                return real_kernel[grid](*args, **kwargs)
            return launch

    sct.short_conv_kernel = Recorder()
    cases = json.loads(sys.argv[1])
    results = []
    for i, (B, T, C, W, bias, state, act, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + i)
        dt = getattr(torch, dtype)
        x = torch.randn(B, T, C, generator=g).to(dt)
        w = torch.randn(C, W, generator=g).to(dt)
        b = torch.randn(C, generator=g).to(dt) if bias else None
        s = torch.randn(B, C, W - 1, generator=g).to(dt) if state else None
        n_before = len(launches)
        y, fs = sct.short_conv_forward(x, w, b, s, act)
        yr, fsr = loop_reference(x, w, b, s, act)
        results.append(dict(
            y_err=float((y.double() - yr).abs().max()) if y.numel() else 0.0,
            fs_err=float((fs.double() - fsr).abs().max()) if fs.numel() else 0.0,
            y_dtype=str(y.dtype), fs_dtype=str(fs.dtype), y_shape=list(y.shape), fs_shape=list(fs.shape),
            fs_fresh=(s is None or fs.numel() == 0 or fs.data_ptr() != s.data_ptr()),
            launches=launches[n_before:],
            config=sct.short_conv_launch_config(B, T, C, W) if T > 0 else None,
        ))
    print(json.dumps(results))
''')

# (B, T, C, W, bias, state, activation, dtype)
CASES = [
    (1, 1, 8, 4, True, True, "silu", "float32"),      # decode step
    (2, 2, 20, 4, False, True, "none", "float32"),    # T < W - 1: the final state keeps old state entries
    (3, 37, 130, 4, True, False, "silu", "float32"),  # odd T over 3 time blocks, 2 channel blocks, no state
    (2, 17, 33, 3, False, False, "silu", "float32"),  # no bias, no state, W = 3
    (2, 5, 7, 1, True, True, "silu", "float64"),      # W = 1: empty state
    (1, 3, 24, 5, True, True, "none", "float64"),     # float64 accumulates in float64
    (2, 19, 40, 4, True, True, "silu", "float16"),    # half inputs, float32 accumulation
    (2, 0, 8, 4, False, True, "silu", "float32"),     # T = 0: the state passes through, no launch
]
TOL = {"float32": 2e-5, "float64": 1e-12, "float16": 2e-2}


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, json.dumps(CASES)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"B{c[0]}T{c[1]}C{c[2]}W{c[3]}{'b' if c[4] else ''}"
                                                         f"{'s' if c[5] else ''}_{c[6]}_{c[7]}" for c in CASES])
def test_kernel_matches_float64_loop(interpreted, case):
    B, T, C, W, _, _, _, dtype = CASES[case]
    r = interpreted[case]
    assert r["y_shape"] == [B, T, C] and r["fs_shape"] == [B, C, W - 1]
    assert r["y_dtype"] == r["fs_dtype"] == f"torch.{dtype}"
    assert r["fs_fresh"]
    assert r["y_err"] <= TOL[dtype], r
    assert r["fs_err"] == 0.0, r  # the final state is a copy of inputs: exact


def test_launcher_uses_the_launch_config(interpreted):
    """The Python launcher launches exactly what short_conv_launch_config says (the TensorRT plugin calls the
    same function; tests/test_tensorrt_bundle.py checks that side)."""
    for (B, T, C, W, *_), r in zip(CASES, interpreted):
        if T == 0:
            assert r["launches"] == []
            continue
        assert len(r["launches"]) == 1
        got, cfg = r["launches"][0], r["config"]
        assert got["grid"] == list(cfg["grid"])
        assert got["num_warps"] == cfg["num_warps"]
        assert (got["BLOCK_T"], got["BLOCK_C"], got["T"], got["C"]) == (cfg["BLOCK_T"], cfg["BLOCK_C"], T, C)
        assert cfg["grid"][1] == B
        assert cfg["grid"][0] * cfg["BLOCK_T"] >= T > (cfg["grid"][0] - 1) * cfg["BLOCK_T"]
        assert cfg["grid"][2] * cfg["BLOCK_C"] >= C > (cfg["grid"][2] - 1) * cfg["BLOCK_C"]


def test_launch_config_is_symbolic_in_batch_and_length():
    from kimi_compile.ops.short_conv.kernel import short_conv_launch_config

    B, T = Sym.var("B"), Sym.var("T")
    for C, W in ((8, 4), (96, 4), (130, 3), (4096, 4), (1, 1)):
        sym = short_conv_launch_config(B, T, C, W)
        for b, t in ((1, 1), (3, 17), (2, 4096)):
            concrete = short_conv_launch_config(b, t, C, W)
            env = {"B": b, "T": t}
            grid = [ev(g, env) for g in sym["grid"]]
            assert grid == list(concrete["grid"])
            for key in ("num_warps", "BLOCK_T", "BLOCK_C", "shared_mem"):
                assert sym[key] == concrete[key]
    with pytest.raises(ValueError, match="C >= 1"):
        short_conv_launch_config(1, 1, 0, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_matches_reference(dtype):
    from kimi_compile.ops.short_conv import short_conv_reference
    from kimi_compile.ops.short_conv.kernel import short_conv_forward

    g = torch.Generator(device="cuda").manual_seed(0)
    for B, T, C, W, bias, state, act in ((1, 1, 4096, 4, False, True, "silu"), (2, 37, 130, 4, True, True, "none"),
                                         (3, 2, 64, 4, True, False, "silu"), (2, 300, 384, 4, False, True, "silu")):
        x = torch.randn(B, T, C, device="cuda", generator=g, dtype=dtype)
        w = torch.randn(C, W, device="cuda", generator=g, dtype=dtype)
        b = torch.randn(C, device="cuda", generator=g, dtype=dtype) if bias else None
        s = torch.randn(B, C, W - 1, device="cuda", generator=g, dtype=dtype) if state else None
        y, fs = short_conv_forward(x, w, b, s, act)
        yr, fsr = short_conv_reference(x, w, b, s, act)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), yr.float(), atol=tol, rtol=tol)
        assert torch.equal(fs, fsr)


@pytest.mark.cuda
def test_cuda_op_dispatches_to_triton(monkeypatch):
    import kimi_compile.ops as kops
    from kimi_compile.ops.short_conv import kernel as short_conv_triton

    calls = []
    real = short_conv_triton.short_conv_forward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(short_conv_triton, "short_conv_forward", spy)
    x = torch.randn(2, 9, 32, device="cuda")
    w = torch.randn(32, 4, device="cuda")
    y, fs = kops.short_conv(x, w, None, None, "silu")
    yr, fsr = kops.short_conv_reference(x, w, None, None, "silu")
    assert calls
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    assert torch.equal(fs, fsr)
