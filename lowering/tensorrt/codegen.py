"""The ``tensorrt.plugin`` registration module of a bundle, generated from the plugin descriptions.

The module is ``templates/plugin_runtime.py`` (manifest lookup, device query, JIT fallbacks: a real file)
followed by, for each plugin with PTX, the verbatim source of its launch-config function, and per plugin:
``@trtp.register`` (output shapes / dtypes from the shape and dtype rules), ``@trtp.autotune`` (the dtype
combinations with a kernel), ``@trtp.impl`` (calls the runtime's ``<name>_jit``) and, where PTX exists,
``@trtp.aot_impl`` returning the kernel name, the PTX, the launch parameters from the *same* launch-config
function the Triton launcher calls, and the int32 scalar arguments.
"""

from __future__ import annotations

import importlib
import inspect
import json
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from .. import plugin_spec as ps
from ..plugin_spec import AUTOTUNE_DTYPE, PLUGINS, KernelBinding, PluginSpec
from .kernels import kernel_binding

__all__ = ["RUNTIME_TEMPLATE", "registration_module_source", "launch_config_source"]

#: the fixed first part of every generated registration module
RUNTIME_TEMPLATE = Path(__file__).parent / "templates" / "plugin_runtime.py"
_PLUGIN_LIST_MARK = "@PLUGIN_LIST@"
_PLUGIN_SPECS_LINE = "PLUGIN_SPECS = {}  # @PLUGIN_SPECS@"


def _runtime_source(specs: Sequence[PluginSpec]) -> str:
    text = RUNTIME_TEMPLATE.read_text()
    if _PLUGIN_LIST_MARK not in text or _PLUGIN_SPECS_LINE not in text:
        raise RuntimeError(f"{RUNTIME_TEMPLATE} lost its {_PLUGIN_LIST_MARK} / {_PLUGIN_SPECS_LINE!r} markers")
    spec_table = {s.plugin_id: dict(inputs=list(s.input_names), outputs=list(s.output_names),
                                    attributes={a.name: _py_type(a.type) for a in s.attributes},
                                    standard_op=s.standard_op) for s in specs}
    text = text.replace(_PLUGIN_LIST_MARK, ", ".join(f"``{s.plugin_id}``" for s in specs))
    return text.replace(_PLUGIN_SPECS_LINE, f"PLUGIN_SPECS = {json.dumps(spec_table, indent=4)}")


def _dim_code(ref, spec: PluginSpec) -> str:
    if isinstance(ref, int):
        return repr(ref)
    if ref.startswith("@"):
        return ref[1:]
    name, _, axis = ref.partition(".")
    return f"{name}.shape_expr[{int(axis)}]"


def _py_type(t: type) -> str:
    return {int: "int", float: "float", str: "str"}[t]


def _plugin_source(spec: PluginSpec, binding: Optional[KernelBinding], dtypes_with_ptx: Sequence[str]) -> str:
    fname = f"{spec.namespace}_{spec.name}"
    in_params = ", ".join(f"{t.name}: trtp.TensorDesc" for t in spec.inputs)
    attr_params = ", ".join(f"{a.name}: {_py_type(a.type)}" for a in spec.attributes)
    first_t = next(t.name for t in spec.inputs if t.dtype == "T")
    n_out = len(spec.outputs)
    lines = [f"# ---- {spec.plugin_id}: {spec.doc}", ""]
    # register: shapes and dtypes from the spec's rules
    lines.append(f'@trtp.register("{spec.plugin_id}")')
    lines.append(f"def {fname}_desc({in_params}, {attr_params}) -> Tuple[{', '.join(['trtp.TensorDesc'] * n_out)}]:")
    outs = []
    for out in spec.outputs:
        dims = ", ".join(_dim_code(r, spec) for r in out.shape)
        dt = f"{first_t}.dtype" if out.dtype == "T" else f"trt.{out.dtype}"
        lines.append(f"    {out.name} = trtp.from_shape_expr(({dims},), dtype={dt})")
        outs.append(out.name)
    lines.append(f"    return {', '.join(outs)}")
    lines.append("")
    # autotune: dtype combinations
    combos = []
    for dt in (dtypes_with_ptx or spec.dtypes):
        ins, outs_dt = spec.io_dtypes(dt)
        combos.append(", ".join(AUTOTUNE_DTYPE[d] for d in ins + outs_dt))
    lines.append(f'@trtp.autotune("{spec.plugin_id}")')
    lines.append(f"def {fname}_autotune({', '.join(t.name for t in spec.inputs)}, outputs) -> List[trtp.AutoTuneCombination]:")
    lines.append(f"    return [{', '.join(f'trtp.AutoTuneCombination({c!r})' for c in combos)}]")
    lines.append("")
    # impl: the JIT fallback
    impl_in = ", ".join(f"{t.name}: trtp.Tensor" for t in spec.inputs)
    lines.append(f'@trtp.impl("{spec.plugin_id}")')
    lines.append(f"def {fname}_impl({impl_in}, {attr_params}, outputs: Tuple[trtp.Tensor], stream: int) -> None:")
    names = ", ".join(list(spec.input_names) + list(spec.attribute_names))
    lines.append(f"    {spec.name}_jit({names}, outputs, stream)")
    lines.append("")
    if binding is not None and dtypes_with_ptx:
        lines.append(f'@trtp.aot_impl("{spec.plugin_id}")')
        lines.append(f"def {fname}_aot_impl({in_params}, {attr_params}, outputs: Tuple[trtp.TensorDesc]"
                     ") -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:")
        attr_dict = ", ".join(f"{a.name}={a.name}" for a in spec.attributes)
        lines.append(f"    entry = select_kernel({spec.plugin_id!r}, dict({attr_dict}), _dtype_name({first_t}.dtype))")
        lines.append(f"    launch = {fname}_launch({', '.join(t.name for t in spec.inputs)}, {', '.join(a.name for a in spec.attributes)})")
        lines.append("    params = trtp.KernelLaunchParams()")
        lines.append('    params.grid_x, params.grid_y, params.grid_z = launch["grid"]')
        lines.append('    params.block_x = launch["block"][0]')
        lines.append('    params.shared_mem = max(launch["shared_mem"], entry["shared_mem"])  # compiled need, as Triton launches')
        lines.append('    scalars = trtp.SymIntExprs(len(launch["scalars"]))')
        lines.append('    for i, value in enumerate(launch["scalars"]):')
        lines.append("        scalars[i] = trtp.SymInt32(value)")
        lines.append('    return entry["kernel_name"].encode(), read_ptx(entry), params, scalars')
        lines.append("")
        # the launch computation, shared with tests: dim refs -> launch config
        lines.append(f"def {fname}_launch({', '.join(t.name for t in spec.inputs)}, {', '.join(a.name for a in spec.attributes)}):")
        lines.append(f'    """Grid / block / shared memory / int32 scalars of {spec.plugin_id} (symbolic in batch and length)."""')
        args = ", ".join(_dim_code(r, spec) for r in binding.launch_args)
        lines.append(f"    cfg = {binding.launch_config}({args})")
        lines.append('    grid = tuple(cfg["grid"]) + (1,) * (3 - len(cfg["grid"]))')
        scalars = ", ".join(_dim_code(r, spec) for _, r in binding.scalars)
        lines.append(f'    return dict(grid=grid, block=(cfg["num_warps"] * 32, 1, 1), shared_mem=cfg["shared_mem"], '
                     f"scalars=({scalars}{',' if len(binding.scalars) == 1 else ''}))")
        lines.append("")
    return "\n".join(lines) + "\n"


def launch_config_source(binding: KernelBinding) -> str:
    """The verbatim source of the binding's launch-config function (embedded in the generated module)."""
    fn = getattr(importlib.import_module(binding.module), binding.launch_config)
    return textwrap.dedent(inspect.getsource(fn))


def registration_module_source(manifest: Optional[dict] = None, specs: Sequence[PluginSpec] = PLUGINS) -> str:
    """Python source registering ``specs`` with ``tensorrt.plugin``; ``manifest`` is the PTX manifest
    (``{"kernels": [entry, ...]}`` as written by :func:`compile_ptx` users) deciding which plugins get an
    ``aot_impl`` and which dtypes autotune offers."""
    manifest = manifest or {"kernels": []}
    parts = [_runtime_source(specs)]
    embedded = set()
    for spec in specs:
        binding = kernel_binding(spec)
        dts = sorted({e["dtype"] for e in manifest["kernels"] if e["plugin"] == spec.plugin_id},
                     key=list(ps.COMPUTE_DTYPES).index)
        if binding is not None and dts and binding.launch_config not in embedded:
            parts.append(f"# launch config: verbatim copy of {binding.module}.{binding.launch_config}\n")
            parts.append(launch_config_source(binding) + "\n")
            embedded.add(binding.launch_config)
        parts.append(_plugin_source(spec, binding if dts else None, dts))
    return "\n\n".join(parts)


