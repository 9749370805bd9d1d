"""Model configuration for the Kimi families handled by kimi-compile.

One dataclass, :class:`KimiConfig`, describes both families:

* **Kimi Linear** (``model_type "kimi_linear"``): a hybrid of KDA layers (Kimi Delta Attention, a gated delta-rule
  linear attention with a fused q|k|v short convolution) and MLA layers (multi-head latent attention with NoPE),
  with a DeepSeek-style MoE (sigmoid router, ``e_score_correction_bias``, shared expert) after a few dense layers.
* **Kimi K2 / DeepSeek-V3** (``model_type "kimi_k2"`` / ``"deepseek_v3"``): MLA in every layer with q-LoRA and
  YaRN-scaled RoPE on the shared 64-wide key part, and the same MoE (checkpoint module name ``mlp``).

:meth:`KimiConfig.from_dict` reads the three ``config.json`` dialects found in the wild:

1. the hub remote-code Kimi Linear format (``linear_attn_config`` with 1-indexed ``kda_layers`` /
   ``full_attn_layers``, ``num_experts``, ``num_experts_per_token``, ``moe_renormalize``, ...),
2. transformers' native ``KimiLinearConfig`` (``layer_types``, ``mlp_layer_types``, ``linear_num_heads``,
   ``linear_head_dim``, ``linear_conv_kernel_dim``; transformers >= 5.16),
3. ``DeepseekV3Config`` / Kimi K2 (``n_routed_experts``, ``num_experts_per_tok``, ``rope_scaling`` or
   ``rope_parameters`` with ``rope_type "yarn"``, ``rope_interleave``).

Keys missing from a file take the defaults of the matching transformers 5.18 config class, so that a checkpoint
loads with the same meaning as in transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KimiConfig", "tiny_config", "TINY_KINDS", "INT_BOUNDS", "FLOAT_BOUNDS", "kimi_linear_48b_config",
           "LINEAR", "FULL", "DENSE", "SPARSE"]

TINY_KINDS = ("kimi_linear", "kimi_linear_attnres", "k2", "kimi_k2", "deepseek_v3")

LINEAR = "linear_attention"  # a KDA layer
FULL = "full_attention"  # an MLA layer
DENSE = "dense"  # a SwiGLU MLP after the mixer
SPARSE = "sparse"  # a MoE after the mixer

_KIMI_LINEAR_TYPES = ("kimi_linear",)
_DEEPSEEK_TYPES = ("deepseek_v3", "kimi_k2")
_KIMI_LINEAR_ARCHS = ("KimiLinearForCausalLM",)
_DEEPSEEK_ARCHS = ("DeepseekV3ForCausalLM",)

# Sane bounds on the sizes a config may declare, inclusive. Far above every released Kimi / DeepSeek model (Kimi K2:
# hidden 7168, 61 layers, 384 experts, vocab 163840; Kimi Linear 48B: KDA 32 x 128), far below sizes that would
# make building or loading a model allocate terabytes or run for minutes. A value outside (or of the wrong type)
# raises ValueError naming the field before anything is built. linear_head_dim stops at kimi::kda's 256.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "linear_num_heads": (1, 1024),
    "linear_head_dim": (1, 256),
    "linear_conv_kernel_dim": (1, 64),
    "num_attention_heads": (1, 1024),
    "q_lora_rank": (1, 1 << 16),
    "kv_lora_rank": (1, 1 << 16),
    "qk_nope_head_dim": (1, 1024),
    "qk_rope_head_dim": (0, 1024),
    "v_head_dim": (1, 1024),
    "max_position_embeddings": (1, 1 << 40),
    "num_experts": (1, 1 << 14),
    "num_experts_per_token": (1, 1 << 14),
    "moe_intermediate_size": (1, 1 << 18),
    "num_shared_experts": (0, 64),
    "n_group": (1, 1 << 14),
    "topk_group": (1, 1 << 14),
    "attn_res_block_size": (1, 1 << 16),
    "num_nextn_predict_layers": (0, 64),
}
# finite floats, inclusive bounds (eps > 0 is enforced separately where 0 would divide by zero)
FLOAT_BOUNDS: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 1.0),
    "mla_norm_eps": (0.0, 1.0),
    "attn_res_eps": (0.0, 1.0),
    "initializer_range": (0.0, 1e3),
    "rope_theta": (0.0, 1e12),
    "routed_scaling_factor": (0.0, 1e6),
}
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "use_rope", "rope_interleave", "moe_renormalize",
               "moe_combine_with_bias")
POSITIVE_FLOATS = ("rms_norm_eps", "mla_norm_eps", "rope_theta")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_int(v: Any, field_name: str, where: str) -> int:
    """``v`` as an int within :data:`INT_BOUNDS` of ``field_name``; ValueError naming ``where`` otherwise."""
    lo, hi = INT_BOUNDS[field_name]
    if not _is_int(v):
        raise ValueError(f"{where} must be an int, got {v!r} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise ValueError(f"{where} = {v} is outside the supported range [{lo}, {hi}]")
    return v


def check_float(v: Any, field_name: str, where: str) -> float:
    """``v`` as a finite float within :data:`FLOAT_BOUNDS` of ``field_name``; ValueError naming ``where``."""
    lo, hi = FLOAT_BOUNDS[field_name]
    if not _is_number(v):
        raise ValueError(f"{where} must be a number, got {v!r} ({type(v).__name__})")
    if not math.isfinite(v):
        raise ValueError(f"{where} must be finite, got {v!r}")
    if not lo <= v <= hi or (field_name in POSITIVE_FLOATS and v <= 0):
        raise ValueError(f"{where} = {v!r} is outside the supported range "
                         f"{'(' if field_name in POSITIVE_FLOATS else '['}{lo}, {hi}]")
    return float(v)


@dataclass
class KimiConfig:
    """Hyper-parameters of a Kimi Linear or Kimi K2 / DeepSeek-V3 model.

    Layer layout
        ``layer_types[i]`` is ``"linear_attention"`` (KDA) or ``"full_attention"`` (MLA); ``mlp_layer_types[i]`` is
        ``"dense"`` (SwiGLU of width ``intermediate_size``) or ``"sparse"`` (MoE). Both lists are indexed by the
        global 0-based layer index, which is also the index used in the state names
        ``past_key_values.{i}.*``.

    KDA (``linear_*`` fields)
        ``linear_num_heads`` heads of ``linear_head_dim`` (= K = V); one fused depthwise causal conv of kernel
        ``linear_conv_kernel_dim`` over the concatenated q|k|v projections (3 * H * K channels).

    MLA
        ``q_lora_rank`` None means a plain ``q_proj`` (Kimi Linear); otherwise ``q_a_proj`` -> RMSNorm ->
        ``q_b_proj`` (K2). ``kv_lora_rank`` is the latent width, ``qk_rope_head_dim`` the shared key part that
        carries RoPE when ``use_rope`` (K2) and is used without rotation otherwise (Kimi Linear, NoPE). The
        decode cache is the absorbed-MQA cache ``[latent (normalised) | k_rope (rotated)]``.
        ``mla_norm_eps`` is the eps of ``q_a_layernorm`` / ``kv_a_layernorm`` (transformers builds them with
        its default 1e-6 in both families, not ``rms_norm_eps``).

    MoE
        ``sigmoid`` (or ``softmax``) scores of a float32 router; experts chosen by top-k of
        ``scores + e_score_correction_bias`` (group-limited when ``n_group > 1``: keep the ``topk_group`` groups
        whose top-2 biased scores sum highest); weights renormalised to sum 1 (``moe_renormalize``, with +1e-20
        in the denominator as transformers) and multiplied by ``routed_scaling_factor``; the shared expert
        (width ``moe_intermediate_size * num_shared_experts``) is added unscaled.

        ``moe_combine_with_bias`` picks which scores the combine weights gather at the chosen experts:

        * ``False`` (default; transformers' native KimiLinear / DeepseekV3 and vLLM): the *unbiased* scores
          ``sigmoid(logits)``. The bias only steers *which* experts are picked.
        * ``True`` (the hub remote code of Kimi Linear): the *biased* scores ``sigmoid(logits) + bias``, so the
          bias also changes the mixing weights (before renormalisation).

        With a zero bias (a freshly initialised model) both give identical outputs.

    AttnRes
        ``attn_res_block_size`` None keeps the plain residual stream. An integer S enables Block Attention
        Residuals (arXiv 2603.15031): each attention and each MLP/MoE sublayer (2 per layer) reads, instead of the
        residual stream, a softmax average over depth of ``[embedding, completed block sums..., partial sum of
        the current block]`` computed by ``kimi_compile.ops.attn_res`` with a per-sublayer pseudo-query times a
        per-sublayer key-RMSNorm weight; blocks are S consecutive sublayers (S = 1 is full AttnRes); the final
        hidden state is one more aggregation with its own query before the final norm. Nothing of it enters the
        recurrent state, so decode stays a constant-size step per token.
    """

    model_type: str = "kimi_linear"
    vocab_size: int = 163840
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 27
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None

    # KDA
    linear_num_heads: int = 32
    linear_head_dim: int = 128
    linear_conv_kernel_dim: int = 4

    # MLA
    num_attention_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    mla_norm_eps: float = 1e-6
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 1048576

    # MoE
    num_experts: int = 256
    num_experts_per_token: int = 8
    moe_intermediate_size: int = 1024
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    moe_router_activation: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    moe_combine_with_bias: bool = False

    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    # Attention Residuals
    attn_res_block_size: int | None = None
    attn_res_eps: float = 1e-6

    # bookkeeping from config.json
    torch_dtype: str | None = None
    num_nextn_predict_layers: int = 0
    quantization_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_int(self.num_hidden_layers, "num_hidden_layers", "KimiConfig.num_hidden_layers")  # sizes the lists
        if self.layer_types is None:
            self.layer_types = [FULL] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [DENSE if i < 1 else SPARSE for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def kda_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.mlp_layer_types) if t == SPARSE]

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_cache_dim(self) -> int:
        """Width of one token of the absorbed MLA cache: normalised latent | rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kda_conv_channels(self) -> int:
        return 3 * self.linear_num_heads * self.linear_head_dim

    @property
    def rope_type(self) -> str:
        if not self.use_rope or not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    @property
    def mla_softmax_scale(self) -> float:
        """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under YaRN (as DeepSeek-V3)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = _yarn_mscale(float(self.rope_scaling["factor"]), float(mscale_all_dim))
                scale = scale * m * m
        return scale

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_hidden_layers

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Types and :data:`INT_BOUNDS` / :data:`FLOAT_BOUNDS` of every field, then their consistency."""
        for name in INT_BOUNDS:
            v = getattr(self, name)
            if v is not None or name not in ("q_lora_rank", "attn_res_block_size"):
                check_int(v, name, f"KimiConfig.{name}")
        for name in FLOAT_BOUNDS:
            check_float(getattr(self, name), name, f"KimiConfig.{name}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KimiConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("model_type", "hidden_act", "moe_router_activation"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"KimiConfig.{name} must be a str, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise ValueError(f"KimiConfig.{name} must be an int or None, got {v!r}")
        eos = self.eos_token_id
        if eos is not None and not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
            raise ValueError(f"KimiConfig.eos_token_id must be an int, a list of ints or None, got {eos!r}")
        for name in ("rope_scaling", "quantization_config"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, dict):
                raise ValueError(f"KimiConfig.{name} must be a dict or None, got {v!r}")
        for name in ("layer_types", "mlp_layer_types"):
            if not isinstance(getattr(self, name), list):
                raise ValueError(f"KimiConfig.{name} must be a list, got {getattr(self, name)!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"KimiConfig.layer_types has {len(self.layer_types)} entries, expected "
                             f"num_hidden_layers={self.num_hidden_layers}")
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ValueError(f"KimiConfig.mlp_layer_types has {len(self.mlp_layer_types)} entries, expected "
                             f"num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in (LINEAR, FULL):
                raise ValueError(f"KimiConfig.layer_types[{i}] = {t!r}: expected {LINEAR!r} or {FULL!r}")
        for i, t in enumerate(self.mlp_layer_types):
            if t not in (DENSE, SPARSE):
                raise ValueError(f"KimiConfig.mlp_layer_types[{i}] = {t!r}: expected {DENSE!r} or {SPARSE!r}")
        if SPARSE in self.mlp_layer_types:
            if self.num_experts_per_token > self.num_experts:
                raise ValueError(f"KimiConfig.num_experts_per_token={self.num_experts_per_token} exceeds "
                                 f"num_experts={self.num_experts}")
            if self.num_experts % self.n_group:
                raise ValueError(f"KimiConfig.num_experts={self.num_experts} is not a multiple of "
                                 f"n_group={self.n_group}")
            if self.topk_group > self.n_group:
                raise ValueError(f"KimiConfig.topk_group={self.topk_group} exceeds n_group={self.n_group}")
            if self.n_group > 1 and self.num_experts // self.n_group < 2:
                raise ValueError("KimiConfig.n_group > 1 needs at least 2 experts per group")
            if self.moe_router_activation not in ("sigmoid", "softmax"):
                raise ValueError(f"KimiConfig.moe_router_activation must be 'sigmoid' or 'softmax', got "
                                 f"{self.moe_router_activation!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"KimiConfig.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.use_rope:
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"KimiConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be even with RoPE")
            if self.rope_type not in ("default", "yarn"):
                raise ValueError(f"KimiConfig.rope_scaling type {self.rope_type!r} is not supported "
                                 "(supported: default, yarn)")
            if self.rope_type == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    v = self.rope_scaling.get(key)
                    if v is None:
                        raise ValueError(f"KimiConfig.rope_scaling (yarn) needs {key!r}")
                    if not _is_number(v) or not math.isfinite(v) or not 0 < v <= 1 << 40:
                        raise ValueError(f"KimiConfig.rope_scaling.{key} must be a finite number in (0, 2**40], "
                                         f"got {v!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = "kimi_compile"
        return d

    def replace(self, **changes: Any) -> "KimiConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "KimiConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:  # name the file as well as the field
            raise (TypeError if isinstance(e, TypeError) else ValueError)(f"{path}: {e}") from e

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KimiConfig":
        """Build a config from a ``config.json`` dict in any supported dialect (see the module docstring)."""
        if d.get("format") == "kimi_compile":
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in d.items() if k in known})
        family = _detect_family(d)
        if family == "kimi_linear":
            return _parse_kimi_linear(d)
        return _parse_deepseek(d)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _detect_family(d: dict[str, Any]) -> str:
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type in _KIMI_LINEAR_TYPES:
        return "kimi_linear"
    if model_type in _DEEPSEEK_TYPES:
        return "deepseek"
    if model_type is None:
        if any(a in _KIMI_LINEAR_ARCHS for a in archs):
            return "kimi_linear"
        if any(a in _DEEPSEEK_ARCHS for a in archs):
            return "deepseek"
    raise ValueError(
        f"unknown model_type {model_type!r} (architectures {archs!r}) in config.json: kimi-compile supports "
        f"model_type {_KIMI_LINEAR_TYPES + _DEEPSEEK_TYPES} / architectures {_KIMI_LINEAR_ARCHS + _DEEPSEEK_ARCHS}")


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _where(d: dict[str, Any], keys: tuple[str, ...], prefix: str = "") -> str:
    """'config.json: <the key that was read>' for error messages (the first key when none is present)."""
    key = next((k for k in keys if d.get(k) is not None), keys[0])
    return f"config.json: {prefix}{key}"


def _int(d: dict[str, Any], field_name: str, *keys: str, default: Any, prefix: str = "") -> int:
    """The first present key of ``keys`` as an int within the bounds of ``field_name`` (ValueError naming the key:
    no silent int() of a float, a bool or a string)."""
    return check_int(_first(d, *keys, default=default), field_name, _where(d, keys, prefix))


def _count(d: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """A layer count / stride that is not a KimiConfig field (first_k_dense_replace, moe_layer_freq)."""
    v = _first(d, key, default=default)
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"config.json: {key} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _float(d: dict[str, Any], field_name: str, *keys: str, default: float) -> float:
    return check_float(_first(d, *keys, default=default), field_name, _where(d, keys))


def _bool(d: dict[str, Any], *keys: str, default: bool) -> bool:
    v = _first(d, *keys, default=default)
    if not isinstance(v, bool):
        raise ValueError(f"{_where(d, keys)} must be true or false, got {v!r}")
    return v


def _str(d: dict[str, Any], *keys: str, default: str) -> str:
    v = _first(d, *keys, default=default)
    if not isinstance(v, str):
        raise ValueError(f"{_where(d, keys)} must be a string, got {v!r}")
    return v


def _mlp_types_from_freq(n_layers: int, n_experts: int | None, first_dense: int, freq: int) -> list[str]:
    if not n_experts:
        return [DENSE] * n_layers
    return [SPARSE if (i >= first_dense and i % freq == 0) else DENSE for i in range(n_layers)]


def _shared_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Fields both families read from the same keys with the same defaults (MLA dims, tokens, dtype, ...)."""
    block = d.get("attn_res_block_size")
    return dict(hidden_act=_str(d, "hidden_act", default="silu"),
                tie_word_embeddings=_bool(d, "tie_word_embeddings", default=False),
                initializer_range=_float(d, "initializer_range", "initializer_range", default=0.02),
                kv_lora_rank=_int(d, "kv_lora_rank", "kv_lora_rank", default=512),
                qk_nope_head_dim=_int(d, "qk_nope_head_dim", "qk_nope_head_dim", default=128),
                qk_rope_head_dim=_int(d, "qk_rope_head_dim", "qk_rope_head_dim", default=64),
                v_head_dim=_int(d, "v_head_dim", "v_head_dim", default=128),
                attention_bias=_bool(d, "attention_bias", default=False),
                moe_combine_with_bias=_bool(d, "moe_combine_with_bias", default=False),
                attn_res_block_size=None if block is None else _int(d, "attn_res_block_size", "attn_res_block_size",
                                                                    default=None),
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                torch_dtype=_first(d, "dtype", "torch_dtype"),
                quantization_config=d.get("quantization_config"))


def _parse_kimi_linear(d: dict[str, Any]) -> KimiConfig:
    n_layers = _int(d, "num_hidden_layers", "num_hidden_layers", default=27)
    lac = d.get("linear_attn_config")
    if lac is not None and not isinstance(lac, dict):
        raise ValueError(f"config.json: linear_attn_config must be an object, got {type(lac).__name__}")
    lac = lac or {}

    layer_types = d.get("layer_types")
    if layer_types is None:
        if "kda_layers" in lac or "full_attn_layers" in lac:
            layer_types = [None] * n_layers
            for key, kind in (("full_attn_layers", FULL), ("kda_layers", LINEAR)):
                for one_based in lac.get(key) or []:
                    if not _is_int(one_based) or not 1 <= one_based <= n_layers:
                        raise ValueError(f"config.json: linear_attn_config.{key} holds {one_based!r}, expected "
                                         f"1-indexed layer numbers in [1, {n_layers}]")
                    layer_types[one_based - 1] = kind
            missing = [i + 1 for i, t in enumerate(layer_types) if t is None]
            if missing:
                raise ValueError(f"config.json: layers {missing} (1-indexed) are in neither "
                                 "linear_attn_config.kda_layers nor full_attn_layers")
        elif "linear_attn_config" in d and d["linear_attn_config"] is None:
            layer_types = [FULL] * n_layers  # hub remote code: no linear attention config = all MLA
        else:  # transformers' KimiLinearConfig default pattern
            layer_types = [FULL if i and i % 4 == 0 else LINEAR for i in range(n_layers)]

    expert_keys = ("num_experts", "num_local_experts", "n_routed_experts")
    n_experts = _first(d, *expert_keys, default=256)
    n_experts = 0 if n_experts == 0 and _is_int(n_experts) else _int(d, "num_experts", *expert_keys, default=256)
    mlp_layer_types = d.get("mlp_layer_types")
    if mlp_layer_types is None:
        mlp_layer_types = _mlp_types_from_freq(n_layers, n_experts,
                                               _count(d, "first_k_dense_replace", 1, 0, n_layers),
                                               _count(d, "moe_layer_freq", 1, 1, n_layers))

    if d.get("mla_use_nope") is False:
        raise ValueError("config.json: mla_use_nope=false (RoPE inside Kimi Linear MLA) is not supported")
    use_grouped = _bool(d, "use_grouped_topk", default=True)
    n_group = _int(d, "n_group", "num_expert_group", "n_group", default=1) if use_grouped else 1
    topk_group = _int(d, "topk_group", "topk_group", default=1) if use_grouped else 1
    q_lora = d.get("q_lora_rank")
    n_heads = _int(d, "num_attention_heads", "num_attention_heads", default=32)
    kv_heads = _int(d, "num_attention_heads", "num_key_value_heads", default=n_heads)
    if kv_heads != n_heads:
        raise ValueError(f"config.json: num_key_value_heads={kv_heads} != num_attention_heads={n_heads} is not "
                         "supported for MLA")

    return KimiConfig(
        model_type="kimi_linear",
        vocab_size=_int(d, "vocab_size", "vocab_size", default=163840),
        hidden_size=_int(d, "hidden_size", "hidden_size", default=2304),
        intermediate_size=_int(d, "intermediate_size", "intermediate_size", default=9216),
        num_hidden_layers=n_layers,
        rms_norm_eps=_float(d, "rms_norm_eps", "rms_norm_eps", default=1e-5),
        layer_types=list(layer_types),
        mlp_layer_types=list(mlp_layer_types),
        linear_num_heads=_linear_int(d, lac, "linear_num_heads", "num_heads", 32),
        linear_head_dim=_linear_int(d, lac, "linear_head_dim", "head_dim", 128),
        linear_conv_kernel_dim=_linear_int(d, lac, "linear_conv_kernel_dim", "short_conv_kernel_size", 4),
        num_attention_heads=n_heads,
        q_lora_rank=None if q_lora is None else _int(d, "q_lora_rank", "q_lora_rank", default=None),
        use_rope=False,
        max_position_embeddings=_int(d, "max_position_embeddings", "model_max_length", "max_position_embeddings",
                                     default=1048576),
        num_experts=n_experts or 1,
        num_experts_per_token=_int(d, "num_experts_per_token", "num_experts_per_token", "num_experts_per_tok",
                                   default=8),
        moe_intermediate_size=_int(d, "moe_intermediate_size", "moe_intermediate_size", default=1024),
        num_shared_experts=_int(d, "num_shared_experts", "num_shared_experts", "n_shared_experts", default=1),
        routed_scaling_factor=_float(d, "routed_scaling_factor", "routed_scaling_factor", default=2.446),
        moe_renormalize=_bool(d, "moe_renormalize", "norm_topk_prob", default=True),
        moe_router_activation=_str(d, "moe_router_activation_func", "scoring_func", default="sigmoid"),
        n_group=n_group,
        topk_group=topk_group,
        **_shared_fields(d),
    )


def _linear_int(d: dict[str, Any], lac: dict[str, Any], field_name: str, lac_key: str, default: int) -> int:
    """A KDA size from ``linear_attn_config.<lac_key>`` (hub) or the top-level ``field_name`` (transformers)."""
    if lac.get(lac_key) is not None:
        return _int(lac, field_name, lac_key, default=default, prefix="linear_attn_config.")
    return _int(d, field_name, field_name, default=default)


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json: per-layer-type rope_parameters are not supported")
    scaling = d.get("rope_scaling")
    theta = _first(d, "rope_theta")
    if isinstance(params, dict) and params:
        merged = dict(params)
        if theta is None:
            theta = merged.get("rope_theta")
    elif isinstance(scaling, dict) and scaling:
        merged = dict(scaling)
    else:
        merged = {}
    if theta is None:
        theta = 10000.0
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    theta = check_float(theta, "rope_theta", "config.json: rope_theta")
    if rope_type == "default":
        return theta, None
    merged["rope_type"] = rope_type
    merged.pop("type", None)
    merged.pop("rope_theta", None)
    if rope_type == "yarn":
        merged.setdefault("original_max_position_embeddings",
                          _first(d, "original_max_position_embeddings", "max_position_embeddings", default=4096))
    return theta, merged


def _parse_deepseek(d: dict[str, Any]) -> KimiConfig:
    # defaults follow transformers' DeepseekV3Config
    n_layers = _int(d, "num_hidden_layers", "num_hidden_layers", default=61)
    n_experts = _int(d, "num_experts", "n_routed_experts", "num_local_experts", default=256)
    mlp_layer_types = d.get("mlp_layer_types") or _mlp_types_from_freq(
        n_layers, n_experts, _count(d, "first_k_dense_replace", 3, 0, n_layers),
        _count(d, "moe_layer_freq", 1, 1, n_layers))
    theta, scaling = _parse_rope(d)
    n_heads = _int(d, "num_attention_heads", "num_attention_heads", default=128)
    kv_heads = _int(d, "num_attention_heads", "num_key_value_heads", default=n_heads)
    if kv_heads != n_heads:
        raise ValueError(f"config.json: num_key_value_heads={kv_heads} != num_attention_heads={n_heads} is not "
                         "supported for MLA")
    topk_method = d.get("topk_method", "noaux_tc")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ValueError(f"config.json: topk_method {topk_method!r} is not supported")
    q_lora = d["q_lora_rank"] if "q_lora_rank" in d else 1536
    return KimiConfig(
        model_type=_str(d, "model_type", default="deepseek_v3"),
        vocab_size=_int(d, "vocab_size", "vocab_size", default=129280),
        hidden_size=_int(d, "hidden_size", "hidden_size", default=7168),
        intermediate_size=_int(d, "intermediate_size", "intermediate_size", default=18432),
        num_hidden_layers=n_layers,
        rms_norm_eps=_float(d, "rms_norm_eps", "rms_norm_eps", default=1e-6),
        layer_types=[FULL] * n_layers,
        mlp_layer_types=list(mlp_layer_types),
        num_attention_heads=n_heads,
        q_lora_rank=None if q_lora is None else _int(d, "q_lora_rank", "q_lora_rank", default=None),
        use_rope=True,
        rope_theta=theta,
        rope_scaling=scaling,
        rope_interleave=_bool(d, "rope_interleave", default=True),
        max_position_embeddings=_int(d, "max_position_embeddings", "max_position_embeddings", default=4096),
        num_experts=n_experts,
        num_experts_per_token=_int(d, "num_experts_per_token", "num_experts_per_tok", "num_experts_per_token",
                                   default=8),
        moe_intermediate_size=_int(d, "moe_intermediate_size", "moe_intermediate_size", default=2048),
        num_shared_experts=_int(d, "num_shared_experts", "n_shared_experts", "num_shared_experts", default=1),
        routed_scaling_factor=_float(d, "routed_scaling_factor", "routed_scaling_factor", default=2.5),
        moe_renormalize=_bool(d, "norm_topk_prob", "moe_renormalize", default=True),
        moe_router_activation=_str(d, "scoring_func", default="sigmoid"),
        n_group=_int(d, "n_group", "n_group", default=8),
        topk_group=_int(d, "topk_group", "topk_group", default=4),
        num_nextn_predict_layers=_int(d, "num_nextn_predict_layers", "num_nextn_predict_layers", "num_mtp_layers",
                                      default=0),
        **_shared_fields(d),
    )


def tiny_config(kind: str = "kimi_linear", attn_res_block_size: int | None = None) -> KimiConfig:
    """The built-in tiny model (runs in milliseconds on CPU), used by tests and the demo.

    ``kind`` is one of :data:`TINY_KINDS` (the names ``kimi-export --tiny`` accepts, plus the aliases ``kimi_k2``
    and ``deepseek_v3`` of ``k2``). ``kind="kimi_linear_attnres"`` is ``kimi_linear`` with Block AttnRes of
    block size 2 (``attn_res_block_size`` overrides it).

    ``kind="kimi_linear"``: 5 layers ``[KDA, MLA, KDA, KDA, MLA]``, hidden 64, KDA 2 heads x 16 with conv 4,
    MLA 4 heads (nope 16 + rope 8, v 16, latent 32, NoPE), layer 0 dense, MoE of 8 experts (top 2, shared 1).
    ``kind="k2"``: 4 MLA layers with q-LoRA 32 and YaRN RoPE (factor 4, original 64 positions), hidden 64,
    layer 0 dense, MoE of 8 experts in 2 groups (top 2 from 1 group).
    """
    if kind == "kimi_linear_attnres":
        kind = "kimi_linear"
        attn_res_block_size = 2 if attn_res_block_size is None else attn_res_block_size
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-5,
                  num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  num_experts=8, num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_res_block_size=attn_res_block_size)
    if kind == "kimi_linear":
        n = 5
        return KimiConfig(model_type="kimi_linear", num_hidden_layers=n,
                          layer_types=[LINEAR, FULL, LINEAR, LINEAR, FULL],
                          mlp_layer_types=[DENSE] + [SPARSE] * (n - 1),
                          linear_num_heads=2, linear_head_dim=16, linear_conv_kernel_dim=4,
                          q_lora_rank=None, use_rope=False, routed_scaling_factor=2.446,
                          n_group=1, topk_group=1, max_position_embeddings=4096, **common)
    if kind in ("k2", "kimi_k2", "deepseek_v3"):
        n = 4
        return KimiConfig(model_type="kimi_k2", num_hidden_layers=n, layer_types=[FULL] * n,
                          mlp_layer_types=[DENSE] + [SPARSE] * (n - 1), q_lora_rank=32, use_rope=True,
                          rope_theta=50000.0,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                          rope_interleave=True, max_position_embeddings=256, routed_scaling_factor=2.827,
                          n_group=2, topk_group=1, rms_norm_eps=1e-6,
                          **{k: v for k, v in common.items() if k != "rms_norm_eps"})
    raise ValueError(f"tiny_config kind must be one of {TINY_KINDS}, got {kind!r}")


def kimi_linear_48b_config(**overrides: Any) -> KimiConfig:
    """The shape of moonshotai/Kimi-Linear-48B-A3B (REFERENCE section 2): 27 layers, MLA at 1-indexed layers
    4, 8, ..., 24, 27, KDA 32 x 128 elsewhere, hidden 2304, 256 experts (top 8) after one dense layer.
    ``overrides`` replace fields (e.g. ``num_experts=32`` to fit a benchmark in memory)."""
    n = 27
    full = {4, 8, 12, 16, 20, 24, 27}
    cfg = KimiConfig(
        model_type="kimi_linear", vocab_size=163840, hidden_size=2304, intermediate_size=9216, num_hidden_layers=n,
        rms_norm_eps=1e-5, layer_types=[FULL if i + 1 in full else LINEAR for i in range(n)],
        mlp_layer_types=[DENSE] + [SPARSE] * (n - 1), linear_num_heads=32, linear_head_dim=128,
        linear_conv_kernel_dim=4, num_attention_heads=32, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, use_rope=False, max_position_embeddings=1048576, num_experts=256,
        num_experts_per_token=8, moe_intermediate_size=1024, num_shared_experts=1, routed_scaling_factor=2.446,
        moe_renormalize=True, n_group=1, topk_group=1, bos_token_id=163584, eos_token_id=163586,
        pad_token_id=163839, torch_dtype="bfloat16")
    return cfg.replace(**overrides) if overrides else cfg
