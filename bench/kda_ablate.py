"""Where the KDA kernels' time goes: time the intra-chunk kernel and the backward chunk kernel with
parts of their work switched off (``_CFG["ablate"]`` / ``_CFG["ablate_bwd"]`` bit masks, results are
wrong on purpose), a few kernel configurations, and per-kernel profiles. GPU only; prints a table.

    python bench/kda_ablate.py [--T 16384] [--bwd-T 8192]

Intra bits: 1 no Akk/Aqk (one plain dot instead), 2 no inverse, 4 no w/qg/kg loop, 8 no u loop,
16 no gate cumsum / block-end reductions. Backward bits: 1 no anchored dA products, 2 no value-side
loop, 4 no key-side value loop.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kda as bk  # noqa: E402

kt, ktb = bk.kt, bk.ktb


def _time(label, fn, cfg):
    base = dict(kt._CFG)
    kt._CFG.update(cfg)
    try:
        fn()
        ms = bk.bench_ms(fn, warmup=5, rep=40)
        print(f"| {label} | {ms:.3f} |", flush=True)
    except Exception as e:  # keep going
        print(f"| {label} | error {type(e).__name__}: {str(e)[:150]} |", flush=True)
    finally:
        kt._CFG.clear()
        kt._CFG.update(base)


def intra_rows(T):
    q, k, v, g, beta, h0 = bk.make_inputs(1, T)
    scale = bk.K ** -0.5

    def intra():
        kt._intermediates(q, k, v, g, beta, scale, None, store_dtype=torch.bfloat16, a_lowp=True,
                          prec="tf32", store_t=False)

    def fwd():
        kt.kda_forward(q, k, v, g, beta, h0, scale, None)

    print(f"\n## intra stage T={T} (ms)\n| variant | ms |\n|---|---|")
    _time("forward total (default)", fwd, {})
    for name, cfg in [("intra default", {}), ("no A (1)", {"ablate": 1}), ("no inverse (2)", {"ablate": 2}),
                      ("no w/qg/kg (4)", {"ablate": 4}), ("no u (8)", {"ablate": 8}),
                      ("no A, no inverse (3)", {"ablate": 3}),
                      ("loads + stores only (31)", {"ablate": 31}),
                      ("inverse subst", {"inverse": "subst"}),
                      ("bk 16", {"intra_bk": 16}), ("maxnreg none", {"intra_maxnreg": None})]:
        _time(name, intra, cfg)


def bwd_rows(T):
    q, k, v, g, beta, h0 = bk.make_inputs(1, T)
    scale = bk.K ** -0.5
    do, dht = torch.randn_like(v), torch.randn_like(h0)

    def bwd():
        ktb.kda_backward(q, k, v, g, beta, h0, scale, None, do, dht)

    print(f"\n## backward T={T} (ms, whole kda_backward)\n| variant | ms |\n|---|---|")
    for name, cfg in [("default", {}), ("no dA products (1)", {"ablate_bwd": 1}),
                      ("no value side (2)", {"ablate_bwd": 2}), ("no key-side value loop (4)", {"ablate_bwd": 4}),
                      ("all three off (7)", {"ablate_bwd": 7}),
                      ("bwd bk 16", {"bwd_bk": 16}), ("bwd bk 64", {"bwd_bk": 64}),
                      ("bwd bk 32 warps 4", {"bwd_warps": 4}), ("inverse subst", {"inverse": "subst"})]:
        _time(name, bwd, cfg)
    from torch.profiler import ProfilerActivity, profile
    bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        bwd()
        torch.cuda.synchronize()
    print(f"\n## profile kda_backward T={T}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--bwd-T", type=int, default=8192)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("# kda_ablate: no CUDA device")
        return
    print("#", bk.env_line(bk.try_fla()))
    intra_rows(a.T)
    bwd_rows(a.bwd_T)


if __name__ == "__main__":
    main()
