"""``kimi::moe_experts`` at decode sizes: the Triton decode kernels against the grouped-GEMM path, in a CUDA graph.

One layer of Kimi-Linear-48B's routed experts (E=256, top-8, D=2304, I=1024, bfloat16: 3.6 GB of weights, random),
T = 1, 4, 32 tokens routed by the top-8 of random logits. For each T and path: the op (checks and all) captured
in a CUDA graph, ``triton.testing.do_bench`` median of the replays (it flushes L2 between calls, as the other 25
layers of a decode step would), in us per call, and GB/s = bytes / time with bytes = the distinct experts the
tokens touch x 3 x D x I x 2 (each touched expert's three matrices read once: the floor of any implementation).
A device-to-device copy gives the bandwidth to compare against.

The path is forced through ``kimi_compile.ops.moe.DECODE_MAX_SLOTS`` (the op reads it at each call): a huge
value runs the decode kernels at every T, 0 the grouped GEMM. The check column gives both paths' largest difference
from ``moe_experts_reference``, relative to its largest value. ``--sweep`` also times T=1 through the decode
launcher with a few tile choices (``DecodeBlocks``: gate/up rows x columns / warps, down outputs x columns / warps)
to choose ``decode_blocks``.

``--prefill`` times prefill sizes instead (``--tokens``, default T = 1024, 4096): the op through ``torch._grouped_mm``
against the Triton prefill kernels (``ops/moe/grouped.py``), with ``--sweep`` their tiles at ``--sweep-tokens``
(default 4096).

    python bench/bench_moe.py [--prefill] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kimi_compile.ops import moe  # noqa: E402

E, K, D, I = 256, 8, 2304, 1024
DTYPE = torch.bfloat16
TOKENS = (1, 4, 32)
SWEEP = [  # DecodeBlocks(gate_up_block_i, gate_up_block_d, gate_up_warps, down_block_d, down_block_i, down_warps)
    (16, 256, 4, 4, 128, 4),
    (8, 512, 4, 4, 128, 4),
    (32, 128, 4, 4, 128, 4),
    (16, 512, 8, 4, 256, 8),
    (16, 256, 4, 2, 256, 4),
    (16, 256, 4, 8, 128, 8),
]


def _replay_us(fn) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph (one warm-up call outside the capture)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3


def _copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _replay_us(lambda: dst.copy_(src))
    return 2 * src.numel() / us / 1e3  # read + write


def _inputs(T: int, weights, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, D, generator=g, device="cuda").to(DTYPE)
    logits = torch.randn(T, E, generator=g, device="cuda")
    top, ids = logits.softmax(-1).topk(K, dim=-1)
    return (x, ids, top.float(), *weights)


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _setup(report, metric_header: str):
    """(rows, emit, the E experts' random weights, the measured copy GB/s); ``emit`` appends a row and prints it
    (``report`` None: as a markdown table), or hands it to ``report`` (a callable or a list)."""
    rows = []

    def emit(row):
        rows.append(row)
        if report is None:
            print(f"| {row['workload']} | {row.get('metric', '')} | {row.get('check', '')} |", flush=True)
        elif callable(report):
            report(row)
        else:
            report.append(row)

    if report is None:
        print(f"| workload | {metric_header} | check |\n|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = tuple(torch.randn(shape, generator=g, device="cuda", dtype=DTYPE) * scale
                    for shape, scale in (((E, I, D), D ** -0.5), ((E, I, D), D ** -0.5), ((E, D, I), I ** -0.5)))
    copy = _copy_gbps()
    emit(dict(workload="copy 1 GiB (device to device), read + write", metric=f"{copy:.0f} GB/s"))
    return rows, emit, weights, copy


def run(report=None, tokens=TOKENS, sweep=False):
    """Rows as dicts (run_all.py's keys: workload, ours_ms, ratio, metric, check); ``report`` a callable taking a row,
    a list to append to, or None (rows are printed as a markdown table)."""
    rows, emit, weights, copy = _setup(report, "time, bandwidth")
    saved = moe.DECODE_MAX_SLOTS
    try:
        for T in tokens:
            args = _inputs(T, weights, seed=T)
            distinct = int(torch.unique(args[1]).numel())
            nbytes = distinct * 3 * D * I * DTYPE.itemsize
            ref = moe.moe_experts_reference(*args)
            timing, errs = {}, {}
            for path, threshold in (("decode", 1 << 30), ("grouped_mm", 0)):
                moe.DECODE_MAX_SLOTS = threshold  # read by the op at each call, so also at the capture
                assert moe._forward_path(args[0], args[1], args[3]) == path, (path, T)
                errs[path] = _rel_err(moe.moe_experts(*args), ref)
                timing[path] = _replay_us(lambda: moe.moe_experts(*args))
            for path in ("decode", "grouped_mm"):
                us = timing[path]
                gbps = nbytes / us / 1e3
                emit(dict(workload=f"moe_experts {path} T={T} (k={K}, E={E}, {distinct} experts)", ours_ms=us / 1e3,
                          us=us, gbps=gbps, metric=f"{us:.1f} us, {gbps:.0f} GB/s ({gbps / copy:.0%} of copy)",
                          check=f"max err {errs[path]:.2e}"))
            speedup = timing["grouped_mm"] / timing["decode"]
            emit(dict(workload=f"moe_experts T={T}: grouped_mm time / decode time", ratio=speedup,
                      metric=f"{speedup:.2f}x"))
        if sweep:
            from kimi_compile.ops.moe import decode
            args = _inputs(1, weights, seed=1)
            distinct = int(torch.unique(args[1]).numel())
            nbytes = distinct * 3 * D * I * DTYPE.itemsize
            ref = moe.moe_experts_reference(*args)
            default = dataclasses.astuple(decode.decode_blocks(D, I, K))
            for cfg in [default] + [c for c in SWEEP if c != default]:
                blocks = decode.DecodeBlocks(*cfg)
                err = _rel_err(decode.moe_experts_decode(*args, blocks=blocks), ref)
                us = _replay_us(lambda: decode.moe_experts_decode(*args, blocks=blocks))
                gbps = nbytes / us / 1e3
                emit(dict(workload=f"decode launcher T=1 blocks {cfg}{' (default)' if cfg == default else ''}",
                          ours_ms=us / 1e3, us=us, gbps=gbps, metric=f"{us:.1f} us, {gbps:.0f} GB/s",
                          check=f"max err {err:.2e}"))
    finally:
        moe.DECODE_MAX_SLOTS = saved
    return rows


PREFILL_TOKENS = (1024, 4096)
PREFILL_SWEEP = [  # PrefillBlocks(block_m, gate_up_n, gate_up_k, gate_up_warps, gate_up_stages, down_n, down_k,
    #                            down_warps, down_stages, down_cols_fastest); the default is timed first
    (64, 256, 64, 8, 3, 256, 64, 8, 3, True),
    (128, 128, 64, 8, 3, 256, 64, 8, 3, True),
    (128, 128, 64, 8, 4, 128, 64, 4, 3, True),
]


# each kernel alone at T=4096 (layout, h and y made once): gate/up (block_m, n, k, warps, stages) and down
# (block_m, n, k, warps, stages, column tiles fastest)
GATE_UP_SWEEP = [(64, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                 (128, 128, 32, 8, 4), (128, 64, 64, 4, 4)]
DOWN_SWEEP = [(64, 128, 64, 4, 3, True), (64, 256, 64, 8, 3, True), (64, 128, 64, 4, 3, False),
              (128, 256, 64, 8, 3, True), (128, 128, 64, 4, 3, True), (128, 128, 64, 8, 3, True)]


def _kernel_sweep(emit, args, T, distinct):
    """Time ``_gate_up_kernel`` and ``_down_kernel`` alone per tile set, with the weight bytes each streams."""
    from kimi_compile.ops.moe import grouped
    x, ids, _, w_gate, w_up, w_down = args
    base = grouped.prefill_blocks(D, I)
    layouts = {}
    for which, sweep in (("gate_up", GATE_UP_SWEEP), ("down", DOWN_SWEEP)):
        for cfg in sweep:
            bm = cfg[0]
            if bm not in layouts:
                slot_of_row, block_expert, _ = grouped.align_rows(ids, E, bm)
                R = slot_of_row.numel()
                h = torch.randn(R, I, device="cuda").to(DTYPE)
                layouts[bm] = (slot_of_row, block_expert, h, torch.empty(R, D, dtype=DTYPE, device="cuda"))
            slot_of_row, block_expert, h, y = layouts[bm]
            if which == "gate_up":
                b = dataclasses.replace(base, block_m=bm, gate_up_n=cfg[1], gate_up_k=cfg[2], gate_up_warps=cfg[3],
                                        gate_up_stages=cfg[4])
                fn, nbytes = (lambda: grouped.launch_gate_up(x, slot_of_row, block_expert, w_gate, w_up, h, K, b),
                              2 * distinct * D * I * DTYPE.itemsize)
            else:
                b = dataclasses.replace(base, block_m=bm, down_n=cfg[1], down_k=cfg[2], down_warps=cfg[3],
                                        down_stages=cfg[4], down_cols_fastest=cfg[5])
                fn, nbytes = (lambda: grouped.launch_down(h, block_expert, w_down, y, b),
                              distinct * D * I * DTYPE.itemsize)
            try:
                us = _replay_us(fn)
            except Exception as exc:  # a tile the compiler refuses (shared memory): report it, keep going
                emit(dict(workload=f"{which} kernel alone T={T} {cfg}", metric=f"failed: {exc!r}"[:200]))
                continue
            gbps = nbytes / us / 1e3
            emit(dict(workload=f"{which} kernel alone T={T} {cfg}", ours_ms=us / 1e3, us=us, gbps=gbps,
                      metric=f"{us:.0f} us, weights {gbps:.0f} GB/s"))


def prefill(report=None, tokens=PREFILL_TOKENS, sweep=False, sweep_tokens=4096):
    """Prefill sizes: the op through ``torch._grouped_mm`` against the Triton prefill kernels (``grouped.py``), in
    CUDA graphs, with TFLOP/s (2 x slots x 3 x D x I) and the weight bytes read (distinct experts x 3 x D x I x 2:
    at ~128 rows an expert the kernels are bound by these); ``sweep`` also times ``sweep_tokens`` with other tiles."""
    from kimi_compile.ops.moe import grouped
    rows, emit, weights, copy = _setup(report, "time, rate")
    saved = moe.PREFILL_KERNEL, moe.PREFILL_TRITON_MAX_ROWS
    moe.PREFILL_TRITON_MAX_ROWS = 1 << 30  # the Triton kernels at every size, to time them against grouped_mm

    def rates(T, distinct, us):
        tflops = 2 * T * K * 3 * D * I / us / 1e6
        gbps = distinct * 3 * D * I * DTYPE.itemsize / us / 1e3
        return tflops, gbps, f"{us:.0f} us, {tflops:.0f} TFLOP/s, weights {gbps:.0f} GB/s"

    try:
        for T in tokens:
            args = _inputs(T, weights, seed=T)
            distinct = int(torch.unique(args[1]).numel())
            ref = moe.moe_experts_reference(*args)
            timing = {}
            for path, kernel in (("grouped_mm", "grouped_mm"), ("prefill", "triton")):
                moe.PREFILL_KERNEL = kernel
                assert moe._forward_path(args[0], args[1], args[3]) == path, (path, T)
                err = _rel_err(moe.moe_experts(*args), ref)
                us = timing[path] = _replay_us(lambda: moe.moe_experts(*args))
                tflops, gbps, metric = rates(T, distinct, us)
                emit(dict(workload=f"moe_experts {path} T={T} (k={K}, E={E}, {distinct} experts)", ours_ms=us / 1e3,
                          us=us, tflops=tflops, gbps=gbps, metric=metric, check=f"max err {err:.2e}"))
            ratio = timing["grouped_mm"] / timing["prefill"]
            emit(dict(workload=f"moe_experts T={T}: grouped_mm time / prefill kernels time", ratio=ratio,
                      metric=f"{ratio:.2f}x"))
        if sweep:
            T = sweep_tokens
            args = _inputs(T, weights, seed=T)
            distinct = int(torch.unique(args[1]).numel())
            ref = moe.moe_experts_reference(*args)
            us = _replay_us(lambda: grouped.align_rows(args[1], E, 64))
            emit(dict(workload=f"prefill T={T}: align_rows alone (block_m 64)", us=us, metric=f"{us:.1f} us"))
            _kernel_sweep(emit, args, T, distinct)
            default = dataclasses.astuple(grouped.prefill_blocks(D, I))
            for cfg in [default] + [c for c in PREFILL_SWEEP if c != default]:
                blocks = grouped.PrefillBlocks(*cfg)
                try:
                    err = _rel_err(grouped.moe_experts_prefill(*args, blocks=blocks), ref)
                    us = _replay_us(lambda: grouped.moe_experts_prefill(*args, blocks=blocks))
                except Exception as exc:  # a tile the compiler refuses (shared memory): report it, keep going
                    emit(dict(workload=f"prefill launcher T={T} blocks {cfg}", metric=f"failed: {exc!r}"[:200]))
                    continue
                tflops, gbps, metric = rates(T, distinct, us)
                emit(dict(workload=f"prefill launcher T={T} blocks {cfg}{' (default)' if cfg == default else ''}",
                          ours_ms=us / 1e3, us=us, tflops=tflops, gbps=gbps, metric=metric,
                          check=f"max err {err:.2e}"))
    finally:
        moe.PREFILL_KERNEL, moe.PREFILL_TRITON_MAX_ROWS = saved
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time T=1 with a few decode tile choices")
    ap.add_argument("--prefill", action="store_true",
                    help="prefill sizes instead (grouped_mm vs the Triton prefill kernels; --sweep: their tiles)")
    ap.add_argument("--tokens", type=int, nargs="+", default=list(PREFILL_TOKENS), help="prefill sizes to time")
    ap.add_argument("--sweep-tokens", type=int, default=4096, help="the prefill size --sweep times its tiles at")
    ap.add_argument("--json", default=None, help="write the rows here too")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (it times CUDA graphs)")
    import triton
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = (prefill(tokens=a.tokens, sweep=a.sweep, sweep_tokens=a.sweep_tokens) if a.prefill
            else run(sweep=a.sweep))
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
