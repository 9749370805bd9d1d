"""How far the compiled prefill's logits are from eager ones, with and without layer regions (GPU, bf16).

    python bench/check_compiled_vs_eager.py [--layers 4 27] [--T 4096]

For each depth: one model (Kimi-Linear-48B-A3B widths, random bf16 weights built on the GPU), one prompt, the
last position's logits from an eager forward, from ``compiled_step`` with every layer inlined
(``compile_regions=False``) and with the layers as nested compile regions (``compile_regions=True``); prints
||a - b|| / ||b|| against eager and between the two compiled forms. bf16 runs
of a deep random MoE differ by routing flips between nearly tied experts, so the inlined graph's distance from
eager is the yardstick for the regions' one; the float32 rows (``--fp32-layers``, small depth only) give the
floor without bf16 rounding.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kimi_compile import KimiForCausalLM  # noqa: E402
from kimi_compile.compiled import CompiledStep  # noqa: E402
from kimi_compile.config import kimi_linear_48b_config  # noqa: E402

from check_fp32_parity import rel  # noqa: E402  (bench/, this script's folder)


def one_depth(layers: int, T: int, dtype: torch.dtype, dev: torch.device, make_config=kimi_linear_48b_config) -> None:
    cfg = make_config()
    cfg = cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers],
                      mlp_layer_types=cfg.mlp_layer_types[:layers])
    model = KimiForCausalLM.from_config(cfg, seed=0, dtype=dtype, device=dev,
                                        init_on_device=True).eval()
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev, generator=gen)
    out = {}
    with torch.no_grad():
        out["eager"] = model(ids, None, logits_to_keep=1)[0].float()
        out["eager again"] = model(ids, None, logits_to_keep=1)[0].float()
        for regions in (False, True):
            torch._dynamo.reset()
            model.model.compile_regions = regions
            t = time.time()
            step = CompiledStep(model)
            logits = step(ids, model.empty_state(1), logits_to_keep=1)[0].float()  # .float() waits for it
            name = "compiled, regions" if regions else "compiled, inlined"
            out[name] = logits
            print(f"  {name}: first call {time.time() - t:.1f} s", flush=True)
    ref = out["eager"]
    for name, logits in out.items():
        if name != "eager":
            print(f"layers={layers} T={T} {str(dtype).split('.')[-1]}: {name} vs eager: rel {rel(logits, ref):.3e}, "
                  f"argmax same: {bool(logits.argmax() == ref.argmax())}", flush=True)
    print(f"layers={layers}: regions vs inlined: rel {rel(out['compiled, regions'], out['compiled, inlined']):.3e}",
          flush=True)
    del model
    torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 27])
    ap.add_argument("--fp32-layers", type=int, nargs="*", default=[4])
    ap.add_argument("--T", type=int, default=4096)
    args = ap.parse_args(argv)
    for n in args.fp32_layers:
        one_depth(n, args.T, torch.float32, torch.device("cuda"))
    for n in args.layers:
        one_depth(n, args.T, torch.bfloat16, torch.device("cuda"))


if __name__ == "__main__":
    main()
