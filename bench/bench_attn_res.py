"""Benchmark of kimi::attn_res (Attention Residuals): the Triton kernels vs plain PyTorch.

``run(report)`` is called by the lead's bench script on an H200.  Default shape: N = 10 sources
(Kimi Linear 48B: 9 blocks + embedding), B*T = 4096 rows (B = 2, T = 2048), D = 2304, bfloat16.

Every row is a dict ``{"name", "ms", "gbps", "bytes", "note"}``: ``ms`` the median of
``triton.testing.do_bench``; ``gbps`` against the bytes floor (each input read once, each output
written once; forward: N*B*T*D read + B*T*D written).  Correctness rows (``ms`` = None) give the max
error against a float64 reference and whether it is within tolerance.

``report`` may be a callable taking one row dict, a list to which rows are appended, or None (rows
are printed).  ``run`` also returns the list of rows.

CPU smoke test (no GPU; small shape, wall-clock median instead of do_bench; with
``TRITON_INTERPRET=1`` in the environment the Triton kernels are run through the interpreter too):

    python bench/bench_attn_res.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

EPS = 1e-6


# --------------------------------------------------------------------------------------------
# the straightforward PyTorch version
# --------------------------------------------------------------------------------------------


def attn_res_torch(sources: torch.Tensor, query: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    x = sources.float()
    x_normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    scores = x_normed @ query.float()  # [N, B, T]
    weights = scores.softmax(dim=0)
    return (weights.unsqueeze(-1) * x).sum(0).to(sources.dtype)


def attn_res_float64(sources: torch.Tensor, query: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    x = sources.double()
    rms = torch.sqrt((x * x).mean(-1) + eps)
    scores = (x @ query.double()) / rms
    weights = torch.softmax(scores, dim=0)
    return torch.einsum("nbt,nbtd->btd", weights, x)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _emit(report, row):
    if report is None:
        ms = "-" if row["ms"] is None else f"{row['ms']:.4f}"
        gbps = "-" if row["gbps"] is None else f"{row['gbps']:.2f}"
        print(f"{row['name']:<48} {ms:>10} ms {gbps:>8} GB/s  {row['note']}")
    elif callable(report):
        report(row)
    else:
        report.append(row)


def _row(name, ms, nbytes, note=""):
    gbps = None if (ms is None or nbytes is None or ms <= 0) else nbytes / (ms * 1e-3) / 1e9
    return {"name": name, "ms": ms, "gbps": gbps, "bytes": nbytes, "note": note}


def _bench_cuda_do_bench(fn, warmup=25, rep=100):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench_wall(fn, iters=20):
    from kimi_compile.export.ort_benchmark import median_ms

    return median_ms(fn, iters)


def _err_row(name, got, want, rtol, atol):
    diff = (got.double() - want).abs()
    bad = (diff > atol + rtol * want.abs()).sum().item()
    note = f"max_abs_err={diff.max().item():.3e} {'OK' if bad == 0 else f'FAIL ({bad} elements out of tolerance)'}"
    return _row(f"check: {name}", None, None, note)


def _tolerances(dtype):
    if dtype == torch.float32:
        return 2e-5, 2e-5
    if dtype == torch.float16:
        return 2e-3, 2e-3
    return 1.6e-2, 1.6e-2


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------


def run(report=None, *, N=10, B=2, T=2048, D=2304, dtype=torch.bfloat16, S=6, sweep=True, device="cuda"):
    """Times and checks kimi::attn_res on CUDA; returns the rows (see the module docstring).

    ``device="cpu"`` (with TRITON_INTERPRET=1 and a small shape) only exercises this code path:
    wall-clock timings of the interpreter mean nothing."""
    from kimi_compile.ops.attn_res import kernel as K
    from kimi_compile.ops.attn_res import attn_res, attn_res_merge, attn_res_phase1

    rows = []

    def out(row):
        rows.append(row)
        _emit(report, row)

    dev = torch.device(device)
    _bench_cuda = _bench_cuda_do_bench if dev.type == "cuda" else (lambda fn: _bench_wall(fn, iters=2))
    g = torch.Generator(device=dev).manual_seed(0)
    R = B * T
    elem = torch.empty((), dtype=dtype).element_size()
    sources = (torch.randn(N, B, T, D, device=dev, generator=g) * 2.0).to(dtype)
    query = (torch.randn(D, device=dev, generator=g) * 0.3).to(dtype)
    grad = torch.randn(B, T, D, device=dev, generator=g).to(dtype)
    fwd_bytes = (N * R * D + R * D + D) * elem
    bwd_bytes = (2 * N * R * D + R * D + 2 * D) * elem  # read sources + grad, write grad_sources
    rtol, atol = _tolerances(dtype)
    shape = f"N={N} B*T={R} D={D} {str(dtype).replace('torch.', '')}"
    out(_row(f"attn_res shape: {shape}", None, None, f"fwd bytes floor {fwd_bytes / 1e6:.1f} MB"))

    # ---- correctness vs float64
    ref = attn_res_float64(sources, query)
    out(_err_row("triton fwd vs float64", attn_res(sources, query), ref, rtol, atol))
    out(_err_row("torch eager fwd vs float64", attn_res_torch(sources, query), ref, rtol, atol))
    x64 = sources.double().requires_grad_(True)
    q64 = query.double().requires_grad_(True)
    attn_res_float64(x64, q64).backward(grad.double())
    dx, dq = K.attn_res_bwd(grad, sources, query, EPS)
    grtol, gatol = (1e-3, 1e-3) if dtype == torch.float32 else (5e-2, 5e-2)
    out(_err_row("triton bwd grad_sources vs float64", dx, x64.grad, grtol, gatol))
    out(_row("check: triton bwd grad_query vs float64", None, None,
             f"max_abs_err={(dq.double() - q64.grad).abs().max().item():.3e} "
             f"(|grad_query| max {q64.grad.abs().max().item():.3e})"))
    del x64, q64, ref

    # ---- forward timings
    compiled = torch.compile(attn_res_torch, fullgraph=True)
    compiled(sources, query)
    ms = _bench_cuda(lambda: attn_res(sources, query))
    out(_row("attn_res fwd: kimi op (Triton)", ms, fwd_bytes))
    ms = _bench_cuda(lambda: K.attn_res_fwd(sources, query, EPS))
    out(_row("attn_res fwd: Triton launcher (no op dispatch)", ms, fwd_bytes))
    ms = _bench_cuda(lambda: attn_res_torch(sources, query))
    out(_row("attn_res fwd: PyTorch eager", ms, fwd_bytes))
    ms = _bench_cuda(lambda: compiled(sources, query))
    out(_row("attn_res fwd: PyTorch torch.compile", ms, fwd_bytes))

    if sweep:
        best = None
        for block_r in (1, 2):
            for warps in (4, 8, 16):
                for stages in ((1, 2, 3, 4) if dev.type == "cuda" else (3,)):
                    name = f"attn_res fwd sweep block_r={block_r} warps={warps} stages={stages}"
                    try:
                        ms = _bench_cuda(lambda: K.attn_res_fwd(sources, query, EPS, block_r=block_r,
                                                                num_warps=warps, num_stages=stages))
                    except Exception as exc:  # a config the compiler refuses: report it, keep going
                        out(_row(name, None, None, f"failed: {exc!r}"[:200]))
                        continue
                    out(_row(name, ms, fwd_bytes))
                    if best is None or ms < best[0]:
                        best = (ms, block_r, warps, stages)
        if best is not None:
            default = K.kernel_config(D, forward=True)
            out(_row("attn_res fwd sweep best", best[0], fwd_bytes,
                     f"block_r={best[1]} num_warps={best[2]} num_stages={best[3]} "
                     f"(default block_r={default[0]} num_warps={default[2]} num_stages={default[3]})"))

    # ---- backward timings
    ms = _bench_cuda(lambda: K.attn_res_bwd(grad, sources, query, EPS))
    out(_row("attn_res bwd: Triton", ms, bwd_bytes))
    # forward + backward (timing a backward alone would need retain_graph=True, which compiled
    # graphs with donated buffers refuse)
    x = sources.clone().requires_grad_(True)
    q = query.clone().requires_grad_(True)
    for name, fn in (("kimi op (Triton fwd + Triton bwd)", attn_res), ("PyTorch eager", attn_res_torch),
                     ("PyTorch torch.compile", compiled)):
        def step(fn=fn):
            return torch.autograd.grad(fn(x, q), (x, q), grad)

        step()
        ms = _bench_cuda(step)
        out(_row(f"attn_res fwd+bwd: {name}", ms, fwd_bytes + bwd_bytes))
    del x, q

    # ---- two-phase inference (one block of S sublayers: N-1 completed sources + a partial sum)
    queries = (torch.randn(S, D, device=dev, generator=g) * 0.3).to(dtype)
    completed, partial = sources[:-1].contiguous(), sources[-1].contiguous()
    p1_bytes = ((N - 1) * R * D + S * R * D + S * D) * elem + 2 * S * R * 4
    ms = _bench_cuda(lambda: attn_res_phase1(completed, queries))
    out(_row(f"attn_res phase1 (S={S}, N={N - 1}): Triton", ms, p1_bytes))
    o, m, l = attn_res_phase1(completed, queries)
    merge_bytes = 3 * R * D * elem + 2 * R * 4 + D * elem
    ms = _bench_cuda(lambda: attn_res_merge(o[0], m[0], l[0], partial, queries[0]))
    out(_row("attn_res merge: Triton", ms, merge_bytes))
    ref = attn_res_float64(sources, queries[0])
    out(_err_row("two-phase (phase1 + merge) vs float64", attn_res_merge(o[0], m[0], l[0], partial, queries[0]), ref,
                 2 * rtol, 2 * atol))
    def single_shot():
        return [attn_res(sources, queries[s]) for s in range(S)]

    def two_phase():
        o, m, l = attn_res_phase1(completed, queries)
        return [attn_res_merge(o[s], m[s], l[s], partial, queries[s]) for s in range(S)]

    single = _bench_cuda(single_shot)
    two = _bench_cuda(two_phase)
    out(_row(f"block of {S} sublayers: {S} x single-shot attn_res", single, None))
    out(_row(f"block of {S} sublayers: phase1 + {S} x merge", two, None))
    return rows


def sublayer_read(report=None, *, Ns=(2, 4, 6, 11), B=1, T=4096, D=2304, dtype=torch.bfloat16, device="cuda",
                  sweep=False):
    """What one AttnRes sublayer pays to read its N sources: the stack of all N into a new [N, B, T, D] tensor
    alone, the op alone on it, both (the model's read before the op took the partial sum apart), the op on the
    N - 1 completed sources stacked once a block with the partial sum passed apart (the model's read now), and the
    plain residual add they replace (bytes: stack 2 N BTD, op (N + 1) BTD, add 3 BTD, 2 bytes each)."""
    bench = _bench_cuda_do_bench if device == "cuda" else _bench_wall
    from kimi_compile.ops.attn_res import attn_res
    from kimi_compile.ops.attn_res import kernel as K

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(D, device=device, dtype=dtype, generator=g)
    rows = []
    for N in Ns:
        srcs = [torch.randn(B, T, D, device=device, dtype=dtype, generator=g) for _ in range(N)]
        stacked = torch.stack(srcs)
        btd = B * T * D * stacked.element_size()
        for name, fn, nbytes in (
                (f"sublayer T={T} N={N}: torch.stack of the sources", lambda: torch.stack(srcs), 2 * N * btd),
                (f"sublayer T={T} N={N}: kimi::attn_res on the stacked sources", lambda: attn_res(stacked, q),
                 (N + 1) * btd),
                (f"sublayer T={T} N={N}: stack + attn_res (the stacked read)", lambda: attn_res(torch.stack(srcs), q),
                 (3 * N + 1) * btd),
                (f"sublayer T={T} N={N}: attn_res, partial apart (the model's read)",
                 lambda: attn_res(stacked[:-1], q, partial=srcs[-1]), (N + 1) * btd),
                (f"sublayer T={T} N={N}: plain residual add", lambda: srcs[0] + srcs[1], 3 * btd),
                (f"sublayer T={T} N={N}: attn_res launcher, partial apart (no op dispatch)",
                 lambda: K.attn_res_fwd(stacked[:-1], q, EPS, srcs[-1]), (N + 1) * btd)):
            if device != "cuda" and "launcher" in name:  # the launcher needs a GPU (or the interpreter)
                continue
            row = _row(name, bench(fn), nbytes)
            rows.append(row)
            _emit(report, row)
        if sweep and device == "cuda":  # launch configurations of the model's read (the launcher: no dispatch timed)
            best = None
            for block_r, warps, stages in itertools.product((1, 2, 4), (4, 8, 16), (2, 3, 4)):
                try:
                    ms = bench(lambda: K.attn_res_fwd(stacked[:-1], q, EPS, srcs[-1], block_r=block_r,
                                                      num_warps=warps, num_stages=stages))
                except Exception:  # a config the compiler refuses
                    continue
                if best is None or ms < best[0]:
                    best = (ms, block_r, warps, stages)
            row = _row(f"sublayer T={T} N={N}: sweep best of the launcher", best[0], (N + 1) * btd,
                       f"block_r={best[1]} num_warps={best[2]} num_stages={best[3]} "
                       f"(default {K.kernel_config(D, forward=True)})")
            rows.append(row)
            _emit(report, row)
    return rows


def cpu_smoke(report=None, *, N=4, B=2, T=33, D=72, dtype=torch.float32):
    """Small CPU run: the PyTorch implementations (and the interpreted Triton kernels when
    TRITON_INTERPRET=1), checked against float64, timed by wall clock."""
    from kimi_compile.ops.attn_res import attn_res, attn_res_merge, attn_res_phase1

    rows = []

    def out(row):
        rows.append(row)
        _emit(report, row)

    g = torch.Generator().manual_seed(0)
    R = B * T
    elem = torch.empty((), dtype=dtype).element_size()
    sources = (torch.randn(N, B, T, D, generator=g) * 2.0).to(dtype)
    query = (torch.randn(D, generator=g) * 0.3).to(dtype)
    fwd_bytes = (N * R * D + R * D + D) * elem
    rtol, atol = _tolerances(dtype)
    ref = attn_res_float64(sources, query)
    out(_err_row("kimi op (CPU) fwd vs float64", attn_res(sources, query), ref, rtol, atol))
    out(_err_row("torch eager fwd vs float64", attn_res_torch(sources, query), ref, rtol, atol))
    queries = (torch.randn(3, D, generator=g) * 0.3).to(dtype)
    o, m, l = attn_res_phase1(sources[:-1], queries)
    out(_err_row("two-phase (CPU) vs float64", attn_res_merge(o[1], m[1], l[1], sources[-1], queries[1]),
                 attn_res_float64(sources, queries[1]), rtol, atol))
    if os.environ.get("TRITON_INTERPRET") == "1":
        from kimi_compile.ops.attn_res import kernel as K

        out(_err_row("Triton fwd (interpreted) vs float64", K.attn_res_fwd(sources, query, EPS), ref, rtol, atol))
    out(_row("attn_res fwd: kimi op (CPU, wall clock)", _bench_wall(lambda: attn_res(sources, query)), fwd_bytes))
    out(_row("attn_res fwd: PyTorch eager (CPU, wall clock)", _bench_wall(lambda: attn_res_torch(sources, query)),
             fwd_bytes))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="small CPU run, no GPU needed")
    parser.add_argument("--no-sweep", action="store_true", help="skip the block_r / num_warps sweep")
    parser.add_argument("--sublayer-read", action="store_true",
                        help="only the model's per-sublayer read at T=4096 and T=1 (stack + op vs op alone; with the "
                             "sweep, the launch configurations of the partial-apart read)")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        cpu_smoke()
        if args.sublayer_read:
            sublayer_read(Ns=(2, 3), T=17, D=72, dtype=torch.float32, device="cpu", sweep=not args.no_sweep)
    elif args.sublayer_read:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --cpu-smoke --sublayer-read")
        sublayer_read(Ns=(4, 11), sweep=not args.no_sweep)
        sublayer_read(Ns=(4, 11), T=1, sweep=not args.no_sweep)  # a decode step's read
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --cpu-smoke")
        run(sweep=not args.no_sweep)


if __name__ == "__main__":
    main()
