"""Triton's ``ptxas`` for an architecture, and the PTX ISA version Triton emits for it, chosen the way Triton
itself chooses them (so a PTX file is always checked by the assembler that matches its ``.version``).

* Triton with ``triton.backends.nvidia.compiler.get_ptxas(arch)`` (3.7 - 3.9 here) returns the tool (path and CUDA
  version).  Triton >= 3.8 ships ``bin/ptxas`` (CUDA 12.x) and ``bin/ptxas-blackwell`` (CUDA 13.x) and uses
  the second from sm_90 on; its sm_90 PTX (``.version 9.x``) is rejected by the first.
* older Triton: ``compiler._path_to_binary("ptxas")`` returns ``(path, version)``.
* the PTX version is ``compiler.ptx_get_version(<that tool's CUDA version>)``, as Triton computes its default.

``TRITON_PTXAS_PATH`` / ``TRITON_PTXAS_BLACKWELL_PATH`` are honoured because Triton's own lookup is used.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

try:
    from triton.backends.nvidia import compiler as nvidia_compiler
except Exception:  # noqa: BLE001 - no Triton (or no NVIDIA backend): no ptxas
    nvidia_compiler = None

__all__ = ["PtxasTool", "ptxas_tool", "ptxas_path", "default_ptx_version", "ptxas_check"]


class PtxasTool(NamedTuple):
    path: str
    version: str  # CUDA release, "12.8"


def _arch_number(arch: Union[int, str]) -> int:
    """90 from 90, "sm_90", "sm_90a" or "90"."""
    if isinstance(arch, int):
        return arch
    m = re.fullmatch(r"(?:sm_)?(\d+)a?", str(arch))
    if m is None:
        raise ValueError(f"arch must be a compute capability like 90 or 'sm_90', got {arch!r}")
    return int(m.group(1))


def ptxas_tool(arch: Union[int, str] = 90) -> Optional[PtxasTool]:
    """The ptxas Triton uses for ``arch`` (None without Triton's NVIDIA backend or when it has no ptxas)."""
    if nvidia_compiler is None:
        return None
    arch = _arch_number(arch)
    try:
        if hasattr(nvidia_compiler, "get_ptxas"):
            tool = nvidia_compiler.get_ptxas(arch)
            path, version = tool.path, tool.version
        elif hasattr(nvidia_compiler, "_path_to_binary"):
            path, version = nvidia_compiler._path_to_binary("ptxas")
        else:
            return None
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        return None
    if not path or not Path(path).is_file() or not os.access(path, os.X_OK):
        return None
    return PtxasTool(str(path), str(version))


def ptxas_path(arch: Union[int, str] = 90) -> Optional[str]:
    """Path of the ptxas Triton uses for ``arch``, or None."""
    tool = ptxas_tool(arch)
    return None if tool is None else tool.path


def default_ptx_version(arch: Union[int, str]) -> Optional[int]:
    """The PTX ISA version (e.g. 87 for 8.7) Triton writes for ``arch`` when no ``ptx_version`` is given."""
    tool = ptxas_tool(arch)
    if tool is None or not hasattr(nvidia_compiler, "ptx_get_version"):
        return None
    return int(nvidia_compiler.ptx_get_version(tool.version))


def ptxas_check(ptx: str, arch: Union[int, str]) -> tuple[bool, str]:
    """Assemble ``ptx`` for ``arch`` (``"sm_90"``, ``"sm_90a"`` or 90) with the ptxas Triton uses for that
    architecture; returns (ok, ptxas's output)."""
    target = arch if isinstance(arch, str) and arch.startswith("sm_") else f"sm_{_arch_number(arch)}"
    exe = ptxas_path(arch)
    if exe is None:
        return False, "ptxas not found"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([exe, f"-arch={target}", str(src), "-o", os.devnull], capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()
