"""What an exported folder says about its graph: ``genai_config.json`` for onnxruntime-genai, ``kimi_compile.json``
for everything else.

``genai_config.json`` is onnxruntime-genai 0.18's own format, loadable by ``onnxruntime_genai.Model(dir)`` as is
(GenAI rejects any key it does not know, so nothing of ours goes in it):

* Kimi Linear (KDA + MLA, no RoPE) is a hybrid decoder: ``type`` ``qwen3_5_text`` (GenAI's hybrid model type:
  fixed-size conv / recurrent state beside a growing KV cache), ``past_conv_names`` /
  ``past_recurrent_names`` for the KDA layers, ``past_key_names`` / ``past_value_names`` for the MLA layers.
* Kimi K2 (MLA + RoPE only) is a plain decoder: ``type`` ``llama`` with ``position_ids`` (GenAI's hybrid types
  feed 3-D MRoPE positions, so a rotary model cannot be one of them).
* The MLA cache must be the ``split`` layout (:mod:`kimi_compile.export.mla_cache`): GenAI wants a key and a
  value per attention layer, one head size for both (``head_size`` = half the absorbed row, 1 kv head).
* ``past_present_share_buffer`` is false: every call returns new ``present.*`` tensors (the graph concatenates
  the caches; it has no in-place cache update op).

Which layers carry which state GenAI learns from the graph's inputs: it binds ``past_key_values.%d.key`` for
every layer that has such an input, and so on for each template. No ``state_groups``: they configure GenAI's
paged / continuous-batching engine, which needs paged-attention graph inputs (``block_table``, ...) this graph
does not have (``og.Engine`` requests fail on it; tests/test_genai.py).

``kimi_compile.json`` lists every graph input and output exactly (name, layer, part, shape with symbolic axes,
dtype), the lowering and the MLA cache layout; :mod:`kimi_compile.export.ort_runtime` and the tests read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["write_genai_config", "write_io_description", "read_io_description", "genai_unsupported_reason",
           "GENAI_CONFIG_FILE", "IO_FILE", "GENAI_HYBRID_TYPE", "GENAI_DECODER_TYPE"]

GENAI_CONFIG_FILE = "genai_config.json"
IO_FILE = "kimi_compile.json"
GENAI_HYBRID_TYPE = "qwen3_5_text"
GENAI_DECODER_TYPE = "llama"

_ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int64: "int64"}

# graph state part -> (genai_config input key, output key)
_GENAI_KEYS = {
    "key": ("past_key_names", "present_key_names"),
    "value": ("past_value_names", "present_value_names"),
    "conv_state": ("past_conv_names", "present_conv_names"),
    "recurrent_state": ("past_recurrent_names", "present_recurrent_names"),
}


def genai_unsupported_reason(config, mla_cache: str) -> Optional[str]:
    """Why onnxruntime-genai 0.18 cannot run a graph of ``config`` exported with ``mla_cache``; None if it can."""
    if config.mla_layers and mla_cache != "split":
        return ("the MLA cache is in the absorbed layout (one .key per layer); onnxruntime-genai needs a key and a "
                "value per attention layer: export with mla_cache='split'")
    if config.kda_layers and config.use_rope:
        return ("KDA layers with a rotary MLA: GenAI's hybrid model type feeds 3-D MRoPE position_ids, which this "
                "graph does not take")
    if not config.mla_layers and not config.kda_layers:
        return "the model has no state"
    return None


def _eos_list(eos) -> Any:
    return eos if eos is not None else -1


def write_genai_config(out_dir, config, specs, *, model_file: str = "model.onnx") -> Path:
    """Write ``out_dir/genai_config.json`` for a graph of ``config`` whose state inputs are ``specs``
    (split MLA layout). Raise ValueError when GenAI cannot run it (see :func:`genai_unsupported_reason`)."""
    parts = {s.part for s in specs}
    reason = genai_unsupported_reason(config, "split" if "value" in parts or not config.mla_layers else "absorbed")
    if reason:
        raise ValueError(f"onnxruntime-genai cannot run this export: {reason}")
    inputs: dict[str, Any] = {"input_ids": "input_ids"}
    if config.use_rope:
        inputs["position_ids"] = "position_ids"
    outputs: dict[str, Any] = {"logits": "logits"}
    for part in ("key", "value", "conv_state", "recurrent_state"):
        if part in parts:
            past_key, present_key = _GENAI_KEYS[part]
            inputs[past_key] = f"past_key_values.%d.{part}"
            outputs[present_key] = f"present.%d.{part}"
    head_size = next((s.shape[-1] for s in specs if s.part == "key"), config.linear_head_dim)
    context = int(config.max_position_embeddings)
    description = {
        "model": {
            "type": GENAI_HYBRID_TYPE if config.kda_layers else GENAI_DECODER_TYPE,
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else -1,
            "eos_token_id": _eos_list(config.eos_token_id),
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else 0,
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "kimi-compile", "provider_options": []},
                "filename": model_file,
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": 1,  # the MLA cache is one MQA head (absorbed latent | rope key)
                "head_size": head_size,
                "inputs": inputs,
                "outputs": outputs,
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "num_return_sequences": 1,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
    path = Path(out_dir) / GENAI_CONFIG_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return path


def write_io_description(out_dir, config, specs, *, dtype: torch.dtype, opset: int, fallback: bool,
                         external_data: bool, mla_cache: str, genai: Optional[str]) -> Path:
    """Write ``out_dir/kimi_compile.json``: the graph's I/O and state, lowering and MLA cache layout.
    ``genai`` is None when genai_config.json was written, else the reason it was not."""
    description = {
        "format_version": 2,
        "model_type": str(config.model_type),
        "opset": opset,
        "lowering": "fallback" if fallback else "opset27",
        "lowering_description": "opset <= 21: chunked KDA Loop, Conv" if fallback
        else "opset 27: LinearAttention gated_delta, CausalConvWithState",
        "dtype": _ONNX_DTYPES.get(dtype, str(dtype)),
        "external_data": bool(external_data),
        "mla_cache": mla_cache,
        "mla_cache_width": config.mla_cache_dim if config.mla_layers else None,
        "onnxruntime_genai": genai is None,
        "onnxruntime_genai_unsupported": genai,
        "eos_token_id": config.eos_token_id,
        "axes": ["batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"],
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}]
        + ([{"name": "position_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"]}]
           if config.use_rope else []),
        "outputs": [{"name": "logits", "dtype": "float32",
                     "shape": ["batch_size", "sequence_length", config.vocab_size]}],
        "state": [
            {
                "input": s.name,
                "output": s.present_name,
                "layer": s.layer,
                "part": s.part,
                "dtype": _ONNX_DTYPES.get(s.dtype, str(s.dtype)),
                "shape": list(s.shape),
                "output_shape": [("total_sequence_length" if d == "past_sequence_length" else d) for d in s.shape],
                "first_call": "zeros" if "past_sequence_length" not in s.shape
                else "empty (past_sequence_length = 0)",
            }
            for s in specs
        ],
    }
    path = Path(out_dir) / IO_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return path


def read_io_description(out_dir) -> dict[str, Any]:
    """``kimi_compile.json`` of an exported folder ({} when absent: a folder from an older export)."""
    path = Path(out_dir) / IO_FILE
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
