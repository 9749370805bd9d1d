"""``load_model(path, *, dtype=None, device="cpu")``: a Kimi checkpoint directory -> :class:`KimiForCausalLM`.

Reads ``config.json`` (hub Kimi Linear, transformers-native KimiLinear, DeepSeek-V3 / Kimi K2) and safetensors
weights, single-file (``model.safetensors``) or sharded (``model.safetensors.index.json``).

Streaming: the model is built on the meta device, every parameter is allocated once on the target device, and
tensors are read one at a time with ``safe_open`` (memory-mapped) and copied into place; routed experts
(``experts.{j}.w1/w2/w3`` or ``gate_proj/up_proj/down_proj``) go straight into their row of the stacked
``[E, I, D]`` / ``[E, D, I]`` parameters and the hub's separate ``q_conv1d / k_conv1d / v_conv1d`` into their rows
of the fused conv weight. No second full copy of the model is ever held.

Accepted names (prefix ``model.`` except ``lm_head.weight``):

* hub Kimi Linear (also what transformers' ``KimiLinearForCausalLM.save_pretrained`` writes in 5.18):
  ``self_attn.{q,k,v}_conv1d.weight [C,1,W]``, ``self_attn.A_log [1,1,H,1]``, ``self_attn.dt_bias``,
  ``self_attn.f_a_proj``..., ``block_sparse_moe.{gate, experts.{j}.w1/w2/w3, shared_experts}``, and the dense
  layer's MLP as ``mlp.*`` or ``block_sparse_moe.*``;
* transformers' in-memory KimiLinear names: ``self_attn.conv1d.weight [3C,1,W]``, ``self_attn.forget_gate.*``,
  ``mlp.experts.gate_up_proj [E,2I,D]``, ``mlp.experts.down_proj [E,D,I]``;
* DeepSeek-V3 / K2: ``mlp.{gate, experts.{j}.{gate,up,down}_proj, shared_experts}``, q-LoRA names; FP8 block
  quantised weights (``weight_scale_inv``, ``quantization_config.weight_block_size``) are dequantised on the fly;
  multi-token-prediction layers (index >= num_hidden_layers, < + num_nextn_predict_layers) are skipped;
* kimi-compile's own parameter names (``experts.w_gate``, ``conv1d.weight [3C,W]``, AttnRes parameters).

Errors: FileNotFoundError for a missing directory / config.json / shard; ValueError naming the tensor and the
file for missing, unexpected, duplicated or mis-shaped tensors, truncated or corrupt safetensors files, and
unknown model_type / architecture.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .config import LINEAR, SPARSE, KimiConfig
from .model import KimiForCausalLM

__all__ = ["load_model", "checkpoint_files"]

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@dataclass
class _Piece:
    """Where (part of) one checkpoint tensor goes: ``param[dst] <- src_fn(tensor)``."""

    param: str
    dst: Union[int, slice]
    shapes: tuple[tuple[int, ...], ...]  # accepted checkpoint shapes
    src_fn: Callable[[Tensor], Tensor] = lambda t: t


def _parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


# ------------------------------------------------------------------------------------------------ files

def _check_safetensors_file(path: str) -> None:
    """Header sanity (size, JSON, offsets within the file) so truncated / corrupt files fail with a clear error."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt safetensors file {path}: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {path}: header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}") from e
    if 8 + n + end > size:
        raise ValueError(f"truncated safetensors file {path}: tensors need {8 + n + end} bytes, the file has {size}")


def checkpoint_files(path: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it (checks that each shard exists)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = {}
        for name, shard in weight_map.items():
            full = os.path.join(path, shard)
            if full not in files.values() and not os.path.isfile(full):
                raise FileNotFoundError(f"shard {shard!r} listed in {index} (for tensor {name!r}) is missing: "
                                        f"{full}")
            files[name] = full
        return files
    if os.path.isfile(single):
        return {None: single}  # resolved after opening
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(others) == 1:
        return {None: os.path.join(path, others[0])}
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


# ------------------------------------------------------------------------------------------------ name mapping

class _Mapper:
    """Resolve checkpoint tensor names to pieces of the model's parameters."""

    def __init__(self, model: KimiForCausalLM, config: KimiConfig) -> None:
        self.cfg = config
        self.params: dict[str, Tensor] = dict(model.named_parameters())
        self.params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.params[name].shape)

    def resolve(self, name: str) -> Optional[list[_Piece]]:
        """Pieces for ``name``; [] to skip it knowingly; None when it is unexpected."""
        cfg = self.cfg
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return []  # tied to model.embed_tokens.weight
        if name.endswith("rotary_emb.inv_freq"):
            return []
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m is None:
            return self._direct(name)
        i, rest = int(m.group(1)), m.group(2)
        if i >= cfg.num_hidden_layers:
            return [] if i < cfg.num_hidden_layers + cfg.num_nextn_predict_layers else None
        p = f"model.layers.{i}."
        if rest.startswith("self_attn."):
            return self._attn(i, p, rest[len("self_attn."):])
        for prefix in ("block_sparse_moe.", "mlp."):
            if rest.startswith(prefix):
                return self._ffn(i, p, rest[len(prefix):])
        return self._direct(p + rest)

    def _direct(self, name: str, alt_shapes: tuple[tuple[int, ...], ...] = ()) -> Optional[list[_Piece]]:
        if name not in self.params:
            return None
        return [_Piece(name, slice(None), (self._shape(name),) + alt_shapes)]

    def _attn(self, i: int, p: str, rest: str) -> Optional[list[_Piece]]:
        cfg = self.cfg
        if cfg.layer_types[i] == LINEAR:
            if rest.startswith("forget_gate."):
                rest = rest[len("forget_gate."):]
            H, K, W = cfg.linear_num_heads, cfg.linear_head_dim, cfg.linear_conv_kernel_dim
            C = H * K
            conv = p + "self_attn.conv1d.weight"
            for j, part in enumerate("qkv"):
                if rest == f"{part}_conv1d.weight":
                    return [_Piece(conv, slice(j * C, (j + 1) * C), ((C, 1, W), (C, W)))]
            if rest == "conv1d.weight":
                return [_Piece(conv, slice(None), ((3 * C, 1, W), (3 * C, W)))]
            if rest == "A_log":
                return self._direct(p + "self_attn.A_log", ((1, 1, H, 1),))
        return self._direct(p + "self_attn." + rest)

    def _ffn(self, i: int, p: str, rest: str) -> Optional[list[_Piece]]:
        cfg = self.cfg
        if cfg.mlp_layer_types[i] != SPARSE:
            return self._direct(p + "mlp." + rest)
        E, I, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        ex = p + "mlp.experts."
        m = re.fullmatch(r"experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight", rest)
        if m is not None:
            j = int(m.group(1))
            if j >= E:
                return None
            which = {"w1": "w_gate", "gate_proj": "w_gate", "w3": "w_up", "up_proj": "w_up",
                     "w2": "w_down", "down_proj": "w_down"}[m.group(2)]
            shape = (D, I) if which == "w_down" else (I, D)
            return [_Piece(ex + which, j, (shape,))]
        if rest == "experts.gate_up_proj":
            return [_Piece(ex + "w_gate", slice(None), ((E, 2 * I, D),), lambda t: t[:, :I]),
                    _Piece(ex + "w_up", slice(None), ((E, 2 * I, D),), lambda t: t[:, I:])]
        if rest == "experts.down_proj":
            return [_Piece(ex + "w_down", slice(None), ((E, D, I),))]
        if rest == "experts.e_score_correction_bias":
            rest = "gate.e_score_correction_bias"
        return self._direct(p + "mlp." + rest)

    def expected_name(self, param: str, row: int) -> str:
        """A checkpoint name that would fill ``param`` row ``row`` (for error messages)."""
        cfg = self.cfg
        kimi = cfg.model_type == "kimi_linear"
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(w_gate|w_up|w_down)", param)
        if m is not None:
            suffix = {"w_gate": ("w1", "gate_proj"), "w_up": ("w3", "up_proj"), "w_down": ("w2", "down_proj")}
            mod, leaf = ("block_sparse_moe", suffix[m.group(2)][0]) if kimi else ("mlp", suffix[m.group(2)][1])
            return f"model.layers.{m.group(1)}.{mod}.experts.{row}.{leaf}.weight"
        if param.endswith("self_attn.conv1d.weight"):
            C = cfg.linear_num_heads * cfg.linear_head_dim
            return param.replace("conv1d.weight", "qkv"[min(row // C, 2)] + "_conv1d.weight")
        if kimi and ".mlp." in param and cfg.mlp_layer_types[int(param.split(".")[2])] == SPARSE:
            return param.replace(".mlp.", ".block_sparse_moe.")
        return param


# ------------------------------------------------------------------------------------------------ loading

def _dequant_fp8(weight: Tensor, scale: Tensor, block: tuple[int, int]) -> Tensor:
    out_f, in_f = weight.shape
    s = scale.float().repeat_interleave(block[0], 0)[:out_f].repeat_interleave(block[1], 1)[:, :in_f]
    return weight.float() * s


def load_model(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
               device: Union[str, torch.device] = "cpu", progress: bool = True,
               moe_combine_with_bias: Optional[bool] = None,
               attn_res_block_size: Optional[int] = None, mesh=None) -> KimiForCausalLM:
    """Load a Kimi Linear / Kimi K2 / DeepSeek-V3 checkpoint directory.

    Args:
        path: directory with ``config.json`` and safetensors weights.
        dtype: model dtype; default the checkpoint's ``torch_dtype`` / ``dtype`` (float32 if absent).
            ``A_log``, ``dt_bias`` and the router bias stay float32 whatever the dtype.
        device: where the parameters are allocated (each tensor is copied there as it is read).
        progress: show a tqdm progress bar.
        moe_combine_with_bias: override :attr:`KimiConfig.moe_combine_with_bias` (None keeps the config's).
        attn_res_block_size: override :attr:`KimiConfig.attn_res_block_size` (None keeps the config's).
        mesh: a 1-D ``DeviceMesh``: load tensor/expert-parallel, each rank reading only its slices
            (:func:`kimi_compile.parallel.load_sharded`).
    """
    if mesh is not None:
        from .parallel import load_sharded
        return load_sharded(path, mesh, dtype=dtype, device=device, progress=progress,
                            moe_combine_with_bias=moe_combine_with_bias, attn_res_block_size=attn_res_block_size)
    from safetensors import SafetensorError, safe_open
    from tqdm.auto import tqdm

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config = KimiConfig.from_json_file(os.path.join(path, "config.json"))
    overrides = {}
    if moe_combine_with_bias is not None:
        overrides["moe_combine_with_bias"] = bool(moe_combine_with_bias)
    if attn_res_block_size is not None:
        overrides["attn_res_block_size"] = attn_res_block_size
    if overrides:
        config = config.replace(**overrides)
    dtype = _parse_dtype(dtype) or _parse_dtype(config.torch_dtype) or torch.float32
    device = torch.device(device)

    files = checkpoint_files(path)
    shard_paths = sorted(set(files.values()))
    for shard in shard_paths:
        _check_safetensors_file(shard)

    with torch.device("meta"):
        model = KimiForCausalLM(config)
    model.materialize_(dtype, device)
    mapper = _Mapper(model, config)
    filled = {name: torch.zeros(max(t.shape[0] if t.dim() else 1, 1), dtype=torch.bool)
              for name, t in mapper.params.items()}
    optional = set()  # AttnRes parameters: absent from ordinary checkpoints, then the paper's init stands
    if config.attn_res_block_size is not None:
        for name in filled:
            if ".attn_res_" in name or name.startswith("model.attn_res_"):
                with torch.no_grad():
                    mapper.params[name].fill_(0.0 if "attn_res_query" in name else 1.0)
                optional.add(name)
    qcfg = config.quantization_config or {}
    block = tuple(qcfg.get("weight_block_size") or (128, 128))

    handles: dict[str, object] = {}

    def handle(shard: str):
        if shard not in handles:
            try:
                handles[shard] = safe_open(shard, framework="pt", device="cpu")
            except SafetensorError as e:
                raise ValueError(f"corrupt or truncated safetensors file {shard}: {e}") from e
        return handles[shard]

    # tensor name -> shard (for single files, read the key list)
    if None in files:
        shard = files[None]
        files = {k: shard for k in handle(shard).keys()}
    else:
        for shard in shard_paths:
            present = set(handle(shard).keys())
            for name, s in files.items():
                if s == shard and name not in present:
                    raise ValueError(f"tensor {name!r} is listed in model.safetensors.index.json for {shard} but "
                                     "the file does not hold it")

    # ---- plan from the headers alone: every problem is reported before any tensor data is read
    unexpected: list[str] = []
    plan: list[tuple[str, str, list[_Piece]]] = []
    for name in sorted((n for n in files if not n.endswith("_scale_inv")), key=lambda n: (files[n], n)):
        shard = files[name]
        pieces = mapper.resolve(name)
        if pieces is None:
            unexpected.append(name)
            continue
        if not pieces:
            continue
        shape = tuple(handle(shard).get_slice(name).get_shape())
        for piece in pieces:
            if shape not in piece.shapes:
                raise ValueError(f"tensor {name!r} in {shard} has shape {list(shape)}, expected "
                                 f"{' or '.join(str(list(s)) for s in piece.shapes)} (for parameter {piece.param})")
            rows = filled[piece.param][piece.dst]
            if bool(rows.any()):
                where = f" row {piece.dst}" if isinstance(piece.dst, int) else ""
                raise ValueError(f"tensor {name!r} in {shard} fills {piece.param}{where}, which another tensor of "
                                 "the checkpoint already fills (duplicate weights)")
            filled[piece.param][piece.dst] = True
        plan.append((name, shard, pieces))
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:8])
        more = f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise ValueError(f"unexpected tensor(s) in checkpoint {path} for a {config.model_type} model with this "
                         f"config.json: {shown}{more}")
    # AttnRes parameters are all-or-nothing: a checkpoint without any of them (an ordinary checkpoint loaded
    # with AttnRes switched on) keeps the paper's init; one that holds some of them must hold all of them.
    if any(bool(filled[name].any()) for name in optional):
        optional = set()
    missing = []
    for name, mask in filled.items():
        if not bool(mask.all()) and name not in optional:
            row = int((~mask).nonzero()[0, 0])
            missing.append(f"{mapper.expected_name(name, row)} (parameter {name})")
    if missing:
        shown = "; ".join(missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"missing tensor(s) in checkpoint {path}: {shown}{more}")

    # ---- stream: one tensor in memory at a time, copied into its place in the preallocated parameters
    bar = tqdm(total=len(plan), desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="tensor",
               disable=not progress)
    try:
        with torch.no_grad():
            for name, shard, pieces in plan:
                try:
                    tensor = handle(shard).get_tensor(name)
                except SafetensorError as e:
                    raise ValueError(f"cannot read tensor {name!r} from {shard}: {e}") from e
                if tensor.dtype in _FP8:
                    scale_name = name + "_scale_inv"
                    if scale_name not in files:
                        raise ValueError(f"FP8 tensor {name!r} in {shard} has no {scale_name!r} to dequantise it")
                    tensor = _dequant_fp8(tensor, handle(files[scale_name]).get_tensor(scale_name), block)
                for piece in pieces:
                    dst = mapper.params[piece.param][piece.dst]
                    dst.copy_(piece.src_fn(tensor).reshape(dst.shape))
                del tensor
                bar.update(1)
    finally:
        bar.close()
        handles.clear()
    return model.eval()
