"""Training benchmark (issue 22): a training step of a ~1B-parameter Kimi-Linear-shaped model, and KDA fwd+bwd
against FLA.

Rows (each run in its own subprocess under its own time limit, so a crash, an out-of-memory or a hang costs that
row only; the JSON is rewritten after every row; the table is printed last):

* ``step ours compiled`` / ``step ours eager`` / ``step transformers+FLA``: one training step (forward, loss from
  labels, backward, AdamW) at B=1 T=4096, bf16 weights (AdamW state in bf16 too). Ours compiled is
  :class:`kimi_compile.training.TrainStep` (``torch.compile(fullgraph=True)``, loss + backward one graph, AdamW
  another); ours eager the same step uncompiled; transformers 5.18 ``KimiLinearForCausalLM`` with the same widths
  (its own random weights; it uses FLA's ``chunk_kda`` when ``fla`` is importable, its torch conv otherwise, and
  ``sdpa`` attention), loss from ``labels`` (its full float32 logits), eager AdamW. ``metric``: tokens/s;
  ``peak`` the peak allocated memory of a step, ``act/tok`` (peak - allocated before the step) / tokens, the
  activation + gradient memory per token.
* ``step ours compiled AttnRes S=6`` (Block Attention Residuals, 6 sublayers per block as Kimi Linear 48B in the
  paper) and ``step ours compiled ckpt`` (per-layer activation checkpointing); the table adds the AttnRes overhead
  against ``step ours compiled`` (the paper: < 4 % training overhead). At 4 layers the model has 8 sublayers,
  i.e. 2 blocks: the overhead of the 27-layer model is larger (more sources per read).
* ``kda fwd+bwd B=1 T=8192`` and ``B=2 T=4096`` (H=32, K=V=128, bf16): bench_kda.fwdbwd_row, ours (the Triton
  forward + backward kernels) vs FLA ``chunk_kda`` forward + backward; ``ratio`` = FLA / ours (target >= 2).

The model: :func:`kimi_compile.config.kimi_linear_48b_config` widths (hidden 2304, vocab 163840, KDA 32 x 128, MLA
with a 512 + 64 latent, MoE of top-8 experts of width 1024 + 1 shared, layer 0 dense) cut to ``--layers`` (default
4: KDA, KDA, KDA, MLA, the real model's first four) with ``--experts`` routed experts (default 16): 1.33 B
parameters, 0.75 B of them the embedding and lm_head.

    python bench/bench_train.py [--rows ROW ...] [--json out.json] [--row-timeout S] [--layers N] [--experts E]
    python bench/bench_train.py --quick      # CPU smoke run: tiny model, float32, T=64, no KDA rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

STEP_ROWS = ("ours_compiled", "ours_eager", "transformers_fla", "ours_compiled_attn_res", "ours_compiled_ckpt")
KDA_ROWS = ("kda_B1_T8192", "kda_B2_T4096")
ROWS = STEP_ROWS + KDA_ROWS
ATTN_RES_BLOCK = 6


# ------------------------------------------------------------------------------------------------ models

def model_config(args):
    from kimi_compile import tiny_config
    from kimi_compile.config import kimi_linear_48b_config

    if args.quick:
        return tiny_config("kimi_linear")
    cfg = kimi_linear_48b_config(num_experts=args.experts)
    n = args.layers
    return cfg.replace(num_hidden_layers=n, layer_types=cfg.layer_types[:n], mlp_layer_types=cfg.mlp_layer_types[:n])


def hf_model(cfg, dtype, device):
    """transformers' KimiLinearForCausalLM with the widths of ``cfg`` (its own random init)."""
    import torch
    from check_fp32_parity import hf_config  # the one KimiConfig -> KimiLinearConfig mapping of the benches
    from transformers import KimiLinearForCausalLM

    with torch.device(device):
        model = KimiLinearForCausalLM(hf_config(cfg))
    return model.to(dtype).train()


# ------------------------------------------------------------------------------------------------ one row

def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, device, warmup, iters):
    """Median seconds of ``step()`` after ``warmup`` calls (compiles happen there), the peak memory of the timed
    steps and the memory allocated before them (parameters + optimizer state, gradients freed)."""
    import torch
    for _ in range(warmup):
        step()
    _sync(device)
    base = peak = None
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), base, peak


def step_row(name, args):
    import torch
    import kimi_compile
    from kimi_compile.training import TrainStep, set_activation_checkpointing

    device = "cpu" if args.quick else "cuda"
    if args.quick:
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    dtype = torch.float32 if args.quick else torch.bfloat16
    B, T = (1, 64) if args.quick else (args.batch, args.seq)
    cfg = model_config(args)
    if name == "ours_compiled_attn_res":
        cfg = cfg.replace(attn_res_block_size=ATTN_RES_BLOCK)
    t_build = time.perf_counter()
    if name == "transformers_fla":
        import importlib.util
        model = hf_model(cfg, dtype, device)
        note = f"fla {'importable' if importlib.util.find_spec('fla') else 'NOT importable (torch path)'}"
    else:
        model = kimi_compile.KimiForCausalLM.from_config(cfg, 0, dtype=dtype, device=device,
                                                         init_on_device=not args.quick).train()
        note = ""
        if name == "ours_compiled_ckpt":
            set_activation_checkpointing(model, True)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)

    if name == "transformers_fla":
        def step():
            out = model(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        compiled = name.startswith("ours_compiled") and not (args.quick and args.quick_eager)
        train_step = TrainStep(model, opt, compile=compiled, **({"backend": args.quick_backend} if args.quick else {}))

        def step():
            train_step(ids, ids)

    t0 = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - t0
    sec, base, peak = _time_steps(step, device, warmup=args.warmup, iters=args.iters)
    if args.profile and device == "cuda":  # where a step's time goes: its kernels, and the host work between them
        acts = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            step()
            _sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
        events = prof.key_averages()
        kernel_ms = sum(e.self_device_time_total for e in events) / 1e3
        print(f"## profile of one step: {name} (wall {wall_ms:.1f} ms under the profiler, kernels {kernel_ms:.1f} "
              f"ms)\n" + events.table(sort_by="cuda_time_total", row_limit=args.profile), flush=True)
        print(f"## host side of the step: {name}, by self CPU time\n"
              + events.table(sort_by="self_cpu_time_total", row_limit=args.profile), flush=True)
    row = dict(row=name, ms=sec * 1e3, tokens_per_s=B * T / sec, params=n_params, first_step_s=first_s,
               build_s=t0 - t_build, B=B, T=T, note=note)
    if peak is not None:
        row.update(peak_gib=peak / 2 ** 30, act_bytes_per_token=(peak - base) / (B * T))
    return row


def kda_row(name, args):
    import bench_kda

    B, T = {"kda_B1_T8192": (1, 8192), "kda_B2_T4096": (2, 4096)}[name]
    r = bench_kda.fwdbwd_row(T, bench_kda.try_fla(), B=B)
    return dict(row=name, ms=r["ours_ms"], fla_ms=r["fla_ms"], ratio=r["ratio"], note=r["check"])


def run_row(name, args):
    if name in KDA_ROWS:
        return kda_row(name, args)
    return step_row(name, args)


# ------------------------------------------------------------------------------------------------ driver

def _child(args):
    """Run one row in this process and write its dict (or the error) to ``args.row_out``."""
    try:
        row = run_row(args.one, args)
    except BaseException as e:  # noqa: BLE001 -- the parent records any failure as the row's error
        row = dict(row=args.one, error=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-2000:])
    tmp = args.row_out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, args.row_out)


def _run_isolated(name, args, argv_common):
    """The row in a subprocess bounded by ``args.row_timeout`` seconds."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--row-out", out, *argv_common]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.row_timeout, capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired as e:
            return dict(row=name, error=f"timed out after {args.row_timeout} s",
                        tail=((e.stdout or b"")[-800:] if isinstance(e.stdout, bytes) else str(e.stdout or ""))[-800:])
        if not os.path.exists(out):
            return dict(row=name, error=f"exit code {proc.returncode}, no result", tail=tail)
        with open(out) as f:
            row = json.load(f)
        row["wall_s"] = time.perf_counter() - t0
        return row


def _derived(rows):
    """AttnRes overhead and compiled speed-ups from the measured rows."""
    by = {r["row"]: r for r in rows if "ms" in r and r.get("ms")}
    out = []
    base = by.get("ours_compiled")
    if base and "ours_compiled_attn_res" in by:
        over = by["ours_compiled_attn_res"]["ms"] / base["ms"] - 1
        out.append(f"AttnRes S={ATTN_RES_BLOCK} training overhead (compiled): {100 * over:+.1f} % (paper: < 4 %)")
    if base and "ours_compiled_ckpt" in by:
        out.append(f"activation checkpointing: step time x{by['ours_compiled_ckpt']['ms'] / base['ms']:.2f}")
    for other in ("ours_eager", "transformers_fla"):
        if base and other in by:
            out.append(f"compiled vs {other}: {by[other]['ms'] / base['ms']:.2f}x faster")
    return out


def format_table(rows):
    head = f"{'row':<26} {'ms':>9} {'tok/s':>9} {'peak GiB':>9} {'act B/tok':>10} {'FLA ms':>8} {'ratio':>6}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['row']:<26} ERROR {r['error'][:150]}")
            continue

        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(int(fmt.split(".")[0]))
        lines.append(f"{r['row']:<26} {f('ms', '9.2f')} {f('tokens_per_s', '9.0f')} {f('peak_gib', '9.2f')} "
                     f"{f('act_bytes_per_token', '10.0f')} {f('fla_ms', '8.3f')} {f('ratio', '6.2f')}  "
                     f"{r.get('note', '')}"[:220])
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=None, help="rows to run, in order (default: all)")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after each row)")
    p.add_argument("--row-timeout", type=int, default=300, help="seconds per row (compile included)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2, help="steps after the first before timing")
    p.add_argument("--iters", type=int, default=5, help="timed steps (median)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, float32, T=64, no KDA rows")
    p.add_argument("--quick-backend", default="aot_eager", help="torch.compile backend of --quick's compiled rows")
    p.add_argument("--quick-eager", action="store_true", help="--quick: run the compiled rows eagerly")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N CUDA kernels that take most time in one step of each step row")
    p.add_argument("--in-process", action="store_true", help="no subprocess per row (no time bound per row)")
    p.add_argument("--moe-backward", choices=("loop", "grouped_mm"), default=None,
                   help="kimi::moe_experts_backward's CUDA path (ops.moe.BACKWARD_GROUPED_MM; default: the package's)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.moe_backward is not None:  # children get the flag in argv too
        from kimi_compile.ops import moe
        moe.BACKWARD_GROUPED_MM = args.moe_backward == "grouped_mm"
    if args.one:
        return _child(args)
    names = args.rows or (STEP_ROWS if args.quick else ROWS)
    if args.quick:
        names = [n for n in names if n not in KDA_ROWS]
    common = [a for a in argv]
    for flag in ("--rows", "--json"):  # the child gets the model options, not the driver's
        if flag in common:
            i = common.index(flag)
            j = i + 1
            while j < len(common) and not common[j].startswith("--"):
                j += 1
            del common[i:j]
    rows = []
    for name in names:
        print(f"# {name} ...", flush=True)
        if args.in_process:
            try:
                row = run_row(name, args)
            except Exception as e:  # noqa: BLE001
                row = dict(row=name, error=f"{type(e).__name__}: {e}"[:500])
        else:
            row = _run_isolated(name, args, common)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(dict(rows=rows, derived=_derived(rows), args=vars(args)), f, indent=1)
            os.replace(tmp, args.json)
    print()
    print(format_table(rows))
    for line in _derived(rows):
        print(line)
    return rows


if __name__ == "__main__":
    main()
