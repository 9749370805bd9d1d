"""Which Triton kernel implements each plugin ahead of time, and how the plugin launches it.

A plugin's :class:`~kimi_compile.lowering.plugin_spec.KernelBinding` names the kernel, its launch-config
function (the one the Triton launcher calls) and its compile-time constants; the functions here evaluate
those for concrete or symbolic shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Optional, Sequence

from .. import plugin_spec as ps
from ..plugin_spec import KDA, KernelBinding, PluginSpec
from .kda_plugin import kda_binding

__all__ = ["kernel_binding", "launch_params", "kernel_constexprs", "example_shapes", "fixed_launch"]


def kernel_binding(spec: PluginSpec) -> Optional[KernelBinding]:
    """The Triton kernel that implements ``spec`` ahead of time (None when its module is unavailable):
    ``kimi::short_conv`` -> ``ops/short_conv/kernel.py``; ``kimi::kda`` -> the token-loop kernel behind
    ``kda_plugin.kda_plugin_kernel``."""
    binding = kda_binding() if spec is KDA else spec.kernel
    if binding is None or importlib.util.find_spec(binding.module) is None:
        return None
    return binding


def launch_params(spec: PluginSpec, binding: KernelBinding, input_shapes: Sequence[Sequence[Any]],
                  attrs: dict[str, Any], launch_config=None) -> dict:
    """The launch the plugin asks TensorRT for: ``grid`` (3 entries), ``block``, ``shared_mem`` and the int32
    ``scalars``, from the binding's launch-config function (or ``launch_config`` given explicitly)."""
    if launch_config is None:
        launch_config = getattr(importlib.import_module(binding.module), binding.launch_config)
    args = [ps.resolve_dim(r, spec, input_shapes, attrs) for r in binding.launch_args]
    cfg = launch_config(*args)
    grid = tuple(cfg["grid"]) + (1,) * (3 - len(cfg["grid"]))
    return dict(grid=grid, block=(int(cfg["num_warps"]) * 32, 1, 1), shared_mem=cfg["shared_mem"],
                num_warps=int(cfg["num_warps"]),
                scalars=tuple(ps.resolve_dim(r, spec, input_shapes, attrs) for _, r in binding.scalars))



def fixed_launch(spec: PluginSpec, binding: KernelBinding, attrs: dict, launch_config, b: int, t: int) -> dict:
    """Block, shared memory and warps of the launch for batch ``b`` and length ``t`` (no grid)."""
    p = launch_params(spec, binding, example_shapes(spec, attrs, b, t), attrs, launch_config)
    return dict(block=p["block"], shared_mem=p["shared_mem"], num_warps=p["num_warps"])


def example_shapes(spec: PluginSpec, attrs: dict, b: int, t: int) -> list[tuple]:
    """Concrete input shapes for batch ``b`` and length ``t`` from the spec's dim names."""
    env = {"B": b, "T": t}
    if spec is KDA:
        env.update(HV=attrs["num_heads"], K=attrs["key_dim"], V=attrs["value_dim"])
    else:
        env.update(C=attrs["channels"], W=attrs["kernel_size"])

    def dim(name):
        if isinstance(name, int):
            return name
        return int(eval(name, {}, dict(env)))  # names like "HV*K", "W-1" over the env above

    return [tuple(dim(d) for d in t_.shape) for t_ in spec.inputs]


def kernel_constexprs(spec: PluginSpec, binding: KernelBinding, attrs: dict) -> dict:
    """The plugin kernel's compile-time constants for these attribute values."""
    fn = getattr(importlib.import_module(binding.module), binding.constexprs)
    return fn(**{k: (ps.resolve_dim(v, spec, [], attrs) if isinstance(v, str) and v.startswith("@") else v)
                 for k, v in binding.constexpr_args})


