"""``kimi::moe_experts`` — the routed experts of a MoE layer as one ``torch.library`` custom op.

Contract::

    moe_experts(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> out

    x             [T, D]      tokens (any float dtype)
    topk_ids      [T, k]      int64 expert of each (token, slot), in [0, E)
    topk_weights  [T, k]      float32 combine weight of each (token, slot)
    w_gate, w_up  [E, I, D]   SwiGLU gate / up projections of the E experts (x's dtype)
    w_down        [E, D, I]   down projections
    out           [T, D]      x's dtype:  out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])
                              expert_e(x) = w_down[e] @ (silu(w_gate[e] @ x) * (w_up[e] @ x))

The weighted sum over the k slots is accumulated in float32 and rounded once to x's dtype.

Why an op: a MoE written in Python loops over experts with data-dependent token counts (``nonzero`` /
``.tolist()``), which graph-breaks under ``torch.compile`` and cannot be exported. As one opaque node the model
graph stays whole (router top-k is plain ``torch.topk`` in the model), and the implementation is free to use
whatever runs fastest on the device:

* CUDA, float16 / bfloat16 / float32, few slots (``T * k <= DECODE_MAX_SLOTS``, decode): two Triton kernels
  (``decode.py``): one program per (slot, block of I) forms ``silu(gate) * up`` in float32, one per (token, block
  of D) applies the down projections and the weighted sum. Each slot streams its expert's weights; no sort, no
  host sync, fixed shapes (capturable in a CUDA graph).
* CUDA, float16 / bfloat16, more slots (below ``PREFILL_TRITON_MAX_ROWS`` an expert where the next path
  applies), ``PREFILL_KERNEL == "triton"``: two Triton grouped-GEMM kernels
  (``grouped.py``) over the slots sorted by expert and padded to whole row blocks; the tokens and weights are read
  where they lie and ``silu(gate) * up`` is formed in the first kernel's registers; no host sync.
* CUDA, bfloat16, sm90+, D and I multiples of 8, more slots: ``torch._grouped_mm`` over the token-slots sorted by
  expert; group offsets are a device-side ``cumsum`` of per-expert counts; the weighted sum over each token's
  slots is one Triton kernel reading the sorted rows where they lie (``combine.py``). No host sync, so the op can
  be captured in a CUDA graph (``mode="reduce-overhead"``).
* CUDA otherwise (float64, or float16 / float32 above the decode path), few slots (``T * k <= max(E, 64)``):
  each slot gathers its expert's weights and runs a batched matmul; no host sync.
* Otherwise (CPU always): slots sorted by expert, host-side offsets (a sync, harmless on CPU), one matmul per
  expert that received tokens.

Autograd: gradients for ``x``, ``topk_weights``, ``w_gate``, ``w_up``, ``w_down`` come from the companion op
``kimi::moe_experts_backward``, also a single node under compile: grouped GEMMs without a host sync where the
forward's grouped-GEMM conditions hold (bf16, sm90+; ``BACKWARD_GROUPED_MM``), else a plain per-expert loop.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["moe_experts", "moe_experts_reference", "moe_route", "moe_route_reference"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# With few (token, slot) pairs the slots are mostly distinct experts (E=256, top-8: 57 of 64 expected, 164 of
# 256), so streaming each slot's expert costs about the grouped GEMM's bytes without its sort, gather and ~25
# launches. H200, Kimi widths, in CUDA graphs (bench/bench_moe.py): T=1 61 us vs 122 us grouped GEMM, T=4 151 vs
# 246. At 256 slots (decode B=32) the op alone measured faster (795 vs 884 us), but the full-depth B=32 step was
# 22.6 ms with the decode kernels there against 20.0 ms without (bench_full_model.py, same run): an expert chosen
# by several slots is streamed once per slot. 0 turns the decode kernels off.
DECODE_MAX_SLOTS = 64

# Above the decode sizes on CUDA (float16 / bfloat16): "triton" runs the grouped kernels of grouped.py (tokens and
# weights read where they lie, silu * up fused), "grouped_mm" torch._grouped_mm (bfloat16, sm90+). H200, Kimi
# widths, E=256, top-8, the whole op in CUDA graphs (bench_moe.py --prefill): T=4096 1755 us vs 1893 us, T=1024
# 1240 vs 1323 (the default tiles then; both paths read the weights at ~2 TB/s, half the copy rate).
PREFILL_KERNEL = "triton"

# With "triton", from this many rows an expert on average (T * k / E) torch._grouped_mm runs instead where it can:
# there the GEMMs are compute-bound and cuBLAS's grouped GEMM outruns the Triton kernels. H200, Kimi widths, the
# whole op, grouped_mm against Triton: 128 rows an expert (T=4096) 1917 / 1637 us, 256 rows 2689 / 2725 us, 512
# rows 4543 / 4993 us, 1024 rows 8265 / 9504 us; the 48B prefill at T=32768 608.9 ms against 637.6 ms.
PREFILL_TRITON_MAX_ROWS = 512

# The backward through torch._grouped_mm without a host sync (``_backward_grouped_mm``; bf16, sm90+). H200,
# bench_train.py (1.33 B model, T=4096, compiled): a training step 89.3 ms against 181.7 ms through the per-expert
# loop, which reads the slot counts on the host once a MoE layer. False: the loop everywhere.
BACKWARD_GROUPED_MM = True


def _check(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> None:
    """Shape / dtype / device checks; metadata only (no data reads, no host sync)."""
    named = {"x": x, "topk_ids": topk_ids, "topk_weights": topk_weights, "w_gate": w_gate, "w_up": w_up,
             "w_down": w_down}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, nd in (("x", x, 2), ("topk_ids", topk_ids, 2), ("topk_weights", topk_weights, 2),
                        ("w_gate", w_gate, 3), ("w_up", w_up, 3), ("w_down", w_down, 3)):
        if t.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {tuple(t.shape)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if topk_ids.dtype != torch.int64:
        raise TypeError(f"topk_ids must be int64, got {topk_ids.dtype}")
    if topk_weights.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"topk_weights must be float32 (or float64), got {topk_weights.dtype}")
    for name in ("w_gate", "w_up", "w_down"):
        if named[name].dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {named[name].dtype}")
    T, D = x.shape
    E, I, D2 = w_gate.shape
    if D2 != D:
        raise ValueError(f"w_gate must be [E, I, D] with D = x.shape[1] = {D}, got {tuple(w_gate.shape)}")
    if tuple(w_up.shape) != (E, I, D):
        raise ValueError(f"w_up must have w_gate's shape {(E, I, D)}, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (E, D, I):
        raise ValueError(f"w_down must be [E, D, I] = {(E, D, I)}, got {tuple(w_down.shape)}")
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [T, k] with T = x.shape[0] = {T}, got {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, got "
                         f"{tuple(topk_weights.shape)}")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share a device")


def _check_expert_ids(topk_ids: Tensor, E: int) -> None:
    """Range of the expert ids, checked before anything is sized or indexed by them (bincount would allocate up to
    the largest id). CPU: ValueError naming topk_ids (a host read of CPU data, no device sync). CUDA: a
    device-side assert (torch._assert_async) with the same message, so the compiled path has no host sync; a bad
    id aborts the CUDA stream at the next synchronisation instead of raising ValueError."""
    if topk_ids.numel() == 0:
        return
    if topk_ids.is_cuda:
        torch._assert_async(((topk_ids >= 0) & (topk_ids < E)).all(), f"topk_ids must hold expert ids in [0, E={E})")
        return
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= E:
        raise ValueError(f"topk_ids must hold expert ids in [0, E={E}) (E = w_gate.shape[0]), got values in "
                         f"[{lo}, {hi}]")


# ------------------------------------------------------------------------------------------------ forward paths

def _combine(y_slots: Tensor, topk_weights: Tensor, out_dtype: torch.dtype) -> Tensor:
    """y_slots [T*k, D] in (token, slot) order -> sum_j w[t, j] y[t, j] in float32, rounded once."""
    T, k = topk_weights.shape
    acc = torch.float64 if y_slots.dtype == torch.float64 else torch.float32
    y = y_slots.view(T, k, -1).to(acc) * topk_weights.to(acc).unsqueeze(-1)
    return y.sum(dim=1).to(out_dtype)


def _swiglu(xe: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(xe, wg)) * F.linear(xe, wu), wd)


def _slots_by_expert(topk_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, slot) pairs flattened, their stable order by expert id, and the token of each sorted slot."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return flat, order, order // topk_ids.shape[1]


def _host_counts(flat: Tensor, E: int) -> list[int]:
    """Slots per expert on the host: fine on CPU, a sync on CUDA (only the eager fallback paths use it)."""
    counts = torch.bincount(flat, minlength=E).tolist()
    if len(counts) > E:
        raise ValueError(f"topk_ids holds an expert id >= E = {E}")
    return counts


def _experts_sorted_loop(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> Tensor:
    """Slots sorted by expert, host-side offsets, one matmul chain per expert that has tokens."""
    T, k = topk_ids.shape
    flat, order, token_of = _slots_by_expert(topk_ids)
    counts = _host_counts(flat, w_gate.shape[0])
    y_sorted = x.new_empty(T * k, x.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            rows = token_of[start:start + c]
            y_sorted[start:start + c] = _swiglu(x.index_select(0, rows), w_gate[e], w_up[e], w_down[e])
            start += c
    y_slots = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to (token, slot) order
    return _combine(y_slots, topk_weights, x.dtype)


def _experts_gathered(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> Tensor:
    """Each (token, slot) gathers its expert's weights: no sort, no host sync; for a handful of slots."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # [T*k, 1, D]
    a = torch.bmm(xs, w_gate.index_select(0, flat).transpose(1, 2))  # [T*k, 1, I]
    b = torch.bmm(xs, w_up.index_select(0, flat).transpose(1, 2))
    y = torch.bmm(F.silu(a) * b, w_down.index_select(0, flat).transpose(1, 2))  # [T*k, 1, D]
    return _combine(y.squeeze(1), topk_weights, x.dtype)


def _experts_grouped_mm(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> Tensor:
    """``torch._grouped_mm`` over the slots sorted by expert; offsets stay on the device (no host sync)."""
    E = w_gate.shape[0]
    flat, order, token_of = _slots_by_expert(topk_ids)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x.index_select(0, token_of)
    a = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)
    b = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    y_sorted = torch._grouped_mm(F.silu(a) * b, w_down.transpose(1, 2), offs=offs)
    combine = _combine_module() if y_sorted.is_cuda else None
    if combine is not None:  # the weighted sum straight from the sorted rows, one pass (combine.py)
        return combine.moe_combine(y_sorted, order, topk_weights, x.dtype)
    y_slots = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)  # back to (token, slot) order
    return _combine(y_slots, topk_weights, x.dtype)


def _grouped_mm_usable(x: Tensor, w_gate: Tensor) -> bool:
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return False
    E, I, D = w_gate.shape
    return D % 8 == 0 and I % 8 == 0


@functools.lru_cache(maxsize=None)
def _decode_module():
    """ops/moe/decode.py (imports triton), or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.decode")


@functools.lru_cache(maxsize=None)
def _combine_module():
    """ops/moe/combine.py (imports triton), or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.combine")


@functools.lru_cache(maxsize=None)
def _prefill_module():
    """ops/moe/grouped.py (imports triton), or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.grouped")


def _forward_path(x: Tensor, topk_ids: Tensor, w_gate: Tensor) -> str:
    """Which implementation runs the forward: "decode", "prefill", "grouped_mm", "gathered" or "sorted_loop"
    (metadata only; reads ``DECODE_MAX_SLOTS``, ``PREFILL_KERNEL`` and ``PREFILL_TRITON_MAX_ROWS`` at call time,
    so a benchmark may move them)."""
    T, k = topk_ids.shape
    if PREFILL_KERNEL not in ("triton", "grouped_mm"):
        raise ValueError(f"kimi_compile.ops.moe.PREFILL_KERNEL must be 'triton' or 'grouped_mm', got "
                         f"{PREFILL_KERNEL!r}")
    if not x.is_cuda:
        return "sorted_loop"
    if T * k <= DECODE_MAX_SLOTS and x.dtype in (torch.float16, torch.bfloat16, torch.float32) \
            and _decode_module() is not None:
        return "decode"
    grouped_mm = _grouped_mm_usable(x, w_gate)
    if PREFILL_KERNEL == "triton" and x.dtype in (torch.float16, torch.bfloat16) and _prefill_module() is not None \
            and not (grouped_mm and T * k >= PREFILL_TRITON_MAX_ROWS * w_gate.shape[0]):
        return "prefill"
    if grouped_mm:
        return "grouped_mm"
    if T * k <= max(w_gate.shape[0], 64):
        return "gathered"
    return "sorted_loop"


def _moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> Tensor:
    T, k = topk_ids.shape
    if T == 0:
        return x.new_zeros(x.shape)
    x = x.contiguous()
    path = _forward_path(x, topk_ids, w_gate)
    if path == "decode":
        return _decode_module().moe_experts_decode(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    if path == "prefill":
        return _prefill_module().moe_experts_prefill(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    if path == "grouped_mm":
        return _experts_grouped_mm(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    if path == "gathered":
        return _experts_gathered(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    return _experts_sorted_loop(x, topk_ids, topk_weights, w_gate, w_up, w_down)


def moe_experts_reference(x, topk_ids, topk_weights, w_gate, w_up, w_down) -> Tensor:
    """Plain per-(token, slot) loop, the slowest and most obvious form (for tests and debugging)."""
    T, k = topk_ids.shape
    out = torch.zeros(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                      device=x.device)
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])
            y = _swiglu(x[t:t + 1], w_gate[e], w_up[e], w_down[e])[0]
            out[t] += topk_weights[t, j].to(out.dtype) * y.to(out.dtype)
    return out.to(x.dtype)


@torch.library.custom_op("kimi::moe_experts", mutates_args=())
def _moe_experts_op(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                    w_down: Tensor) -> Tensor:
    _check(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    _check_expert_ids(topk_ids, w_gate.shape[0])
    return _moe_forward(x, topk_ids, topk_weights, w_gate, w_up, w_down)


@_moe_experts_op.register_fake
def _moe_experts_fake(x, topk_ids, topk_weights, w_gate, w_up, w_down):
    _check(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    return x.new_empty(x.shape)


# ------------------------------------------------------------------------------------------------ backward

@torch.library.custom_op("kimi::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(grad_out: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor,
                             w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_topk_weights, dw_gate, dw_up, dw_down) of kimi::moe_experts, one expert at a time. Elementwise math in
    float32 (float64 for float64 inputs); the GEMMs take 16-bit inputs as they are, accumulating in float32 inside
    the GEMM: float32 GEMMs made this op ~85 ms of a 200 ms training step on the H200 (bench_train, 1.3 B model)."""
    T, k = topk_ids.shape
    E = w_gate.shape[0]
    _check_expert_ids(topk_ids, E)
    if BACKWARD_GROUPED_MM and _grouped_mm_usable(x, w_gate):
        return _backward_grouped_mm(grad_out, x, topk_ids, topk_weights, w_gate, w_up, w_down)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    mm = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else acc  # the GEMMs' operand dtype
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    dw_slots = torch.zeros(T * k, dtype=acc, device=x.device)
    dwg = torch.zeros(w_gate.shape, dtype=mm, device=x.device)  # each expert's block is written once
    dwu = torch.zeros(w_up.shape, dtype=mm, device=x.device)
    dwd = torch.zeros(w_down.shape, dtype=mm, device=x.device)
    flat, order, _ = _slots_by_expert(topk_ids)
    counts = _host_counts(flat, E)
    w_flat = topk_weights.reshape(-1).to(acc)
    go_all = grad_out.to(acc)
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        slots = order[start:start + c]
        start += c
        rows = slots // k
        xe = x.index_select(0, rows).to(mm)
        wg, wu, wd = w_gate[e].to(mm), w_up[e].to(mm), w_down[e].to(mm)
        a = (xe @ wg.T).to(acc)
        b = (xe @ wu.T).to(acc)
        sa = torch.sigmoid(a)
        silu_a = a * sa
        h = silu_a * b
        y = (h.to(mm) @ wd.T).to(acc)
        go = go_all.index_select(0, rows)
        dw_slots[slots] = (go * y).sum(-1)
        dy = (go * w_flat[slots].unsqueeze(-1)).to(mm)
        dwd[e] = dy.T @ h.to(mm)
        dh = (dy @ wd).to(acc)
        da = (dh * b * (sa * (1 + a * (1 - sa)))).to(mm)
        db = (dh * silu_a).to(mm)
        dwg[e] = da.T @ xe
        dwu[e] = db.T @ xe
        dx.index_add_(0, rows, (da @ wg + db @ wu).to(acc))
    return (dx.to(x.dtype), dw_slots.view(T, k).to(topk_weights.dtype), dwg.to(w_gate.dtype),
            dwu.to(w_up.dtype), dwd.to(w_down.dtype))


def _backward_grouped_mm(grad_out: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor,
                         w_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward with ``torch._grouped_mm`` over the slots sorted by expert: offsets from a device-side cumsum,
    so no host sync (the per-expert loop reads the counts on the host, which drains the GPU's queue once a MoE
    layer, and launches ~25 kernels an expert). Weight gradients are grouped GEMMs split along the slots (2-D x 2-D
    with offsets). Same precision as the loop: 16-bit GEMM operands, float32 elementwise math and sums."""
    T, k = topk_ids.shape
    E = w_gate.shape[0]
    mm, acc = x.dtype, torch.float32
    flat, order, token_of = _slots_by_expert(topk_ids)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x.index_select(0, token_of)  # [P, D], sorted by expert
    a = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs).to(acc)
    b = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs).to(acc)
    sa = torch.sigmoid(a)
    silu_a = a * sa
    h = (silu_a * b).to(mm)
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs).to(acc)
    go = grad_out.index_select(0, token_of).to(acc)
    w_sorted = topk_weights.reshape(-1).index_select(0, order).to(acc)
    dw_slots = torch.empty(T * k, dtype=acc, device=x.device).index_copy_(0, order, (go * y).sum(-1))
    dy = (go * w_sorted.unsqueeze(-1)).to(mm)
    dwd = torch._grouped_mm(dy.t(), h, offs=offs)  # [E, D, I]
    dh = torch._grouped_mm(dy, w_down, offs=offs).to(acc)  # [P, I]
    da = (dh * b * (sa * (1 + a * (1 - sa)))).to(mm)
    db = (dh * silu_a).to(mm)
    dwg = torch._grouped_mm(da.t(), xs, offs=offs)  # [E, I, D]
    dwu = torch._grouped_mm(db.t(), xs, offs=offs)
    dxs = torch._grouped_mm(da, w_gate, offs=offs).to(acc) + torch._grouped_mm(db, w_up, offs=offs).to(acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(0, token_of, dxs)
    # an expert without slots is a group of length 0 along the reduction: its weight gradient is zero by
    # definition, whatever the GEMM leaves there
    used = (counts > 0).view(E, 1, 1)
    zero = torch.zeros((), dtype=mm, device=x.device)
    return (dx.to(x.dtype), dw_slots.view(T, k).to(topk_weights.dtype), torch.where(used, dwg, zero),
            torch.where(used, dwu, zero), torch.where(used, dwd, zero))


@_moe_experts_backward_op.register_fake
def _moe_experts_backward_fake(grad_out, x, topk_ids, topk_weights, w_gate, w_up, w_down):
    # contiguous, as the kernel returns them (empty_like would copy a permuted input's strides)
    return tuple(t.new_empty(t.shape) for t in (x, topk_weights, w_gate, w_up, w_down))


def _setup_context(ctx, inputs, output):
    x, topk_ids, topk_weights, w_gate, w_up, w_down = inputs
    ctx.save_for_backward(x, topk_ids, topk_weights, w_gate, w_up, w_down)


def _autograd_backward(ctx, grad_out):
    x, topk_ids, topk_weights, w_gate, w_up, w_down = ctx.saved_tensors
    dx, dw, dwg, dwu, dwd = torch.ops.kimi.moe_experts_backward(grad_out.contiguous(), x, topk_ids, topk_weights,
                                                               w_gate, w_up, w_down)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, dw if need[2] else None, dwg if need[3] else None,
            dwu if need[4] else None, dwd if need[5] else None)


_moe_experts_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                w_down: Tensor) -> Tensor:
    """Routed SwiGLU experts; see the module docstring. Returns ``[T, D]`` in x's dtype."""
    _check(x, topk_ids, topk_weights, w_gate, w_up, w_down)
    return torch.ops.kimi.moe_experts(x, topk_ids, topk_weights, w_gate, w_up, w_down)


# ------------------------------------------------------------------------------------------------ routing

def check_route_inputs(logits: Tensor, bias: Tensor, k: int) -> None:
    """kimi::moe_route's argument checks (metadata only), naming the argument."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be a 2-D float32 tensor, got {tuple(logits.shape)} {logits.dtype}")
    E = logits.shape[1]
    if tuple(bias.shape) != (E,) or bias.dtype != torch.float32:
        raise ValueError(f"bias must be float32 of shape ({E},), got {tuple(bias.shape)} {bias.dtype}")
    if bias.device != logits.device:
        raise ValueError(f"bias is on {bias.device} but logits is on {logits.device}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")


def moe_route_reference(logits: Tensor, bias: Tensor, k: int, renormalize: bool, scaling: float,
                        weights_with_bias: bool) -> tuple[Tensor, Tensor]:
    """kimi::moe_route as tensor code (the contract is in route.py's docstring)."""
    scores = torch.sigmoid(logits)
    biased = scores + bias
    ids = torch.topk(biased, k, dim=-1)[1]
    weights = (biased if weights_with_bias else scores).gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * scaling


@functools.lru_cache(maxsize=None)
def _route_module():
    """ops/moe/route.py (imports triton), or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"{__name__}.route")


@torch.library.custom_op("kimi::moe_route", mutates_args=())
def _moe_route_op(logits: Tensor, bias: Tensor, k: int, renormalize: bool, scaling: float,
                  weights_with_bias: bool) -> tuple[Tensor, Tensor]:
    """Sigmoid top-k routing of one expert group: CUDA by one Triton kernel (route.py), else tensor code. An
    opaque op, so Inductor neither traces nor re-analyses the kernel at each of the model's MoE layers."""
    if logits.is_cuda and _route_module() is not None:  # route_topk checks its arguments itself
        return _route_module().route_topk(logits, bias, k, renormalize=renormalize, scaling=scaling,
                                          weights_with_bias=weights_with_bias)
    check_route_inputs(logits, bias, k)
    return moe_route_reference(logits, bias, k, renormalize, scaling, weights_with_bias)


@_moe_route_op.register_fake
def _moe_route_fake(logits, bias, k, renormalize, scaling, weights_with_bias):
    check_route_inputs(logits, bias, k)
    N = logits.shape[0]
    return logits.new_empty(N, k, dtype=torch.int64), logits.new_empty(N, k)


def moe_route(logits: Tensor, bias: Tensor, k: int, *, renormalize: bool, scaling: float,
              weights_with_bias: bool) -> tuple[Tensor, Tensor]:
    """``(ids int64 [N, k], weights float32 [N, k])``: see ops/moe/route.py. No autograd."""
    return torch.ops.kimi.moe_route(logits, bias, k, renormalize, float(scaling), weights_with_bias)
