"""Opset <= 18 lowerings of ``kimi::kda`` and ``kimi::short_conv`` for runtimes without opset 27.

KDA runs as a chunked WY form (the same algebra as ``ops/kda/naive.py``'s reference), with the chunk-parallel
work done for all chunks at once and one ``Loop`` over chunks carrying the state. For a chunk of C tokens
with in-chunk gate cumsum G (G_t = sum_{s<=t} g_s, per key channel), state S0 at the chunk start::

    A_tj = beta_t sum_c k_tc k_jc exp(G_tc - G_jc)   (j < t)      P_tj = sum_c q_tc k_jc exp(G_tc - G_jc)  (j <= t)
    X    = (I + A)^-1                                 (unit lower triangular)
    Wk   = X (beta * k * exp G),   U = X (beta * v)   (all chunks at once)
    loop over chunks:  E = U - Wk S0;  O = scale ((q * exp G) S0 + P E);  S0 <- exp(G_C) * S0 + (k * exp(G_C - G))^T E

Every exponent is a difference G_t - G_j with j <= t (<= 0 since g <= 0), clamped at 0 before ``Exp`` so the
masked upper triangle cannot overflow either: nothing overflows however strong the decay.
X is formed by forward substitution, one row per ``Loop`` step over the chunk length, for all chunks and
heads at once (C steps per call, independent of T). The chunk length is ``min(T, chunk)``, so a decode
step (T = 1) runs a 1x1 chunk. Arithmetic is float32; the output returns to v's dtype.

Memory: the pairwise decay tile is [B, HV, T, C, K] float32 (T * C * K per head), like the reference.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import opset18 as op

from .onnx_builder import (
    FLOAT,
    INT64,
    SubgraphBuilder,
    cast,
    dim_of,
    emit,
    ints,
    kda_dims,
    repeat_heads,
    scalar_f32,
    scalar_i64,
    short_conv_dims,
)

__all__ = ["kda_chunked", "short_conv_standard", "CHUNK"]

CHUNK = 16  # the [C, C, K] decay tile costs T*C*K; 16 keeps it small on CPU


def _to_chunks(x, pads, chunk_shape, perm):
    """Pad time to N*C, split it into [.., N, C, ..] and move heads forward."""
    return op.Transpose(op.Reshape(op.Pad(x, pads), chunk_shape), perm=perm)


def kda_chunked(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None, chunk: int = CHUNK):
    """``kimi::kda`` with opset <= 18 ops: chunk-parallel WY form + one Loop over chunks."""
    H, K, HV, V = kda_dims(q, v, cu_seqlens)
    group = HV // H
    scale = K ** -0.5 if scale is None else float(scale)
    out_dtype = v.dtype
    state_dtype = ir.DataType.DOUBLE if out_dtype == ir.DataType.DOUBLE else FLOAT

    q32, k32 = (repeat_heads(cast(x, FLOAT), H, group, K) for x in (q, k))  # [B, T, HV, K]
    v32, g32, b32 = cast(v, FLOAT), cast(g, FLOAT), cast(beta, FLOAT)

    # chunk geometry (run time): C = min(T, chunk), N = ceil(T / C), Tp = N * C
    T1 = dim_of(q, 1)
    C1 = op.Min(T1, ints(chunk))
    N1 = op.Div(op.Sub(op.Add(T1, C1), ints(1)), C1)
    Tp1 = op.Mul(N1, C1)
    pad1 = op.Sub(Tp1, T1)
    pads4 = op.Concat(ints(0, 0, 0, 0, 0), pad1, ints(0, 0), axis=0)  # pad the end of axis 1
    pads3 = op.Concat(ints(0, 0, 0, 0), pad1, ints(0), axis=0)
    C0, N0 = op.Squeeze(C1, ints(0)), op.Squeeze(N1, ints(0))

    def chunks(x, width):  # [B, T, HV, width] -> [B, HV, N, C, width]
        shape = op.Concat(ints(0), N1, C1, ints(HV, width), axis=0)
        return _to_chunks(x, pads4, shape, [0, 3, 1, 2, 4])

    qc, kc, gc = chunks(q32, K), chunks(k32, K), chunks(g32, K)
    vc = chunks(v32, V)
    bc = _to_chunks(b32, pads3, op.Concat(ints(0), N1, C1, ints(HV), axis=0), [0, 3, 1, 2])  # [B, HV, N, C]

    G = op.CumSum(gc, scalar_i64(3))  # [B, HV, N, C, K]
    gam = op.Exp(G)
    G_last = op.Gather(G, op.Sub(C1, ints(1)), axis=3)  # [B, HV, N, 1, K]
    kdecay = op.Mul(kc, op.Exp(op.Sub(G_last, G)))  # k_j exp(G_C - G_j)
    kdecay_t = op.Transpose(kdecay, perm=[0, 1, 2, 4, 3])  # [B, HV, N, K, C]
    last_decay = op.Transpose(op.Exp(G_last), perm=[0, 1, 2, 4, 3])  # [B, HV, N, K, 1]

    # pairwise decay tile exp(G_t - G_j) (clamped at 0: only j <= t survives the masks)
    gap = op.Sub(op.Unsqueeze(G, ints(4)), op.Unsqueeze(G, ints(3)))  # [B, HV, N, t, j, K]
    tile = op.Mul(op.Exp(op.Min(gap, scalar_f32(0.0))), op.Unsqueeze(kc, ints(3)))  # * k_j
    A = op.Squeeze(op.MatMul(tile, op.Unsqueeze(kc, ints(-1))), ints(-1))  # [B, HV, N, C, C]
    P = op.Squeeze(op.MatMul(tile, op.Unsqueeze(qc, ints(-1))), ints(-1))

    r = op.Range(scalar_i64(0), C0, scalar_i64(1))
    r_t, r_j = op.Unsqueeze(r, ints(1)), op.Unsqueeze(r, ints(0))  # [C, 1], [1, C]
    strict = op.Cast(op.Less(r_j, r_t), to=int(FLOAT))
    causal = op.Cast(op.LessOrEqual(r_j, r_t), to=int(FLOAT))
    L = op.Mul(op.Mul(A, strict), op.Unsqueeze(bc, ints(-1)))  # beta_t A_tj, j < t
    P = op.Mul(op.Mul(P, causal), scalar_f32(scale))

    # X = (I + L)^-1 by forward substitution; row t of X only reads rows < t, already final
    eye = op.EyeLike(op.ConstantOfShape(op.Concat(C1, C1, axis=0),
                                        value=ir.tensor(np.zeros(1, np.float32))))
    X0 = op.Expand(eye, op.Shape(L))
    inv = SubgraphBuilder("kda_wy_inverse")
    t = inv.input("row", INT64, [])
    cond = inv.input("cond", ir.DataType.BOOL, [])
    X = inv.input("X", FLOAT, None)
    L_row = inv("Gather", L, inv("Unsqueeze", t, inv.const(np.array([0], np.int64))), axis=3)  # [.., 1, C]
    update = inv("MatMul", L_row, X)  # sum_{j<t} L_tj X_j
    onehot = inv("Cast", inv("Equal", r_t, t), to=int(FLOAT))  # [C, 1]
    X_next = inv("Sub", X, inv("Mul", onehot, update))
    (X,) = emit("Loop", [C0, op.Constant(value=ir.tensor(np.array(True))), X0],
                {"body": inv.graph([inv("Identity", cond), X_next])}, num_outputs=1)

    beta_col = op.Unsqueeze(bc, ints(-1))
    Wk = op.MatMul(X, op.Mul(op.Mul(beta_col, kc), gam))  # [B, HV, N, C, K]
    U = op.MatMul(X, op.Mul(beta_col, vc))  # [B, HV, N, C, V]
    QG = op.Mul(op.Mul(qc, gam), scalar_f32(scale))

    if initial_state is None:
        S0 = op.ConstantOfShape(op.Concat(dim_of(q, 0), ints(HV, K, V), axis=0),
                                value=ir.tensor(np.zeros(1, np.float32)))
    else:
        S0 = cast(initial_state, FLOAT)

    body = SubgraphBuilder("kda_chunk_loop")
    n = body.input("chunk", INT64, [])
    cond = body.input("cond", ir.DataType.BOOL, [])
    S = body.input("state", FLOAT, [None, HV, K, V])
    u_n, w_n, qg_n, p_n, kd_n, ld_n = (body("Gather", x, n, axis=2) for x in (U, Wk, QG, P, kdecay_t, last_decay))
    e = body("Sub", u_n, body("MatMul", w_n, S))  # [B, HV, C, V]
    o = body("Add", body("MatMul", qg_n, S), body("MatMul", p_n, e))
    S_next = body("Add", body("Mul", ld_n, S), body("MatMul", kd_n, e))
    graph = body.graph([body("Identity", cond), S_next, o])
    state, O = emit("Loop", [N0, op.Constant(value=ir.tensor(np.array(True))), S0], {"body": graph},
                    num_outputs=2)
    # O [N, B, HV, C, V] -> [B, N, C, HV, V] -> [B, Tp, HV, V] -> [B, T, HV, V]
    O = op.Reshape(op.Transpose(O, perm=[1, 0, 3, 2, 4]), op.Concat(ints(0), Tp1, ints(HV, V), axis=0))
    O = op.Slice(O, ints(0), T1, ints(1))
    return cast(O, out_dtype), cast(state, state_dtype)


def short_conv_standard(x, weight, bias=None, initial_state=None, activation="silu"):
    """``kimi::short_conv`` with opset <= 18 ops: Concat(state, x) -> depthwise Conv -> Slice (float32)."""
    C, W = short_conv_dims(x, weight, activation)
    dtype = x.dtype
    xt = op.Transpose(cast(x, FLOAT), perm=[0, 2, 1])  # [B, C, T]
    if initial_state is None:
        xpad = op.Pad(xt, ints(0, 0, W - 1, 0, 0, 0))
    else:
        xpad = op.Concat(cast(initial_state, FLOAT), xt, axis=2)
    w = op.Unsqueeze(cast(weight, FLOAT), ints(1))  # [C, 1, W]
    b = None if bias is None else cast(bias, FLOAT)
    y = op.Conv(xpad, w, b, group=C, kernel_shape=[W])
    if activation == "silu":
        y = op.Mul(y, op.Sigmoid(y))
    length = dim_of(xpad, 2)
    state = op.Slice(xpad, op.Sub(length, ints(W - 1)), length, ints(2))
    return cast(op.Transpose(y, perm=[0, 2, 1]), dtype), cast(state, dtype)
