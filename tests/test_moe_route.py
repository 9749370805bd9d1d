"""The routing kernel (ops/moe/route.py) against a plain float64 loop written here: on CPU through the Triton
interpreter (TRITON_INTERPRET=1, set in a subprocess before triton is imported), on the GPU eagerly and compiled;
the op kimi::moe_route (CPU: tensor code) with opcheck and bad input; the model's Router on CUDA against its own
tensor code."""
import json
import math
import os

import pytest
import torch
from triton_interpreter import interpreter_results


# (N, E, k, renormalize, scaling, weights_with_bias): Kimi's 256 experts top-8 at 1 and 37 rows, E no power of
# two, k = 1, k = E
CASES = {
    "N1_E256_k8": (1, 256, 8, True, 2.446, False),
    "N37_E256_k8": (37, 256, 8, True, 2.446, False),
    "N5_E12_k3_bias_weights_no_renorm": (5, 12, 3, False, 1.0, True),
    "N9_E64_k1_bias_weights": (9, 64, 1, True, 0.5, True),
    "N20_E8_k8": (20, 8, 8, True, 1.0, False),
}


def route_loop(logits, bias, k, renormalize, scaling, with_bias):
    """float64, one row at a time: sigmoid, + bias, the k largest (lower column first on ties), their weights."""
    N, E = logits.shape
    ids = torch.empty(N, k, dtype=torch.int64)
    weights = torch.empty(N, k, dtype=torch.float64)
    for n in range(N):
        scores = [1.0 / (1.0 + math.exp(min(-float(v), 700.0))) for v in logits[n]]
        choice = [s + float(b) for s, b in zip(scores, bias)]
        top = sorted(range(E), key=lambda e: (-choice[e], e))[:k]
        vals = [(choice if with_bias else scores)[e] for e in top]
        if renormalize:
            total = sum(vals)
            vals = [v / (total + 1e-20) for v in vals]
        ids[n] = torch.tensor(top)
        weights[n] = torch.tensor(vals) * scaling
    return ids, weights


def case_inputs(name):
    N, E, k, renormalize, scaling, with_bias = CASES[name]
    g = torch.Generator().manual_seed(len(name) * 7 + N)
    logits = torch.randn(N, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.1
    return logits, bias, dict(k=k, renormalize=renormalize, scaling=scaling, weights_with_bias=with_bias)


def _interp_main():
    """Body of the interpreter subprocess: prints one JSON line, each case's ids and weights."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from kimi_compile.ops.moe.route import route_topk
    res = {}
    for name in CASES:
        logits, bias, kw = case_inputs(name)
        k = kw.pop("k")
        ids, w = route_topk(logits, bias, k, **kw)
        res[name] = [str(ids.dtype), ids.tolist(), str(w.dtype), w.double().tolist()]
    logits, bias, _ = case_inputs("N1_E256_k8")
    logits[0, 5] = float("nan")
    ids, w = route_topk(logits, bias, 8, renormalize=False, scaling=1.0, weights_with_bias=False)
    res["nan"] = [ids.tolist(), w.double().tolist()]
    print("RESULT " + json.dumps(res))


@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    return interpreter_results("test_moe_route", "_interp_main")


def assert_routes(ids, weights, logits, bias, kw):
    want_ids, want_w = route_loop(logits.double(), bias.double(), kw["k"], kw["renormalize"], kw["scaling"],
                                  kw["weights_with_bias"])
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.cpu().double(), want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_route_kernel_interpreter(interp_results, name):
    logits, bias, kw = case_inputs(name)
    ids_dtype, ids, w_dtype, w = interp_results[name]
    assert (ids_dtype, w_dtype) == ("torch.int64", "torch.float32")
    assert_routes(torch.tensor(ids), torch.tensor(w, dtype=torch.float32), logits, bias, kw)


def test_route_kernel_nan_ranks_first(interp_results):
    """A NaN score is taken first, as torch.topk ranks it, and its weight is NaN; the rest keep their order."""
    ids, w = interp_results["nan"]
    logits, bias, _ = case_inputs("N1_E256_k8")
    assert ids[0][0] == 5 and math.isnan(w[0][0])
    logits[0, 5] = -1e9  # the NaN column out of the way: the other seven as if it were not there
    want, _ = route_loop(logits.double(), bias.double(), 7, False, 1.0, False)
    assert 5 not in want[0].tolist() and ids[0][1:] == want[0].tolist()


BAD = [  # (what is wrong, logits, bias, k, the name the message must hold)
    ("logits float64", torch.zeros(2, 8, dtype=torch.float64), torch.zeros(8), 2, "logits"),
    ("logits 3-D", torch.zeros(1, 2, 8), torch.zeros(8), 2, "logits"),
    ("bias length", torch.zeros(2, 8), torch.zeros(7), 2, "bias"),
    ("bias bf16", torch.zeros(2, 8), torch.zeros(8, dtype=torch.bfloat16), 2, "bias"),
    ("k > E", torch.zeros(2, 8), torch.zeros(8), 9, "k"),
    ("k = 0", torch.zeros(2, 8), torch.zeros(8), 0, "k"),
]


@pytest.mark.parametrize("what,logits,bias,k,name", BAD, ids=[b[0] for b in BAD])
def test_route_bad_input(what, logits, bias, k, name):
    """The op (CPU: tensor code) and the kernel's launcher refuse it with ValueError naming the argument."""
    from kimi_compile.ops.moe import moe_route
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        moe_route(logits, bias, k, renormalize=True, scaling=1.0, weights_with_bias=False)
    pytest.importorskip("triton")
    from kimi_compile.ops.moe.route import route_topk
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        route_topk(logits, bias, k, renormalize=True, scaling=1.0, weights_with_bias=False)


@pytest.mark.parametrize("name", list(CASES))
def test_route_op_reference(name):
    """kimi::moe_route on the CPU (its tensor-code reference) against the float64 loop, and opcheck with a
    non-contiguous logits sample."""
    from kimi_compile.ops.moe import moe_route
    logits, bias, kw = case_inputs(name)
    k = kw.pop("k")
    ids, w = moe_route(logits, bias, k, **kw)
    assert_routes(ids, w, logits, bias, dict(kw, k=k))
    strided = torch.cat([logits, logits], dim=1)[:, ::2]
    assert not strided.is_contiguous()
    for sample in (logits, strided):
        torch.library.opcheck(torch.ops.kimi.moe_route.default,
                              (sample, bias, k, kw["renormalize"], float(kw["scaling"]), kw["weights_with_bias"]))


def test_route_kernel_compiles_for_sm90():
    """Kimi's 256 experts, top-8, 8 rows a program, compiled ahead of time for the H200 (no GPU needed)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_compile.ops.moe import route

    fn = route._route_kernel
    pointers = dict(Logits="*fp32", Bias="*fp32", Ids="*i64", Weights="*fp32", scaling="fp32")
    sig = {p.name: pointers.get(p.name, "constexpr" if p.is_constexpr else "i32") for p in fn.params}
    consts = dict(E=256, K=8, BLOCK_E=256, BLOCK_K=8, BLOCK_T=8, RENORMALIZE=True, WITH_BIAS=False)
    compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    assert ".entry _route_kernel" in compiled.asm["ptx"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_route_kernel_eager_and_compiled(name):
    """The kernel's launcher, the op eagerly, the op compiled (fullgraph, dynamic N), and opcheck on CUDA."""
    from kimi_compile.ops.moe import moe_route
    from kimi_compile.ops.moe.route import route_topk
    logits, bias, kw = case_inputs(name)
    k = kw.pop("k")
    for fn in (route_topk, moe_route, torch.compile(moe_route, fullgraph=True, dynamic=True)):
        ids, w = fn(logits.cuda(), bias.cuda(), k, **kw)
        assert_routes(ids, w, logits, bias, dict(kw, k=k))
    torch.library.opcheck(torch.ops.kimi.moe_route.default,
                          (logits.cuda(), bias.cuda(), k, kw["renormalize"], float(kw["scaling"]),
                           kw["weights_with_bias"]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_router_takes_the_kernel_and_matches_its_tensor_code(monkeypatch):
    """Kimi Linear's Router (one group, sigmoid) on CUDA: without autograd recording it routes through the kernel,
    with the same ids and weights as its tensor code; with autograd recording it keeps the tensor code (the kernel
    has no backward) and the router's weight gets a gradient."""
    from kimi_compile import model as model_mod
    from kimi_compile import tiny_config
    from kimi_compile.model import Router

    cfg = tiny_config("kimi_linear")
    assert cfg.n_group == 1 and cfg.moe_router_activation == "sigmoid"
    router = Router(cfg).cuda()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(cfg.num_experts, generator=g) * 0.1)
    x = torch.randn(33, cfg.hidden_size, generator=g).cuda()
    calls = []
    real = model_mod._moe_route
    monkeypatch.setattr(model_mod, "_moe_route", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ids, w = router(x)
    assert calls == [1]
    # two groups, both kept: the same selection as one group, through the router's tensor code
    monkeypatch.setattr(router, "n_group", 2)
    monkeypatch.setattr(router, "topk_group", 2)
    with torch.no_grad():
        want_ids, want_w = router(x)
    assert calls == [1]
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(router, "n_group", 1)
    monkeypatch.setattr(model_mod, "_moe_route", lambda *a, **k: calls.append(2) or real(*a, **k))
    _, w_grad = router(x)
    w_grad.sum().backward()
    assert calls == [1] and router.weight.grad is not None and router.weight.grad.abs().sum() > 0
