"""``genai_config.json``: a description of an exported graph's inputs, outputs and state, written beside it.

The layout follows ONNX Runtime GenAI's ``genai_config.json`` (``model.decoder.inputs`` / ``outputs`` with
``%d`` name templates, ``search`` defaults, token ids) and adds a ``kimi_compile`` section that lists every
state tensor exactly (name, output name, layer, part, shape with symbolic axes, dtype), which is what
:mod:`kimi_compile.export.ort_runtime` reads. ONNX Runtime GenAI itself knows no KDA recurrent state, so
the file describes the graph; it does not make the folder loadable by onnxruntime-genai.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_genai_config", "read_genai_config", "GENAI_CONFIG_FILE"]

GENAI_CONFIG_FILE = "genai_config.json"

_ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int64: "int64"}


def _templates(specs) -> dict[str, str]:
    """``past_key_names``-style templates per state part (only parts the model has)."""
    parts = []
    for s in specs:
        if s.part not in parts:
            parts.append(s.part)
    return {part: f"past_key_values.%d.{part}" for part in parts}


def write_genai_config(out_dir, config, specs, *, dtype: torch.dtype, opset: int, fallback: bool,
                       external_data: bool, model_file: str = "model.onnx") -> Path:
    """Write ``out_dir/genai_config.json`` for a graph exported from ``config`` with state ``specs``."""
    templates = _templates(specs)
    inputs: dict[str, Any] = {"input_ids": "input_ids"}
    if config.use_rope:
        inputs["position_ids"] = "position_ids"
    outputs: dict[str, Any] = {"logits": "logits"}
    genai_keys = {"key": "past_key_names", "value": "past_value_names",
                  "conv_state": "past_conv_state_names", "recurrent_state": "past_recurrent_state_names"}
    for part, template in templates.items():
        key = genai_keys.get(part, f"past_{part}_names")
        inputs[key] = template
        outputs[key.replace("past_", "present_")] = template.replace("past_key_values.", "present.")
    eos = config.eos_token_id
    description = {
        "model": {
            "type": str(config.model_type),
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id,
            "vocab_size": config.vocab_size,
            "context_length": getattr(config, "max_position_embeddings", None),
            "decoder": {
                "filename": model_file,
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "head_size": config.kv_lora_rank + config.qk_rope_head_dim,
                "inputs": inputs,
                "outputs": outputs,
                "session_options": {"log_id": "kimi-compile", "provider_options": []},
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": getattr(config, "max_position_embeddings", None),
            "past_present_share_buffer": False,
        },
        "kimi_compile": {
            "format_version": 1,
            "opset": opset,
            "lowering": "fallback (opset <= 21: chunked KDA Loop, Conv)" if fallback
            else "opset 27 (LinearAttention gated_delta, CausalConvWithState)",
            "dtype": _ONNX_DTYPES.get(dtype, str(dtype)),
            "external_data": bool(external_data),
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
                    "output_shape": [("total_sequence_length" if d == "past_sequence_length" else d)
                                     for d in s.shape],
                    "first_call": "zeros" if "past_sequence_length" not in s.shape
                    else "empty (past_sequence_length = 0)",
                }
                for s in specs
            ],
        },
    }
    path = Path(out_dir) / GENAI_CONFIG_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2)
    return path


def read_genai_config(out_dir) -> dict[str, Any]:
    path = Path(out_dir) / GENAI_CONFIG_FILE
    with open(path, encoding="utf-8") as f:
        return json.load(f)
