"""torch-tensorrt converters for ``torch.ops.kimi.kda`` / ``torch.ops.kimi.short_conv`` that insert the kimi
plugins; registered on import when ``torch_tensorrt`` is installed (it is not installable here, so this
file is compiled and imported by the tests but its converters never run)."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

import kimi_compile.ops  # noqa: F401 - registers torch.ops.kimi, which the converters target

__all__ = ["register_torch_tensorrt_converters"]

# the optional packages (tensorrt, torch_tensorrt) are imported only when the converters are registered

_TORCH_TRT_REGISTERED = False


def register_torch_tensorrt_converters() -> bool:
    """Register converters for ``torch.ops.kimi.kda`` / ``torch.ops.kimi.short_conv`` that insert the kimi
    plugins (the registration module of a bundle must be imported first, so ``trtp.op.kimi.*`` exist).

    torch-tensorrt's automatic plugins cannot express these ops (optional tensors; an output dtype that is
    not the first input's), hence explicit converters.  Nodes outside what the plugins take (no state,
    cu_seqlens, grouped value heads) stay in PyTorch.  Returns False when torch_tensorrt is unavailable.
    Not exercised here: torch_tensorrt and TensorRT are not installable in this environment.
    """
    global _TORCH_TRT_REGISTERED
    if _TORCH_TRT_REGISTERED:
        return True
    if importlib.util.find_spec("torch_tensorrt") is None:
        return False
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
        from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
        from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor
    except Exception:  # noqa: BLE001 - a broken install behaves like an absent one
        return False

    def _meta(node, i):
        arg = node.args[i] if len(node.args) > i else None
        return getattr(arg, "meta", {}).get("val") if arg is not None else None

    floats = (torch.float32, torch.float16, torch.bfloat16)

    def _kda_ok(node, settings=None):
        q, k, v, g, beta, s = (_meta(node, i) for i in range(6))
        cu = node.args[7] if len(node.args) > 7 else None
        if any(x is None for x in (q, k, v, g, beta, s)) or cu is not None:
            return False  # no state / packed varlen: leave the op to PyTorch
        return (q.shape[2] == v.shape[2] and q.dtype in floats and s.dtype == torch.float32
                and all(x.dtype == q.dtype for x in (k, v, g, beta)))

    def _conv_ok(node, settings=None):
        x, w, b, s = (_meta(node, i) for i in range(4))
        if x is None or w is None or s is None or x.dtype not in floats:
            return False
        return all(t.dtype == x.dtype for t in (w, s) + ((b,) if b is not None else ()))

    def _reshape(ctx, t, dims, name):
        layer = ctx.net.add_shuffle(t)
        layer.reshape_dims = tuple(dims)
        layer.name = name
        return layer.get_output(0)

    def _add_plugin(ctx, desc, name):
        layer = ctx.net.add_plugin(desc, aot=True)
        layer.name = name
        return layer

    def _zeros(ctx, n, like, name):
        t = get_trt_tensor(ctx, np.zeros(n, dtype=np.float32), name)
        if like.dtype != trt.float32:
            layer = ctx.net.add_cast(t, like.dtype)
            layer.name = f"{name}_cast"
            t = layer.get_output(0)
        return t

    @dynamo_tensorrt_converter(torch.ops.kimi.kda.default, capability_validator=_kda_ok, supports_dynamic_shapes=True)
    def _convert_kda(ctx, target, args, kwargs, name):
        q, k, v, g, beta, state = (get_trt_tensor(ctx, a, f"{name}_{i}") for i, a in enumerate(args[:6]))
        scale = args[6] if len(args) > 6 and args[6] is not None else None
        HV, K, V = int(q.shape[2]), int(q.shape[3]), int(v.shape[3])
        flat = [_reshape(ctx, t, (0, 0, -1), f"{name}_{n}_flat") for t, n in ((q, "q"), (k, "k"), (v, "v"), (g, "g"))]
        desc = trtp.op.kimi.kda(*flat, beta, state, num_heads=HV, key_dim=K, value_dim=V,
                                scale=float(K ** -0.5 if scale is None else scale))
        layer = _add_plugin(ctx, desc, name)
        return _reshape(ctx, layer.get_output(0), (0, 0, HV, V), f"{name}_o"), layer.get_output(1)

    @dynamo_tensorrt_converter(torch.ops.kimi.short_conv.default, capability_validator=_conv_ok,
                               supports_dynamic_shapes=True)
    def _convert_short_conv(ctx, target, args, kwargs, name):
        x = get_trt_tensor(ctx, args[0], f"{name}_x")
        weight = get_trt_tensor(ctx, args[1], f"{name}_w")
        C, W = int(weight.shape[0]), int(weight.shape[1])
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        bias = _zeros(ctx, C, x, f"{name}_b") if bias is None else get_trt_tensor(ctx, bias, f"{name}_b")
        state = get_trt_tensor(ctx, args[3] if len(args) > 3 else kwargs["initial_state"], f"{name}_s")
        activation = args[4] if len(args) > 4 else kwargs.get("activation", "silu")
        desc = trtp.op.kimi.short_conv(x, weight, bias, state, channels=C, kernel_size=W, activation=str(activation))
        layer = _add_plugin(ctx, desc, name)
        return layer.get_output(0), layer.get_output(1)

    _TORCH_TRT_REGISTERED = True
    return True


if importlib.util.find_spec("torch_tensorrt") is not None:  # pragma: no cover - not installable here
    register_torch_tensorrt_converters()
