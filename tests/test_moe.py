"""kimi::moe_experts against a plain float64 loop written here; all three implementation paths; autograd; compile."""

import pytest
import torch

from kimi_compile.ops import moe


def loop_reference(x, ids, w, wg, wu, wd):
    """out[t] = sum_j w[t,j] * Wd[e] (silu(Wg[e] x) * (Wu[e] x)), e = ids[t,j]; float64, one slot at a time."""
    x, w, wg, wu, wd = (a.double() for a in (x, w, wg, wu, wd))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            a = wg[e] @ x[t]
            b = wu[e] @ x[t]
            h = a / (1 + torch.exp(-a)) * b
            out[t] += w[t, j] * (wd[e] @ h)
    return out


def make(T, D, I, E, k, dtype=torch.float32, seed=0, distinct=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype)
    if distinct:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    else:
        ids = torch.randint(0, E, (T, k), generator=g)
    ids = ids.long()
    w = torch.rand(T, k, generator=g) + 0.1
    wg = (torch.randn(E, I, D, generator=g) / D ** 0.5).to(dtype)
    wu = (torch.randn(E, I, D, generator=g) / D ** 0.5).to(dtype)
    wd = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    return x, ids, w, wg, wu, wd


@pytest.mark.parametrize("T,k,E", [(1, 2, 8), (7, 2, 8), (33, 3, 5), (16, 1, 4), (5, 4, 16)])
def test_op_matches_loop_float32(T, k, E):
    args = make(T, 24, 16, E, k, seed=T * 10 + k)
    out = moe.moe_experts(*args)
    ref = loop_reference(*args)
    assert out.dtype == torch.float32 and out.shape == (T, 24)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_op_float64_exact_and_repeated_experts():
    # the same expert twice in a row of topk_ids (not produced by the router, still well defined)
    args = make(9, 16, 8, 4, 3, dtype=torch.float64, distinct=False, seed=3)
    torch.testing.assert_close(moe.moe_experts(*args), loop_reference(*args), rtol=1e-12, atol=1e-12)


def test_experts_without_tokens_and_empty_batch():
    x, ids, w, wg, wu, wd = make(6, 16, 8, 10, 2, seed=4)
    ids = ids % 3  # experts 3..9 get nothing
    torch.testing.assert_close(moe.moe_experts(x, ids, w, wg, wu, wd).double(), loop_reference(x, ids, w, wg, wu, wd),
                               rtol=1e-5, atol=1e-5)
    empty = moe.moe_experts(x[:0], ids[:0], w[:0], wg, wu, wd)
    assert empty.shape == (0, 16)


def test_bfloat16():
    args = make(11, 32, 16, 6, 2, dtype=torch.bfloat16, seed=5)
    out = moe.moe_experts(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), loop_reference(*args), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", ["_experts_sorted_loop", "_experts_gathered", "_experts_grouped_mm"])
def test_each_implementation_path(path):
    # the CUDA-only paths are plain torch code; run them on CPU to check their indexing and offsets
    dtype = torch.bfloat16 if path == "_experts_grouped_mm" else torch.float32
    args = make(13, 32, 16, 8, 3, dtype=dtype, seed=6, distinct=False)
    args = (args[0], args[1].clone(), *args[2:])
    args[1][:, 0] = 7  # expert 7 crowded, some experts empty
    out = getattr(moe, path)(*args)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), loop_reference(*args), rtol=tol, atol=tol)


def test_gradients_match_float64_autograd_of_the_loop():
    x, ids, w, wg, wu, wd = make(7, 12, 6, 5, 2, dtype=torch.float64, seed=7, distinct=False)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    out = moe.moe_experts(leaves[0], ids, *leaves[1:])
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    ref = loop_reference(ref_leaves[0], ids, *ref_leaves[1:])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, g, r in zip(("x", "topk_weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_opcheck():
    args = make(5, 16, 8, 4, 2, seed=8, distinct=False)
    torch.library.opcheck(torch.ops.kimi.moe_experts.default, args)


def test_compiles_without_graph_breaks_and_dynamic_tokens():
    x, ids, w, wg, wu, wd = make(9, 16, 8, 6, 2, seed=9)

    def f(x, ids, w):
        return moe.moe_experts(x * 2, ids, w, wg, wu, wd) + 1

    assert torch._dynamo.explain(f)(x, ids, w).graph_break_count == 0
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (9, 4, 13):
        x2, ids2, w2, *_ = make(T, 16, 8, 6, 2, seed=T)
        torch.testing.assert_close(cf(x2, ids2, w2), f(x2, ids2, w2))


@pytest.mark.parametrize("bad,match", [
    (dict(ids_dtype=torch.int32), "topk_ids must be int64"),
    (dict(w_shape=(3, 3)), "topk_weights must have"),
    (dict(wd_shape=(4, 8, 16)), "w_down must be"),
    (dict(x_dim=3), "x must be 2-D"),
])
def test_bad_arguments_name_the_argument(bad, match):
    x, ids, w, wg, wu, wd = make(3, 16, 8, 4, 2)
    if "ids_dtype" in bad:
        ids = ids.to(bad["ids_dtype"])
    if "w_shape" in bad:
        w = torch.rand(*bad["w_shape"])
    if "wd_shape" in bad:
        wd = torch.randn(*bad["wd_shape"])
    if "x_dim" in bad:
        x = x[None]
    with pytest.raises((ValueError, TypeError), match=match):
        moe.moe_experts(x, ids, w, wg, wu, wd)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype,T", [(torch.bfloat16, 3), (torch.bfloat16, 300), (torch.float32, 4),
                                     (torch.float32, 300)])
def test_cuda_paths(dtype, T):
    args = [a.cuda() for a in make(T, 64, 32, 16, 4, dtype=dtype, seed=T)]
    out = moe.moe_experts(*args)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double().cpu(), loop_reference(*[a.cpu() for a in args]), rtol=tol, atol=tol)
    # no host sync on the bf16 grouped path: it must be capturable in a CUDA graph
    if dtype == torch.bfloat16:
        graph = torch.cuda.CUDAGraph()
        static = [a.clone() for a in args]
        moe.moe_experts(*static)
        with torch.cuda.graph(graph):
            captured = moe.moe_experts(*static)
        graph.replay()
        torch.testing.assert_close(captured, out)


@pytest.mark.parametrize("bad_id", [-1, 4, 2 ** 40])
@pytest.mark.parametrize("mode", ["eager", "compiled", "backward_op"])
def test_out_of_range_expert_ids_raise_before_any_allocation(bad_id, mode):
    """An id outside [0, E) raises ValueError naming topk_ids before anything is sized from the ids (2**40 would
    make bincount allocate terabytes)."""
    x, ids, w, wg, wu, wd = make(5, 16, 8, 4, 2, seed=3)
    ids = ids.clone()
    ids[3, 1] = bad_id
    with pytest.raises(ValueError, match=r"topk_ids must hold expert ids in \[0, E=4\)"):
        if mode == "eager":
            moe.moe_experts(x, ids, w, wg, wu, wd)
        elif mode == "compiled":
            torch._dynamo.reset()
            torch.compile(moe.moe_experts, fullgraph=True, backend="aot_eager")(x, ids, w, wg, wu, wd)
        else:
            torch.ops.kimi.moe_experts_backward(torch.randn(5, 16), x, ids, w, wg, wu, wd)
