"""Tensor + expert parallel benchmark: Kimi-Linear-48B-shaped model, TP=1 on one GPU against TP=N on N GPUs.

Run on a 2-GPU host (NCCL)::

    torchrun --nproc-per-node 2 bench/bench_parallel.py

Phase 1 (``--no-tp1`` skips it): rank 0 alone runs the model over a one-rank mesh (the same
:func:`kimi_compile.parallelize` code path) while the other ranks wait at a barrier; phase 2: all ranks run it
over the N-rank mesh. Each phase builds the model on the meta device, parallelizes it, gives each rank storage for
its shards only and fills them with random weights (no rank ever holds the full model), then times:

* ``prefill B=1 T=4096`` / ``T=32768``: one forward from an empty state, logits of the last position only;
  ``torch.compile(fullgraph=True)`` (one graph for both lengths: T is dynamic).
* ``decode B=1/32/256`` at a context of ``--ctx`` tokens (random KDA states, random MLA caches): one step,
  compiled with ``--decode-mode`` (default ``reduce-overhead``: CUDA graphs, NCCL collectives captured inside).

Every row is time-bounded (``--row-budget-s`` of timed repetitions after a warm-up call, at most ``--iters``) and
the whole run stops starting rows past ``--deadline-s`` (rows not run are printed as ``skipped``). A row that
fails (out of memory, ...) prints its error and the run goes on. The table (rank 0) gives the median step time per
TP degree, the speedup TP=1 / TP=N, and the bytes each rank sends into collectives per step (payload of every
``_c10d_functional`` call, counted once in eager mode by a dispatch mode: all-reduces of the hidden states after
o_proj / MoE / embedding, the all-gather of the logits).

Each compile of the full depth costs minutes; to keep each command under a time limit, run the phases apart::

    torchrun --nproc-per-node 1 bench/bench_parallel.py --no-tp1 --json tp1.json      # TP=1, one GPU
    torchrun --nproc-per-node 2 bench/bench_parallel.py --no-tp1 --baseline tp1.json  # TP=2, table with speedups

and/or pick rows (``--prefill-T 4096 32768 --decode-B`` runs the prefill rows only).

Defaults are the issue's: all 27 layers, all 256 experts, bfloat16. ``--layers`` / ``--experts`` cut the model
(every compile of the full depth costs minutes). CPU smoke run (gloo, tiny model, float32)::

    torchrun --nproc-per-node 2 bench/bench_parallel.py --tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kimi_compile import KimiForCausalLM, tiny_config  # noqa: E402
from kimi_compile.compiled import CompiledStep  # noqa: E402
from kimi_compile.config import kimi_linear_48b_config  # noqa: E402
from kimi_compile.parallel import _materialize_sharded, parallelize  # noqa: E402


class CollectiveBytes(TorchDispatchMode):
    """Sums the payload each rank sends into functional collectives (DTensor redistributions included)."""

    NOT_COMMUNICATION = {"wait_tensor", "_wrap_tensor_autograd"}

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("_c10d_functional.") and name.split(".")[1] not in self.NOT_COMMUNICATION:
            t = args[0]
            tensors = t if isinstance(t, (list, tuple)) else [t]
            self.bytes += sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))
            op = name.split(".")[1]
            self.calls[op] = self.calls.get(op, 0) + 1
        return func(*args, **(kwargs or {}))


def build_config(args):
    if args.tiny:
        return tiny_config("kimi_linear")
    cfg = kimi_linear_48b_config(num_experts=args.experts)
    if args.layers < cfg.num_hidden_layers:
        cfg = cfg.replace(num_hidden_layers=args.layers, layer_types=cfg.layer_types[:args.layers],
                          mlp_layer_types=cfg.mlp_layer_types[:args.layers])
    return cfg


@torch.no_grad()
def build_sharded(cfg, mesh, dtype, device, seed):
    """Meta model -> parallelize -> local storage only -> random local shards (norms 1, KDA decay params sane)."""
    with torch.device("meta"):
        model = KimiForCausalLM(cfg)
    parallelize(model, mesh)
    _materialize_sharded(model, dtype, device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            t.uniform_(0.0, math.log(16.0), generator=g)
        elif leaf == "dt_bias":
            t.uniform_(-6.0, -2.0, generator=g)
        elif "norm" in name or leaf.startswith("attn_res_norm"):
            t.fill_(1.0)
        elif name.endswith("conv1d.weight"):
            t.uniform_(-0.5, 0.5, generator=g)
        else:
            t.normal_(0.0, cfg.initializer_range, generator=g)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    return model.eval().requires_grad_(False)


def random_state(model, batch, ctx, seed):
    g = torch.Generator(device=model.device).manual_seed(seed)
    state = {}
    for spec in model.state_specs():
        shape = spec.concrete_shape(batch, ctx)
        scale = {"conv_state": 0.5, "recurrent_state": 0.05, "key": 1.0}[spec.part]
        state[spec.name] = (torch.randn(shape, generator=g, device=model.device) * scale).to(spec.dtype)
    return state


def sync(device, group=None):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group is not None:
        dist.barrier(group=group)


def time_ms(fn, device, group, budget_s, iters):
    """Median ms of ``fn()`` over at most ``iters`` calls within ``budget_s`` (after one warm-up call). Every rank
    runs the same number of calls (rank 0 decides when the budget is spent)."""
    fn()
    sync(device, group)
    times = []
    start_all = time.perf_counter()
    for i in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        stop = torch.tensor([float(time.perf_counter() - start_all > budget_s)], device=device)  # NCCL: on GPU
        if group is not None and dist.get_world_size(group) > 1:
            dist.broadcast(stop, src=dist.get_global_rank(group, 0), group=group)
        if stop.item():
            break
    return statistics.median(times), len(times)


def run_phase(args, cfg, mesh, group, device, dtype, deadline):
    """All rows on ``mesh``; returns {workload: row dict}."""
    tp = mesh.size()
    rows = {}
    model = build_sharded(cfg, mesh, dtype, device, seed=0)
    prefill_step = CompiledStep(model)
    decode_step = CompiledStep(model, mode=args.decode_mode) if args.decode_mode != "default" else prefill_step
    workloads = [("prefill", 1, T) for T in args.prefill_T] + [("decode", B, 1) for B in args.decode_B]
    for kind, B, T in workloads:
        name = f"prefill B={B} T={T}" if kind == "prefill" else f"decode B={B} ctx={args.ctx}"
        if time.monotonic() > deadline:
            rows[name] = {"error": "skipped (deadline)"}
            continue
        try:
            ids = torch.randint(0, cfg.vocab_size, (B, T), device=device,
                                generator=torch.Generator(device=device).manual_seed(B * 7 + T))
            if kind == "prefill":
                def fn_eager():
                    return model(ids, None, logits_to_keep=1)

                def fn():
                    return prefill_step(ids, None, logits_to_keep=1)
            else:
                state = random_state(model, B, args.ctx, seed=B)
                if device.type == "cuda":  # the CUDA graph reads the state in place instead of copying it in
                    for t in state.values():
                        torch._dynamo.mark_static_address(t)

                def fn_eager():
                    return model(ids, state)

                def fn():
                    return decode_step(ids, state)
            with torch.no_grad():
                with CollectiveBytes() as counter:
                    fn_eager()
                t0 = time.perf_counter()
                fn()  # compile (or reuse the graph)
                sync(device, group)
                compile_s = time.perf_counter() - t0
                graphs = int(counters["stats"]["unique_graphs"])
                ms, n = time_ms(fn, device, group, args.row_budget_s, args.iters)
            rows[name] = {"ms": ms, "iters": n, "compile_s": compile_s, "coll_bytes": counter.bytes,
                          "coll_calls": dict(counter.calls), "tokens": B * T, "graphs": graphs}
        except Exception as e:  # noqa: BLE001 -- a failing row is reported, the others still run
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model, prefill_step, decode_step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_table(tp1, tpn, world):
    head = f"{'workload':<26} {'TP=1 ms':>10} {f'TP={world} ms':>10} {'speedup':>8} {f'TP={world} tok/s':>13} " \
           f"{'coll bytes/rank/step':>21}  collectives"
    print(head)
    print("-" * len(head))
    for name in tpn:
        a, b = (tp1 or {}).get(name, {}), tpn[name]
        if "error" in b:
            print(f"{name:<26} {'':>10} {'':>10} {'':>8} {'':>13} {'':>21}  {b['error']}")
            continue
        ms1 = a.get("ms")
        speed = f"{ms1 / b['ms']:.2f}x" if ms1 else "-"
        print(f"{name:<26} {ms1 if ms1 is not None else float('nan'):>10.3f} {b['ms']:>10.3f} {speed:>8} "
              f"{b['tokens'] / b['ms'] * 1e3:>13.0f} {fmt_bytes(b['coll_bytes']):>21}  "
              f"{b['coll_calls']} (iters {b['iters']}, first call {b['compile_s']:.1f} s, graphs so far {b['graphs']})"
              + (f"  TP=1: {a['error']}" if "error" in a else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny built-in model, float32 (CPU smoke run)")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--prefill-T", type=int, nargs="*", default=[4096, 32768])
    p.add_argument("--decode-B", type=int, nargs="*", default=[1, 32, 256])
    p.add_argument("--ctx", type=int, default=1024, help="context of the decode rows (MLA cache length)")
    p.add_argument("--decode-mode", default="reduce-overhead", choices=["default", "reduce-overhead"])
    p.add_argument("--row-budget-s", type=float, default=20.0)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--deadline-s", type=float, default=540.0, help="start no row after this many seconds")
    p.add_argument("--no-tp1", action="store_true", help="skip the one-GPU (TP=1) phase")
    p.add_argument("--json", help="write the rows here (rank 0)")
    p.add_argument("--baseline", help="TP=1 rows from the --json of an earlier 1-process run (with --no-tp1)")
    args = p.parse_args(argv)
    if args.tiny:
        args.prefill_T = sorted({max(8, T // 512) for T in args.prefill_T})  # 4096, 32768 -> 8, 64
        args.ctx = min(args.ctx, 16)
        args.decode_B = sorted({min(B, 4) for B in args.decode_B})
        args.decode_mode = "default"

    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    cuda = torch.cuda.is_available() and not args.tiny
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # the other ranks wait at a barrier through the whole TP=1 phase (compiles included)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(3600.0, 2 * args.deadline_s)))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    cfg = build_config(args)
    deadline = time.monotonic() + args.deadline_s
    world_group = dist.group.WORLD

    tp1 = None
    if not args.no_tp1:
        solo = dist.new_group([0])
        if rank == 0:
            mesh1 = DeviceMesh.from_group(solo, device.type)
            tp1 = run_phase(args, cfg, mesh1, solo, device, dtype, deadline)
        dist.barrier()
    mesh = init_device_mesh(device.type, (world,))
    tpn = run_phase(args, cfg, mesh, world_group, device, dtype, deadline)
    if args.baseline:
        with open(args.baseline) as f:
            tp1 = json.load(f)["tp1"]
    if rank == 0:
        what = "tiny kimi_linear" if args.tiny else f"Kimi-Linear-48B shape, {cfg.num_hidden_layers} layers, " \
                                                    f"{cfg.num_experts} experts"
        print(f"\n{what}, {dtype}, {backend}, {world} ranks ({torch.cuda.get_device_name() if cuda else 'CPU'}); "
              f"decode compile mode {args.decode_mode}")
        print_table(tp1, tpn, world)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"tp1": tpn if world == 1 else tp1, f"tp{world}": tpn, "args": vars(args)}, f, indent=1)
            os.replace(tmp, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
