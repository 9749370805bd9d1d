"""Time an exported folder in ONNX Runtime (CPU) against PyTorch eager: prefill and decode, medians of warm runs."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Optional, Union

import numpy as np

from .ort_runtime import OrtKimiModel

__all__ = ["benchmark", "median_ms"]


def median_ms(fn, repeats: int) -> float:
    """Median wall-clock milliseconds of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def benchmark(onnx_dir: Union[str, os.PathLike], model=None, *, batch_size: int = 1, prompt_len: int = 64,
              decode_steps: int = 32, repeats: int = 5, threads: Optional[int] = None, seed: int = 0
              ) -> dict[str, Any]:
    """ONNX Runtime CPU vs PyTorch eager CPU timings of one exported model (median of ``repeats``).

    prefill_ms: one call on a ``[batch_size, prompt_len]`` prompt from an empty state.
    decode_ms_per_token: ``decode_steps`` single-token calls after that prefill, divided by the steps.
    ``model`` (a KimiForCausalLM) adds the same measurements for PyTorch eager (``torch.no_grad``).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    runner = OrtKimiModel(onnx_dir, session_options=opts)
    rng = np.random.default_rng(seed)
    vocab = runner.session.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 100
    prompt = rng.integers(0, vocab, size=(batch_size, prompt_len), dtype=np.int64)
    step_ids = rng.integers(0, vocab, size=(batch_size, 1), dtype=np.int64)

    result: dict[str, Any] = {
        "batch_size": batch_size, "prompt_len": prompt_len, "decode_steps": decode_steps, "repeats": repeats,
        "threads": threads,
    }
    if model is not None:  # PyTorch first: ONNX Runtime's spinning pool threads must not steal its CPU
        import torch

        prev_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))
        try:
            t_prompt, t_step = torch.from_numpy(prompt), torch.from_numpy(step_ids)
            with torch.no_grad():
                def pt_prefill():
                    return model(t_prompt, model.empty_state(batch_size))

                prefill_ms = median_ms(pt_prefill, repeats)
                _, pt_state = pt_prefill()

                def pt_decode():
                    st = pt_state
                    for _ in range(decode_steps):
                        _, st = model(t_step, st)

                result["torch_eager"] = {"prefill_ms": prefill_ms,
                                         "decode_ms_per_token": median_ms(pt_decode, repeats) / max(decode_steps, 1)}
        finally:
            torch.set_num_threads(prev_threads)

    def ort_prefill():
        return runner(prompt)

    _, ort_state = ort_prefill()

    def ort_decode():
        st = ort_state
        for _ in range(decode_steps):
            _, st = runner(step_ids, st)

    result["ort"] = {"prefill_ms": median_ms(ort_prefill, repeats),
                     "decode_ms_per_token": median_ms(ort_decode, repeats) / max(decode_steps, 1)}
    return result
