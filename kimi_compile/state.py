"""The model's explicit state: a plain ``dict[str, Tensor]`` (a pytree), keyed by the exported names.

Per layer i (the global 0-based layer index):

* KDA layer: ``past_key_values.{i}.conv_state`` ``[batch_size, 3*H*K, W-1]`` in the model dtype (the last W-1
  inputs of the one fused depthwise conv over the concatenated q|k|v projections) and
  ``past_key_values.{i}.recurrent_state`` ``[batch_size, H, K, V]`` float32.
* MLA layer: ``past_key_values.{i}.key`` ``[batch_size, 1, past_sequence_length, kv_lora_rank + qk_rope_head_dim]``
  in the model dtype: the absorbed-MQA cache, per token the normalised latent followed by the shared rope key
  (already rotated when the model uses RoPE). There is no ``.value`` entry: the value is the latent part of the
  same cache.

A model call returns the next state under the same names; exporters name the graph outputs
``present.{i}.<part>`` (see :func:`present_name`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from .config import FULL, LINEAR, KimiConfig

__all__ = ["StateSpec", "state_specs", "empty_state", "present_name", "state_names", "past_length",
           "select_batch", "check_state", "BATCH", "PAST"]

BATCH = "batch_size"
PAST = "past_sequence_length"

Dim = Union[int, str]


@dataclass(frozen=True)
class StateSpec:
    """One piece of state: its name, its shape (ints, or the symbolic axis names ``batch_size`` /
    ``past_sequence_length``), its dtype, and which layer and kind it belongs to."""

    name: str
    shape: tuple[Dim, ...]
    dtype: torch.dtype
    layer: int
    part: str  # "conv_state" | "recurrent_state" | "key"

    def concrete_shape(self, batch_size: int, past_sequence_length: int = 0) -> tuple[int, ...]:
        sizes = {BATCH: batch_size, PAST: past_sequence_length}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    @property
    def present_name(self) -> str:
        return present_name(self.name)


def present_name(name: str) -> str:
    """``past_key_values.{i}.<part>`` -> ``present.{i}.<part>`` (the exported output name)."""
    prefix = "past_key_values."
    if not name.startswith(prefix):
        raise ValueError(f"name must start with {prefix!r}, got {name!r}")
    return "present." + name[len(prefix):]


def state_specs(config: KimiConfig, dtype: torch.dtype = torch.float32) -> list[StateSpec]:
    """The state layout of ``config`` in layer order; ``dtype`` is the model dtype (conv_state and key). The
    recurrent state is float32 (float64 for a float64 model, as kimi::kda keeps it)."""
    if not isinstance(config, KimiConfig):
        raise TypeError(f"config must be a KimiConfig, got {type(config).__name__}")
    specs: list[StateSpec] = []
    rec_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # float64 only for exact references
    H, K = config.linear_num_heads, config.linear_head_dim
    W = config.linear_conv_kernel_dim
    for i, kind in enumerate(config.layer_types):
        if kind == LINEAR:
            specs.append(StateSpec(f"past_key_values.{i}.conv_state", (BATCH, config.kda_conv_channels, W - 1),
                                   dtype, i, "conv_state"))
            specs.append(StateSpec(f"past_key_values.{i}.recurrent_state", (BATCH, H, K, K), rec_dtype, i,
                                   "recurrent_state"))
        elif kind == FULL:
            specs.append(StateSpec(f"past_key_values.{i}.key", (BATCH, 1, PAST, config.mla_cache_dim), dtype, i,
                                   "key"))
    return specs


def state_names(config: KimiConfig) -> list[str]:
    return [s.name for s in state_specs(config)]


def empty_state(config: KimiConfig, batch_size: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The state of ``batch_size`` fresh sequences: zero conv/recurrent state, zero-length MLA caches."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return {s.name: torch.zeros(s.concrete_shape(batch_size, 0), dtype=s.dtype, device=device)
            for s in state_specs(config, dtype)}


def check_state(config: KimiConfig, state: object, batch_size: int, dtype: torch.dtype,
                device: torch.device, specs: Optional[list[StateSpec]] = None) -> None:
    """Check a state dict against ``state_specs(config, dtype)`` for ``batch_size`` rows on ``device``: exactly the
    expected keys (a missing or unknown key raises naming it) and, per key, a tensor of the spec's rank, fixed
    sizes, batch, dtype and device, all MLA caches with one past length. Every message names the state key the
    caller passed (not the inner op's argument). Shapes and dtypes only: no data is read, so no host sync, and
    under torch.compile these are guards, not graph code. ``specs`` replaces the layout (a sharded model's local
    shapes)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict[str, Tensor] or None, got {type(state).__name__}")
    specs = state_specs(config, dtype) if specs is None else specs
    expected = {spec.name for spec in specs}
    for key in state:
        if key not in expected:
            raise ValueError(f"state has an unknown key {key!r}; this model's state is {sorted(expected)}")
    past_key = None
    for spec in specs:
        if spec.name not in state:
            raise ValueError(f"state is missing {spec.name!r}")
        t = state[spec.name]
        if not isinstance(t, Tensor):
            raise TypeError(f"state[{spec.name!r}] must be a torch.Tensor, got {type(t).__name__}")
        want = spec.concrete_shape(batch_size, t.shape[2] if spec.part == "key" and t.dim() == 4 else 0)
        if t.dim() != len(want) or any(a != b for a, b in zip(t.shape, want)):
            shape = ", ".join(str(d) for d in spec.shape)
            raise ValueError(f"state[{spec.name!r}] must have shape {list(want)} ([{shape}] with batch_size "
                             f"{batch_size}), got {list(t.shape)}")
        if t.dtype != spec.dtype:
            raise TypeError(f"state[{spec.name!r}] must be {spec.dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"state[{spec.name!r}] is on {t.device}, the model on {device}")
        if spec.part == "key":
            if past_key is not None and t.shape[2] != state[past_key].shape[2]:
                raise ValueError(f"state[{spec.name!r}] holds {t.shape[2]} past tokens but state[{past_key!r}] "
                                 f"holds {state[past_key].shape[2]}: all MLA caches share one past length")
            past_key = spec.name


def past_length(config: KimiConfig, state: dict[str, Tensor] | None) -> int:
    """Tokens already in ``state`` (from an MLA cache's shape; a SymInt under tracing, never a host sync).
    Returns 0 for None or for a model without MLA layers."""
    if state is None or not config.mla_layers:
        return 0
    return state[f"past_key_values.{config.mla_layers[0]}.key"].shape[2]


def select_batch(state: dict[str, Tensor], index: Tensor | slice | int) -> dict[str, Tensor]:
    """Rows ``index`` of every piece of state (all pieces have the batch on axis 0)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return {k: v[index] for k, v in state.items()}
