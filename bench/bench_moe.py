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

    python bench/bench_moe.py [--sweep] [--json out.json]
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


def run(report=None, tokens=TOKENS, sweep=False):
    """Rows as dicts (run_all.py's keys: workload, ours_ms, ratio, metric, check); ``report`` a callable taking a row,
    a list to append to, or None (rows are printed as a markdown table)."""
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
        print("| workload | time, bandwidth | check |\n|---|---|---|")
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = tuple(torch.randn(shape, generator=g, device="cuda", dtype=DTYPE) * scale
                    for shape, scale in (((E, I, D), D ** -0.5), ((E, I, D), D ** -0.5), ((E, D, I), I ** -0.5)))
    copy = _copy_gbps()
    emit(dict(workload="copy 1 GiB (device to device), read + write", metric=f"{copy:.0f} GB/s"))
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also time T=1 with a few decode tile choices")
    ap.add_argument("--json", default=None, help="write the rows here too")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU (it times CUDA graphs)")
    import triton
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = run(sweep=a.sweep)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
