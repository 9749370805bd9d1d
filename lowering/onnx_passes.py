"""Passes over an exported ONNX model, after the lowerings ran: the default-domain opset import, which the
exporter leaves at its own opset (18) even when opset-27 nodes were recorded, and bfloat16 ``Einsum`` nodes,
which no ONNX opset types."""

from __future__ import annotations

import onnx_ir as ir

from .onnx_builder import FLOAT

__all__ = ["DEFAULT_OPSET", "raise_default_opset", "widen_bfloat16_einsum"]

DEFAULT_OPSET = 27


def raise_default_opset(model, version: int = DEFAULT_OPSET) -> None:
    """Set the default-domain opset import of an ``onnx.ModelProto`` or ``onnx_ir.Model`` to ``version``.

    The exporter writes the opset of its own op library (18) even when nodes of newer ops were recorded.
    """
    if isinstance(model, ir.Model):
        model.opset_imports[""] = version
        model.graph.opset_imports[""] = version
        return
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
            return
    new = model.opset_import.add()
    new.domain, new.version = "", version


def widen_bfloat16_einsum(model) -> int:
    """Run bfloat16 ``Einsum`` nodes in float32 (Cast in, Einsum, Cast out); returns how many were rewritten.

    ONNX ``Einsum`` (opset 12, still current at 27) has no bfloat16 type: torchlib emits it for ``torch.einsum``
    anyway, and the checker rejects the graph. Only the default domain's nodes of ``model.graph`` (an
    ``onnx_ir.Model``) and its subgraphs are touched.
    """
    BF16 = ir.DataType.BFLOAT16
    changed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx"):
            continue
        if not any(v is not None and v.dtype == BF16 for v in node.inputs):
            continue
        graph = node.graph
        casts = [ir.node("Cast", [v], {"to": int(FLOAT)}) for v in node.inputs]
        wide = ir.node("Einsum", [c.outputs[0] for c in casts], {"equation": node.attributes["equation"].value})
        back = ir.node("Cast", [wide.outputs[0]], {"to": int(BF16)})
        old = node.outputs[0]
        new = back.outputs[0]
        new.shape, new.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, new)
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
        graph.insert_before(node, [*casts, wide, back])
        graph.remove(node, safe=True)
        name = old.name
        old.name = None
        new.name = name
        changed += 1
    return changed
