"""Helpers shared by the model tests: token ids, feeding a prompt in pieces, non-trivial AttnRes parameters."""
import torch


def tiny_hf_kimi_linear_config(layer_types, **overrides):
    """A small transformers KimiLinearConfig (64 wide, 8 experts, 2 KDA heads of 16) with these layer types."""
    from transformers import KimiLinearConfig

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_local_experts=8, num_experts_per_tok=2,
              linear_num_heads=2, linear_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1, layer_types=list(layer_types))
    kw.update(overrides)
    return KimiLinearConfig(**kw)


def ids_of(B, T, seed):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def run_pieces(model, ids, cuts, state=None):
    """Feed ids in pieces split at ``cuts``; return the concatenated logits and the final state."""
    outs = []
    bounds = [0, *cuts, ids.shape[1]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, state = model(ids[:, lo:hi], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


def randomise_attn_res(model, seed):
    """Non-trivial queries and key-norm gains (the paper inits the queries to zero, the gains to one); drawn in
    float64 and cast to each parameter's dtype. Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attn_res_query" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
            elif "attn_res_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model
