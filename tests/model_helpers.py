"""Helpers shared by the model tests: token ids, feeding a prompt in pieces, non-trivial AttnRes parameters."""
import torch


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
