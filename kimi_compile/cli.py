"""``kimi-export``: export a Kimi model to ONNX or TensorRT and check it against PyTorch.

    kimi-export --target onnx|tensorrt [--model DIR | --tiny NAME [--seed N]] [--out DIR [--overwrite]]
                [--dtype float32|float16|bfloat16] [--no-verify] [--report-json FILE] [--quiet] [--debug]
                onnx only: [--opset 27|18..21] [--fallback] [--external-data ...] [--new-tokens N]
                           [--benchmark [--bench-prompt-len N] [--bench-batch N] [--threads N]]

Without ``--model`` it exports a built-in tiny model (``--tiny``, default kimi_linear), checks the written graph
against PyTorch (ONNX: ONNX Runtime vs eager, 32 greedy tokens; TensorRT: the plugin nodes swapped back to
standard ops in ONNX Runtime, prefill and decode) and prints a short report.

Exit status, both targets (:data:`EXIT_CODES`):

* 0 the export was written (and verified, unless ``--no-verify``);
* 1 verification failed (ONNX: the export stays written; TensorRT: nothing is written);
* 2 bad usage: an unknown or invalid option, an option the target does not use, ``--tiny`` / ``--seed`` with
  ``--model``, a ``--model`` folder that does not exist, an existing non-empty ``--out`` without ``--overwrite``;
* 3 the export failed: ``--out`` is a file or cannot be created, a bad checkpoint, the target is not installed,
  any error while exporting (the temporary folder is removed; an existing ``--out`` is left as it was);
* 130 / 143 interrupted by SIGINT / SIGTERM (the temporary folder is removed as well).

Every error is one line on stderr starting ``kimi-export:``; ``--debug`` adds the Python traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator, NoReturn, Optional, Sequence

from .resolve import TINY_MODELS, resolve_model

__all__ = ["main", "build_parser", "EXIT_CODES"]

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_USAGE, EXIT_EXPORT_FAILED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM
EXIT_CODES = {EXIT_OK: "ok", EXIT_VERIFY_FAILED: "verification failed", EXIT_USAGE: "bad usage",
              EXIT_EXPORT_FAILED: "export failed", EXIT_SIGINT: "interrupted (SIGINT)",
              EXIT_SIGTERM: "terminated (SIGTERM)"}

# largest |logits ORT - PyTorch| accepted per dtype (both sides compute in that dtype on CPU)
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2.5e-1}

#: options only one target uses: (flag, argparse dest, targets that use it); the others reject them
TARGET_OPTIONS = (
    ("--opset", "opset", ("onnx",)),
    ("--fallback", "fallback", ("onnx",)),
    ("--external-data", "external_data", ("onnx",)),
    ("--new-tokens", "new_tokens", ("onnx",)),
    ("--benchmark", "benchmark", ("onnx",)),
    ("--bench-prompt-len", "bench_prompt_len", ("onnx",)),
    ("--bench-batch", "bench_batch", ("onnx",)),
    ("--threads", "threads", ("onnx",)),
)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that the exporters' cleanup runs."""


class _UsageError(Exception):
    """Exit 2 with this message."""


class _ExportFailed(Exception):
    """Exit 3 with this message (already names the option or path at fault)."""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kimi-export",
        description="Export a Kimi Linear / Kimi K2 model to ONNX (opset 27 LinearAttention + "
                    "CausalConvWithState, or an opset <= 21 fallback) or TensorRT, and verify it.",
        epilog="exit status: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items()))
    p.add_argument("--target", choices=("onnx", "tensorrt"), required=True, help="what to export to")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (hub Kimi Linear, transformers KimiLinear, or DeepSeek-V3/K2 format); "
                        "default: the built-in tiny model")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default kimi_export_out/<target>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --out (it is replaced only once the new export is complete)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="model dtype in the graph (default: the checkpoint's; float32 for the tiny model)")
    p.add_argument("--tiny", choices=sorted(TINY_MODELS), default=None,
                   help="which built-in tiny model to export when --model is not given (default kimi_linear)")
    p.add_argument("--seed", type=int, default=None, help="weight seed of the built-in tiny model (default 0)")
    p.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    p.add_argument("--report-json", metavar="FILE", default=None, help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
    onnx = p.add_argument_group("onnx target only")
    onnx.add_argument("--opset", type=int, choices=(27, 18, 19, 20, 21), default=None,
                      help="27: LinearAttention / CausalConvWithState; 18-21: the fallback graph (chunked KDA "
                           "Loop). Default: the fallback graph, faster in ONNX Runtime 1.32 on CPU")
    onnx.add_argument("--fallback", action="store_true",
                      help="same as --opset 18: no opset-27 ops (for runtimes without LinearAttention)")
    onnx.add_argument("--external-data", choices=("auto", "always", "never"), default=None,
                      help="weights in model.onnx.data (auto, the default: above 1 GiB)")
    onnx.add_argument("--new-tokens", type=int, default=None, help="greedy tokens compared in the check (default 32)")
    onnx.add_argument("--benchmark", action="store_true",
                      help="also time ONNX Runtime vs PyTorch eager on CPU (median of several runs)")
    onnx.add_argument("--bench-prompt-len", type=int, default=None,
                      help="prompt length of the benchmark's prefill (default 64)")
    onnx.add_argument("--bench-batch", type=int, default=None, help="batch size of the benchmark (default 1)")
    onnx.add_argument("--threads", type=int, default=None, help="CPU threads for the benchmark")
    return p


def _given(args, dest: str) -> bool:
    value = getattr(args, dest)
    return value is not None and value is not False


def _check_usage(args) -> None:
    """Raise _UsageError for what argparse cannot see: options the target does not use, contradictions, a
    missing --model folder, an existing --out that would be replaced without --overwrite."""
    for flag, dest, targets in TARGET_OPTIONS:
        if _given(args, dest) and args.target not in targets:
            raise _UsageError(f"{flag} is not used by --target {args.target} (only by --target {', '.join(targets)})")
    if args.model is not None:
        for flag in ("tiny", "seed"):
            if _given(args, flag):
                raise _UsageError(f"--{flag} picks a built-in model: it cannot go with --model")
        if not os.path.isdir(args.model):
            raise _UsageError(f"--model {args.model}: no such directory")
    if args.seed is not None and args.seed < 0:
        raise _UsageError(f"--seed must be >= 0, got {args.seed}")
    for flag, dest in (("--new-tokens", "new_tokens"), ("--bench-prompt-len", "bench_prompt_len"),
                       ("--bench-batch", "bench_batch"), ("--threads", "threads")):
        if getattr(args, dest) is not None and getattr(args, dest) < 1:
            raise _UsageError(f"{flag} must be >= 1, got {getattr(args, dest)}")
    out = Path(args.out)
    try:
        non_empty = out.is_dir() and any(out.iterdir())
    except OSError:  # unreadable: the export itself fails on it (exit 3)
        non_empty = False
    if non_empty and not args.overwrite:
        raise _UsageError(f"--out {out} exists and is not empty: pass --overwrite to replace it")


def _check_out(out: Path) -> None:
    """--out must be a folder that can be created: fail before any work (exit 3) when it cannot."""
    if out.exists() and not out.is_dir():
        raise _ExportFailed(f"--out {out} is a file, not a folder")
    parent = out.resolve().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise _ExportFailed(f"--out {out}: cannot create it ({existing} is not a writable folder)")


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _load_model(args):
    """The model and a label for the report; a checkpoint that cannot be loaded is an export failure that
    names --model."""
    if args.model is None:
        tiny = args.tiny or "kimi_linear"
        return resolve_model(None, args.dtype, tiny=tiny, seed=args.seed), f"built-in tiny {tiny}"
    try:
        return resolve_model(args.model, args.dtype, progress=not args.quiet), args.model
    except Exception as e:
        raise _ExportFailed(f"cannot load --model {args.model}: {type(e).__name__}: {_first_line(e)}") from e


def _run_tensorrt(args) -> int:
    # each target's modules load only when that target runs (TensorRT's pull in Triton and onnx_ir)
    try:
        from kimi_compile.export.tensorrt import VerificationError, export_tensorrt
    except ImportError as e:
        raise _ExportFailed(f"--target tensorrt is not available in this installation "
                            f"(kimi_compile.export.tensorrt could not be imported: {e})") from e
    model, _ = _load_model(args)
    try:
        result = export_tensorrt(model, args.out, quiet=args.quiet, verify=not args.no_verify)
    except VerificationError as e:
        _report_json(args, {"status": EXIT_VERIFY_FAILED, "verification": e.report})
        _say(f"{e} (TensorRT: nothing was written to {args.out})")
        return EXIT_VERIFY_FAILED
    print(result)
    _report_json(args, {**result.to_json(), "status": EXIT_OK})
    return EXIT_OK


def _report_json(args, payload: dict) -> None:
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2, default=str)


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
    w(f"  lowering: {result.lowering_note}\n")
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
          f"{tm['torch_decode_per_token']:.2f} ms/token ({tm.get('note', 'CPU')})\n")
    for note in notes:
        w(f"  note    : {note}\n")
    if bench is not None:
        o, p = bench["ort"], bench.get("torch_eager", {})
        w(f"  bench   : B={bench['batch_size']} prompt {bench['prompt_len']}, median of {bench['repeats']}: "
          f"prefill ORT {o['prefill_ms']:.2f} ms / eager {p.get('prefill_ms', float('nan')):.2f} ms; "
          f"decode ORT {o['decode_ms_per_token']:.3f} / eager {p.get('decode_ms_per_token', float('nan')):.3f} "
          "ms/token\n")


def _run_onnx(args) -> int:
    from kimi_compile.export.onnx import export_onnx
    from kimi_compile.export.ort_benchmark import benchmark
    from kimi_compile.export.ort_verify import verify

    out_dir = Path(args.out)
    model, label = _load_model(args)
    dtype_name = str(model.dtype).replace("torch.", "")
    # neither --opset nor --fallback: export_onnx picks the default lowering and says why (lowering_note)
    result = export_onnx(model, out_dir, opset=args.opset, fallback=True if args.fallback else None,
                         external_data=args.external_data or "auto", progress=not args.quiet)

    verify_report = bench = None
    notes: list[str] = []
    status = EXIT_OK
    tol = TOLERANCE[dtype_name]
    if not args.no_verify:
        try:
            verify_report = verify(out_dir, model, new_tokens=args.new_tokens or 32, progress=not args.quiet)
        except Exception as e:
            first = _first_line(e)
            if dtype_name == "bfloat16" and "NOT_IMPLEMENTED" in first:
                # ONNX Runtime's CPU provider has no bfloat16 kernels for ordinary ops (Mul, MatMul): the graph
                # is valid (checked above) and meant for GPU runtimes.
                notes.append(f"verification skipped: ONNX Runtime (CPU) has no bfloat16 kernels for this graph "
                             f"({first}); the graph passed onnx.checker (full check)")
            else:
                _say(f"verification FAILED: the export was written to {out_dir}, but ONNX Runtime (CPU) could "
                     f"not run it: {type(e).__name__}: {first}")
                return EXIT_VERIFY_FAILED
        else:
            bad = verify_report["max_logit_err"] > tol
            if dtype_name == "float32":
                bad = bad or not verify_report["tokens_identical"]
            status = EXIT_VERIFY_FAILED if bad else EXIT_OK
    if args.benchmark:
        bench = benchmark(out_dir, model, threads=args.threads, prompt_len=args.bench_prompt_len or 64,
                          batch_size=args.bench_batch or 1)
    _print_report(label, result, verify_report, bench, dtype_name, tol, notes)
    _report_json(args, {
        "out_dir": str(result.out_dir), "opset": result.opset, "fallback": result.fallback,
        "dtype": dtype_name, "op_counts": result.op_counts, "inputs": result.input_names,
        "outputs": result.output_names, "export_seconds": result.seconds, "verify": verify_report,
        "benchmark": bench, "status": status, "notes": notes,
    })
    if status:
        _say(f"verification FAILED (max |logits ORT - PyTorch| above {tol:g} or greedy tokens differ); "
             f"the export was written to {out_dir}")
    return status


_RUNNERS = {"onnx": _run_onnx, "tensorrt": _run_tensorrt}


def _say(message: str) -> None:
    print(f"kimi-export: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit] + " ..."


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While exporting, SIGTERM raises :class:`_Terminated` (as SIGINT raises KeyboardInterrupt), so the
    temporary output folder is removed on the way out; a second SIGTERM during that cleanup is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _temp_dirs(out: Path) -> set[Path]:
    """The exporters' temporary folders for ``out`` (``.<name>.tmp-*`` next to it)."""
    try:
        parent = out.resolve().parent
        return set(parent.glob(f".{out.name}.tmp-*")) if parent.is_dir() else set()
    except OSError:
        return set()


def _remove_new_temp_dirs(out: Path, before: set[Path]) -> None:
    """Remove temporary folders this run created and left behind: the exporters remove their own, but a signal
    that lands between creating the folder and entering their cleanup block would leave it."""
    for path in _temp_dirs(out) - before:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``kimi-export``; returns the exit status (bad usage that argparse sees exits 2 via SystemExit)."""
    args = build_parser().parse_args(argv)
    args.out = args.out or f"kimi_export_out/{args.target}"
    try:
        _check_usage(args)
    except _UsageError as e:
        _say(f"error: {e} (see kimi-export --help)")
        return EXIT_USAGE
    out = Path(args.out)
    before = _temp_dirs(out)
    try:
        with _sigterm_raises():
            _check_out(out)
            return _RUNNERS[args.target](args)
    except _Terminated:
        _remove_new_temp_dirs(out, before)
        _say(f"terminated (SIGTERM); --out {out} is unchanged")
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        _remove_new_temp_dirs(out, before)
        _say(f"interrupted (SIGINT); --out {out} is unchanged")
        return EXIT_SIGINT
    except Exception as e:
        _remove_new_temp_dirs(out, before)
        if args.debug:
            traceback.print_exc()
        if isinstance(e, _ExportFailed):
            _say(f"export failed: {e}")
        else:
            _say(f"export failed: {type(e).__name__}: {_first_line(e)} (--out {out} is unchanged)")
        return EXIT_EXPORT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
