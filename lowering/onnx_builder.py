"""Helpers that ONNX lowerings use to record nodes: constants, casts, shapes, explicit-arity nodes, Loop bodies.

They only run under ``torch.onnx.export(dynamo=True)``'s op recorder (onnxscript's traced mode): values are
``onnx_ir.Value`` with known shapes and dtypes. Both lowering sets (``lowering/onnx.py``, opset 27, and
``lowering/onnx_fallback.py``, opset <= 18) import them from here, so neither imports the other's helpers.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import numpy as np
import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op

__all__ = [
    "FLOAT", "INT64", "static_dim", "cast", "ints", "scalar_i64", "scalar_f32", "dim_of", "emit",
    "SubgraphBuilder", "repeat_heads", "kda_dims", "short_conv_dims",
]

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64

_names = itertools.count()


def static_dim(x: Optional[ir.Value], axis: int, what: str, context: str = "ONNX lowering", hint: str = "") -> int:
    """The static size of ``x.shape[axis]`` (a lowering needs it as an attribute); ValueError naming ``what`` when
    the shape is unknown, too short or symbolic. ``context`` names the lowering, ``hint`` says how to fix it."""
    shape = None if x is None else x.shape
    name = getattr(x, "name", None)
    if shape is None or len(shape) <= (axis if axis >= 0 else -axis - 1):
        raise ValueError(f"{context} needs the static {what}, but {name!r} has no known shape{hint}")
    d = shape[axis]
    if not isinstance(d, int):
        raise ValueError(f"{context} needs a static {what}, got the symbolic dimension {d!r} on {name!r}")
    return d


def cast(x: ir.Value, dtype: ir.DataType) -> ir.Value:
    """``Cast`` only when needed."""
    if x.dtype == dtype:
        return x
    return op.Cast(x, to=int(dtype))


def ints(*values: int) -> ir.Value:
    """A 1-D int64 constant."""
    return op.Constant(value_ints=[int(v) for v in values])


def scalar_i64(value: int) -> ir.Value:
    """A 0-D int64 constant."""
    return op.Constant(value_int=int(value))


def scalar_f32(value: float) -> ir.Value:
    """A 0-D float32 constant."""
    return op.Constant(value_float=float(value))


def dim_of(x: ir.Value, axis: int) -> ir.Value:
    """``x.shape[axis]`` at run time as a 1-element int64 tensor."""
    return op.Shape(x, start=axis, end=axis + 1)


def emit(op_type: str, inputs: Sequence[Optional[ir.Value]], attributes: dict[str, Any],
         num_outputs: int) -> tuple[ir.Value, ...]:
    """Record one node with an explicit number of outputs into the exporter's current op recorder.

    The recorder infers the output count from the schema, which under-counts variadic outputs
    (``Loop`` returns final loop-carried values *and* scan outputs), so ``Loop`` nodes are recorded here.
    """
    recorder = onnxscript.evaluator.default()
    nodes = getattr(recorder, "nodes", None)
    if not isinstance(nodes, list):
        raise RuntimeError("kimi ONNX lowerings must run inside torch.onnx.export(dynamo=True)")
    node = ir.node(op_type, list(inputs), attributes, num_outputs=num_outputs)
    nodes.append(node)
    return tuple(node.outputs)


class SubgraphBuilder:
    """Builds a control-flow body (``Loop``) directly as an ``onnx_ir`` graph.

    Nodes may read values of the enclosing graph (outer-scope references); every value created here
    gets a unique name so the whole model stays in SSA form.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}_{next(_names)}"
        self.inputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self._count = itertools.count()

    def _name(self, hint: str) -> str:
        return f"{self.prefix}_{hint}_{next(self._count)}"

    def input(self, hint: str, dtype: ir.DataType, shape: Optional[Sequence[Any]] = None) -> ir.Value:
        value = ir.Value(name=self._name(hint), type=ir.TensorType(dtype),
                         shape=None if shape is None else ir.Shape(shape))
        self.inputs.append(value)
        return value

    def __call__(self, op_type: str, *inputs: Optional[ir.Value], num_outputs: int = 1, **attributes: Any):
        node = ir.node(op_type, list(inputs), attributes or None, num_outputs=num_outputs)
        for out in node.outputs:
            out.name = self._name(op_type.lower())
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array: Any) -> ir.Value:
        return self("Constant", value=ir.tensor(np.asarray(array)))

    def graph(self, outputs: Sequence[ir.Value]) -> ir.Graph:
        return ir.Graph(self.inputs, list(outputs), nodes=self.nodes, name=self.prefix)


def repeat_heads(x: ir.Value, heads: int, group: int, head_dim: int) -> ir.Value:
    """[B, T, H, D] -> [B, T, H * group, D], head h repeated ``group`` times in a row (hv // group = h)."""
    if group == 1:
        return x
    tiled = op.Tile(op.Unsqueeze(x, ints(3)), ints(1, 1, 1, group, 1))  # [B, T, H, group, D]
    return op.Reshape(tiled, ints(0, 0, heads * group, head_dim))


def kda_dims(q: ir.Value, v: ir.Value, cu_seqlens) -> tuple[int, int, int, int]:
    """(H, K, HV, V) of a ``kimi::kda`` call, checked for what every KDA lowering supports."""
    if cu_seqlens is not None:
        raise NotImplementedError("kimi::kda with cu_seqlens (packed varlen) has no ONNX lowering; "
                                  "export the batched form (cu_seqlens=None)")
    H = static_dim(q, 2, "number of q/k heads H")
    K = static_dim(q, 3, "key head dim K")
    HV = static_dim(v, 2, "number of value heads HV")
    V = static_dim(v, 3, "value head dim V")
    if HV % H:
        raise ValueError(f"kimi::kda lowering: HV={HV} must be a multiple of H={H}")
    return H, K, HV, V


def short_conv_dims(x: ir.Value, weight: ir.Value, activation: str) -> tuple[int, int]:
    """(C, W) of a ``kimi::short_conv`` call, checked for what every conv lowering supports."""
    if activation not in ("silu", "none"):
        raise ValueError(f"kimi::short_conv lowering: activation must be 'silu' or 'none', got {activation!r}")
    C = static_dim(x, 2, "number of channels C")
    W = static_dim(weight, 1, "kernel width W")
    return C, W
