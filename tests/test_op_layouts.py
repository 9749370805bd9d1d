"""Non-contiguous (permuted-storage) inputs: every op's fakes describe the layouts its kernels return (contiguous),
so compiled forward + backward through Inductor equals eager; opcheck with non-contiguous samples for every op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kimi_compile.ops as kops


def permuted(x: torch.Tensor) -> torch.Tensor:
    """Same values and shape, storage in another order (a transposed copy; 1-D: every other element)."""
    if x.dim() == 1:
        return torch.empty(2 * x.numel(), dtype=x.dtype)[::2].copy_(x)
    dims = list(range(x.dim()))[::-1]
    out = x.permute(dims).contiguous().permute(dims)
    assert not out.is_contiguous() and torch.equal(out, x)
    return out


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def kda_case(seed=0):
    g = _gen(seed)
    B, T, H, K, V = 2, 9, 2, 8, 4
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    gate = -torch.rand(B, T, H, K, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    s0 = torch.randn(B, H, K, V, generator=g)
    return (lambda q, k, v, gate, beta, s0: kops.kda(q, k, v, gate, beta, s0)), (q, k, v, gate, beta, s0)


def conv_case(seed=1):
    g = _gen(seed)
    B, T, C, W = 2, 7, 8, 4
    x, w, b, s = (torch.randn(B, T, C, generator=g), torch.randn(C, W, generator=g), torch.randn(C, generator=g),
                  torch.randn(B, C, W - 1, generator=g))
    return (lambda x, w, b, s: kops.short_conv(x, w, b, s)), (x, w, b, s)


def attn_res_case(seed=2):
    g = _gen(seed)
    sources, query = torch.randn(3, 2, 5, 8, generator=g), torch.randn(8, generator=g)
    return (lambda s, q: kops.attn_res(s, q)), (sources, query)


def moe_case(seed=3):
    g = _gen(seed)
    T, D, I, E, k = 6, 8, 4, 3, 2
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    wg, wu, wd = (torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g),
                  torch.randn(E, D, I, generator=g))
    fn = lambda x, w, wg, wu, wd: kops.moe_experts(x, ids, w, wg, wu, wd)  # noqa: E731
    return fn, (x, w, wg, wu, wd)


CASES = {"kda": kda_case, "short_conv": conv_case, "attn_res": attn_res_case, "moe_experts": moe_case}


def _reversed_dims(x: torch.Tensor) -> torch.Tensor:
    return x.permute(list(range(x.dim()))[::-1])


def _forward_backward(fn, stored, weights=None):
    """stored: contiguous leaves in reversed-dims order; fn sees their permuted views, so the op gets
    permuted-storage inputs and the backward graph permutes the op's gradients back (which reads their strides)."""
    xs = [x.detach().clone().requires_grad_(True) for x in stored]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if weights is None:
        weights = [torch.randn(o.shape, generator=_gen(7)) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return [o.detach() for o in outs], torch.autograd.grad(loss, xs), weights


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_forward_backward_with_permuted_inputs_equals_eager(name):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    op_fn, inputs = CASES[name]()
    stored = [_reversed_dims(x).contiguous() for x in inputs]

    def fn(*xs):
        views = [_reversed_dims(x) for x in xs]
        assert all(v.dim() == 1 or not v.is_contiguous() for v in views)
        return op_fn(*views)

    ref_outs, ref_grads, weights = _forward_backward(fn, stored)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    # no on-disk caches: a cached graph would keep the strides of an older fake
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        outs, grads, _ = _forward_backward(compiled, stored, weights)
    assert counter.frame_count == 1
    for a, b in zip(outs + list(grads), ref_outs + list(ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _noncontiguous(args):
    return tuple(permuted(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def test_opcheck_noncontiguous_samples():
    """Every forward op with permuted-storage float inputs (requires_grad: the backward ops run too), and
    kimi::kda_decode_ with permuted inputs beside its contiguous state."""
    _, kda_in = kda_case(10)
    _, conv_in = conv_case(11)
    _, attn_in = attn_res_case(12)
    g = _gen(13)
    queries = torch.randn(2, 8, generator=g)
    out, m, l = kops.attn_res_phase1(attn_in[0], queries)
    partial = torch.randn(2, 5, 8, generator=g)
    fn, moe_in = moe_case(14)
    ids = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(6)])
    samples = [
        (torch.ops.kimi.kda.default, (*kda_in, 0.5, None)),
        (torch.ops.kimi.short_conv.default, (*conv_in, "silu")),
        (torch.ops.kimi.attn_res.default, (*attn_in, 1e-6)),
        (torch.ops.kimi.attn_res.default, (attn_in[0][:-1], attn_in[1], 1e-6, attn_in[0][-1])),  # partial apart
        (torch.ops.kimi.attn_res_phase1.default, (attn_in[0], queries, 1e-6)),
        (torch.ops.kimi.attn_res_merge.default, (out[0], m[0], l[0], partial, queries[1], 1e-6)),
        (torch.ops.kimi.moe_experts.default, (moe_in[0], ids, *moe_in[1:])),
    ]
    for op, args in samples:
        args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in _noncontiguous(args))
        assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
        torch.library.opcheck(op, args)
    # the in-place decode form: permuted q, k, v, g, beta; its state must be contiguous (it is overwritten whole);
    # no autograd
    q, k, v, gate, beta, s0 = kda_in
    torch.library.opcheck(torch.ops.kimi.kda_decode_.default, (*_noncontiguous((q, k, v, gate, beta)), s0.clone(), 0.5))
