"""The ahead-of-time compile path of the TensorRT plugins: Triton -> PTX for sm_80 / sm_90, assembled by the
ptxas Triton itself picks for that arch, at the PTX version Triton picks (lowering/tensorrt/ptx.py, ptxas.py).

CI runs this file twice: under the Triton pinned in the test extra and under the newest Triton on the package
index (``.ci/run``; ``KIMI_EXPECT_TRITON`` names the version that run must see)."""

import os
import re
import stat
import types

import pytest

triton = pytest.importorskip("triton")

from kimi_compile.lowering import plugin_spec as ps  # noqa: E402
from kimi_compile.lowering import tensorrt as lt  # noqa: E402
from kimi_compile.lowering.tensorrt import ptxas as ptxas_mod  # noqa: E402


def test_the_expected_triton_is_the_one_imported():
    want = os.environ.get("KIMI_EXPECT_TRITON")
    if want is None:
        pytest.skip("KIMI_EXPECT_TRITON not set (only .ci/run's newest-Triton pass sets it)")
    assert triton.__version__ == want


VARIANTS = [
    (ps.KDA, dict(num_heads=2, key_dim=16, value_dim=32, scale=0.25), "float32"),
    (ps.KDA, dict(num_heads=1, key_dim=64, value_dim=64, scale=0.125), "bfloat16"),
    (ps.SHORT_CONV, dict(channels=96, kernel_size=4, activation="silu"), "float16"),
]


@pytest.mark.parametrize("arch", lt.PTX_ARCHS)
@pytest.mark.parametrize("spec,attrs,dtype", VARIANTS, ids=lambda v: getattr(v, "name", None))
def test_plugin_ptx_assembles_with_the_ptxas_triton_picks(spec, attrs, dtype, arch):
    from triton.backends.nvidia import compiler as nvidia_compiler

    art = lt.compile_ptx(lt.variant_for(spec, attrs, dtype), arch)
    assert art.target == f"sm_{arch}"
    want = lt.default_ptx_version(arch)
    assert want is not None and art.ptx_version == f"{want // 10}.{want % 10}"
    tool = lt.ptxas_tool(arch)
    if hasattr(nvidia_compiler, "get_ptxas"):
        assert tool.path == nvidia_compiler.get_ptxas(arch).path
    ok, log = lt.ptxas_check(art.ptx, art.target)
    assert ok, log
    # the entry follows the plugin calling convention: input pointers, int32 scalars, output pointers, then
    # at most Triton's two hidden scratch pointers (TensorRT passes null: compile_ptx checks they are unused)
    params = re.findall(r"^\s*\.param \.(\w+)\b.*_param_\d+", art.ptx, re.M)
    n_in, n_sc, n_out = len(spec.inputs), len(lt.kernel_binding(spec).scalars), len(spec.outputs)
    assert params[:n_in + n_sc + n_out] == ["u64"] * n_in + ["u32"] * n_sc + ["u64"] * n_out, params
    assert params[n_in + n_sc + n_out:] in ([], ["u64"], ["u64", "u64"]), params


def test_ptx_version_can_be_lowered_for_older_drivers():
    art = lt.compile_ptx(lt.variant_for(*VARIANTS[2]), 80, ptx_version=80)
    assert art.ptx_version == "8.0"
    assert lt.ptxas_check(art.ptx, art.target)[0]


# ------------------------------------------------------------------------------------------------ lookup


@pytest.fixture
def two_tools(tmp_path):
    """Two executables standing in for Triton >= 3.8's bin/ptxas and bin/ptxas-blackwell."""
    paths = {}
    for name in ("ptxas", "ptxas-blackwell"):
        p = tmp_path / name
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
        paths[name] = str(p)
    return paths


def test_lookup_uses_get_ptxas_per_arch(monkeypatch, two_tools):
    def get_ptxas(arch):  # Triton 3.9: the CUDA 13 ptxas from sm_90 on
        name = "ptxas" if arch < 90 else "ptxas-blackwell"
        return types.SimpleNamespace(path=two_tools[name], version="12.9" if arch < 90 else "13.4")

    def ptx_get_version(cuda_version):
        major, minor = map(int, cuda_version.split("."))
        return 80 + minor - 1 if major == 12 else 90 + (major - 13) * 10 + minor

    fake = types.SimpleNamespace(get_ptxas=get_ptxas, ptx_get_version=ptx_get_version)
    monkeypatch.setattr(ptxas_mod, "nvidia_compiler", fake)
    assert lt.ptxas_path(80) == two_tools["ptxas"]
    for arch in (90, "sm_90", "sm_90a", 100):
        assert lt.ptxas_path(arch) == two_tools["ptxas-blackwell"], arch
    assert (lt.default_ptx_version(80), lt.default_ptx_version("sm_90")) == (88, 94)


def test_lookup_falls_back_to_the_older_api(monkeypatch, two_tools):
    fake = types.SimpleNamespace(_path_to_binary=lambda name: (two_tools[name], "12.4"),
                                 ptx_get_version=lambda v: 84)
    monkeypatch.setattr(ptxas_mod, "nvidia_compiler", fake)
    assert lt.ptxas_tool(90) == lt.ptxas_tool(80) == (two_tools["ptxas"], "12.4")
    assert lt.default_ptx_version(90) == 84


@pytest.mark.parametrize("fake", [
    None,  # no Triton / no NVIDIA backend
    types.SimpleNamespace(),  # neither API
    types.SimpleNamespace(get_ptxas=lambda arch: (_ for _ in ()).throw(RuntimeError("Cannot find ptxas"))),
    types.SimpleNamespace(get_ptxas=lambda arch: types.SimpleNamespace(path="/nonexistent/ptxas", version="12.8")),
])
def test_lookup_without_a_usable_ptxas(monkeypatch, fake):
    monkeypatch.setattr(ptxas_mod, "nvidia_compiler", fake)
    assert lt.ptxas_path(90) is None and lt.default_ptx_version(90) is None
    assert lt.ptxas_check(".version 8.0", "sm_90") == (False, "ptxas not found")


@pytest.mark.parametrize("arch", ["sm90", "90x", "compute_90", ""])
def test_bad_arch_is_named(arch):
    with pytest.raises(ValueError, match="arch"):
        lt.ptxas_path(arch)
