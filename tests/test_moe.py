"""kimi::moe_experts against a plain float64 loop written here; every implementation path; autograd; compile.

The Triton decode kernels (ops/moe/decode.py) run on CPU through the Triton interpreter (TRITON_INTERPRET=1, set
in a subprocess before triton is imported), compile ahead of time for sm_90 without a GPU, and run on the GPU under
@pytest.mark.cuda (dispatch, opcheck, torch.compile, CUDA-graph capture and replay).
"""

import json
import os

import pytest
import torch
from triton_interpreter import interpreter_results

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


def test_bfloat16_gradients_close_to_float64_autograd_of_the_loop():
    """16-bit inputs: the backward's GEMMs take bf16 operands (fp32 accumulation); every gradient stays within
    bf16 rounding of the float64 gradients of the same (bf16-valued) inputs."""
    x, ids, w, wg, wu, wd = make(40, 48, 24, 6, 3, dtype=torch.bfloat16, seed=21, distinct=False)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    out = moe.moe_experts(leaves[0], ids, *leaves[1:])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    ref = loop_reference(ref_leaves[0], ids, *ref_leaves[1:])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    for name, g, r in zip(("x", "topk_weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        assert g.dtype == leaves[("x", "topk_weights", "w_gate", "w_up", "w_down").index(name)].dtype
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err < 2e-2, (name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_backward_matches_float64_autograd_of_the_loop(dtype):
    """The sync-free backward (the op's on CUDA, bf16, sm90+) run on the CPU, where torch._grouped_mm has a kernel
    too: every gradient against float64 autograd of the loop, with one expert crowded and one without slots (its
    weight gradients exactly zero)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    x, ids, w, wg, wu, wd = make(40, 48, 24, 6, 3, dtype=dtype, seed=21, distinct=False)
    ids[:, 0] = 4
    ids[ids == 5] = 2  # expert 5 gets no slot
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    try:
        got = moe._backward_grouped_mm(grad_out, x, ids, w, wg, wu, wd)
    except RuntimeError as exc:  # a torch build without the CPU grouped GEMM for this dtype
        pytest.skip(f"torch._grouped_mm on CPU: {exc}")
    ref_leaves = [t.double().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    ref = loop_reference(ref_leaves[0], ids, *ref_leaves[1:])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, g, r, leaf in zip(("x", "topk_weights", "w_gate", "w_up", "w_down"), got, ref_grads,
                                (x, w, wg, wu, wd)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err < tol, (name, err)
    for g in got[2:]:
        assert (g[5] == 0).all()


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
    # no host sync on the bf16 paths (T=3: the decode kernels, T=300: grouped GEMM): capturable in a CUDA graph
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


# ------------------------------------------------------------------------------------------------ decode kernels


# name: (T, k, E, D, I, dtype, blocks: None = decode_blocks(D, I), else DecodeBlocks fields)
# D and I are no multiples of the blocks; small blocks give several partial blocks along every axis.
SMALL_BLOCKS = (8, 16, 4, 8, 8, 4)
DECODE_CASES = {
    "T1_k2_fp32_small_blocks": (1, 2, 16, 40, 24, "float32", SMALL_BLOCKS),
    "T1_k8_bf16_small_blocks": (1, 8, 16, 40, 24, "bfloat16", SMALL_BLOCKS),
    "T3_k8_fp32_small_blocks": (3, 8, 16, 40, 24, "float32", SMALL_BLOCKS),
    "T3_k2_bf16_small_blocks": (3, 2, 16, 40, 24, "bfloat16", SMALL_BLOCKS),
    # the default tiles: two column blocks of 256 along D=300 (the second partial), I=40 padded to 64
    "T1_k8_bf16_default_blocks": (1, 8, 16, 300, 40, "bfloat16", None),
    "T3_k2_fp32_default_blocks": (3, 2, 16, 300, 40, "float32", None),
    "T3_k8_fp16_small_blocks": (3, 8, 16, 40, 24, "float16", SMALL_BLOCKS),
}


def make_decode(T, k, E, D, I, dtype, seed=0):
    """Random inputs with a repeated expert in every token (slots 0 and 1 share one) and combine weights of both
    signs that sum to anything (the op does not normalise them)."""
    x, ids, w, wg, wu, wd = make(T, D, I, E, k, dtype=dtype, seed=seed, distinct=False)
    g = torch.Generator().manual_seed(seed + 1)
    ids = ids.clone()
    if k > 1:
        ids[:, 1] = ids[:, 0]
    w = torch.randn(T, k, generator=g) * 1.7
    return x, ids, w, wg, wu, wd


def _decode_case_inputs(name):
    T, k, E, D, I, dtype, blocks = DECODE_CASES[name]
    return make_decode(T, k, E, D, I, getattr(torch, dtype), seed=len(name) + T * 7 + k), blocks


# the grouped-matmul path's weighted sum (ops/moe/combine.py): (T, k, E, D, dtype of the expert outputs, block_d)
COMBINE_CASES = {
    "T1_k8_bf16": (1, 8, 16, 72, "bfloat16", 512),
    "T5_k2_bf16_partial_block": (5, 2, 4, 600, "bfloat16", 256),  # 600 = 2 blocks of 256 + 88
    "T7_k3_fp32_small_block": (7, 3, 5, 130, "float32", 64),
}


def _combine_case_inputs(name):
    """Expert outputs in the expert-sorted order of random top-k ids (repeats across tokens), router weights of
    both signs."""
    T, k, E, D, dtype, block_d = COMBINE_CASES[name]
    g = torch.Generator().manual_seed(len(name) * 13 + T)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    y_sorted = torch.randn(T * k, D, generator=g).to(getattr(torch, dtype))
    return y_sorted, ids, torch.randn(T, k, generator=g), block_d


def combine_loop(y_sorted, ids, weights):
    """float64, one sorted row at a time: row r holds slot order[r] = t*k + j."""
    T, k = ids.shape
    order = torch.argsort(ids.reshape(-1), stable=True)
    out = torch.zeros(T, y_sorted.shape[1], dtype=torch.float64)
    for r, slot in enumerate(order.tolist()):
        t, j = divmod(slot, k)
        out[t] += weights[t, j].double() * y_sorted[r].double()
    return out


# the Triton prefill path (ops/moe/grouped.py): (T, k, E, D, I, dtype, blocks: None = prefill_blocks(D, I), else
# PrefillBlocks fields). D and I are no multiples of the tiles (partial blocks along the reduction and the output
# columns); random ids repeat experts across tokens and leave some without tokens.
SMALL_PREFILL_BLOCKS = (16, 16, 16, 4, 2, 16, 16, 4, 2)
PREFILL_CASES = {
    "T37_k8_bf16_small_blocks": (37, 8, 16, 72, 40, "bfloat16", SMALL_PREFILL_BLOCKS),
    "T5_k2_fp16_small_blocks": (5, 2, 4, 40, 24, "float16", SMALL_PREFILL_BLOCKS),
    # the down kernel's other program order (row blocks fastest), 3 column tiles of D
    "T37_k8_bf16_small_blocks_rows_fastest": (37, 8, 16, 40, 40, "bfloat16", SMALL_PREFILL_BLOCKS + (False,)),
    "T9_k3_bf16_default_blocks": (9, 3, 5, 300, 40, "bfloat16", None),
}


def _prefill_case_inputs(name):
    T, k, E, D, I, dtype, blocks = PREFILL_CASES[name]
    return make(T, D, I, E, k, dtype=getattr(torch, dtype), seed=len(name) + T, distinct=False), blocks


def assert_prefill_close(out, ref, dtype, bf16_truncated=False):
    """Two roundings to the input dtype (h = silu(gate) * up, then each expert's output) before the float32 sum:
    the largest error within 2^-6 of the largest value in bf16 (2^-5 where the interpreter truncates), 2^-9 in
    fp16. A slot read from the wrong row or expert misses by the size of the values."""
    rel = {torch.bfloat16: 2 ** -5 if bf16_truncated else 2 ** -6, torch.float16: 2 ** -9}[dtype]
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:.3g} x {scale:.3g}"


def _decode_interp_main():
    """Body of the interpreter subprocess: prints one JSON line, each case's output as float64 lists."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kimi_compile.ops.moe import combine, decode
    res = {}
    for name in DECODE_CASES:
        args, blocks = _decode_case_inputs(name)
        out = decode.moe_experts_decode(*args, blocks=None if blocks is None else decode.DecodeBlocks(*blocks))
        res[name] = [str(out.dtype), out.double().tolist()]
    for name in COMBINE_CASES:
        y_sorted, ids, weights, block_d = _combine_case_inputs(name)
        _, order, _ = moe._slots_by_expert(ids)
        out = combine.moe_combine(y_sorted, order, weights, y_sorted.dtype, block_d=block_d)
        res["combine " + name] = [str(out.dtype), out.double().tolist()]
    from kimi_compile.ops.moe import grouped
    for name in PREFILL_CASES:
        args, blocks = _prefill_case_inputs(name)
        out = grouped.moe_experts_prefill(*args, blocks=None if blocks is None else grouped.PrefillBlocks(*blocks))
        res["prefill " + name] = [str(out.dtype), out.double().tolist()]
    for case in LAYOUT_CASES:  # the layout kernels (the parent compares with align_rows' torch path)
        res["layout %s" % (case,)] = [t.tolist() for t in grouped.align_rows(_layout_ids(*case[:3]), *case[2:])]
    print("RESULT " + json.dumps(res))


@pytest.fixture(scope="module")
def decode_interp_results():
    pytest.importorskip("triton")
    return interpreter_results("test_moe", "_decode_interp_main")


def assert_decode_close(out, ref, dtype, bf16_truncated=False):
    """float32 math throughout, one rounding to the output dtype: |out - ref| <= half an ulp of the output dtype
    (at most 2^-8 of the value in bf16, 2^-11 in fp16; 2^-10 allowed) or float32 summation noise, plus a small
    absolute floor for values near 0. bf16_truncated: the Triton interpreter converts float32 to bf16 by truncation
    (measured: every output rounded towards 0), one ulp (2^-7) where the GPU rounds to nearest."""
    rtol = {torch.bfloat16: 2 ** -7 if bf16_truncated else 2 ** -8, torch.float16: 2 ** -10,
            torch.float32: 1e-5}[dtype]
    err = (out.double().cpu() - ref.double().cpu()).abs()
    bound = rtol * ref.double().cpu().abs() + 1e-5 * ref.double().abs().max().item()
    excess = (err - bound).max().item()
    assert excess <= 0, f"max error {err.max().item():.3g}, worst excess over the bound {excess:.3g}"


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_kernels_interpreter(decode_interp_results, name):
    args, _ = _decode_case_inputs(name)
    dtype_name, values = decode_interp_results[name]
    out = torch.tensor(values, dtype=torch.float64)
    assert dtype_name == str(args[0].dtype) and out.shape == args[0].shape
    assert_decode_close(out, loop_reference(*args), args[0].dtype, bf16_truncated=True)


@pytest.mark.parametrize("name", list(COMBINE_CASES))
def test_combine_kernel_interpreter(decode_interp_results, name):
    """The grouped path's weighted sum read from the expert-sorted rows: against the float64 loop, one rounding."""
    y_sorted, ids, weights, _ = _combine_case_inputs(name)
    dtype_name, values = decode_interp_results["combine " + name]
    out = torch.tensor(values, dtype=torch.float64)
    assert dtype_name == str(y_sorted.dtype) and out.shape == (ids.shape[0], y_sorted.shape[1])
    assert_decode_close(out, combine_loop(y_sorted, ids, weights), y_sorted.dtype, bf16_truncated=True)


@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_kernels_interpreter(decode_interp_results, name):
    """The grouped prefill kernels (padded expert-sorted rows, fused silu * up, combine) against the float64 loop."""
    args, _ = _prefill_case_inputs(name)
    dtype_name, values = decode_interp_results["prefill " + name]
    out = torch.tensor(values, dtype=torch.float64)
    assert dtype_name == str(args[0].dtype) and out.shape == args[0].shape
    assert_prefill_close(out, loop_reference(*args), args[0].dtype, bf16_truncated=True)


# (T, k, E, block_m): several chunks of LAYOUT_CHUNK slots, an expert count no power of two, one slot, none;
# several programs of the running sums (E > LAYOUT_EXPERTS) and of the block experts; more chunks than one step
# of the running sums takes (8800 slots: 69 chunks, 64 a step at 32 experts a program; 40 experts: 2 programs)
LAYOUT_CASES = [(37, 8, 16, 16), (5, 2, 4, 64), (1, 1, 3, 16), (300, 8, 256, 64), (97, 6, 40, 32), (0, 4, 8, 16),
                (1100, 8, 40, 16)]


def _layout_ids(T, k, E):
    return torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(T + E))


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_prefill_layout_kernels_interpreter(decode_interp_results, case):
    """The layout kernels give align_rows' torch layout exactly (both keep an expert's slots in slot order)."""
    from kimi_compile.ops.moe import grouped
    want = grouped.align_rows(_layout_ids(*case[:3]), *case[2:])
    got = decode_interp_results["layout %s" % (case,)]
    for name, g, w in zip(("slot_of_row", "block_expert", "row_of_slot"), got, want):
        assert g == w.tolist(), name


@pytest.mark.parametrize("T,k,E,block_m", LAYOUT_CASES)
def test_prefill_row_layout(T, k, E, block_m):
    """align_rows: every slot in exactly one row, each expert's slots in its own whole blocks in slot order, the
    padding rows hold P, blocks past the last used one name expert E, and row_of_slot inverts slot_of_row."""
    pytest.importorskip("triton")
    from kimi_compile.ops.moe import grouped
    ids = _layout_ids(T, k, E)
    P = T * k
    slot_of_row, block_expert, row_of_slot = grouped.align_rows(ids, E, block_m)
    R = grouped.rows_bound(P, E, block_m)
    assert slot_of_row.shape == (R,) and block_expert.shape == (R // block_m,) and row_of_slot.shape == (P,)
    flat = ids.reshape(-1)
    real = slot_of_row[slot_of_row < P]
    assert sorted(real.tolist()) == list(range(P)) and (slot_of_row[slot_of_row >= P] == P).all()
    assert (slot_of_row[row_of_slot] == torch.arange(P)).all()
    for b, e in enumerate(block_expert.tolist()):
        slots = slot_of_row[b * block_m:(b + 1) * block_m]
        slots = slots[slots < P]
        if e == E:  # unused block: no slot, and so are all after it
            assert slots.numel() == 0 and (block_expert[b:] == E).all()
        else:
            assert (flat[slots] == e).all()
    for e in range(E):  # an expert's slots in ascending order, packed at the start of its first block
        rows = row_of_slot[flat == e]
        assert rows.tolist() == sorted(rows.tolist())
        if rows.numel():
            assert rows[0] % block_m == 0 and (rows[-1] - rows[0]).item() == rows.numel() - 1


def test_unknown_prefill_kernel_names_the_setting(monkeypatch):
    monkeypatch.setattr(moe, "PREFILL_KERNEL", "cutlass")
    with pytest.raises(ValueError, match="PREFILL_KERNEL"):
        moe.moe_experts(*make(3, 16, 8, 4, 2))


def test_prefill_tiles_fit_the_device_shared_memory(monkeypatch):
    """The default tiles where a block holds 227 KB of shared memory (H100 / H200), the 128-column ones at 163 KB
    (A100), and no query for CPU tensors."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from kimi_compile.ops.moe import grouped
    default = grouped.prefill_blocks(2304, 1024)
    cuda = torch.device("cuda", 0)
    for smem, want in ((232448, default), (166912, grouped._SMALL_SMEM_BLOCKS)):
        monkeypatch.setattr(grouped, "device_properties",
                            lambda dev, smem=smem: SimpleNamespace(shared_memory_per_block_optin=smem))
        got = grouped.fit_blocks(default, cuda)
        assert got == want and grouped._smem_bytes(got, 2) + 8192 <= smem
    assert grouped.fit_blocks(default, torch.device("cpu")) == default


@pytest.mark.parametrize("kernel", ["_gate_up_kernel", "_down_kernel"])
def test_prefill_kernels_compile_for_sm90(kernel):
    """Compiled ahead of time for the H200 (no GPU needed): the default tiles lower tl.dot to Hopper's wgmma."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_compile.ops.moe import grouped

    fn = getattr(grouped, kernel)
    b = grouped.prefill_blocks(2304, 1024)
    pointers = dict(X="*bf16", SlotOfRow="*i64", BlockExpert="*i64", Wg="*bf16", Wu="*bf16", H="*bf16",
                    Wd="*bf16", Y="*bf16")
    unit = ("sg_d", "su_d", "sd_i")  # contiguous weights: Triton specialises a stride of 1 to a constant
    sig = {p.name: pointers.get(p.name, "constexpr" if p.is_constexpr or p.name in unit else "i32")
           for p in fn.params}
    if kernel == "_gate_up_kernel":
        consts = dict(K=8, BLOCK_M=b.block_m, BLOCK_N=b.gate_up_n, BLOCK_K=b.gate_up_k, UPCAST=False, sg_d=1, su_d=1)
        opts = dict(num_warps=b.gate_up_warps, num_stages=b.gate_up_stages)
    else:
        consts = dict(BLOCK_M=b.block_m, BLOCK_N=b.down_n, BLOCK_K=b.down_k, COLS_FASTEST=b.down_cols_fastest,
                      UPCAST=False, sd_i=1)
        opts = dict(num_warps=b.down_warps, num_stages=b.down_stages)
    # pointers, D, I and the other strides are multiples of 16 at Kimi widths (P and E need not be)
    hints = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if sig[p.name] != "constexpr" and p.name not in ("P", "E", "n_blocks")}
    compiled = triton.compile(ASTSource(fn, sig, consts, hints), target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = compiled.asm["ptx"]
    assert f".entry {kernel}" in ptx and "wgmma.mma_async" in ptx


@pytest.mark.parametrize("kernel", ["_chunk_counts_kernel", "_expert_scan_kernel", "_block_experts_kernel",
                                    "_place_slots_kernel"])
def test_layout_kernels_compile_for_sm90(kernel):
    """The layout kernels at Kimi's 256 experts and 64-row blocks, compiled ahead of time for the H200."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_compile.ops.moe import grouped

    fn = getattr(grouped, kernel)
    pointers = dict(Ids="*i64", ChunkCounts="*i32", ChunkBase="*i32", Totals="*i32", PadStart="*i32",
                    BlockExpert="*i64", SlotOfRow="*i64", RowOfSlot="*i64")
    sig = {p.name: pointers.get(p.name, "constexpr" if p.is_constexpr else "i32") for p in fn.params}
    consts = {k: v for k, v in dict(E=256, BLOCK_E=256, C=grouped.LAYOUT_CHUNK, SUB=32, BLOCK_M=64,
                                     EXPERTS=grouped.LAYOUT_EXPERTS, CHUNKS=64, BLOCKS=32).items() if k in sig}
    compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8})
    assert f".entry {kernel}" in compiled.asm["ptx"]


def test_combine_kernel_compiles_for_sm90():
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_compile.ops.moe import combine

    fn = combine._moe_combine_kernel
    sig = dict(Y="*bf16", Pos="*i64", W="*fp32", Out="*bf16", D="i32", K="constexpr", BLOCK_D="constexpr")
    hints = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if sig[p.name] != "constexpr"}
    compiled = triton.compile(ASTSource(fn, sig, dict(K=8, BLOCK_D=combine.COMBINE_BLOCK_D), hints),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": combine.COMBINE_WARPS})
    ptx = compiled.asm["ptx"]
    assert ".entry _moe_combine_kernel" in ptx and "ld.global.v4" in ptx  # 16-byte row loads


def test_decode_launcher_rejects_float64():
    pytest.importorskip("triton")
    from kimi_compile.ops.moe import decode
    args = make(1, 16, 8, 4, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        decode.moe_experts_decode(*args)


def test_forward_path_on_cpu_is_the_sorted_loop():
    x, ids, w, wg, wu, wd = make(1, 16, 8, 4, 2)
    assert moe._forward_path(x, ids, wg) == "sorted_loop"


# the real compiler (no GPU): the interpreter above never runs it. Kimi Linear widths and tiles, pointers 16-byte
# aligned, D, I and the leading strides multiples of 16, the innermost weight stride 1 (what a launch specialises).
SM90_KERNELS = ("_moe_gate_up_kernel", "_moe_down_combine_kernel")


def _sm90_table(kernel, blocks):
    if kernel == "_moe_gate_up_kernel":
        return dict(X="x", Ids="*i64", Wg="w", Wu="w", H="*fp32", sg_d=1, su_d=1, K=8, BLOCK_I=blocks.gate_up_block_i,
                    BLOCK_D=blocks.gate_up_block_d), blocks.gate_up_warps
    return dict(Hs="*fp32", Ids="*i64", Wts="*fp32", Wd="w", Out="x", sd_i=1, K=8, KP=8, BLOCK_D=blocks.down_block_d,
                BLOCK_I=blocks.down_block_i), blocks.down_warps


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kernel", SM90_KERNELS)
def test_decode_kernels_compile_for_sm90(kernel, dtype):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_compile.ops.moe import decode

    fn = getattr(decode, kernel)
    table, warps = _sm90_table(kernel, decode.decode_blocks(2304, 1024, 8))
    sig, consts, hints = {}, {}, {}
    for i, p in enumerate(fn.params):
        spec = table.get(p.name, "i32")
        if isinstance(spec, int):
            sig[p.name], consts[p.name] = "constexpr", spec
        elif spec == "i32":
            sig[p.name] = "i32"
            hints[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "*" + dtype if spec in ("x", "w") else spec
            hints[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, sig, consts, hints), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    assert f".entry {kernel}" in ptx
    assert "ld.global.v4" in ptx  # 16-byte weight loads: the rows are read wide


# ------------------------------------------------------------------------------------------------ decode on the GPU

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T,k", [(1, 2), (1, 8), (3, 2), (3, 8)])
@pytest.mark.parametrize("blocks", [None, SMALL_BLOCKS], ids=["default_blocks", "small_blocks"])
def test_cuda_decode_kernels_vs_loop(dtype, T, k, blocks):
    from kimi_compile.ops.moe import decode
    args = [a.cuda() for a in make_decode(T, k, 16, 300, 72, dtype, seed=T * 10 + k)]
    out = decode.moe_experts_decode(*args, blocks=None if blocks is None else decode.DecodeBlocks(*blocks))
    assert out.dtype == dtype and out.shape == (T, 300) and out.is_cuda
    assert_decode_close(out, loop_reference(*[a.cpu() for a in args]), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_decode_kimi_widths(T):
    """Kimi Linear widths (D=2304, I=1024, top-8; 32 experts instead of 256 to keep the test small), bf16, through
    the op: against the float64 loop (on the GPU) and against moe_experts_reference."""
    args = [a.cuda() for a in make(T, 2304, 1024, 32, 8, dtype=torch.bfloat16, seed=T)]
    assert moe._forward_path(args[0], args[1], args[3]) == "decode"
    out = moe.moe_experts(*args)
    assert_decode_close(out, loop_reference(*args), torch.bfloat16)
    # the reference rounds a, b, h and each expert's output to bf16: measured on CPU up to 0.022 from the float64
    # loop at these widths (0.9 of a 2e-2 + 2e-2 |ref| bound), so a looser match
    torch.testing.assert_close(out, moe.moe_experts_reference(*args), rtol=4e-2, atol=4e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_dispatch_decode_up_to_the_threshold_then_grouped_mm(monkeypatch):
    """T * k <= DECODE_MAX_SLOTS runs the decode kernels; above it the Triton prefill kernels (PREFILL_KERNEL
    "triton", the default) or the grouped GEMM ("grouped_mm": bf16, sm90+; before sm90 the sorted loop, E=16 < 72
    slots); with "triton", from PREFILL_TRITON_MAX_ROWS rows an expert the grouped GEMM where it runs; all match
    moe_experts_reference."""
    k = 8
    T_decode = moe.DECODE_MAX_SLOTS // k
    calls = []
    decode, prefill = moe._decode_module(), moe._prefill_module()
    real_decode, real_prefill, real_grouped = decode.moe_experts_decode, prefill.moe_experts_prefill, \
        moe._experts_grouped_mm
    monkeypatch.setattr(decode, "moe_experts_decode", lambda *a, **kw: calls.append("decode") or real_decode(*a, **kw))
    monkeypatch.setattr(prefill, "moe_experts_prefill",
                        lambda *a, **kw: calls.append("prefill") or real_prefill(*a, **kw))
    monkeypatch.setattr(moe, "_experts_grouped_mm", lambda *a: calls.append("grouped_mm") or real_grouped(*a))
    grouped = torch.cuda.get_device_capability() >= (9, 0) and hasattr(torch, "_grouped_mm")
    assert moe.PREFILL_KERNEL == "triton"
    above = "grouped_mm" if grouped else "sorted_loop"
    monkeypatch.setattr(moe, "PREFILL_TRITON_MAX_ROWS", 8)  # E=16 experts: from T * k = 128 slots, T = 16
    for kernel, T, want in (("triton", 1, "decode"), ("triton", T_decode, "decode"),
                            ("triton", T_decode + 1, "prefill"), ("triton", 15, "prefill"),
                            ("triton", 16, "grouped_mm" if grouped else "prefill"),
                            ("grouped_mm", T_decode + 1, above)):
        monkeypatch.setattr(moe, "PREFILL_KERNEL", kernel)
        args = [a.cuda() for a in make(T, 64, 32, 16, k, dtype=torch.bfloat16, seed=T, distinct=False)]
        assert moe._forward_path(args[0], args[1], args[3]) == want, T
        calls.clear()
        out = moe.moe_experts(*args)
        assert calls == ([want] if want != "sorted_loop" else []), (T, calls)
        torch.testing.assert_close(out, moe.moe_experts_reference(*args), rtol=3e-2, atol=3e-2)
    # float16 / float32 take the decode path too; float64 does not
    for dtype, want in ((torch.float16, "decode"), (torch.float32, "decode"), (torch.float64, "gathered")):
        args = [a.cuda() for a in make(1, 64, 32, 16, k, dtype=dtype)]
        assert moe._forward_path(args[0], args[1], args[3]) == want, dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [37, 300])
@pytest.mark.parametrize("blocks", [None, SMALL_PREFILL_BLOCKS, SMALL_PREFILL_BLOCKS + (False,)],
                         ids=["default_blocks", "small_blocks", "small_blocks_rows_fastest"])
def test_cuda_prefill_kernels_vs_loop(dtype, T, blocks):
    from kimi_compile.ops.moe import grouped
    args = [a.cuda() for a in make(T, 300, 72, 16, 8, dtype=dtype, seed=T, distinct=False)]
    out = grouped.moe_experts_prefill(*args, blocks=None if blocks is None else grouped.PrefillBlocks(*blocks))
    assert out.dtype == dtype and out.shape == (T, 300) and out.is_cuda
    assert_prefill_close(out, loop_reference(*[a.cpu() for a in args]), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case", LAYOUT_CASES + [(4096, 8, 256, 64), (2000, 8, 256, 128)], ids=str)
def test_cuda_prefill_layout_kernels(case):
    from kimi_compile.ops.moe import grouped
    ids = _layout_ids(*case[:3])
    for g, w in zip(grouped.align_rows(ids.cuda(), *case[2:]), grouped.align_rows(ids, *case[2:])):
        assert torch.equal(g.cpu(), w)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_prefill_kernels_through_the_op_at_kimi_widths(monkeypatch):
    """PREFILL_KERNEL="triton" at Kimi Linear widths (D=2304, I=1024, top-8, 32 experts), 512 tokens, bf16: the op
    takes the prefill kernels, matches the float64 loop and the grouped-GEMM path, and replays in a CUDA graph."""
    monkeypatch.setattr(moe, "PREFILL_KERNEL", "triton")
    args = [a.cuda() for a in make(512, 2304, 1024, 32, 8, dtype=torch.bfloat16, seed=3, distinct=False)]
    assert moe._forward_path(args[0], args[1], args[3]) == "prefill"
    out = moe.moe_experts(*args)
    assert_prefill_close(out, loop_reference(*args), torch.bfloat16)
    monkeypatch.setattr(moe, "PREFILL_KERNEL", "grouped_mm")
    torch.testing.assert_close(out, moe.moe_experts(*args), rtol=4e-2, atol=4e-2)
    monkeypatch.setattr(moe, "PREFILL_KERNEL", "triton")
    static = [a.clone() for a in args]
    graph = torch.cuda.CUDAGraph()
    moe.moe_experts(*static)
    with torch.cuda.graph(graph):
        captured = moe.moe_experts(*static)
    graph.replay()
    torch.testing.assert_close(captured, out, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_backward_grouped_mm_without_host_sync(monkeypatch):
    """bf16 on sm90+ with BACKWARD_GROUPED_MM: the op's backward takes the grouped GEMMs and never syncs with the
    host (sync debug mode "error" raises on any sync); gradients against float64 autograd of the loop, an expert
    without slots gets zero weight gradients."""
    monkeypatch.setattr(moe, "BACKWARD_GROUPED_MM", True)
    if not (torch.cuda.get_device_capability() >= (9, 0) and hasattr(torch, "_grouped_mm")):
        pytest.skip("grouped GEMM backward needs sm90+")
    x, ids, w, wg, wu, wd = make(300, 64, 32, 16, 8, dtype=torch.bfloat16, seed=5, distinct=False)
    ids[:, 0] = 3
    ids[ids == 9] = 1  # expert 9 gets no slot
    assert moe._grouped_mm_usable(x.cuda(), wg.cuda())
    leaves = [t.cuda().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    out = moe.moe_experts(leaves[0], ids.cuda(), *leaves[1:])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    grad_out_cuda = grad_out.cuda()  # a copy from pageable host memory syncs: before the debug mode is on
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(out, leaves, grad_out_cuda)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, w, wg, wu, wd)]
    ref_grads = torch.autograd.grad(loop_reference(ref_leaves[0], ids, *ref_leaves[1:]), ref_leaves,
                                    grad_out.double())
    for name, g, r in zip(("x", "topk_weights", "w_gate", "w_up", "w_down"), grads, ref_grads):
        err = ((g.double().cpu() - r).norm() / r.norm()).item()
        assert err < 2e-2, (name, err)
    for g in grads[2:]:
        assert (g[9] == 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_decode_opcheck():
    args = [a.cuda() for a in make_decode(1, 8, 16, 64, 32, torch.bfloat16, seed=11)]
    assert moe._forward_path(args[0], args[1], args[3]) == "decode"
    torch.library.opcheck(torch.ops.kimi.moe_experts.default, args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_decode_compiled_without_graph_breaks():
    x, ids, w, wg, wu, wd = (a.cuda() for a in make(2, 64, 32, 16, 8, dtype=torch.bfloat16, seed=12))

    def f(x, ids, w):
        return moe.moe_experts(x * 2, ids, w, wg, wu, wd) + 1

    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(x, ids, w).graph_break_count == 0
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x, ids, w), f(x, ids, w))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_decode_graph_capture_and_replay(dtype):
    """Captured once, replayed on new tokens, expert ids and combine weights written into the static inputs: the
    replay equals an eager call on the new inputs (the kernels read every input from device memory)."""
    first = [a.cuda() for a in make_decode(1, 8, 16, 64, 32, dtype, seed=13)]
    second = [a.cuda() for a in make_decode(1, 8, 16, 64, 32, dtype, seed=14)]
    second[3:] = first[3:]  # the same expert weights, as in a model
    static = [a.clone() for a in first]
    moe.moe_experts(*static)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe.moe_experts(*static)
    graph.replay()
    torch.testing.assert_close(captured, moe.moe_experts(*first), rtol=0, atol=0)
    for dst, src in zip(static[:3], second[:3]):
        dst.copy_(src)
    graph.replay()
    eager = moe.moe_experts(*second)
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    assert_decode_close(captured, loop_reference(*[a.cpu() for a in second]), dtype)
