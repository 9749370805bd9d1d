"""Ahead-of-time PTX of the plugin kernels: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` (no GPU needed), checked against the plugin calling convention.

Triton kernels bound to a plugin follow TensorRT's ahead-of-time calling convention: runtime parameters
``(input pointers..., int32 scalars..., output pointers...)``; Triton's hidden scratch pointers are passed
as null by TensorRT, so :func:`compile_ptx` refuses kernels that need scratch memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import re
from typing import Any, Optional

from ..plugin_spec import TRITON_DTYPE, KernelBinding, PluginSpec
from .kernels import fixed_launch, kernel_binding, kernel_constexprs
from .nodes import KernelVariant
from .ptxas import ptxas_check, ptxas_path

try:
    import triton
    from triton.backends.compiler import GPUTarget
except Exception:  # noqa: BLE001 - compile_ptx says so when called
    triton = None

__all__ = ["PTX_ARCHS", "PtxArtifact", "compile_ptx", "kernel_signature"]

PTX_ARCHS = (80, 90)


@dataclasses.dataclass
class PtxArtifact:
    variant: KernelVariant
    arch: int
    ptx: str
    kernel_name: str
    num_warps: int
    shared_mem: int  # what the launch asks for: max(compiled need, launch config)
    compiled_shared_mem: int  # Triton's metadata.shared
    target: str  # the .target line of the PTX (sm_80, sm_90, sm_90a)
    ptx_version: str
    signature: dict
    constexprs: dict

    def manifest_entry(self, file_name: str) -> dict:
        return dict(plugin=self.variant.plugin_id, key=self.variant.key(), attributes=self.variant.attrs,
                    dtype=self.variant.dtype, arch=self.arch, target=self.target, ptx_version=self.ptx_version,
                    file=file_name, kernel_name=self.kernel_name, num_warps=self.num_warps,
                    block_x=self.num_warps * 32, shared_mem=self.shared_mem,
                    compiled_shared_mem=self.compiled_shared_mem, signature=self.signature,
                    constexprs={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                for k, v in self.constexprs.items()},
                    sha256=hashlib.sha256(self.ptx.encode()).hexdigest())


def _runtime_params(fn) -> list[str]:
    params = getattr(fn, "params", None)
    if params is None:
        raise TypeError(f"{fn!r} is not a @triton.jit function")
    return [p.name for p in params if not p.is_constexpr]


def kernel_signature(spec: PluginSpec, binding: KernelBinding, fn, dtype: str) -> dict[str, str]:
    """The Triton signature of the plugin kernel, checked against the plugin ABI
    ``(input pointers, int32 scalars, output pointers)``."""
    names = _runtime_params(fn)
    in_dt, out_dt = spec.io_dtypes(dtype)
    n_in, n_sc, n_out = len(spec.inputs), len(binding.scalars), len(spec.outputs)
    if len(names) != n_in + n_sc + n_out:
        raise TypeError(f"{binding.kernel} has runtime parameters {names}; the {spec.plugin_id} plugin ABI needs "
                        f"{n_in} input pointers, {n_sc} int32 scalars and {n_out} output pointers")
    scalar_names = names[n_in:n_in + n_sc]
    if scalar_names != [n for n, _ in binding.scalars]:
        raise TypeError(f"{binding.kernel}: scalar parameters {scalar_names} != binding {[n for n, _ in binding.scalars]}")
    sig = {}
    for name, dt in zip(names[:n_in], in_dt):
        sig[name] = "*" + TRITON_DTYPE[dt]
    for name in scalar_names:
        sig[name] = "i32"
    for name, dt in zip(names[n_in + n_sc:], out_dt):
        sig[name] = "*" + TRITON_DTYPE[dt]
    return sig


def compile_ptx(variant: KernelVariant, arch: int, ptx_version: Optional[int] = None) -> PtxArtifact:
    """Compile the plugin kernel of ``variant`` to PTX for ``sm_<arch>`` (no GPU needed).

    Checks that the kernel follows the plugin ABI, that its block and shared memory do not depend on
    batch or length (they are fixed in the engine) and that it needs no global / profile scratch (TensorRT
    passes null there).  For sm_90 the ``sm_90a`` target Triton writes is relaxed to ``sm_90`` when Triton's
    ptxas for that arch accepts it (the kernel uses no arch-specific instruction), so the PTX also
    JIT-compiles on newer GPUs.
    """
    if triton is None:
        raise RuntimeError("compiling PTX needs Triton (pip install triton)")
    spec = variant.spec
    binding = kernel_binding(spec)
    if binding is None:
        raise RuntimeError(f"{spec.plugin_id} has no ahead-of-time Triton kernel")
    module = importlib.import_module(binding.module)
    fn = getattr(module, binding.kernel)
    launch_config = getattr(module, binding.launch_config)
    attrs = variant.attrs
    fixed = fixed_launch(spec, binding, attrs, launch_config, 1, 1)
    for b, t in ((3, 1), (2, 977), (16, 65536)):
        other = fixed_launch(spec, binding, attrs, launch_config, b, t)
        if other != fixed:
            raise ValueError(f"{binding.launch_config}: block / shared memory depend on batch or length "
                             f"({fixed} vs {other}); they must be fixed for an engine")
    constexprs = kernel_constexprs(spec, binding, attrs)
    signature = kernel_signature(spec, binding, fn, variant.dtype)
    options: dict[str, Any] = {"num_warps": fixed["num_warps"]}
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)
    src = triton.compiler.ASTSource(fn, signature, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=options)
    md = compiled.metadata
    for field_name in ("global_scratch_size", "profile_scratch_size"):
        if int(getattr(md, field_name, 0) or 0) != 0:
            raise RuntimeError(f"{binding.kernel} needs {field_name}={getattr(md, field_name)}; TensorRT's AOT "
                               "launch passes null scratch pointers")
    if int(getattr(md, "num_ctas", 1)) != 1 or bool(getattr(md, "launch_cooperative_grid", False)):
        raise RuntimeError(f"{binding.kernel}: clusters / cooperative launches are not supported by AOT plugins")
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    if target.endswith("a") and ptxas_path(arch) is not None:
        relaxed = re.sub(r"^(\.target\s+)sm_(\d+)a\b", r"\1sm_\2", ptx, count=1, flags=re.M)
        if ptxas_check(relaxed, f"sm_{target[3:-1]}")[0]:
            ptx, target = relaxed, target[:-1]
    version = re.search(r"^\.version\s+(\S+)", ptx, re.M).group(1)
    return PtxArtifact(variant=variant, arch=int(arch), ptx=ptx, kernel_name=md.name, num_warps=int(md.num_warps),
                       shared_mem=max(int(md.shared), int(fixed["shared_mem"])), compiled_shared_mem=int(md.shared),
                       target=target, ptx_version=version,
                       signature=signature, constexprs=dict(constexprs))


