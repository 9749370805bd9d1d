"""Triton turns an integer argument equal to 1 into a compile-time constant (a Python int), so ``arg.to(...)`` in a
kernel fails at T = 1 (decode) or B = 1 on a GPU, never under the interpreter that CI runs. Every integer argument
a kernel converts with ``.to`` must be listed in ``do_not_specialize``; this check runs on the CPU."""
from __future__ import annotations

import importlib
import re

import pytest

triton = pytest.importorskip("triton")

KERNEL_MODULES = ["kda.common", "kda.intra", "kda.chunk_pass", "kda.recurrent", "kda.backward", "short_conv.kernel",
                  "attn_res.kernel", "moe.decode"]


def _jit_functions():
    found = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"kimi_compile.ops.{mod_name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                found.setdefault(obj, f"{mod_name}.{name}")
    return found


def _kernels():
    """The launched kernels: jit functions that no other jit function calls (a helper's arguments are values
    inside a kernel, never specialised)."""
    found = _jit_functions()
    for fn, qualname in found.items():
        name = fn.fn.__name__
        if not any(re.search(rf"\b{name}\(", other.src) for other in found if other is not fn):
            yield qualname, fn


def test_kernels_found():
    names = [n for n, _ in _kernels()]
    # 5 KDA, 1 conv, 3 AttnRes, 2 MoE
    assert "short_conv.kernel.short_conv_kernel" in names and len(names) == 11, names
    assert "kda.common._seq_bounds" not in names  # a helper
    assert "kda.intra._kda_intra_kernel" in names and "kda.backward._kda_chunk_bwd_kernel" in names


@pytest.mark.parametrize("name,kernel", list(_kernels()), ids=[n for n, _ in _kernels()])
def test_converted_int_arguments_are_not_specialised(name, kernel):
    for p in kernel.params:
        if p.is_constexpr or not re.search(rf"\b{re.escape(p.name)}\.to\(", kernel.src):
            continue
        assert p.do_not_specialize, f"{name}: argument {p.name!r} is converted with .to() but may be specialised to 1"
