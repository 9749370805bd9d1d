"""The benchmark scripts stay runnable: their CPU paths (no timing is asserted, only that rows come out with the
table's keys and that their correctness checks pass)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

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


def test_attn_res_sublayer_read_rows_on_cpu():
    """The per-sublayer depth read, timed in parts: stack, op, both, the op with the partial sum apart, and the
    plain add, each with its bytes."""
    import bench_attn_res
    rows = bench_attn_res.sublayer_read(report=[], Ns=(2, 3), T=5, D=8, dtype=torch.float32, device="cpu")
    assert len(rows) == 10 and all(r["ms"] > 0 and r["bytes"] > 0 for r in rows)
    by = {r["name"]: r["bytes"] for r in rows}
    assert by["sublayer T=5 N=3: stack + attn_res (the stacked read)"] == (3 * 3 + 1) * 5 * 8 * 4
    assert by["sublayer T=5 N=3: attn_res, partial apart (the model's read)"] == (3 + 1) * 5 * 8 * 4


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


def test_ncu_lines_sums_line_rows_and_sass_rows_apart(tmp_path):
    """Nsight Compute's source page lists each line's row and then its SASS rows, both with samples: the
    summary must count each sample once per view (a line's 7 samples are its two instructions' 3 + 4)."""
    import ncu_lines
    head = ('"Line No","Source","Address","Source","Warp Stall Sampling (All Samples)",'
            '"Instructions Executed","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"')
    csv_text = "\n".join([
        '"File Path","/x/kda_triton.py"', '"Function Name","_kda_intra_kernel"', head,
        '"10","gt = tl.load(g)","-","-","7","200","6","1","5"',
        '"","","0x10","      LDG.E.U16 R2, [R4]","3","100","3","0","3"',
        '"","","0x20","      @P0 PRMT R3, R2, 0x5410, R2","4","100","3","1","2"',
        '"11","G = tl.cumsum(gt, 0)","-","-","1","50","0","1","0"',
        '"","","0x30","      SHFL.UP PT, R5, R3, 0x1, RZ","1","50","0","1","0"',
    ])
    p = tmp_path / "src.csv"
    p.write_text(csv_text + "\n")
    lines, line_stalls, line_inst, text, opcodes, op_stalls = ncu_lines.summarize(str(p))
    assert lines == {("kda_triton.py", "10"): 7, ("kda_triton.py", "11"): 1}
    assert opcodes == {"LDG": 3, "PRMT": 4, "SHFL": 1}
    assert line_stalls[("kda_triton.py", "10")] == {"long_sb": 6, "wait": 1}
    assert line_inst[("kda_triton.py", "10")] == 200 and text[("kda_triton.py", "11")] == "G = tl.cumsum(gt, 0)"
    assert op_stalls["PRMT"] == {"long_sb": 3, "wait": 1}


def test_fp32_parity_check_tiny_cpu(tmp_path):
    """bench/check_fp32_parity.py's machinery at CPU-test widths: ours fp32 and transformers' PyTorch path (fp32
    and fp64) against kimi_compile in float64, every sublayer and router captured, the rows written as JSON."""
    pytest.importorskip("transformers")
    import json

    import check_fp32_parity
    out = tmp_path / "rows.json"
    rows = check_fp32_parity.main(["--tiny", "-T", "70", "--vocab", "256", "--experts", "8", "--top-k", "2",
                                   "--json", str(out)])
    by = {r["variant"]: r for r in rows}
    ours, hf32 = by["ours fp32 cpu"], by["hf fp32 cpu torch KDA, strict"]
    assert set(ours["sublayer_rel"]) == {"L0 KDA", "L0 MLP", "L1 KDA", "L1 MoE", "L2 KDA", "L2 MoE", "L3 MLA",
                                         "L3 MoE"}
    assert ours["route_flips"] == hf32["route_flips"] == {"L1": 0, "L2": 0, "L3": 0}
    assert ours["logits_rel"] < 1e-5 and max(ours["sublayer_rel"].values()) < 1e-5, ours
    assert hf32["logits_rel"] < 1e-4 and by["hf fp64 cpu (torch KDA, eager experts)"]["logits_rel"] < 1e-4
    assert ours["argmax_agree"] == 1.0 and by["setup"]["min_route_margin"]["L1"] > 0
    assert [r["variant"] for r in json.loads(out.read_text())] == [r["variant"] for r in rows]
