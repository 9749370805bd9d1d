"""Run an exported folder with onnxruntime-genai (``pip install onnxruntime-genai``): the ``backend="onnx"`` path
of :func:`kimi_compile.generate` when GenAI is installed.

``kimi_compile.generate`` promises one rule for every backend: greedy, exactly ``max_new_tokens`` per row, and
with ``eos_token_id`` given a finished row keeps producing it (None: never stop). GenAI's own search stops a
row at the config's eos and pads it with ``pad_token_id``; and for a batch it takes the prompt in one
``append_tokens`` call only. So each row runs as a GenAI generator of batch 1 that is a step
``(ids, generator) -> (logits, generator)`` of the shared greedy loop (``append_tokens`` then ``get_logits``):
GenAI owns the model and every piece of state, the loop only picks the argmax. A deployment uses GenAI's
own loop (``og.Generator.generate_next_token``); README's ONNX section shows it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from kimi_compile.greedy import greedy

from .genai_config import GENAI_CONFIG_FILE

__all__ = ["unavailable_reason", "load_model", "GenaiStep", "generate"]

_MODELS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def unavailable_reason(onnx_dir: Union[str, os.PathLike]) -> Optional[str]:
    """None when GenAI can run ``onnx_dir``, else why not (not installed, or no genai_config.json)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        return f"onnxruntime-genai is not installed ({e})"
    if not (Path(onnx_dir) / GENAI_CONFIG_FILE).is_file():
        return (f"{onnx_dir} has no {GENAI_CONFIG_FILE} (exported with mla_cache='absorbed', or a model GenAI "
                "cannot run: see kimi_compile.json's onnxruntime_genai_unsupported)")
    return None


def load_model(onnx_dir: Union[str, os.PathLike]):
    """An ``onnxruntime_genai.Model`` of the folder, cached per folder and genai_config.json modification time."""
    import onnxruntime_genai as og

    path = Path(onnx_dir)
    cfg = path / GENAI_CONFIG_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"onnx_dir has no {GENAI_CONFIG_FILE}: {onnx_dir}")
    key = (str(path.resolve()), cfg.stat().st_mtime_ns, (path / "model.onnx").stat().st_mtime_ns)
    with _LOCK:
        if key not in _MODELS:
            for old in [k for k in _MODELS if k[0] == key[0]]:
                del _MODELS[old]
            _MODELS[key] = og.Model(str(path))
        return _MODELS[key]


class GenaiStep:
    """A batch-1 GenAI generator as a greedy-loop step: ``step(ids [1, T], None)`` starts one with room for
    ``max_length`` tokens, ``step(token [1, 1], generator)`` appends to it; both return the last logits."""

    def __init__(self, model, max_length: int) -> None:
        self.model = model
        self.max_length = max_length

    def __call__(self, ids: torch.Tensor, generator):
        import onnxruntime_genai as og

        if ids.shape[0] != 1:
            raise ValueError(f"GenaiStep runs one row at a time, got a batch of {ids.shape[0]}")
        if generator is None:
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=self.max_length, batch_size=1)
            generator = og.Generator(self.model, params)
        generator.append_tokens(np.ascontiguousarray(ids.cpu().numpy().astype(np.int32)))
        logits = torch.from_numpy(np.array(generator.get_logits(), dtype=np.float32))
        return logits, generator


def generate(onnx_dir: Union[str, os.PathLike], input_ids, max_new_tokens: int, *,
             eos_token_id: Optional[int] = None) -> torch.Tensor:
    """Greedy generation with GenAI; the same tokens and eos rule as :func:`kimi_compile.generate`."""
    model = load_model(onnx_dir)
    ids = torch.as_tensor(input_ids).long()
    step = GenaiStep(model, max_length=ids.shape[1] + max_new_tokens)
    rows = [greedy(step, ids[b:b + 1].cpu(), max_new_tokens, eos_token_id=eos_token_id) for b in range(ids.shape[0])]
    out = torch.cat(rows, dim=0)
    return out.to(ids.device) if isinstance(input_ids, torch.Tensor) else out.numpy()
