"""Attention Residuals in plain PyTorch (any device): the CPU kernels of the ``kimi::attn_res*`` ops, the path
float64 and Triton-less CUDA take, and the reference the Triton kernels are tested against. Not ops, no
validation: ``ops/attn_res/__init__.py`` checks the arguments and holds the contract. Scores, softmax and sums run
in float32 (float64 for float64 inputs)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "with_partial",
    "attn_res_reference",
    "attn_res_backward_reference",
    "attn_res_phase1_reference",
    "attn_res_phase1_backward_reference",
    "attn_res_merge_reference",
    "attn_res_merge_backward_reference",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(xf: Tensor, qf: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """``xf`` ``[..., D]``, ``qf`` ``[D]`` or ``[S, D]`` -> (score, rstd).  score ``[..., ]`` or ``[S, ...]``."""
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    if qf.dim() == 1:
        dot = torch.matmul(xf, qf)
    else:
        dot = torch.einsum("nbtd,sd->snbt", xf, qf)
    return dot * rstd, rstd


def with_partial(sources: Tensor, partial: Optional[Tensor]) -> Tensor:
    """``sources`` with ``partial`` (``[B, T, D]``) stacked behind as one more source (a copy), or as is."""
    return sources if partial is None else torch.cat([sources, partial.unsqueeze(0)])


def attn_res_reference(sources: Tensor, query: Tensor, eps: float = 1e-6, partial: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch AttnRes (the CPU kernel of ``kimi::attn_res``); not an op, no validation."""
    sources = with_partial(sources, partial)
    acc = acc_dtype(sources.dtype)
    xf = sources.to(acc)
    score, _ = _scores(xf, query.to(acc), eps)  # [N, B, T]
    alpha = torch.softmax(score, dim=0)
    out = (alpha.unsqueeze(-1) * xf).sum(0)
    return out.to(sources.dtype).contiguous()


def attn_res_backward_reference(grad_out: Tensor, sources: Tensor, query: Tensor, eps: float):
    acc = acc_dtype(sources.dtype)
    xf = sources.to(acc)
    qf = query.to(acc)
    g = grad_out.to(acc)
    D = sources.shape[-1]
    score, rstd = _scores(xf, qf, eps)  # [N, B, T]
    alpha = torch.softmax(score, dim=0)
    a = (xf * g).sum(-1)  # g . x_n            [N, B, T]
    delta = (alpha * a).sum(0)  # g . out      [B, T]
    ds = alpha * (a - delta)  # dL/dscore      [N, B, T]
    coef = ds * rstd
    dx = alpha.unsqueeze(-1) * g + coef.unsqueeze(-1) * qf - (coef * score * rstd / D).unsqueeze(-1) * xf
    dq = torch.einsum("nbt,nbtd->d", coef, xf)
    return dx.to(sources.dtype).contiguous(), dq.to(query.dtype).contiguous()


def attn_res_phase1_reference(sources: Tensor, queries: Tensor, eps: float):
    acc = acc_dtype(sources.dtype)
    xf = sources.to(acc)
    score, _ = _scores(xf, queries.to(acc), eps)  # [S, N, B, T]
    m = score.amax(dim=1)  # [S, B, T]
    p = torch.exp(score - m.unsqueeze(1))
    l = p.sum(dim=1)
    out = torch.einsum("snbt,nbtd->sbtd", p, xf) / l.unsqueeze(-1)
    return out.to(sources.dtype).contiguous(), m.contiguous(), l.contiguous()


def attn_res_merge_reference(out: Tensor, lse_max: Tensor, lse_sum: Tensor, partial: Tensor, query: Tensor, eps: float):
    acc = acc_dtype(partial.dtype)
    xf = partial.to(acc)
    s2, _ = _scores(xf, query.to(acc), eps)  # [B, T]
    m1 = lse_max.to(acc)
    m = torch.maximum(m1, s2)
    w1 = lse_sum.to(acc) * torch.exp(m1 - m)
    w2 = torch.exp(s2 - m)
    h = (w1.unsqueeze(-1) * out.to(acc) + w2.unsqueeze(-1) * xf) / (w1 + w2).unsqueeze(-1)
    return h.to(partial.dtype).contiguous()


def attn_res_phase1_backward_reference(g_out, g_max, g_sum, sources: Tensor, queries: Tensor, eps: float):
    """Gradients of phase 1 for (sources, queries).

    With p = exp(score - m), l = sum_n p, alpha = p / l and one-hot(argmax) (ties share, as for
    amax): dscore = alpha (g_out . x - g_out . out) + g_sum (p - l onehot) + g_max onehot.
    """
    acc = acc_dtype(sources.dtype)
    xf = sources.to(acc)
    qf = queries.to(acc)
    D = sources.shape[-1]
    score, rstd = _scores(xf, qf, eps)  # [S, N, B, T], [N, B, T]
    m = score.amax(dim=1, keepdim=True)
    p = torch.exp(score - m)
    l = p.sum(dim=1, keepdim=True)
    alpha = p / l
    onehot = (score == m).to(acc)
    onehot = onehot / onehot.sum(dim=1, keepdim=True)
    dscore = torch.zeros_like(score)
    dx = torch.zeros_like(xf)
    if g_out is not None:
        go = g_out.to(acc)
        out = torch.einsum("snbt,nbtd->sbtd", alpha, xf)
        a = torch.einsum("sbtd,nbtd->snbt", go, xf)
        delta = (go * out).sum(-1).unsqueeze(1)
        dscore = dscore + alpha * (a - delta)
        dx = dx + torch.einsum("snbt,sbtd->nbtd", alpha, go)
    if g_sum is not None:
        gl = g_sum.to(acc).unsqueeze(1)
        dscore = dscore + gl * (p - l * onehot)
    if g_max is not None:
        dscore = dscore + g_max.to(acc).unsqueeze(1) * onehot
    coef = dscore * rstd  # [S, N, B, T]
    dx = dx + torch.einsum("snbt,sd->nbtd", coef, qf)
    dx = dx - ((coef * score).sum(0) * rstd / D).unsqueeze(-1) * xf
    dq = torch.einsum("snbt,nbtd->sd", coef, xf)
    return dx.to(sources.dtype), dq.to(queries.dtype)


def attn_res_merge_backward_reference(g, out: Tensor, lse_max: Tensor, lse_sum: Tensor, partial: Tensor, query: Tensor, eps: float):
    """Gradients of the merge.  h = a out + b partial with a = sigmoid(lam - s2), b = 1 - a,
    lam = lse_max + log(lse_sum) (the phase-1 log-sum-exp), s2 = query . rmsnorm(partial)."""
    acc = acc_dtype(partial.dtype)
    D = partial.shape[-1]
    pf = partial.to(acc)
    qf = query.to(acc)
    of = out.to(acc)
    gf = g.to(acc)
    s2, r2 = _scores(pf, qf, eps)  # [B, T]
    lam = lse_max.to(acc) + torch.log(lse_sum.to(acc))
    a = torch.sigmoid(lam - s2)
    b = torch.sigmoid(s2 - lam)
    dlam = (gf * (of - pf)).sum(-1) * a * b
    coef = -dlam * r2  # d s2 = -d lam
    d_out = a.unsqueeze(-1) * gf
    d_partial = b.unsqueeze(-1) * gf + coef.unsqueeze(-1) * qf - (coef * s2 * r2 / D).unsqueeze(-1) * pf
    d_query = torch.einsum("bt,btd->d", coef, pf)
    return (
        d_out.to(out.dtype),
        dlam.to(lse_max.dtype),
        (dlam / lse_sum.to(acc)).to(lse_sum.dtype),
        d_partial.to(partial.dtype),
        d_query.to(query.dtype),
    )
