"""Kimi Linear (KDA + MLA + MoE) and Kimi K2 / DeepSeek-V3 (MLA + MoE) as compile-friendly PyTorch modules.

``KimiForCausalLM(input_ids, state=None, position_ids=None) -> (logits float32 [B, T, vocab], new_state)``

* The state is explicit: a ``dict[str, Tensor]`` keyed ``past_key_values.{i}.<part>`` (see
  :mod:`kimi_compile.state`). The model never mutates it; it returns a new dict.
* One code path serves prefill (T > 1) and decode (T == 1): no host syncs, no data-dependent Python control
  flow, so ``torch.compile(fullgraph=True, dynamic=True)`` captures the whole model and ``torch.export`` /
  ONNX see one graph. The KDA recurrence, the short conv, Attention Residuals and the routed experts are the
  custom ops ``kimi::kda``, ``kimi::short_conv``, ``kimi::attn_res`` and ``kimi::moe_experts``.
* MLA always runs in the absorbed form: queries are projected into the latent space (``W_uk^T q_nope``), attention
  is MQA over the ``[latent | k_rope]`` cache, and the latent context is projected out per head (``W_uv``).

Numerics follow transformers 5.18 ``KimiLinearForCausalLM`` / ``DeepseekV3ForCausalLM``: RMSNorm in float32 cast
back before the weight multiply; router in float32; KDA gate, beta and the gated output norm in float32; attention
softmax in float32 (float64 throughout for a float64 model, which makes exact references possible). Logits are
returned in float32.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .checks import check_forward_inputs
from .config import LINEAR, SPARSE, KimiConfig
from .ops.attn_res import attn_res as _attn_res_op
from .ops.attn_res.naive import attn_res_reference
from .ops.kda import kda as _kda_op
from .ops.kda import kda_decode_ as _kda_decode_op
from .ops.moe import moe_experts as _moe_experts
from .ops.moe import moe_route as _moe_route
from .ops.short_conv import short_conv as _short_conv_op
from .state import empty_state, state_specs
from .training import DEFAULT_LOSS_CHUNK, causal_lm_loss

__all__ = ["KimiForCausalLM", "KimiModel", "RMSNorm", "FP32_TENSORS", "mark_dynamic_inputs"]

# tensors kept in float32 whatever the model dtype (their names inside their module)
FP32_TENSORS = frozenset({"A_log", "dt_bias", "e_score_correction_bias", "inv_freq"})


# ------------------------------------------------------------------------------------------------ building blocks

class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` with the normalisation in float32, cast back before the multiply."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = _acc(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """KDA output norm: ``(RMSNorm(o) * w * sigmoid(gate))`` all in float32, cast to o's dtype at the end."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        xf = _acc(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        xf = self.weight.to(xf.dtype) * xf * torch.sigmoid(gate.to(xf.dtype))
        return xf.to(x.dtype)


class SwiGLU(nn.Module):
    # One-row calls (a B=1 decode step) under torch.compile as reductions over the input, which Inductor fuses
    # (gate and up in one kernel, silu * up into the down projection's loads), instead of three cuBLAS GEMVs.
    # H200, Kimi-Linear-48B decode B=1 in a CUDA graph: 4.68 ms a step against 5.29 ms with the GEMVs (same run).
    # False on an instance keeps the GEMMs.
    inline_one_row = True

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n = x.numel()
        if self.inline_one_row and torch.compiler.is_compiling() and isinstance(n, int) and n == x.shape[-1]:
            # same rounding points as the GEMMs: float32 sums, each projection rounded to x's dtype
            gate = _matvec(x, self.gate_proj.weight)
            up = _matvec(x, self.up_proj.weight)
            return _matvec(F.silu(gate) * up, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` as a broadcast product summed in float32 (a reduction Inductor generates and fuses)."""
    return (_acc(x).unsqueeze(-2) * _acc(w)).sum(-1).to(x.dtype)


class ShortConv(nn.Module):
    """The fused depthwise causal conv over q|k|v channels; ``weight`` is ``[C, W]``."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel))

    def forward(self, x: Tensor, state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        return _short_conv_op(x, self.weight, None, state, "silu")


def _acc(x: Tensor) -> Tensor:
    """x in the accumulation dtype: float32, or float64 for a float64 model (exact reference runs)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last axis, in float32 (FLA / transformers form)."""
    xf = _acc(x)
    return xf / torch.sqrt((xf * xf).sum(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------------ KDA

class KDAAttention(nn.Module):
    """Kimi Delta Attention layer.

    q, k, v projections -> one short conv (SiLU) over the concatenated channels -> q, k L2-normalised over K;
    g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias) and beta = sigmoid(b_proj(x)) in float32;
    o = kda(q, k, v, g, beta); out = o_proj(RMSNorm(o) * w * sigmoid(g_b(g_a(x)))).

    The projections that read ``x`` are two GEMMs over concatenated weights (the loader fills their rows from the
    checkpoint's separate tensors): ``qkv_proj`` rows ``[q | k | v]`` (``[3 H K, D]``; its output is the conv's
    input, so no concatenation runs) and ``gate_in_proj`` rows ``[f_a | g_a | b]`` (``[2 K + H, D]``). In a decode
    step that is 2 GEMVs instead of 6 plus the q|k|v concatenation.
    """

    def __init__(self, config: KimiConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.hidden_size
        H, K = config.linear_num_heads, config.linear_head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = H, K
        self.qkv_proj = nn.Linear(D, 3 * H * K, bias=False)
        self.conv1d = ShortConv(3 * H * K, config.linear_conv_kernel_dim)
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(H * K, dtype=torch.float32))
        self.gate_in_proj = nn.Linear(D, 2 * K + H, bias=False)
        self.f_b_proj = nn.Linear(K, H * K, bias=False)
        self.g_b_proj = nn.Linear(K, H * K, bias=False)
        self.o_norm = GatedRMSNorm(K, config.rms_norm_eps)
        self.o_proj = nn.Linear(H * K, D, bias=False)

    def forward(self, x: Tensor, conv_state: Optional[Tensor], recurrent_state: Optional[Tensor]
                ) -> tuple[Tensor, Tensor, Tensor]:
        gate, q, k, v, g, beta, new_conv_state = self.project(x, conv_state)
        o, new_recurrent_state = _kda_op(q, k, v, g, beta, initial_state=recurrent_state, scale=self.scale)
        return self.finish(gate, o), new_conv_state, new_recurrent_state

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def project(self, x: Tensor, conv_state: Optional[Tensor]) -> tuple[Tensor, ...]:
        """Up to the recurrence: ``(gate, q, k, v, g, beta, new_conv_state)``, q..beta in kimi::kda's layouts,
        ``gate = g_b(g_a(x))`` ``[B, T, H, K]`` the output gate's logits (for :meth:`finish`).

        The output gate is projected here, not in :meth:`finish`: a slice of ``gate_in_proj``'s output handed from
        the ``kda_project`` region to the next reads wrong memory (docs/upstream_issues.md)."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim  # local heads under tensor parallelism
        qkv, new_conv_state = self.conv1d(self.qkv_proj(x), conv_state)
        q, k, v = qkv.split(H * K, dim=-1)
        q = _l2norm(q.reshape(B, T, H, K)).to(v.dtype)
        k = _l2norm(k.reshape(B, T, H, K)).to(v.dtype)
        v = v.reshape(B, T, H, K)

        forget_low, gate_low, beta_raw = self.gate_in_proj(x).split([K, K, H], dim=-1)
        gate = self.g_b_proj(gate_low).view(B, T, H, K)
        raw = _acc(self.f_b_proj(forget_low))
        raw = raw + self.dt_bias.to(raw.dtype)
        g = -torch.exp(self.A_log.to(raw.dtype)).view(H, 1) * F.softplus(raw.view(B, T, H, K))
        beta = torch.sigmoid(_acc(beta_raw))
        return gate, q, k, v, g, beta, new_conv_state

    def finish(self, gate: Tensor, o: Tensor) -> Tensor:
        """After the recurrence: the gated output norm and the output projection of ``o [B, T, H, K]``."""
        B, T, H, K = o.shape
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, H * K))


# ------------------------------------------------------------------------------------------------ MLA

def _yarn_inv_freq(dim: int, base: float, rs: dict) -> tuple[Tensor, float]:
    """YaRN inverse frequencies and cos/sin attention factor (same formulas as transformers 5.18)."""
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 -> extrapolate (high frequencies), 0 -> interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class Rotary(nn.Module):
    """cos/sin tables of the rope part (half width: one angle per rotated pair)."""

    def __init__(self, config: KimiConfig) -> None:
        super().__init__()
        dim = config.qk_rope_head_dim
        if config.rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(dim, config.rope_theta, config.rope_scaling)
        else:
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids [B or 1, T] -> cos, sin [B or 1, T, dim/2] in ``dtype``."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        return ((freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool) -> Tensor:
    """Rotate pairs of the last axis; interleaved pairs (x0,x1),(x2,x3).. are returned de-interleaved
    ([rotated evens | rotated odds]) exactly as transformers' DeepSeek-V3 does (q and k alike, so q.k is the same)."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def mla_cache_update(past_key: Optional[Tensor], new: Tensor, cache_position: Optional[Tensor]) -> Tensor:
    """The MLA cache after this call: ``new`` appended to ``past_key`` (a new tensor), or with ``cache_position``
    written in place into the preallocated ``past_key`` at those rows (returned as is)."""
    if cache_position is not None:
        past_key[:, :, cache_position] = new  # index_put_: Inductor keeps it in place on the buffer
        return past_key
    return new if past_key is None else torch.cat([past_key, new], dim=2)


def mla_causal(past_key: Optional[Tensor], cache_position: Optional[Tensor]) -> bool:
    """True when the cache holds this call's tokens only (no past): attention is then plain causal, no mask. A
    Python bool decided by a branch (a SymBool would reach the layer regions as a new symbolic input per layer and
    defeat their reuse)."""
    if past_key is None or (cache_position is None and past_key.shape[2] == 0):
        return True
    return False


class MLAttention(nn.Module):
    """Multi-head latent attention in the absorbed form over the ``[latent | k_rope]`` MQA cache."""

    def __init__(self, config: KimiConfig, layer_idx: int) -> None:
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.layer_idx = layer_idx
        self.num_heads = H
        self.nope, self.rope, self.vdim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.rank = config.kv_lora_rank
        self.use_rope, self.interleave = config.use_rope, config.rope_interleave
        self.scale = config.mla_softmax_scale
        qk = self.nope + self.rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.mla_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.rank + self.rope, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, config.mla_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(H * self.vdim, D, bias=config.attention_bias)
        self.q_lora = config.q_lora_rank is not None
        self.expand_prompts = True

    def forward(self, x: Tensor, past_key: Optional[Tensor], rope: Optional[tuple[Tensor, Tensor]],
                mask: Optional[Tensor], cache_position: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``past_key`` is the ``[B, 1, S, r + rope]`` cache; with ``cache_position`` (positions ``[T]``) it is a
        preallocated buffer that this call writes in place (the static-cache decode of CUDA graphs), else the new
        entries are appended to a new tensor."""
        cos, sin = rope if rope is not None else (None, None)
        q, new = self.project(x, cos, sin)
        key = mla_cache_update(past_key, new, cache_position)
        return self.attend(q, key, mask, mla_causal(past_key, cache_position)), key

    def project(self, x: Tensor, cos: Optional[Tensor], sin: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """x ``[B, T, D]`` -> the queries ``[B, T, H, nope + rope]`` (rope part rotated) and the new cache entries
        ``[B, 1, T, r + rope]``."""
        B, T, _ = x.shape
        H, r = self.num_heads, self.rank
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(B, T, H, self.nope + self.rope)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([r, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        if self.use_rope:
            q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
            q = torch.cat([q_nope, _rotate(q_rope, cos.unsqueeze(2), sin.unsqueeze(2), self.interleave)], dim=-1)
            k_rope = _rotate(k_rope, cos, sin, self.interleave)
        # built as [B, 1, T, r + rope] directly, not as a view: a cache returned as a view makes Dynamo guard on
        # its base and recompile when the next cache is not a view
        return q, torch.cat([latent.unsqueeze(1), k_rope.unsqueeze(1)], dim=-1)

    def attend(self, q: Tensor, key: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """The attention output ``[B, T, D]`` (o_proj applied) of the queries ``q`` (from :meth:`project`) over the
        whole cache ``key [B, 1, S, r + rope]`` (the new entries included); ``causal``: the cache holds this call's
        tokens only (see :func:`mla_causal`)."""
        T = q.shape[1]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        cache = key.squeeze(1)  # [B, S, r + rope]
        # Prompts attend in the expanded form (per-head keys and values from the latent, fused attention: about
        # T*S*(192+128) per head instead of T*S*(576+512) and no [T*H, S] score tensor); single tokens and exported
        # graphs (one graph for every T: see absorbed_attention) use the absorbed MQA form, which reads only the
        # latent cache. A module flag, not torch.compiler.is_exporting(): torch 2.11 folds that to True under
        # torch.compile too, which put compiled prompts on the absorbed path (64 GiB of scores at T = 32768).
        if T > 1 and self.expand_prompts:
            o = self._attend_expanded(q_nope, q_rope, cache, None if causal else mask)
        else:
            o = self._attend_absorbed(q_nope, q_rope, cache, mask)
        return self.o_proj(o)

    def _attend_absorbed(self, q_nope: Tensor, q_rope: Tensor, cache: Tensor, mask: Optional[Tensor]) -> Tensor:
        B, T, H, _ = q_nope.shape
        r, S = self.rank, cache.shape[1]
        w = self.kv_b_proj.weight.view(H, self.nope + self.vdim, r)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)
        q_full = torch.cat([q_lat, q_rope], dim=-1).reshape(B, T * H, r + self.rope)
        scores = torch.matmul(q_full, cache.transpose(1, 2)) * self.scale  # [B, T*H, S]
        scores = scores.view(B, T, H, S)
        if mask is not None:
            scores = scores.masked_fill(~mask.view(1, T, 1, S), float("-inf"))
        probs = torch.softmax(_acc(scores), dim=-1).to(q_nope.dtype)
        ctx = torch.matmul(probs.view(B, T * H, S), cache[..., :r]).view(B, T, H, r)
        return torch.einsum("bthr,hvr->bthv", ctx, w_uv).reshape(B, T, H * self.vdim)

    def _attend_expanded(self, q_nope: Tensor, q_rope: Tensor, cache: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Per-head attention with keys ``[k_nope | k_rope]`` and values expanded from the latent by kv_b_proj;
        ``mask`` None means causal with no past."""
        B, T, H, _ = q_nope.shape
        r, S = self.rank, cache.shape[1]
        kv = self.kv_b_proj(cache[..., :r]).view(B, S, H, self.nope + self.vdim)
        k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
        k = torch.cat([k_nope, cache[..., r:].unsqueeze(2).expand(B, S, H, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        qk_dim = self.nope + self.rope
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and qk_dim <= 256:
            # a fused kernel by name: under Inductor with dynamic shapes F.scaled_dot_product_attention fell back to
            # the math form, which materialises [H, T, S] scores (64 GiB at T = 32768)
            if _cudnn_prompt_attention():
                lse = q.requires_grad or k.requires_grad or v.requires_grad  # the backward needs it
                o = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, lse, 0.0, True, False,
                                                                       scale=self.scale)[0]
            else:  # flash wants one head dim
                v = F.pad(v, (0, qk_dim - self.vdim))
                o = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=self.scale)[0]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.view(1, 1, T, S),
                                               is_causal=mask is None, scale=self.scale)
        return o[..., : self.vdim].transpose(1, 2).reshape(B, T, H * self.vdim)


@torch.compiler.assume_constant_result
def _cudnn_prompt_attention() -> bool:
    """cuDNN's fused attention for prompts (sm90+, cuDNN SDPA on): it takes v at its own head dim (128 < 192) and
    measured 2.4x the flash kernel at T = 4096 and 2.2x at 32768 on the H200 (bench/bench_mla_attention.py)."""
    return bool(torch.cuda.is_available() and torch.backends.cudnn.is_available()
                and torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability() >= (9, 0))


@contextlib.contextmanager
def absorbed_attention(model: nn.Module):
    """Every MLA layer of ``model`` in the absorbed form for prompts too, inside the block (what an exported graph,
    one graph for every sequence length, needs)."""
    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    before = [m.expand_prompts for m in layers]
    try:
        for m in layers:
            m.expand_prompts = False
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.expand_prompts = flag


# ------------------------------------------------------------------------------------------------ MoE

def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` in float32 (float64 for a float64 model), as transformers computes it from float32 copies.
    A product of two 16-bit values is exact in float32, so on CUDA a 16-bit GEMM with a float32 output
    (``torch.mm(..., out_dtype=)``, CUDA only, no autograd formula) makes the same products in another summation
    order, without the float32 copy of x or the float32-rate GEMM (2.7 ms of the 48B prefill at T=4096)."""
    if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    xf = _acc(x)
    return F.linear(xf, weight.to(xf.dtype))


class Router(nn.Module):
    def __init__(self, config: KimiConfig) -> None:
        super().__init__()
        E = config.num_experts
        self.weight = nn.Parameter(torch.empty(E, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.top_k = config.num_experts_per_token
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.renormalize = config.moe_renormalize
        self.scaling = config.routed_scaling_factor
        self.activation = config.moe_router_activation
        self.with_bias = config.moe_combine_with_bias

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, D] -> (topk_ids int64 [N, k], topk_weights float32 [N, k])."""
        logits = router_logits(x, self.weight)
        if (logits.is_cuda and logits.dtype == torch.float32 and self.n_group == 1 and self.activation == "sigmoid"
                and not (torch.is_grad_enabled() and logits.requires_grad)):
            # the same selection and weights in one kernel (ops/moe/route.py: torch.topk alone was 57 us a layer)
            return _moe_route(logits, self.e_score_correction_bias, self.top_k, renormalize=self.renormalize,
                              scaling=self.scaling, weights_with_bias=self.with_bias)
        scores = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=-1)
        biased = scores + self.e_score_correction_bias.to(scores.dtype)
        choice = biased
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # [N, n_group]
            keep = torch.topk(group_scores, k=self.topk_group, dim=-1)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
            choice = grouped.masked_fill(group_mask.unsqueeze(-1) == 0, float("-inf")).view(N, E)
        topk_ids = torch.topk(choice, k=self.top_k, dim=-1)[1]
        weights = (biased if self.with_bias else scores).gather(1, topk_ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.scaling


class Experts(nn.Module):
    """Routed experts stacked as ``[E, I, D]`` (gate, up) and ``[E, D, I]`` (down)."""

    def __init__(self, config: KimiConfig) -> None:
        super().__init__()
        E, I, D = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.w_gate = nn.Parameter(torch.empty(E, I, D))
        self.w_up = nn.Parameter(torch.empty(E, I, D))
        self.w_down = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
        return _moe_experts(x, topk_ids, topk_weights, self.w_gate, self.w_up, self.w_down)


class MoE(nn.Module):
    def __init__(self, config: KimiConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        n_shared = config.num_shared_experts
        self.shared_experts = SwiGLU(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_ids, topk_weights = self.gate(flat)
        out = self.experts(flat, topk_ids, topk_weights).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# ------------------------------------------------------------------------------------------------ the stack

@torch.compiler.disable
def mark_dynamic_inputs(input_ids: Tensor, state: Optional[dict[str, Tensor]]) -> None:
    """Mark the axes that vary between calls as dynamic: batch and sequence of ``input_ids``, batch of every
    piece of state, past length of the MLA caches. Sizes 0 / 1 still specialise (silently)."""
    for axis in (0, 1):
        torch._dynamo.maybe_mark_dynamic(input_ids, axis)
    for name, t in (state or {}).items():
        if isinstance(t, Tensor):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            if name.endswith(".key"):
                torch._dynamo.maybe_mark_dynamic(t, 2)


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.layer_types[layer_idx]
        D = config.hidden_size
        self.self_attn = KDAAttention(config, layer_idx) if self.kind == LINEAR else MLAttention(config, layer_idx)
        self.mlp = MoE(config) if config.mlp_layer_types[layer_idx] == SPARSE else SwiGLU(D, config.intermediate_size)
        self.input_layernorm = RMSNorm(D, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(D, config.rms_norm_eps)
        if config.attn_res_block_size is not None:
            self.attn_res_query_attn = nn.Parameter(torch.zeros(D))
            self.attn_res_norm_attn = nn.Parameter(torch.ones(D))
            self.attn_res_query_mlp = nn.Parameter(torch.zeros(D))
            self.attn_res_norm_mlp = nn.Parameter(torch.ones(D))

    def state_names(self) -> list[str]:
        """The names of this layer's state pieces, in the order the layer functions take and return them."""
        parts = ("conv_state", "recurrent_state") if self.kind == LINEAR else ("key",)
        return [f"past_key_values.{self.layer_idx}.{p}" for p in parts]

    def ffn(self, x: Tensor) -> Tensor:
        return self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------------------ layer regions
# A decoder layer as pure tensor functions of (layer, tensors): the state dict and the layer index stay outside, so
# every layer of a kind traces to the same graph. Under torch.compile each is a nested compile region
# (KimiModel.compile_regions): Dynamo emits one invoke_subgraph call per layer and Inductor compiles one subgraph
# per distinct layer kind (KDA + dense, KDA + MoE, MLA + MoE, ...) instead of one inlined copy per layer. The MLA
# cache update runs between two regions, outside both: the static cache is written in place, and a region does not
# mutate its inputs. So does the KDA recurrence on static buffers (kimi::kda_decode_, between kda_project and
# kda_finish / kda_finish_ffn). A region must not hand another region a slice at an offset of a tensor it computed:
# torch 2.13's Inductor then reads wrong memory (docs/upstream_issues.md).

def kda_mixer(layer: DecoderLayer, x: Tensor, conv: Optional[Tensor], rec: Optional[Tensor]
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The KDA sublayer's raw output for ``x`` (pre-norm applied) and its new conv and recurrent states."""
    return layer.self_attn(layer.input_layernorm(x), conv, rec)


def kda_layer(layer: DecoderLayer, h: Tensor, conv: Optional[Tensor], rec: Optional[Tensor]
              ) -> tuple[Tensor, Tensor, Tensor]:
    """A whole KDA layer, both residuals included: ``(h, conv, rec) -> (h', conv', rec')``."""
    out, conv, rec = kda_mixer(layer, h, conv, rec)
    h = h + out
    return h + layer.ffn(h), conv, rec


def kda_project(layer: DecoderLayer, h: Tensor, conv: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The KDA sublayer up to its recurrence: ``(gate, q, k, v, g, beta, new conv state)``, ``gate`` the output
    gate's logits (see KDAAttention.project)."""
    return layer.self_attn.project(layer.input_layernorm(h), conv)


def kda_finish(layer: DecoderLayer, gate: Tensor, o: Tensor) -> Tensor:
    """The KDA sublayer's raw output from the recurrence's ``o``."""
    return layer.self_attn.finish(gate, o)


def kda_finish_ffn(layer: DecoderLayer, h: Tensor, gate: Tensor, o: Tensor) -> Tensor:
    """The rest of a whole KDA layer after its recurrence: attention residual, then the FFN residual."""
    h = h + kda_finish(layer, gate, o)
    return h + layer.ffn(h)


def mla_project(layer: DecoderLayer, x: Tensor, cos: Optional[Tensor], sin: Optional[Tensor]
                ) -> tuple[Tensor, Tensor]:
    """The MLA sublayer up to its cache: pre-norm, projections, RoPE -> ``(queries, new cache entries)``."""
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)


def mla_attend(layer: DecoderLayer, q: Tensor, key: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
    """The MLA sublayer's raw output over the updated cache ``key``."""
    return layer.self_attn.attend(q, key, mask, causal)


def mla_attend_ffn(layer: DecoderLayer, h: Tensor, q: Tensor, key: Tensor, mask: Optional[Tensor], causal: bool
                   ) -> Tensor:
    """The rest of a whole MLA layer after its cache update: attention residual, then the FFN residual."""
    h = h + mla_attend(layer, q, key, mask, causal)
    return h + layer.ffn(h)


def ffn(layer: DecoderLayer, x: Tensor) -> Tensor:
    """The FFN sublayer's raw output for ``x`` (pre-norm applied)."""
    return layer.ffn(x)


_REGIONS = {f.__name__: torch.compiler.nested_compile_region(f)
            for f in (kda_mixer, kda_layer, kda_project, kda_finish, kda_finish_ffn, mla_project, mla_attend,
                      mla_attend_ffn, ffn)}


class KimiModel(nn.Module):
    def __init__(self, config: KimiConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(D, config.rms_norm_eps)
        self.rotary = Rotary(config) if config.use_rope else None
        self.attn_res_block = config.attn_res_block_size
        if self.attn_res_block is not None:
            self.attn_res_query_final = nn.Parameter(torch.zeros(D))
            self.attn_res_norm_final = nn.Parameter(torch.ones(D))
        # per-layer activation checkpointing (kimi_compile.training.set_activation_checkpointing)
        self.activation_checkpointing = False
        # under torch.compile, every layer a nested compile region (one compiled subgraph per layer kind; see the
        # layer regions above): the full-depth 48B prefill's first compile took 54.9 s instead of 66.6 (H200,
        # torch 2.11). False inlines every layer into the graph (KIMI_COMPILE_REGIONS=0 sets that before the model
        # is built)
        self.compile_regions = os.environ.get("KIMI_COMPILE_REGIONS", "1") != "0"
        # AttnRes depth reads as plain tensor code, which Inductor fuses with the sublayer's norm and the partial-sum
        # add, instead of the op: "decode" for one-token steps (T == 1, a static size), "all" for every call, "none"
        # the op. Through the op a read is two more launches (the op and an Inductor kernel beside it) and h is
        # written and read again: the tiny model's compiled graphs on the CPU have 56 fused kernels + 11 op calls
        # in a decode step (58 + 11 in a prompt) with the op, 45 + 0 (47 + 0) inline, the same as without AttnRes.
        # The measured overhead of a 9-layer model is +5.8 % decode (5.8 us a sublayer), +3.95 % prefill. "none"
        # until a GPU measures the others (bench_full_model.py --attn-res-inline).
        self.attn_res_inline = "none"

    def forward(self, input_ids: Tensor, state: Optional[dict[str, Tensor]], position_ids: Optional[Tensor],
                cache_position: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        config = self.config
        B, T = input_ids.shape
        past_len = 0
        if state is not None and config.mla_layers:
            past_len = state[f"past_key_values.{config.mla_layers[0]}.key"].shape[2]
        h = self.embed_tokens(input_ids)

        mask = None
        if cache_position is not None:  # static caches: past_len is the buffer length, cache_position the rows
            q_pos = cache_position
            k_pos = torch.arange(past_len, device=input_ids.device)
        else:
            q_pos = torch.arange(T, device=input_ids.device) + past_len
            k_pos = torch.arange(past_len + T, device=input_ids.device)
        if config.mla_layers:  # built for T == 1 too: no branch on T, so one graph serves prefill and decode
            mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [T, S]
        rope = None
        if self.rotary is not None:
            if position_ids is None:
                position_ids = q_pos.unsqueeze(0)
            elif position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            rope = self.rotary(position_ids, h.dtype)

        new_state: dict[str, Tensor] = {}
        if self.attn_res_block is None:
            for layer in self.layers:
                def block(h, *past, layer=layer):
                    return self._sublayers(layer, h, past, rope, mask, cache_position, whole=True)
                h = self._maybe_checkpoint(layer, block, new_state, h, state=state)
        else:
            h = self._attn_res_stack(h, state, new_state, rope, mask, cache_position)
        return self.norm(h), new_state

    def _region(self, fn):
        """``fn`` as a nested compile region while Dynamo traces with ``compile_regions`` on, else ``fn`` itself
        (eager, ``torch.export`` -- whose non-strict tracing is not Dynamo's -- and the opt-out). Inference only
        (no_grad, inference_mode or frozen weights): with autograd recording, Inductor (torch 2.13, CPU) gave wrong
        gradients to the layers before the last call of a reused region (the forward exact), so training graphs
        inline every layer. Not under ``torch.compile(dynamic=True)`` either: it makes the modules' float
        attributes (norm eps, scales) graph inputs, and a region takes tensors and ints only."""
        config = torch._dynamo.config
        training = torch.is_grad_enabled() and self.embed_tokens.weight.requires_grad
        if (self.compile_regions and torch.compiler.is_dynamo_compiling() and not training
                and (config.specialize_float or config.assume_static_by_default)):
            return _REGIONS[fn.__name__]
        return fn

    def _sublayers(self, layer: DecoderLayer, x: Tensor, past: tuple[Optional[Tensor], ...], rope, mask,
                   cache_position: Optional[Tensor], whole: bool) -> tuple[Tensor, ...]:
        """``whole``: the whole layer on the residual stream ``x``; else the attention sublayer's raw output for
        ``x``. Returns it followed by the layer's new state pieces (in ``state_names`` order)."""
        if layer.kind == LINEAR:
            conv, rec = past
            if cache_position is None or rec is None or torch.is_grad_enabled() or not rec.is_contiguous():
                return self._region(kda_layer if whole else kda_mixer)(layer, x, conv, rec)
            # static buffers: the recurrence updates the state buffer in place (no copy of the new state into it)
            gate, q, k, v, g, beta, conv = self._region(kda_project)(layer, x, conv)
            o = _kda_decode_op(q, k, v, g, beta, rec, scale=layer.self_attn.scale)
            out = (self._region(kda_finish_ffn)(layer, x, gate, o) if whole
                   else self._region(kda_finish)(layer, gate, o))
            return out, conv, rec
        cos, sin = rope if rope is not None else (None, None)
        q, new = self._region(mla_project)(layer, x, cos, sin)
        key = mla_cache_update(past[0], new, cache_position)
        causal = mla_causal(past[0], cache_position)
        if whole:
            return self._region(mla_attend_ffn)(layer, x, q, key, mask, causal), key
        return self._region(mla_attend)(layer, q, key, mask, causal), key

    def _attn_res_stack(self, emb: Tensor, state, new_state, rope, mask, cache_position) -> Tensor:
        """Block Attention Residuals: each sublayer reads softmax-over-depth of [embedding, completed blocks,
        partial sum]; its raw output is added to the partial sum; every ``attn_res_block`` sublayers the partial
        sum becomes a completed block. The embedding and the completed blocks are stacked once a block (``done``),
        the partial sum goes to the op apart: stacking every source for every read moved ~3x the bytes the read
        needs (docs/benchmarks.md). The depth reads stay outside the layer regions (their number of sources
        grows with depth)."""
        eps = self.config.attn_res_eps
        S = self.attn_res_block
        done = emb.unsqueeze(0)  # [n, B, T, D]: the embedding and the completed blocks
        partial: Optional[Tensor] = None
        n_sublayers = 0

        if self.attn_res_inline not in ("none", "decode", "all"):
            raise ValueError(f"attn_res_inline must be 'none', 'decode' or 'all', got {self.attn_res_inline!r}")
        one_token = isinstance(emb.shape[1], int) and emb.shape[1] == 1
        inline = self.attn_res_inline == "all" or (self.attn_res_inline == "decode" and one_token)

        def read(query: Tensor, norm_w: Tensor, done: Tensor, partial: Optional[Tensor] = None) -> Tensor:
            q = (query * norm_w).to(emb.dtype)
            if inline:  # the op's own formula in tensor code, for Inductor to fuse (attn_res_inline)
                return attn_res_reference(done, q, eps, partial)
            return _attn_res_op(done, q, eps, partial)

        def sources() -> tuple[Tensor, ...]:
            return (done,) if partial is None else (done, partial)

        for layer in self.layers:
            def attn(*args, layer=layer, n=len(sources())):
                srcs, past = args[:n], args[n:]
                x = read(layer.attn_res_query_attn, layer.attn_res_norm_attn, *srcs)
                return self._sublayers(layer, x, past, rope, mask, cache_position, whole=False)

            def mlp(*srcs, layer=layer):
                return (self._region(ffn)(layer, read(layer.attn_res_query_mlp, layer.attn_res_norm_mlp, *srcs)),)

            for fn, owner in ((attn, layer), (mlp, None)):
                out = self._maybe_checkpoint(owner, fn, new_state, *sources(), state=state if owner else None)
                partial = out if partial is None else partial + out
                n_sublayers += 1
                if n_sublayers % S == 0:
                    done, partial = torch.cat([done, partial.unsqueeze(0)]), None
        return read(self.attn_res_query_final, self.attn_res_norm_final, *sources())

    def _maybe_checkpoint(self, layer: Optional[DecoderLayer], fn, new_state: dict[str, Tensor], *args: Tensor,
                          state: Optional[dict[str, Tensor]] = None) -> Tensor:
        """``fn(*args, *past)`` -> ``(out, *new state pieces)``, ``past`` being ``layer``'s pieces of ``state``
        (None without a state; ``layer`` None: no state); the new pieces go into ``new_state``, ``out`` is
        returned. Under ``torch.utils.checkpoint`` when activation checkpointing is on and autograd records
        (``fn`` is pure, so its recompute in the backward writes nothing)."""
        names = [] if layer is None else layer.state_names()
        past = [state[n] if state is not None else None for n in names]
        if self.activation_checkpointing and torch.is_grad_enabled():
            out, *parts = _checkpoint(fn, *args, *past, use_reentrant=False)
        else:
            out, *parts = fn(*args, *past)
        new_state.update(zip(names, parts))
        return out


class KimiForCausalLM(nn.Module):
    """The causal LM: ``forward(input_ids, state=None, position_ids=None) -> (logits, new_state)``.

    Args:
        input_ids: int64 ``[B, T]``.
        state: ``None`` (fresh sequences) or the dict returned by a previous call / :func:`empty_state`. All rows
            share the same past length.
        position_ids: optional ``[B, T]`` or ``[T]`` positions for RoPE (K2); default ``past + arange(T)``
            computed from the cache shape (no host sync). Ignored by NoPE models. The causal mask always follows
            the cache order.

        logits_to_keep: 0 (default) for logits at every position, n > 0 for the last n positions only (a prefill
            that only needs the next token skips the [T, vocab] projection).
        cache_position: None (default), or int64 ``[T]`` row indices for *static* MLA caches: each
            ``past_key_values.{i}.key`` is then a preallocated ``[B, 1, max_len, ...]`` buffer that the call
            writes in place at these rows and attends over up to them (what a CUDA graph replays,
            :class:`kimi_compile.compiled.CUDAGraphDecoder`). Without autograd the (contiguous) KDA recurrent
            states are then updated in place too (``kimi::kda_decode_``; ``new_state`` holds the same tensors);
            the conv states are returned new as usual.

        labels: optional int64 ``[B, T]`` training targets, transformers' convention: shifted inside (position t
            is scored against ``labels[:, t + 1]``), -100 ignored. See :func:`kimi_compile.training.causal_lm_loss`.
        return_logits: with ``labels``, also return the logits (off by default: the loss is computed in chunks
            precisely so that the ``[B, T, vocab]`` float32 logits are never materialised).
        loss_chunk_size: rows per cross-entropy chunk (default 1024).

    Returns:
        ``(logits [B, T, vocab], new_state)``: logits float32 (float64 for a float64 model); ``new_state`` holds
        every ``past_key_values.{i}.<part>``. With ``labels``: ``(loss, logits or None, new_state)``, ``loss`` the
        mean next-token cross-entropy over the labelled positions (a float32 scalar; 0 if none is labelled).
    """

    def __init__(self, config: KimiConfig) -> None:
        super().__init__()
        if not isinstance(config, KimiConfig):
            raise TypeError(f"config must be a KimiConfig, got {type(config).__name__}")
        self.config = config
        self.model = KimiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -------------------------------------------------------------- construction helpers
    @classmethod
    def from_config(cls, config: KimiConfig, seed: int = 0, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", init_on_device: bool = False) -> "KimiForCausalLM":
        """A model with deterministic random weights.

        By default the values are drawn on the CPU in float32 (same ``seed`` -> same weights whatever ``dtype`` and
        ``device``). ``init_on_device=True`` allocates the model directly on ``device`` in ``dtype`` and draws there
        (deterministic per device type; for models too large to build on the host, e.g. in benchmarks)."""
        if init_on_device:
            with torch.device("meta"):
                model = cls(config)
            model.materialize_(dtype, device)
            model.init_weights(seed, on_device=True)
            return model
        model = cls(config)
        model.init_weights(seed)
        return model.cast_(dtype, device)

    @torch.no_grad()
    def cast_(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "KimiForCausalLM":
        """Move to ``device`` and cast to ``dtype`` in place, keeping float32 what is float32 by definition
        (``A_log``, ``dt_bias``, the router's ``e_score_correction_bias``, the rope ``inv_freq``)."""
        for module in self.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or not t.is_floating_point():
                        continue
                    target = torch.float32 if name in FP32_TENSORS else dtype
                    t.data = t.data.to(device=device if device is not None else t.device, dtype=target)
        return self

    def materialize_(self, dtype: torch.dtype, device: torch.device | str) -> "KimiForCausalLM":
        """Give a model built under ``torch.device("meta")`` real, *uninitialised* storage on ``device`` (float32
        where by definition); the rope table is recomputed. Used by the loader and by ``init_on_device``."""
        for module in self.modules():
            for name, t in list(module._parameters.items()):
                if t is not None:
                    target = torch.float32 if name in FP32_TENSORS else dtype
                    module._parameters[name] = nn.Parameter(torch.empty(t.shape, dtype=target, device=device),
                                                            requires_grad=t.requires_grad)
            for name, t in list(module._buffers.items()):
                if t is not None:
                    target = torch.float32 if name in FP32_TENSORS else dtype
                    module._buffers[name] = torch.empty(t.shape, dtype=target, device=device)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.model.rotary is not None:
            self.model.rotary = Rotary(self.config).to(device)
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0, *, on_device: bool = False) -> None:
        """Deterministic init, parameter by parameter in name order, from a CPU generator (or, with
        ``on_device``, a generator on the parameters' device).

        Linear / embedding / expert weights ~ N(0, initializer_range); norms = 1; conv ~ U(+-1/sqrt(W));
        A_log = log U(1, 16); dt_bias = softplus^-1(U_log(1e-3, 1e-1)); router bias ~ N(0, 0.1) (so that top-k
        selection and the two combine modes are exercised); AttnRes queries 0 (uniform), their norms 1."""
        dev = self.device if on_device else torch.device("cpu")
        gen = torch.Generator(device=dev).manual_seed(int(seed))
        std = self.config.initializer_range
        tensors = dict(self.named_parameters())
        tensors.update({n: b for n, b in self.named_buffers() if n.endswith("e_score_correction_bias")})
        for name in sorted(tensors):
            p = tensors[name]
            shape, leaf = p.shape, name.rsplit(".", 1)[-1]
            fp32 = dict(dtype=torch.float32, device=dev)
            if leaf == "A_log":
                val = torch.empty(shape, **fp32).uniform_(1.0, 16.0, generator=gen).log()
            elif leaf == "dt_bias":
                dt = torch.exp(torch.empty(shape, **fp32).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
                dt = dt.clamp_min(1e-4)
                val = dt + torch.log(-torch.expm1(-dt))
            elif leaf == "e_score_correction_bias":
                val = torch.randn(shape, generator=gen, **fp32) * 0.1
            elif name.endswith("conv1d.weight"):
                bound = 1.0 / math.sqrt(shape[-1])
                val = torch.empty(shape, **fp32).uniform_(-bound, bound, generator=gen)
            elif leaf.startswith("attn_res_query"):
                val = torch.zeros(shape, **fp32)
            elif leaf.startswith("attn_res_norm") or "norm" in name.rsplit(".", 2)[-2]:
                val = torch.ones(shape, **fp32)
            elif leaf == "bias":
                val = torch.zeros(shape, **fp32)
            elif on_device:  # draw in the target dtype: no float32 copy of a large tensor
                p.normal_(0.0, std, generator=gen)
                continue
            else:
                val = torch.randn(shape, generator=gen, **fp32) * std
            p.copy_(val.to(p.dtype))

    # -------------------------------------------------------------- helpers for callers
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def empty_state(self, batch_size: int) -> dict[str, Tensor]:
        return empty_state(self.config, batch_size, self.dtype, self.device)

    def state_specs(self):
        return state_specs(self.config, self.dtype)

    # -------------------------------------------------------------- forward
    # ``torch.compile(model)`` returns an OptimizedModule that, when the module has ``_initialize_hook``, calls
    # ``_infer_parameters`` outside Dynamo before every compiled call (its hook for lazy modules). We use it to mark
    # the batch, sequence and past-length axes dynamic before Dynamo first sees them, so one graph serves every
    # prompt length, past length and batch size >= 2 instead of recompiling on the second distinct size. Called
    # inside a compiled function, the model is inlined and neither runs.
    _initialize_hook = None

    def _infer_parameters(self, module, args, kwargs=None) -> None:
        kwargs = kwargs or {}
        input_ids = args[0] if args else kwargs.get("input_ids")
        state = args[1] if len(args) > 1 else kwargs.get("state")
        if torch.compiler.is_compiling() or kwargs.get("cache_position") is not None:
            return
        if isinstance(input_ids, Tensor) and (state is None or isinstance(state, dict)):
            mark_dynamic_inputs(input_ids, state)

    def forward(self, input_ids: Tensor, state: Optional[dict[str, Tensor]] = None,
                position_ids: Optional[Tensor] = None, *, logits_to_keep: int = 0,
                cache_position: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                return_logits: bool = False, loss_chunk_size: int = DEFAULT_LOSS_CHUNK):
        check_forward_inputs(self, input_ids, state, position_ids, logits_to_keep)
        hidden, new_state = self.model(input_ids, state, position_ids, cache_position)
        if labels is not None:
            loss = causal_lm_loss(hidden, self.lm_head.weight, labels, chunk_size=loss_chunk_size)
            if not return_logits:
                return loss, None, new_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = _acc(self.lm_head(hidden))
        return (loss, logits, new_state) if labels is not None else (logits, new_state)
