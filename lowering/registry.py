"""The op table: for every ``torch.ops.kimi`` op, where its pieces live.

One row per registered op (backward ops included). Each entry is ``"module:attribute"`` (resolved on demand, so
reading the table imports nothing heavy) or ``None`` where the op has no such piece:

* ``reference``  the PyTorch implementation (any device; exact in float64) that the op's CPU kernel runs;
* ``fake``       the fake (meta) function: output shapes, dtypes and layouts;
* ``cuda``       the Triton launcher the op's CUDA kernel calls (None: the reference serves CUDA too);
* ``onnx``       the ONNX lowering (opset 27 where the op has a standard ONNX counterpart);
* ``onnx_fallback`` the opset <= 21 lowering for runtimes without opset 27 (``--fallback``; None: ``onnx`` is
  already opset <= 21, and serves both);
* ``tensorrt_plugin`` the TensorRT plugin id (lowering/plugin_spec.py). kimi::attn_res, attn_res_phase1,
  attn_res_merge and moe_experts have NO TensorRT plugin: TensorRT runs their standard-op ONNX lowerings.

Backward ops exist for training only and kimi::kda_decode_ for decoding out of static buffers only: no lowering,
no plugin. tests/test_op_registry.py checks that every registered op has a row and every name resolves.
lowering/onnx.py builds its translation table from here.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Optional

__all__ = ["OpRow", "OPS", "row_for", "resolve", "onnx_lowerings"]


@dataclasses.dataclass(frozen=True)
class OpRow:
    op: str  # "kimi::kda"
    reference: str
    fake: str
    cuda: Optional[str]
    onnx: Optional[str]
    onnx_fallback: Optional[str]
    tensorrt_plugin: Optional[str]

    @property
    def name(self) -> str:
        return self.op.split("::", 1)[1]


_KDA = "kimi_compile.ops.kda"
_CONV = "kimi_compile.ops.short_conv"
_ATTN = "kimi_compile.ops.attn_res"
_MOE = "kimi_compile.ops.moe"
_ONNX = "kimi_compile.lowering.onnx"
_FALLBACK = "kimi_compile.lowering.onnx_fallback"

OPS: tuple[OpRow, ...] = (
    OpRow("kimi::kda", reference=f"{_KDA}.naive:kda_reference_chunked", fake=f"{_KDA}:_kda_fake",
          cuda=f"{_KDA}.forward:kda_forward", onnx=f"{_ONNX}:kda_linear_attention",
          onnx_fallback=f"{_FALLBACK}:kda_chunked", tensorrt_plugin="kimi::kda"),
    OpRow("kimi::kda_backward", reference=f"{_KDA}.naive:kda_reference_backward", fake=f"{_KDA}:_kda_backward_fake",
          cuda=f"{_KDA}.backward:kda_backward", onnx=None, onnx_fallback=None, tensorrt_plugin=None),
    # the in-place decode form (static state buffers of CUDA-graph decoding); exported graphs carry the state as
    # an input and an output, so they use kimi::kda: no lowering, no plugin
    OpRow("kimi::kda_decode_", reference=f"{_KDA}.naive:kda_reference_chunked", fake=f"{_KDA}:_kda_decode_fake",
          cuda=f"{_KDA}.recurrent:kda_forward_recurrent", onnx=None, onnx_fallback=None, tensorrt_plugin=None),
    OpRow("kimi::short_conv", reference=f"{_CONV}.naive:short_conv_reference", fake=f"{_CONV}:_short_conv_fake",
          cuda=f"{_CONV}.kernel:short_conv_forward", onnx=f"{_ONNX}:short_conv_causal_conv",
          onnx_fallback=f"{_FALLBACK}:short_conv_standard", tensorrt_plugin="kimi::short_conv"),
    OpRow("kimi::short_conv_backward", reference=f"{_CONV}.naive:short_conv_backward_reference",
          fake=f"{_CONV}:_short_conv_backward_fake", cuda=None, onnx=None, onnx_fallback=None, tensorrt_plugin=None),
    OpRow("kimi::attn_res", reference=f"{_ATTN}.naive:attn_res_reference", fake=f"{_ATTN}:_attn_res_fake",
          cuda=f"{_ATTN}.kernel:attn_res_fwd", onnx=f"{_ONNX}:attn_res_onnx", onnx_fallback=None,
          tensorrt_plugin=None),
    OpRow("kimi::attn_res_backward", reference=f"{_ATTN}.naive:attn_res_backward_reference",
          fake=f"{_ATTN}:_attn_res_backward_fake", cuda=f"{_ATTN}.kernel:attn_res_bwd", onnx=None,
          onnx_fallback=None, tensorrt_plugin=None),
    OpRow("kimi::attn_res_phase1", reference=f"{_ATTN}.naive:attn_res_phase1_reference",
          fake=f"{_ATTN}:_attn_res_phase1_fake", cuda=f"{_ATTN}.kernel:attn_res_phase1_fwd",
          onnx=f"{_ONNX}:attn_res_phase1_onnx", onnx_fallback=None, tensorrt_plugin=None),
    OpRow("kimi::attn_res_merge", reference=f"{_ATTN}.naive:attn_res_merge_reference",
          fake=f"{_ATTN}:_attn_res_merge_fake", cuda=f"{_ATTN}.kernel:attn_res_merge_fwd",
          onnx=f"{_ONNX}:attn_res_merge_onnx", onnx_fallback=None, tensorrt_plugin=None),
    # CUDA: the Triton decode kernels for few (token, slot) pairs; more run a grouped matmul inside the op body
    OpRow("kimi::moe_experts", reference=f"{_MOE}:moe_experts_reference", fake=f"{_MOE}:_moe_experts_fake",
          cuda=f"{_MOE}.decode:moe_experts_decode", onnx=f"{_ONNX}:moe_experts_onnx", onnx_fallback=None,
          tensorrt_plugin=None),
    # CUDA inference only (no autograd): the router's exported and training paths are tensor code
    OpRow("kimi::moe_route", reference=f"{_MOE}:moe_route_reference", fake=f"{_MOE}:_moe_route_fake",
          cuda=f"{_MOE}.route:route_topk", onnx=None, onnx_fallback=None, tensorrt_plugin=None),
    OpRow("kimi::moe_experts_backward", reference=f"{_MOE}:_moe_experts_backward_op",
          fake=f"{_MOE}:_moe_experts_backward_fake", cuda=None, onnx=None, onnx_fallback=None, tensorrt_plugin=None),
)

_BY_OP = {row.op: row for row in OPS}


def row_for(op: str) -> OpRow:
    """The row of ``op`` ("kimi::kda"); KeyError naming the op if it has none."""
    try:
        return _BY_OP[op]
    except KeyError:
        raise KeyError(f"no op-table row for {op!r} (lowering/registry.py)") from None


def resolve(ref: str) -> Any:
    """The object that ``"module:attribute"`` names (imports the module)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def onnx_lowerings(fallback: bool = False) -> dict[str, str]:
    """``{op name: lowering reference}`` for every op with an ONNX lowering; fallback=True prefers the opset <= 21
    form where the op has one."""
    out = {}
    for row in OPS:
        ref = (row.onnx_fallback or row.onnx) if fallback else row.onnx
        if ref is not None:
            out[row.name] = ref
    return out
