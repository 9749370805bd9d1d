"""The CPU check of a TensorRT bundle's graph: its plugin nodes swapped back to the standard opset-27 ops
(``LinearAttention`` / ``CausalConvWithState``), run in ONNX Runtime against PyTorch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from kimi_compile.lowering.tensorrt import plugin_nodes, to_standard_graph
from kimi_compile.state import present_name

__all__ = ["VerificationError", "verify_with_onnxruntime"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


class VerificationError(RuntimeError):
    """The bundle's graph does not match PyTorch (the report is in ``.report``)."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


def _numpy_state(specs, batch: int, past: int = 0):
    out = {}
    for s in specs:
        dt = {torch.float32: np.float32, torch.float16: np.float16}.get(s.dtype)
        if dt is None:
            raise TypeError(f"ONNX Runtime check supports float32 / float16 state, got {s.dtype}")
        out[s.name] = np.zeros(s.concrete_shape(batch, past), dtype=dt)
    return out


def verify_with_onnxruntime(onnx_path: Union[str, os.PathLike], model, *, batch: int = 2, prompt_len: int = 5,
                            tolerance: float = 1e-4, seed: int = 0) -> dict:
    """Swap the plugin nodes of ``onnx_path`` back to their standard ops, run prefill and one decode step in
    ONNX Runtime (CPU) and compare logits and every ``present.*`` with ``model`` (PyTorch).

    Returns ``dict(status="passed"|"failed", prefill_max_abs_diff, decode_max_abs_diff, tolerance, ...)``.
    """
    std = to_standard_graph(ir.load(os.fspath(onnx_path)))
    remaining = plugin_nodes(std)
    if remaining:
        raise RuntimeError(f"{len(remaining)} plugin nodes survived the swap back to standard ops")
    specs = model.state_specs()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        ir.save(std, path, external_data=DATA_FILE if (Path(onnx_path).parent / DATA_FILE).exists() else None)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        in_names = {i.name for i in sess.get_inputs()}
        out_names = [o.name for o in sess.get_outputs()]

        def run(x, state, past):
            feeds = {"input_ids": x.numpy().astype(np.int64)}
            if "position_ids" in in_names:  # rotary models (Kimi K2)
                feeds["position_ids"] = np.broadcast_to(np.arange(past, past + x.shape[1], dtype=np.int64),
                                                        tuple(x.shape)).copy()
            feeds.update(state)
            return dict(zip(out_names, sess.run(None, feeds)))

        def compare(ort_out, logits, new_state):
            diffs = {"logits": float(np.abs(ort_out["logits"].astype(np.float64)
                                            - logits.double().numpy()).max())}
            for s in specs:
                ref = new_state[s.name].double().numpy()
                got = ort_out[present_name(s.name)].astype(np.float64)
                if got.shape != ref.shape:
                    raise RuntimeError(f"{present_name(s.name)}: ONNX Runtime shape {got.shape} != PyTorch {ref.shape}")
                diffs[present_name(s.name)] = float(np.abs(got - ref).max()) if ref.size else 0.0
            return diffs

        with torch.no_grad():
            logits1, state1 = model(ids, None)
            logits2, state2 = model(nxt, state1)
        o1 = run(ids, _numpy_state(specs, batch, 0), 0)
        d1 = compare(o1, logits1, state1)
        past = {s.name: o1[present_name(s.name)] for s in specs}
        o2 = run(nxt, past, prompt_len)
        d2 = compare(o2, logits2, state2)
    worst1, worst2 = max(d1.values()), max(d2.values())
    ok = worst1 <= tolerance and worst2 <= tolerance
    return dict(status="passed" if ok else "failed", prefill_max_abs_diff=worst1, decode_max_abs_diff=worst2,
                tolerance=tolerance, batch=batch, prompt_len=prompt_len, prefill=d1, decode=d2,
                what="plugin nodes swapped back to LinearAttention / CausalConvWithState (opset 27), "
                     "ONNX Runtime CPU vs PyTorch, prefill then one decode step")
