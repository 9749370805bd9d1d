"""How an exported graph lays out the MLA cache: ``absorbed`` (one ``.key``) or ``split`` (``.key`` + ``.value``).

The model keeps one absorbed MQA cache per MLA layer, ``past_key_values.{i}.key`` ``[B, 1, S, W]`` with
``W = kv_lora_rank + qk_rope_head_dim`` (normalised latent | rope key); it serves as keys and values.

* ``absorbed``: the graph carries that tensor as is. Smallest and simplest; for runtimes that take any state
  names (:class:`~kimi_compile.export.ort_runtime.OrtKimiModel`, the TensorRT bundle's runner).
* ``split``: the graph carries the same W columns as two halves, ``.key`` = columns ``[0, h)`` and ``.value`` =
  columns ``[h, W)`` (plus one zero column when W is odd), ``h = ceil(W / 2)``, each ``[B, 1, S, h]``. That is
  the shape of an ordinary MQA cache (1 kv head, head size h) with a key and a value per attention layer,
  which onnxruntime-genai requires; the cache costs the same bytes per token as the absorbed form (no copy of
  the latent as a separate value). The graph joins the halves before attention and splits the result.

:func:`graph_state_specs` gives the graph's state I/O for a layout; :func:`to_graph_state` /
:func:`from_graph_state` convert a model state to and from it (torch tensors or numpy arrays).
"""

from __future__ import annotations

from typing import Any

import torch

from kimi_compile.state import StateSpec, state_specs

__all__ = ["LAYOUTS", "check_layout", "half_width", "graph_state_specs", "to_graph_state", "from_graph_state",
           "join_halves", "split_halves"]

LAYOUTS = ("split", "absorbed")


def check_layout(mla_cache: str) -> str:
    if mla_cache not in LAYOUTS:
        raise ValueError(f"mla_cache must be one of {LAYOUTS}, got {mla_cache!r}")
    return mla_cache


def half_width(width: int) -> int:
    """Columns in each half of a split cache row of ``width`` columns."""
    return (width + 1) // 2


def graph_state_specs(config, dtype: torch.dtype, mla_cache: str = "split") -> list[StateSpec]:
    """The state inputs of a graph exported with layout ``mla_cache`` (outputs: ``present.*`` of each)."""
    check_layout(mla_cache)
    specs = []
    for s in state_specs(config, dtype):
        if s.part != "key" or mla_cache == "absorbed":
            specs.append(s)
            continue
        *lead, width = s.shape
        shape = (*lead, half_width(width))
        specs.append(StateSpec(s.name, shape, s.dtype, s.layer, "key"))
        specs.append(StateSpec(s.name[: -len("key")] + "value", shape, s.dtype, s.layer, "value"))
    return specs


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=-1)
    import numpy as np

    return np.concatenate([a, b], axis=-1)


def _zeros_like_column(x):
    if isinstance(x, torch.Tensor):
        return x.new_zeros((*x.shape[:-1], 1))
    import numpy as np

    return np.zeros((*x.shape[:-1], 1), dtype=x.dtype)


def split_halves(full, width: int):
    """``[..., W]`` -> (``[..., h]``, ``[..., h]``), the second half padded with one zero column when W is odd."""
    h = half_width(width)
    key, value = full[..., :h], full[..., h:]
    if 2 * h != width:
        value = _cat(value, _zeros_like_column(value))
    return key, value


def join_halves(key, value, width: int):
    """Inverse of :func:`split_halves`."""
    return _cat(key, value[..., : width - half_width(width)])


def _width(config) -> int:
    return config if isinstance(config, int) else config.mla_cache_dim


def to_graph_state(state: dict[str, Any], config, mla_cache: str = "split") -> dict[str, Any]:
    """A model state (``model(...)``'s second output) in the graph's layout. ``config``: the KimiConfig or the
    absorbed row width ``kv_lora_rank + qk_rope_head_dim``."""
    check_layout(mla_cache)
    if mla_cache == "absorbed":
        return dict(state)
    out: dict[str, Any] = {}
    width = _width(config)
    for name, value in state.items():
        if name.endswith(".key"):
            out[name], out[name[: -len("key")] + "value"] = split_halves(value, width)
        else:
            out[name] = value
    return out


def from_graph_state(state: dict[str, Any], config, mla_cache: str = "split") -> dict[str, Any]:
    """A graph's state (names ``past_key_values.*``) back in the model's layout (``config`` as above)."""
    check_layout(mla_cache)
    if mla_cache == "absorbed":
        return dict(state)
    out: dict[str, Any] = {}
    width = _width(config)
    for name, value in state.items():
        if name.endswith(".value"):
            continue
        if name.endswith(".key"):
            value_name = name[: -len("key")] + "value"
            if value_name not in state:
                raise ValueError(f"state has {name!r} but not {value_name!r} (split MLA cache)")
            out[name] = join_halves(value, state[value_name], width)
        else:
            out[name] = value
    return out
