"""``kimi::short_conv`` at Kimi-Linear-48B's prefill sizes: the op against its bytes floor, and the kernel's tiles.

The KDA layer's q|k|v conv: ``x [1, T, C]`` bfloat16 with C = 3 x 32 heads x 128 = 12288 channels, width W = 4,
SiLU, a carried state (a prompt piece on top of an earlier one). Bytes = x read once + y written once (the state
and weights are noise): the floor of any implementation, at the copy rate a device-to-device copy gives in the
same process. Times are ``triton.testing.do_bench`` medians (L2 flushed between calls).

``--sweep`` launches :data:`short_conv_kernel` directly with other (BLOCK_T, BLOCK_C, warps) tiles; each tile's
output must equal the op's bit for bit (same per-element arithmetic), else its row says so. On the H200 the default
16 x 128 x 4 warps ran at 1.8-1.9 TB/s, tiles of 8-16 steps as fast, larger ones slower; launching the channel
blocks fastest (whole rows of x read together) changed nothing (docs/benchmarks.md, 2026-12-04).

    python bench/bench_short_conv.py [--tokens 4096 32768] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kimi_compile.ops.short_conv import short_conv  # noqa: E402

C, W = 3 * 32 * 128, 4
DTYPE = torch.bfloat16
SWEEP = [(16, 128, 4), (8, 128, 2), (16, 64, 2), (8, 256, 4), (32, 128, 4), (16, 256, 8), (32, 64, 4),
         (64, 128, 8)]  # (BLOCK_T, BLOCK_C, warps)


def _us(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3


def _copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _us(lambda: dst.copy_(src)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from kimi_compile.ops.short_conv.kernel import short_conv_constexprs, short_conv_kernel

    rows = []

    def add(row: str, us: float, nbytes: int, note: str = "") -> None:
        r = dict(row=row, us=round(us, 1), gbps=round(nbytes / us / 1e3), note=note)
        rows.append(r)
        print(f"| {row} | {r['us']} us | {r['gbps']} GB/s | {note} |", flush=True)

    copy = _copy_gbps()
    print(f"| copy (read + write) | | {copy:.0f} GB/s | |", flush=True)
    rows.append(dict(row="copy", gbps=round(copy)))
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in args.tokens:
        x = torch.randn(1, T, C, generator=g, device="cuda").to(DTYPE)
        w = (torch.rand(C, W, generator=g, device="cuda") - 0.5).to(DTYPE)
        s0 = torch.randn(1, C, W - 1, generator=g, device="cuda").to(DTYPE)
        nbytes = 2 * x.numel() * x.element_size()
        y_ref, _ = short_conv(x, w, None, s0, "silu")
        add(f"short_conv T={T} (op, default tile)", _us(lambda: short_conv(x, w, None, s0, "silu")), nbytes,
            f"floor {nbytes / copy / 1e3:.0f} us")
        if not args.sweep:
            continue
        consts = short_conv_constexprs(C, W, "silu", False, True)
        for bt, bc, warps in SWEEP:
            y = torch.empty_like(x)
            sf = torch.empty_like(s0)
            grid = (triton_cdiv(T, bt), 1, triton_cdiv(C, bc))
            kw = dict(consts, BLOCK_T=bt, BLOCK_C=bc)

            def launch():
                short_conv_kernel[grid](x, w, w, s0, T, C, y, sf, num_warps=warps, **kw)
            try:
                us = _us(launch)
                same = torch.equal(y, y_ref)
                add(f"short_conv kernel T={T} tile ({bt}, {bc}, {warps} warps)", us, nbytes,
                    "" if same else "OUTPUT DIFFERS")
            except Exception as e:  # a tile that does not compile is a row, not the end of the sweep
                print(f"| short_conv kernel T={T} tile ({bt}, {bc}, {warps}) | failed: {type(e).__name__}: {e} |")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


if __name__ == "__main__":
    main()
