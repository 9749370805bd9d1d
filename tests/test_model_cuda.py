"""The whole tiny model on a GPU (Triton KDA, short conv, AttnRes and the CUDA MoE path) against the same model
on the CPU (reference ops), float32 with TF32 off: prefill, then decode steps from the carried state; compiled
(fullgraph) on CUDA too. Skipped without a GPU."""
from __future__ import annotations

import copy

import pytest
import torch

from kimi_compile import KimiForCausalLM, tiny_config
from model_helpers import randomise_attn_res

pytestmark = pytest.mark.cuda


def _model(kind, attn_res):
    model = KimiForCausalLM.from_config(tiny_config(kind, attn_res_block_size=attn_res), 0).eval()
    return randomise_attn_res(model, 1)  # non-zero AttnRes queries: the depth softmax is not uniform


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max()).item()


def _steps(model, ids, device):
    """Prefill ids[:, :-3], then three one-token decode steps; logits of every call and the last state."""
    logits, state = model(ids[:, :-3].to(device), None)
    outs = [logits]
    for t in range(ids.shape[1] - 3, ids.shape[1]):
        logits, state = model(ids[:, t:t + 1].to(device), state)
        outs.append(logits)
    return outs, state


@pytest.mark.parametrize("kind,attn_res,compiled", [("kimi_linear", None, False), ("k2", None, False),
                                                    ("kimi_linear", 3, True)])
def test_cuda_model_matches_cpu(kind, attn_res, compiled):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _model(kind, attn_res)
    gpu = copy.deepcopy(cpu).cuda()
    step = torch.compile(gpu, fullgraph=True) if compiled else gpu
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, want_state = _steps(cpu, ids, "cpu")
        got, got_state = _steps(step, ids, "cuda")
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.device.type == "cuda"
        assert _rel(a, b) < 1e-4, (i, _rel(a, b))
    assert want_state.keys() == got_state.keys()
    for key in want_state:
        assert got_state[key].dtype == want_state[key].dtype, key
        assert _rel(got_state[key], want_state[key]) < 1e-4, (key, _rel(got_state[key], want_state[key]))


@pytest.mark.parametrize("kind", ["kimi_linear", "k2"])
def test_generate_compile_uses_cuda_graph_decoder(kind):
    """generate(backend='compile') on CUDA replays the static-cache CUDA graph per token: same greedy tokens as
    eager on the same GPU model (float32, TF32 off), with and without eos."""
    from kimi_compile import generate
    from kimi_compile.compiled import CUDAGraphDecoder

    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = _model(kind, None).cuda()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5)).cuda()
    want = generate(gpu, ids, 12)
    got = generate(gpu, ids, 12, backend="compile")
    assert torch.equal(got, want)
    decoder = gpu.__dict__["_kimi_cuda_graph_decoder"][1]
    assert isinstance(decoder, CUDAGraphDecoder) and decoder.graph is not None
    eos = int(want[0, 12])
    assert torch.equal(generate(gpu, ids, 12, backend="compile", eos_token_id=eos),
                       generate(gpu, ids, 12, eos_token_id=eos))


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_bf16_prompt_attention_kernels(kernel, compiled, monkeypatch):
    """The bf16 prompt path of MLA (fused kernels by name, which the float32 tests above never reach): cuDNN's
    attention (sm90+, v at its own head dim) and the flash fallback (v padded), eager and compiled, forward and
    backward, against the same module in float64 on the CPU."""
    from kimi_compile import model as model_mod
    if kernel == "cudnn":
        if not model_mod._cudnn_prompt_attention():
            pytest.skip("cuDNN prompt attention needs sm90+ and cuDNN SDPA")
    else:
        monkeypatch.setattr(model_mod, "_cudnn_prompt_attention", lambda: False)
    torch._dynamo.reset()
    ref = KimiForCausalLM.from_config(tiny_config("kimi_linear"), 0).model.layers[1].self_attn.double()
    assert isinstance(ref, model_mod.MLAttention)
    mla = copy.deepcopy(ref).to("cuda", torch.bfloat16)
    run = torch.compile(mla, fullgraph=True) if compiled else mla
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 40, 64, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 40, 64, generator=g, dtype=torch.float64)
    x64 = x.clone().requires_grad_(True)
    want, _ = ref(x64, None, None, None)
    want.backward(grad)
    xb = x.to("cuda", torch.bfloat16).requires_grad_(True)
    got, _ = run(xb, None, None, None)
    got.backward(grad.to("cuda", torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < 3e-2, _rel(got, want)
    assert _rel(xb.grad, x64.grad) < 5e-2, _rel(xb.grad, x64.grad)
    w_got, w_want = mla.kv_b_proj.weight.grad, ref.kv_b_proj.weight.grad
    assert _rel(w_got, w_want) < 5e-2, _rel(w_got, w_want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_router_logits_16bit_gemm(dtype):
    """The router's 16-bit GEMM with a float32 output (CUDA, no autograd recording) against the float64 product of
    the same 16-bit values (every product exact in float32, only the summation order differs), eager and compiled,
    and the float32 path it replaces; with autograd recording it takes the float32 path and gradients flow."""
    from kimi_compile.model import router_logits
    g = torch.Generator().manual_seed(3)
    x = torch.randn(77, 2304, generator=g).to(dtype).cuda()
    w = (torch.randn(256, 2304, generator=g) * 2304 ** -0.5).to(dtype).cuda()
    exact = x.double() @ w.double().T
    with torch.no_grad():
        fast = router_logits(x, w)
        compiled = torch.compile(router_logits, fullgraph=True)(x, w)
        slow = torch.nn.functional.linear(x.float(), w.float())
    # float32 sums over 2304 products: the H200 measured 2.8e-6 / 3.4e-6 (bf16 / fp16) of the largest logit; a
    # 16-bit rounding anywhere would be ~4e-3
    for out in (fast, compiled):
        assert out.dtype == torch.float32
        assert _rel(out, exact) < 2e-5
    assert _rel(slow, exact) < 2e-5
    wl = w.clone().requires_grad_(True)
    out = router_logits(x, wl)
    assert out.dtype == torch.float32 and out.grad_fn is not None
    out.sum().backward()
    assert torch.isfinite(wl.grad).all() and wl.grad.abs().sum() > 0
