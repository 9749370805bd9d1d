"""``kimi-export``: export a Kimi model to ONNX (or TensorRT) and check it against PyTorch.

    kimi-export --target onnx [--model DIR] [--out DIR] [--dtype float32|float16|bfloat16] [--opset 27|18..21]

Without ``--model`` it exports the built-in tiny Kimi Linear model (``--tiny`` picks another built-in), runs the
written graph in ONNX Runtime (CPU) against PyTorch eager and prints a short report: graph op counts, I/O, the
largest logit difference, whether 32 greedy tokens are identical, prefill and decode times.

Exit status: 0 success (and verification passed), 1 verification failed, 2 export failed (no output folder is
left behind), 3 the requested target is not available.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .resolve import TINY_MODELS, resolve_model

__all__ = ["main", "build_parser"]

# largest |logits ORT - PyTorch| accepted per dtype (both sides compute in that dtype on CPU)
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2.5e-1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kimi-export",
        description="Export a Kimi Linear / Kimi K2 model to ONNX (opset 27 LinearAttention + "
                    "CausalConvWithState, or an opset <= 21 fallback) or TensorRT, and verify it.")
    p.add_argument("--target", choices=("onnx", "tensorrt"), required=True, help="what to export to")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (hub Kimi Linear, transformers KimiLinear, or DeepSeek-V3/K2 format); "
                        "default: the built-in tiny model")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default kimi_export_out/<target>)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="model dtype in the graph (default: the checkpoint's; float32 for the tiny model)")
    p.add_argument("--opset", type=int, choices=(27, 18, 19, 20, 21), default=27,
                   help="27: LinearAttention / CausalConvWithState; 18-21: the fallback graph (chunked KDA Loop)")
    p.add_argument("--fallback", action="store_true",
                   help="same as --opset 18: no opset-27 ops (for runtimes without LinearAttention)")
    p.add_argument("--tiny", choices=sorted(TINY_MODELS), default="kimi_linear",
                   help="which built-in tiny model to export when --model is not given")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the built-in tiny model")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="weights in model.onnx.data (auto: above 1 GiB)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared in the check")
    p.add_argument("--benchmark", action="store_true",
                   help="also time ONNX Runtime vs PyTorch eager on CPU (median of several runs)")
    p.add_argument("--bench-prompt-len", type=int, default=64, help="prompt length of the benchmark's prefill")
    p.add_argument("--bench-batch", type=int, default=1, help="batch size of the benchmark")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the benchmark")
    p.add_argument("--report-json", metavar="FILE", default=None, help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _load_model(args):
    if args.model is None:
        model = resolve_model(None, args.dtype, tiny=args.tiny, seed=args.seed)
        return model, f"built-in tiny {args.tiny}"
    return resolve_model(args.model, args.dtype, progress=not args.quiet), args.model


def _run_tensorrt(args) -> int:
    try:
        from kimi_compile.export.tensorrt import export_tensorrt
    except ImportError as e:
        print(f"kimi-export: --target tensorrt is not available in this installation "
              f"(kimi_compile.export.tensorrt.export_tensorrt could not be imported: {e})", file=sys.stderr)
        return 3
    kwargs = {"model": args.model, "out_dir": args.out or "kimi_export_out/tensorrt", "dtype": args.dtype,
              "quiet": args.quiet}
    try:
        params = inspect.signature(export_tensorrt).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    result = export_tensorrt(**kwargs)
    if result is not None:
        print(result)
    return 0


def _print_report(label, result, verify_report, bench, dtype_name, tol, notes=(), out=sys.stdout) -> None:
    w = out.write
    w(f"kimi-export: ONNX export of {label} ({dtype_name}) -> {result.out_dir}\n")
    size = result.model_path.stat().st_size
    data = result.model_path.parent / "model.onnx.data"
    if data.exists():
        size += data.stat().st_size
    n_nodes = sum(result.op_counts.values())
    if result.fallback:
        lowering = "fallback lowering, no opset-27 ops"
    elif result.op_counts.get("LinearAttention"):
        lowering = "LinearAttention / CausalConvWithState"
    else:
        lowering = "no KDA layer"
    w(f"  graph   : model.onnx{' + model.onnx.data' if result.external_data else ''} ({size / 1e6:.2f} MB), "
      f"opset {result.opset} ({lowering}), {n_nodes} nodes, {len(result.op_counts)} op types\n")
    key_ops = ["LinearAttention", "CausalConvWithState", "Loop", "MatMul", "Gemm", "Softmax", "TopK"]
    shown = ", ".join(f"{op} {result.op_counts.get(op, 0)}" for op in key_ops)
    w(f"  ops     : {shown}\n")
    others = ", ".join(f"{op} {n}" for op, n in result.op_counts.items() if op not in key_ops)
    w(f"            {others}\n")
    import onnx

    graph = onnx.load(str(result.model_path), load_external_data=False).graph
    for title, values in (("inputs ", graph.input), ("outputs", graph.output)):
        for i, v in enumerate(values):
            head = f"  {title} : " if i == 0 else " " * 12
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            w(f"{head}{v.name} {_fmt_shape(dims)} {onnx.TensorProto.DataType.Name(t.elem_type).lower()}\n")
    t = result.seconds
    w(f"  export  : capture {t.get('capture', 0):.1f} s, translate {t.get('translate', 0):.1f} s, "
      f"save+check {t.get('save', 0) + t.get('check', 0):.1f} s\n")
    if verify_report is not None:
        cases = ", ".join(f"B={c['batch']} T={c['length']}" for c in verify_report["cases"])
        ok = verify_report["max_logit_err"] <= tol
        w(f"  verify  : max |logits ORT - PyTorch| = {verify_report['max_logit_err']:.2e} ({cases}), "
          f"state {verify_report['max_state_err']:.2e}  {'OK' if ok else 'FAIL'} (tol {tol:g})\n")
        w(f"            prefill in two calls vs one: max diff {verify_report['prefill_split_max_err']:.2e}\n")
        w(f"            greedy {verify_report['new_tokens']} tokens (batch {verify_report['gen_batch']}): "
          f"{'identical' if verify_report['tokens_identical'] else 'DIFFERENT'} to kimi_compile.generate\n")
        tm = verify_report["timing_ms"]
        w(f"  timing  : prefill ORT {tm['ort_prefill']:.2f} ms vs PyTorch eager {tm['torch_prefill']:.2f} ms; "
          f"decode ORT {tm['ort_decode_per_token']:.2f} ms/token vs PyTorch eager "
          f"{tm['torch_decode_per_token']:.2f} ms/token (CPU, single run)\n")
    for note in notes:
        w(f"  note    : {note}\n")
    if bench is not None:
        o, p = bench["ort"], bench.get("torch_eager", {})
        w(f"  bench   : B={bench['batch_size']} prompt {bench['prompt_len']}, median of {bench['repeats']}: "
          f"prefill ORT {o['prefill_ms']:.2f} ms / eager {p.get('prefill_ms', float('nan')):.2f} ms; "
          f"decode ORT {o['decode_ms_per_token']:.3f} / eager {p.get('decode_ms_per_token', float('nan')):.3f} "
          "ms/token\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.new_tokens < 1:
        print("kimi-export: --new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.target == "tensorrt":
        return _run_tensorrt(args)

    from kimi_compile.export.onnx import ExportError, export_onnx

    out_dir = Path(args.out or "kimi_export_out/onnx")
    opset = 18 if args.fallback and args.opset == 27 else args.opset
    try:
        model, label = _load_model(args)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"kimi-export: cannot load the model: {e}", file=sys.stderr)
        return 2
    dtype_name = str(model.dtype).replace("torch.", "")
    try:
        result = export_onnx(model, out_dir, opset=opset, fallback=opset < 27,
                             external_data=args.external_data, progress=not args.quiet)
    except ExportError as e:
        print(f"kimi-export: {e}\n  (nothing was written to {out_dir})", file=sys.stderr)
        return 2

    verify_report = bench = None
    notes: list[str] = []
    status = 0
    tol = TOLERANCE[dtype_name]
    if not args.no_verify:
        from kimi_compile.export.ort_runtime import verify

        try:
            verify_report = verify(out_dir, model, new_tokens=args.new_tokens)
        except Exception as e:
            first = str(e).splitlines()[0][:300] if str(e) else ""
            if dtype_name == "bfloat16" and "NOT_IMPLEMENTED" in first:
                # ONNX Runtime's CPU provider has no bfloat16 kernels for ordinary ops (Mul, MatMul): the graph
                # is valid (checked above) and meant for GPU runtimes.
                notes.append(f"verification skipped: ONNX Runtime (CPU) has no bfloat16 kernels for this graph "
                             f"({first}); the graph passed onnx.checker (full check)")
            else:
                print(f"kimi-export: the export was written, but ONNX Runtime (CPU) could not run it: "
                      f"{type(e).__name__}: {first}", file=sys.stderr)
                status = 1
        else:
            bad = verify_report["max_logit_err"] > tol
            if dtype_name == "float32":
                bad = bad or not verify_report["tokens_identical"]
            status = 1 if bad else 0
    if args.benchmark:
        from kimi_compile.export.ort_runtime import benchmark

        bench = benchmark(out_dir, model, threads=args.threads, prompt_len=args.bench_prompt_len,
                          batch_size=args.bench_batch)
    _print_report(label, result, verify_report, bench, dtype_name, tol, notes)
    if args.report_json:
        payload = {
            "out_dir": str(result.out_dir), "opset": result.opset, "fallback": result.fallback,
            "dtype": dtype_name, "op_counts": result.op_counts, "inputs": result.input_names,
            "outputs": result.output_names, "export_seconds": result.seconds, "verify": verify_report,
            "benchmark": bench, "status": status, "notes": notes,
        }
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    if status:
        print("kimi-export: verification FAILED", file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
