"""TensorRT lowering of the kimi ops: plugin nodes in ONNX, ahead-of-time PTX, plugin registration code.

Everything is generated from the descriptions in ``lowering/plugin_spec.py`` (one per op):

* :func:`to_plugin_graph` rewrites the opset-27 nodes the ONNX exporter emits for the kimi ops
  (``LinearAttention`` with ``update_rule="gated_delta"`` and per-key-channel decay, ``CausalConvWithState``)
  into TensorRT plugin nodes: ``op_type = <plugin name>``, ``domain = <namespace>``, attribute
  ``plugin_namespace = <namespace>`` (how TensorRT's ONNX parser maps a node to a plugin) and ``aot = 1``
  when an ahead-of-time kernel exists (the parser then uses the plugin's ``aot_impl``).
  :func:`to_standard_graph` is the exact inverse (used to check the plugin graph in ONNX Runtime).
* :func:`kernel_variants` lists the distinct (plugin, attributes, dtype) a graph needs;
  :func:`compile_ptx` compiles the plugin's Triton kernel for one of them to PTX with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (no GPU needed).
* :func:`registration_module_source` writes a Python module that registers every plugin with
  ``tensorrt.plugin``: ``@trtp.register`` (output shapes / dtypes from the shape and dtype rules),
  ``@trtp.autotune`` (the dtype combinations with a kernel), ``@trtp.impl`` (a JIT fallback that runs the
  torch op) and, where PTX exists, ``@trtp.aot_impl`` returning the kernel name, the PTX, launch
  parameters from the *same* launch-config function the Triton launcher calls (its source is embedded
  verbatim) and the int32 scalar arguments.
* :func:`register_torch_tensorrt_converters` adds torch-tensorrt converters for ``torch.ops.kimi.*`` that
  insert the same plugins; it runs on import only when ``torch_tensorrt`` imports.

Triton kernels bound to a plugin follow TensorRT's ahead-of-time calling convention: runtime parameters
``(input pointers..., int32 scalars..., output pointers...)``; Triton's hidden scratch pointers are passed
as null by TensorRT, so :func:`compile_ptx` refuses kernels that need scratch memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
import onnx_ir as ir

from . import plugin_spec as ps
from .plugin_spec import KDA, PLUGINS, SHORT_CONV, KernelBinding, PluginSpec

__all__ = [
    "PLUGIN_OPSET_VERSION",
    "PTX_ARCHS",
    "PluginNode",
    "KernelVariant",
    "PtxArtifact",
    "to_plugin_graph",
    "to_standard_graph",
    "plugin_nodes",
    "kernel_variants",
    "kernel_binding",
    "compile_ptx",
    "ptxas_path",
    "ptxas_check",
    "registration_module_source",
    "launch_params",
    "register_torch_tensorrt_converters",
]

PLUGIN_OPSET_VERSION = 1
STANDARD_OPSET = 27
PTX_ARCHS = (80, 90)

_ONNX_TO_NAME = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
_NAME_TO_ONNX = {v: k for k, v in _ONNX_TO_NAME.items()}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
AUTOTUNE_DTYPE = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


# ======================================================================================================
# small onnx_ir helpers
# ======================================================================================================


def _as_ir(model: Union[onnx.ModelProto, ir.Model, str, os.PathLike]) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(os.fspath(model))


def _like_input(model, result: ir.Model):
    """Return ``result`` in the kind of object ``model`` was (ModelProto in, ModelProto out)."""
    if isinstance(model, onnx.ModelProto):
        return ir.serde.serialize_model(result)
    return result


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    return value.decode() if isinstance(value, bytes) else value


def _static_dim(value: Optional[ir.Value], axis: int, what: str) -> int:
    shape = None if value is None else value.shape
    if shape is None or len(shape) <= abs(axis) - (axis < 0):
        raise ValueError(f"TensorRT lowering needs the static {what}, but {getattr(value, 'name', None)!r} has "
                         f"no known shape (run onnx shape inference first)")
    d = shape[axis]
    if not isinstance(d, int):
        raise ValueError(f"TensorRT lowering needs a static {what}, got {d!r} on {value.name!r}")
    return d


def _dtype_name(value: ir.Value, what: str) -> str:
    dt = value.dtype
    if dt not in _ONNX_TO_NAME:
        raise TypeError(f"TensorRT plugin input {what} ({value.name!r}) must be float32, float16 or bfloat16, got {dt}")
    return _ONNX_TO_NAME[dt]


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
    dts = ps.output_dtypes(spec, [_dtype_name(v, t.name) for v, t in zip(inputs, spec.inputs)])
    shapes = None
    if all(v.shape is not None for v in inputs):
        shapes = ps.output_shapes(spec, [list(v.shape) for v in inputs], attrs)
    for i, out in enumerate(outputs):
        _set(out, _NAME_TO_ONNX[dts[i]], None if shapes is None else shapes[i])


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
            p, q = _attr(src, "perm"), _attr(node, "perm")
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


# ======================================================================================================
# standard ops -> plugin nodes
# ======================================================================================================


def _parser_attrs(spec: PluginSpec, aot: bool) -> dict[str, Any]:
    return {"plugin_namespace": spec.namespace, "aot": int(bool(aot))}


def _kda_to_plugin(graph: ir.Graph, node: ir.Node, aot: bool, prefix: str) -> bool:
    if _attr(node, "update_rule", "linear") != "gated_delta":
        return False
    q, k, v, past, decay, beta = (list(node.inputs) + [None] * 6)[:6]
    if decay is None or beta is None:
        return False
    hq, hkv = int(_attr(node, "q_num_heads")), int(_attr(node, "kv_num_heads"))
    if hq != hkv:
        raise NotImplementedError(f"LinearAttention {node.name!r}: q_num_heads={hq} != kv_num_heads={hkv}; "
                                  "the kimi::kda plugin expects q/k repeated to the value heads")
    if q.shape is None or len(q.shape) != 3:
        raise NotImplementedError(f"LinearAttention {node.name!r}: only the 3-D [B, T, H*D] layout is lowered")
    K = _static_dim(q, 2, "q hidden size") // hq
    V = _static_dim(v, 2, "v hidden size") // hkv
    if _static_dim(decay, 2, "decay hidden size") != hq * K:
        return False  # per-head (scalar) decay is not KDA
    scale = float(_attr(node, "scale", 0.0) or K ** -0.5)
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
    C, W = _static_dim(w, 0, "conv channels"), _static_dim(w, 2, "conv kernel width")
    activation = _attr(node, "activation", "none")
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
    m = _as_ir(model)
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
    return _like_input(model, m)


# ======================================================================================================
# plugin nodes -> standard ops (the inverse, for ONNX Runtime)
# ======================================================================================================


def to_standard_graph(model):
    """Replace every kimi plugin node by its opset-27 standard op (``LinearAttention`` / ``CausalConvWithState``)."""
    m = _as_ir(model)
    count = 0
    fresh = _Prefixes(m.graph)
    for node in list(m.graph):
        spec = ps.spec_for_node(node.domain, node.op_type)
        if spec is None:
            continue
        b = _Builder(fresh(f"std_{spec.name}_{count}"))
        if spec is KDA:
            q, k, v, g, beta, state = node.inputs
            hv = int(_attr(node, "num_heads"))
            o, fs = b("LinearAttention", [q, k, v, state, g, beta],
                      {"q_num_heads": hv, "kv_num_heads": hv, "update_rule": "gated_delta",
                       "scale": float(_attr(node, "scale"))}, num_outputs=2)
            outs = [o, fs]
        else:
            x, weight, bias, state = node.inputs
            xt = b("Transpose", [x], {"perm": [0, 2, 1]})
            w3 = b("Unsqueeze", [weight, b.const(np.asarray([1], np.int64))])
            y, fs = b("CausalConvWithState", [xt, w3, bias, state], {"activation": _attr(node, "activation")},
                      num_outputs=2)
            outs = [b("Transpose", [y], {"perm": [0, 2, 1]}), fs]
        _replace(m.graph, node, b.nodes, outs)
        count += 1
    _cancel_transposes(m.graph)
    if not any(n.domain == KDA.namespace for n in m.graph):
        _set_opset(m, KDA.namespace, None)
    if count:
        _set_opset(m, "", max(STANDARD_OPSET, m.opset_imports.get("", 0)))
    return _like_input(model, m)


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


# ======================================================================================================
# what a graph needs
# ======================================================================================================


@dataclasses.dataclass(frozen=True)
class PluginNode:
    """One plugin node of a graph, read back through its spec."""

    spec: PluginSpec
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict
    parser_attributes: dict
    input_dtypes: tuple[Optional[str], ...]
    input_shapes: tuple[Optional[tuple], ...]
    output_dtypes: tuple[Optional[str], ...]
    output_shapes: tuple[Optional[tuple], ...]


def _shape_tuple(v: ir.Value) -> Optional[tuple]:
    if v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in v.shape)


def plugin_nodes(model) -> list[PluginNode]:
    """Every kimi plugin node of ``model`` (ModelProto, onnx_ir Model or path)."""
    m = _as_ir(model)
    found = []
    for node in m.graph:
        spec = ps.spec_for_node(node.domain, node.op_type)
        if spec is None:
            continue
        attrs = {k: _attr(node, k) for k in node.attributes if k not in ps.PARSER_ATTRIBUTES}
        found.append(PluginNode(
            spec=spec, name=node.name or "", inputs=tuple(v.name if v is not None else "" for v in node.inputs),
            outputs=tuple(v.name for v in node.outputs), attributes=attrs,
            parser_attributes={k: _attr(node, k) for k in ps.PARSER_ATTRIBUTES if k in node.attributes},
            input_dtypes=tuple(_ONNX_TO_NAME.get(v.dtype) if v is not None else None for v in node.inputs),
            input_shapes=tuple(_shape_tuple(v) if v is not None else None for v in node.inputs),
            output_dtypes=tuple(_ONNX_TO_NAME.get(v.dtype) for v in node.outputs),
            output_shapes=tuple(_shape_tuple(v) for v in node.outputs),
        ))
    return found


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One specialisation of a plugin's kernel: plugin, attribute values, compute dtype."""

    plugin_id: str
    attributes: tuple[tuple[str, Any], ...]
    dtype: str

    @property
    def spec(self) -> PluginSpec:
        return next(s for s in PLUGINS if s.plugin_id == self.plugin_id)

    @property
    def attrs(self) -> dict:
        return dict(self.attributes)

    def key(self) -> str:
        """A stable, readable id (file names, manifest lookups)."""
        parts = [self.spec.name, TRITON_DTYPE[self.dtype]]
        for k, v in self.attributes:
            parts.append(f"{k}{_fmt(v)}")
        text = "_".join(parts)
        return re.sub(r"[^A-Za-z0-9_.+-]", "", text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(float(np.float32(v)))
    return str(v)


def variant_for(spec: PluginSpec, attrs: dict, dtype: str) -> KernelVariant:
    attrs = spec.check_attributes(attrs)
    return KernelVariant(spec.plugin_id, tuple((a.name, attrs[a.name]) for a in spec.attributes), dtype)


def kernel_variants(model) -> list[KernelVariant]:
    """Distinct (plugin, attributes, compute dtype) of the graph's plugin nodes, in graph order."""
    seen: dict[KernelVariant, None] = {}
    for pn in plugin_nodes(model):
        compute = next(dt for t, dt in zip(pn.spec.inputs, pn.input_dtypes) if t.dtype == "T")
        seen.setdefault(variant_for(pn.spec, pn.attributes, compute), None)
    return list(seen)


# ======================================================================================================
# ahead-of-time PTX
# ======================================================================================================

# ---- kimi::kda: the token-loop kernel of ops/kda_triton.py behind the plugin ABI --------------------------
#
# A TensorRT AOT plugin launches exactly one kernel, so the multi-kernel chunked prefill of
# ops/kda_triton.py cannot be one; its token-loop kernel (``_kda_recurrent_kernel``: one program per
# (value block, sequence x head), the fp32 state kept in registers) serves decode and prefill.  The adapter
# below only reorders arguments into (inputs, int32 scalars, outputs); Triton inlines the call.

try:  # the adapter exists only where Triton does
    import triton as _triton
    import triton.language as tl  # the name matters: annotations are strings here, Triton reads 'tl.constexpr'

    from kimi_compile.ops.kda import recurrent as _kda_triton
    from kimi_compile.ops.kda.recurrent import kda_plugin_constexprs, kda_recurrent_launch_config  # noqa: F401

    _kda_recurrent_kernel = _kda_triton._kda_recurrent_kernel
except Exception:  # noqa: BLE001
    _kda_triton = None

if _kda_triton is not None:

    @_triton.jit
    def kda_plugin_kernel(q, k, v, g, beta, h0, T, o, ht, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, SCALE: tl.constexpr):
        # (q, k, v, g, beta, o, h0, ht, cu, T, scale, H, HV, K, V, BK, BV, IS_VARLEN, USE_H0); q stands in for
        # the unused cu_seqlens pointer; q / k arrive already repeated to the HV value heads (H == HV)
        _kda_recurrent_kernel(q, k, v, g, beta, o, h0, ht, q, T, SCALE, HV, HV, K, V, BK, BV, False, True)


def _kda_binding() -> Optional[KernelBinding]:
    if _kda_triton is None:
        return None
    cfg = _kda_triton.current_tuning()
    bv, warps = int(cfg.decode_bv), int(cfg.decode_warps)
    return KernelBinding(
        module=__name__, kernel="kda_plugin_kernel", launch_config="kda_recurrent_launch_config",
        launch_args=("q.0", "q.1", "@num_heads", "@key_dim", "@value_dim", bv, warps),
        scalars=(("T", "q.1"),), constexprs="kda_plugin_constexprs",
        constexpr_args=(("HV", "@num_heads"), ("K", "@key_dim"), ("V", "@value_dim"), ("scale", "@scale"),
                        ("decode_bv", bv)))


def kernel_binding(spec: PluginSpec) -> Optional[KernelBinding]:
    """The Triton kernel that implements ``spec`` ahead of time (None when its module is unavailable):
    ``kimi::short_conv`` -> ``ops/short_conv_triton.py``; ``kimi::kda`` -> the token-loop kernel of
    ``ops/kda_triton.py`` behind :data:`kda_plugin_kernel`."""
    binding = _kda_binding() if spec is KDA else spec.kernel
    if binding is None or importlib.util.find_spec(binding.module) is None:
        return None
    return binding


def launch_params(spec: PluginSpec, binding: KernelBinding, input_shapes: Sequence[Sequence[Any]],
                  attrs: dict[str, Any], launch_config=None) -> dict:
    """The launch the plugin asks TensorRT for: ``grid`` (3 entries), ``block``, ``shared_mem`` and the int32
    ``scalars``, from the binding's launch-config function (or ``launch_config`` given explicitly)."""
    if launch_config is None:
        launch_config = getattr(importlib.import_module(binding.module), binding.launch_config)
    args = [ps.resolve_dim(r, spec, input_shapes, attrs) for r in binding.launch_args]
    cfg = launch_config(*args)
    grid = tuple(cfg["grid"]) + (1,) * (3 - len(cfg["grid"]))
    return dict(grid=grid, block=(int(cfg["num_warps"]) * 32, 1, 1), shared_mem=cfg["shared_mem"],
                num_warps=int(cfg["num_warps"]),
                scalars=tuple(ps.resolve_dim(r, spec, input_shapes, attrs) for _, r in binding.scalars))


@dataclasses.dataclass
class PtxArtifact:
    variant: KernelVariant
    arch: int
    ptx: str
    kernel_name: str
    num_warps: int
    shared_mem: int  # what the launch asks for: max(compiled need, launch config)
    compiled_shared_mem: int  # Triton's metadata.shared
    target: str  # the .target line of the PTX (sm_80, sm_90, sm_90a)
    ptx_version: str
    signature: dict
    constexprs: dict

    def manifest_entry(self, file_name: str) -> dict:
        return dict(plugin=self.variant.plugin_id, key=self.variant.key(), attributes=self.variant.attrs,
                    dtype=self.variant.dtype, arch=self.arch, target=self.target, ptx_version=self.ptx_version,
                    file=file_name, kernel_name=self.kernel_name, num_warps=self.num_warps,
                    block_x=self.num_warps * 32, shared_mem=self.shared_mem,
                    compiled_shared_mem=self.compiled_shared_mem, signature=self.signature,
                    constexprs={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                for k, v in self.constexprs.items()},
                    sha256=hashlib.sha256(self.ptx.encode()).hexdigest())


def _runtime_params(fn) -> list[str]:
    params = getattr(fn, "params", None)
    if params is None:
        raise TypeError(f"{fn!r} is not a @triton.jit function")
    return [p.name for p in params if not p.is_constexpr]


def kernel_signature(spec: PluginSpec, binding: KernelBinding, fn, dtype: str) -> dict[str, str]:
    """The Triton signature of the plugin kernel, checked against the plugin ABI
    ``(input pointers, int32 scalars, output pointers)``."""
    names = _runtime_params(fn)
    in_dt, out_dt = spec.io_dtypes(dtype)
    n_in, n_sc, n_out = len(spec.inputs), len(binding.scalars), len(spec.outputs)
    if len(names) != n_in + n_sc + n_out:
        raise TypeError(f"{binding.kernel} has runtime parameters {names}; the {spec.plugin_id} plugin ABI needs "
                        f"{n_in} input pointers, {n_sc} int32 scalars and {n_out} output pointers")
    scalar_names = names[n_in:n_in + n_sc]
    if scalar_names != [n for n, _ in binding.scalars]:
        raise TypeError(f"{binding.kernel}: scalar parameters {scalar_names} != binding {[n for n, _ in binding.scalars]}")
    sig = {}
    for name, dt in zip(names[:n_in], in_dt):
        sig[name] = "*" + TRITON_DTYPE[dt]
    for name in scalar_names:
        sig[name] = "i32"
    for name, dt in zip(names[n_in + n_sc:], out_dt):
        sig[name] = "*" + TRITON_DTYPE[dt]
    return sig


def _config_without_grid(spec, binding, attrs, launch_config, b: int, t: int) -> dict:
    shapes = _example_shapes(spec, attrs, b, t)
    p = launch_params(spec, binding, shapes, attrs, launch_config)
    return dict(block=p["block"], shared_mem=p["shared_mem"], num_warps=p["num_warps"])


def _example_shapes(spec: PluginSpec, attrs: dict, b: int, t: int) -> list[tuple]:
    """Concrete input shapes for batch ``b`` and length ``t`` from the spec's dim names."""
    env = {"B": b, "T": t}
    if spec is KDA:
        env.update(HV=attrs["num_heads"], K=attrs["key_dim"], V=attrs["value_dim"])
    else:
        env.update(C=attrs["channels"], W=attrs["kernel_size"])

    def dim(name):
        if isinstance(name, int):
            return name
        return int(eval(name, {}, dict(env)))  # names like "HV*K", "W-1" over the env above

    return [tuple(dim(d) for d in t_.shape) for t_ in spec.inputs]


def kernel_constexprs(spec: PluginSpec, binding: KernelBinding, attrs: dict) -> dict:
    """The plugin kernel's compile-time constants for these attribute values."""
    fn = getattr(importlib.import_module(binding.module), binding.constexprs)
    return fn(**{k: (ps.resolve_dim(v, spec, [], attrs) if isinstance(v, str) and v.startswith("@") else v)
                 for k, v in binding.constexpr_args})


def compile_ptx(variant: KernelVariant, arch: int, ptx_version: Optional[int] = None) -> PtxArtifact:
    """Compile the plugin kernel of ``variant`` to PTX for ``sm_<arch>`` (no GPU needed).

    Checks that the kernel follows the plugin ABI, that its block and shared memory do not depend on
    batch or length (they are fixed in the engine) and that it needs no global / profile scratch (TensorRT passes null there).  For sm_90 the
    ``sm_90a`` target Triton writes is relaxed to ``sm_90`` when the bundled ``ptxas`` accepts it (the
    kernel uses no arch-specific instruction), so the PTX also JIT-compiles on newer GPUs.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    spec = variant.spec
    binding = kernel_binding(spec)
    if binding is None:
        raise RuntimeError(f"{spec.plugin_id} has no ahead-of-time Triton kernel")
    module = importlib.import_module(binding.module)
    fn = getattr(module, binding.kernel)
    launch_config = getattr(module, binding.launch_config)
    attrs = variant.attrs
    fixed = _config_without_grid(spec, binding, attrs, launch_config, 1, 1)
    for b, t in ((3, 1), (2, 977), (16, 65536)):
        other = _config_without_grid(spec, binding, attrs, launch_config, b, t)
        if other != fixed:
            raise ValueError(f"{binding.launch_config}: block / shared memory depend on batch or length "
                             f"({fixed} vs {other}); they must be fixed for an engine")
    constexprs = kernel_constexprs(spec, binding, attrs)
    signature = kernel_signature(spec, binding, fn, variant.dtype)
    options: dict[str, Any] = {"num_warps": fixed["num_warps"]}
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)
    src = triton.compiler.ASTSource(fn, signature, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=options)
    md = compiled.metadata
    for field_name in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(md, field_name, 0) or 0) != 0:
            raise RuntimeError(f"{binding.kernel} needs {field_name}={getattr(md, field_name)}; TensorRT's AOT "
                               "launch passes null scratch pointers")
    if int(getattr(md, "num_ctas", 1)) != 1 or bool(getattr(md, "launch_cooperative_grid", False)):
        raise RuntimeError(f"{binding.kernel}: clusters / cooperative launches are not supported by AOT plugins")
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    if target.endswith("a") and ptxas_path() is not None:
        relaxed = re.sub(r"^(\.target\s+)sm_(\d+)a\b", r"\1sm_\2", ptx, count=1, flags=re.M)
        if ptxas_check(relaxed, f"sm_{target[3:-1]}")[0]:
            ptx, target = relaxed, target[:-1]
    version = re.search(r"^\.version\s+(\S+)", ptx, re.M).group(1)
    return PtxArtifact(variant=variant, arch=int(arch), ptx=ptx, kernel_name=md.name, num_warps=int(md.num_warps),
                       shared_mem=max(int(md.shared), int(fixed["shared_mem"])), compiled_shared_mem=int(md.shared),
                       target=target, ptx_version=version,
                       signature=signature, constexprs=dict(constexprs))


def ptxas_path() -> Optional[str]:
    """The ``ptxas`` that ships with Triton (``triton/backends/nvidia/bin/ptxas``), or None."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def ptxas_check(ptx: str, arch: str) -> tuple[bool, str]:
    """Assemble ``ptx`` with Triton's ptxas for ``arch`` (e.g. ``"sm_90"``); returns (ok, message)."""
    exe = ptxas_path()
    if exe is None:
        return False, "ptxas not found"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([exe, f"-arch={arch}", str(src), "-o", os.devnull], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


# ======================================================================================================
# the plugin registration module (generated source)
# ======================================================================================================

_JIT_BODIES = {
    "kimi::kda": '''
    import torch
    import kimi_compile.ops  # noqa: F401  (registers torch.ops.kimi)
    HV, K, V = num_heads, key_dim, value_dim
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tq, tk, tv, tg, tb, ts = (torch.as_tensor(t, device="cuda") for t in (q, k, v, g, beta, state))
        B, T = tq.shape[0], tq.shape[1]
        o_, fs_ = torch.ops.kimi.kda(tq.view(B, T, HV, K), tk.view(B, T, HV, K), tv.view(B, T, HV, V),
                                     tg.view(B, T, HV, K), tb.view(B, T, HV), ts.float(), float(scale), None)
        torch.as_tensor(outputs[0], device="cuda").copy_(o_.reshape(B, T, HV * V))
        torch.as_tensor(outputs[1], device="cuda").copy_(fs_)
''',
    "kimi::short_conv": '''
    import torch
    import kimi_compile.ops  # noqa: F401  (registers torch.ops.kimi)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        tx, tw, tb, ts = (torch.as_tensor(t, device="cuda") for t in (x, weight, bias, state))
        y_, fs_ = torch.ops.kimi.short_conv(tx, tw, tb, ts, activation)
        torch.as_tensor(outputs[0], device="cuda").copy_(y_)
        torch.as_tensor(outputs[1], device="cuda").copy_(fs_)
''',
}

_MODULE_HEADER = '''"""TensorRT plugin registrations for kimi-compile (generated by kimi_compile.lowering.tensorrt; do not edit).

Importing this module registers, with ``tensorrt.plugin`` (TensorRT >= 10.7; ONNX-parser namespaces need
>= 10.10): {plugin_list}.

* ``@trtp.register``: output shapes and dtypes (from kimi_compile/lowering/plugin_spec.py),
* ``@trtp.autotune``: the dtype combinations that have a kernel,
* ``@trtp.aot_impl``: the Triton kernel compiled ahead of time (PTX in ./ptx, chosen for the GPU's
  compute capability or $KIMI_TRT_SM), launched with the grid / block / shared memory of the launch-config
  function the Triton launcher uses (embedded verbatim below),
* ``@trtp.impl``: a JIT fallback that runs the torch op (needs torch and kimi_compile at run time).

ONNX nodes carry ``plugin_namespace`` and ``aot`` (1 = use ``aot_impl``) for TensorRT's ONNX parser.
(No ``from __future__ import annotations`` here: tensorrt.plugin reads the type hints as objects.)
"""

import json
import os
from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

_HERE = os.path.dirname(os.path.abspath(__file__))
_PTX_DIR = os.path.join(_HERE, "ptx")
_MANIFEST_PATH = os.path.join(_PTX_DIR, "manifest.json")
MANIFEST = {{"kernels": []}}
if os.path.exists(_MANIFEST_PATH):
    with open(_MANIFEST_PATH) as _f:
        MANIFEST = json.load(_f)

PLUGIN_SPECS = {plugin_specs}


def _dtype_name(dt):
    for name in ("float32", "float16", "bfloat16"):
        if dt == getattr(trt, name):
            return name
    raise TypeError(f"kimi plugins support float32, float16 and bfloat16 tensors, got {{dt}}")


def _trt_dtype(name):
    return getattr(trt, name)


def device_sm():
    """Compute capability (major * 10 + minor) of the GPU engines are built for: $KIMI_TRT_SM, else the
    CUDA driver's answer for device $KIMI_TRT_DEVICE (default 0)."""
    if os.environ.get("KIMI_TRT_SM"):
        return int(os.environ["KIMI_TRT_SM"])
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), int(os.environ.get("KIMI_TRT_DEVICE", "0"))) != 0:
        raise RuntimeError("kimi plugins: no CUDA device (set KIMI_TRT_SM to choose the PTX by hand)")
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    return major.value * 10 + minor.value


def select_kernel(plugin_id, attributes, dtype, sm=None):
    """The manifest entry for this plugin specialisation with the highest arch <= the device's."""
    sm = device_sm() if sm is None else sm
    best = None
    for entry in MANIFEST["kernels"]:
        if entry["plugin"] != plugin_id or entry["dtype"] != dtype or entry["arch"] > sm:
            continue
        same = all(abs(float(entry["attributes"][k]) - float(v)) <= 1e-6 * max(1.0, abs(float(v)))
                   if isinstance(v, float) else entry["attributes"][k] == v for k, v in attributes.items())
        if same and (best is None or entry["arch"] > best["arch"]):
            best = entry
    if best is None:
        raise RuntimeError(f"kimi plugins: no PTX for {{plugin_id}} {{attributes}} {{dtype}} at sm_{{sm}}; "
                           "re-export the bundle for this model / GPU")
    return best


def read_ptx(entry):
    with open(os.path.join(_PTX_DIR, entry["file"]), "rb") as f:
        return f.read()

'''


def _dim_code(ref, spec: PluginSpec) -> str:
    if isinstance(ref, int):
        return repr(ref)
    if ref.startswith("@"):
        return ref[1:]
    name, _, axis = ref.partition(".")
    return f"{name}.shape_expr[{int(axis)}]"


def _py_type(t: type) -> str:
    return {int: "int", float: "float", str: "str"}[t]


def _plugin_source(spec: PluginSpec, binding: Optional[KernelBinding], dtypes_with_ptx: Sequence[str]) -> str:
    fname = f"{spec.namespace}_{spec.name}"
    in_params = ", ".join(f"{t.name}: trtp.TensorDesc" for t in spec.inputs)
    attr_params = ", ".join(f"{a.name}: {_py_type(a.type)}" for a in spec.attributes)
    first_t = next(t.name for t in spec.inputs if t.dtype == "T")
    n_out = len(spec.outputs)
    lines = [f"# ---- {spec.plugin_id}: {spec.doc}", ""]
    # register: shapes and dtypes from the spec's rules
    lines.append(f'@trtp.register("{spec.plugin_id}")')
    lines.append(f"def {fname}_desc({in_params}, {attr_params}) -> Tuple[{', '.join(['trtp.TensorDesc'] * n_out)}]:")
    outs = []
    for out in spec.outputs:
        dims = ", ".join(_dim_code(r, spec) for r in out.shape)
        dt = f"{first_t}.dtype" if out.dtype == "T" else f"trt.{out.dtype}"
        lines.append(f"    {out.name} = trtp.from_shape_expr(({dims},), dtype={dt})")
        outs.append(out.name)
    lines.append(f"    return {', '.join(outs)}")
    lines.append("")
    # autotune: dtype combinations
    combos = []
    for dt in (dtypes_with_ptx or spec.dtypes):
        ins, outs_dt = spec.io_dtypes(dt)
        combos.append(", ".join(AUTOTUNE_DTYPE[d] for d in ins + outs_dt))
    lines.append(f'@trtp.autotune("{spec.plugin_id}")')
    lines.append(f"def {fname}_autotune({', '.join(t.name for t in spec.inputs)}, outputs) -> List[trtp.AutoTuneCombination]:")
    lines.append(f"    return [{', '.join(f'trtp.AutoTuneCombination({c!r})' for c in combos)}]")
    lines.append("")
    # impl: the JIT fallback
    impl_in = ", ".join(f"{t.name}: trtp.Tensor" for t in spec.inputs)
    lines.append(f'@trtp.impl("{spec.plugin_id}")')
    lines.append(f"def {fname}_impl({impl_in}, {attr_params}, outputs: Tuple[trtp.Tensor], stream: int) -> None:")
    lines.extend(_JIT_BODIES[spec.plugin_id].strip("\n").splitlines())
    lines.append("")
    if binding is not None and dtypes_with_ptx:
        lines.append(f'@trtp.aot_impl("{spec.plugin_id}")')
        lines.append(f"def {fname}_aot_impl({in_params}, {attr_params}, outputs: Tuple[trtp.TensorDesc]"
                     ") -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:")
        attr_dict = ", ".join(f"{a.name}={a.name}" for a in spec.attributes)
        lines.append(f"    entry = select_kernel({spec.plugin_id!r}, dict({attr_dict}), _dtype_name({first_t}.dtype))")
        lines.append(f"    launch = {fname}_launch({', '.join(t.name for t in spec.inputs)}, {', '.join(a.name for a in spec.attributes)})")
        lines.append("    params = trtp.KernelLaunchParams()")
        lines.append('    params.grid_x, params.grid_y, params.grid_z = launch["grid"]')
        lines.append('    params.block_x = launch["block"][0]')
        lines.append('    params.shared_mem = max(launch["shared_mem"], entry["shared_mem"])  # compiled need, as Triton launches')
        lines.append('    scalars = trtp.SymIntExprs(len(launch["scalars"]))')
        lines.append('    for i, value in enumerate(launch["scalars"]):')
        lines.append("        scalars[i] = trtp.SymInt32(value)")
        lines.append('    return entry["kernel_name"].encode(), read_ptx(entry), params, scalars')
        lines.append("")
        # the launch computation, shared with tests: dim refs -> launch config
        lines.append(f"def {fname}_launch({', '.join(t.name for t in spec.inputs)}, {', '.join(a.name for a in spec.attributes)}):")
        lines.append(f'    """Grid / block / shared memory / int32 scalars of {spec.plugin_id} (symbolic in batch and length)."""')
        args = ", ".join(_dim_code(r, spec) for r in binding.launch_args)
        lines.append(f"    cfg = {binding.launch_config}({args})")
        lines.append('    grid = tuple(cfg["grid"]) + (1,) * (3 - len(cfg["grid"]))')
        scalars = ", ".join(_dim_code(r, spec) for _, r in binding.scalars)
        lines.append(f'    return dict(grid=grid, block=(cfg["num_warps"] * 32, 1, 1), shared_mem=cfg["shared_mem"], '
                     f"scalars=({scalars}{',' if len(binding.scalars) == 1 else ''}))")
        lines.append("")
    return "\n".join(lines) + "\n"


def launch_config_source(binding: KernelBinding) -> str:
    """The verbatim source of the binding's launch-config function (embedded in the generated module)."""
    fn = getattr(importlib.import_module(binding.module), binding.launch_config)
    return textwrap.dedent(inspect.getsource(fn))


def registration_module_source(manifest: Optional[dict] = None, specs: Sequence[PluginSpec] = PLUGINS) -> str:
    """Python source registering ``specs`` with ``tensorrt.plugin``; ``manifest`` is the PTX manifest
    (``{"kernels": [entry, ...]}`` as written by :func:`compile_ptx` users) deciding which plugins get an
    ``aot_impl`` and which dtypes autotune offers."""
    manifest = manifest or {"kernels": []}
    spec_table = {s.plugin_id: dict(inputs=list(s.input_names), outputs=list(s.output_names),
                                    attributes={a.name: _py_type(a.type) for a in s.attributes},
                                    standard_op=s.standard_op) for s in specs}
    parts = [_MODULE_HEADER.format(plugin_list=", ".join(f"``{s.plugin_id}``" for s in specs),
                                   plugin_specs=json.dumps(spec_table, indent=4))]
    embedded = set()
    for spec in specs:
        binding = kernel_binding(spec)
        dts = sorted({e["dtype"] for e in manifest["kernels"] if e["plugin"] == spec.plugin_id},
                     key=list(ps.COMPUTE_DTYPES).index)
        if binding is not None and dts and binding.launch_config not in embedded:
            parts.append(f"# launch config: verbatim copy of {binding.module}.{binding.launch_config}\n")
            parts.append(launch_config_source(binding) + "\n")
            embedded.add(binding.launch_config)
        parts.append(_plugin_source(spec, binding if dts else None, dts))
    return "\n\n".join(parts)


# ======================================================================================================
# torch-tensorrt converters (only when torch_tensorrt imports)
# ======================================================================================================

_TORCH_TRT_REGISTERED = False


def register_torch_tensorrt_converters() -> bool:
    """Register converters for ``torch.ops.kimi.kda`` / ``torch.ops.kimi.short_conv`` that insert the kimi
    plugins (the registration module of a bundle must be imported first, so ``trtp.op.kimi.*`` exist).

    torch-tensorrt's automatic plugins cannot express these ops (optional tensors; an output dtype that is
    not the first input's), hence explicit converters.  Nodes outside what the plugins take (no state,
    cu_seqlens, grouped value heads) stay in PyTorch.  Returns False when torch_tensorrt is unavailable.
    Not exercised here: torch_tensorrt and TensorRT are not installable in this environment.
    """
    global _TORCH_TRT_REGISTERED
    if _TORCH_TRT_REGISTERED:
        return True
    if importlib.util.find_spec("torch_tensorrt") is None:
        return False
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
        import torch
        from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
        from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor
    except Exception:  # noqa: BLE001 - a broken install behaves like an absent one
        return False

    import kimi_compile.ops  # noqa: F401

    def _meta(node, i):
        arg = node.args[i] if len(node.args) > i else None
        return getattr(arg, "meta", {}).get("val") if arg is not None else None

    floats = (torch.float32, torch.float16, torch.bfloat16)

    def _kda_ok(node, settings=None):
        q, k, v, g, beta, s = (_meta(node, i) for i in range(6))
        cu = node.args[7] if len(node.args) > 7 else None
        if any(x is None for x in (q, k, v, g, beta, s)) or cu is not None:
            return False  # no state / packed varlen: leave the op to PyTorch
        return (q.shape[2] == v.shape[2] and q.dtype in floats and s.dtype == torch.float32
                and all(x.dtype == q.dtype for x in (k, v, g, beta)))

    def _conv_ok(node, settings=None):
        x, w, b, s = (_meta(node, i) for i in range(4))
        if x is None or w is None or s is None or x.dtype not in floats:
            return False
        return all(t.dtype == x.dtype for t in (w, s) + ((b,) if b is not None else ()))

    def _reshape(ctx, t, dims, name):
        layer = ctx.net.add_shuffle(t)
        layer.reshape_dims = tuple(dims)
        layer.name = name
        return layer.get_output(0)

    def _add_plugin(ctx, desc, name):
        layer = ctx.net.add_plugin(desc, aot=True)
        layer.name = name
        return layer

    def _zeros(ctx, n, like, name):
        t = get_trt_tensor(ctx, np.zeros(n, dtype=np.float32), name)
        if like.dtype != trt.float32:
            layer = ctx.net.add_cast(t, like.dtype)
            layer.name = f"{name}_cast"
            t = layer.get_output(0)
        return t

    @dynamo_tensorrt_converter(torch.ops.kimi.kda.default, capability_validator=_kda_ok, supports_dynamic_shapes=True)
    def _convert_kda(ctx, target, args, kwargs, name):
        q, k, v, g, beta, state = (get_trt_tensor(ctx, a, f"{name}_{i}") for i, a in enumerate(args[:6]))
        scale = args[6] if len(args) > 6 and args[6] is not None else None
        HV, K, V = int(q.shape[2]), int(q.shape[3]), int(v.shape[3])
        flat = [_reshape(ctx, t, (0, 0, -1), f"{name}_{n}_flat") for t, n in ((q, "q"), (k, "k"), (v, "v"), (g, "g"))]
        desc = trtp.op.kimi.kda(*flat, beta, state, num_heads=HV, key_dim=K, value_dim=V,
                                scale=float(K ** -0.5 if scale is None else scale))
        layer = _add_plugin(ctx, desc, name)
        return _reshape(ctx, layer.get_output(0), (0, 0, HV, V), f"{name}_o"), layer.get_output(1)

    @dynamo_tensorrt_converter(torch.ops.kimi.short_conv.default, capability_validator=_conv_ok,
                               supports_dynamic_shapes=True)
    def _convert_short_conv(ctx, target, args, kwargs, name):
        x = get_trt_tensor(ctx, args[0], f"{name}_x")
        weight = get_trt_tensor(ctx, args[1], f"{name}_w")
        C, W = int(weight.shape[0]), int(weight.shape[1])
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        bias = _zeros(ctx, C, x, f"{name}_b") if bias is None else get_trt_tensor(ctx, bias, f"{name}_b")
        state = get_trt_tensor(ctx, args[3] if len(args) > 3 else kwargs["initial_state"], f"{name}_s")
        activation = args[4] if len(args) > 4 else kwargs.get("activation", "silu")
        desc = trtp.op.kimi.short_conv(x, weight, bias, state, channels=C, kernel_size=W, activation=str(activation))
        layer = _add_plugin(ctx, desc, name)
        return layer.get_output(0), layer.get_output(1)

    _TORCH_TRT_REGISTERED = True
    return True


if importlib.util.find_spec("torch_tensorrt") is not None:  # pragma: no cover - not installable here
    register_torch_tensorrt_converters()
