"""CPU prefill (and decode) of one model: the opset-27 ONNX graph, the --fallback graph, and eager PyTorch.

    python bench/bench_onnx_cpu.py [--lengths 1024 4096] [--threads 1] [--repeats 3] [--json FILE]

Exports the built-in tiny Kimi Linear model (``kimi_compile.tiny_config("kimi_linear")``: 3 KDA + 2 MLA
layers, hidden 64) twice into a temporary folder, then times, for each prompt length T, one call on a
``[1, T]`` prompt from an empty state (prefill) and single-token calls after it (decode), as the median of
``--repeats`` runs after a warm-up. ONNX Runtime runs with ``--threads`` intra-op threads and no spinning,
PyTorch with the same thread count. Results: docs/benchmarks.md ("ONNX Runtime CPU").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from kimi_compile import KimiForCausalLM, tiny_config
    from kimi_compile.export.onnx import export_onnx
    from kimi_compile.export.ort_benchmark import median_ms
    from kimi_compile.export.ort_runtime import OrtKimiModel
    from kimi_compile.greedy import model_step

    torch.set_num_threads(args.threads)
    model = KimiForCausalLM.from_config(tiny_config("kimi_linear"), seed=0).eval()
    results = {"model": "tiny kimi_linear", "threads": args.threads, "repeats": args.repeats,
               "torch": torch.__version__, "onnxruntime": ort.__version__, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, fallback in (("opset27", False), ("fallback", True)):
            out = Path(tmp) / name
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_onnx(model, out, fallback=fallback, progress=False)
            print(f"exported {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            runners[name] = OrtKimiModel(out, intra_op_num_threads=args.threads, allow_spinning=False)

        torch.set_grad_enabled(False)
        steps = {"eager PyTorch": model_step(model), **{f"ORT {k}": r.step for k, r in runners.items()}}
        gen = torch.Generator().manual_seed(0)
        for T in args.lengths:
            prompt = torch.randint(0, model.config.vocab_size, (1, T), generator=gen)
            token = prompt[:, -1:]
            for name, step in steps.items():
                prefill = median_ms(lambda step=step: step(prompt, None), args.repeats)
                _, state = step(prompt, None)

                def decode(step=step, state=state):
                    st = state
                    for _ in range(args.decode_steps):
                        _, st = step(token, st)

                per_token = median_ms(decode, args.repeats) / args.decode_steps
                row = {"T": T, "runtime": name, "prefill_ms": prefill, "decode_ms_per_token": per_token}
                results["rows"].append(row)
                print(f"T={T:5d}  {name:15s}  prefill {prefill:9.1f} ms   decode {per_token:7.2f} ms/token",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
