"""``resolve_model``: the one place that turns what a user names as the model (nothing, a checkpoint folder
or a model object) and a dtype into a :class:`~kimi_compile.model.KimiForCausalLM`, for the CLI and the
exporters.  ``parse_dtype`` (kimi_compile.dtypes) is re-exported here."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .config import tiny_config
from .dtypes import EXPORT_DTYPES, parse_dtype
from .loading import load_model
from .model import KimiForCausalLM

__all__ = ["TINY_MODELS", "parse_dtype", "resolve_model"]

#: the built-in tiny models by name: (tiny_config kind, attn_res_block_size)
TINY_MODELS = {
    "kimi_linear": ("kimi_linear", None),
    "kimi_linear_attnres": ("kimi_linear", 2),
    "k2": ("k2", None),
}


def resolve_model(model: Union[None, str, os.PathLike, KimiForCausalLM] = None,
                  dtype: Union[str, torch.dtype, None] = None, *, tiny: Optional[str] = None,
                  seed: Optional[int] = None, progress: bool = False) -> KimiForCausalLM:
    """The model to export, in eval mode, on CPU.

    Args:
        model: None (the built-in tiny model ``tiny``, weights from ``seed``), a checkpoint directory, or a
            :class:`KimiForCausalLM` (returned as it is).
        dtype: "float32" / "float16" / "bfloat16" or a torch dtype (:func:`parse_dtype`); default the
            checkpoint's, float32 for the tiny model.  A model object must already have it.
        tiny: which built-in tiny model (a key of :data:`TINY_MODELS`; default "kimi_linear"); only without
            ``model``.
        seed: weight seed of the tiny model (default 0); only without ``model``.
        progress: progress bar while loading a checkpoint.

    Raises ValueError / TypeError / FileNotFoundError naming the argument.
    """
    dtype = parse_dtype(dtype, choices=EXPORT_DTYPES)
    if model is not None and (tiny is not None or seed is not None):
        raise ValueError(f"tiny={tiny!r} / seed={seed!r} choose a built-in model: they cannot go with model=")
    if model is None:
        kind = "kimi_linear" if tiny is None else tiny
        if kind not in TINY_MODELS:
            raise ValueError(f"tiny must be one of {', '.join(TINY_MODELS)}, got {tiny!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        config_kind, block = TINY_MODELS[kind]
        config = tiny_config(config_kind, attn_res_block_size=block)
        return KimiForCausalLM.from_config(config, seed=0 if seed is None else seed,
                                           dtype=dtype or torch.float32).eval()
    if isinstance(model, (str, os.PathLike)):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"model {os.fspath(model)}: no such directory")
        return load_model(model, dtype=dtype, device="cpu", progress=progress).eval()
    if not isinstance(model, KimiForCausalLM):
        raise TypeError(f"model must be a checkpoint directory, a KimiForCausalLM or None, got {type(model).__name__}")
    if dtype is not None and model.dtype != dtype:
        raise ValueError(f"model is {model.dtype} but dtype={dtype} was asked: cast the model first "
                         "(model.cast_(dtype)) or pass a checkpoint directory")
    return model.eval()
