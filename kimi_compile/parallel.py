"""Tensor and expert parallelism through ``torch.distributed`` (DTensor, DeviceMesh, ``parallelize_module``).

``parallelize(model, mesh)`` shards a :class:`~kimi_compile.model.KimiForCausalLM` in place over a 1-D
``DeviceMesh`` of ``tp`` ranks (NCCL on GPUs, gloo on the CPU); ``load_sharded(path, mesh)`` (also reached as
``load_model(path, mesh=mesh)``) builds the model on the meta device, shards it, and reads on each rank only its
slices of each checkpoint tensor (safetensors ``get_slice``), so no rank ever holds the full model.

Layout (vLLM's, ``heads % tp == 0``):

* KDA: ``f_b_proj``, ``g_b_proj`` column-parallel by head (``ColwiseParallel``, DTensor ``Shard(0)`` weights,
  local outputs); the fused ``qkv_proj`` and q|k|v conv weights keep the rank's q, k and v rows (in that order);
  the fused ``gate_in_proj`` ``[f_a | g_a | b]`` keeps f_a and g_a whole (replicated) and the rank's rows of b;
  ``A_log`` and ``dt_bias`` the rank's heads; the output norm replicated; ``o_proj`` row-parallel
  (``RowwiseParallel``: all-reduce). The fused weights are plain local tensors (inference: no gradient reduction).
  ``kimi::kda`` and ``kimi::short_conv`` then run on the local heads.
* MLA: ``q_proj`` / ``q_b_proj`` column-parallel and ``kv_b_proj`` split by head (it is used as a per-head
  ``[H, nope + v, r]`` tensor in the absorbed form, so its rows are kept as a local tensor); ``o_proj``
  row-parallel; the latent and rope projections (``q_a_proj``, ``kv_a_proj_with_mqa``) and their norms replicated.
* MoE: routed experts split across ranks (expert parallel: rank r holds experts ``[r E/tp, (r+1) E/tp)`` of the
  stacked ``[E, I, D]`` weights); the router is replicated; the shared expert and the dense MLP are
  tensor-parallel (gate/up column-, down row-parallel). The routed and the shared partial sums are added and
  summed across ranks by one functional all-reduce.
* ``embed_tokens`` vocabulary-parallel (``RowwiseParallel`` on the embedding: masked lookup + all-reduce),
  ``lm_head`` vocabulary-parallel with the logits all-gathered (every rank returns the full logits).
* Attention Residuals, all RMSNorms and the rotary table replicated.

State, per rank (graph I/O of each rank's model): KDA ``recurrent_state`` ``[B, H/tp, K, V]`` and ``conv_state``
``[B, 3 H/tp K, W-1]`` (the rank's q|k|v channels); the absorbed MLA cache ``[B, 1, S, r + rope]`` has no head
axis (one latent shared by all heads), so it is replicated: every rank computes and keeps the same cache.
``model.empty_state(B)`` / ``model.state_specs()`` of a parallelized model give these local shapes.

Every collective is a DTensor redistribution or a functional collective
(``torch.distributed._functional_collectives``), so ``torch.compile(fullgraph=True)`` captures the sharded
model whole and Inductor sees the collectives. A mesh of one rank runs the same code path.

Limitation: ``kimi::moe_experts`` has no "no expert" id, so with static shapes a rank cannot drop the (token,
slot) pairs routed to other ranks; they go to a local expert with combine weight 0 (exact), so the routed-expert
FLOPs per rank are not divided by ``tp`` (weights and their memory traffic are).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from . import loading as L
from .config import KimiConfig
from .model import KDAAttention, KimiForCausalLM, MLAttention, MoE, SwiGLU
from .state import StateSpec, empty_state as _global_empty_state, state_specs as _global_state_specs

__all__ = ["parallelize", "load_sharded", "local_state_specs", "ParallelKimiForCausalLM", "shard_ranges"]

# A local shard of a parameter: the concatenation, along ``dim``, of the global index ranges ``ranges``.
ShardRanges = tuple[int, tuple[tuple[int, int], ...]]


def _check_mesh(mesh) -> int:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be 1-D (one tensor/expert-parallel axis), got a {mesh.ndim}-D mesh")
    return mesh.size()


def _check_divisible(config: KimiConfig, tp: int) -> None:
    """Every split axis must divide evenly; the error names the config field."""
    fields = {"vocab_size": config.vocab_size}
    if config.kda_layers:
        fields["linear_num_heads"] = config.linear_num_heads
    if config.mla_layers:
        fields["num_attention_heads"] = config.num_attention_heads
    if len(config.moe_layers) < config.num_hidden_layers:
        fields["intermediate_size"] = config.intermediate_size
    if config.moe_layers:
        fields["num_experts"] = config.num_experts
        if config.num_shared_experts:
            fields["moe_intermediate_size * num_shared_experts"] = (config.moe_intermediate_size
                                                                    * config.num_shared_experts)
    for name, value in fields.items():
        if value % tp:
            raise ValueError(f"config.{name} = {value} is not divisible by the mesh size {tp}: tensor/expert "
                             "parallelism splits it evenly across ranks")


# ------------------------------------------------------------------------------------------------ sharded modules

class _ExpertParallelMoE(MoE):
    """MoE whose ``experts`` hold only this rank's ``[E/tp, I, D]`` slice; slots routed elsewhere get combine
    weight 0 on a local expert (spread over the local experts); one all-reduce sums routed + shared outputs."""

    expert_offset: int
    num_local_experts: int
    group_name: str

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_ids, topk_weights = self.gate(flat)
        local_ids = topk_ids - self.expert_offset
        mine = (local_ids >= 0) & (local_ids < self.num_local_experts)
        local_ids = torch.where(mine, local_ids, topk_ids % self.num_local_experts)
        local_weights = torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
        out = self.experts(flat, local_ids, local_weights).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)  # a partial sum (row-parallel down_proj left Partial)
        return funcol.all_reduce(out, "sum", self.group_name)


class _VocabParallelHead(ColwiseParallel):
    """ColwiseParallel whose input gets fresh contiguous strides first: ``hidden[:, -n:]`` (``logits_to_keep``)
    has static sizes but a symbolic stride under dynamic shapes, which DTensor's sharding-propagation cache
    cannot hash (``.contiguous()`` would return it as is: size-1 axes count as contiguous whatever the stride)."""

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        x = inputs[0] if isinstance(inputs[0], DTensor) else inputs[0].clone(memory_format=torch.contiguous_format)
        return ColwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod, (x, *inputs[1:]),
                                                 device_mesh)


class ParallelKimiForCausalLM(KimiForCausalLM):
    """A :class:`KimiForCausalLM` after :func:`parallelize`: same forward; state helpers give local shapes."""

    mesh: DeviceMesh

    def state_specs(self):
        return local_state_specs(self.config, self.mesh.size(), self.dtype)

    def empty_state(self, batch_size: int) -> dict[str, Tensor]:
        return _local_empty_state(self.config, self.mesh.size(), batch_size, self.dtype, self.device)

    @property
    def device(self) -> torch.device:
        w = self.model.embed_tokens.weight
        return w.to_local().device if isinstance(w, DTensor) else w.device


def local_state_specs(config: KimiConfig, tp: int, dtype: torch.dtype = torch.float32) -> list[StateSpec]:
    """The per-rank state layout: KDA heads / conv channels divided by ``tp``, the MLA cache unchanged."""
    out = []
    for s in _global_state_specs(config, dtype):
        if s.part in ("conv_state", "recurrent_state"):
            s = StateSpec(s.name, (s.shape[0], s.shape[1] // tp) + tuple(s.shape[2:]), s.dtype, s.layer, s.part)
        out.append(s)
    return out


def _local_empty_state(config, tp, batch_size, dtype, device) -> dict[str, Tensor]:
    full = _global_empty_state(config, batch_size, dtype, "meta")  # validates the arguments, allocates nothing
    specs = {s.name: s for s in local_state_specs(config, tp, dtype)}
    return {name: torch.zeros(specs[name].concrete_shape(batch_size, 0), dtype=t.dtype, device=device)
            for name, t in full.items()}


# ------------------------------------------------------------------------------------------------ parallelize

def _head_ranges(n: int, rank: int, tp: int, width: int = 1, base: int = 0) -> tuple[int, int]:
    per = n // tp
    return base + rank * per * width, base + (rank + 1) * per * width


def _keep_local(module: nn.Module, name: str, spec: ShardRanges, specs: dict, full_name: str) -> None:
    """Replace parameter ``name`` of ``module`` by its local slice (a plain tensor: the model code uses it
    directly, next to local activations)."""
    dim, ranges = spec
    p = getattr(module, name)
    if p.device.type == "meta":
        size = sum(b - a for a, b in ranges)
        shape = list(p.shape)
        shape[dim] = size
        local = torch.empty(shape, dtype=p.dtype, device="meta")
    else:
        local = torch.cat([p.detach().narrow(dim, a, b - a) for a, b in ranges], dim=dim).contiguous()
    setattr(module, name, nn.Parameter(local, requires_grad=p.requires_grad))
    specs[full_name] = spec


def parallelize(model: KimiForCausalLM, mesh: DeviceMesh) -> "ParallelKimiForCausalLM":
    """Shard ``model`` in place over the 1-D ``mesh`` (layout in the module docstring) and return it.

    Every rank must call this with the same (identical) model, or with a model on the meta device (then
    :func:`load_sharded` fills the shards). No communication happens here: each rank keeps its own slices.
    Raises ValueError naming the config field when a split axis is not divisible by the mesh size."""
    if not isinstance(model, KimiForCausalLM):
        raise TypeError(f"model must be a KimiForCausalLM, got {type(model).__name__}")
    if isinstance(model, ParallelKimiForCausalLM):
        raise ValueError("model is already parallelized")
    tp = _check_mesh(mesh)
    config = model.config
    _check_divisible(config, tp)
    rank = mesh.get_local_rank()
    colwise = ColwiseParallel(use_local_output=True)
    specs: dict[str, ShardRanges] = {}  # parameters kept as plain local tensors, for the sharded loader

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        if isinstance(attn, KDAAttention):
            H, K = attn.num_heads, attn.head_dim
            plan = {n: colwise for n in ("f_b_proj", "g_b_proj")}
            plan["o_proj"] = RowwiseParallel(use_local_output=True)
            parallelize_module(attn, mesh, plan, src_data_rank=None)
            C = H * K  # q|k|v rows and conv channels are [q | k | v], each head-major: this rank's heads of each
            qkv_rows = (0, tuple(_head_ranges(H, rank, tp, K, j * C) for j in range(3)))
            _keep_local(attn.qkv_proj, "weight", qkv_rows, specs, p + "self_attn.qkv_proj.weight")
            _keep_local(attn.conv1d, "weight", qkv_rows, specs, p + "self_attn.conv1d.weight")
            # [f_a | g_a | b]: both low-rank inputs whole (replicated), the rank's heads of b
            _keep_local(attn.gate_in_proj, "weight", (0, ((0, 2 * K), _head_ranges(H, rank, tp, 1, 2 * K))),
                        specs, p + "self_attn.gate_in_proj.weight")
            _keep_local(attn, "A_log", (0, (_head_ranges(H, rank, tp),)), specs, p + "self_attn.A_log")
            _keep_local(attn, "dt_bias", (0, (_head_ranges(H, rank, tp, K),)), specs, p + "self_attn.dt_bias")
            attn.num_heads = H // tp
        elif isinstance(attn, MLAttention):
            H = attn.num_heads
            q = "q_b_proj" if attn.q_lora else "q_proj"
            parallelize_module(attn, mesh, {q: colwise, "o_proj": RowwiseParallel(use_local_output=True)},
                               src_data_rank=None)
            _keep_local(attn.kv_b_proj, "weight", (0, (_head_ranges(H, rank, tp, attn.nope + attn.vdim),)),
                        specs, p + "self_attn.kv_b_proj.weight")
            attn.num_heads = H // tp
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            E = config.num_experts
            lo, hi = _head_ranges(E, rank, tp)
            for w in ("w_gate", "w_up", "w_down"):
                _keep_local(mlp.experts, w, (0, ((lo, hi),)), specs, p + f"mlp.experts.{w}")
            if mlp.shared_experts is not None:
                _tensor_parallel_swiglu(mlp.shared_experts, mesh, Partial())
            mlp.__class__ = _ExpertParallelMoE
            mlp.expert_offset, mlp.num_local_experts = lo, hi - lo
            mlp.group_name = mesh.get_group().group_name
        elif isinstance(mlp, SwiGLU):
            _tensor_parallel_swiglu(mlp, mesh, Replicate())

    parallelize_module(model, mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), use_local_output=True),
        "lm_head": _VocabParallelHead(output_layouts=Replicate(), use_local_output=True),
    }, src_data_rank=None)
    if config.tie_word_embeddings:  # both are Shard(0) of [vocab, D]: keep one parameter
        model.lm_head.weight = model.model.embed_tokens.weight
    model.__class__ = ParallelKimiForCausalLM
    model.mesh = mesh
    model._kimi_local_shards = specs
    return model


def _tensor_parallel_swiglu(mlp: SwiGLU, mesh: DeviceMesh, output: Union[Replicate, Partial]) -> None:
    colwise = ColwiseParallel(use_local_output=True)
    parallelize_module(mlp, mesh, {"gate_proj": colwise, "up_proj": colwise,
                                   "down_proj": RowwiseParallel(output_layouts=output, use_local_output=True)},
                       src_data_rank=None)


def shard_ranges(model: "ParallelKimiForCausalLM", name: str, t: Tensor) -> Optional[ShardRanges]:
    """Which part of the global parameter ``name`` (tensor ``t``) this rank holds: ``(dim, ((start, stop), ...))``
    (the local tensor is the concatenation of those ranges along ``dim``), or None for a replicated one."""
    if name in model._kimi_local_shards:
        return model._kimi_local_shards[name]
    if not isinstance(t, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    for dim, pl in enumerate(t.placements):
        if isinstance(pl, Shard):
            d = pl.dim % t.dim()
            return d, ((offset[d], offset[d] + local_shape[d]),)
    return None


# ------------------------------------------------------------------------------------------------ sharded loading

def _materialize_sharded(model: ParallelKimiForCausalLM, dtype: torch.dtype, device: torch.device) -> None:
    """Give a parallelized meta model real, uninitialised local storage: :meth:`KimiForCausalLM.materialize_`
    (dtypes, tied head, rope table) on local shapes, then each DTensor parameter wraps its local tensor again."""
    sharded: dict[tuple[nn.Module, str], DTensor] = {}
    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if isinstance(t, DTensor):
                sharded[(module, name)] = t
                module._parameters[name] = nn.Parameter(torch.empty(t.to_local().shape, dtype=t.dtype,
                                                                    device="meta"), requires_grad=t.requires_grad)
    model.materialize_(dtype, device)
    wrapped: dict[int, nn.Parameter] = {}  # by the original DTensor, so a tied embedding / head stays one parameter
    for (module, name), t in sharded.items():
        if id(t) not in wrapped:
            local = module._parameters[name].detach()
            wrapped[id(t)] = nn.Parameter(DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                                             shape=t.shape, stride=t.stride()),
                                          requires_grad=t.requires_grad)
        module._parameters[name] = wrapped[id(t)]


def _local_view(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _read_part(handle, name: str, dim: int, a: int, b: int) -> Tensor:
    """Rows (dim 0) or columns (dim 1) ``a:b`` of checkpoint tensor ``name``, read alone."""
    sl = handle.get_slice(name)
    return sl[a:b] if dim == 0 else sl[:, a:b]


def load_sharded(path: Union[str, os.PathLike], mesh: DeviceMesh, *, dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device, None] = None, progress: bool = True,
                 moe_combine_with_bias: Optional[bool] = None,
                 attn_res_block_size: Optional[int] = None) -> ParallelKimiForCausalLM:
    """``load_model(path, mesh=mesh)``: a checkpoint directory -> a parallelized model holding only this rank's
    slices. Names, shapes and completeness are checked from the file headers exactly as :func:`load_model` does;
    then each rank reads, per tensor, only the rows / columns it keeps (``safe_open(...).get_slice``).
    ``device`` defaults to (and must be of the type of) the mesh's device (the current CUDA device on a CUDA
    mesh)."""
    from tqdm.auto import tqdm

    tp = _check_mesh(mesh)
    if device is None or torch.device(device).type != mesh.device_type:  # the mesh decides where shards live
        device = (torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda"
                  else torch.device(mesh.device_type))
    device = torch.device(device)
    path = os.fspath(path)
    config, dtype = L._read_config(path, dtype, moe_combine_with_bias, attn_res_block_size)
    _check_divisible(config, tp)
    block = L._fp8_block(config)

    # every check runs against a global meta model (shapes only) before the sharded one is allocated
    files, headers = L._read_headers(path)
    with torch.device("meta"):
        global_model = KimiForCausalLM(config)
        model = KimiForCausalLM(config)
    mapper = L._Mapper(global_model, config)
    plan, optional = L._plan(path, config, mapper, files, headers, block)

    parallelize(model, mesh)
    _materialize_sharded(model, dtype, device)
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
    with torch.no_grad():
        for n in optional:  # AttnRes parameters the checkpoint does not hold keep the paper's init
            params[n].fill_(0.0 if "attn_res_query" in n else 1.0)
    handle = L._ShardHandles()

    bar = tqdm(total=len(plan), desc=f"loading {os.path.basename(os.path.normpath(path))} "
               f"(rank {mesh.get_local_rank()}/{tp})", unit="tensor", disable=not progress)
    try:
        with torch.no_grad():
            for name, shard, pieces in plan:
                shape = headers[shard][name].shape
                for piece in pieces:
                    _load_piece(model, params, piece, name, shard, shape, handle, files, block,
                                mapper.params[piece.param].shape)
                bar.update(1)
    finally:
        bar.close()
        handle.close()
    return model.eval()


def _load_piece(model, params, piece, name, shard, shape, handle, files, block, global_shape) -> None:
    """Copy this rank's part of checkpoint tensor ``name`` into parameter ``piece.param``.

    ``piece.dst`` addresses the global parameter: an int (one expert's row of a stacked expert weight) or a slice
    along dim 0 (the whole tensor, or q/k/v's third of the fused conv). The rank keeps ``ranges`` of the
    parameter (of global shape ``global_shape``) along ``dim``; only the intersecting rows / columns of the
    checkpoint tensor are read."""
    from safetensors import SafetensorError

    target = params[piece.param]
    local = _local_view(target)
    spec = shard_ranges(model, piece.param, target)
    h = handle(shard)
    fp8 = str(h.get_slice(name).get_dtype()).upper().startswith("F8")

    def read(dim: Optional[int], a: int = 0, b: int = 0) -> Tensor:
        try:
            if fp8:  # dequantise the rows / columns read with the matching blocks of the scale
                scale_name = name + "_scale_inv"
                if scale_name not in files:
                    raise ValueError(f"FP8 tensor {name!r} in {shard} has no {scale_name!r} to dequantise it")
                s = handle(files[scale_name]).get_slice(scale_name)
                w = h.get_slice(name)
                if dim is None:
                    return _dequant_slice(w[:], s[:], block, 0, 0)
                bs = block[dim]
                sa, sb = a // bs, (b - 1) // bs + 1
                part = w[a:b] if dim == 0 else w[:, a:b]
                sc = s[sa:sb] if dim == 0 else s[:, sa:sb]
                full = _dequant_slice(part, sc, block, dim, a - sa * bs)
                return full
            return h.get_tensor(name) if dim is None else _read_part(h, name, dim, a, b)
        except SafetensorError as e:
            raise ValueError(f"cannot read tensor {name!r} from {shard}: {e}") from e

    if spec is None:  # replicated: the whole tensor
        dst = local[piece.dst]
        dst.copy_(piece.src_fn(read(None)).reshape(dst.shape))
        return
    dim, ranges = spec
    if isinstance(piece.dst, int):  # one expert of a stacked weight (sharded by expert, dim 0)
        pos = 0
        for a, b in ranges:
            if a <= piece.dst < b:
                dst = local[pos + piece.dst - a]
                dst.copy_(piece.src_fn(read(None)).reshape(dst.shape))
            pos += b - a
        return
    g0 = piece.dst.start or 0  # the piece covers global rows [g0, g1) of the parameter
    g1 = piece.dst.stop if piece.dst.stop is not None else global_shape[0]
    if dim == 0:
        pos = 0
        for a, b in ranges:
            lo, hi = max(a, g0), min(b, g1)
            if lo < hi:
                dst = local.narrow(0, pos + lo - a, hi - lo)
                if len(shape) >= 1 and shape[0] == g1 - g0:  # checkpoint rows are the parameter's rows
                    part = piece.src_fn(read(0, lo - g0, hi - g0))
                else:  # a differently laid out small tensor (A_log [1, 1, H, 1]): read whole, then slice
                    part = piece.src_fn(read(None)).reshape(g1 - g0, *dst.shape[1:])[lo - g0: hi - g0]
                dst.copy_(part.reshape(dst.shape))
            pos += b - a
        return
    # dim 1: row-parallel weights [out, in] with the checkpoint laid out like the parameter
    (a, b), = ranges
    if len(shape) != 2:
        raise ValueError(f"tensor {name!r}: cannot slice a {len(shape)}-D tensor by columns for {piece.param}")
    local.copy_(piece.src_fn(read(1, a, b)).reshape(local.shape))


def _dequant_slice(part: Tensor, scale: Tensor, block, dim: int, offset: int) -> Tensor:
    """Dequantise a row (dim 0) or column (dim 1) slice that starts ``offset`` elements into its first block."""
    s = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    s = s[offset: offset + part.shape[0]] if dim == 0 else s[:, offset: offset + part.shape[1]]
    return part.float() * s[: part.shape[0], : part.shape[1]]
