"""The KDA oracle: a plain token loop and the chunked form, in PyTorch (any device, differentiable, exact in
float64). The op's CPU kernel, its float64 path on CUDA, the tests and the bench all use these.

Chunked form (chunk of C tokens, G_t = sum_{s<=t} g_s inside the chunk, S0 the state at the chunk start,
e_t = beta_t (v_t - k_t^T diag(exp g_t) S_{t-1}) the delta-rule update of token t)::

    S_t = diag(exp G_t) S0 + sum_{j<=t} diag(exp(G_t - G_j)) k_j e_j^T
    (I + diag(beta) A) E = diag(beta) (V - (K * exp G) S0),  A_tj = sum_c k_tc k_jc exp(G_tc - G_jc), j < t
    O   = scale ((Q * exp G) S0 + P E),                     P_tj = sum_c q_tc k_jc exp(G_tc - G_jc), j <= t
    S_C = diag(exp G_C) S0 + (K * exp(G_C - G))^T E

Every exponent is a difference G_t - G_j with j <= t, which is <= 0 for g <= 0: nothing overflows, however
strong the decay, and no future gate reaches an earlier output. Non-finite inputs keep the recurrence's causality:
a NaN / inf at token t reaches outputs at t and later only, and g = -inf (a full forget) is exact.
"""
from __future__ import annotations

import torch

__all__ = ["REFERENCE_CHUNK", "state_dtype", "kda_reference_loop", "kda_reference_chunked", "kda_reference_backward"]

#: tokens per chunk of the chunked reference: its [C, C, K] decay tile costs T*C*K, so shorter chunks are faster on CPU
REFERENCE_CHUNK = 32


def state_dtype(v_dtype: torch.dtype) -> torch.dtype:
    """The recurrent state is float32; float64 inputs keep a float64 state so references stay exact."""
    return torch.float64 if v_dtype == torch.float64 else torch.float32


def _compute_dtype(v_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if v_dtype == torch.float64 else torch.float32


def _sequences(B: int, cu_seqlens):
    """(batch row, start, end) of each sequence (reads cu_seqlens on the host)."""
    if cu_seqlens is None:
        return None
    offsets = cu_seqlens.tolist()
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def kda_reference_loop(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None):
    """The recurrence one token at a time (the definition): per head and token
    S <- diag(exp g_t) S;  S <- S + beta_t k_t (v_t - k_t^T S)^T;  o_t = scale q_t^T S.
    Computes in float32 (float64 for float64 inputs); returns o in v's dtype and the final state."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cdt = _compute_dtype(v.dtype)
    scale = K ** -0.5 if scale is None else float(scale)
    group = HV // H
    q, k = (x.to(cdt).repeat_interleave(group, dim=2) for x in (q, k))
    v, g, beta = v.to(cdt), g.to(cdt), beta.to(cdt)
    seqs = _sequences(B, cu_seqlens) or [(b, 0, T) for b in range(B)]
    o = torch.zeros(B, T, HV, V, dtype=cdt, device=q.device)
    states = []
    for n, (b, lo, hi) in enumerate(seqs):
        S = torch.zeros(HV, K, V, dtype=cdt, device=q.device) if initial_state is None else initial_state[n].to(cdt)
        rows = []
        for t in range(lo, hi):
            S = S * g[b, t].exp()[:, :, None]
            err = v[b, t] - torch.einsum("hk,hkv->hv", k[b, t], S)
            S = S + k[b, t][:, :, None] * (beta[b, t][:, None] * err)[:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        if rows:
            o[b, lo:hi] = torch.stack(rows)
        states.append(S)
    return o.to(v.dtype), torch.stack(states).to(state_dtype(v.dtype))


def _gate_exponents(gc, cdt):
    """The decay exponents of one chunk, gc [B, HV, C, K]: gap [B, HV, C, C, K] = G_t - G_j for j <= t (-inf above
    the diagonal), head [B, HV, C, K] = G_t and tail [B, HV, C, K] = G_C - G_j, with G the in-chunk cumsum.

    Exact for g = -inf (a full forget): a difference whose range (j, t] holds a -inf is -inf itself, never
    -inf - (-inf); the finite part is summed in float64, so running sums past float32's range do not overflow.
    A NaN / +inf in g at token t reaches only exponents of rows >= t."""
    C = gc.shape[-2]
    idx = torch.arange(C, device=gc.device)
    if gc.device.type == "cpu":  # the usual case, checked on the host (CPU data: no sync): plain differences
        G = gc.cumsum(-2)
        if bool(torch.isfinite(G).all()):
            gap = torch.where((idx[None, :] <= idx[:, None])[..., None], G.unsqueeze(-2) - G.unsqueeze(-3),
                              float("-inf"))
            return gap, G, G[..., -1:, :] - G
    forget = gc == float("-inf")
    gf = torch.where(forget, torch.zeros_like(gc), gc).to(torch.float64).cumsum(-2)
    # per row t and channel: the last full forget at or before t (-1: none)
    last_forget = torch.where(forget, idx[:, None], -1).cummax(dim=-2).values
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64, device=gc.device)
    rows, cols = idx[:, None, None], idx[None, :, None]  # t, j (channels last)
    keep = (cols <= rows) & (cols >= last_forget.unsqueeze(-2))  # [B, HV, t, j, K]
    gap = torch.where(keep, gf.unsqueeze(-2) - gf.unsqueeze(-3), neg_inf)
    head = torch.where(last_forget < 0, gf, neg_inf)
    tail = torch.where(idx[:, None] >= last_forget[..., -1:, :], gf[..., -1:, :] - gf, neg_inf)
    return gap.to(cdt), head.to(cdt), tail.to(cdt)


def _chunked_dense(q, k, v, g, beta, state, scale: float, chunk: int):
    """One batch of equal-length sequences. q, k, g: [B, T, HV, K] (q/k already expanded to HV heads),
    v: [B, T, HV, V], beta: [B, T, HV], state: [B, HV, K, V]; all in the compute dtype.

    Causality holds for non-finite inputs too: every product that pairs token t with a later token j is masked by
    torch.where (not multiplied by 0, which would turn a NaN or inf at j into NaN at t), and the triangular solve
    reads only earlier rows, so a non-finite input at token t reaches outputs at t and later only."""
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))  # [B, HV, T, *]
    beta = beta.transpose(1, 2)
    T = q.shape[2]
    outs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        qc, kc, vc, gc, bc = (x[:, :, start:end] for x in (q, k, v, g, beta))
        C = end - start
        gap, head, tail = _gate_exponents(gc, q.dtype)
        decay = gap.exp()  # [B, HV, t, j, K], 0 above the diagonal
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        strict = causal.tril(-1)
        zero = q.new_zeros(())
        P = torch.where(causal, torch.einsum("bhtc,bhjc,bhtjc->bhtj", qc, kc, decay), zero)
        A = torch.where(strict, torch.einsum("bhtc,bhjc,bhtjc->bhtj", kc, kc, decay), zero)
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        lhs = torch.where(strict, bc[..., None] * A, zero) + eye
        rhs = bc[..., None] * (vc - (kc * head.exp()) @ state)
        E = torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)
        if q.device.type == "cpu" and bool(torch.isfinite(E).all()):
            PE = P @ E  # P is 0 above the diagonal and E finite: the plain product is causal (CPU: no sync)
        else:  # sum over j <= t only: 0 * NaN of a later token would reach row t
            PE = torch.where(causal[..., None], P[..., None] * E.unsqueeze(-3), zero).sum(-2)
        outs.append(scale * ((qc * head.exp()) @ state + PE))
        state = head[:, :, -1:].exp().transpose(-1, -2) * state + (kc * tail.exp()).transpose(-1, -2) @ E
    if not outs:
        return v.transpose(1, 2).new_zeros(v.shape[0], 0, v.shape[1], v.shape[3]), state
    return torch.cat(outs, dim=2).transpose(1, 2), state


def kda_reference_chunked(q, k, v, g, beta, initial_state=None, scale=None, cu_seqlens=None,
                          chunk: int = REFERENCE_CHUNK):
    """The KDA recurrence in chunked PyTorch (no per-token loop); float64 in, float64-exact out.

    Computes in float32 (float64 for float64 inputs); returns o in v's dtype and a new state (contiguous)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    cdt = _compute_dtype(v.dtype)
    scale = K ** -0.5 if scale is None else float(scale)
    group = HV // H
    qx, kx = (x.to(cdt).repeat_interleave(group, dim=2) for x in (q, k))
    vx, gx, bx = v.to(cdt), g.to(cdt), beta.to(cdt)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        s0 = torch.zeros(N, HV, K, V, dtype=cdt, device=q.device)
    else:
        s0 = initial_state.to(cdt)
    seqs = _sequences(B, cu_seqlens)
    if seqs is None:
        o, s = _chunked_dense(qx, kx, vx, gx, bx, s0, scale, chunk)
    else:
        outs, states = [], []
        for n, (_, lo, hi) in enumerate(seqs):
            o_n, s_n = _chunked_dense(qx[:, lo:hi], kx[:, lo:hi], vx[:, lo:hi], gx[:, lo:hi], bx[:, lo:hi],
                                      s0[n:n + 1], scale, chunk)
            outs.append(o_n)
            states.append(s_n)
        o, s = torch.cat(outs, dim=1), torch.cat(states, dim=0)
    return o.to(v.dtype).contiguous(), s.to(state_dtype(v.dtype)).contiguous()


def kda_reference_backward(q, k, v, g, beta, initial_state, scale, cu_seqlens, do, dstate):
    """Gradients of the chunked reference for (q, k, v, g, beta, initial_state) by reverse-mode AD
    (torch.func.vjp works inside an op kernel, where plain autograd is switched off). The state's gradient is
    zeros when initial_state is None; dstate None means no gradient flows into the final state. All contiguous."""
    if initial_state is None:
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        initial_state = torch.zeros(N, v.shape[2], q.shape[3], v.shape[3], dtype=state_dtype(v.dtype),
                                    device=q.device)
    if dstate is None:
        dstate = torch.zeros_like(initial_state)

    def fwd(q_, k_, v_, g_, b_, s_):
        return kda_reference_chunked(q_, k_, v_, g_, b_, s_, scale, cu_seqlens)

    _, vjp = torch.func.vjp(fwd, q, k, v, g, beta, initial_state)
    grads = vjp((do.to(v.dtype), dstate.to(initial_state.dtype)))
    return tuple(x.contiguous() for x in grads)
