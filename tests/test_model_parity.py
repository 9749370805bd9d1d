"""Parity with transformers 5.18: random tiny KimiLinearForCausalLM / DeepseekV3ForCausalLM (K2-like) built here,
saved with save_pretrained, loaded with kimi_compile.load_model; float32 logits and greedy generation must match.

transformers runs its pure-PyTorch fallbacks here (no flash-linear-attention / causal_conv1d installed).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kimi_compile  # noqa: E402
from model_helpers import tiny_hf_kimi_linear_config  # noqa: E402

PROMPT_LENGTHS = [1, 6, 17, 70]  # 70 crosses the 64-token KDA chunk of both implementations


def _randomise_router_bias(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def kimi_linear_pair(tmp_path_factory):
    from transformers import KimiLinearForCausalLM

    torch.manual_seed(0)
    cfg = tiny_hf_kimi_linear_config(["linear_attention", "full_attention", "linear_attention", "linear_attention",
                                      "full_attention", "full_attention"],
                                     linear_conv_kernel_dim=4, first_k_dense_replace=2)
    ref = KimiLinearForCausalLM(cfg).eval()
    _randomise_router_bias(ref, 1)
    path = tmp_path_factory.mktemp("kimi_linear")
    ref.save_pretrained(path)
    return ref, kimi_compile.load_model(path, progress=False)


def _deepseek(tmp_path_factory, name, rope_interleave, n_group, topk_group, seed):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=n_group,
        topk_group=topk_group, first_k_dense_replace=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        max_position_embeddings=256, initializer_range=0.1, routed_scaling_factor=2.827, rms_norm_eps=1e-6,
        rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 0.707})
    ref = DeepseekV3ForCausalLM(cfg).eval()
    _randomise_router_bias(ref, seed + 1)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path)
    return ref, kimi_compile.load_model(path, progress=False)


@pytest.fixture(scope="module")
def k2_pair(tmp_path_factory):
    return _deepseek(tmp_path_factory, "k2", rope_interleave=True, n_group=2, topk_group=1, seed=2)


def _check_logits(ref, mine, seed):
    g = torch.Generator().manual_seed(seed)
    for T in PROMPT_LENGTHS:
        ids = torch.randint(3, 256, (2, T), generator=g)
        with torch.no_grad():
            expected = ref(ids).logits.float()
            got, _ = mine(ids)
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-4, f"T={T}: relative error {err:.3g}"


def test_kimi_linear_logits(kimi_linear_pair):
    ref, mine = kimi_linear_pair
    cfg = mine.config
    assert cfg.layer_types == list(ref.config.layer_types)
    assert len(cfg.mla_layers) == 3 and cfg.mlp_layer_types[:3] == ["dense", "dense", "sparse"]
    _check_logits(ref, mine, 10)


def test_k2_logits(k2_pair):
    ref, mine = k2_pair
    assert mine.config.use_rope and mine.config.rope_type == "yarn" and mine.config.q_lora_rank == 24
    assert mine.config.n_group == 2 and mine.config.mlp_layer_types[:3] == ["dense", "dense", "sparse"]
    _check_logits(ref, mine, 11)


def test_deepseek_non_interleaved_rope_logits(tmp_path_factory):
    ref, mine = _deepseek(tmp_path_factory, "ds_plain_rope", rope_interleave=False, n_group=1, topk_group=1, seed=3)
    assert mine.config.rope_interleave is False
    _check_logits(ref, mine, 12)


@pytest.mark.parametrize("which", ["kimi_linear_pair", "k2_pair"])
def test_greedy_generation_matches_transformers(which, request):
    ref, mine = request.getfixturevalue(which)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(13))
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
                            attention_mask=torch.ones_like(ids))
    got = kimi_compile.generate(mine, ids, 32)
    assert got.shape == (2, 9 + 32)
    assert torch.equal(got, expected)
