"""MLA prompt attention of Kimi-Linear-48B (B=1, 32 heads, q/k head dim 192 = 128 + 64 rope, v head dim 128,
causal, bf16) through the attention kernels PyTorch ships, at T = 4096 and 32768.

The model calls the flash kernel by name with v zero-padded to 192 (flash wants one head dim); this times it
against cuDNN's fused attention (which takes v at 128), the memory-efficient kernel and the default SDPA dispatch,
each on the layout the model has ([B, T, H, d] transposed to [B, H, T, d]). TFLOP/s counts the causal half of
2 T^2 H (192 + 128); the check is each output's largest difference from the flash row's.

    python bench/bench_mla_attention.py [--T 4096 32768] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

H, QK, V = 32, 192, 128


def variants(q, k, v, scale):
    aten = torch.ops.aten
    v_pad = F.pad(v, (0, QK - V))
    return {
        "flash, v padded to 192 (the model's)":
            lambda: aten._scaled_dot_product_flash_attention(q, k, v_pad, 0.0, True, False, scale=scale)[0][..., :V],
        "cudnn, v 128": lambda: aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, True, False, scale=scale)[0],
        "cudnn, v padded to 192": lambda: aten._scaled_dot_product_cudnn_attention(
            q, k, v_pad, None, False, 0.0, True, False, scale=scale)[0][..., :V],
        "efficient, v 128": lambda: aten._scaled_dot_product_efficient_attention(
            q, k, v, None, False, 0.0, True, scale=scale)[0],
        "SDPA default dispatch, v 128": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
    }


def run(Ts=(4096, 32768)):
    import triton.testing
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for T in Ts:
        q, k = (torch.randn(1, T, H, QK, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(2))
        v = torch.randn(1, T, H, V, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        flops = T * T * H * (QK + V)
        ref = None
        for name, fn in variants(q, k, v, QK ** -0.5).items():
            try:
                out = fn()
                ms = triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")
            except Exception as exc:  # a backend that refuses these shapes: report it, keep going
                rows.append(dict(T=T, name=name, error=f"{type(exc).__name__}: {exc}"[:160]))
                print(f"T={T:6d} {name:40s} failed: {rows[-1]['error']}", flush=True)
                continue
            ref = out if ref is None else ref
            err = (out.float() - ref.float()).abs().max().item()
            rows.append(dict(T=T, name=name, ms=ms, tflops=flops / ms / 1e9, max_diff=err))
            print(f"T={T:6d} {name:40s} {ms:9.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  max diff {err:.2e}", flush=True)
        del q, k, v
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mla_attention.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    rows = run(a.T)
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
