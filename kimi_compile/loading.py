"""``load_model(path, *, dtype=None, device="cpu")``: a Kimi checkpoint directory -> :class:`KimiForCausalLM`.

Reads ``config.json`` (hub Kimi Linear, transformers-native KimiLinear, DeepSeek-V3 / Kimi K2) and safetensors
weights, single-file (``model.safetensors``) or sharded (``model.safetensors.index.json``).

Streaming: the model is built on the meta device, every parameter is allocated once on the target device, and
tensors are read one at a time with ``safe_open`` (memory-mapped) and copied into place; routed experts
(``experts.{j}.w1/w2/w3`` or ``gate_proj/up_proj/down_proj``) go straight into their row of the stacked
``[E, I, D]`` / ``[E, D, I]`` parameters, the hub's separate ``q_conv1d / k_conv1d / v_conv1d`` into their rows
of the fused conv weight, and KDA's ``q/k/v_proj`` and ``f_a/g_a/b_proj`` into their rows of ``qkv_proj`` and
``gate_in_proj``. No second full copy of the model is ever held.

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
* kimi-compile's own parameter names (``experts.w_gate``, ``conv1d.weight [3C,W]``, ``qkv_proj.weight``,
  ``gate_in_proj.weight``, AttnRes parameters).

Validation before allocation: ``config.json`` is checked first (types, finiteness and the documented
:data:`kimi_compile.config.INT_BOUNDS`), then every safetensors header (size, JSON, dtype, shape and byte span of
each entry, the file size), then the whole plan against the model built on the meta device: names, shapes, dtype
class (an integer tensor where a float parameter is expected is refused, never cast), duplicates, FP8 scales.
Only then are the parameters allocated and the data read. So an absurd size or a bad file fails in milliseconds,
and the largest allocation is bounded by what the files actually hold.

Errors: FileNotFoundError for a missing directory / config.json / shard; ValueError naming the config field, or the
tensor and the file, for everything else: out-of-range or mistyped config values, missing, unexpected, duplicated
(also the same tensor in two shards) or mis-shaped tensors, wrong dtype classes, truncated or corrupt safetensors
files, an index naming a shard outside the checkpoint directory (``../x.safetensors``, an absolute path) or the
same tensor twice, and unknown model_type / architecture.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .config import LINEAR, SPARSE, KimiConfig
from .dtypes import MODEL_DTYPES, parse_dtype
from .model import KimiForCausalLM

__all__ = ["load_model", "checkpoint_files"]

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@dataclass
class _Piece:
    """Where (part of) one checkpoint tensor goes: ``param[dst] <- src_fn(tensor)``."""

    param: str
    dst: Union[int, slice]
    shapes: tuple[tuple[int, ...], ...]  # accepted checkpoint shapes
    src_fn: Callable[[Tensor], Tensor] = lambda t: t


# ------------------------------------------------------------------------------------------------ files

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header

# safetensors dtype tag -> (bytes per element, class); the class must match the parameter's (a float weight stored
# as integers is refused, never cast)
_ST_DTYPES = {"F64": (8, "float"), "F32": (4, "float"), "F16": (2, "float"), "BF16": (2, "float"),
              "F8_E4M3": (1, "float"), "F8_E5M2": (1, "float"),
              "I64": (8, "int"), "I32": (4, "int"), "I16": (2, "int"), "I8": (1, "int"),
              "U64": (8, "int"), "U32": (4, "int"), "U16": (2, "int"), "U8": (1, "int"), "BOOL": (1, "bool")}


@dataclass(frozen=True)
class _Entry:
    """One tensor as a safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        return _ST_DTYPES.get(self.dtype, (0, "unknown"))[1]


def _read_header(path: str) -> dict[str, _Entry]:
    """The tensors a safetensors file declares, checked against the file size before anything is read: the header
    length, JSON, each entry's dtype, shape and offsets (span = elements x element size, inside the file), so that
    truncated and corrupt files fail naming the file and the tensor."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt safetensors file {path}: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"corrupt safetensors file {path}: header is not a JSON object")
    entries: dict[str, _Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, stop)):
                raise TypeError("dtype, shape or data_offsets of the wrong type")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt safetensors file {path}: bad entry for tensor {name!r}: {e}") from e
        itemsize = _ST_DTYPES.get(dtype, (None,))[0]
        if itemsize is not None and stop - begin != math.prod(shape) * itemsize:
            raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} declares shape {list(shape)} "
                             f"{dtype} but {stop - begin} bytes")
        entries[name] = _Entry(dtype, tuple(shape))
        spans.append((begin, stop, name))
    # as safetensors itself: the tensors tile the data area exactly (no overlap, so the declared sizes, and with
    # them what the loader allocates, are bounded by the file size)
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"corrupt safetensors file {path}: tensor {name!r} starts at data byte {begin}, "
                             f"expected {end} (tensors overlap or leave a gap)")
        end = stop
        if 8 + n + end > size:
            raise ValueError(f"truncated safetensors file {path}: tensor {name!r} ends at byte {8 + n + end}, the "
                             f"file has {size} bytes")
    if 8 + n + end != size:
        raise ValueError(f"corrupt safetensors file {path}: {size - 8 - n - end} bytes after the last tensor")
    return entries


def _no_duplicate_keys(where: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{where} lists {key!r} twice")
            seen.add(key)
        return dict(pairs)
    return hook


def checkpoint_files(path: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file holding it (checks that each shard exists and lies inside
    ``path``: an index naming ``../x.safetensors`` or an absolute path is refused)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f, object_pairs_hook=_no_duplicate_keys(index))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"weight_map is a {type(weight_map).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e}") from e
        files = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard.endswith(".safetensors"):
                raise ValueError(f"{index}: tensor {name!r} maps to {shard!r}, not a .safetensors file name")
            rel = os.path.normpath(shard)
            if os.path.isabs(shard) or rel == ".." or rel.startswith(".." + os.sep):
                raise ValueError(f"{index}: shard {shard!r} (for tensor {name!r}) lies outside the checkpoint "
                                 f"directory {path}; shards must be relative paths inside it")
            full = os.path.join(path, rel)
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


def _tensor_files(files: dict, headers: dict[str, dict[str, _Entry]]) -> dict[str, str]:
    """tensor name -> shard, every name held by exactly the shard the index says (and by no other shard)."""
    if None in files:
        shard = files[None]
        return {name: shard for name in headers[shard]}
    holders: dict[str, str] = {}
    for shard in sorted(headers):
        for name in headers[shard]:
            if name in holders:
                raise ValueError(f"tensor {name!r} is in two shards, {holders[name]} and {shard} (duplicate "
                                 "weights: the checkpoint is ambiguous)")
            holders[name] = shard
    for name, shard in files.items():
        if name not in headers[shard]:
            raise ValueError(f"tensor {name!r} is listed in model.safetensors.index.json for {shard} but the file "
                             "does not hold it")
    return files


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
            # the separate input projections fill rows of the two fused ones (KDAAttention's docstring)
            qkv, gates = p + "self_attn.qkv_proj.weight", p + "self_attn.gate_in_proj.weight"
            rows = {"q_proj": (qkv, 0, C), "k_proj": (qkv, C, C), "v_proj": (qkv, 2 * C, C),
                    "f_a_proj": (gates, 0, K), "g_a_proj": (gates, K, K), "b_proj": (gates, 2 * K, H)}
            m = re.fullmatch(r"(\w+)\.weight", rest)
            if m is not None and m.group(1) in rows:
                param, start, n = rows[m.group(1)]
                return [_Piece(param, slice(start, start + n), ((n, cfg.hidden_size),))]
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
        C, K = cfg.linear_num_heads * cfg.linear_head_dim, cfg.linear_head_dim
        if param.endswith("self_attn.conv1d.weight"):
            return param.replace("conv1d.weight", "qkv"[min(row // C, 2)] + "_conv1d.weight")
        if param.endswith("self_attn.qkv_proj.weight"):
            return param.replace("qkv_proj", "qkv"[min(row // C, 2)] + "_proj")
        if param.endswith("self_attn.gate_in_proj.weight"):
            return param.replace("gate_in_proj", ("f_a", "g_a", "b")[min(row // K, 2)] + "_proj")
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
    from safetensors import SafetensorError
    from tqdm.auto import tqdm

    path = os.fspath(path)
    # ---- validate before allocating: the config (types and INT_BOUNDS), then every file header against it
    config, dtype = _read_config(path, dtype, moe_combine_with_bias, attn_res_block_size)
    device = torch.device(device)
    block = _fp8_block(config)
    files, headers = _read_headers(path)

    with torch.device("meta"):  # shapes only: nothing is allocated until the plan below holds
        model = KimiForCausalLM(config)
    plan, optional = _plan(path, config, _Mapper(model, config), files, headers, block)

    # ---- allocate once, then stream: one tensor in memory at a time, copied into its place
    model.materialize_(dtype, device)
    mapper = _Mapper(model, config)
    with torch.no_grad():
        for name in optional:  # AttnRes parameters the checkpoint does not hold keep the paper's init
            mapper.params[name].fill_(0.0 if "attn_res_query" in name else 1.0)
    handle = _ShardHandles()

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
                    tensor = _dequant_fp8(tensor, handle(files[scale_name]).get_tensor(scale_name), block)
                for piece in pieces:
                    dst = mapper.params[piece.param][piece.dst]
                    dst.copy_(piece.src_fn(tensor).reshape(dst.shape))
                del tensor
                bar.update(1)
    finally:
        bar.close()
        handle.close()
    return model.eval()


class _ShardHandles:
    """``handle(shard)``: the shard's ``safe_open`` handle, opened on first use (a file safetensors cannot open
    raises ValueError naming it); ``close()`` drops them all."""

    def __init__(self) -> None:
        self._handles: dict[str, object] = {}

    def __call__(self, shard: str):
        if shard not in self._handles:
            from safetensors import SafetensorError, safe_open

            try:
                self._handles[shard] = safe_open(shard, framework="pt", device="cpu")
            except SafetensorError as e:
                raise ValueError(f"corrupt or truncated safetensors file {shard}: {e}") from e
        return self._handles[shard]

    def close(self) -> None:
        self._handles.clear()


def _read_config(path: str, dtype, moe_combine_with_bias: Optional[bool], attn_res_block_size: Optional[int]
                 ) -> tuple[KimiConfig, torch.dtype]:
    """The checkpoint's checked config with the caller's overrides, and the model dtype (``dtype``, else the
    config's ``torch_dtype``, else float32)."""
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
    dtype = (parse_dtype(dtype, choices=MODEL_DTYPES)
             or parse_dtype(config.torch_dtype, name="config.json torch_dtype", choices=MODEL_DTYPES) or torch.float32)
    return config, dtype


def _read_headers(path: str) -> tuple[dict[str, str], dict[str, dict[str, _Entry]]]:
    """Tensor name -> shard file, and every shard's checked header (nothing is read beyond the headers)."""
    files = checkpoint_files(path)
    headers = {shard: _read_header(shard) for shard in sorted(set(files.values()))}
    return _tensor_files(files, headers), headers


def _fp8_block(config: KimiConfig) -> tuple[int, int]:
    qcfg = config.quantization_config or {}
    block = qcfg.get("weight_block_size") or (128, 128)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 1 << 16 for b in block)):
        raise ValueError(f"config.json: quantization_config.weight_block_size must be two ints in [1, 65536], "
                         f"got {block!r}")
    return tuple(block)


def _plan(path: str, config: KimiConfig, mapper: _Mapper, files: dict[str, str],
          headers: dict[str, dict[str, _Entry]], block: tuple[int, int]
          ) -> tuple[list[tuple[str, str, list[_Piece]]], set[str]]:
    """From the headers alone (``mapper`` may sit on the meta device): which tensor fills which parameter piece.
    Every problem is reported here, before any parameter is allocated or any tensor data is read: unexpected,
    missing, duplicated or mis-shaped tensors, a wrong dtype class, an FP8 weight without its scale.
    Returns the plan and the AttnRes parameters that no tensor fills (they keep their init)."""
    filled = {name: torch.zeros(max(t.shape[0] if t.dim() else 1, 1), dtype=torch.bool)
              for name, t in mapper.params.items()}
    optional = set()  # AttnRes parameters: absent from ordinary checkpoints, then the paper's init stands
    if config.attn_res_block_size is not None:
        optional = {name for name in filled if ".attn_res_" in name or name.startswith("model.attn_res_")}
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
        entry = headers[shard][name]
        for piece in pieces:
            if entry.shape not in piece.shapes:
                raise ValueError(f"tensor {name!r} in {shard} has shape {list(entry.shape)}, expected "
                                 f"{' or '.join(str(list(s)) for s in piece.shapes)} (for parameter {piece.param})")
            want = "float" if mapper.params[piece.param].dtype.is_floating_point else "int"
            if entry.kind != want:
                raise ValueError(f"tensor {name!r} in {shard} is {entry.dtype}, but parameter {piece.param} needs a "
                                 f"{want} dtype (refusing to cast {entry.kind} values)")
            rows = filled[piece.param][piece.dst]
            if bool(rows.any()):
                where = f" row {piece.dst}" if isinstance(piece.dst, int) else ""
                raise ValueError(f"tensor {name!r} in {shard} fills {piece.param}{where}, which another tensor of "
                                 "the checkpoint already fills (duplicate weights)")
            filled[piece.param][piece.dst] = True
        if entry.dtype.startswith("F8_"):
            _check_fp8_scale(name, shard, entry, files, headers, block)
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
    return plan, optional


def _check_fp8_scale(name: str, shard: str, entry: _Entry, files: dict[str, str],
                     headers: dict[str, dict[str, _Entry]], block: tuple[int, int]) -> None:
    scale_name = name + "_scale_inv"
    if scale_name not in files:
        raise ValueError(f"FP8 tensor {name!r} in {shard} has no {scale_name!r} to dequantise it")
    scale = headers[files[scale_name]][scale_name]
    want = tuple(-(-n // b) for n, b in zip(entry.shape, block))
    if len(entry.shape) != 2 or scale.shape != want or scale.kind != "float":
        raise ValueError(f"tensor {scale_name!r} in {files[scale_name]} is {list(scale.shape)} {scale.dtype}; the "
                         f"FP8 weight {list(entry.shape)} with blocks {list(block)} needs a float {list(want)}")
