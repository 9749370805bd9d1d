"""Train the tiny Kimi Linear + Attention Residuals model on a synthetic copy task, on the CPU, compiled.

Each sequence is ``[BOS, x_1 .. x_L, SEP, x_1 .. x_L]`` with the x drawn uniformly from ``--symbols`` tokens; only
the second copy is labelled (the rest is -100). A model that has not learnt to copy can do no better than the
unigram entropy ``log(symbols)`` nats per labelled token; one that copies (an induction mechanism: find the earlier
occurrence, predict what followed it) drives the loss towards 0. The step is
:class:`kimi_compile.training.TrainStep`: forward + chunked cross-entropy, backward, AdamW, compiled with
``torch.compile(fullgraph=True)``.

    python examples/train_tiny.py                        # 300 steps of the 5-layer model, Inductor
    python examples/train_tiny.py --backend aot_eager --layers 2 --steps 110   # the test's short run
    python examples/train_tiny.py --help

Measured (CPU, a shared and heavily loaded 2-core machine): the default run went from 5.58 to 0.19 nats per
copied token against the unigram entropy log 8 = 2.08; most of its 24 minutes were Inductor's C++ compiles of the
forward + backward and optimizer graphs. The short run (aot_eager: Dynamo + AOTAutograd without Inductor) ends
below 0.75 x the entropy in about a minute there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import kimi_compile
from kimi_compile.training import IGNORE_INDEX, TrainStep, set_activation_checkpointing

BOS, SEP, FIRST_SYMBOL = 1, 3, 4


def copy_batch(batch: int, length: int, symbols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) ``[batch, 2 * length + 2]`` of the copy task; labels -100 outside the second copy."""
    x = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + symbols, (batch, length), generator=gen)
    bos = torch.full((batch, 1), BOS)
    sep = torch.full((batch, 1), SEP)
    ids = torch.cat([bos, x, sep, x], dim=1)
    labels = ids.clone()
    labels[:, : length + 2] = IGNORE_INDEX  # the shifted loss scores position t against labels[t + 1]
    return ids, labels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--length", type=int, default=8, help="tokens per copy (sequence = 2 * length + 2)")
    p.add_argument("--symbols", type=int, default=8, help="alphabet size of the copied tokens")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--attn-res", type=int, default=1, help="AttnRes block size in sublayers (1 = full AttnRes)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers of the tiny model")
    p.add_argument("--backend", default="inductor", help="torch.compile backend, or 'none' for eager")
    p.add_argument("--checkpointing", action="store_true", help="per-layer activation checkpointing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (the tiny model's matrices are too small for more to help)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the loss history and the bound to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.symbols + FIRST_SYMBOL > 256:
        raise ValueError(f"--symbols must be <= {256 - FIRST_SYMBOL} (the tiny vocabulary is 256)")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = kimi_compile.tiny_config("kimi_linear", attn_res_block_size=args.attn_res)
    if args.layers is not None:
        n = args.layers
        cfg = cfg.replace(num_hidden_layers=n, layer_types=cfg.layer_types[:n], mlp_layer_types=cfg.mlp_layer_types[:n])
    model = kimi_compile.KimiForCausalLM.from_config(cfg, seed=args.seed).train()
    if args.checkpointing:
        set_activation_checkpointing(model, True)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(args.lr), weight_decay=0.01)
    compile_kwargs = {} if args.backend == "none" else {"backend": args.backend}
    step = TrainStep(model, opt, compile=args.backend != "none", max_grad_norm=1.0, **compile_kwargs)

    entropy = math.log(args.symbols)
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses: list[float] = []
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(args.steps), desc="train", disable=args.no_progress, file=sys.stderr)
    for i in bar:
        ids, labels = copy_batch(args.batch, args.length, args.symbols, gen)
        losses.append(float(step(ids, labels)))  # the host sync is the progress bar's, once per step
        if i % 10 == 0 or i == args.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", unigram=f"{entropy:.3f}")
    bar.close()
    tail = losses[-max(1, min(20, len(losses) // 5)):]
    result = dict(final_loss=sum(tail) / len(tail), first_loss=losses[0], unigram_entropy=entropy,
                  seconds=time.perf_counter() - t0, steps=args.steps, losses=losses)
    print(f"loss {result['first_loss']:.3f} -> {result['final_loss']:.3f} nats per copied token "
          f"(unigram entropy {entropy:.3f}) in {result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
