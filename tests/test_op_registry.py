"""The op table (lowering/registry.py) covers every registered kimi op, and every name in it exists."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import kimi_compile.ops  # noqa: F401  (registers torch.ops.kimi)
from kimi_compile.lowering import plugin_spec, registry
from kimi_compile.lowering.onnx import custom_translation_table

FIELDS = ("reference", "fake", "cuda", "onnx", "onnx_fallback")


def _registered_ops() -> set[str]:
    return {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("kimi::")}


def test_every_registered_op_has_a_row_and_every_row_an_op():
    rows = {row.op for row in registry.OPS}
    assert len(rows) == len(registry.OPS), "duplicate rows"
    assert _registered_ops() - rows == set(), "ops without a row in lowering/registry.py"
    assert rows - _registered_ops() == set(), "rows for ops that are not registered"


@pytest.mark.parametrize("row", registry.OPS, ids=[r.op for r in registry.OPS])
def test_every_named_piece_exists(row):
    pytest.importorskip("triton")  # the cuda entries live in the Triton kernel modules
    for field in FIELDS:
        ref = getattr(row, field)
        if ref is not None:
            assert callable(registry.resolve(ref)), (row.op, field, ref)
    plugins = {s.op: s.plugin_id for s in plugin_spec.PLUGINS}
    assert row.tensorrt_plugin == plugins.get(row.op), (row.op, row.tensorrt_plugin, plugins.get(row.op))


def test_ops_without_tensorrt_plugin_are_stated():
    assert {r.op for r in registry.OPS if r.tensorrt_plugin is None and not r.op.endswith("_backward")} == {
        "kimi::attn_res", "kimi::attn_res_phase1", "kimi::attn_res_merge", "kimi::moe_experts", "kimi::kda_decode_",
        "kimi::moe_route"}
    # nor an ONNX lowering: training-only backward ops, the in-place decode form and the CUDA routing kernel are
    # never exported
    assert {r.op for r in registry.OPS if r.onnx is None} == (
        {r.op for r in registry.OPS if r.op.endswith("_backward")} | {"kimi::kda_decode_", "kimi::moe_route"})


def test_a_missing_row_or_name_is_caught(monkeypatch):
    with pytest.raises(KeyError, match="kimi::nope"):
        registry.row_for("kimi::nope")
    with pytest.raises(AttributeError):
        registry.resolve("kimi_compile.ops.kda.naive:no_such_function")


@pytest.mark.parametrize("fallback", [False, True])
def test_translation_table_is_the_registry(fallback):
    table = custom_translation_table(fallback)
    want = {getattr(torch.ops.kimi, n).default: registry.resolve(ref)
            for n, ref in registry.onnx_lowerings(fallback).items()}
    assert table == want and len(table) == 6
    kda_lowering = table[torch.ops.kimi.kda.default].__name__
    assert kda_lowering == ("kda_chunked" if fallback else "kda_linear_attention")


# ------------------------------------------------------------------------------------------------ README matrix

ROOT = Path(__file__).resolve().parents[1]
README_COLUMNS = {"reference": 2, "fake": 1, "cuda": 3, "onnx": 4, "onnx_fallback": 5}  # column of each field


def _readme_rows() -> dict[str, list[str]]:
    """The README's op matrix: op -> its cells (the rows whose first cell is a `kimi::` op)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `kimi::") and len(cells) == 8:
            rows[cells[0].strip("`")] = cells
    return rows


def _source_path(ref: str) -> str:
    """``"kimi_compile.ops.kda.naive:f"`` -> ``"ops/kda/naive.py:f"`` (the file in this checkout)."""
    module, _, attr = ref.partition(":")
    origin = Path(importlib.util.find_spec(module).origin).resolve()
    return f"{origin.relative_to(ROOT).as_posix()}:{attr}"


def test_readme_matrix_matches_the_op_table():
    readme = _readme_rows()
    assert set(readme) == {row.op for row in registry.OPS}, "README op matrix rows != lowering/registry.py rows"
    for row in registry.OPS:
        cells = readme[row.op]
        for field, col in README_COLUMNS.items():
            ref = getattr(row, field)
            if ref is None:
                assert cells[col].startswith("—"), (row.op, field, cells[col])
            else:
                assert f"`{_source_path(ref)}`" in cells[col], (row.op, field, cells[col], _source_path(ref))
        plugin = cells[6]
        assert (plugin == "none") if row.tensorrt_plugin is None else plugin.startswith(f"`{row.tensorrt_plugin}`"), (
            row.op, plugin)
        tests = re.findall(r"`(test_\w+\.py)`", cells[7])
        assert tests and all((ROOT / "tests" / t).is_file() for t in tests), (row.op, cells[7])


def test_readme_names_the_ops_without_a_plugin():
    text = (ROOT / "README.md").read_text()
    line = text[text.index("**No TensorRT plugin:**"):].split("\n\n", 1)[0]
    named = set(re.findall(r"`(kimi::\w+)`", line))
    # the ops that are exported (an ONNX lowering) but have no plugin; backward ops and kda_decode_ are not exported
    assert named == {r.op for r in registry.OPS if r.tensorrt_plugin is None and r.onnx is not None}
