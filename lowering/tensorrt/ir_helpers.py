"""Small onnx_ir helpers shared by the plugin-graph rewrite and the readers of plugin nodes."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import onnx
import onnx_ir as ir

from .. import onnx_builder

__all__ = ["ONNX_TO_NAME", "NAME_TO_ONNX", "as_ir", "like_input", "attr", "static_dim", "dtype_name", "shape_tuple"]

ONNX_TO_NAME = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
NAME_TO_ONNX = {v: k for k, v in ONNX_TO_NAME.items()}


def as_ir(model: Union[onnx.ModelProto, ir.Model, str, os.PathLike]) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(os.fspath(model))


def like_input(model, result: ir.Model):
    """Return ``result`` in the kind of object ``model`` was (ModelProto in, ModelProto out)."""
    if isinstance(model, onnx.ModelProto):
        return ir.serde.serialize_model(result)
    return result


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    return value.decode() if isinstance(value, bytes) else value


def static_dim(value: Optional[ir.Value], axis: int, what: str) -> int:
    """onnx_builder.static_dim with the TensorRT rewrite's wording."""
    return onnx_builder.static_dim(value, axis, what, "TensorRT lowering", " (run onnx shape inference first)")


def dtype_name(value: ir.Value, what: str) -> str:
    dt = value.dtype
    if dt not in ONNX_TO_NAME:
        raise TypeError(f"TensorRT plugin input {what} ({value.name!r}) must be float32, float16 or bfloat16, got {dt}")
    return ONNX_TO_NAME[dt]


def shape_tuple(v: ir.Value) -> Optional[tuple]:
    if v.shape is None:
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in v.shape)
