"""Run an exported Kimi graph with ONNX Runtime: one session, explicit state, greedy generation.

    from kimi_compile.export.ort_runtime import OrtKimiModel, generate
    m = OrtKimiModel("kimi_export_out/onnx")
    logits, state = m(input_ids)              # first call: zero state, past_sequence_length 0
    logits, state = m(next_ids, state)        # present.* fed back as past_key_values.*
    tokens = generate("kimi_export_out/onnx", input_ids, 32)   # the greedy loop of kimi_compile.greedy

The state stays in ONNX Runtime ``OrtValue`` objects between calls (no host copies of the caches). The
runner needs only the graph: the state inputs, their dtypes and axes are read from the session; the MLA cache
layout (``export/mla_cache.py``) from ``kimi_compile.json`` (:meth:`OrtKimiModel.model_state` converts a state
to the PyTorch model's layout, :meth:`OrtKimiModel.graph_state` back). Checking a folder against PyTorch is
``export/ort_verify.py``, timing it ``export/ort_benchmark.py``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from kimi_compile.greedy import greedy

from .genai_config import read_io_description
from .mla_cache import from_graph_state, to_graph_state

__all__ = ["OrtKimiModel", "generate", "load"]

MODEL_FILE = "model.onnx"
STATE_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

# ONNX Runtime type strings -> (numpy storage dtype, ONNX TensorProto element type)
_ORT_TYPES = {
    "tensor(float)": (np.float32, 1),
    "tensor(float16)": (np.float16, 10),
    "tensor(bfloat16)": (np.uint16, 16),  # bfloat16 is carried as raw uint16 bits
    "tensor(int64)": (np.int64, 7),
}

_CACHE: dict[tuple, "OrtKimiModel"] = {}
_CACHE_LOCK = threading.Lock()


def _as_numpy_ids(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [batch, sequence] array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got {arr.dtype}")
    return np.ascontiguousarray(arr.astype(np.int64, copy=False))


class OrtKimiModel:
    """An ONNX Runtime session over an exported folder (``model.onnx`` [+ ``model.onnx.data``]).

    Args:
        onnx_dir: the folder written by :func:`kimi_compile.export.onnx.export_onnx` (or a .onnx file).
        providers: ONNX Runtime execution providers (default CPU).
        intra_op_num_threads: threads per op (default: ONNX Runtime's choice).
        allow_spinning: let idle pool threads spin (lowest latency; set False when timing next to PyTorch).
        session_options: an ``onnxruntime.SessionOptions`` to use as is.
    """

    def __init__(self, onnx_dir: Union[str, os.PathLike], *, providers: Optional[list] = None,
                 intra_op_num_threads: Optional[int] = None, allow_spinning: bool = True,
                 session_options=None) -> None:
        import onnxruntime as ort

        path = Path(onnx_dir)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"onnx_dir has no {MODEL_FILE}: {onnx_dir}")
        self.path = path
        self.dir = path.parent
        if session_options is None:
            session_options = ort.SessionOptions()
            if intra_op_num_threads is not None:
                session_options.intra_op_num_threads = int(intra_op_num_threads)
            if not allow_spinning:  # idle pool threads sleep instead of spinning (fair CPU timings next to torch)
                session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                session_options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), session_options,
                                            providers=providers or ["CPUExecutionProvider"])
        self.io = read_io_description(self.dir)

        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "input_ids" not in self.inputs or "logits" not in self.outputs:
            raise ValueError(f"{path} is not a kimi-compile graph (needs input_ids and logits)")
        self.state_names = [n for n in self.inputs if n.startswith(STATE_PREFIX)]
        self.present_names = [PRESENT_PREFIX + n[len(STATE_PREFIX):] for n in self.state_names]
        missing = [n for n in self.present_names if n not in self.outputs]
        if missing:
            raise ValueError(f"{path}: state outputs missing for {missing}")
        self.uses_position_ids = "position_ids" in self.inputs
        self._past_axis = {}  # state name -> axis of past_sequence_length (caches only)
        for n in self.state_names:
            for axis, d in enumerate(self.inputs[n].shape):
                if d == "past_sequence_length":
                    self._past_axis[n] = axis
        self._run_outputs = ["logits"] + self.present_names
        self._map = dict(zip(self.present_names, self.state_names))
        self.mla_cache = "split" if any(n.endswith(".value") for n in self.state_names) else "absorbed"
        self._mla_width = self.io.get("mla_cache_width")
        if self.mla_cache == "split" and not self._mla_width:
            raise ValueError(f"{self.dir}: split MLA cache but no mla_cache_width in kimi_compile.json")

    # ------------------------------------------------------------------------------------------------ state
    def _ort_value(self, arr: np.ndarray, type_str: str):
        import onnxruntime as ort

        if type_str == "tensor(bfloat16)":
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr, 16)
        return ort.OrtValue.ortvalue_from_numpy(arr)

    def empty_state(self, batch_size: int) -> dict[str, Any]:
        """Zero conv / recurrent state and zero-length caches for ``batch_size`` rows (as OrtValues)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        state = {}
        for name in self.state_names:
            info = self.inputs[name]
            shape = []
            for d in info.shape:
                if d == "batch_size":
                    shape.append(batch_size)
                elif d == "past_sequence_length":
                    shape.append(0)
                elif isinstance(d, int):
                    shape.append(d)
                else:
                    raise ValueError(f"state input {name} has an unexpected symbolic axis {d!r}")
            np_dtype, _ = _ORT_TYPES[info.type]
            state[name] = self._ort_value(np.zeros(shape, dtype=np_dtype), info.type)
        return state

    def past_length(self, state: dict[str, Any]) -> int:
        for name, axis in self._past_axis.items():
            return int(state[name].shape()[axis])
        return 0

    # ------------------------------------------------------------------------------------------------ run
    def __call__(self, input_ids, state: Optional[dict[str, Any]] = None, position_ids=None):
        """One step: ``(logits float32 np.ndarray [B, T, vocab], new_state)``; ``state=None`` starts fresh."""
        import onnxruntime as ort

        ids = _as_numpy_ids(input_ids, "input_ids")
        B, T = ids.shape
        if T == 0:
            raise ValueError("input_ids must hold at least one token per row")
        if state is None:
            state = self.empty_state(B)
        elif not isinstance(state, dict) or any(n not in state for n in self.state_names):
            raise ValueError("state must be the dict returned by a previous call (or empty_state())")
        feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids)}
        if self.uses_position_ids:
            if position_ids is None:
                past = self.past_length(state)
                pos = np.broadcast_to(np.arange(past, past + T, dtype=np.int64), (B, T))
            else:
                pos = _as_numpy_ids(position_ids, "position_ids")
                if pos.shape[0] == 1 and B > 1:
                    pos = np.broadcast_to(pos, (B, T))
            feeds["position_ids"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(pos))
        for name in self.state_names:
            value = state[name]
            if isinstance(value, np.ndarray):
                value = self._ort_value(np.ascontiguousarray(value), self.inputs[name].type)
            feeds[name] = value
        results = self.session.run_with_ort_values(self._run_outputs, feeds)
        logits = results[0].numpy()
        new_state = {self._map[n]: v for n, v in zip(self.present_names, results[1:])}
        return logits, new_state

    def model_state(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A state of this graph (OrtValues or arrays) as torch tensors in the PyTorch model's layout."""
        arrays = {n: torch.from_numpy(np.asarray(v.numpy() if hasattr(v, "numpy") else v)) for n, v in state.items()}
        return from_graph_state(arrays, self._mla_width or 0, self.mla_cache)

    def graph_state(self, model_state: dict[str, Any]) -> dict[str, np.ndarray]:
        """A PyTorch model state as numpy arrays in this graph's layout (feed it as ``state``)."""
        arrays = {n: np.ascontiguousarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                  for n, v in model_state.items()}
        return to_graph_state(arrays, self._mla_width or 0, self.mla_cache)

    def step(self, input_ids, state):
        """The greedy loop's step: torch logits, OrtValue state."""
        logits, state = self(input_ids, state)
        return torch.from_numpy(logits), state

    def generate(self, input_ids, max_new_tokens: int, *, eos_token_id: Optional[int] = None) -> np.ndarray:
        """Greedy decoding (:func:`kimi_compile.greedy.greedy`); returns int64 ``[B, T + max_new_tokens]``."""
        ids = torch.from_numpy(_as_numpy_ids(input_ids, "input_ids"))
        return greedy(self.step, ids, max_new_tokens, eos_token_id=eos_token_id).numpy()


def load(onnx_dir: Union[str, os.PathLike], **kwargs) -> OrtKimiModel:
    """A cached :class:`OrtKimiModel` per (folder, file modification time, options)."""
    path = Path(onnx_dir)
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"onnx_dir has no {MODEL_FILE}: {onnx_dir}")
    key = (str(model_file.resolve()), model_file.stat().st_mtime_ns,
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _CACHE_LOCK:
        if key not in _CACHE:
            for old in [k for k in _CACHE if k[0] == key[0]]:
                del _CACHE[old]
            _CACHE[key] = OrtKimiModel(path, **kwargs)
        return _CACHE[key]


def generate(onnx_dir: Union[str, os.PathLike], input_ids, max_new_tokens: int, *,
             eos_token_id: Optional[int] = None, **session_kwargs):
    """Greedy generation with ONNX Runtime; the ``backend="onnx"`` path of :func:`kimi_compile.generate`.

    Returns an int64 ``torch.Tensor`` ``[B, T + max_new_tokens]`` when ``input_ids`` is a torch tensor,
    else a numpy array.
    """
    runner = load(onnx_dir, **session_kwargs)
    out = runner.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id)
    if isinstance(input_ids, torch.Tensor):
        return torch.from_numpy(out).to(input_ids.device)
    return out
