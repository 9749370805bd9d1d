"""kimi::kda against a plain float64 token loop, state continuity, autograd, opcheck, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

from kimi_compile.ops import kda, kda_decode_


def kda_loop(q, k, v, g, beta, initial_state=None, scale=None):
    """The recurrence exactly as written: one token at a time, float64."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = HV // H
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, HV, K, V, dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    o = torch.zeros(B, T, HV, V, dtype=torch.float64)
    for t in range(T):
        for hv in range(HV):
            qt, kt = q[:, t, hv // group], k[:, t, hv // group]  # [B, K]
            S[:, hv] = g[:, t, hv].exp()[:, :, None] * S[:, hv]
            err = v[:, t, hv] - torch.einsum("bk,bkv->bv", kt, S[:, hv])
            S[:, hv] = S[:, hv] + beta[:, t, hv, None, None] * kt[:, :, None] * err[:, None, :]
            o[:, t, hv] = scale * torch.einsum("bk,bkv->bv", qt, S[:, hv])
    return o, S


def make_inputs(B, T, H, K, V, HV=None, dtype=torch.float64, decay=1.0, with_state=True, N=None, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    HV = HV or H
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    g = -decay * torch.rand(B, T, HV, K, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    s0 = torch.randn(N or B, HV, K, V, generator=gen, dtype=torch.float64) if with_state else None
    cast = lambda x: x.to(dtype)  # noqa: E731
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (cast(q), cast(k), cast(v), cast(g), cast(beta), None if s0 is None else s0.to(state_dtype))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
@pytest.mark.parametrize("B,H", [(1, 1), (3, 4)])
def test_matches_loop_float64(T, B, H):
    inputs = make_inputs(B, T, H, K=8, V=8)
    o, s = kda(*inputs)
    ro, rs = kda_loop(*inputs)
    assert o.dtype == torch.float64 and s.dtype == torch.float64
    assert rel(o, ro) < 1e-10 and rel(s, rs) < 1e-10


@pytest.mark.parametrize("case", ["gva", "k_ne_v", "strong_decay", "no_decay", "no_state", "scale"])
def test_variants_float64(case):
    kw = dict(B=2, T=97, H=2, K=16, V=16)
    scale = None
    if case == "gva":
        kw["HV"] = 4
    if case == "k_ne_v":
        kw.update(K=12, V=20)
    if case == "strong_decay":
        kw["decay"] = 20.0
    if case == "no_decay":
        kw["decay"] = 0.0
    if case == "no_state":
        kw["with_state"] = False
    if case == "scale":
        scale = 0.37
    inputs = make_inputs(**kw)
    o, s = kda(*inputs, scale=scale)
    ro, rs = kda_loop(*inputs, scale=scale)
    assert torch.isfinite(o).all()
    assert rel(o, ro) < 1e-10 and rel(s, rs) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_low_precision(dtype, tol):
    inputs = make_inputs(2, 77, 2, 16, 16, HV=4, dtype=dtype, decay=5.0)
    o, s = kda(*inputs)
    assert o.dtype == dtype and s.dtype == torch.float32
    ro, rs = kda_loop(*inputs)
    assert rel(o, ro) < tol and rel(s, rs) < tol


def test_varlen_three_sequences():
    lens = [37, 1, 90]
    T = sum(lens)
    q, k, v, g, beta, s0 = make_inputs(1, T, 2, 8, 12, HV=4, N=3, decay=3.0)
    cu = torch.tensor([0, 37, 38, 128], dtype=torch.int64)
    o, s = kda(q, k, v, g, beta, s0, cu_seqlens=cu)
    assert s.shape == (3, 4, 8, 12)
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ro, rs = kda_loop(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi], s0[n:n + 1])
        assert rel(o[:, lo:hi], ro) < 1e-10
        assert rel(s[n:n + 1], rs) < 1e-10


@pytest.mark.parametrize("split", [1, 40, 64, 99])
def test_state_continuity(split):
    q, k, v, g, beta, s0 = make_inputs(2, 100, 2, 8, 8, decay=2.0)
    o_all, s_all = kda(q, k, v, g, beta, s0)
    o_a, s_a = kda(q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], s0)
    o_b, s_b = kda(q[:, split:], k[:, split:], v[:, split:], g[:, split:], beta[:, split:], s_a)
    assert rel(torch.cat([o_a, o_b], 1), o_all) < 1e-12 and rel(s_b, s_all) < 1e-12
    s = s0
    outs = []
    for t in range(100):
        o_t, s = kda(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], s)
        outs.append(o_t)
    assert rel(torch.cat(outs, 1), o_all) < 1e-12 and rel(s, s_all) < 1e-12


def test_final_state_is_new_tensor():
    q, k, v, g, beta, s0 = make_inputs(1, 5, 1, 4, 4)
    before = s0.clone()
    _, s = kda(q, k, v, g, beta, s0)
    assert s.data_ptr() != s0.data_ptr() and torch.equal(s0, before)


# ------------------------------------------------------------------------ kda_decode_ (the state updated in place)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,H,HV,K,V", [(1, 1, 1, 1, 8, 8), (3, 1, 2, 4, 8, 6), (2, 7, 2, 2, 4, 12),
                                          (2, 65, 1, 2, 8, 8)])
def test_decode_in_place_matches_loop(dtype, B, T, H, HV, K, V):
    """o against the float64 loop and the state buffer overwritten with the loop's final state, in place (same
    storage); T=1 (decode), a short piece, GVA, K != V, and T past one 64-token chunk."""
    q, k, v, g, beta, s0 = make_inputs(B, T, H, K, V, HV=HV, dtype=dtype, decay=2.0)
    ro, rs = kda_loop(q, k, v, g, beta, s0)
    state = s0.clone()
    ptr = state.data_ptr()
    with torch.no_grad():
        o = kda_decode_(q, k, v, g, beta, state)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert o.dtype == dtype and o.shape == v.shape and state.data_ptr() == ptr and state.dtype == s0.dtype
    assert rel(o, ro) < tol and rel(state, rs) < tol


def test_decode_in_place_token_by_token_is_the_whole_sequence():
    """State continuity through one buffer: kda_decode_ a token at a time == kda over the whole sequence."""
    q, k, v, g, beta, s0 = make_inputs(2, 30, 2, 8, 8, HV=4, decay=2.0)
    o_all, s_all = kda(q, k, v, g, beta, s0)
    state = s0.clone()
    with torch.no_grad():
        outs = [kda_decode_(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], state)
                for t in range(30)]
    assert rel(torch.cat(outs, 1), o_all) < 1e-12 and rel(state, s_all) < 1e-12


def test_decode_in_place_compiles_without_breaks_and_mutates_the_buffer():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    q, k, v, g, beta, s0 = make_inputs(2, 1, 2, 8, 8, dtype=torch.float32)
    want_o, want_s = kda(q, k, v, g, beta, s0)
    counter = CompileCounterWithBackend("inductor")
    state = s0.clone()
    with torch.no_grad():
        o = torch.compile(lambda *a: kda_decode_(*a) * 1.0, backend=counter, fullgraph=True)(q, k, v, g, beta, state)
    assert counter.frame_count == 1
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, want_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_in_place_opcheck(dtype):
    q, k, v, g, beta, s0 = make_inputs(2, 3, 1, 4, 4, HV=2, dtype=dtype)
    torch.library.opcheck(torch.ops.kimi.kda_decode_.default, (q, k, v, g, beta, s0, 0.5))


@pytest.mark.parametrize("with_state,varlen", [(True, False), (False, False), (True, True)])
def test_gradcheck(with_state, varlen):
    B = 1 if varlen else 2
    q, k, v, g, beta, s0 = make_inputs(B, 7, 1, 3, 2, HV=2, with_state=with_state, N=2 if varlen else None, decay=2.0)
    cu = torch.tensor([0, 3, 7]) if varlen else None
    args = [x.requires_grad_() for x in (q, k, v, g, beta)] + [s0.requires_grad_() if with_state else None]
    assert torch.autograd.gradcheck(lambda *a: kda(*a, cu_seqlens=cu), tuple(args))


@pytest.mark.parametrize("shape", [dict(B=2, T=5, H=1, K=4, V=3), dict(B=1, T=33, H=2, K=4, V=4, HV=4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype):
    q, k, v, g, beta, s0 = make_inputs(**shape, dtype=dtype)
    args = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]
    torch.library.opcheck(torch.ops.kimi.kda.default, (*args, 0.5, None))
    torch.library.opcheck(torch.ops.kimi.kda.default, (*args[:5], None, None, None))


def test_opcheck_varlen():
    q, k, v, g, beta, s0 = make_inputs(1, 9, 1, 4, 4, N=2, dtype=torch.float32)
    args = [x.requires_grad_() for x in (q, k, v, g, beta, s0)]
    torch.library.opcheck(torch.ops.kimi.kda.default, (*args, None, torch.tensor([0, 4, 9])))


def _two_op_fn(x, conv_w, conv_state, q, k, g, beta, s0):
    from kimi_compile.ops import short_conv

    y, conv_state = short_conv(x, conv_w, None, conv_state)
    B, T, _ = y.shape
    v = y.view(B, T, 2, 4)
    o, s = kda(q, k, v, g, beta, s0)
    return o, s, conv_state


def _two_op_inputs(T):
    q, k, v, g, beta, s0 = make_inputs(2, T, 2, 4, 4, dtype=torch.float32)
    x = torch.randn(2, T, 8)
    return (x, torch.randn(8, 4), torch.randn(2, 8, 3), q, k, g, beta, s0)


def test_compile_no_graph_breaks_no_recompiles():
    explanation = torch._dynamo.explain(_two_op_fn)(*_two_op_inputs(17))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(_two_op_fn, backend=counter, fullgraph=True, dynamic=True)
    for T in (5, 17, 64, 101):
        inputs = _two_op_inputs(T)
        got = compiled(*inputs)
        want = _two_op_fn(*inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_export_keeps_one_node():
    inputs = make_inputs(1, 6, 1, 4, 4, dtype=torch.float32)

    class M(torch.nn.Module):
        def forward(self, q, k, v, g, beta, s0):
            return kda(q, k, v, g, beta, s0)

    ep = torch.export.export(M(), inputs)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.kimi.kda.default) == 1


# --------------------------------------------------------------------------------------- bad input
def _good():
    return list(make_inputs(2, 6, 2, 4, 4, HV=4, dtype=torch.float32))


@pytest.mark.parametrize("mutate,exc,name", [
    (lambda a: a.__setitem__(1, a[1][:1]), ValueError, "k"),                       # mismatched B
    (lambda a: a.__setitem__(2, a[2][:, :5]), ValueError, "v"),                    # mismatched T
    (lambda a: a.__setitem__(2, torch.randn(2, 6, 3, 4)), ValueError, "v.shape[2]"),  # HV not multiple of H
    (lambda a: a.__setitem__(3, a[3][..., :3]), ValueError, "g"),                  # g wrong shape
    (lambda a: a.__setitem__(4, a[4][..., :1]), ValueError, "beta"),               # beta wrong shape
    (lambda a: a.__setitem__(5, a[5][:1]), ValueError, "initial_state"),           # state wrong shape
    (lambda a: a.__setitem__(5, a[5].double()), TypeError, "initial_state"),       # state wrong dtype
    (lambda a: a.__setitem__(0, a[0].long()), TypeError, "q"),                     # non-float
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "q"),                        # wrong rank
    (lambda a: a.__setitem__(4, a[4].to("meta")), ValueError, "beta"),             # different devices
])
def test_bad_input(mutate, exc, name):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=name.replace("[", r"\[").replace("]", r"\]")):
        kda(*args)


def test_bad_head_dim():
    args = list(make_inputs(1, 2, 1, 300, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="q.shape"):
        kda(*args)


def test_bad_cu_seqlens():
    q, k, v, g, beta, s0 = make_inputs(1, 10, 1, 4, 4, N=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kda(q, k, v, g, beta, s0, cu_seqlens=torch.tensor([0, 6, 4]))   # not monotone
    with pytest.raises(ValueError, match="cu_seqlens"):
        kda(q, k, v, g, beta, s0, cu_seqlens=torch.tensor([0, 4, 9]))   # does not end at T
    with pytest.raises(TypeError, match="cu_seqlens"):
        kda(q, k, v, g, beta, s0, cu_seqlens=torch.tensor([0.0, 4.0, 10.0]))
    q2, k2, v2, g2, b2, _ = make_inputs(2, 10, 1, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kda(q2, k2, v2, g2, b2, None, cu_seqlens=torch.tensor([0, 4, 10]))  # B != 1


def test_long_sequence():
    """T = 32768, H = 4, K = V = 64 runs on the CPU (chunked; its speed is in bench/, not here)."""
    q, k, v, g, beta, _ = make_inputs(1, 32768, 4, 64, 64, dtype=torch.float32, with_state=False, seed=0)
    o, s = kda(q, k, v, g, beta)
    # the last 100 tokens, continued from the state after T - 100, agree with the whole pass
    o_head, s_head = kda(q[:, :-100], k[:, :-100], v[:, :-100], g[:, :-100], beta[:, :-100])
    o_tail, s_tail = kda_loop(q[:, -100:], k[:, -100:], v[:, -100:], g[:, -100:], beta[:, -100:], s_head)
    assert rel(o[:, -100:], o_tail) < 1e-4 and rel(s, s_tail) < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# the oracle (ops/kda/naive.py) and the kernels' tuning (ops/kda/tuning.py)
# ---------------------------------------------------------------------------------------------------------------

def test_naive_loop_and_chunked_forms_match_the_plain_loop():
    from kimi_compile.ops.kda.naive import kda_reference_chunked, kda_reference_loop
    q, k, v, g, beta, s0 = make_inputs(2, 45, 2, K=8, V=4, HV=4, decay=3.0)
    ro, rs = kda_loop(q, k, v, g, beta, s0)
    for fn in (kda_reference_loop, kda_reference_chunked):
        o, s = fn(q, k, v, g, beta, s0)
        assert rel(o, ro) < 1e-12 and rel(s, rs) < 1e-12, fn.__name__
    cu = torch.tensor([0, 7, 7, 30], dtype=torch.int64)
    q, k, v, g, beta, s0 = make_inputs(1, 30, 1, K=8, V=4, N=3)
    a = kda_reference_loop(q, k, v, g, beta, s0, None, cu)
    b = kda_reference_chunked(q, k, v, g, beta, s0, None, cu, chunk=4)
    assert rel(a[0], b[0]) < 1e-12 and rel(a[1], b[1]) < 1e-12


def test_kda_tuning_overrides_restores_and_names_unknown_fields():
    from kimi_compile.ops.kda.tuning import KDATuning, current_tuning, kda_tuning
    default = current_tuning()
    assert default == KDATuning()
    with kda_tuning(pass_bv=64, bwd_bk=32) as t:
        assert current_tuning() is t and t.pass_bv == 64 and t.bwd_bk == 32 and t.decode_bv == default.decode_bv
    assert current_tuning() is default
    with pytest.raises(RuntimeError):
        with kda_tuning(span_max=10.0):
            raise RuntimeError("inside")
    assert current_tuning() is default
    with pytest.raises(TypeError, match="pass_bvv"):
        with kda_tuning(pass_bvv=64):
            pass
    with pytest.raises(Exception):  # frozen: no in-place edits
        default.pass_bv = 16


def test_recurrent_launch_config_defaults_are_the_tunings():
    """The plugin's launch config is embedded as source, so its defaults are literals: they must be KDATuning's."""
    import inspect

    pytest.importorskip("triton")
    from kimi_compile.ops.kda.recurrent import kda_plugin_constexprs, kda_recurrent_launch_config
    from kimi_compile.ops.kda.tuning import KDATuning
    params = inspect.signature(kda_recurrent_launch_config).parameters
    assert params["decode_bv"].default == KDATuning.decode_bv and params["decode_warps"].default == KDATuning.decode_warps
    assert inspect.signature(kda_plugin_constexprs).parameters["decode_bv"].default == KDATuning.decode_bv
    cfg = kda_recurrent_launch_config(3, 1, 4, 100, 200)
    assert cfg["BK"] == 128 and cfg["BV"] == 64 and cfg["grid"] == (4, 12, 1)


# ---------------------------------------------------------------------------------------------------------------
# non-finite inputs: causality (a bad token reaches only itself and later tokens), g = -inf exact
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("arg", ["q", "k", "v", "g", "beta"])
def test_nonfinite_input_reaches_only_later_outputs(arg, bad):
    """Token 40 sits inside a reference chunk (32 tokens): the chunked CPU path must not pass it to tokens 32-39."""
    inputs = list(make_inputs(1, 70, 2, K=8, V=4, seed=21))
    t = 40
    inputs[["q", "k", "v", "g", "beta"].index(arg)][0, t] = bad
    o, s = kda(*inputs)
    ro, rs = kda_loop(*inputs)
    assert torch.isfinite(o[:, :t]).all() and rel(o[:, :t], ro[:, :t]) < 1e-10
    finite = torch.isfinite(ro)
    assert torch.equal(torch.isfinite(o), finite), (arg, bad)
    if finite.any():
        assert rel(o[finite], ro[finite]) < 1e-10
    assert torch.equal(torch.isfinite(s), torch.isfinite(rs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_forget_and_huge_decays_are_exact(dtype):
    """g = -inf (a full forget of a channel, or of a whole head) is a legitimate decay: no NaN from -inf - (-inf);
    decays whose running sum leaves float32's range stay finite too."""
    q, k, v, g, beta, s0 = make_inputs(2, 70, 2, K=8, V=4, seed=22)
    g = g.clone()
    g[0, 0, 0, :3] = -float("inf")  # first token, some channels
    g[0, 31:33, 1] = -float("inf")  # both sides of a chunk boundary, whole head
    g[1, 45, :, 5] = -float("inf")  # inside a chunk
    g[1, 50:] *= 1e37 if dtype == torch.float32 else 1e300  # running sums past the dtype's range
    inputs = [x.to(dtype) for x in (q, k, v, g, beta)] + [s0.to(dtype)]
    o, s = kda(*inputs)
    ro, rs = kda_loop(*inputs)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel(o, ro) < tol and rel(s, rs) < tol
