"""Check an exported folder against the PyTorch model it came from, in ONNX Runtime (CPU): logits, state, a
prefill in two calls, greedy tokens, and a timing report."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np
import torch

from kimi_compile.greedy import greedy, model_step

from .ort_benchmark import median_ms
from .ort_runtime import OrtKimiModel

__all__ = ["verify", "VERIFY_STAGES"]


def _torch_state_max_err(runner: "OrtKimiModel", ort_state: dict[str, Any], torch_state: dict[str, Any]) -> float:
    worst = 0.0
    got_state = runner.model_state(ort_state)
    for name, value in torch_state.items():
        ref = value.float().cpu()
        got = got_state[name]
        if got.dtype == torch.int16 or got.dtype == torch.uint16:  # bfloat16 bits
            got = got.view(torch.bfloat16)
        if got.shape != ref.shape:
            return float("inf")
        if ref.numel():
            worst = max(worst, float((got.float() - ref).abs().max()))
    return worst


VERIFY_STAGES = ("logits and state", "prefill in two calls", "greedy tokens", "timing")


def verify(onnx_dir: Union[str, os.PathLike], model, *, cases=((1, 1), (3, 7), (1, 33)), split=(2, 12, 5),
           gen_batch: int = 3, gen_prompt: int = 5, new_tokens: int = 32, timing_runs: int = 3,
           timing_steps: int = 8, seed: int = 0, progress: Optional[bool] = None) -> dict[str, Any]:
    """Check an exported folder against the PyTorch model it came from (ONNX Runtime CPU, fresh state).

    * ``cases``: (batch, prompt length) pairs; logits and every state piece compared with the model (the
      graph's state converted to the model's layout).
    * ``split``: (batch, length, cut): prefill in two calls (cut, length - cut) vs one call.
    * greedy generation of ``new_tokens`` on a ``[gen_batch, gen_prompt]`` prompt, ONNX Runtime and PyTorch
      eager through the same loop (:func:`kimi_compile.greedy.greedy`).
    * timings on that prompt: one warm-up, then the median of ``timing_runs`` runs of the prefill and of
      ``timing_steps`` decode steps, for both (``timing_ms``; CPU, a report, not a benchmark).
    ``progress``: a bar over these stages (None: only on a terminal). Returns a dict; raises nothing for
    mismatches.
    """
    from tqdm.auto import tqdm

    runner = OrtKimiModel(onnx_dir, allow_spinning=False)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {"cases": []}
    worst_logits = worst_state = 0.0
    bar = tqdm(total=len(VERIFY_STAGES), desc="kimi-export verify", unit="step", leave=False,
               disable=None if progress is None else not progress)
    try:
        with torch.no_grad():
            bar.set_postfix_str(VERIFY_STAGES[0])
            for B, T in cases:
                ids = torch.randint(0, vocab, (B, T), generator=gen)
                ref_logits, ref_state = model(ids)
                logits, state = runner(ids)
                err_l = float(np.abs(logits - ref_logits.float().numpy()).max())
                err_s = _torch_state_max_err(runner, state, ref_state)
                worst_logits, worst_state = max(worst_logits, err_l), max(worst_state, err_s)
                report["cases"].append({"batch": B, "length": T, "max_logit_err": err_l, "max_state_err": err_s})
            bar.update(1)

            bar.set_postfix_str(VERIFY_STAGES[1])
            B, T, cut = split
            ids = torch.randint(0, vocab, (B, T), generator=gen)
            one_logits, one_state = runner(ids)
            l1, st = runner(ids[:, :cut])
            l2, two_state = runner(ids[:, cut:], st)
            two_logits = np.concatenate([l1, l2], axis=1)
            split_err = float(np.abs(two_logits - one_logits).max())
            for name in runner.state_names:
                a, b = one_state[name].numpy(), two_state[name].numpy()
                split_err = max(split_err, float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())
                                if a.size else 0.0)
            report["prefill_split_max_err"] = split_err
            bar.update(1)

            bar.set_postfix_str(VERIFY_STAGES[2])
            prompt = torch.randint(0, vocab, (gen_batch, gen_prompt), generator=gen)
            torch_step = model_step(model)
            ref_tokens = greedy(torch_step, prompt, new_tokens)
            ort_tokens = greedy(runner.step, prompt, new_tokens)
            report["tokens_identical"] = bool(torch.equal(ort_tokens, ref_tokens))
            report["new_tokens"] = new_tokens
            report["gen_batch"] = gen_batch
            bar.update(1)

            bar.set_postfix_str(VERIFY_STAGES[3])
            timing = {}
            for side, step in (("torch", torch_step), ("ort", runner.step)):
                _, prefilled = step(prompt, None)
                token = ort_tokens[:, gen_prompt:gen_prompt + 1]

                def decode(step=step, prefilled=prefilled, token=token):
                    st = prefilled
                    for _ in range(timing_steps):
                        _, st = step(token, st)

                timing[f"{side}_prefill"] = median_ms(lambda step=step: step(prompt, None), timing_runs)
                timing[f"{side}_decode_per_token"] = median_ms(decode, timing_runs) / max(timing_steps, 1)
            timing["runs"] = timing_runs
            timing["note"] = f"CPU, median of {timing_runs} runs after a warm-up"
            report["timing_ms"] = timing
            bar.update(1)
    finally:
        bar.close()
    report["max_logit_err"] = worst_logits
    report["max_state_err"] = worst_state
    return report
