"""Single benchmark entry point: KDA (bench_kda), and, where present, Attention Residuals
(bench_attn_res.run) and the model (bench_model.run). Prints one table.

    python bench/run_all.py [--sweep] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_kda  # noqa: E402


def _norm(r):
    """Accept rows from other benches with missing keys."""
    out = dict(workload=r.get("workload", "?"), fla_ms=r.get("fla_ms", r.get("ref_ms")),
               ours_ms=r.get("ours_ms"), ratio=r.get("ratio"), metric=r.get("metric", ""),
               check=r.get("check", r.get("correctness", "")))
    if out["ratio"] is None and out["fla_ms"] and out["ours_ms"]:
        out["ratio"] = out["fla_ms"] / out["ours_ms"]
    return out


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    # a run cut short by `timeout` (SIGTERM) still prints the table of the rows measured so far
    signal.signal(signal.SIGTERM, _stop)
    rows = []
    try:
        # cheap rows first; FLA's backward autotuning compiles for minutes, so training rows come last
        core = ["prefill", "decode"] + (["intra impls", "sweep"] if a.sweep else [])
        rows += bench_kda.run(sweep=a.sweep, quick=a.quick, checks=False, only=core)
        for name in ("bench_attn_res", "bench_model"):
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(mod, "run"):
                try:
                    kwargs = {"sweep": a.sweep} if name == "bench_attn_res" else {}
                    mod.run(report=lambda r: rows.append(_norm(r)), **kwargs)
                except Exception as e:  # keep the KDA table even if another bench fails
                    rows.append(_norm(dict(workload=f"{name} failed", check=f"{type(e).__name__}: {e}"[:200])))
        rows += bench_kda.run(quick=a.quick, only=["fwd+bwd", "checks"])
    except KeyboardInterrupt as e:
        rows.append(_norm(dict(workload="run cut short", check=str(e))))
    finally:
        print()
        if rows and "env" in rows[0]:
            print("#", rows[0]["env"])
        print(bench_kda.table([_norm(r) for r in rows]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
