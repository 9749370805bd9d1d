"""What a plugin graph needs: its plugin nodes read back through their specs, and the distinct kernel
specialisations (plugin, attribute values, compute dtype) that must be compiled for it."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import numpy as np

from .. import plugin_spec as ps
from ..plugin_spec import PLUGINS, TRITON_DTYPE, PluginSpec
from .ir_helpers import ONNX_TO_NAME, as_ir, attr, shape_tuple

__all__ = ["PluginNode", "KernelVariant", "plugin_nodes", "kernel_variants", "variant_for"]


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


def plugin_nodes(model) -> list[PluginNode]:
    """Every kimi plugin node of ``model`` (ModelProto, onnx_ir Model or path)."""
    m = as_ir(model)
    found = []
    for node in m.graph:
        spec = ps.spec_for_node(node.domain, node.op_type)
        if spec is None:
            continue
        attrs = {k: attr(node, k) for k in node.attributes if k not in ps.PARSER_ATTRIBUTES}
        found.append(PluginNode(
            spec=spec, name=node.name or "", inputs=tuple(v.name if v is not None else "" for v in node.inputs),
            outputs=tuple(v.name for v in node.outputs), attributes=attrs,
            parser_attributes={k: attr(node, k) for k in ps.PARSER_ATTRIBUTES if k in node.attributes},
            input_dtypes=tuple(ONNX_TO_NAME.get(v.dtype) if v is not None else None for v in node.inputs),
            input_shapes=tuple(shape_tuple(v) if v is not None else None for v in node.inputs),
            output_dtypes=tuple(ONNX_TO_NAME.get(v.dtype) for v in node.outputs),
            output_shapes=tuple(shape_tuple(v) for v in node.outputs),
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


