"""Attention Residuals inside the model (issue 5): equivalences, initialisation, state continuity, compile graph,
checkpoint I/O.

The documented equivalence (REFERENCE section 4, "N = 1 is a plain residual with the embedding kept apart"):
with ``attn_res_block_size`` >= the number of sublayers L (2 per layer) there is one block, so sublayer l reads
only two sources, the embedding ``v_0`` and the partial sum of every earlier sublayer output
``S_l = sum_{i<l} v_i`` (for l = 0 the partial sum is absent and the input is the embedding)::

    h_l = a_l * v_0 + (1 - a_l) * S_l,   a_l = softmax over {v_0, S_l} of  q_l . (w_l * rmsnorm(.))

and the final hidden state is the same two-source mix with the final query before the final norm. That is a
plain residual stream ``S_l`` that never contains the embedding, with the embedding mixed back in at every read
with a learned, input-dependent weight. With every query zero (the paper's init) ``a_l = 1/2`` exactly, so
``h_l = (v_0 + S_l) / 2``: the plain pre-norm residual stream ``v_0 + S_l`` scaled by 1/2. Every sublayer and the
final norm start with an RMSNorm, which does not see the scale apart from its eps, so a freshly initialised
one-block model *is* the plain-residual model with the same weights, up to the pre-norm eps.

Everything here runs on CPU with tiny configs; float64 models where equality must be exact.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from kimi_compile import KimiForCausalLM, load_model, tiny_config
from kimi_compile.config import DENSE, FULL, LINEAR, SPARSE
from kimi_compile.state import empty_state, state_specs
from model_helpers import ids_of, randomise_attn_res, run_pieces

F64 = torch.float64


def seven_layer_config(S=None):
    """Tiny widths, 7 layers = 14 sublayers (KDA x3, MLA, KDA x2, MLA; layer 0 dense): block sizes 2 and 6 both
    leave completed blocks and a partial one."""
    return tiny_config("kimi_linear", attn_res_block_size=S).replace(
        num_hidden_layers=7, layer_types=[LINEAR, LINEAR, LINEAR, FULL, LINEAR, LINEAR, FULL],
        mlp_layer_types=[DENSE] + [SPARSE] * 6)


def make(cfg, seed=0, dtype=F64):
    return KimiForCausalLM.from_config(cfg, seed, dtype=dtype).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------ the oracle

def two_source_mix(emb, partial, query, gain, eps):
    """softmax over the two sources [emb, partial] of q . (gain * x / sqrt(mean(x^2) + eps)), written out."""
    if partial is None:
        return emb
    scores = []
    for v in (emb, partial):
        key = gain * v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)
        scores.append((query * key).sum(-1, keepdim=True))
    m = torch.maximum(scores[0], scores[1])
    e0, e1 = torch.exp(scores[0] - m), torch.exp(scores[1] - m)
    return (e0 * emb + e1 * partial) / (e0 + e1)


def residual_with_embedding_apart(model, ids):
    """The model with one AttnRes block, run by hand from its own submodules: a plain running sum S of the raw
    sublayer outputs (the embedding never enters it) and every sublayer input / the final hidden state a
    softmax-weighted mix of the embedding and S."""
    lm = model.model
    eps = model.config.attn_res_eps
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    emb = lm.embed_tokens(ids)
    S = None
    for layer in lm.layers:
        h = two_source_mix(emb, S, layer.attn_res_query_attn, layer.attn_res_norm_attn, eps)
        x = layer.input_layernorm(h)
        if layer.kind == LINEAR:
            out = layer.self_attn(x, None, None)[0]
        else:
            out = layer.self_attn(x, None, None, causal)[0]
        S = out if S is None else S + out
        h = two_source_mix(emb, S, layer.attn_res_query_mlp, layer.attn_res_norm_mlp, eps)
        S = S + layer.mlp(layer.post_attention_layernorm(h))
    h = two_source_mix(emb, S, lm.attn_res_query_final, lm.attn_res_norm_final, eps)
    return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("S", [10, 64])  # = the number of sublayers of the tiny model, and larger
def test_one_block_is_plain_residual_with_embedding_apart(S):
    model = randomise_attn_res(make(tiny_config("kimi_linear", attn_res_block_size=S)), 3)
    assert model.config.num_sublayers == 10
    ids = ids_of(2, 7, 1)
    with torch.no_grad():
        logits, _ = model(ids)
        ref = residual_with_embedding_apart(model, ids)
    assert logits.dtype == F64
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ hooks

def record_sublayers(model):
    """Hooks recording, in call order, the embedding, every sublayer input (what its pre-norm receives), every
    raw sublayer output, and the final hidden state (the final norm's input)."""
    lm = model.model
    events, handles = [], []

    def on(kind, pick):
        return lambda mod, args, *out: events.append((kind, pick(args, out).detach().clone()))

    handles.append(lm.embed_tokens.register_forward_hook(on("emb", lambda a, o: o[0])))
    for layer in lm.layers:
        handles.append(layer.input_layernorm.register_forward_pre_hook(on("in", lambda a, o: a[0])))
        # the attention's raw output is its o_proj's (MLA runs as project / cache update / attend, not forward)
        handles.append(layer.self_attn.o_proj.register_forward_hook(on("out", lambda a, o: o[0])))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(on("in", lambda a, o: a[0])))
        handles.append(layer.mlp.register_forward_hook(on("out", lambda a, o: o[0])))
    handles.append(lm.norm.register_forward_pre_hook(on("final", lambda a, o: a[0])))
    return events, handles


def sources_before(outs, emb, S):
    """[embedding, completed block sums..., partial sum] seen by the sublayer after ``outs`` (block size S)."""
    n_full = len(outs) // S
    srcs = [emb] + [sum(outs[b * S:(b + 1) * S]) for b in range(n_full)]
    if len(outs) % S:
        srcs.append(sum(outs[n_full * S:]))
    return srcs


def run_recorded(model, ids):
    events, handles = record_sublayers(model)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    kinds = [k for k, _ in events]
    L = model.config.num_sublayers
    assert kinds == ["emb"] + ["in", "out"] * L + ["final"], kinds
    emb = events[0][1]
    ins = [t for k, t in events if k in ("in", "final")]  # L sublayer inputs, then the final hidden state
    outs = [t for k, t in events if k == "out"]
    return emb, ins, outs


def test_zero_queries_one_block_input_is_half_embedding_plus_running_sum():
    model = make(tiny_config("kimi_linear", attn_res_block_size=10))  # fresh: every query is zero
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "attn_res_query" in n)
    emb, ins, outs = run_recorded(model, ids_of(2, 6, 2))
    torch.testing.assert_close(ins[0], emb, rtol=0, atol=0)  # sublayer 0: the embedding alone
    running = torch.zeros_like(emb)
    for l in range(1, len(ins)):  # sublayers 1..L-1, then the final aggregation (l = L)
        running = running + outs[l - 1]
        torch.testing.assert_close(ins[l], (emb + running) / 2, rtol=1e-14, atol=1e-14)
    assert rel_err(ins[-1], emb + running) > 0.3  # not the plain residual stream itself


def test_zero_queries_one_block_is_the_plain_residual_model_up_to_the_norm_eps():
    cfg = tiny_config("kimi_linear").replace(rms_norm_eps=1e-30)  # the 1/2 scale then cancels in every pre-norm
    attn_res = make(cfg.replace(attn_res_block_size=cfg.num_sublayers), seed=6)
    plain = make(cfg, seed=6)  # same weights: the AttnRes init draws no random numbers
    ids = ids_of(2, 7, 4)
    with torch.no_grad():
        got, got_state = attn_res(ids)
        want, want_state = plain(ids)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        for name in want_state:
            torch.testing.assert_close(got_state[name], want_state[name], rtol=1e-9, atol=1e-9)
        # with the default eps the 1/2 scale shows (embeddings ~ N(0, 0.02^2): mean square 4e-4 vs eps 1e-5)
        eps_cfg = tiny_config("kimi_linear")
        scaled = make(eps_cfg.replace(attn_res_block_size=10), seed=6)(ids)[0]
        assert rel_err(scaled, make(eps_cfg, seed=6)(ids)[0]) > 1e-4


@pytest.mark.parametrize("S", [1, 3])
def test_zero_queries_give_the_uniform_average_over_sources(S):
    model = make(tiny_config("kimi_linear", attn_res_block_size=S))
    emb, ins, outs = run_recorded(model, ids_of(2, 5, 3))
    n_sources = []
    for l, h in enumerate(ins):  # every sublayer input and the final hidden state
        srcs = sources_before(outs[:l], emb, S)
        n_sources.append(len(srcs))
        torch.testing.assert_close(h, sum(srcs) / len(srcs), rtol=1e-12, atol=1e-12)
    assert max(n_sources) >= 4  # several completed blocks and a partial sum were averaged
    # a non-zero query moves it off the uniform average
    randomise_attn_res(model, 4)
    emb, ins, outs = run_recorded(model, ids_of(2, 5, 3))
    srcs = sources_before(outs[:7], emb, S)
    assert rel_err(ins[7], sum(srcs) / len(srcs)) > 1e-3


# ------------------------------------------------------------------------------------------------ state

@pytest.mark.parametrize("S", [2, 6])
def test_prefill_split_and_token_by_token_agree(S):
    model = randomise_attn_res(make(seven_layer_config(S)), S)
    plain = make(seven_layer_config(None))
    ids = ids_of(2, 11, 5)
    with torch.no_grad():
        full, full_state = model(ids)
        split, split_state = run_pieces(model, ids, [6], state=empty_state(model.config, 2, F64))
        steps, step_state = run_pieces(model, ids, list(range(1, 11)))  # every token alone, from no state
        plain_logits, plain_state = plain(ids)
    for got in (split, steps):
        torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)
    for name in full_state:
        torch.testing.assert_close(split_state[name], full_state[name], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step_state[name], full_state[name], rtol=1e-10, atol=1e-10)
    assert rel_err(full, plain_logits) > 1e-2  # AttnRes is in effect (same weights otherwise)
    # nothing of AttnRes in the recurrent state I/O: same names, shapes and dtypes as the plain model
    layout = lambda st: [(k, tuple(v.shape), v.dtype) for k, v in st.items()]  # noqa: E731
    assert layout(full_state) == layout(plain_state)
    assert [s.name for s in state_specs(model.config)] == [s.name for s in state_specs(plain.config)]
    assert list(full_state) == [s.name for s in state_specs(model.config)]
    assert layout(empty_state(model.config, 2)) == layout(empty_state(plain.config, 2))
    # the plain model's state feeds the AttnRes model (and back): the layout is one
    with torch.no_grad():
        model(ids[:, :1], plain_state)
        plain(ids[:, :1], full_state)


# ------------------------------------------------------------------------------------------------ compile

def capture_graphs(model, *args):
    """Compile ``model`` with fullgraph=True through a backend that keeps the Dynamo graph and the AOT (ATen)
    inference graph; run it once."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    dynamo_graphs, aten_graphs = [], []

    def fw(gm, example_inputs):
        aten_graphs.append(gm)
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=fw)

    def backend(gm, example_inputs):
        dynamo_graphs.append(gm)
        return aot(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(*args)
    return out, dynamo_graphs, aten_graphs


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_compiled_graph_holds_one_attn_res_op_per_sublayer_and_final():
    """(graph breaks with AttnRes are covered by test_model_compile.py) the whole stack is one graph whose every
    read over depth is the opaque kimi::attn_res op, 2 per layer + 1 final, in Dynamo's and in the ATen graph."""
    cfg = tiny_config("kimi_linear", attn_res_block_size=3)
    model = randomise_attn_res(make(cfg, dtype=torch.float32), 5)
    ids = ids_of(2, 5, 6)
    (logits, _), dynamo_graphs, aten_graphs = capture_graphs(model, ids, model.empty_state(2))
    assert len(dynamo_graphs) == 1 and len(aten_graphs) == 1
    n = 2 * cfg.num_hidden_layers + 1
    assert count(dynamo_graphs[0], torch.ops.kimi.attn_res) == n
    assert count(aten_graphs[0], torch.ops.kimi.attn_res.default) == n
    for other in (torch.ops.kimi.attn_res_phase1.default, torch.ops.kimi.attn_res_merge.default):
        assert count(aten_graphs[0], other) == 0
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids, model.empty_state(2))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inline", ["decode", "all"])
def test_inline_reads_leave_no_op_in_the_graph_and_agree(inline):
    """attn_res_inline: the depth reads of a one-token step ("decode") or of every call ("all") are tensor code (no
    kimi::attn_res node in the ATen graph, for Inductor to fuse), the others stay the op; logits and state equal
    the op's."""
    cfg = tiny_config("kimi_linear", attn_res_block_size=3)
    model = randomise_attn_res(make(cfg, dtype=torch.float32), 5)
    ids = ids_of(2, 7, 6)
    with torch.no_grad():
        want_prompt, state = model(ids[:, :6], model.empty_state(2))
        want, want_state = model(ids[:, 6:], state)
    model.model.attn_res_inline = inline
    try:
        (got, got_state), _, aten = capture_graphs(model, ids[:, 6:], state)
        assert count(aten[0], torch.ops.kimi.attn_res.default) == 0
        (prompt, _), _, aten = capture_graphs(model, ids[:, :6], model.empty_state(2))
        n_ops = 0 if inline == "all" else 2 * cfg.num_hidden_layers + 1
        assert count(aten[0], torch.ops.kimi.attn_res.default) == n_ops
    finally:
        model.model.attn_res_inline = "none"
    torch.testing.assert_close(prompt, want_prompt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bad_attn_res_inline_names_the_attribute():
    model = make(tiny_config("kimi_linear", attn_res_block_size=3), dtype=torch.float32)
    model.model.attn_res_inline = "prefill"
    with pytest.raises(ValueError, match="attn_res_inline"):
        model(ids_of(1, 3, 1))


# ------------------------------------------------------------------------------------------------ checkpoints

def hub_config_json(cfg):
    """cfg in the hub remote-code Kimi Linear dialect (1-indexed layer lists) plus ``attn_res_block_size``."""
    return {
        "model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "rms_norm_eps": cfg.rms_norm_eps,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_attention_heads,
        "linear_attn_config": {"kda_layers": [i + 1 for i in cfg.kda_layers],
                               "full_attn_layers": [i + 1 for i in cfg.mla_layers],
                               "num_heads": cfg.linear_num_heads, "head_dim": cfg.linear_head_dim,
                               "short_conv_kernel_size": cfg.linear_conv_kernel_dim},
        "num_experts": cfg.num_experts, "num_experts_per_token": cfg.num_experts_per_token,
        "num_shared_experts": cfg.num_shared_experts, "moe_intermediate_size": cfg.moe_intermediate_size,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_renormalize": True,
        "routed_scaling_factor": cfg.routed_scaling_factor, "use_grouped_topk": True, "num_expert_group": 1,
        "topk_group": 1, "moe_router_activation_func": "sigmoid", "mla_use_nope": True, "q_lora_rank": None,
        "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "torch_dtype": "float32",
        "attn_res_block_size": cfg.attn_res_block_size,
    }


def attn_res_names(n_layers):
    """The documented checkpoint names of the AttnRes parameters (each [hidden_size])."""
    names = {f"model.layers.{i}.attn_res_{kind}_{which}" for i in range(n_layers)
             for kind in ("query", "norm") for which in ("attn", "mlp")}
    return names | {"model.attn_res_query_final", "model.attn_res_norm_final"}


def write_checkpoint(path, model, config_json, drop=(), change=None):
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    if change:
        sd.update(change)
    save_file(sd, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config_json))
    return path


def logits_of(model, seed=7):
    with torch.no_grad():
        return model(ids_of(2, 9, seed))[0]


@pytest.fixture(scope="module")
def trained():
    """A float32 AttnRes model (block size 3) with non-trivial AttnRes parameters."""
    return randomise_attn_res(make(tiny_config("kimi_linear", attn_res_block_size=3), 8, torch.float32), 9)


@pytest.mark.parametrize("dialect", ["hub", "kimi_compile"])
def test_attn_res_weights_round_trip_through_a_checkpoint(trained, tmp_path, dialect):
    cfg = trained.config
    sd_names = set(trained.state_dict())
    assert {n for n in sd_names if "attn_res" in n} == attn_res_names(cfg.num_hidden_layers)
    config_json = hub_config_json(cfg) if dialect == "hub" else cfg.to_dict()
    loaded = load_model(write_checkpoint(tmp_path, trained, config_json), progress=False)
    assert loaded.config.attn_res_block_size == 3
    assert (loaded.config.layer_types, loaded.config.mlp_layer_types) == (cfg.layer_types, cfg.mlp_layer_types)
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, trained.state_dict()[name]), name
    torch.testing.assert_close(logits_of(loaded), logits_of(trained), rtol=0, atol=0)


def test_plain_checkpoint_with_attn_res_override_gets_the_paper_init(trained, tmp_path):
    """A checkpoint without any AttnRes tensor, loaded with ``attn_res_block_size=``: zero queries, unit gains
    (the same model as from_config with the same seed: the AttnRes init draws no random numbers)."""
    plain = make(tiny_config("kimi_linear"), 8, torch.float32)
    path = write_checkpoint(tmp_path, plain, plain.config.to_dict())
    loaded = load_model(path, progress=False, attn_res_block_size=3)
    fresh = make(tiny_config("kimi_linear", attn_res_block_size=3), 8, torch.float32)
    assert loaded.config.attn_res_block_size == 3
    for name, p in fresh.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    torch.testing.assert_close(logits_of(loaded), logits_of(fresh), rtol=0, atol=0)


def test_mis_shaped_or_unexpected_attn_res_tensor_is_a_clear_error(trained, tmp_path):
    cfg = trained.config
    bad = {"model.layers.2.attn_res_query_mlp": torch.zeros(cfg.hidden_size + 1)}
    (tmp_path / "a").mkdir()
    path = write_checkpoint(tmp_path / "a", trained, cfg.to_dict(), change=bad)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.attn_res_query_mlp.*shape"):
        load_model(path, progress=False)
    # AttnRes tensors in a checkpoint whose config.json has no AttnRes
    (tmp_path / "b").mkdir()
    path = write_checkpoint(tmp_path / "b", trained, cfg.replace(attn_res_block_size=None).to_dict())
    with pytest.raises(ValueError, match=r"unexpected tensor.*attn_res_"):
        load_model(path, progress=False)


@pytest.mark.parametrize("dropped", ["model.layers.2.attn_res_query_mlp", "model.attn_res_norm_final"])
def test_missing_attn_res_tensor_is_a_clear_error(trained, tmp_path, dropped):
    path = write_checkpoint(tmp_path, trained, trained.config.to_dict(), drop=(dropped,))
    try:
        load_model(path, progress=False)
    except ValueError as e:
        assert "missing" in str(e) and dropped in str(e), str(e)
    else:
        raise AssertionError(f"a checkpoint without {dropped} loaded without an error")
