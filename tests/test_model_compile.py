"""torch.compile on CPU: no graph breaks (prefill and decode), no recompiles across prompt lengths and decode
steps, compiled (Inductor) logits and greedy tokens equal to eager."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import kimi_compile
from kimi_compile import KimiForCausalLM, tiny_config
from kimi_compile.config import DENSE, FULL, LINEAR, SPARSE
from kimi_compile.compiled import compiled_step
from model_helpers import ids_of


def small_kimi_linear():
    """Every layer kind (KDA, MLA, dense, MoE) in 2 layers, to keep the Inductor compile short."""
    cfg = tiny_config("kimi_linear").replace(num_hidden_layers=2, layer_types=[LINEAR, FULL],
                                             mlp_layer_types=[DENSE, SPARSE])
    return KimiForCausalLM.from_config(cfg, 0).eval()


@pytest.mark.parametrize("kind,attn_res", [("kimi_linear", None), ("k2", None), ("kimi_linear", 4)])
def test_no_graph_breaks_prefill_and_decode(kind, attn_res):
    model = KimiForCausalLM.from_config(tiny_config(kind, attn_res_block_size=attn_res), 0).eval()
    ids = ids_of(2, 7, 0)
    with torch.no_grad():
        prefill = torch._dynamo.explain(model)(ids, model.empty_state(2))
        assert prefill.graph_break_count == 0, prefill.break_reasons
        assert prefill.graph_count == 1
        _, state = model(ids)
        decode = torch._dynamo.explain(model)(ids[:, :1], state)
        assert decode.graph_break_count == 0, decode.break_reasons
        assert decode.graph_count == 1


def test_k2_no_recompiles_across_lengths_and_steps():
    """Dynamo guards only (eager backend): one prefill graph for every prompt length, one decode graph for every
    step, also with RoPE positions derived from the growing cache."""
    model = KimiForCausalLM.from_config(tiny_config("k2"), 0).eval()
    step = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    counters.clear()
    with torch.no_grad():
        logits, state = step(ids_of(2, 5, 1), model.empty_state(2))
        logits, state = step(logits[:, -1:].argmax(-1), state)
        assert counters["stats"]["unique_graphs"] == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            for T in (3, 8, 13):
                logits, state = step(ids_of(2, T, T), model.empty_state(2))
                eager, _ = model(ids_of(2, T, T), model.empty_state(2))
                torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
            for _ in range(4):
                logits, state = step(logits[:, -1:].argmax(-1), state)
    assert counters["stats"]["unique_graphs"] == 2


def test_inductor_matches_eager_without_recompiles():
    """Inductor-compiled prefill and decode: logits equal to eager within fp32 noise, greedy tokens identical,
    no recompile for other prompt lengths or later decode steps."""
    model = small_kimi_linear()
    counters.clear()
    prompt = ids_of(2, 6, 2)
    with torch.no_grad():
        eager_tokens = kimi_compile.generate(model, prompt, 6)
        compiled_tokens = kimi_compile.generate(model, prompt, 6, backend="compile")  # compiles prefill + decode
        assert torch.equal(compiled_tokens, eager_tokens)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == 2
        step = compiled_step(model)  # the same compiled module generate used
        with torch._dynamo.config.patch(error_on_recompile=True):
            for T in (3, 11):
                ids = ids_of(2, T, T)
                got, got_state = step(ids, model.empty_state(2), logits_to_keep=1)  # generate's prefill graph
                want, want_state = model(ids, model.empty_state(2), logits_to_keep=1)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
                for _ in range(3):
                    tok = want[:, -1:].argmax(-1)
                    got, got_state = step(tok, got_state)
                    want, want_state = model(tok, want_state)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
                for name in want_state:
                    torch.testing.assert_close(got_state[name], want_state[name], rtol=1e-4, atol=1e-5)
            tokens = kimi_compile.generate(model, ids_of(2, 9, 3), 5, backend="compile")
            assert torch.equal(tokens, kimi_compile.generate(model, ids_of(2, 9, 3), 5))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("kind", ["kimi_linear", "k2"])
def test_torch_export_one_graph_for_prefill_and_decode(kind):
    """torch.export with symbolic batch, sequence and past length (0 and 1 included): one graph serves the first
    call, prefill continuation and decode, as the exported ONNX graph must."""
    from torch.export import Dim, export

    model = KimiForCausalLM.from_config(tiny_config(kind), 0).eval()
    B = Dim("batch_size", min=1, max=64)
    T = Dim("sequence_length", min=1, max=1024)
    P = Dim("past_sequence_length", min=0, max=1024)
    with torch.no_grad():
        _, state = model(ids_of(2, 3, 4))
        dyn_state = {k: ({0: B, 2: P} if k.endswith(".key") else {0: B}) for k in state}
        program = export(model, (ids_of(2, 5, 5), state), dynamic_shapes=({0: B, 1: T}, dyn_state), strict=False)
        exported = program.module()
        for b, t, p in [(1, 1, 0), (3, 1, 7), (2, 9, 4), (1, 4, 1)]:
            past = model.empty_state(b) if p == 0 else model(ids_of(b, p, p))[1]
            ids = ids_of(b, t, 10 * t + p)
            got, got_state = exported(ids, past)
            want, want_state = model(ids, past)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for name in want_state:
                torch.testing.assert_close(got_state[name], want_state[name], rtol=1e-5, atol=1e-6)


def test_plain_torch_compile_graph_count_over_lengths_and_batches():
    """torch.compile(model) as users write it (no marking by the caller): after the first prompt, decode step and
    prompt piece on top of a state, nothing recompiles across prompt lengths, past lengths or batch sizes >= 2
    (B = 1 is its own class: Dynamo specialises size 1). Each call's logits equal eager."""
    from torch._dynamo.testing import CompileCounter

    model = KimiForCausalLM.from_config(tiny_config("kimi_linear"), 0).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    frames = []
    with torch.no_grad():
        for i, (B, T) in enumerate([(1, 5), (1, 7), (1, 9), (2, 5), (3, 7), (2, 9)]):
            ids = ids_of(B, T, i)
            logits, state = compiled(ids)
            ref_logits, ref_state = model(ids)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            for _ in range(2):  # decode steps at growing past lengths
                nxt = ids_of(B, 1, 10 + i)
                logits, state = compiled(nxt, state)
                ref_logits, ref_state = model(nxt, ref_state)
                torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            piece = ids_of(B, 3, 20 + i)  # a prompt piece on top of the state
            logits, state = compiled(piece, state)
            torch.testing.assert_close(logits, model(piece, ref_state)[0], rtol=1e-5, atol=1e-5)
            frames.append(counter.frame_count)
    # fresh prompt, decode step, prompt piece: 3 graphs for B = 1, 3 more for every B >= 2
    assert frames == [3, 3, 3, 6, 6, 6], frames


@pytest.mark.parametrize("kind", ["kimi_linear", "k2", "kimi_linear_attnres"])
def test_static_cache_decoder_matches_generate(kind):
    """CUDAGraphDecoder's compiled static-cache step (no graph on CPU): MLA caches preallocated and written in place
    at cache_position give the same greedy tokens as eager generate, for two batch sizes and cache lengths that
    share one compiled step."""
    from kimi_compile.compiled import CUDAGraphDecoder

    model = KimiForCausalLM.from_config(tiny_config(kind), 0).eval()
    for B, max_len in [(2, 16), (3, 24)]:
        ids = ids_of(B, 7, B)
        want = kimi_compile.generate(model, ids, 6)
        with torch.no_grad():
            got = CUDAGraphDecoder(model, B, max_len).generate(ids, 6)
        assert torch.equal(got, want)


def test_static_cache_step_updates_kda_states_in_place():
    """With cache_position and no autograd the KDA recurrent states are overwritten in place (kimi::kda_decode_:
    new_state holds the buffers themselves), the same values as the functional step that autograd gets; the MLA
    caches are written in place either way."""
    from kimi_compile.compiled import CUDAGraphDecoder

    model = KimiForCausalLM.from_config(tiny_config("kimi_linear"), 0).eval()
    dec = CUDAGraphDecoder(model, 2, 16, compile=False)
    with torch.no_grad():
        dec.prefill(ids_of(2, 7, 3))
    pos = torch.tensor([7])
    tok = ids_of(2, 1, 4)
    functional = {n: t.clone() for n, t in dec.state.items()}
    with torch.enable_grad():
        want, want_state = model(tok, functional, cache_position=pos)
    in_place = {n: t.clone() for n, t in dec.state.items()}
    with torch.no_grad():
        got, got_state = model(tok, in_place, cache_position=pos)
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    rec = [n for n in in_place if n.endswith("recurrent_state")]
    assert rec and all(got_state[n] is in_place[n] for n in rec)
    assert all(want_state[n] is not functional[n] for n in rec)
    for name in in_place:
        torch.testing.assert_close(got_state[name], want_state[name].detach(), rtol=1e-6, atol=1e-6)
        # the buffers updated in place moved on; the conv states came back as new tensors
        moved = name.endswith(("recurrent_state", ".key"))
        assert torch.equal(in_place[name], dec.state[name]) != moved, name
        assert (got_state[name] is in_place[name]) == moved, name


def test_static_cache_step_with_a_strided_kda_state_returns_a_new_one():
    """A recurrent state that is not contiguous (a view of a larger buffer) cannot be overwritten in place as one
    block: the step returns a new state, the same values as the in-place step."""
    from kimi_compile.compiled import CUDAGraphDecoder

    model = KimiForCausalLM.from_config(tiny_config("kimi_linear"), 0).eval()
    dec = CUDAGraphDecoder(model, 2, 16, compile=False)
    with torch.no_grad():
        dec.prefill(ids_of(2, 7, 3))
    pos, tok = torch.tensor([7]), ids_of(2, 1, 4)
    in_place = {n: t.clone() for n, t in dec.state.items()}
    strided = {n: (t.transpose(2, 3).contiguous().transpose(2, 3) if n.endswith("recurrent_state") else t.clone())
               for n, t in dec.state.items()}
    with torch.no_grad():
        want, want_state = model(tok, in_place, cache_position=pos)
        got, got_state = model(tok, strided, cache_position=pos)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name in strided:
        if name.endswith("recurrent_state"):
            assert not strided[name].is_contiguous() and got_state[name] is not strided[name]
            assert torch.equal(strided[name], dec.state[name])  # left as it was
        torch.testing.assert_close(got_state[name], want_state[name], rtol=1e-6, atol=1e-6)


def test_static_cache_decoder_rejects_bad_sizes():
    from kimi_compile.compiled import CUDAGraphDecoder

    model = KimiForCausalLM.from_config(tiny_config("kimi_linear"), 0).eval()
    for kwargs, name in [(dict(batch_size=0, max_len=8), "batch_size"), (dict(batch_size=1, max_len=True), "max_len")]:
        with pytest.raises(ValueError, match=name):
            CUDAGraphDecoder(model, **kwargs)
    dec = CUDAGraphDecoder(model, 2, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(ids_of(2, 5, 0), 4)
    with pytest.raises(ValueError, match="batch_size"):
        dec.prefill(ids_of(3, 5, 0))


def deep_kimi_linear(n=8, attn_res=None):
    """Kimi-Linear-48B's layer pattern at tiny width: MLA every 4th layer, KDA elsewhere, the first layer dense."""
    cfg = tiny_config("kimi_linear", attn_res_block_size=attn_res).replace(
        num_hidden_layers=n, layer_types=[FULL if (i + 1) % 4 == 0 else LINEAR for i in range(n)],
        mlp_layer_types=[DENSE] + [SPARSE] * (n - 1))
    return KimiForCausalLM.from_config(cfg, 0).eval()


def region_calls(gm):
    """The subgraph identifier of every invoke_subgraph call in a Dynamo graph."""
    return [node.args[1] for node in gm.graph.nodes
            if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph]


@pytest.mark.parametrize("attn_res", [None, 2])
def test_layer_regions_reused_across_layers(attn_res):
    """Under torch.compile every decoder layer is a nested compile region: the 8 layers (2 MLA) trace to one
    subgraph per layer kind (KDA + MoE; MLA's projection and its attention + MoE; the dense first layer at most
    one more), called once per layer, prefill and decode, zero graph breaks; logits and state equal to eager.
    Opting out (compile_regions = False) or recording autograd inlines every layer."""
    model = deep_kimi_linear(8, attn_res)
    assert model.model.compile_regions  # the default
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(region_calls(gm))
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    ids = ids_of(2, 7, 1)
    with torch.no_grad():
        got, got_state = compiled(ids)
        want, want_state = model(ids)
        for _ in range(2):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for name in want_state:
                torch.testing.assert_close(got_state[name], want_state[name], rtol=1e-5, atol=1e-5)
            tok = want[:, -1:].argmax(-1)
            got, got_state = compiled(tok, got_state)
            want, want_state = model(tok, want_state)
    assert len(graphs) == 2  # prefill, decode
    # 6 KDA layers (1 call each), 2 MLA layers (2 calls: around the cache update); AttnRes: the FFN sublayers
    # apart (8 more calls); less the dense layer's call, which may be inlined (single use)
    n_calls = 6 + 2 * 2 + (8 if attn_res else 0) - 1
    for calls in graphs:
        assert len(calls) >= n_calls, calls  # the single-use dense layer may be inlined
        assert len(set(calls)) <= (4 if attn_res is None else 5), calls
    model.model.compile_regions = False
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(ids)
    with torch.enable_grad():
        model.model.compile_regions = True
        compiled(ids)
    assert graphs[2:] == [[], []]


def test_swiglu_inline_one_row_leaves_no_gemm_and_agrees():
    """SwiGLU.inline_one_row (on by default): a one-row step under torch.compile runs the dense MLP and the shared
    experts as reductions (no aten.mm left for their three projections each), with logits equal to the GEMMs'
    (float32); prompts keep the GEMMs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from kimi_compile.model import SwiGLU

    model = small_kimi_linear()
    mlps = [m for m in model.modules() if isinstance(m, SwiGLU)]
    assert len(mlps) == 2  # the dense layer's MLP and the MoE layer's shared experts
    ids = ids_of(1, 6, 3)
    with torch.no_grad():
        _, state = model(ids[:, :5])
        want, _ = model(ids[:, 5:], state)

    def mm_count(*args):
        graphs = []

        def fw(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(*args)
        nodes = [n for gm in graphs for n in gm.graph.nodes]
        return out, sum(n.target is torch.ops.aten.mm.default for n in nodes)

    assert all(m.inline_one_row for m in mlps)  # the default
    (got, _), inlined = mm_count(ids[:, 5:], state)
    _, prompt_inlined = mm_count(ids[:, :5], None)
    for m in mlps:
        m.inline_one_row = False
    try:
        _, base = mm_count(ids[:, 5:], state)
        _, prompt_base = mm_count(ids[:, :5], None)
    finally:
        for m in mlps:
            del m.inline_one_row  # back to the class default
    assert inlined == base - 3 * len(mlps), (base, inlined)
    assert prompt_inlined == prompt_base
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
