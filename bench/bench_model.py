"""Whole-model benchmark: a Kimi-Linear-shaped model, eager vs torch.compile, and the cost of Attention Residuals.

``run(report=None)`` is called by ``bench/run_all.py`` on the H200. The model has the real Kimi-Linear-48B widths
(hidden 2304, KDA of 32 x 128 heads, MLA with a 512 + 64 latent cache, one dense layer then MoE of top-8 experts of
width 1024 plus a shared expert) and the real layer pattern, cut to its first ``layers`` layers (default 8:
``KDA, KDA, KDA, MLA`` twice, layer 0 dense; the full model is 27 layers, 20 KDA + 7 MLA, ``layers=None``), with
only ``num_experts`` (default 32) routed experts instead of 256 so that random bfloat16 weights (drawn on the GPU)
fit comfortably and the compiles stay short (every compile of the 27-layer model costs minutes). Every row name
says the depth (``8L``).

Rows (dicts; ``ref_ms`` = eager, ``ours_ms`` = compiled, ``ratio`` = eager / compiled, unless said otherwise):

* ``prefill B=1 T=4096``: one forward from an empty state, logits of the last position only (``logits_to_keep=1``,
  as generation does); compiled with ``torch.compile(fullgraph=True)`` (default mode) via
  :class:`kimi_compile.compiled.CompiledStep`. ``metric``: tokens/s.
* ``decode B=1`` and ``decode B=32`` at a context of ``ctx`` tokens (default 4096): one decode step (T = 1) from a
  fixed state (random KDA states, random MLA caches of ``ctx`` tokens), eager vs compiled with
  ``mode="reduce-overhead"`` (CUDA graphs). The state tensors are marked static inputs so the CUDA graph reads
  them in place (no copy into graph-owned buffers). The step is repeated on the same state, so every timing is a
  step at exactly ``ctx`` tokens of context. ``metric``: ms/token and tokens/s (= B / step time).
* ``AttnRes S=6 overhead`` (issue 5; ``attn_res_block`` = 6 sublayers per block, as Kimi Linear 48B in the
  paper), each right after its plain row: the same model with Block Attention Residuals (same weights, queries at
  the paper's zero init: the cost does not depend on their values) against the plain-residual model, both
  compiled the same way as above: prefill B=1 T=4096 (default mode) and decode B=1 at ``ctx`` (reduce-overhead
  CUDA graph, the same static state, which has the same layout with and without AttnRes). Here ``ref_ms`` = plain
  compiled, ``ours_ms`` = AttnRes compiled, ``ratio`` = plain / AttnRes (the row keys ``ref_name`` /
  ``ours_name`` say so); ``metric``: the overhead in percent (the paper claims < 2% end to end), with the eager
  overhead for comparison. The two are timed interleaved (3 rounds each, median) to cancel drift. Decode B=32
  comes last (its dynamic-batch graph is one more compile). At reduced depth this *under*-states the overhead of
  the full model: a sublayer of the 8-layer model reads at most 4 sources (about 3 on average, final aggregation
  included) against up to 10 (about 6 on average) in the 27-layer model, and the fixed embedding / lm_head cost is
  a larger part of the 8-layer step.
* a check per compiled row: compiled vs eager logits (max error relative to the largest logit) and compile time.

Note on the functional state: a decode step returns a new MLA cache (``cat(past, new)``), so each step reads and
writes the cache once more than an in-place cache would; the KDA state is read and written once per step anyway.

``report`` may be a callable taking one row, a list to append rows to, or None (rows are printed). Timing on
CUDA: ``triton.testing.do_bench`` median; on CPU: wall-clock median. The last line printed counts the Dynamo
graphs compiled and the time spent compiling (for the device-time budget: about 150 s in all is the target).

CPU smoke test at tiny scale (the tiny built-in 5-layer config, float32, short sequences, default compile mode;
the same compiles as the GPU run)::

    python bench/bench_model.py --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kimi_compile import KimiForCausalLM, tiny_config  # noqa: E402
from kimi_compile.config import kimi_linear_48b_config  # noqa: E402
from kimi_compile.compiled import CompiledStep  # noqa: E402


# ------------------------------------------------------------------------------------------------ helpers

def _emit(report, row):
    if report is None:
        ref = "-" if row.get("ref_ms") is None else f"{row['ref_ms']:.3f}"
        ours = "-" if row.get("ours_ms") is None else f"{row['ours_ms']:.3f}"
        ratio = "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"
        print(f"{row['workload']:<44} {row.get('ref_name', 'eager')} {ref:>10} ms  "
              f"{row.get('ours_name', 'compiled')} {ours:>10} ms  {ratio:>7}  "
              f"{row.get('metric', '')}  {row.get('check', '')}", flush=True)
    elif callable(report):
        report(row)
    else:
        report.append(row)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, cpu_iters=5):
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        except ImportError:
            pass
        times = []
        for _ in range(3):
            fn()
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    from kimi_compile.export.ort_benchmark import median_ms

    return median_ms(fn, cpu_iters)


def _random_decode_state(model, batch, ctx, seed):
    """A plausible state after ``ctx`` tokens: random KDA conv / recurrent states, random MLA caches."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    state = {}
    for spec in model.state_specs():
        shape = spec.concrete_shape(batch, ctx)
        scale = {"conv_state": 0.5, "recurrent_state": 0.05, "key": 1.0}[spec.part]
        state[spec.name] = (torch.randn(shape, generator=g, device=model.device, dtype=torch.float32)
                            * scale).to(spec.dtype)
    return state


def _mark_static(state):
    for t in state.values():
        try:
            torch._dynamo.mark_static_address(t)
        except Exception:  # older torch: the CUDA graph then copies the state in; timings include that copy
            return False
    return True


# ------------------------------------------------------------------------------------------------ the benchmark

DEFAULT_LAYERS = 8  # KDA, KDA, KDA, MLA x 2 (layer 0 dense): the real pattern's proportion at a third of the depth


def build_model(tiny: bool, num_experts: int, device, dtype, layers: int | None = DEFAULT_LAYERS,
                attn_res_block: int | None = None):
    """The benchmark model: the tiny built-in config, or Kimi-Linear-48B cut to its first ``layers`` layers (None:
    all 27) with ``num_experts`` experts; Block AttnRes of ``attn_res_block`` sublayers per block if given. Weights
    depend on the seed only: the AttnRes parameters draw no random numbers, so the same shapes with and without
    AttnRes get the same weights."""
    if tiny:
        cfg = tiny_config("kimi_linear")
    else:
        cfg = kimi_linear_48b_config(num_experts=num_experts)
        if layers is not None and layers < cfg.num_hidden_layers:
            cfg = cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers],
                              mlp_layer_types=cfg.mlp_layer_types[:layers])
    cfg = cfg.replace(attn_res_block_size=attn_res_block)
    model = KimiForCausalLM.from_config(cfg, seed=0, dtype=dtype, device=device, init_on_device=True)
    return model.eval().requires_grad_(False)


def _rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _interleaved_ms(fn_a, fn_b, device, rounds=3):
    """Median ms of ``fn_a`` and of ``fn_b``, timed alternately ``rounds`` times each (drift hits both)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(_time_ms(fn_a, device))
        b.append(_time_ms(fn_b, device))
    return statistics.median(a), statistics.median(b)


def _overhead(ref_ms, new_ms):
    return (new_ms / ref_ms - 1.0) * 100.0


@torch.no_grad()
def run(report=None, *, tiny: bool = False, num_experts: int = 32, prefill_T: int | None = None,
        ctx: int | None = None, batches=(1, 32), layers: int | None = DEFAULT_LAYERS,
        attn_res_block: int | None = 6, compile: bool = True, device: str | None = None):
    """Benchmark rows (see the module docstring). ``layers``: depth of the cut model (None: the full 27 layers;
    ignored with ``tiny``). ``attn_res_block``: block size of the AttnRes comparison rows (None: no AttnRes rows;
    they run at B=1, the decode one only when 1 is in ``batches``). Without a GPU and without ``tiny`` it returns
    [] (skipped)."""
    from torch._dynamo.utils import counters

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" and not tiny:
        print("# bench_model: no CUDA device (use --tiny for the CPU smoke test), skipped")
        return []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prefill_T = prefill_T or (4096 if not tiny else 64)
    ctx = ctx or (4096 if not tiny else 32)
    if tiny:
        batches = tuple(min(b, 4) for b in batches)
    rows = []
    compile_s = []  # one entry per compile (first call of a new graph, CUDA-graph recording included)

    def emit(row):
        rows.append(row)
        _emit(report, row)

    def first_calls(fn, n=1):
        t1 = time.time()
        for _ in range(n):
            out = fn()
        _sync(device)
        compile_s.append(time.time() - t1)
        return out, compile_s[-1]

    t_start = time.time()
    graphs_before = counters["stats"]["unique_graphs"]
    model = build_model(tiny, num_experts, device, dtype, layers)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    label = (f"{cfg.num_hidden_layers}L D={cfg.hidden_size} E={cfg.num_experts}"
             f"{' tiny' if tiny else ''} {str(dtype).replace('torch.', '')}")
    print(f"# bench_model: {label}, {n_params / 1e9:.2f} B parameters, built in {time.time() - t_start:.1f}s",
          flush=True)

    # ---------------------------------------------------------------- the AttnRes model (issue 5)
    attn = None
    if attn_res_block is not None:
        attn = build_model(tiny, num_experts, device, dtype, layers, attn_res_block)
        if not torch.equal(attn.lm_head.weight, model.lm_head.weight):  # same seed: should not happen
            attn.load_state_dict(model.state_dict(), strict=False)  # (the AttnRes parameters keep their init)
    tag = f"AttnRes S={attn_res_block} overhead"
    how = "compiled" if compile else "eager"

    def overhead_row(workload, ref_ms, ours_ms, eager_ref_ms, eager_ms, check):
        metric = f"{how} {_overhead(ref_ms, ours_ms):+.2f}% (paper: < 2%)"
        if compile:
            metric += f"; eager {_overhead(eager_ref_ms, eager_ms):+.2f}%"
        emit(dict(workload=workload, ref_ms=ref_ms, ours_ms=ours_ms, ratio=ref_ms / ours_ms, metric=metric,
                  check=check, ref_name="plain", ours_name="AttnRes"))

    # ---------------------------------------------------------------- prefill
    ids = torch.randint(0, cfg.vocab_size, (1, prefill_T), device=device,
                        generator=torch.Generator(device=device).manual_seed(1))
    empty = model.empty_state(1)

    def prefill(m):
        return lambda: m(ids, empty, logits_to_keep=1)

    eager_prefill_ms = _time_ms(prefill(model), device)
    compiled_ms, check, prefill_step = None, "", None
    if compile:
        prefill_step = CompiledStep(model)
        (got, _), secs = first_calls(prefill(prefill_step))
        check = f"max rel err vs eager {_rel_err(got, prefill(model)()[0]):.2e}; compile {secs:.0f}s"
        compiled_ms = _time_ms(prefill(prefill_step), device)
    best = compiled_ms or eager_prefill_ms
    emit(dict(workload=f"model prefill B=1 T={prefill_T} ({label})", ref_ms=eager_prefill_ms, ours_ms=compiled_ms,
              ratio=(eager_prefill_ms / compiled_ms) if compiled_ms else None,
              metric=f"{prefill_T / best * 1e3:,.0f} tok/s (eager {prefill_T / eager_prefill_ms * 1e3:,.0f})",
              check=check))

    if attn is not None:  # the plain compiled prefill above against the AttnRes one
        eager_attn_ms = _time_ms(prefill(attn), device)
        check = "vs plain: same weights, queries 0"
        if compile:
            attn_prefill = CompiledStep(attn)
            (got, _), secs = first_calls(prefill(attn_prefill))
            check = f"max rel err vs eager {_rel_err(got, prefill(attn)()[0]):.2e}; compile {secs:.0f}s"
            ref_ms, ours_ms = _interleaved_ms(prefill(prefill_step), prefill(attn_prefill), device)
            del attn_prefill
        else:
            ref_ms, ours_ms = eager_prefill_ms, eager_attn_ms
        overhead_row(f"{tag} prefill B=1 T={prefill_T} ({label})", ref_ms, ours_ms, eager_prefill_ms,
                     eager_attn_ms, check)
    del ids, empty, prefill_step
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- decode
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    decode_step = CompiledStep(model, mode=mode) if compile else None
    for B in sorted(batches, key=lambda b: b != 1):  # B=1 (and its AttnRes row) first
        state = _random_decode_state(model, B, ctx, seed=2 + B)
        token = torch.randint(0, cfg.vocab_size, (B, 1), device=device,
                              generator=torch.Generator(device=device).manual_seed(3))
        eager_ms = _time_ms(lambda: model(token, state), device)
        compiled_ms, check = None, ""
        if decode_step is not None:
            static = _mark_static(state) if device.type == "cuda" else False
            # compile, then CUDA-graph warm-up and recording
            (got, _), secs = first_calls(lambda: decode_step(token, state), 3)
            check = (f"max rel err {_rel_err(got, model(token, state)[0]):.2e}; compile {secs:.0f}s; mode {mode}"
                     f"{'; static state' if static else ''}")
            compiled_ms = _time_ms(lambda: decode_step(token, state), device)
        best = compiled_ms or eager_ms
        emit(dict(workload=f"model decode B={B} ctx={ctx} ({label})", ref_ms=eager_ms, ours_ms=compiled_ms,
                  ratio=(eager_ms / compiled_ms) if compiled_ms else None,
                  metric=(f"{best:.3f} ms/token-step, {B / best * 1e3:,.0f} tok/s "
                          f"(eager {eager_ms:.3f} ms, {B / eager_ms * 1e3:,.0f} tok/s)"),
                  check=check))

        if attn is not None and B == 1:  # the plain CUDA-graph step against the AttnRes one, same static state
            eager_attn_ms = _time_ms(lambda: attn(token, state), device)
            check = "vs plain: same weights and state, queries 0"
            if compile:
                attn_decode = CompiledStep(attn, mode=mode)
                (got, _), secs = first_calls(lambda: attn_decode(token, state), 3)
                check = (f"max rel err {_rel_err(got, attn(token, state)[0]):.2e}; compile {secs:.0f}s; "
                         f"mode {mode}")
                ref_ms, ours_ms = _interleaved_ms(lambda: decode_step(token, state),
                                                  lambda: attn_decode(token, state), device)
                del attn_decode
            else:
                ref_ms, ours_ms = eager_ms, eager_attn_ms
            overhead_row(f"{tag} decode B=1 ctx={ctx} ({label})", ref_ms, ours_ms, eager_ms, eager_attn_ms, check)
        del state
        if device.type == "cuda":
            torch.cuda.empty_cache()

    graphs = counters["stats"]["unique_graphs"] - graphs_before
    each = f" ({', '.join(f'{s:.0f}' for s in compile_s)} s)" if compile_s else ""
    print(f"# bench_model: {graphs} graphs compiled in {len(compile_s)} first calls, {sum(compile_s):.0f}s "
          f"compiling{each}; {time.time() - t_start:.0f}s in all", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny built-in model (CPU smoke test)")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                    help=f"keep only the first N layers (default {DEFAULT_LAYERS}; 0: all 27)")
    ap.add_argument("--attn-res-block", type=int, default=6,
                    help="block size of the AttnRes overhead rows (default 6; 0: no AttnRes rows)")
    ap.add_argument("--prefill-T", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    if a.tiny and a.device is None:
        a.device = "cpu"
        torch.set_num_threads(1)
    run(None, tiny=a.tiny, num_experts=a.experts, prefill_T=a.prefill_T, ctx=a.ctx, batches=tuple(a.batches),
        layers=a.layers or None, attn_res_block=a.attn_res_block or None, compile=not a.no_compile,
        device=a.device)


if __name__ == "__main__":
    main()
