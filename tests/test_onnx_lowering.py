"""ONNX lowerings of the kimi ops, run in ONNX Runtime (CPU) against independent float64 loops.

One small module calls every op; it is exported once per lowering path (opset 27 default, opset <= 18
fallback) with dynamic batch / time axes and run on several shapes (T = 1, odd T, T above and not a multiple
of the fallback chunk, B > 1, grouped value heads, with and without carried state).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import kimi_compile.ops as kops
from kimi_compile.ops import moe as kmoe
from kimi_compile.ops.attn_res import attn_res as attn_res_op
from kimi_compile.ops.attn_res import attn_res_merge, attn_res_phase1

ort = pytest.importorskip("onnxruntime")

H, HV, K, V = 2, 4, 8, 6  # grouped value heads: HV = 2 H
C, W = 6, 4  # conv channels and kernel
N_SRC, D = 3, 10  # AttnRes sources and width
E, I_MOE, TOPK = 5, 7, 2  # experts, expert width, top-k


# -------------------------------------------------------------------------------------------- float64 references


def ref_kda(q, k, v, g, beta, s0, scale):
    """Token-by-token KDA in float64; q, k [B,T,H,K] (head hv reads q/k head hv // (HV // H))."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, Hq, Kd = q.shape
    Hv, Vd = v.shape[2], v.shape[3]
    rep = Hv // Hq
    S = torch.zeros(B, Hv, Kd, Vd, dtype=torch.float64) if s0 is None else s0.double().clone()
    o = torch.zeros(B, T, Hv, Vd, dtype=torch.float64)
    for b in range(B):
        for h in range(Hv):
            for t in range(T):
                qt, kt = q[b, t, h // rep], k[b, t, h // rep]
                S[b, h] = torch.exp(g[b, t, h])[:, None] * S[b, h]
                err = v[b, t, h] - kt @ S[b, h]
                S[b, h] = S[b, h] + beta[b, t, h] * torch.outer(kt, err)
                o[b, t, h] = scale * (qt @ S[b, h])
    return o, S


def ref_conv(x, w, bias, s0, act):
    x, w = x.double(), w.double()
    B, T, Cc = x.shape
    Wk = w.shape[1]
    state = torch.zeros(B, Cc, Wk - 1, dtype=torch.float64) if s0 is None else s0.double()
    xpad = torch.cat([state, x.transpose(1, 2)], dim=2)
    y = torch.zeros(B, T, Cc, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for c in range(Cc):
                acc = 0.0 if bias is None else float(bias[c])
                for j in range(Wk):
                    acc += float(w[c, j]) * float(xpad[b, c, t + j])
                y[b, t, c] = acc
    if act == "silu":
        y = y * torch.sigmoid(y)
    return y, xpad[:, :, xpad.shape[2] - (Wk - 1):]


def ref_attn_res(sources, query, eps=1e-6):
    x = sources.double()
    out = torch.zeros(x.shape[1:], dtype=torch.float64)
    for b in range(x.shape[1]):
        for t in range(x.shape[2]):
            scores = torch.stack([query.double() @ (x[n, b, t] / torch.sqrt((x[n, b, t] ** 2).mean() + eps))
                                  for n in range(x.shape[0])])
            alpha = torch.softmax(scores, 0)
            out[b, t] = sum(alpha[n] * x[n, b, t] for n in range(x.shape[0]))
    return out


def ref_moe(x, ids, weights, wg, wu, wd):
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(wg[e].double() @ x[t]) * (wu[e].double() @ x[t])
            out[t] += float(weights[t, j]) * (wd[e].double() @ h)
    return out


# -------------------------------------------------------------------------------------------- the module


class AllOps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_w = torch.nn.Parameter(torch.randn(C, W, generator=gen) * 0.5)
        self.conv_b = torch.nn.Parameter(torch.randn(C, generator=gen) * 0.5)
        self.query = torch.nn.Parameter(torch.randn(D, generator=gen))
        self.queries = torch.nn.Parameter(torch.randn(2, D, generator=gen))
        self.wg = torch.nn.Parameter(torch.randn(E, I_MOE, D, generator=gen) * 0.3)
        self.wu = torch.nn.Parameter(torch.randn(E, I_MOE, D, generator=gen) * 0.3)
        self.wd = torch.nn.Parameter(torch.randn(E, D, I_MOE, generator=gen) * 0.3)

    def forward(self, q, k, v, g, beta, s0, x, cs0, src, mx, ids, wts):
        o1, s1 = kops.kda(q, k, v, g, beta, s0, 0.7)
        o2, s2 = kops.kda(q, k, v, g, beta)
        y1, c1 = kops.short_conv(x, self.conv_w, self.conv_b, cs0, "silu")
        y2, c2 = kops.short_conv(x, self.conv_w, None, None, "none")
        ar = attn_res_op(src, self.query)
        ar_partial = attn_res_op(src[:-1], self.query, partial=src[-1] * 1.5)  # the last source passed apart
        out1, m1, l1 = attn_res_phase1(src[:-1], self.queries)
        merged = attn_res_merge(out1[1], m1[1], l1[1], src[-1], self.queries[1])
        moe = kmoe.moe_experts(mx, ids, wts, self.wg, self.wu, self.wd)
        return o1, s1, o2, s2, y1, c1, y2, c2, ar, ar_partial, merged, moe


NAMES_IN = ["q", "k", "v", "g", "beta", "s0", "x", "cs0", "src", "mx", "ids", "wts"]
NAMES_OUT = ["o1", "s1", "o2", "s2", "y1", "c1", "y2", "c2", "ar", "ar_partial", "merged", "moe"]


def make_inputs(B: int, T: int, M: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -torch.rand(B, T, HV, K, generator=gen) * 2.0  # strong and weak decays
    g[..., 0] = -30.0  # an extreme channel: exp(G) underflows within a chunk, nothing may overflow
    beta = torch.rand(B, T, HV, generator=gen)
    s0 = torch.randn(B, HV, K, V, generator=gen)
    x = torch.randn(B, T, C, generator=gen)
    cs0 = torch.randn(B, C, W - 1, generator=gen)
    src = torch.randn(N_SRC, B, T, D, generator=gen) * 2
    mx = torch.randn(M, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:TOPK] for _ in range(M)])
    ids[ids == E - 1] = 0  # expert E-1 never chosen: the Loop must skip it
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % (E - 1), ids[:, 1])
    wts = torch.rand(M, TOPK, generator=gen)
    return (q, k, v, g, beta, s0, x, cs0, src, mx, ids, wts)


def _export(fallback: bool):
    from kimi_compile.lowering.onnx import custom_translation_table, raise_default_opset

    batch, seq, tokens = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length"), torch.export.Dim("m")
    bt = {0: batch, 1: seq}
    dyn = (bt, bt, bt, bt, bt, {0: batch}, bt, {0: batch}, {1: batch, 2: seq}, {0: tokens}, {0: tokens},
           {0: tokens})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(AllOps().eval(), make_inputs(2, 5, 6, 0), dynamo=True, dynamic_shapes=dyn,
                                    custom_translation_table=custom_translation_table(fallback),
                                    input_names=NAMES_IN, output_names=NAMES_OUT, opset_version=18, verbose=False)
    proto = program.model_proto
    if not fallback:
        raise_default_opset(proto)
    return proto


@pytest.fixture(scope="module", params=[False, True], ids=["opset27", "fallback"])
def exported(request):
    proto = _export(request.param)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return request.param, proto, sess


def _all_op_types(proto):
    from kimi_compile.export.onnx import graph_op_counts

    return graph_op_counts(proto)


def test_graph_ops_per_path(exported):
    fallback, proto, _ = exported
    ops = _all_op_types(proto)
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    if fallback:
        assert "LinearAttention" not in ops and "CausalConvWithState" not in ops
        assert opset <= 21
        assert ops.get("Loop", 0) >= 3  # chunk loop + WY inverse per KDA call... and the MoE loop
    else:
        assert ops["LinearAttention"] == 2 and ops["CausalConvWithState"] == 2
        assert opset == 27
    for node in proto.graph.node:
        if node.op_type == "LinearAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["update_rule"] == b"gated_delta"
            assert attrs["q_num_heads"] == HV and attrs["kv_num_heads"] == HV


@pytest.mark.parametrize("B,T,M", [(1, 1, 1), (2, 5, 6), (3, 17, 50), (1, 40, 9)])
def test_ops_match_float64_loops(exported, B, T, M):
    _, _, sess = exported
    inputs = make_inputs(B, T, M, seed=B * 100 + T)
    feeds = {n: x.numpy() for n, x in zip(NAMES_IN, inputs)}
    got = dict(zip(NAMES_OUT, sess.run(None, feeds)))
    q, k, v, g, beta, s0, x, cs0, src, mx, ids, wts = inputs
    mod = AllOps()

    o1, s1 = ref_kda(q, k, v, g, beta, s0, 0.7)
    o2, s2 = ref_kda(q, k, v, g, beta, None, K ** -0.5)
    y1, c1 = ref_conv(x, mod.conv_w.detach(), mod.conv_b.detach(), cs0, "silu")
    y2, c2 = ref_conv(x, mod.conv_w.detach(), None, None, "none")
    ar = ref_attn_res(src, mod.query.detach())
    ar_partial = ref_attn_res(torch.cat([src[:-1], src[-1:] * 1.5]), mod.query.detach())
    merged = ref_attn_res(src, mod.queries.detach()[1])
    moe = ref_moe(mx, ids, wts, mod.wg.detach(), mod.wu.detach(), mod.wd.detach())
    expected = dict(o1=o1, s1=s1, o2=o2, s2=s2, y1=y1, c1=c1, y2=y2, c2=c2, ar=ar, ar_partial=ar_partial,
                    merged=merged, moe=moe)
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref.numpy(), rtol=1e-4, atol=2e-5, err_msg=name)


def test_state_carries_across_calls(exported):
    """Two ORT calls with the carried KDA / conv state equal one call over the concatenation."""
    _, _, sess = exported
    B, T, cut = 2, 23, 9
    inputs = make_inputs(B, T, 4, seed=7)
    full = dict(zip(NAMES_OUT, sess.run(None, {n: x.numpy() for n, x in zip(NAMES_IN, inputs)})))
    first = [x[:, :cut] if i in (0, 1, 2, 3, 4, 6) else x for i, x in enumerate(inputs)]
    first[8] = inputs[8][:, :, :cut]
    a = dict(zip(NAMES_OUT, sess.run(None, {n: x.numpy() for n, x in zip(NAMES_IN, first)})))
    second = [x[:, cut:] if i in (0, 1, 2, 3, 4, 6) else x for i, x in enumerate(inputs)]
    second[5] = torch.from_numpy(a["s1"])
    second[7] = torch.from_numpy(a["c1"])
    second[8] = inputs[8][:, :, cut:]
    b = dict(zip(NAMES_OUT, sess.run(None, {n: x.numpy() for n, x in zip(NAMES_IN, second)})))
    np.testing.assert_allclose(np.concatenate([a["o1"], b["o1"]], 1), full["o1"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b["s1"], full["s1"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([a["y1"], b["y1"]], 1), full["y1"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b["c1"], full["c1"], rtol=0, atol=0)


def test_lowering_rejects_varlen():
    from kimi_compile.lowering.onnx import kda_linear_attention

    class V:
        shape = (1, 4, H, K)

    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        kda_linear_attention(V(), V(), V(), V(), V(), None, None, cu_seqlens=V())


@pytest.mark.parametrize("shape,axis,problem", [(None, 0, "no known shape"), ((2, 3), 2, "no known shape"),
                                                ((2, "T"), 1, "symbolic dimension SymbolicDim('T')"), ((2, 3), -3, "no known shape")])
@pytest.mark.parametrize("lowering", ["onnx", "tensorrt"])
def test_static_dim_errors_name_the_dimension_and_the_value(shape, axis, problem, lowering):
    import onnx_ir as ir
    from kimi_compile.lowering import onnx_builder
    from kimi_compile.lowering.tensorrt import ir_helpers
    value = ir.Value(name="q_in", shape=None if shape is None else ir.Shape(list(shape)))
    fn = onnx_builder.static_dim if lowering == "onnx" else ir_helpers.static_dim
    with pytest.raises(ValueError, match="head dim") as e:
        fn(value, axis, "head dim")
    msg = str(e.value)
    assert problem in msg and "'q_in'" in msg and ("TensorRT" in msg) == (lowering == "tensorrt"), msg
    assert onnx_builder.static_dim(ir.Value(name="k", shape=ir.Shape([2, 5])), -1, "x") == 5
