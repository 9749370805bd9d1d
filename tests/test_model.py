"""The model graphs on CPU: state layout, state continuity, batching, the router, AttnRes wiring, config parsing."""

import math

import pytest
import torch

from kimi_compile import KimiConfig, KimiForCausalLM, empty_state, tiny_config
from kimi_compile.config import DENSE, FULL, LINEAR, SPARSE
from kimi_compile.state import state_specs
from model_helpers import ids_of, randomise_attn_res, run_pieces

KINDS = ["kimi_linear", "k2"]


def make_model(kind, seed=0, dtype=torch.float32, **changes):
    cfg = tiny_config(kind)
    if changes:
        cfg = cfg.replace(**changes)
    return KimiForCausalLM.from_config(cfg, seed, dtype=dtype).eval()


def close(a, b, tol=2e-5):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.3g} >= {tol}"


# ------------------------------------------------------------------------------------------------ layout

@pytest.mark.parametrize("kind", KINDS)
def test_state_layout_matches_specs(kind):
    model = make_model(kind)
    cfg = model.config
    assert len(cfg.mla_layers) >= 2
    if kind == "kimi_linear":
        assert len(cfg.kda_layers) >= 2
    with torch.no_grad():
        logits, state = model(ids_of(2, 5, 0))
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, cfg.vocab_size)
    specs = state_specs(cfg)
    assert list(state) == [s.name for s in specs]
    for s in specs:
        assert tuple(state[s.name].shape) == s.concrete_shape(2, 5), s.name
        assert state[s.name].dtype == s.dtype, s.name
    fresh = empty_state(cfg, 2)
    assert list(fresh) == list(state)
    for i in cfg.kda_layers:
        c = fresh[f"past_key_values.{i}.conv_state"]
        assert c.shape == (2, 3 * cfg.linear_num_heads * cfg.linear_head_dim, cfg.linear_conv_kernel_dim - 1)
        r = fresh[f"past_key_values.{i}.recurrent_state"]
        assert r.dtype == torch.float32 and r.shape == (2, cfg.linear_num_heads, cfg.linear_head_dim,
                                                        cfg.linear_head_dim)
    for i in cfg.mla_layers:
        assert fresh[f"past_key_values.{i}.key"].shape == (2, 1, 0, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    # symbolic axes for the exporters
    key_spec = next(s for s in specs if s.part == "key")
    assert key_spec.shape[0] == "batch_size" and key_spec.shape[2] == "past_sequence_length"
    assert key_spec.present_name.startswith("present.")


def test_bfloat16_state_dtypes_and_fp32_parameters():
    model = make_model("kimi_linear", dtype=torch.bfloat16)
    with torch.no_grad():
        logits, state = model(ids_of(1, 4, 1))
    assert logits.dtype == torch.float32
    for s in state_specs(model.config, torch.bfloat16):
        assert state[s.name].dtype == s.dtype
    attn = model.model.layers[0].self_attn
    assert attn.A_log.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.w_gate.dtype == torch.bfloat16


def test_from_config_is_deterministic():
    a, b, c = make_model("kimi_linear", 3), make_model("kimi_linear", 3), make_model("kimi_linear", 4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(sa[name], sc[name])


# ------------------------------------------------------------------------------------------------ state continuity

@pytest.mark.parametrize("kind,attn_res", [("kimi_linear", None), ("k2", None), ("kimi_linear", 3)])
def test_state_continuity(kind, attn_res):
    model = make_model(kind, attn_res_block_size=attn_res)
    if attn_res:
        randomise_attn_res(model, 1)
    ids = ids_of(2, 23, 5)
    with torch.no_grad():
        full, full_state = model(ids)
        two, two_state = run_pieces(model, ids, [9])
        three, _ = run_pieces(model, ids, [1, 13], state=empty_state(model.config, 2))  # from an explicit empty state
        steps, step_state = run_pieces(model, ids, [7] + list(range(8, 23)))  # prefill 7, then one token at a time
    for other in (two, three, steps):
        close(other, full)
    for name in full_state:
        close(two_state[name], full_state[name])
        close(step_state[name], full_state[name])


@pytest.mark.parametrize("kind", KINDS)
def test_batch_of_three_equals_three_batches_of_one(kind):
    model = make_model(kind)
    ids = ids_of(3, 11, 6)
    with torch.no_grad():
        logits, state = model(ids[:, :8])
        logits2, state2 = model(ids[:, 8:], state)
        for b in range(3):
            lb, sb = model(ids[b:b + 1, :8])
            lb2, sb2 = model(ids[b:b + 1, 8:], sb)
            close(lb, logits[b:b + 1])
            close(lb2, logits2[b:b + 1])
            for name in state2:
                close(sb2[name], state2[name][b:b + 1])


def test_default_positions_follow_the_cache():
    model = make_model("k2")
    ids = ids_of(2, 10, 7)
    with torch.no_grad():
        _, state = model(ids[:, :6])
        implicit, _ = model(ids[:, 6:], state)
        explicit, _ = model(ids[:, 6:], state, position_ids=torch.arange(6, 10).expand(2, 4))
        shifted, _ = model(ids[:, 6:], state, position_ids=torch.arange(20, 24))
    assert torch.equal(implicit, explicit)
    assert not torch.allclose(implicit, shifted)  # K2 uses RoPE: positions matter


def test_nope_model_ignores_positions():
    model = make_model("kimi_linear")
    ids = ids_of(1, 6, 8)
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(ids, position_ids=torch.arange(100, 106))
    assert torch.equal(a, b)


def test_logits_to_keep():
    model = make_model("k2")
    ids = ids_of(2, 6, 14)
    with torch.no_grad():
        full, state = model(ids)
        last, last_state = model(ids, logits_to_keep=2)
    assert last.shape == (2, 2, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -2:], rtol=0, atol=0)
    assert all(torch.equal(state[k], last_state[k]) for k in state)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def test_bad_state_and_inputs_raise():
    model = make_model("kimi_linear")
    state = empty_state(model.config, 1)
    del state["past_key_values.1.key"]
    with pytest.raises(ValueError, match="past_key_values.1.key"):
        model(ids_of(1, 3, 0), state)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="state"):
        model(ids_of(1, 3, 0), [1, 2])


# ------------------------------------------------------------------------------------------------ MoE routing

def router_reference(x, weight, bias, top_k, n_group, topk_group, scaling, with_bias):
    """float64 loop over tokens: sigmoid scores, group-limited top-k on biased scores, renormalised weights."""
    ids_out, w_out = [], []
    for row in x.double():
        s = torch.sigmoid(weight.double() @ row)
        biased = s + bias.double()
        E = s.numel()
        size = E // n_group
        group_score = [sorted(biased[g * size:(g + 1) * size].tolist())[-2:] for g in range(n_group)]
        group_score = [sum(v) for v in group_score]
        keep = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(E) if e // size in keep]
        chosen = sorted(allowed, key=lambda e: -biased[e].item())[:top_k]
        vals = [(biased if with_bias else s)[e].item() for e in chosen]
        total = sum(vals)
        ids_out.append(sorted(chosen))
        w_out.append({e: v / total * scaling for e, v in zip(chosen, vals)})
    return ids_out, w_out


@pytest.mark.parametrize("kind,with_bias", [("kimi_linear", False), ("kimi_linear", True), ("k2", False)])
def test_router_matches_reference(kind, with_bias):
    model = make_model(kind, moe_combine_with_bias=with_bias)
    cfg = model.config
    router = model.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.abs().sum() > 0  # the bias must influence the choice here
    x = torch.randn(17, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    ids, weights = router(x)
    ref_ids, ref_w = router_reference(x, router.weight, router.e_score_correction_bias, cfg.num_experts_per_token,
                                      cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, with_bias)
    for t in range(x.shape[0]):
        assert sorted(ids[t].tolist()) == ref_ids[t]
        for j, e in enumerate(ids[t].tolist()):
            assert math.isclose(weights[t, j].item(), ref_w[t][e], rel_tol=1e-5)


def test_combine_with_bias_changes_output_only_with_a_bias():
    base = make_model("kimi_linear")
    biased = make_model("kimi_linear", moe_combine_with_bias=True)
    ids = ids_of(1, 6, 10)
    with torch.no_grad():
        assert not torch.allclose(base(ids)[0], biased(ids)[0])
        for m in (base, biased):
            for layer in m.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.zero_()
        torch.testing.assert_close(base(ids)[0], biased(ids)[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ AttnRes

def plain_attn_res(sources, query, norm_weight, eps=1e-6):
    """Softmax over depth written out: alpha_n = softmax_n(q . (w * rmsnorm(v_n))), h = sum_n alpha_n v_n."""
    scores = []
    for v in sources:
        rms = torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        scores.append(((v / rms) * norm_weight * query).sum(-1))
    alpha = torch.softmax(torch.stack(scores), dim=0)
    return sum(a.unsqueeze(-1) * v for a, v in zip(alpha, sources))


def attn_res_oracle(model, ids, S):
    """The paper's Block AttnRes over the model's own sublayers, block sums recomputed from the full output list."""
    lm = model.model
    T = ids.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    emb = lm.embed_tokens(ids)
    outs = []

    def sources_for(n_out):
        n_full = n_out // S
        srcs = [emb] + [sum(outs[b * S:(b + 1) * S]) for b in range(n_full)]
        if n_out % S:
            srcs.append(sum(outs[n_full * S:n_out]))
        return srcs

    for layer in lm.layers:
        h = plain_attn_res(sources_for(len(outs)), layer.attn_res_query_attn, layer.attn_res_norm_attn)
        x = layer.input_layernorm(h)
        if layer.kind == LINEAR:
            outs.append(layer.self_attn(x, None, None)[0])
        else:
            outs.append(layer.self_attn(x, None, None, mask)[0])
        h = plain_attn_res(sources_for(len(outs)), layer.attn_res_query_mlp, layer.attn_res_norm_mlp)
        outs.append(layer.mlp(layer.post_attention_layernorm(h)))
    h = plain_attn_res(sources_for(len(outs)), lm.attn_res_query_final, lm.attn_res_norm_final)
    return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("S", [1, 3, 4, 10])
def test_attn_res_matches_paper_oracle(S):
    model = make_model("kimi_linear", dtype=torch.float64, attn_res_block_size=S)
    randomise_attn_res(model, S)
    ids = ids_of(2, 7, 11)
    with torch.no_grad():
        logits, _ = model(ids)
        ref = attn_res_oracle(model, ids, S)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-9, atol=1e-9)


def test_attn_res_parameters_and_paper_init():
    model = make_model("kimi_linear", attn_res_block_size=2)
    names = dict(model.named_parameters())
    for i in range(model.config.num_hidden_layers):
        for which in ("attn", "mlp"):
            assert torch.count_nonzero(names[f"model.layers.{i}.attn_res_query_{which}"]) == 0
            assert torch.equal(names[f"model.layers.{i}.attn_res_norm_{which}"], torch.ones(64))
    assert "model.attn_res_query_final" in names and "model.attn_res_norm_final" in names
    # zero queries = uniform average over depth, so the output differs from the plain residual model
    plain = make_model("kimi_linear")
    ids = ids_of(1, 5, 12)
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0], plain(ids)[0])
    # AttnRes adds nothing to the state
    assert list(empty_state(model.config, 1)) == list(empty_state(plain.config, 1))


# ------------------------------------------------------------------------------------------------ config parsing

def test_hub_kimi_linear_config_is_one_indexed():
    d = {"model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"], "num_hidden_layers": 6,
         "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300,
         "linear_attn_config": {"kda_layers": [1, 2, 3, 5, 6], "full_attn_layers": [4], "num_heads": 2,
                                "head_dim": 16, "short_conv_kernel_size": 3},
         "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 1, "moe_intermediate_size": 32,
         "first_k_dense_replace": 2, "moe_layer_freq": 1, "moe_renormalize": True, "routed_scaling_factor": 2.0,
         "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "mla_use_nope": True,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
         "model_max_length": 4096, "rms_norm_eps": 1e-5, "moe_router_activation_func": "sigmoid"}
    cfg = KimiConfig.from_dict(d)
    assert cfg.layer_types == [LINEAR, LINEAR, LINEAR, FULL, LINEAR, LINEAR]
    assert cfg.mlp_layer_types == [DENSE, DENSE, SPARSE, SPARSE, SPARSE, SPARSE]
    assert (cfg.linear_num_heads, cfg.linear_head_dim, cfg.linear_conv_kernel_dim) == (2, 16, 3)
    assert not cfg.use_rope and cfg.num_experts == 8 and cfg.num_experts_per_token == 2
    d["linear_attn_config"]["kda_layers"] = [1, 2, 3, 5, 7]
    with pytest.raises(ValueError, match="kda_layers"):
        KimiConfig.from_dict(d)


def test_deepseek_legacy_rope_scaling_and_unknown_type():
    d = {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 3,
         "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 256, "q_lora_rank": 32, "kv_lora_rank": 32,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
         "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
         "moe_intermediate_size": 32, "intermediate_size": 128, "rope_theta": 50000.0,
         "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
         "max_position_embeddings": 131072}
    cfg = KimiConfig.from_dict(d)
    assert cfg.use_rope and cfg.rope_type == "yarn" and cfg.rope_theta == 50000.0
    assert cfg.layer_types == [FULL] * 3 and cfg.mlp_layer_types == [DENSE, SPARSE, SPARSE]
    mscale = 0.1 * math.log(32.0) + 1.0
    assert math.isclose(cfg.mla_softmax_scale, 24 ** -0.5 * mscale * mscale)
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        KimiConfig.from_dict({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


# ------------------------------------------------------------------------------------------------ generate

def test_generate_greedy_eos_and_arguments():
    from kimi_compile import generate

    model = make_model("kimi_linear")
    prompt = ids_of(2, 5, 13)
    out = generate(model, prompt, 8)
    assert out.shape == (2, 13) and out.dtype == torch.int64 and torch.equal(out[:, :5], prompt)
    # greedy by hand: each new token is the argmax after feeding everything before it
    with torch.no_grad():
        for t in range(5, 13):
            logits, _ = model(out[:, :t])
            assert torch.equal(logits[:, -1].argmax(-1), out[:, t])
    eos = int(out[0, 7])  # row 0 produces it at its third new token
    stopped = generate(model, prompt, 8, eos_token_id=eos)
    assert torch.equal(stopped[0, :8], out[0, :8]) and bool((stopped[0, 8:] == eos).all())
    assert torch.equal(generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError, match="backend"):
        generate(model, prompt, 2, backend="tensorrt")
    with pytest.raises(ValueError, match="onnx_dir"):
        generate(model, prompt, 2, backend="onnx")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
