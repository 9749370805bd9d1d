"""Full-depth Kimi-Linear-48B-A3B on one H200: kimi_compile against transformers 5.18 + FLA, through public APIs.

One process, one device call. Both models are built in GPU memory from the config with random bfloat16 weights
(about 96 GB each, so one at a time: ours first, then transformers'). Rows:

* ``prefill B=1 T=4096 / 32768``: one forward from an empty state, logits of the last position only. Ours through
  ``kimi_compile.compiled.compiled_step`` (torch.compile, dynamic shapes); transformers'
  ``KimiLinearForCausalLM(..., logits_to_keep=1)`` eager with sdpa attention and FLA's KDA kernels.
* ``decode B=1 / 32 / 256 at context 4096``: one decode step. Ours: one replay of
  :class:`kimi_compile.compiled.CUDAGraphDecoder`'s CUDA graph over a random state of 4096 tokens; transformers:
  one eager step after a 4096-token prefill (its MLA cache for B=256 at 4096 tokens is ~150 GB: not run).
* ``generate(backend="compile") 128 new tokens``: ``kimi_compile.generate`` wall time after a first call, and the
  first call's time (compiles included).
* ``--attn-res S``: the model is built with Block Attention Residuals (S sublayers a block) and the prefill and
  decode B=1 rows run twice on the same weights, with AttnRes and with the plain residual stack (the model's
  ``attn_res_block`` switched off, so the AttnRes parameters are simply unused), each compiled the same way, timed
  interleaved; the overhead row gives AttnRes / plain - 1 (issue 19's target: < 2 %).

Each row has its floor: prefill FLOPs over the measured bf16 matmul rate, decode bytes (the weights a step touches,
with the expected number of distinct experts ``E (1 - (1 - 1/E)^(kB))``, plus state and cache) over the measured
copy bandwidth, and the fraction reached. Every row runs under its own time bound (``--row-seconds``); a failed or
cut row prints its error and the rest go on. The table is printed last and written as JSON (``--json``).

    python bench/bench_full_model.py [--layers N] [--skip-hf] [--profile] [--attn-res S] [--json out.json]
        [--compile-regions 0|1] [--moe-decode-slots N]

``--compile-regions 0`` inlines every decoder layer instead of compiling each as a nested compile region
(KimiModel.compile_regions, on by default: one subgraph per layer kind, shorter first compiles);
``--moe-decode-slots N`` moves the threshold below which ``kimi::moe_experts`` takes its Triton decode kernels
(ops/moe: DECODE_MAX_SLOTS; 0 turns them off). Without the flags the package defaults hold; the ``ceilings`` row
records the settings. ``--save-compile-cache FILE`` / ``--load-compile-cache FILE`` save the process's compiled
graphs after our rows / load them before anything compiles (``kimi_compile.compiled``). The prefill row also
gives the compiled last-position logits' distance from an eager forward of the same prompt (``rel_err_vs_eager``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kimi_compile  # noqa: E402
from kimi_compile import KimiForCausalLM  # noqa: E402
from kimi_compile.compiled import CompiledStep, CUDAGraphDecoder, compiled_step  # noqa: E402
from kimi_compile.config import FULL, LINEAR, kimi_linear_48b_config  # noqa: E402
from kimi_compile.model import SwiGLU  # noqa: E402

ROWS: list[dict] = []
T0 = time.time()


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def bounded(seconds: int):
    def _alarm(signum, frame):
        raise RowTimeout(f"row cut at its {seconds} s bound")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def add(row: dict) -> None:
    ROWS.append(row)
    print(f"[{time.time() - T0:6.0f}s] {json.dumps(row, default=str)}", flush=True)


def run_row(name: str, seconds: int, fn) -> None:
    try:
        with bounded(seconds):
            fn()
    except Exception as e:  # noqa: BLE001 -- one failed row must not stop the others
        add(dict(row=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        traceback.print_exc(limit=3)
    finally:
        torch.cuda.synchronize()


def cuda_ms(fn, warmup: int = 2, iters: int = 10) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------------------ ceilings, floors

def ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s), measured here."""
    x = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_ms(lambda: y.copy_(x), iters=20)
    bw = 2 * x.numel() / (ms * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = cuda_ms(lambda: a @ b, iters=20)
    flops = 2 * 8192 ** 3 / (ms * 1e-3)
    del x, y, a, b
    return bw, flops


def print_compile_phases(label: str, top: int = 15) -> None:
    """The slowest compile phases so far (torch._dynamo.utils.compile_times, seconds summed over all graphs):
    where a first call's time goes."""
    phases = []
    for line in torch._dynamo.utils.compile_times(repr="str", aggregate=True).splitlines():
        m = re.match(r"^\s*(\S.*?)[,\s]+([0-9]+\.[0-9]+)\s*$", line)  # CSV, or a tabulate table where installed
        if m:
            phases.append((float(m.group(2)), m.group(1)))
    print(f"## compile phases after {label} (cumulative s): "
          + "; ".join(f"{n} {v:.1f}" for v, n in sorted(phases, reverse=True)[:top]), flush=True)


def param_split(model: KimiForCausalLM) -> dict[str, int]:
    """Parameter counts: routed experts, embedding, lm_head, everything else."""
    out = dict(experts=0, embed=0, lm_head=0, other=0)
    for name, p in model.named_parameters():
        if ".experts.w_" in name:
            out["experts"] += p.numel()
        elif name.endswith("embed_tokens.weight"):
            out["embed"] += p.numel()
        elif name.startswith("lm_head"):
            out["lm_head"] += p.numel()
        else:
            out["other"] += p.numel()
    return out


def decode_bytes(cfg, split: dict[str, int], B: int, ctx: int, distinct: Optional[float] = None) -> float:
    """Bytes one decode step must move: every non-expert weight, the distinct experts (``distinct`` a MoE layer,
    default the expected number under uniform routing), the lm_head, the KDA state read and written, the MLA cache
    read."""
    E, k = cfg.num_experts, cfg.num_experts_per_token
    if distinct is None:
        distinct = E * (1 - (1 - 1 / E) ** (k * B))
    weights = 2 * (split["other"] + split["lm_head"] + split["experts"] * distinct / E)
    n_kda = sum(t == LINEAR for t in cfg.layer_types)
    n_mla = sum(t == FULL for t in cfg.layer_types)
    H, K = cfg.linear_num_heads, cfg.linear_head_dim
    kda_state = n_kda * B * (2 * H * K * K * 4 + 2 * cfg.kda_conv_channels * (cfg.linear_conv_kernel_dim - 1) * 2)
    mla_cache = n_mla * B * (ctx + 1) * cfg.mla_cache_dim * 2
    return weights + kda_state + mla_cache


def routed_distinct(model, dec) -> float:
    """Distinct experts a MoE layer routed to in one eager step on the decoder's buffers (mean over layers):
    random weights route less evenly than uniform, so this is the step's own floor."""
    from kimi_compile.model import Router
    counts = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: counts.append(int(torch.unique(out[0]).numel())))
             for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            model(dec.token, dec.state, logits_to_keep=1, cache_position=dec.position)
    finally:
        for h in hooks:
            h.remove()
    return sum(counts) / max(1, len(counts))


def prefill_flops(cfg, split: dict[str, int], T: int) -> float:
    """Matmul FLOPs of a B=1 prefill of T tokens with last-position logits: active weights per token, MLA causal
    attention in the expanded form, the KDA chunk arithmetic (~5.8 MFLOP a token a layer at H=32, K=V=128)."""
    E, k = cfg.num_experts, cfg.num_experts_per_token
    active = split["other"] + split["experts"] * k / E
    flops = 2 * active * T + 2 * split["lm_head"]
    n_mla = sum(t == FULL for t in cfg.layer_types)
    n_kda = sum(t == LINEAR for t in cfg.layer_types)
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    flops += n_mla * (2 * cfg.num_attention_heads * (T * T / 2) * (qk + v))
    flops += n_kda * T * 0.38e12 / 65536 * (cfg.linear_num_heads / 32)
    return flops


# ------------------------------------------------------------------------------------------------ ours

def build_ours(cfg, args) -> KimiForCausalLM:
    model = KimiForCausalLM.from_config(cfg, seed=0, dtype=torch.bfloat16, device=torch.device("cuda"),
                                        init_on_device=True).eval()
    if args.compile_regions is not None:
        model.model.compile_regions = bool(args.compile_regions)
    return model


def ours(cfg, args, bw, mm) -> None:
    dev = torch.device("cuda")
    t = time.time()
    model = build_ours(cfg, args)
    split = param_split(model)
    add(dict(row="ours build", s=round(time.time() - t, 1), params_b=round(sum(split.values()) / 1e9, 2), **split))
    gen = torch.Generator(device=dev).manual_seed(0)
    V = cfg.vocab_size

    step = compiled_step(model)
    for T in args.prefill:
        def prefill_row(T=T):
            ids = torch.randint(0, V, (1, T), device=dev, generator=gen)
            state = model.empty_state(1)
            with torch.no_grad():
                t = time.time()
                step(ids, state, logits_to_keep=1)
                torch.cuda.synchronize()
                first = time.time() - t
                print_compile_phases(f"prefill T={T}")
                ms = cuda_ms(lambda: step(ids, state, logits_to_keep=1), warmup=1, iters=5)
                got = step(ids, state, logits_to_keep=1)[0].float()
                ref = model(ids, model.empty_state(1), logits_to_keep=1)[0].float()
                rel = ((got - ref).norm() / ref.norm()).item()
            floor = prefill_flops(cfg, split, T) / mm * 1e3
            add(dict(row=f"ours prefill B=1 T={T}", ms=round(ms, 2), first_call_s=round(first, 1),
                     tok_s=round(T / ms * 1e3), floor_ms=round(floor, 2), frac_floor=round(floor / ms, 3),
                     rel_err_vs_eager=f"{rel:.2e}"))
        run_row(f"ours prefill T={T}", args.row_seconds, prefill_row)

    if args.profile and args.prefill:
        def profile_prefill():
            ids = torch.randint(0, V, (1, args.prefill[0]), device=dev, generator=gen)
            state = model.empty_state(1)
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(ids, state, logits_to_keep=1)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40), flush=True)
        run_row("profile prefill", 120, profile_prefill)

    slot_limits = args.moe_decode_slots or [None]
    for B, slots, inline in [(B, n, i) for B in args.decode_batch for n in slot_limits for i in args.swiglu_inline]:
        def decode_row(B=B, slots=slots, inline=inline):
            ctx = args.ctx
            if slots is not None:  # the op reads it when the graph is captured (the compiled graph is the same)
                from kimi_compile.ops import moe
                moe.DECODE_MAX_SLOTS = slots
            for m in model.modules():  # read when the step is traced: each value compiles its own graph
                if isinstance(m, SwiGLU) and inline is not None:
                    m.inline_one_row = bool(inline)
            t = time.time()
            dec = CUDAGraphDecoder(model, B, ctx + 8)
            with torch.no_grad():
                dec.capture()
            capture_s = time.time() - t
            print_compile_phases(f"decode B={B} capture")
            for name, buf in dec.state.items():  # a plausible state after ctx tokens
                if name.endswith(".key"):
                    buf.normal_(generator=gen)
                elif name.endswith("recurrent_state"):
                    buf.normal_(std=0.05, generator=gen)
                else:
                    buf.normal_(generator=gen)
            dec.token.random_(0, V, generator=gen)

            def one():
                dec.position.fill_(ctx)
                dec.graph.replay()
            ms = cuda_ms(one, warmup=3, iters=20)
            floor = decode_bytes(cfg, split, B, ctx) / bw * 1e3
            distinct = routed_distinct(model, dec)  # after the timing: it writes the scratch buffers
            floor_routed = decode_bytes(cfg, split, B, ctx, distinct) / bw * 1e3
            tag = f", MoE decode kernels <= {slots} slots" if len(slot_limits) > 1 else ""
            tag += f", SwiGLU inline {inline}" if len(args.swiglu_inline) > 1 else ""
            add(dict(row=f"ours decode B={B} ctx={ctx} (CUDA graph{tag})", ms=round(ms, 3), tok_s=round(B / ms * 1e3),
                     floor_ms=round(floor, 3), frac_floor=round(floor / ms, 3), compile_capture_s=round(capture_s, 1),
                     routed_experts_per_layer=round(distinct, 1), floor_ms_routed=round(floor_routed, 3),
                     frac_floor_routed=round(floor_routed / ms, 3)))
            if args.profile and B == 1:
                with torch.no_grad(), torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    dec.position.fill_(ctx)
                    dec._step_fn()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40), flush=True)
                # which projection each GEMM is: the host-side ops with their input shapes and their kernels' time
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.no_grad(), torch.profiler.profile(activities=acts, record_shapes=True) as prof:
                    dec.position.fill_(ctx)
                    dec._step_fn()
                    torch.cuda.synchronize()
                print(prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=30),
                      flush=True)
                n, kms, _ = kernel_profile(lambda: (dec.position.fill_(ctx), dec._step_fn()))
                add(dict(row=f"ours decode B={B} step kernels (outside the graph)", kernels=n, kernel_ms=round(kms, 3)))
            del dec
            gc.collect()
            torch.cuda.empty_cache()
        run_row(f"ours decode B={B} slots={slots} swiglu_inline={inline}", args.row_seconds, decode_row)

    def generate_row():
        ids = torch.randint(0, V, (1, args.gen_prompt), device=dev, generator=gen)
        n = args.gen_tokens
        t = time.time()
        kimi_compile.generate(model, ids, n, backend="compile")
        torch.cuda.synchronize()
        first = time.time() - t
        print_compile_phases("the first generate")
        t = time.time()
        out = kimi_compile.generate(model, ids, n, backend="compile")
        torch.cuda.synchronize()
        total = time.time() - t
        t = time.time()
        kimi_compile.generate(model, ids, 1, backend="compile")  # prompt + first token only
        torch.cuda.synchronize()
        prefill_s = time.time() - t
        per_tok = (total - prefill_s) / (n - 1) * 1e3
        add(dict(row=f"ours generate(backend='compile') B=1 prompt={args.gen_prompt} new={n}",
                 total_s=round(total, 3), first_call_s=round(first, 1), ms_per_token=round(per_tok, 3),
                 tok_s=round(n / total, 1), out_shape=list(out.shape)))
    if not args.skip_generate:
        run_row("ours generate", args.row_seconds, generate_row)
    del model, step
    gc.collect()
    torch.cuda.empty_cache()


def interleaved_ms(fns: dict, rounds: int = 3, **kw) -> dict:
    """Median ms of each fn, measured in alternating rounds (the machine drifts; ratios of one run compare)."""
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(cuda_ms(fn, **kw))
    return {name: sorted(v)[len(v) // 2] for name, v in per.items()}


def kernel_profile(fn) -> tuple[int, float, dict]:
    """(kernels launched, their total ms, {kernel name: total us}) of one call of ``fn``."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return (sum(e.count for e in ev), sum(e.self_device_time_total for e in ev) / 1e3,
            {e.key: e.self_device_time_total for e in ev})


def add_profile_diff(row: str, runs: dict) -> None:
    """A row with each variant's kernel count and time, and per later variant the kernels whose time differs most
    from the first variant's."""
    (na, a), *others = runs.items()
    tops = {}
    for nb, b in others:
        diff = {k: b[2].get(k, 0.0) - a[2].get(k, 0.0) for k in set(a[2]) | set(b[2])}
        top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:8]
        tops[f"top_diff_us_{nb}"] = {k[:60]: round(v, 1) for k, v in top}
    add(dict(row=row, **{f"{n}_kernels": r[0] for n, r in runs.items()},
             **{f"{n}_kernel_ms": round(r[1], 3) for n, r in runs.items()}, **tops))


def attn_res_rows(cfg, args) -> None:
    """AttnRes against the plain stack on the same weights: prefill (compiled_step) and decode B=1 (CUDA graph)."""
    dev = torch.device("cuda")
    t = time.time()
    model = build_ours(cfg, args)
    block = model.model.attn_res_block
    add(dict(row=f"attn_res build (block {block})", s=round(time.time() - t, 1)))
    gen = torch.Generator(device=dev).manual_seed(0)
    V = cfg.vocab_size

    def variant(on: bool, inline: str = "none"):
        model.model.attn_res_block = block if on else None
        model.model.attn_res_inline = inline

    # variants: (name, AttnRes on, its reads inline: KimiModel.attn_res_inline)
    inline = args.attn_res_inline
    prefill_variants = [("plain", False, "none"), ("attn_res", True, "none")]
    decode_variants = list(prefill_variants)
    if inline == "all":
        prefill_variants.append(("attn_res_inline", True, "all"))
    if inline in ("decode", "all"):
        decode_variants.append(("attn_res_inline", True, inline))

    for T in args.prefill:
        def prefill_row(T=T):
            ids = torch.randint(0, V, (1, T), device=dev, generator=gen)
            state = model.empty_state(1)
            fns, first = {}, {}
            for name, on, how in prefill_variants:
                variant(on, how)
                step = CompiledStep(model)  # a fresh compile per variant, all dynamic the same way

                def run(step=step, on=on, how=how):
                    variant(on, how)
                    with torch.no_grad():
                        step(ids, state, logits_to_keep=1)
                t = time.time()
                run()
                torch.cuda.synchronize()
                first[name] = round(time.time() - t, 1)
                fns[name] = run
            ms = interleaved_ms(fns, warmup=1, iters=5)
            for name in list(fns)[1:]:
                tag = " (reads inline)" if "inline" in name else ""
                add(dict(row=f"attn_res overhead prefill B=1 T={T}{tag}", plain_ms=round(ms["plain"], 2),
                         attn_res_ms=round(ms[name], 2), overhead=round(ms[name] / ms["plain"] - 1, 4),
                         first_call_s=first))
            if args.profile:
                add_profile_diff(f"attn_res prefill T={T} kernels", {k: kernel_profile(f) for k, f in fns.items()})
        run_row(f"attn_res prefill T={T}", args.row_seconds, prefill_row)

    def decode_row():
        ctx = args.ctx
        decs = {}
        for name, on, how in decode_variants:
            variant(on, how)
            dec = CUDAGraphDecoder(model, 1, ctx + 8)
            with torch.no_grad():
                dec.capture()  # the graph keeps the variant it captured
            for key, buf in dec.state.items():
                buf.normal_(std=0.05 if key.endswith("recurrent_state") else 1.0, generator=gen)
            dec.token.random_(0, V, generator=gen)
            decs[name] = dec

        def replay(dec):
            dec.position.fill_(ctx)
            dec.graph.replay()
        ms = interleaved_ms({k: (lambda d=d: replay(d)) for k, d in decs.items()}, warmup=3, iters=20)
        for name in list(decs)[1:]:
            tag = ", reads inline" if "inline" in name else ""
            add(dict(row=f"attn_res overhead decode B=1 ctx={ctx} (CUDA graph{tag})",
                     plain_ms=round(ms["plain"], 3), attn_res_ms=round(ms[name], 3),
                     overhead=round(ms[name] / ms["plain"] - 1, 4)))
        if args.profile:  # the graph's kernels, launched one by one outside it
            def step_of(dec, on, how):
                def run():
                    variant(on, how)
                    dec.position.fill_(ctx)
                    dec._step_fn()
                return run
            add_profile_diff("attn_res decode step kernels",
                             {n: kernel_profile(step_of(decs[n], on, how)) for n, on, how in decode_variants})
    if 1 in args.decode_batch:
        run_row("attn_res decode B=1", args.row_seconds, decode_row)
    variant(True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ transformers + FLA

def hf_model(cfg):
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    hcfg = KimiLinearConfig(
        num_hidden_layers=cfg.num_hidden_layers,
        layer_types=["full_attention" if t == FULL else "linear_attention" for t in cfg.layer_types])
    hcfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = KimiLinearForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(prev)
    model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("A_log"):
                p.uniform_(0.0, 2.7, generator=gen)
            elif name.endswith("dt_bias"):
                p.uniform_(-6.0, -2.0, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            if b.is_floating_point() and "bias" in name:
                b.normal_(0.0, 0.1, generator=gen)
    return model.eval()


def theirs(cfg, args, bw, mm) -> None:
    try:
        import fla  # noqa: F401
        fla_ok = True
    except Exception as e:  # noqa: BLE001
        fla_ok = f"fla import failed: {e}"
    import transformers
    t = time.time()
    model = hf_model(cfg)
    add(dict(row="transformers build", s=round(time.time() - t, 1), transformers=transformers.__version__,
             fla=fla_ok))
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    V = cfg.vocab_size
    for T in args.prefill:
        def prefill_row(T=T):
            ids = torch.randint(0, V, (1, T), device=dev, generator=gen)
            with torch.no_grad():
                ms = cuda_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=1, iters=3)
            add(dict(row=f"transformers+FLA prefill B=1 T={T}", ms=round(ms, 2), tok_s=round(T / ms * 1e3)))
        run_row(f"hf prefill T={T}", args.row_seconds, prefill_row)
    for B in args.decode_batch:
        if B * args.ctx > 32 * 4096:
            add(dict(row=f"transformers+FLA decode B={B} ctx={args.ctx}",
                     skipped="its per-head MLA cache would not fit beside the model"))
            continue

        def decode_row(B=B):
            ids = torch.randint(0, V, (B, args.ctx), device=dev, generator=gen)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                ms = cuda_ms(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1),
                             warmup=2, iters=8)
            add(dict(row=f"transformers+FLA decode B={B} ctx~{args.ctx} (eager)", ms=round(ms, 3),
                     tok_s=round(B / ms * 1e3)))
        run_row(f"hf decode B={B}", args.row_seconds, decode_row)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="cut the model to its first N layers (default: 27)")
    ap.add_argument("--prefill", type=int, nargs="*", default=[4096, 32768])
    ap.add_argument("--decode-batch", type=int, nargs="*", default=[1, 32, 256])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--gen-prompt", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--row-seconds", type=int, default=240)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print the top CUDA kernels of a prefill and a decode step (with --attn-res: each "
                         "variant's kernel count and the kernels whose time differs)")
    ap.add_argument("--attn-res", type=int, default=None, metavar="S",
                    help="instead of the rows above: AttnRes (block of S sublayers) vs the plain stack, same weights")
    ap.add_argument("--attn-res-inline", choices=("none", "decode", "all"), default="none",
                    help="with --attn-res: also rows with the depth reads inline (KimiModel.attn_res_inline): "
                         "'decode' one-token steps, 'all' prompts too")
    ap.add_argument("--compile-regions", type=int, choices=(0, 1), default=None,
                    help="0: every layer inlined; 1: decoder layers as nested compile regions (KimiModel."
                         "compile_regions; default: the package's, 1)")
    ap.add_argument("--moe-decode-slots", type=int, nargs="+", default=None, metavar="N",
                    help="kimi::moe_experts takes its Triton decode kernels up to N (token, slot) pairs; several "
                         "values: each decode row once per value, re-captured on the same compiled graph")
    ap.add_argument("--swiglu-inline", type=int, nargs="+", choices=(0, 1), default=[None],
                    help="SwiGLU.inline_one_row for the decode rows (B=1 only changes anything; default: the "
                         "package's, on); several values: each decode row once per value, each compiled apart")
    ap.add_argument("--load-compile-cache", metavar="FILE", default=None,
                    help="kimi_compile.compiled.load_compile_cache(FILE) before anything compiles")
    ap.add_argument("--save-compile-cache", metavar="FILE", default=None,
                    help="kimi_compile.compiled.save_compile_cache(FILE) after our rows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.load_compile_cache:
        from kimi_compile.compiled import load_compile_cache
        t = time.time()
        n = load_compile_cache(args.load_compile_cache)
        add(dict(row="compile cache loaded", pieces=n, s=round(time.time() - t, 1)))
    if args.moe_decode_slots is not None:
        from kimi_compile.ops import moe
        moe.DECODE_MAX_SLOTS = args.moe_decode_slots[0]
    cfg = kimi_linear_48b_config()
    if args.layers:
        n = args.layers
        cfg = cfg.replace(num_hidden_layers=n, layer_types=cfg.layer_types[:n], mlp_layer_types=cfg.mlp_layer_types[:n])
    bw, mm = ceilings()
    add(dict(row="ceilings", copy_tb_s=round(bw / 1e12, 2), bf16_tflop_s=round(mm / 1e12), gpu=torch.cuda.get_device_name(),
             torch=torch.__version__, layers=cfg.num_hidden_layers,
             compile_regions=args.compile_regions, moe_decode_slots=args.moe_decode_slots))
    if args.attn_res is not None:
        attn_res_rows(cfg.replace(attn_res_block_size=args.attn_res), args)
    elif not args.skip_ours:
        ours(cfg, args, bw, mm)
    if args.save_compile_cache:
        from kimi_compile.compiled import save_compile_cache
        add(dict(row="compile cache saved", bytes=save_compile_cache(args.save_compile_cache)))
    if not args.skip_hf and args.attn_res is None:
        run_row("transformers", 3 * args.row_seconds, lambda: theirs(cfg, args, bw, mm))
    print("\n| row | ms | tok/s | floor ms | of floor | notes |\n|---|---|---|---|---|---|")
    for r in ROWS:
        notes = {k: v for k, v in r.items() if k not in ("row", "ms", "tok_s", "floor_ms", "frac_floor")}
        print(f"| {r['row']} | {r.get('ms', '')} | {r.get('tok_s', '')} | {r.get('floor_ms', '')} | "
              f"{r.get('frac_floor', '')} | {json.dumps(notes, default=str)} |")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(ROWS, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
