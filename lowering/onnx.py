"""ONNX lowerings of the kimi ops for ``torch.onnx.export(dynamo=True)``.

Each lowering is a plain Python function that the exporter calls under its op recorder (onnxscript
"traced" function): it receives the op's arguments as ONNX values (shapes and dtypes known) and
Python scalars, and records ONNX nodes. :func:`custom_translation_table` maps the ``torch.ops.kimi``
ops to them.

Two paths:

* default (``fallback=False``): ``kimi::kda`` -> one opset-27 ``LinearAttention`` node
  (``update_rule="gated_delta"``, per-key-channel decay), ``kimi::short_conv`` -> one opset-27
  ``CausalConvWithState`` node. The exported model must then import the default domain at opset 27
  (:func:`~kimi_compile.lowering.onnx_passes.raise_default_opset`, with the other passes over the exported
  model in ``lowering/onnx_passes.py``).
* fallback (``fallback=True``): only ops of opset <= 18: KDA as a chunked WY form with one ``Loop`` over
  chunks (``lowering/onnx_fallback.py``), the conv as ``Concat`` + depthwise ``Conv`` + ``Slice``.

``kimi::attn_res`` (and its two-phase inference ops) and ``kimi::moe_experts`` lower to standard ops in
both paths; the routed experts run as a ``Loop`` over the experts that received tokens, each gathering
only its own tokens (no dense all-experts compute).

Numerics: KDA runs in float32 whatever the model dtype (the op's contract: float32 state, float32
arithmetic), its output is cast back to ``v``'s dtype; the conv runs in the input's dtype (ONNX Runtime
has no bfloat16 ``Conv`` on CPU: bfloat16 graphs are for GPU runtimes).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18 as op

from .. import ops as _ops  # noqa: F401  (registers torch.ops.kimi)
from . import registry
from .onnx_builder import (
    FLOAT,
    INT64,
    SubgraphBuilder,
    cast,
    emit,
    ints,
    kda_dims,
    repeat_heads,
    scalar_f32,
    short_conv_dims,
)
from .onnx_passes import DEFAULT_OPSET, raise_default_opset, widen_bfloat16_einsum  # noqa: F401  (also public here)

__all__ = [
    "OPSET27",
    "FALLBACK_OPSET",
    "DEFAULT_OPSET",
    "custom_translation_table",
    "raise_default_opset",
    "widen_bfloat16_einsum",
    "kda_linear_attention",
    "short_conv_causal_conv",
    "attn_res_onnx",
    "attn_res_phase1_onnx",
    "attn_res_merge_onnx",
    "moe_experts_onnx",
]

#: onnxscript 0.7.2 ships opsets up to 23 as modules; opset 27 (LinearAttention, CausalConvWithState)
#: is reached through a bare ``Opset`` object whose schemas come from the installed ``onnx``.
OPSET27 = onnxscript.values.Opset("", 27)
FALLBACK_OPSET = 18  # the exporter's own opset (torchlib); the fallback graph uses nothing newer


# --------------------------------------------------------------------------------------------------------
# kimi::kda -> LinearAttention (opset 27)
# --------------------------------------------------------------------------------------------------------


def kda_linear_attention(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None):
    """``kimi::kda`` as one ``LinearAttention`` (opset 27, gated_delta, per-key-channel decay).

    Layouts: q/k/decay [B, T, HV*K], value [B, T, HV*V], beta [B, T, HV], state [B, HV, K, V].
    Grouped value heads (HV > H) repeat q and k per value head, so the node runs HV == H_kv heads.
    Everything is cast to float32 (the op's arithmetic); the output returns to v's dtype.
    """
    H, K, HV, V = kda_dims(q, v, cu_seqlens)
    group = HV // H
    out_dtype = v.dtype
    state_dtype = ir.DataType.DOUBLE if out_dtype == ir.DataType.DOUBLE else FLOAT  # the op's state dtype
    if scale is None:
        scale = K ** -0.5
    scale = float(scale)
    if scale == 0.0:
        raise ValueError("kimi::kda lowering: scale=0.0 is LinearAttention's 'use the default' marker")
    q32, k32 = (repeat_heads(cast(x, FLOAT), H, group, K) for x in (q, k))
    flat = ints(0, 0, -1)
    q3, k3 = op.Reshape(q32, flat), op.Reshape(k32, flat)
    v3 = op.Reshape(cast(v, FLOAT), flat)
    g3 = op.Reshape(cast(g, FLOAT), flat)
    b3 = cast(beta, FLOAT)
    s0 = None if initial_state is None else cast(initial_state, FLOAT)
    o3, state = OPSET27.LinearAttention(
        q3, k3, v3, s0, g3, b3,
        q_num_heads=HV, kv_num_heads=HV, update_rule="gated_delta", scale=scale,
    )
    o = cast(op.Reshape(o3, ints(0, 0, HV, V)), out_dtype)
    return o, cast(state, state_dtype)


# --------------------------------------------------------------------------------------------------------
# kimi::short_conv -> CausalConvWithState (opset 27)
# --------------------------------------------------------------------------------------------------------


def short_conv_causal_conv(x, weight, bias=None, initial_state=None, activation="silu"):
    """``kimi::short_conv`` as one ``CausalConvWithState`` (opset 27) between two transposes ([B,T,C] <-> [B,C,T]).

    Runs in float32 like the op (and because ONNX Runtime's CPU expansion of the node has no
    bfloat16 ``Conv``); output and state return to x's dtype.
    """
    short_conv_dims(x, weight, activation)
    dtype = x.dtype
    xt = op.Transpose(cast(x, FLOAT), perm=[0, 2, 1])
    w = op.Unsqueeze(cast(weight, FLOAT), ints(1))  # [C, 1, W]
    b = None if bias is None else cast(bias, FLOAT)
    s0 = None if initial_state is None else cast(initial_state, FLOAT)
    y, state = OPSET27.CausalConvWithState(xt, w, b, s0, activation=activation)
    return cast(op.Transpose(y, perm=[0, 2, 1]), dtype), cast(state, dtype)


# --------------------------------------------------------------------------------------------------------
# kimi::attn_res and its two-phase inference ops (standard ops, float32 arithmetic)
# --------------------------------------------------------------------------------------------------------


def _attn_scores(xf, qf, eps):
    """xf [..., D] float32, qf [D] float32 -> query . rmsnorm(x) of shape [...]."""
    ms = op.ReduceMean(op.Mul(xf, xf), ints(-1), keepdims=0)
    rstd = op.Reciprocal(op.Sqrt(op.Add(ms, scalar_f32(eps))))
    return op.Mul(op.MatMul(xf, qf), rstd)


def attn_res_onnx(sources, query, eps=1e-6, partial=None):
    """``kimi::attn_res``: out = sum_n softmax_n(query . rmsnorm(sources[n])) * sources[n] (``partial``: one more
    source, concatenated behind)."""
    if partial is not None:
        sources = op.Concat(sources, op.Unsqueeze(partial, ints(0)), axis=0)
    dtype = sources.dtype
    xf = cast(sources, FLOAT)
    score = _attn_scores(xf, cast(query, FLOAT), float(eps))  # [N, B, T]
    alpha = op.Softmax(score, axis=0)
    out = op.ReduceSum(op.Mul(op.Unsqueeze(alpha, ints(-1)), xf), ints(0), keepdims=0)
    return cast(out, dtype)


def attn_res_phase1_onnx(sources, queries, eps=1e-6):
    """``kimi::attn_res_phase1``: S static queries against the completed sources -> (out, lse_max, lse_sum)."""
    dtype = sources.dtype
    xf = cast(sources, FLOAT)  # [N, B, T, D]
    qf = cast(queries, FLOAT)  # [S, D]
    ms = op.ReduceMean(op.Mul(xf, xf), ints(-1), keepdims=0)  # [N, B, T]
    rstd = op.Reciprocal(op.Sqrt(op.Add(ms, scalar_f32(float(eps)))))
    # [N, B, T, D] @ [D, S] -> [N, B, T, S] -> [S, N, B, T]
    dot = op.Transpose(op.MatMul(xf, op.Transpose(qf, perm=[1, 0])), perm=[3, 0, 1, 2])
    score = op.Mul(dot, rstd)
    m = op.ReduceMax(score, ints(1), keepdims=1)  # [S, 1, B, T]
    p = op.Exp(op.Sub(score, m))
    l = op.ReduceSum(p, ints(1), keepdims=0)  # [S, B, T]
    # sum_n p[s, n, b, t] x[n, b, t, :] -> [S, B, T, D]
    weighted = op.ReduceSum(op.Mul(op.Unsqueeze(p, ints(-1)), op.Unsqueeze(xf, ints(0))), ints(1), keepdims=0)
    out = op.Div(weighted, op.Unsqueeze(l, ints(-1)))
    return cast(out, dtype), op.Squeeze(m, ints(1)), l


def attn_res_merge_onnx(out, lse_max, lse_sum, partial, query, eps=1e-6):
    """``kimi::attn_res_merge``: online-softmax merge of the partial sum into a phase-1 result."""
    dtype = partial.dtype
    xf = cast(partial, FLOAT)
    s2 = _attn_scores(xf, cast(query, FLOAT), float(eps))  # [B, T]
    m1 = cast(lse_max, FLOAT)
    m = op.Max(m1, s2)
    w1 = op.Mul(cast(lse_sum, FLOAT), op.Exp(op.Sub(m1, m)))
    w2 = op.Exp(op.Sub(s2, m))
    num = op.Add(op.Mul(op.Unsqueeze(w1, ints(-1)), cast(out, FLOAT)), op.Mul(op.Unsqueeze(w2, ints(-1)), xf))
    return cast(op.Div(num, op.Unsqueeze(op.Add(w1, w2), ints(-1))), dtype)


# --------------------------------------------------------------------------------------------------------
# kimi::moe_experts: a Loop over the experts that received tokens, each gathering only its tokens
# --------------------------------------------------------------------------------------------------------


def moe_experts_onnx(x, topk_ids, topk_weights, w_gate, w_up, w_down):
    """Routed SwiGLU experts: out[t] = sum_j topk_weights[t, j] * E_{topk_ids[t, j]}(x[t]).

    x [T, D], topk_ids int64 [T, k], topk_weights [T, k], w_gate / w_up [E, I, D], w_down [E, D, I].
    The Loop runs once per distinct selected expert (``Unique`` of the ids): at decode that is at
    most k experts; each iteration gathers its tokens (``NonZero``), runs three ``Gemm`` on them and
    scatter-adds the weighted result. Accumulation is float32; the result has x's dtype.
    """
    dtype = x.dtype
    ids = cast(topk_ids, INT64)
    weights32 = cast(topk_weights, FLOAT)
    experts = op.Unique(op.Reshape(ids, ints(-1)), sorted=1)[0]  # [n_active]
    trip = op.Size(experts)
    acc0 = op.ConstantOfShape(op.Shape(x), value=ir.tensor(np.zeros(1, np.float32)))
    cond0 = op.Constant(value=ir.tensor(np.array(True)))

    body = SubgraphBuilder("moe_expert_loop")
    it = body.input("iter", INT64, [])
    cond_in = body.input("cond", ir.DataType.BOOL, [])
    acc = body.input("acc", FLOAT, None)
    e = body("Gather", experts, it, axis=0)  # scalar expert id
    nz = body("NonZero", body("Equal", ids, e))  # [2, n]
    tok = body("Gather", nz, body.const(np.array(0, np.int64)), axis=0)  # [n]
    wt = body("GatherND", weights32, body("Transpose", nz, perm=[1, 0]))  # [n]
    xe = body("Gather", x, tok, axis=0)  # [n, D]
    wg = body("Gather", w_gate, e, axis=0)  # [I, D]
    wu = body("Gather", w_up, e, axis=0)
    wd = body("Gather", w_down, e, axis=0)  # [D, I]
    gate = body("Gemm", xe, wg, transB=1)
    up = body("Gemm", xe, wu, transB=1)
    h = body("Mul", body("Mul", gate, body("Sigmoid", gate)), up)
    ye = body("Gemm", h, wd, transB=1)  # [n, D]
    if dtype != FLOAT:
        ye = body("Cast", ye, to=int(FLOAT))
    ye = body("Mul", ye, body("Unsqueeze", wt, body.const(np.array([-1], np.int64))))
    tok_idx = body("Unsqueeze", tok, body.const(np.array([-1], np.int64)))  # [n, 1]
    acc_out = body("ScatterND", acc, tok_idx, ye, reduction="add")
    graph = body.graph([body("Identity", cond_in), acc_out])
    (total,) = emit("Loop", [trip, cond0, acc0], {"body": graph}, num_outputs=1)
    return cast(total, dtype)


# --------------------------------------------------------------------------------------------------------
# translation table
# --------------------------------------------------------------------------------------------------------


def custom_translation_table(fallback: bool = False) -> dict[Any, Callable]:
    """``{torch.ops.kimi.<op>.default: lowering}`` for every kimi op with an ONNX lowering in the op table
    (lowering/registry.py).

    fallback=False: KDA -> LinearAttention, conv -> CausalConvWithState (opset 27).
    fallback=True: only opset <= 18 ops (chunked KDA Loop, Concat + Conv + Slice).
    """
    return {getattr(torch.ops.kimi, name).default: registry.resolve(ref)
            for name, ref in registry.onnx_lowerings(fallback).items()}
