"""The graph rewrite: the kimi ops' opset-27 nodes <-> TensorRT plugin nodes.

:func:`to_plugin_graph` rewrites the nodes the ONNX exporter emits for the kimi ops (``LinearAttention`` with
``update_rule="gated_delta"`` and per-key-channel decay, ``CausalConvWithState``) into plugin nodes:
``op_type = <plugin name>``, ``domain = <namespace>``, attribute ``plugin_namespace = <namespace>`` (how
TensorRT's ONNX parser maps a node to a plugin) and ``aot = 1`` when an ahead-of-time kernel exists (the
parser then uses the plugin's ``aot_impl``).  :func:`to_standard_graph` is the exact inverse (used to check
the plugin graph in ONNX Runtime); :func:`set_aot` changes the ``aot`` flags afterwards.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir

from .. import plugin_spec as ps
from ..plugin_spec import KDA, SHORT_CONV, PluginSpec
from .ir_helpers import NAME_TO_ONNX, as_ir, attr, dtype_name, like_input, static_dim

__all__ = ["PLUGIN_OPSET_VERSION", "STANDARD_OPSET", "to_plugin_graph", "to_standard_graph", "set_aot"]

PLUGIN_OPSET_VERSION = 1
STANDARD_OPSET = 27


# ------------------------------------------------------------------------------------------------ building blocks

class _Builder:
    """Collects new nodes; values get unique names under ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self._n = 0

    def __call__(self, op_type: str, inputs: Sequence[Optional[ir.Value]], attributes: Optional[dict] = None, *,
                 domain: str = "", num_outputs: int = 1, name: Optional[str] = None):
        node = ir.node(op_type, list(inputs), attributes or None, domain=domain, num_outputs=num_outputs,
                       name=name or f"{self.prefix}/{op_type}_{self._n}")
        for i, out in enumerate(node.outputs):
            out.name = f"{self.prefix}/{op_type}_{self._n}_out{i}"
        self._n += 1
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(np.asarray(array))
        out = self("Constant", [], {"value": tensor})
        out.dtype = tensor.dtype
        out.shape = ir.Shape(list(np.asarray(array).shape))
        return out


class _Prefixes:
    """Name prefixes not used by any value of the graph yet (passes may run on their own output)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used = set()
        for node in graph:
            for v in node.outputs:
                if v.name:
                    self.used.add(v.name.split("/")[0])

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def _zeros_of(b: _Builder, batch_source: ir.Value, tail: Sequence[int], dtype: ir.DataType) -> ir.Value:
    """Zeros of shape [batch_source.shape[0], *tail] (batch read at run time)."""
    batch = b("Shape", [batch_source], {"start": 0, "end": 1})
    shape = b("Concat", [batch, b.const(np.asarray(list(tail), np.int64))], {"axis": 0})
    out = b("ConstantOfShape", [shape], {"value": ir.tensor(np.zeros(1, dtype=dtype.numpy()))})
    out.dtype = dtype
    return out


def _set(value: ir.Value, dtype: Optional[ir.DataType], shape: Optional[Sequence[Any]]) -> ir.Value:
    if dtype is not None:
        value.dtype = dtype
    if shape is not None:
        value.shape = ir.Shape(list(shape))
    return value


def _permuted(value: ir.Value, perm: Sequence[int]) -> Optional[list]:
    return None if value.shape is None else [value.shape[i] for i in perm]


def _annotate(spec: PluginSpec, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], attrs: dict) -> None:
    """Output dtypes and shapes of a plugin node from the spec's rules (when the input shapes are known)."""
    dts = ps.output_dtypes(spec, [dtype_name(v, t.name) for v, t in zip(inputs, spec.inputs)])
    shapes = None
    if all(v.shape is not None for v in inputs):
        shapes = ps.output_shapes(spec, [list(v.shape) for v in inputs], attrs)
    for i, out in enumerate(outputs):
        _set(out, NAME_TO_ONNX[dts[i]], None if shapes is None else shapes[i])


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_outputs: Sequence[ir.Value]) -> None:
    """Swap ``old`` for ``new_nodes``; its outputs' names, types and uses (graph outputs too) move over."""
    for old_value, new_value in zip(old.outputs, new_outputs):
        name = old_value.name
        old_value.name = None if name is None else f"{name}__replaced"
        if new_value.type is None:
            new_value.type = old_value.type
        if new_value.shape is None:
            new_value.shape = old_value.shape
        new_value.name = name
    ir.convenience.replace_all_uses_with(list(old.outputs), list(new_outputs), replace_graph_outputs=True)
    graph.insert_after(old, new_nodes)
    graph.remove(old, safe=True)


def _cancel_transposes(graph: ir.Graph) -> None:
    """Transpose(Transpose(a, p), q) with q∘p = identity -> a (the layout glue around plugin nodes)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
                continue
            src = node.inputs[0].producer() if node.inputs[0] is not None else None
            if src is None or src.op_type != "Transpose" or src.domain not in ("", "ai.onnx"):
                continue
            p, q = attr(src, "perm"), attr(node, "perm")
            if p is None or q is None or len(p) != len(q) or [p[i] for i in q] != list(range(len(q))):
                continue
            out, origin = node.outputs[0], src.inputs[0]
            if out.is_graph_output():
                if origin.is_graph_input() or origin.is_graph_output() or origin.producer() is None:
                    continue  # keep a node between a graph input and a graph output
                # let the producer of ``origin`` write the graph output directly
                name = out.name
                origin.type = origin.type or out.type
                origin.shape = origin.shape or out.shape
                ir.convenience.replace_all_uses_with(out, origin, replace_graph_outputs=True)
                out.name = f"{name}__cancelled"
                origin.name = name
            else:
                ir.convenience.replace_all_uses_with(out, origin)
            graph.remove(node, safe=True)
            if not any(True for _ in src.outputs[0].uses()) and not src.outputs[0].is_graph_output():
                graph.remove(src, safe=True)
            changed = True
            break


def _set_opset(model: ir.Model, domain: str, version: Optional[int]) -> None:
    for holder in (model.opset_imports, model.graph.opset_imports):
        if version is None:
            holder.pop(domain, None)
        else:
            holder[domain] = version


# ------------------------------------------------------------------------------------------------ standard -> plugin

def _parser_attrs(spec: PluginSpec, aot: bool) -> dict[str, Any]:
    return {"plugin_namespace": spec.namespace, "aot": int(bool(aot))}


def _kda_to_plugin(graph: ir.Graph, node: ir.Node, aot: bool, prefix: str) -> bool:
    if attr(node, "update_rule", "linear") != "gated_delta":
        return False
    q, k, v, past, decay, beta = (list(node.inputs) + [None] * 6)[:6]
    if decay is None or beta is None:
        return False
    hq, hkv = int(attr(node, "q_num_heads")), int(attr(node, "kv_num_heads"))
    if hq != hkv:
        raise NotImplementedError(f"LinearAttention {node.name!r}: q_num_heads={hq} != kv_num_heads={hkv}; "
                                  "the kimi::kda plugin expects q/k repeated to the value heads")
    if q.shape is None or len(q.shape) != 3:
        raise NotImplementedError(f"LinearAttention {node.name!r}: only the 3-D [B, T, H*D] layout is lowered")
    K = static_dim(q, 2, "q hidden size") // hq
    V = static_dim(v, 2, "v hidden size") // hkv
    if static_dim(decay, 2, "decay hidden size") != hq * K:
        return False  # per-head (scalar) decay is not KDA
    scale = float(attr(node, "scale", 0.0) or K ** -0.5)
    b = _Builder(prefix)
    state = past
    if state is None:
        state = _zeros_of(b, q, (hq, K, V), ir.DataType.FLOAT)
    elif state.dtype != ir.DataType.FLOAT:
        state = _set(b("Cast", [state], {"to": int(ir.DataType.FLOAT)}), ir.DataType.FLOAT, state.shape)
    attrs = KDA.check_attributes(dict(num_heads=hq, key_dim=K, value_dim=V, scale=scale))
    if state.shape is None:
        state.shape = ir.Shape([q.shape[0], hq, K, V])
    o, fs = b(KDA.name, [q, k, v, decay, beta, state], {**attrs, **_parser_attrs(KDA, aot)},
              domain=KDA.namespace, num_outputs=2, name=node.name or prefix)
    _annotate(KDA, [q, k, v, decay, beta, state], [o, fs], attrs)
    outs = [o, fs]
    present_dtype = node.outputs[1].dtype
    if present_dtype is not None and present_dtype != ir.DataType.FLOAT:
        outs[1] = _set(b("Cast", [fs], {"to": int(present_dtype)}), present_dtype, None)
    _replace(graph, node, b.nodes, outs)
    return True


def _conv_to_plugin(graph: ir.Graph, node: ir.Node, aot: bool, prefix: str) -> bool:
    xt, w, bias, past = (list(node.inputs) + [None] * 4)[:4]
    if w.shape is None or len(w.shape) != 3:
        return False  # only the 1-D (depthwise over time) form
    C, W = static_dim(w, 0, "conv channels"), static_dim(w, 2, "conv kernel width")
    activation = attr(node, "activation", "none")
    if activation not in ("silu", "none"):
        raise NotImplementedError(f"CausalConvWithState {node.name!r}: activation {activation!r} has no plugin")
    dtype = xt.dtype
    b = _Builder(prefix)
    x = _set(b("Transpose", [xt], {"perm": [0, 2, 1]}), dtype, _permuted(xt, (0, 2, 1)))
    weight = _set(b("Reshape", [w, b.const(np.asarray([C, W], np.int64))]), w.dtype, [C, W])
    if bias is None:
        bias = b.const(np.zeros(C, dtype=dtype.numpy()))
    if past is not None:
        state = past
    else:
        state = _set(_zeros_of(b, x, (C, W - 1), dtype), dtype,
                     None if xt.shape is None else [xt.shape[0], C, W - 1])
    attrs = SHORT_CONV.check_attributes(dict(channels=C, kernel_size=W, activation=activation))
    y, fs = b(SHORT_CONV.name, [x, weight, bias, state], {**attrs, **_parser_attrs(SHORT_CONV, aot)},
              domain=SHORT_CONV.namespace, num_outputs=2, name=node.name or prefix)
    _annotate(SHORT_CONV, [x, weight, bias, state], [y, fs], attrs)
    y_bct = _set(b("Transpose", [y], {"perm": [0, 2, 1]}), dtype, _permuted(y, (0, 2, 1)))
    _replace(graph, node, b.nodes, [y_bct, fs])
    return True


def to_plugin_graph(model, aot: Union[bool, dict[str, bool]] = True):
    """Rewrite the kimi ops' opset-27 nodes into TensorRT plugin nodes (see the module docstring).

    ``aot``: True / False for every plugin, or ``{plugin_id: bool}``; sets the nodes' ``aot`` attribute.
    Accepts and returns an ``onnx.ModelProto`` (or an ``onnx_ir.Model``, modified in place).
    """
    m = as_ir(model)
    _ensure_shapes(m)
    want = (lambda spec: bool(aot)) if isinstance(aot, bool) else (lambda spec: bool(aot.get(spec.plugin_id, False)))
    count = 0
    fresh = _Prefixes(m.graph)
    for node in list(m.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "LinearAttention":
            count += _kda_to_plugin(m.graph, node, want(KDA), fresh(f"kimi_kda_{count}"))
        elif node.op_type == "CausalConvWithState":
            count += _conv_to_plugin(m.graph, node, want(SHORT_CONV), fresh(f"kimi_short_conv_{count}"))
    _cancel_transposes(m.graph)
    if count:
        _set_opset(m, KDA.namespace, PLUGIN_OPSET_VERSION)
    return like_input(model, m)


# ------------------------------------------------------------------------------------------------ plugin -> standard

def to_standard_graph(model):
    """Replace every kimi plugin node by its opset-27 standard op (``LinearAttention`` / ``CausalConvWithState``)."""
    m = as_ir(model)
    count = 0
    fresh = _Prefixes(m.graph)
    for node in list(m.graph):
        spec = ps.spec_for_node(node.domain, node.op_type)
        if spec is None:
            continue
        b = _Builder(fresh(f"std_{spec.name}_{count}"))
        if spec is KDA:
            q, k, v, g, beta, state = node.inputs
            hv = int(attr(node, "num_heads"))
            o, fs = b("LinearAttention", [q, k, v, state, g, beta],
                      {"q_num_heads": hv, "kv_num_heads": hv, "update_rule": "gated_delta",
                       "scale": float(attr(node, "scale"))}, num_outputs=2)
            outs = [o, fs]
        else:
            x, weight, bias, state = node.inputs
            xt = b("Transpose", [x], {"perm": [0, 2, 1]})
            w3 = b("Unsqueeze", [weight, b.const(np.asarray([1], np.int64))])
            y, fs = b("CausalConvWithState", [xt, w3, bias, state], {"activation": attr(node, "activation")},
                      num_outputs=2)
            outs = [b("Transpose", [y], {"perm": [0, 2, 1]}), fs]
        _replace(m.graph, node, b.nodes, outs)
        count += 1
    _cancel_transposes(m.graph)
    if not any(n.domain == KDA.namespace for n in m.graph):
        _set_opset(m, KDA.namespace, None)
    if count:
        _set_opset(m, "", max(STANDARD_OPSET, m.opset_imports.get("", 0)))
    return like_input(model, m)


def _ensure_shapes(m: ir.Model) -> None:
    """Fill in value shapes with ONNX shape inference when the kimi nodes' inputs lack them."""
    needs = False
    for node in m.graph:
        if node.op_type in ("LinearAttention", "CausalConvWithState") and node.domain in ("", "ai.onnx"):
            if any(v is not None and v.shape is None for v in node.inputs):
                needs = True
    if not needs:
        return
    proto = ir.serde.serialize_model(m)
    inferred = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, data_prop=True))
    known = {v.name: v for n in inferred.graph for v in n.outputs}
    for node in m.graph:
        for v in node.outputs:
            src = known.get(v.name)
            if v.shape is None and src is not None and src.shape is not None:
                v.shape = src.shape
            if v.type is None and src is not None:
                v.type = src.type



def set_aot(model: ir.Model, aot: dict[str, bool]) -> None:
    """Set the ``aot`` attribute of every plugin node from ``{plugin id: bool}`` (absent ids: 0), in place."""
    for node in model.graph:
        spec = ps.spec_for_node(node.domain, node.op_type)
        if spec is not None:
            node.attributes["aot"] = ir.Attr("aot", ir.AttributeType.INT, int(bool(aot.get(spec.plugin_id))))
