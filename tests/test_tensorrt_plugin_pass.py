"""The ONNX rewrite between standard ops and TensorRT plugin nodes (lowering/tensorrt/graph.py), on small hand-built
graphs: optional inputs become zeros, layouts round-trip, graph inputs / outputs keep their names, nodes that
are not the kimi ops stay, and plugin -> standard gives the same numbers in ONNX Runtime as the original."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kimi_compile.lowering import plugin_spec as ps
from kimi_compile.lowering import tensorrt as lt

B, T, H, K, V, C, W = "batch_size", "sequence_length", 2, 4, 3, 6, 4


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _graph(rule="gated_delta", decay_per_key=True):
    """x [B,T,C] -> Transpose -> CausalConvWithState (no bias, no state) -> Transpose -> y [B,T,C];
    xc [B,C,T] -> CausalConvWithState (bias, state, no activation) straight to graph outputs;
    LinearAttention without past_state."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [C, 1, W], np.random.default_rng(0).standard_normal(C * W).tolist())
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [C], np.random.default_rng(1).standard_normal(C).tolist())
    dk = H * K if decay_per_key else H
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("CausalConvWithState", ["xt", "w"], ["yt", "conv1_state"], activation="silu"),
        helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 1]),
        helper.make_node("CausalConvWithState", ["xc", "w", "bias", "s0"], ["yc", "conv2_state"]),
        helper.make_node("LinearAttention", ["q", "k", "v", "", "g" if rule != "delta" else "", "beta"], ["o", "kda_state"],
                         q_num_heads=H, kv_num_heads=H, update_rule=rule, scale=0.4),
    ]
    inputs = [_vi("x", [B, T, C]), _vi("xc", [B, C, T]), _vi("s0", [B, C, W - 1]), _vi("q", [B, T, H * K]),
              _vi("k", [B, T, H * K]), _vi("v", [B, T, H * V]), _vi("g", [B, T, dk]), _vi("beta", [B, T, H])]
    outputs = [_vi("y", [B, T, C]), _vi("conv1_state", [B, C, W - 1]), _vi("yc", [B, C, T]),
               _vi("conv2_state", [B, C, W - 1]), _vi("o", [B, T, H * V]), _vi("kda_state", [B, H, K, V])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[w, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 27)])
    return onnx.shape_inference.infer_shapes(model)


def _feeds(batch=2, steps=5, decay_per_key=True):
    r = np.random.default_rng(7)
    q = r.standard_normal((batch, steps, H, K))
    k = r.standard_normal((batch, steps, H, K))
    q, k = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    dk = H * K if decay_per_key else H
    f = np.float32
    return {"x": r.standard_normal((batch, steps, C)).astype(f), "xc": r.standard_normal((batch, C, steps)).astype(f),
            "s0": r.standard_normal((batch, C, W - 1)).astype(f), "q": q.reshape(batch, steps, -1).astype(f),
            "k": k.reshape(batch, steps, -1).astype(f), "v": r.standard_normal((batch, steps, H * V)).astype(f),
            "g": -np.log1p(np.exp(r.standard_normal((batch, steps, dk)))).astype(f),
            "beta": (1 / (1 + np.exp(-r.standard_normal((batch, steps, H))))).astype(f)}


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_rewrite_round_trip_matches_the_original_in_onnxruntime():
    model = _graph()
    plugin = lt.to_plugin_graph(model, aot={"kimi::short_conv": True})
    onnx.checker.check_model(plugin, full_check=True)
    assert [o.name for o in plugin.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in plugin.graph.input] == [i.name for i in model.graph.input]
    nodes = lt.plugin_nodes(plugin)
    assert sorted(n.spec.plugin_id for n in nodes) == ["kimi::kda", "kimi::short_conv", "kimi::short_conv"]
    for n in nodes:
        assert n.parser_attributes["plugin_namespace"] == "kimi"
        assert n.parser_attributes["aot"] == (1 if n.spec is ps.SHORT_CONV else 0)
        assert all(n.inputs) and list(n.output_shapes) == ps.output_shapes(n.spec, n.input_shapes, n.attributes)
    kda = next(n for n in nodes if n.spec is ps.KDA)
    assert kda.attributes == {"num_heads": H, "key_dim": K, "value_dim": V, "scale": pytest.approx(0.4)}
    assert kda.input_shapes[5] == (B, H, K, V)  # the missing past_state became zeros of the right shape
    conv1 = next(n for n in nodes if n.spec is ps.SHORT_CONV and n.attributes["activation"] == "silu")
    assert conv1.inputs[0] == "x"  # Transpose pairs around the plugin cancelled: x feeds it directly
    assert conv1.outputs[0] == "y"
    assert not any(n.op_type == "Transpose" and "x" in n.input for n in plugin.graph.node)
    conv2 = next(n for n in nodes if n.spec is ps.SHORT_CONV and n.attributes["activation"] == "none")
    assert conv2.inputs[3] == "s0" and conv2.outputs[1] == "conv2_state"

    standard = lt.to_standard_graph(plugin)
    onnx.checker.check_model(standard, full_check=True)
    assert not lt.plugin_nodes(standard)
    twice = lt.to_standard_graph(lt.to_plugin_graph(standard))  # the passes run on their own output
    onnx.checker.check_model(twice, full_check=True)
    for steps, batch in ((5, 2), (1, 3), (2, 1)):
        feeds = _feeds(batch, steps)
        want = _run(model, feeds)
        for graph in (standard, twice):
            got = _run(graph, feeds)
            assert set(want) == set(got)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("rule, per_key", [("delta", True), ("gated_delta", False)])
def test_other_linear_attention_forms_are_left_alone(rule, per_key):
    plugin = lt.to_plugin_graph(_graph(rule, per_key))
    ops = [(n.domain, n.op_type) for n in plugin.graph.node]
    assert ("", "LinearAttention") in ops and ("kimi", "kda") not in ops
    assert ops.count(("kimi", "short_conv")) == 2
    feeds = _feeds(decay_per_key=per_key)
    want, got = _run(_graph(rule, per_key), feeds), _run(lt.to_standard_graph(plugin), feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_grouped_heads_are_refused():
    model = _graph()
    for node in model.graph.node:
        if node.op_type == "LinearAttention":
            for a in node.attribute:
                if a.name == "q_num_heads":
                    a.i = 2 * H
    with pytest.raises(NotImplementedError, match="kv_num_heads"):
        lt.to_plugin_graph(model)


def test_spec_rules():
    attrs = {"channels": 8, "kernel_size": 4, "activation": "silu"}
    shapes = [(2, 5, 8), (8, 4), (8,), (2, 8, 3)]
    assert ps.output_shapes(ps.SHORT_CONV, shapes, attrs) == [(2, 5, 8), (2, 8, 3)]
    assert ps.output_dtypes(ps.KDA, ["float16"] * 5 + ["float32"]) == ["float16", "float32"]
    with pytest.raises(TypeError, match="state must be float32"):
        ps.output_dtypes(ps.KDA, ["float16"] * 6)
    with pytest.raises(TypeError, match="compute dtype"):
        ps.output_dtypes(ps.SHORT_CONV, ["float32", "float16", "float32", "float32"])
    with pytest.raises(ValueError, match="activation"):
        ps.SHORT_CONV.check_attributes({**attrs, "activation": "gelu"})
    with pytest.raises(ValueError, match="missing"):
        ps.KDA.check_attributes({"num_heads": 2})
    assert ps.spec_for_node("kimi", "kda") is ps.KDA and ps.spec_for_node("", "kda") is None
