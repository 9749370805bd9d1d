"""fp32 correctness at real widths: kimi_compile and transformers 5.18 (+ FLA) against a float64 CPU reference.

One Kimi-Linear-48B-shaped model (hidden 2304, KDA 32 x 128, MLA 32 heads over a 512 latent, MoE of 1024-wide
experts, top-8, one shared expert) cut to a few layers with the real pattern (default 4: KDA, KDA, KDA, MLA; a
dense MLP first, MoE after), random weights drawn once (seeded; N(0, 0.02) as the models' own init, norms 1, the
FLA init of A_log / dt_bias, a N(0, 0.1) router bias so that expert selection matters). The weights are written by
transformers' ``save_pretrained`` and read by ``kimi_compile.load_model`` (the path tests/test_model_parity.py
checks at tiny widths), so both sides run the same numbers. One prompt of random ids then runs through:

* the reference: kimi_compile in float64 on the CPU (KDA, short conv, MoE on their float64 reference paths);
* ``ours fp32``: kimi_compile in float32 on the device (eager); ``+ tf32``: the same with
  ``torch.backends.cuda.matmul.allow_tf32`` / ``cudnn.allow_tf32`` on; ``compiled`` with ``--compile``;
* ``hf fp32`` variants: transformers ``KimiLinearForCausalLM`` in float32 on the device, as users run it (FLA's
  ``chunk_kda`` when ``fla`` imports, grouped_mm experts, sdpa, torch's default cuDNN TF32), then with single
  switches to localise the difference: cuDNN TF32 off and eager experts ("strict"), FLA's Triton dots in IEEE fp32
  (a subprocess with ``TRITON_F32_DEFAULT=ieee`` and FLA's ``SOLVE_TRIL_DOT_PRECISION`` patched: Triton reads both
  when it first compiles a kernel), and FLA replaced by transformers' own PyTorch ``chunk_kda``;
* ``hf fp64 cpu``: transformers in float64 on the CPU (a cross-check that the reference is transformers' model;
  transformers casts the KDA and its RMSNorms to float32 inside, so agreement is at the 1e-7 level, not 1e-15).

Printed: per variant the relative error of the full logits (norm of the difference over the norm of the
reference), argmax agreement, the last position's and the worst position's relative error, how many tokens chose a
different expert set than the reference in each MoE layer; then each sublayer's output error (which layer kind
diverges first); the smallest top-k margin of the reference's routers (a flip needs an error that large).

    python bench/check_fp32_parity.py [--layers 4] [--experts 32] [--vocab 163840] [-T 512] [--compile]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kimi_compile import load_model  # noqa: E402
from kimi_compile.config import FULL, LINEAR, SPARSE, KimiConfig, kimi_linear_48b_config  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ the model

def model_config(layers: int, experts: int, top_k: int, vocab: int, tiny: bool = False) -> KimiConfig:
    """Kimi-Linear-48B-A3B's shape cut to its first ``layers`` layers (``tiny``: the same layout at CPU-test
    widths: hidden 64, KDA 2 x 16, MLA 4 heads over a 32 latent)."""
    cfg = kimi_linear_48b_config(num_experts=experts, num_experts_per_token=top_k, vocab_size=vocab,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if tiny:
        cfg = cfg.replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, linear_num_heads=2,
                          linear_head_dim=16, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16)
    return cfg.replace(num_hidden_layers=layers, layer_types=cfg.layer_types[:layers],
                       mlp_layer_types=cfg.mlp_layer_types[:layers])


def hf_config(cfg: KimiConfig):
    """transformers' KimiLinearConfig of the same model."""
    from transformers import KimiLinearConfig

    hc = KimiLinearConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_token, n_shared_experts=cfg.num_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, norm_topk_prob=cfg.moe_renormalize, n_group=cfg.n_group,
        topk_group=cfg.topk_group, rms_norm_eps=cfg.rms_norm_eps, linear_num_heads=cfg.linear_num_heads,
        linear_head_dim=cfg.linear_head_dim, linear_conv_kernel_dim=cfg.linear_conv_kernel_dim,
        layer_types=list(cfg.layer_types), mlp_layer_types=list(cfg.mlp_layer_types),
        initializer_range=cfg.initializer_range, tie_word_embeddings=False, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    hc._attn_implementation = "sdpa"
    return hc


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded init of every parameter (name order, one CPU generator), like a fresh model's: weights N(0, std),
    norms 1, the depthwise conv U(+-1/sqrt(W)), A_log = log U(1, 16), dt_bias = softplus^-1(logU(1e-3, 0.1)), the
    router bias N(0, 0.1) (transformers inits it to zero; random, top-k selection is exercised)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        module = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if name.endswith("A_log"):
            val = torch.empty(p.shape).uniform_(1.0, 16.0, generator=g).log()
        elif name.endswith("dt_bias"):
            dt = torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=g).exp().clamp_min(1e-4)
            val = dt + torch.log(-torch.expm1(-dt))
        elif "conv1d" in name:
            bound = 1.0 / math.sqrt(p.shape[-1])
            val = torch.empty(p.shape).uniform_(-bound, bound, generator=g)
        elif "norm" in module:
            val = torch.ones(p.shape)
        else:
            val = torch.randn(p.shape, generator=g) * std
        p.copy_(val)
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        elif b.is_floating_point():
            raise ValueError(f"init_weights: unexpected float buffer {name!r} (it would keep arbitrary values)")


def build_hf(cfg: KimiConfig, seed: int):
    """transformers' KimiLinearForCausalLM of ``cfg`` in float32 on the CPU with :func:`init_weights`."""
    from transformers import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(hf_config(cfg))
    model.to_empty(device="cpu")
    init_weights(model, seed, cfg.initializer_range)
    return model.eval()


def check_same_layout(cfg: KimiConfig, loaded: KimiConfig) -> None:
    """The model load_model built from transformers' config.json is the one asked for."""
    for name in ("hidden_size", "vocab_size", "layer_types", "mlp_layer_types", "num_experts", "num_experts_per_token",
                 "linear_num_heads", "linear_head_dim", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                 "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size", "intermediate_size",
                 "routed_scaling_factor", "rms_norm_eps", "use_rope"):
        if getattr(cfg, name) != getattr(loaded, name):
            raise ValueError(f"config field {name}: asked {getattr(cfg, name)!r}, load_model read "
                             f"{getattr(loaded, name)!r} from transformers' config.json")


# ------------------------------------------------------------------------------------------------ capture

class Capture:
    """Forward hooks recording, per layer, the attention sublayer's and the MLP / MoE sublayer's outputs (float64,
    CPU) and each router's chosen experts (sorted ids). Works on both models (``model.model.layers[i]`` with
    ``self_attn``, ``mlp`` and, for MoE, ``mlp.gate``). ``margins``: also each router's top-k margin (the k-th
    minus the (k+1)-th biased score, recomputed in float64 from the router's input; kimi_compile's router)."""

    def __init__(self, model: torch.nn.Module, margins: bool = False) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            kind = getattr(layer, "kind", None) or getattr(layer, "block_type", None)
            # the attention output is its o_proj output (ours runs MLA as project / cache update / attend)
            self._hook(layer.self_attn.o_proj, f"L{i} {'KDA' if kind == LINEAR else 'MLA'}")
            gate = getattr(layer.mlp, "gate", None)
            self._hook(layer.mlp, f"L{i} {'MoE' if gate is not None else 'MLP'}")
            if gate is not None:
                self.handles.append(gate.register_forward_hook(self._route_hook(f"L{i}", margins)))

    def _hook(self, module, key):
        def hook(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            self.out[key] = t.detach().to("cpu", torch.float64)
        self.handles.append(module.register_forward_hook(hook))

    def _route_hook(self, key, margins):
        def hook(mod, args, out):
            ids = next(t for t in out if t.dtype == torch.int64)  # ours: (ids, w); transformers: (logits, w, ids)
            self.out[f"{key} route"] = ids.detach().sort(-1).values.cpu()
            if margins:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s = torch.sigmoid(F.linear(x, mod.weight.double())) + mod.e_score_correction_bias.double()
                if mod.top_k < s.shape[-1]:
                    top = s.topk(mod.top_k + 1, dim=-1).values
                    self.out[f"{key} margin"] = (top[:, -2] - top[:, -1]).cpu()
                else:  # every expert is chosen: no selection to flip
                    self.out[f"{key} margin"] = torch.full((s.shape[0],), math.inf, dtype=torch.float64)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------------------ switches

@contextlib.contextmanager
def tf32(matmul: bool | None = None, cudnn: bool | None = None):
    """Set torch's TF32 switches (None keeps the current value) and restore them after."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if matmul is not None:
        torch.backends.cuda.matmul.allow_tf32 = matmul
    if cudnn is not None:
        torch.backends.cudnn.allow_tf32 = cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _hf_module(hf):
    return sys.modules[type(hf).__module__]


def hf_kda_impl(hf) -> str:
    """Where transformers' chunk_kda goes: the module of the implementation its wrapper closes over."""
    fn = _hf_module(hf).chunk_kimi_delta_attention
    impl = inspect.getclosurevars(fn).nonlocals.get("implementation", fn)
    return getattr(impl, "__module__", "?")


@contextlib.contextmanager
def hf_settings(hf, *, kda: str, experts: str):
    """transformers with its KDA on FLA (``kda="fla"``, what it picks when fla imports) or on its own PyTorch
    chunk_kda (``"torch"``), and experts ``"grouped_mm"`` (its default) or ``"eager"`` (a per-expert loop)."""
    mod = _hf_module(hf)
    orig = mod.chunk_kimi_delta_attention
    prev_experts = hf.config._experts_implementation
    if kda == "torch":
        torch_fn = inspect.unwrap(orig)
        if torch_fn.__module__ != mod.__name__:
            raise RuntimeError(f"cannot find transformers' PyTorch chunk_kda behind {orig!r}")
        mod.chunk_kimi_delta_attention = torch_fn
    elif kda != "fla":
        raise ValueError(f"kda must be 'fla' or 'torch', got {kda!r}")
    hf.set_experts_implementation(experts)
    try:
        yield
    finally:
        mod.chunk_kimi_delta_attention = orig
        hf.set_experts_implementation(prev_experts)


# ------------------------------------------------------------------------------------------------ runs

@torch.no_grad()
def run_ours(model, ids, capture: bool = True, margins: bool = False, step=None):
    cap = Capture(model, margins) if capture else None
    try:
        logits, _ = (step or model)(ids.to(model.device))
    finally:
        if cap is not None:
            cap.close()
    return logits.detach().cpu(), (cap.out if cap is not None else {})


@torch.no_grad()
def run_hf(hf, ids, capture: bool = True):
    cap = Capture(hf) if capture else None
    try:
        logits = hf(input_ids=ids.to(hf.device), use_cache=False).logits
    finally:
        if cap is not None:
            cap.close()
    return logits.detach().cpu(), (cap.out if cap is not None else {})


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((a.double() - ref).norm() / ref.norm())


def compare(name: str, logits, caps, ref_logits, ref_caps, wall_s: float, note: str = "") -> dict:
    """One row: errors of ``logits`` and the captured sublayers against the reference."""
    d = logits.double() - ref_logits
    per_pos = (d.norm(dim=-1) / ref_logits.norm(dim=-1)).flatten()  # [B*T]
    worst = int(per_pos.argmax())
    row = dict(variant=name, logits_rel=float(d.norm() / ref_logits.norm()),
               argmax_agree=float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean()),
               last_pos_rel=float((d[:, -1].norm(dim=-1) / ref_logits[:, -1].norm(dim=-1)).max()),
               worst_pos_rel=float(per_pos[worst]), worst_pos=worst % logits.shape[1],
               median_pos_rel=float(per_pos.median()), s=round(wall_s, 2))
    if note:
        row["note"] = note
    sub, flips = {}, {}
    for key, ref in ref_caps.items():
        if key not in caps or key.endswith("margin"):
            continue
        if key.endswith("route"):
            flips[key[:-len(" route")]] = int((caps[key] != ref).any(-1).sum())
        else:
            sub[key] = rel(caps[key], ref)
    if sub:
        row["sublayer_rel"] = sub
        first = next((k for k, v in sub.items() if v > 1e-4), None)
        row["first_sublayer_over_1e-4"] = first
    if flips:
        row["route_flips"] = flips
    return row


# ------------------------------------------------------------------------------------------------ the FLA-ieee worker

def fla_ieee_worker(checkpoint: str, ids_path: str, out_path: str) -> None:
    """In a fresh process with TRITON_F32_DEFAULT=ieee: transformers + FLA with every FLA dot in IEEE fp32 (the
    explicit tf32 of FLA's KDA solve_tril patched too), cuDNN TF32 off, eager experts; saves logits and captures."""
    if os.environ.get("TRITON_F32_DEFAULT") != "ieee":
        raise RuntimeError("the FLA-ieee worker needs TRITON_F32_DEFAULT=ieee in its environment")
    import triton.language as tl
    from transformers import KimiLinearForCausalLM
    import fla.ops.kda.chunk_intra as fla_intra

    fla_intra.SOLVE_TRIL_DOT_PRECISION = tl.constexpr("ieee")
    hf = KimiLinearForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    hf = hf.to("cuda").eval()
    ids = torch.load(ids_path)
    t = time.time()
    with tf32(matmul=False, cudnn=False), hf_settings(hf, kda="fla", experts="eager"):
        impl = hf_kda_impl(hf)
        run_hf(hf, ids, capture=False)  # compiles FLA's kernels (ieee) outside the timed run
        t = time.time()
        logits, caps = run_hf(hf, ids)
    torch.save(dict(logits=logits, caps=caps, kda_impl=impl, s=time.time() - t), out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)


def run_fla_ieee(checkpoint: str, ids, workdir: str, timeout: int):
    ids_path, out_path = os.path.join(workdir, "ids.pt"), os.path.join(workdir, "fla_ieee.pt")
    torch.save(ids, ids_path)
    env = dict(os.environ, TRITON_F32_DEFAULT="ieee")
    cmd = [sys.executable, os.path.abspath(__file__), "--fla-ieee-worker", checkpoint, ids_path, out_path]
    subprocess.run(cmd, env=env, check=True, timeout=timeout)
    return torch.load(out_path)


# ------------------------------------------------------------------------------------------------ main

def fla_available() -> bool:
    try:
        import fla  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 -- any import failure means transformers runs without it
        return False


def scratch_dir(nbytes: int):
    """/dev/shm when it has room for twice ``nbytes`` (a container's is often 64 MB), else the default tmp."""
    try:
        if shutil.disk_usage("/dev/shm").free > 2 * nbytes:
            return "/dev/shm"
    except OSError:
        pass
    return None


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.time() - t


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4, help="first N layers of the 27 (default 4: 3 KDA + 1 MLA)")
    ap.add_argument("--experts", type=int, default=32, help="routed experts (the real model has 256)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=163840, help="vocabulary (the real one is 163840)")
    ap.add_argument("-T", "--tokens", type=int, default=512, help="prompt length")
    ap.add_argument("-B", "--batch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the fp32 runs go (default cuda when available)")
    ap.add_argument("--tiny", action="store_true", help="CPU-test widths (hidden 64) with the same layout")
    ap.add_argument("--compile", action="store_true", help="also ours fp32 under torch.compile")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    ap.add_argument("--skip-hf-fp64", action="store_true", help="no transformers float64 CPU cross-check")
    ap.add_argument("--skip-fla-ieee", action="store_true", help="no FLA-in-IEEE subprocess")
    ap.add_argument("--worker-timeout", type=int, default=400)
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    ap.add_argument("--fla-ieee-worker", nargs=3, metavar=("CHECKPOINT", "IDS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fla_ieee_worker:
        fla_ieee_worker(*args.fla_ieee_worker)
        return []

    dev = torch.device(args.device)
    on_cuda = dev.type == "cuda"
    cfg = model_config(args.layers, args.experts, args.top_k, args.vocab, tiny=args.tiny)
    if FULL not in cfg.layer_types or LINEAR not in cfg.layer_types or SPARSE not in cfg.mlp_layer_types:
        log(f"note: layers={args.layers} does not hold both KDA and MLA and a MoE layer ({cfg.layer_types})")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(
        args.seed + 1))
    rows: list[dict] = []
    info = dict(variant="setup", torch=torch.__version__, device=str(dev), layers=cfg.layer_types,
                mlp=cfg.mlp_layer_types, hidden=cfg.hidden_size, experts=cfg.num_experts, vocab=cfg.vocab_size,
                B=args.batch, T=args.tokens, gpu=torch.cuda.get_device_name() if on_cuda else None)
    hf, t = timed(lambda: build_hf(cfg, args.seed))
    with tempfile.TemporaryDirectory(dir=scratch_dir(4 * sum(p.numel() for p in hf.parameters())),
                                     prefix="fp32_parity_") as work:
        ckpt = os.path.join(work, "ckpt")
        import transformers
        info.update(transformers=transformers.__version__, fla=fla_available())
        hf.save_pretrained(ckpt)
        log(f"built and saved the model ({sum(p.numel() for p in hf.parameters()) / 1e9:.2f} B params, {t:.0f} s)")

        ref_model = load_model(ckpt, dtype=torch.float64, progress=False)
        check_same_layout(cfg, ref_model.config)
        (ref_logits, ref_caps), t = timed(lambda: run_ours(ref_model, ids, margins=True))
        ref_logits = ref_logits.double()
        del ref_model
        margins = {k[:-len(" margin")]: float(v.min()) for k, v in ref_caps.items() if k.endswith("margin")}
        info.update(ref_s=round(t, 1), min_route_margin=margins)
        rows.append(info)
        log(f"float64 CPU reference done ({t:.1f} s); smallest top-k margins {margins}")

        kept: dict[str, torch.Tensor] = {}

        def add(name, fn, note="", warmup=False):
            """Run a variant (once untimed first with ``warmup``: Triton / Inductor / FLA compile there) and add
            its row; a failure becomes an error row."""
            try:
                if warmup:
                    fn()
                (logits, caps), s = timed(fn)
            except Exception as e:  # noqa: BLE001 -- one failed variant must not hide the others
                rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:400]}"))
                log(f"{name}: FAILED {rows[-1]['error']}")
                return
            kept[name] = logits
            rows.append(compare(name, logits, caps, ref_logits, ref_caps, s, note))
            r = rows[-1]
            log(f"{name}: logits rel {r['logits_rel']:.3g}, argmax {r['argmax_agree']:.4f}, "
                f"flips {r.get('route_flips')}")

        # ---- ours
        ours = load_model(ckpt, dtype=torch.float32, device=dev, progress=False)
        ours_name = f"ours fp32 {dev.type}"
        add(ours_name, lambda: run_ours(ours, ids), warmup=True)
        if on_cuda:
            with tf32(matmul=True, cudnn=True):
                add(f"{ours_name} + tf32 matmul/cudnn", lambda: run_ours(ours, ids))
        if args.compile:
            from kimi_compile.compiled import compiled_step
            step = compiled_step(ours)
            add(f"{ours_name} compiled", lambda: run_ours(ours, ids, capture=False, step=step), warmup=True)
        del ours
        if on_cuda:
            torch.cuda.empty_cache()

        # ---- transformers
        if not args.skip_hf:
            if not args.skip_hf_fp64:
                hf.double()
                with hf_settings(hf, kda="torch", experts="eager"):
                    add("hf fp64 cpu (torch KDA, eager experts)", lambda: run_hf(hf, ids),
                        note="transformers computes KDA and RMSNorm in float32 inside")
                hf.float()
            hf.to(dev)
            has_fla = "fla" in hf_kda_impl(hf)
            info["hf_kda_impl"] = hf_kda_impl(hf)
            if on_cuda and has_fla:
                with hf_settings(hf, kda="fla", experts="grouped_mm"):
                    add(f"hf fp32 {dev.type} FLA (as users run it)", lambda: run_hf(hf, ids), warmup=True)
                with tf32(matmul=False, cudnn=False), hf_settings(hf, kda="fla", experts="eager"):
                    add(f"hf fp32 {dev.type} FLA, strict (cudnn tf32 off, eager experts)", lambda: run_hf(hf, ids))
            with tf32(matmul=False, cudnn=False), hf_settings(hf, kda="torch", experts="eager"):
                add(f"hf fp32 {dev.type} torch KDA, strict", lambda: run_hf(hf, ids))
            if on_cuda and not has_fla:
                with hf_settings(hf, kda="fla", experts="grouped_mm"):
                    add(f"hf fp32 {dev.type} as users run it (no fla: torch KDA)", lambda: run_hf(hf, ids))
            del hf
            if on_cuda:
                torch.cuda.empty_cache()
            if on_cuda and has_fla and not args.skip_fla_ieee:
                def ieee():
                    got = run_fla_ieee(ckpt, ids, work, args.worker_timeout)
                    return got["logits"], got["caps"]
                add(f"hf fp32 {dev.type} FLA with IEEE dots, strict (subprocess)", ieee,
                    note="TRITON_F32_DEFAULT=ieee, FLA SOLVE_TRIL_DOT_PRECISION=ieee")

        # ours against transformers as users run each (the comparison issue 19 measured)
        users = next((k for k in kept if "as users run it" in k), None)
        if users is not None and ours_name in kept:
            rows.append(dict(variant=f"{ours_name} vs {users}", logits_rel=rel(kept[ours_name], kept[users]),
                             argmax_agree=float((kept[ours_name].argmax(-1) == kept[users].argmax(-1))
                                                .double().mean())))

    print_table(rows)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n" + json.dumps(rows[0], default=str))
    print("\nerrors against kimi_compile float64 on the CPU (same weights, same prompt)\n")
    print("| variant | logits rel. err | argmax agree | last pos rel | worst pos rel (pos) | median pos rel | "
          "route flips | s |\n|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | | | |")
            continue
        fmt = lambda k: f"{r[k]:.3g}" if k in r else ""  # noqa: E731
        worst = f"{r['worst_pos_rel']:.3g} ({r['worst_pos']})" if "worst_pos_rel" in r else ""
        print(f"| {r['variant']} | {fmt('logits_rel')} | {r.get('argmax_agree', 0):.4f} | {fmt('last_pos_rel')} | "
              f"{worst} | {fmt('median_pos_rel')} | {r.get('route_flips', '')} | {r.get('s', '')} |")
    subs = [r for r in rows[1:] if "sublayer_rel" in r]
    if subs:
        keys = list(subs[0]["sublayer_rel"])
        print("\nsublayer outputs, relative error against float64\n")
        print("| sublayer | " + " | ".join(r["variant"] for r in subs) + " |")
        print("|---|" + "---|" * len(subs))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{r['sublayer_rel'].get(k, float('nan')):.3g}" for r in subs) + " |")


if __name__ == "__main__":
    main()
