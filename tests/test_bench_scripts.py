"""The benchmark scripts stay runnable: their CPU paths (no timing is asserted, only that rows come out with the
table's keys and that their correctness checks pass)."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module", autouse=True)
def bench_on_path():
    sys.path.insert(0, BENCH)
    yield
    sys.path.remove(BENCH)


def test_run_all_normalises_every_bench_row():
    import run_all
    attn = run_all._norm({"name": "attn_res fwd", "ms": 0.5, "gbps": 1234.0, "bytes": 1, "note": "ok"})
    assert attn == dict(workload="attn_res fwd", fla_ms=None, ours_ms=0.5, ratio=None, metric="1234 GB/s",
                        check="ok")
    model = run_all._norm(dict(workload="model prefill", ref_ms=2.0, ours_ms=1.0, metric="x tok/s", check="c"))
    assert model["fla_ms"] == 2.0 and model["ratio"] == 2.0 and model["workload"] == "model prefill"


def test_attn_res_bench_cpu_smoke():
    import bench_attn_res
    rows = bench_attn_res.cpu_smoke(report=[])
    checks = [r for r in rows if r["name"].startswith("check")]
    assert len(checks) >= 3 and all("OK" in r["note"] for r in checks), checks
    assert all(r["ms"] > 0 for r in rows if not r["name"].startswith("check"))


def test_model_bench_tiny_eager():
    import bench_model
    rows = bench_model.run([], tiny=True, compile=False, batches=(1,), prefill_T=16, ctx=8)
    names = [r["workload"] for r in rows]
    assert any(n.startswith("model prefill") for n in names) and any(n.startswith("model decode") for n in names)
    assert any("AttnRes" in n for n in names)
    assert all(r["ref_ms"] > 0 for r in rows)


def test_kda_regs_rows_name_every_constexpr():
    """Each row of bench/kda_regs.py gives every constexpr parameter of its kernel a value and a type to every
    runtime one (a kernel that gains a parameter would otherwise fail to compile there)."""
    import kda_regs
    rows = kda_regs.configs()
    assert len(rows) >= 8
    for name, fn, types, consts, *_ in rows:
        for p in fn.params:
            if p.is_constexpr:
                assert p.name in consts, (name, p.name)
            else:
                assert p.name in types, (name, p.name)


def test_kda_regs_code_hash_ignores_debug_info_only():
    import kda_regs
    ptx = ("//\n.version 8.4\n.target sm_90a\n.entry k()\n{\n\t.loc\t1 10 5\n\tadd.s32 \t%r1, %r2, 1;\n"
           "$L__tmp0:\n\tret;\n}\n\t.section\t.debug_info\n{\n.b8 1\n}\n")
    moved = ptx.replace(".loc\t1 10 5", ".loc\t1 12 7").replace(".b8 1", ".b8 2")
    changed = ptx.replace("add.s32 \t%r1, %r2, 1;", "add.s32 \t%r1, %r2, 2;")
    assert kda_regs._code_hash(ptx) == kda_regs._code_hash(moved)
    assert kda_regs._code_hash(ptx) != kda_regs._code_hash(changed)
