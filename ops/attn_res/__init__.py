"""Attention Residuals as custom ops: softmax attention over depth (arXiv 2603.15031).

Ops (torch.library namespace ``kimi``)
-------------------------------------
``kimi::attn_res(Tensor sources, Tensor query, float eps=1e-6, Tensor? partial=None) -> Tensor``
    ``sources`` ``[N, B, T, D]`` (embedding, completed blocks, partial sum), ``query`` ``[D]`` (the
    pseudo-query with the key RMSNorm weight folded in); ``partial`` ``[B, T, D]``, when given, is one
    more source after the N, read where it lies (the model passes the completed blocks stacked once a
    block and the running partial sum apart, instead of stacking all of them for every read)::

        score[n, b, t] = query . rmsnorm(sources[n, b, t])      rmsnorm(x) = x / sqrt(mean(x^2) + eps)
        out[b, t]      = sum_n softmax_n(score[:, b, t]) * sources[n, b, t]

    (with ``partial``: the same over ``cat([sources, partial[None]])``).

    Scores, softmax and the weighted sum are computed in float32 (float64 for float64 inputs);
    ``out`` has the sources' dtype.  Differentiable in ``sources``, ``query`` and ``partial``; the
    backward is the single op ``kimi::attn_res_backward`` (over the sources with ``partial`` stacked
    behind) so it stays one node under compile.

``kimi::attn_res_backward(Tensor grad_out, Tensor sources, Tensor query, float eps) -> (Tensor, Tensor)``
    ``(grad_sources, grad_query)``.

Two-phase inference (Block AttnRes; the queries are static, so all ``S`` sublayers of a block
score the completed sources at once, and each sublayer then adds only its partial sum):

``kimi::attn_res_phase1(Tensor sources, Tensor queries, float eps=1e-6) -> (Tensor out, Tensor lse_max, Tensor lse_sum)``
    ``queries`` ``[S, D]``.  For every query ``s`` and row: ``out[s]`` ``[S, B, T, D]`` (sources'
    dtype) is ``attn_res(sources, queries[s])``, i.e. already normalised, ``lse_max[s]`` ``[S, B, T]``
    the max score ``m`` and ``lse_sum[s]`` ``[S, B, T]`` ``l = sum_n exp(score_n - m)`` (so the
    log-sum-exp is ``m + log l``); the statistics are float32 (float64 for float64 sources).  With no
    partial sum (first sublayer of a block) ``out[s]`` is the answer.

``kimi::attn_res_merge(Tensor out, Tensor lse_max, Tensor lse_sum, Tensor partial, Tensor query, float eps=1e-6) -> Tensor``
    Adds the partial-sum source ``partial`` ``[B, T, D]`` to one query's phase-1 result by online
    softmax. With ``s2 = query . rmsnorm(partial)``, ``m = max(m1, s2)``::

        h = (e^{m1-m} l1 out + e^{s2-m} partial) / (e^{m1-m} l1 + e^{s2-m})

    which is the REFERENCE formula with the unnormalised phase-1 output ``o1 = l1 * out``.
    ``attn_res_merge(*phase1(x[:-1], Q)[s] , x[-1], Q[s]) == attn_res(x, Q[s])``.

Phase 1 and merge are differentiable too (backward formulas in PyTorch, a few nodes), so one code
path serves training and inference; the two-phase split pays off at inference.

Kernels: the default implementation (any device) is plain PyTorch (``ops/attn_res/naive.py``, also the
reference); on CUDA the float16 / bfloat16 / float32 cases run the Triton kernels of ``ops/attn_res/kernel.py``
(float64 stays on the PyTorch path).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_float, check_same_device, check_tensor
from .naive import (
    acc_dtype,
    attn_res_backward_reference,
    attn_res_merge_backward_reference,
    attn_res_merge_reference,
    attn_res_phase1_backward_reference,
    attn_res_phase1_reference,
    attn_res_reference,
    with_partial,
)

__all__ = [
    "attn_res",
    "attn_res_phase1",
    "attn_res_merge",
    "attn_res_reference",
]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_tensor(t, name: str) -> None:
    check_float(name, check_tensor(name, t))


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"attn_res: eps must be a float, got {type(eps).__name__}")
    if not (0.0 <= eps < float("inf")):  # also rejects NaN
        raise ValueError(f"attn_res: eps must be finite and >= 0, got {eps}")


def _check_same(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"attn_res: {name} dtype {t.dtype} does not match {ref_name} dtype {ref.dtype}")
    check_same_device({ref_name: ref, name: t})


def _check_sources(sources) -> None:
    _check_tensor(sources, "sources")
    if sources.dim() != 4:
        raise ValueError(f"attn_res: sources must be 4-D [N, B, T, D], got shape {tuple(sources.shape)}")
    if sources.shape[0] == 0:
        raise ValueError("attn_res: sources must hold at least one source (N == 0)")


def _check_attn_res(sources, query, eps, partial=None) -> None:
    _check_sources(sources)
    _check_tensor(query, "query")
    D = sources.shape[-1]
    if query.dim() != 1 or query.shape[0] != D:
        raise ValueError(f"attn_res: query must have shape [D] = [{D}] (D = sources.shape[-1]), got {tuple(query.shape)}")
    _check_same(query, "query", sources, "sources")
    if partial is not None:
        _check_tensor(partial, "partial")
        if partial.shape != sources.shape[1:]:
            raise ValueError(f"attn_res: partial must have shape [B, T, D] = {tuple(sources.shape[1:])} (one source), "
                             f"got {tuple(partial.shape)}")
        _check_same(partial, "partial", sources, "sources")
    _check_eps(eps)


def _check_phase1(sources, queries, eps) -> None:
    _check_sources(sources)
    _check_tensor(queries, "queries")
    D = sources.shape[-1]
    if queries.dim() != 2 or queries.shape[1] != D:
        raise ValueError(f"attn_res_phase1: queries must have shape [S, D] with D = {D}, got {tuple(queries.shape)}")
    if queries.shape[0] == 0:
        raise ValueError("attn_res_phase1: queries must hold at least one query (S == 0)")
    _check_same(queries, "queries", sources, "sources")
    _check_eps(eps)


def _check_merge(out, lse_max, lse_sum, partial, query, eps) -> None:
    _check_tensor(partial, "partial")
    if partial.dim() != 3:
        raise ValueError(f"attn_res_merge: partial must be 3-D [B, T, D], got shape {tuple(partial.shape)}")
    _check_tensor(out, "out")
    if out.shape != partial.shape:
        raise ValueError(f"attn_res_merge: out must have partial's shape {tuple(partial.shape)}, got {tuple(out.shape)}")
    _check_same(out, "out", partial, "partial")
    B, T, D = partial.shape
    for name, t in (("lse_max", lse_max), ("lse_sum", lse_sum)):
        _check_tensor(t, name)
        if t.shape != (B, T):
            raise ValueError(f"attn_res_merge: {name} must have shape [B, T] = [{B}, {T}], got {tuple(t.shape)}")
        want = acc_dtype(partial.dtype)
        if t.dtype != want:
            raise TypeError(f"attn_res_merge: {name} must be {want} (the phase-1 statistics for {partial.dtype}), got {t.dtype}")
        if t.device != partial.device:
            raise ValueError(f"attn_res_merge: {name} is on {t.device} but partial is on {partial.device}")
    _check_tensor(query, "query")
    if query.dim() != 1 or query.shape[0] != D:
        raise ValueError(f"attn_res_merge: query must have shape [D] = [{D}], got {tuple(query.shape)}")
    _check_same(query, "query", partial, "partial")
    _check_eps(eps)


def _triton_kernels(t: Tensor):
    """The Triton launchers module for ``t`` (CUDA, half/bfloat16/float32), else None (-> PyTorch)."""
    if t.dtype not in _TRITON_DTYPES:
        return None
    return _triton_kernel_module()


@functools.lru_cache(maxsize=None)
def _triton_kernel_module():
    """ops/attn_res/kernel.py, or None without Triton (the PyTorch implementation serves CUDA too). Imported on
    first use, not with the op: Triton is optional, and its interpreter mode is fixed when the kernels are decorated."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.kernel")


# --------------------------------------------------------------------------------------------
# kimi::attn_res
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("kimi::attn_res", mutates_args=())
def _attn_res_op(sources: Tensor, query: Tensor, eps: float = 1e-6, partial: Optional[Tensor] = None) -> Tensor:
    _check_attn_res(sources, query, eps, partial)
    return attn_res_reference(sources, query, eps, partial)


@_attn_res_op.register_kernel("cuda")
def _attn_res_cuda(sources: Tensor, query: Tensor, eps: float = 1e-6, partial: Optional[Tensor] = None) -> Tensor:
    _check_attn_res(sources, query, eps, partial)
    kernels = _triton_kernels(sources)
    if kernels is None:
        return attn_res_reference(sources, query, eps, partial)
    return kernels.attn_res_fwd(sources, query, eps, partial)


@_attn_res_op.register_fake
def _attn_res_fake(sources: Tensor, query: Tensor, eps: float = 1e-6, partial: Optional[Tensor] = None) -> Tensor:
    _check_attn_res(sources, query, eps, partial)
    return sources.new_empty(sources.shape[1:])


@torch.library.custom_op("kimi::attn_res_backward", mutates_args=())
def _attn_res_backward_op(grad_out: Tensor, sources: Tensor, query: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    return attn_res_backward_reference(grad_out, sources, query, eps)


@_attn_res_backward_op.register_kernel("cuda")
def _attn_res_backward_cuda(grad_out: Tensor, sources: Tensor, query: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    kernels = _triton_kernels(sources)
    if kernels is None:
        return attn_res_backward_reference(grad_out, sources, query, eps)
    return kernels.attn_res_bwd(grad_out, sources, query, eps)


@_attn_res_backward_op.register_fake
def _attn_res_backward_fake(grad_out: Tensor, sources: Tensor, query: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    return sources.new_empty(sources.shape), query.new_empty(query.shape)


def _attn_res_setup_context(ctx, inputs, output) -> None:
    sources, query, eps, partial = inputs
    ctx.save_for_backward(sources, query, partial)
    ctx.eps = eps


def _attn_res_autograd(ctx, grad_out: Tensor):
    sources, query, partial = ctx.saved_tensors
    # with a partial source: the backward of the stacked sources, split (a copy in the backward only)
    grad_all, grad_query = torch.ops.kimi.attn_res_backward(grad_out, with_partial(sources, partial), query, ctx.eps)
    N = sources.shape[0]
    return (
        grad_all[:N] if ctx.needs_input_grad[0] else None,
        grad_query if ctx.needs_input_grad[1] else None,
        None,
        grad_all[N] if partial is not None and ctx.needs_input_grad[3] else None,
    )


_attn_res_op.register_autograd(_attn_res_autograd, setup_context=_attn_res_setup_context)


def attn_res(sources: Tensor, query: Tensor, eps: float = 1e-6, partial: Optional[Tensor] = None) -> Tensor:
    """Attention Residuals: softmax attention over depth.

    Args:
        sources: ``[N, B, T, D]`` — the embedding, the completed block representations and (when
            present) the partial sum of the current block, stacked on the first axis.
        query: ``[D]`` — the sublayer's pseudo-query with the key RMSNorm weight folded in; same
            dtype and device as ``sources``.
        eps: RMSNorm epsilon (inside the square root).
        partial: optional ``[B, T, D]``, one more source after ``sources`` (same dtype and device),
            read in place: ``attn_res(s, q, partial=p) == attn_res(cat([s, p[None]]), q)`` without
            the copy.

    Returns:
        ``out`` ``[B, T, D]`` in the sources' dtype::

            out[b, t] = sum_n softmax_n(query . rmsnorm(sources[n, b, t])) * sources[n, b, t]

        with rmsnorm without weight and scores / softmax / sum in float32 (float64 for float64
        sources).  A zero query gives the uniform average of the sources.  Differentiable in
        ``sources``, ``query`` and ``partial``.

    Raises:
        TypeError / ValueError naming the bad argument (``sources`` not 4-D or empty, ``query`` not
        ``[D]``, ``partial`` not ``[B, T, D]``, dtype or device mismatch, bad ``eps``).
    """
    _check_attn_res(sources, query, eps, partial)
    return torch.ops.kimi.attn_res(sources, query, float(eps), partial)


# --------------------------------------------------------------------------------------------
# two-phase inference: kimi::attn_res_phase1 and kimi::attn_res_merge
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("kimi::attn_res_phase1", mutates_args=())
def _attn_res_phase1_op(sources: Tensor, queries: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    _check_phase1(sources, queries, eps)
    return attn_res_phase1_reference(sources, queries, eps)


@_attn_res_phase1_op.register_kernel("cuda")
def _attn_res_phase1_cuda(sources: Tensor, queries: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    _check_phase1(sources, queries, eps)
    kernels = _triton_kernels(sources)
    if kernels is None:
        return attn_res_phase1_reference(sources, queries, eps)
    return kernels.attn_res_phase1_fwd(sources, queries, eps)


@_attn_res_phase1_op.register_fake
def _attn_res_phase1_fake(sources: Tensor, queries: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    _check_phase1(sources, queries, eps)
    _, B, T, D = sources.shape
    S = queries.shape[0]
    out = sources.new_empty((S, B, T, D))
    m = sources.new_empty((S, B, T), dtype=acc_dtype(sources.dtype))
    l = sources.new_empty((S, B, T), dtype=acc_dtype(sources.dtype))
    return out, m, l


@torch.library.custom_op("kimi::attn_res_merge", mutates_args=())
def _attn_res_merge_op(
    out: Tensor, lse_max: Tensor, lse_sum: Tensor, partial: Tensor, query: Tensor, eps: float = 1e-6
) -> Tensor:
    _check_merge(out, lse_max, lse_sum, partial, query, eps)
    return attn_res_merge_reference(out, lse_max, lse_sum, partial, query, eps)


@_attn_res_merge_op.register_kernel("cuda")
def _attn_res_merge_cuda(
    out: Tensor, lse_max: Tensor, lse_sum: Tensor, partial: Tensor, query: Tensor, eps: float = 1e-6
) -> Tensor:
    _check_merge(out, lse_max, lse_sum, partial, query, eps)
    kernels = _triton_kernels(partial)
    if kernels is None:
        return attn_res_merge_reference(out, lse_max, lse_sum, partial, query, eps)
    return kernels.attn_res_merge_fwd(out, lse_max, lse_sum, partial, query, eps)


@_attn_res_merge_op.register_fake
def _attn_res_merge_fake(
    out: Tensor, lse_max: Tensor, lse_sum: Tensor, partial: Tensor, query: Tensor, eps: float = 1e-6
) -> Tensor:
    _check_merge(out, lse_max, lse_sum, partial, query, eps)
    return partial.new_empty(partial.shape)


def _phase1_setup_context(ctx, inputs, output) -> None:
    sources, queries, eps = inputs
    ctx.save_for_backward(sources, queries)
    ctx.eps = eps


def _phase1_autograd(ctx, g_out, g_max, g_sum):
    sources, queries = ctx.saved_tensors
    dx, dq = attn_res_phase1_backward_reference(g_out, g_max, g_sum, sources, queries, ctx.eps)
    return dx, dq, None


_attn_res_phase1_op.register_autograd(_phase1_autograd, setup_context=_phase1_setup_context)


def _merge_setup_context(ctx, inputs, output) -> None:
    out, lse_max, lse_sum, partial, query, eps = inputs
    ctx.save_for_backward(out, lse_max, lse_sum, partial, query)
    ctx.eps = eps


def _merge_autograd(ctx, g):
    out, lse_max, lse_sum, partial, query = ctx.saved_tensors
    return (*attn_res_merge_backward_reference(g, out, lse_max, lse_sum, partial, query, ctx.eps), None)


_attn_res_merge_op.register_autograd(_merge_autograd, setup_context=_merge_setup_context)


def attn_res_phase1(sources: Tensor, queries: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """Phase 1 of two-phase AttnRes: score ``S`` static queries against the completed sources at once.

    Args:
        sources: ``[N, B, T, D]`` completed sources (embedding and completed blocks).
        queries: ``[S, D]`` the pseudo-queries of the block's sublayers (same dtype / device).
        eps: RMSNorm epsilon.

    Returns:
        ``(out, lse_max, lse_sum)``: ``out`` ``[S, B, T, D]`` (sources' dtype), ``out[s] ==
        attn_res(sources, queries[s])``; ``lse_max`` / ``lse_sum`` ``[S, B, T]`` float32 (float64
        for float64 sources), the max score ``m`` and ``l = sum_n exp(score_n - m)`` of each query
        and row.  Feed ``out[s]``, ``lse_max[s]``, ``lse_sum[s]`` to :func:`attn_res_merge`.
        Differentiable in ``sources`` and ``queries``.
    """
    _check_phase1(sources, queries, eps)
    return torch.ops.kimi.attn_res_phase1(sources, queries, float(eps))


def attn_res_merge(
    out: Tensor, lse_max: Tensor, lse_sum: Tensor, partial: Tensor, query: Tensor, eps: float = 1e-6
) -> Tensor:
    """Phase 2 of two-phase AttnRes: merge the partial-sum source into one query's phase-1 result.

    Args:
        out, lse_max, lse_sum: one query's slice of :func:`attn_res_phase1` (``[B, T, D]``,
            ``[B, T]``, ``[B, T]``).
        partial: ``[B, T, D]`` the block's partial sum (same dtype as ``out``).
        query: ``[D]`` the same query as used in phase 1.
        eps: RMSNorm epsilon (the one used in phase 1).

    Returns:
        ``h`` ``[B, T, D]`` equal to ``attn_res(cat([sources, partial[None]]), query)``, by online
        softmax: ``h = (e^{m1-m} l1 out + e^{s2-m} partial) / (e^{m1-m} l1 + e^{s2-m})``.
    """
    _check_merge(out, lse_max, lse_sum, partial, query, eps)
    return torch.ops.kimi.attn_res_merge(out, lse_max, lse_sum, partial, query, float(eps))
