"""Single benchmark entry point: KDA (bench_kda), Attention Residuals (bench_attn_res.run) and the model
(bench_model.run). Prints every row as it is measured, then the whole table; the JSON is rewritten after
each row, so a run cut short keeps what it measured.

    python bench/run_all.py [--sweep] [--quick] [--json out.json] [--parts kda attn_res model train checks]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_kda  # noqa: E402

PARTS = ("kda", "attn_res", "model", "train", "checks")


def _norm(r):
    """One table row from any bench's row dict (bench_attn_res uses name / ms / gbps / note)."""
    metric = r.get("metric", "")
    if not metric and r.get("gbps") is not None:
        metric = f"{r['gbps']:.0f} GB/s"
    out = dict(workload=r.get("workload", r.get("name", "?")), fla_ms=r.get("fla_ms", r.get("ref_ms")),
               ours_ms=r.get("ours_ms", r.get("ms")), ratio=r.get("ratio"), metric=metric,
               check=r.get("check", r.get("correctness", r.get("note", ""))))
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
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                    help="what to run, in this order (default: all; FLA's backward autotuning makes 'train' slow)")
    ap.add_argument("--model-layers", type=int, default=None,
                    help="benchmark model depth (default: bench_model's cut; 0: all 27 layers, minutes of compiling)")
    a = ap.parse_args(argv)
    # a run cut short by `timeout` (SIGTERM) still prints the table of the rows measured so far
    signal.signal(signal.SIGTERM, _stop)
    rows, t0 = [], time.time()

    def add(r, live=True):
        rows.append(_norm(r))
        if live:
            print(bench_kda._fmt(rows[-1]), f"[{time.time() - t0:.0f}s]", flush=True)
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump(rows, f, indent=1, default=str)
            os.replace(a.json + ".tmp", a.json)

    env = None
    try:
        for part in a.parts:
            if part in ("kda", "train", "checks"):
                only = {"kda": ["prefill", "decode"] + (["intra stage", "sweep"] if a.sweep else []),
                        "train": ["fwd+bwd"], "checks": ["checks"]}[part]
                for r in bench_kda.run(sweep=a.sweep, quick=a.quick, only=only):  # bench_kda prints its rows
                    env = r.get("env", env)
                    add(r, live=False)
                continue
            name = "bench_" + part
            try:
                mod = importlib.import_module(name)
                kwargs = {"sweep": a.sweep} if part == "attn_res" else {}
                if part == "model" and a.model_layers is not None:
                    kwargs["layers"] = a.model_layers or None
                mod.run(report=add, **kwargs)
            except Exception as e:  # keep the other rows
                traceback.print_exc()
                add(dict(workload=f"{name} failed", check=f"{type(e).__name__}: {e}"[:300]))
    except KeyboardInterrupt as e:
        add(dict(workload="run cut short", check=str(e)))
    finally:
        print()
        if env:
            print("#", env)
        print(bench_kda.table(rows), flush=True)


if __name__ == "__main__":
    main()
