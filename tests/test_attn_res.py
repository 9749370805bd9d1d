"""Tests of kimi::attn_res (Attention Residuals) and its two-phase helpers.

Every result is compared with ``ref64`` below: the formula of CONTRACT.md written plainly in
float64 (a loop over the sources, explicit RMS, explicit max-subtracted softmax).  The Triton
kernels are checked on CPU through the Triton interpreter in a subprocess (TRITON_INTERPRET=1 must
be set before ``triton.jit`` decorates the kernels), and on CUDA by the ``cuda``-marked test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kimi_compile.ops.attn_res import attn_res, attn_res_merge, attn_res_phase1

HAS_CUDA = torch.cuda.is_available()
EPS = 1e-6


# --------------------------------------------------------------------------------------------
# the independent float64 formula
# --------------------------------------------------------------------------------------------


def scores64(sources, query, eps=EPS):
    """[N, B, T] float64: query . (x / sqrt(mean(x^2) + eps)) for every source x."""
    x = sources.double()
    q = query.double()
    D = x.shape[-1]
    out = []
    for n in range(x.shape[0]):
        xn = x[n]
        rms = torch.sqrt((xn * xn).sum(-1) / D + eps)
        out.append((xn / rms.unsqueeze(-1) * q).sum(-1))
    return torch.stack(out)


def ref64(sources, query, eps=EPS):
    """out[b, t] = sum_n softmax_n(score) * sources[n, b, t], all in float64."""
    x = sources.double()
    s = scores64(sources, query, eps)
    m = s.max(dim=0).values
    e = torch.exp(s - m)
    w = e / e.sum(0)
    out = torch.zeros_like(x[0])
    for n in range(x.shape[0]):
        out = out + w[n].unsqueeze(-1) * x[n]
    return out


def lse_stats64(sources, query, eps=EPS):
    s = scores64(sources, query, eps)
    m = s.max(dim=0).values
    return m, torch.exp(s - m).sum(0)


def _tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=2e-5, atol=2e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    }[dtype]


def _inputs(N, B, T, D, dtype=torch.float32, device="cpu", seed=0, qscale=0.3):
    g = torch.Generator().manual_seed(seed)
    # sources of different scales (as residual-stream blocks are), query large enough that the
    # softmax is far from uniform
    scale = torch.rand(N, 1, 1, 1, generator=g) * 3 + 0.25
    sources = (torch.randn(N, B, T, D, generator=g) * scale).to(dtype).to(device)
    query = (torch.randn(D, generator=g) * qscale).to(dtype).to(device)
    return sources, query


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 5, 10])
@pytest.mark.parametrize("D", [72, 100])
@pytest.mark.parametrize("BT", [(2, 300), (1, 1)])
def test_forward_matches_float64(N, D, BT):
    B, T = BT
    sources, query = _inputs(N, B, T, D, seed=N * 1000 + D + B)
    out = attn_res(sources, query)
    assert out.shape == (B, T, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref64(sources, query), **_tol(torch.float32))
    # the softmax must actually be non-trivial for the test to mean something
    if N > 1:
        w = torch.softmax(scores64(sources, query), 0)
        assert (w.max(0).values - w.min(0).values).max() > 0.3


@pytest.mark.parametrize("N", [1, 2, 6])
@pytest.mark.parametrize("BT", [(2, 37), (1, 1)])
def test_partial_is_one_more_source(N, BT):
    """attn_res(s, q, partial=p) == the float64 formula over cat([s, p]); gradients reach s, q and p."""
    B, T = BT
    x, q = _inputs(N + 1, B, T, 72, dtype=torch.float64, seed=N * 7 + T)
    sources = x[:-1].clone().requires_grad_(True)
    partial = x[-1].clone().requires_grad_(True)
    query = q.clone().requires_grad_(True)
    out = attn_res(sources, query, partial=partial)
    torch.testing.assert_close(out, ref64(x, q), rtol=1e-12, atol=1e-12)
    grad = torch.randn(B, T, 72, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad)
    x64, q64 = x.clone().requires_grad_(True), q.clone().requires_grad_(True)
    ref64(x64, q64).backward(grad)
    torch.testing.assert_close(sources.grad, x64.grad[:-1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(partial.grad, x64.grad[-1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(query.grad, q64.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    sources, query = _inputs(5, 2, 9, 100, dtype=dtype, seed=3)
    out = attn_res(sources, query)
    assert out.dtype == dtype and out.shape == (2, 9, 100)
    torch.testing.assert_close(out.double(), ref64(sources, query), **_tol(dtype))


def test_eps_is_inside_the_root():
    # sources of tiny magnitude: eps dominates mean(x^2), so the scores depend on where it sits
    sources, query = _inputs(4, 1, 5, 72, seed=5)
    sources = sources * 1e-3
    query = query * 3
    for eps in (1e-6, 1e-2):
        torch.testing.assert_close(attn_res(sources, query, eps).double(), ref64(sources, query, eps), rtol=2e-5, atol=1e-9)
    assert not torch.allclose(attn_res(sources, query, 1e-6), attn_res(sources, query, 1e-2), rtol=1e-2, atol=1e-5)


def test_zero_query_gives_uniform_average():
    sources, _ = _inputs(7, 2, 11, 72, seed=7)
    out = attn_res(sources, torch.zeros(72))
    torch.testing.assert_close(out.double(), sources.double().mean(0), rtol=2e-6, atol=2e-6)


def test_single_source_is_identity_and_not_an_alias():
    sources, query = _inputs(1, 2, 3, 100, seed=9)
    out = attn_res(sources, query)
    torch.testing.assert_close(out, sources[0])
    assert out.data_ptr() != sources.data_ptr()


def test_non_contiguous_sources():
    base, query = _inputs(6, 3, 2, 72, seed=11)
    sources = base.permute(0, 2, 1, 3)  # [6, 2, 3, 72], not contiguous
    assert not sources.is_contiguous()
    torch.testing.assert_close(attn_res(sources, query).double(), ref64(sources, query), **_tol(torch.float32))


# --------------------------------------------------------------------------------------------
# two-phase inference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [2, 5, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_phase_equals_single_shot(N, dtype):
    B, T, D, S = 2, 13, 100, 6
    sources, _ = _inputs(N, B, T, D, dtype=dtype, seed=20 + N)
    g = torch.Generator().manual_seed(N)
    queries = (torch.randn(S, D, generator=g) * 0.3).to(dtype)
    completed, partial = sources[:-1], sources[-1]

    out, lse_max, lse_sum = attn_res_phase1(completed, queries)
    assert out.shape == (S, B, T, D) and out.dtype == dtype
    assert lse_max.shape == lse_sum.shape == (S, B, T)
    assert lse_max.dtype == lse_sum.dtype == torch.float32
    for s in range(S):
        # phase 1 alone is attn_res over the completed sources, with its softmax statistics
        torch.testing.assert_close(out[s].double(), ref64(completed, queries[s]), **_tol(dtype))
        m64, l64 = lse_stats64(completed, queries[s])
        torch.testing.assert_close(lse_max[s].double(), m64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse_sum[s].double(), l64, rtol=1e-5, atol=1e-5)
        # merged == attn_res over all sources (float64 formula and the single-shot op)
        h = attn_res_merge(out[s], lse_max[s], lse_sum[s], partial, queries[s])
        assert h.shape == (B, T, D) and h.dtype == dtype
        tol = _tol(dtype) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(h.double(), ref64(sources, queries[s]), **tol)
        torch.testing.assert_close(h.double(), attn_res(sources, queries[s]).double(), **tol)


def test_two_phase_statistics_dtype():
    for dtype, want in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float32), (torch.float64, torch.float64)):
        sources, _ = _inputs(3, 1, 2, 8, dtype=dtype, seed=1)
        out, m, l = attn_res_phase1(sources, torch.randn(2, 8).to(dtype))
        assert out.dtype == dtype and m.dtype == want and l.dtype == want


def test_two_phase_partial_dominates():
    # the partial sum with a far larger score than every completed source: h -> partial
    N, B, T, D = 4, 1, 3, 72
    sources, _ = _inputs(N, B, T, D, seed=31)
    query = sources[-1, 0, 0].clone() * 5.0
    out, m, l = attn_res_phase1(sources[:-1], query[None])
    h = attn_res_merge(out[0], m[0], l[0], sources[-1], query)
    torch.testing.assert_close(h.double(), ref64(sources, query), **_tol(torch.float32))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


def test_gradcheck_float64():
    sources, query = _inputs(4, 2, 3, 7, dtype=torch.float64, seed=41, qscale=1.0)
    sources.requires_grad_(True)
    query.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, q: attn_res(x, q, 1e-3), (sources, query))


def test_gradcheck_two_phase_float64():
    sources, _ = _inputs(3, 2, 2, 5, dtype=torch.float64, seed=42)
    queries = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = sources.requires_grad_(True)
    Q = queries.requires_grad_(True)
    # phase 1 alone, all three outputs (out, lse_max, lse_sum) carry gradient
    assert torch.autograd.gradcheck(lambda a, b: attn_res_phase1(a, b, 1e-3), (x, Q))

    # phase 1 + merge for every query
    def two_phase(a, b):
        o, m, l = attn_res_phase1(a[:-1], b, 1e-3)
        return torch.stack([attn_res_merge(o[s], m[s], l[s], a[-1], b[s], 1e-3) for s in range(2)])

    assert torch.autograd.gradcheck(two_phase, (x, Q))
    # merge alone in all five tensor inputs
    o, m, l = attn_res_phase1(sources[:-1].detach(), queries.detach())
    args = [t.detach().clone().requires_grad_(True) for t in (o[1], m[1], l[1], sources[-1], queries[1])]
    assert torch.autograd.gradcheck(lambda *a: attn_res_merge(*a, 1e-3), args)


def test_two_phase_gradients_equal_single_shot():
    sources, _ = _inputs(5, 2, 9, 72, seed=44)
    queries = torch.randn(2, 72, generator=torch.Generator().manual_seed(3)) * 0.3
    grad = torch.randn(2, 9, 72, generator=torch.Generator().manual_seed(4))
    xa, qa = sources.clone().requires_grad_(True), queries.clone().requires_grad_(True)
    attn_res(xa, qa[1]).backward(grad)
    xb, qb = sources.clone().requires_grad_(True), queries.clone().requires_grad_(True)
    o, m, l = attn_res_phase1(xb[:-1], qb)
    attn_res_merge(o[1], m[1], l[1], xb[-1], qb[1]).backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qb.grad, qa.grad, rtol=1e-4, atol=1e-5)


def test_gradients_match_float64_formula():
    sources, query = _inputs(5, 2, 33, 100, seed=43)
    grad = torch.randn(2, 33, 100, generator=torch.Generator().manual_seed(1))
    x = sources.clone().requires_grad_(True)
    q = query.clone().requires_grad_(True)
    attn_res(x, q).backward(grad)

    x64 = sources.double().requires_grad_(True)
    q64 = query.double().requires_grad_(True)
    ref64(x64, q64).backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-4)


def test_backward_is_one_custom_op():
    sources, query = _inputs(3, 1, 4, 72, seed=45)
    x = sources.requires_grad_(True)
    q = query.requires_grad_(True)
    seen = []

    class Mode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    out = attn_res(x, q)
    with Mode():
        out.backward(torch.ones_like(out))
    assert torch.ops.kimi.attn_res_backward.default in seen
    assert x.grad is not None and q.grad is not None


# --------------------------------------------------------------------------------------------
# torch.library checks and compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 72), (3, 2, 5, 100), (10, 1, 7, 8)])
def test_opcheck(shape):
    N, B, T, D = shape
    sources, query = _inputs(N, B, T, D, seed=sum(shape))
    queries = torch.randn(3, D)
    partial = torch.randn(B, T, D)
    out, m, l = torch.ops.kimi.attn_res_phase1(sources, queries, EPS)
    merge_args = (out[1], m[1], l[1], partial, queries[1])
    cases = [
        (torch.ops.kimi.attn_res.default, (sources, query)),
        (torch.ops.kimi.attn_res_backward.default, (torch.randn(B, T, D), sources, query)),
        (torch.ops.kimi.attn_res_phase1.default, (sources, queries)),
        (torch.ops.kimi.attn_res_merge.default, merge_args),
    ]
    for op, args in cases:
        torch.library.opcheck(op, (*args, EPS))
        if shape[0] == 3 and op is not torch.ops.kimi.attn_res_backward.default:
            # with inputs that require grad: checks the autograd registration as well
            torch.library.opcheck(op, (*[t.clone().requires_grad_(True) for t in args], EPS))


def _block(sources, partial, query, queries, weight):
    h = attn_res(torch.cat([sources, partial[None]]), query)
    out, m, l = attn_res_phase1(sources, queries)
    h2 = attn_res_merge(out[0], m[0], l[0], partial, queries[0])
    return (h * weight).sum(-1) + h2.sum(-1)


def test_compile_fullgraph_no_graph_breaks():
    sources, query = _inputs(4, 2, 5, 72, seed=51)
    partial = torch.randn(2, 5, 72)
    queries = torch.randn(3, 72)
    weight = torch.randn(72)
    explanation = torch._dynamo.explain(_block)(sources, partial, query, queries, weight)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compile_dynamic_T_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    bw_graphs = []

    def bw_compiler(gm, example_inputs):
        bw_graphs.append(gm)
        return gm

    c_train = CompileCounterWithBackend(aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=bw_compiler))
    c_infer = CompileCounterWithBackend("aot_eager")
    train = torch.compile(_block, backend=c_train, fullgraph=True, dynamic=True)
    infer = torch.compile(_block, backend=c_infer, fullgraph=True, dynamic=True)
    query = torch.randn(72)
    queries = torch.randn(3, 72)
    weight = torch.randn(72)
    first = None
    for T in (5, 9, 17):
        sources, _ = _inputs(4, 2, T, 72, seed=T)
        partial = torch.randn(2, T, 72)
        # inference: attn_res + two-phase
        torch.testing.assert_close(infer(sources, partial, query, queries, weight),
                                   _block(sources, partial, query, queries, weight), rtol=1e-5, atol=1e-5)
        # training: forward and backward through the registered autograd formulas
        leaves, leaves_e = [], []
        for t in (sources, partial, query, queries):
            leaves.append(t.clone().requires_grad_(True))
            leaves_e.append(t.clone().requires_grad_(True))
        y = train(*leaves, weight)
        y_e = _block(*leaves_e, weight)
        torch.testing.assert_close(y, y_e, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y_e.backward(g)
        for a, b in zip(leaves, leaves_e):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
        if first is None:
            first = (c_infer.frame_count, c_train.frame_count)
    # compiled once (the first compile may count twice: dynamo restarts its analysis once to
    # specialise the symbolic float eps), never again when T changes
    assert first[0] >= 1 and first[1] >= 1
    assert (c_infer.frame_count, c_train.frame_count) == first
    # the backward graph calls the backward op once, as one node
    assert bw_graphs
    for gm in bw_graphs:
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.kimi.attn_res_backward.default) == 1


def test_compile_inductor_matches():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, q: attn_res(x, q) * 2.0, fullgraph=True)
    sources, query = _inputs(5, 1, 6, 100, seed=61)
    torch.testing.assert_close(fn(sources, query).double(), 2.0 * ref64(sources, query), **_tol(torch.float32))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(3, 2, 4, 8)
    q = torch.randn(8)
    return [
        ((x[0], q), ValueError, "sources"),  # not 4-D
        ((x[:0], q), ValueError, "sources"),  # N == 0
        ((x, torch.randn(7)), ValueError, "query"),  # wrong D
        ((x, torch.randn(1, 8)), ValueError, "query"),  # not 1-D
        ((x, q.double()), TypeError, "query"),  # dtype mismatch
        ((x.long(), q), TypeError, "sources"),  # not floating point
        ((x.tolist(), q), TypeError, "sources"),  # not a tensor
        ((x, q, -1.0), ValueError, "eps"),
        ((x, q, "1e-6"), TypeError, "eps"),
        ((x, q, 1e-6, x[0, :1]), ValueError, "partial"),  # not one source [B, T, D]
        ((x, q, 1e-6, x[0].double()), TypeError, "partial"),  # dtype mismatch
        ((x, q, 1e-6, x[0].long()), TypeError, "partial"),  # not floating point
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument(case):
    args, exc, name = _bad_cases()[case]
    with pytest.raises(exc, match=name):
        attn_res(*args)
    if isinstance(args[0], torch.Tensor) and (len(args) == 2 or len(args) == 4):
        # the op itself (not only the wrapper) validates
        with pytest.raises(exc, match=name):
            torch.ops.kimi.attn_res(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_bad_input_devices_differ_cuda():
    with pytest.raises(ValueError, match="query"):
        attn_res(torch.randn(2, 1, 3, 8, device="cuda"), torch.randn(8))


def test_bad_input_devices_differ_meta():
    # a meta tensor is a different device: checks the device test without a GPU
    with pytest.raises(ValueError, match="query"):
        attn_res(torch.randn(2, 1, 3, 8), torch.randn(8, device="meta"))


def test_bad_input_two_phase():
    x = torch.randn(3, 2, 4, 8)
    with pytest.raises(ValueError, match="queries"):
        attn_res_phase1(x, torch.randn(8))
    with pytest.raises(ValueError, match="queries"):
        attn_res_phase1(x, torch.randn(0, 8))
    with pytest.raises(TypeError, match="queries"):
        attn_res_phase1(x, torch.randn(2, 8, dtype=torch.float64))
    out, m, l = attn_res_phase1(x, torch.randn(2, 8))
    p = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="partial"):
        attn_res_merge(out[0], m[0], l[0], p[0], torch.randn(8))
    with pytest.raises(ValueError, match="lse_max"):
        attn_res_merge(out[0], m, l[0], p, torch.randn(8))
    with pytest.raises(TypeError, match="lse_sum"):
        attn_res_merge(out[0], m[0], l[0].double(), p, torch.randn(8))
    with pytest.raises(TypeError, match="out"):
        attn_res_merge(out[0].half(), m[0], l[0], p, torch.randn(8))
    with pytest.raises(ValueError, match="query"):
        attn_res_merge(out[0], m[0], l[0], p, torch.randn(9))


# --------------------------------------------------------------------------------------------
# Triton kernels on CPU through the interpreter
# --------------------------------------------------------------------------------------------


def _interpreter_main():
    """Runs in a subprocess with TRITON_INTERPRET=1; prints one JSON line of max errors."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kimi_compile.ops.attn_res import kernel as K

    errors = {}

    def err(name, got, want, tol):
        e = ((got.double() - want).abs() - tol["rtol"] * want.abs()).max().item()
        errors[name] = max(errors.get(name, float("-inf")), e - tol["atol"])

    for N, B, T, D in [(1, 1, 1, 72), (2, 2, 7, 100), (5, 1, 9, 72), (10, 3, 2, 100), (3, 1, 1, 1)]:
        x, q = _inputs(N, B, T, D, seed=N + T + D)
        err("fwd", K.attn_res_fwd(x, q, EPS), ref64(x, q), _tol(torch.float32))
        # a tiny tile (2 rows) so that several programs and a partial last block run
        err("fwd_block2", K.attn_res_fwd(x, q, EPS, block_r=2), ref64(x, q), _tol(torch.float32))
        if N > 1:  # the last source passed apart, read where it lies
            err("fwd_partial", K.attn_res_fwd(x[:-1], q, EPS, x[-1].clone(), block_r=2), ref64(x, q),
                _tol(torch.float32))
        grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(D))
        x64 = x.double().requires_grad_(True)
        q64 = q.double().requires_grad_(True)
        ref64(x64, q64).backward(grad.double())
        # max_programs=2 / block_r=2: each program walks several row blocks
        dx, dq = K.attn_res_bwd(grad, x, q, EPS, block_r=2, max_programs=2)
        err("bwd_dx", dx, x64.grad, dict(rtol=1e-4, atol=1e-4))
        err("bwd_dq", dq, q64.grad, dict(rtol=1e-4, atol=1e-4))
        if N > 1:
            Q = torch.randn(3, D, generator=torch.Generator().manual_seed(N)) * 0.3
            out, m, l = K.attn_res_phase1_fwd(x[:-1], Q, EPS)
            for s in range(3):
                m64, l64 = lse_stats64(x[:-1], Q[s])
                err("phase1_out", out[s], ref64(x[:-1], Q[s]), _tol(torch.float32))
                err("phase1_m", m[s], m64, dict(rtol=1e-5, atol=1e-5))
                err("phase1_l", l[s], l64, dict(rtol=1e-5, atol=1e-5))
                h = K.attn_res_merge_fwd(out[s], m[s], l[s], x[-1], Q[s], EPS)
                err("merge", h, ref64(x, Q[s]), _tol(torch.float32))
    for dtype in (torch.bfloat16, torch.float16):
        x, q = _inputs(5, 2, 3, 100, dtype=dtype, seed=99)
        out = K.attn_res_fwd(x, q, EPS)
        assert out.dtype == dtype
        err(f"fwd_{dtype}", out, ref64(x, q), _tol(dtype))
    print(json.dumps(errors))


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('attn_res_tests', {os.path.join(here, 'test_attn_res.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod._interpreter_main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"fwd", "fwd_block2", "fwd_partial", "bwd_dx", "bwd_dq", "phase1_out", "phase1_m", "phase1_l", "merge",
                "fwd_torch.bfloat16", "fwd_torch.float16"}
    assert set(errors) == expected
    bad = {k: v for k, v in errors.items() if v > 0}
    assert not bad, f"Triton (interpreted) outside tolerance: {bad}"


def test_triton_kernels_compile_for_sm90():
    """The interpreter does not run Triton's compiler; compile the kernels for an H100/H200 target
    ahead of time (no GPU needed) with the specialisation the JIT gives D = 2304, bf16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_compile.ops.attn_res import kernel as K

    block_r, block_d, warps, stages = K.kernel_config(2304)
    fwd = K.kernel_config(2304, forward=True)
    common = {"R": "i32", "D": "i32", "N": "i32", "stride_xn": "i32", "eps": "fp32",
              "BLOCK_R": "constexpr", "BLOCK_D": "constexpr", "NUM_STAGES": "constexpr"}
    kernels = [
        (K._attn_res_fwd_kernel,
         {"X": "*bf16", "P": "*bf16", "Q": "*bf16", "O": "*bf16", "M": "*fp32", "L": "*fp32", "S": "i32",
          "STORE_STATS": "constexpr", "HAS_PARTIAL": "constexpr", **common},
         {"STORE_STATS": True, "HAS_PARTIAL": False}),
        (K._attn_res_fwd_kernel,
         {"X": "*bf16", "P": "*bf16", "Q": "*bf16", "O": "*bf16", "M": "*fp32", "L": "*fp32", "S": "i32",
          "STORE_STATS": "constexpr", "HAS_PARTIAL": "constexpr", **common},
         {"STORE_STATS": False, "HAS_PARTIAL": True}),
        (K._attn_res_bwd_kernel,
         {"X": "*bf16", "Q": "*bf16", "G": "*bf16", "DX": "*bf16", "DQP": "*fp32", "num_rb": "i32", **common}, {}),
    ]
    for fn, sig, extra in kernels:
        sig = {name: sig[name] for name in fn.arg_names}
        cfg = fwd if fn is K._attn_res_fwd_kernel else (block_r, block_d, warps, stages)
        consts = {"BLOCK_R": cfg[0], "BLOCK_D": cfg[1], "NUM_STAGES": cfg[3], **extra}
        hints = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
                 for n, t in sig.items() if t.startswith("*") or n in ("D", "stride_xn")}
        compiled = triton.compile(ASTSource(fn, sig, consts, hints), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg[2]})
        ptx = compiled.asm["ptx"]
        assert ".v4" in ptx, f"{fn.__name__}: loads not vectorised"


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_float64(dtype):
    for N, B, T, D in [(1, 1, 1, 72), (5, 2, 300, 100), (10, 2, 65, 2304), (3, 1, 7, 1)]:
        x, q = _inputs(N, B, T, D, dtype=dtype, device="cuda", seed=N + D)
        out = attn_res(x, q)
        assert out.device.type == "cuda" and out.dtype == dtype
        torch.testing.assert_close(out.double().cpu(), ref64(x.cpu(), q.cpu()), **_tol(dtype))

        grad = torch.randn(B, T, D, device="cuda").to(dtype)
        xg = x.clone().requires_grad_(True)
        qg = q.clone().requires_grad_(True)
        attn_res(xg, qg).backward(grad)
        x64 = x.cpu().double().requires_grad_(True)
        q64 = q.cpu().double().requires_grad_(True)
        ref64(x64, q64).backward(grad.cpu().double())
        gtol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(xg.grad.cpu().double(), x64.grad, **gtol)
        scale = q64.grad.abs().max().item() + 1.0
        assert (qg.grad.cpu().double() - q64.grad).abs().max().item() <= gtol["atol"] * scale * 10

        if N > 1:
            out_p = attn_res(x[:-1], q, partial=x[-1].clone())
            torch.testing.assert_close(out_p.double().cpu(), ref64(x.cpu(), q.cpu()), **_tol(dtype))
            Q = (torch.randn(4, D, device="cuda") * 0.3).to(dtype)
            o, m, l = attn_res_phase1(x[:-1], Q)
            for s in range(4):
                h = attn_res_merge(o[s], m[s], l[s], x[-1], Q[s])
                tol = _tol(dtype) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
                torch.testing.assert_close(h.double().cpu(), ref64(x.cpu(), Q[s].cpu()), **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_cuda_opcheck():
    for N, B, T, D in [(1, 1, 1, 72), (4, 2, 33, 100)]:
        x, q = _inputs(N, B, T, D, device="cuda", seed=N)
        torch.library.opcheck(torch.ops.kimi.attn_res.default, (x.clone().requires_grad_(True), q.clone().requires_grad_(True), EPS))
        torch.library.opcheck(torch.ops.kimi.attn_res_backward.default, (torch.randn(B, T, D, device="cuda"), x, q, EPS))
        Q = torch.randn(3, D, device="cuda")
        torch.library.opcheck(torch.ops.kimi.attn_res_phase1.default, (x, Q, EPS))
        o, m, l = attn_res_phase1(x, Q)
        torch.library.opcheck(torch.ops.kimi.attn_res_merge.default, (o[0], m[0], l[0], torch.randn(B, T, D, device="cuda"), Q[0], EPS))
