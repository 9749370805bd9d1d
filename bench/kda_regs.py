"""Registers / spills / shared memory of the KDA Triton kernels from an offline sm_90 compile (no GPU).

    python bench/kda_regs.py            # prints one table row per kernel configuration

The last column is an md5 of the PTX without its debug information (line records, DWARF sections): a
refactor that leaves it unchanged for every row leaves the compiled kernels as they were measured (same
Triton version assumed).

Compiles each kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` at the
bench shapes (H = HV = 32, K = V = 128, bf16 inputs, non-varlen), pointers marked 16-byte aligned like a
real launch, then runs Triton's bundled ``ptxas -v`` on the PTX for registers and spill bytes; shared
memory is ``compiled.metadata.shared``. Numbers are those of this machine's Triton (the device may run
another Triton version: counts can differ by a few registers)."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kimi_compile.ops.kda import backward, chunk_pass, intra, recurrent  # noqa: E402
from kimi_compile.ops.kda.common import KERNEL_CHUNK  # noqa: E402
from kimi_compile.ops.kda.tuning import current_tuning  # noqa: E402

H = HV = 32
K = V = 128
C = KERNEL_CHUNK


def _ptxas():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _code_hash(ptx: str) -> str:
    """md5 of the PTX code without debug information (.loc / .file lines, debug sections, temp labels)."""
    body = ptx.split(".section\t.debug", 1)[0]
    keep = [ln for ln in body.splitlines()
            if not ln.strip().startswith((".loc", ".file", "//")) and "$L__tmp" not in ln]
    return hashlib.md5("\n".join(keep).encode()).hexdigest()[:12]


def compile_stats(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int = 1, maxnreg=None):
    """types: runtime parameter name -> triton type ('*bf16', '*fp32', '*i32', 'i32', 'fp32')."""
    names = [n for n in fn.arg_names]
    constexprs = {n: v for n, v in constexprs.items() if n in names}
    sig = {}
    attrs = {}
    for i, n in enumerate(names):
        if n in constexprs:
            sig[n] = "constexpr"
            continue
        sig[n] = types[n]
        if types[n].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    src = triton.compiler.ASTSource(fn, sig, constexprs, attrs)
    comp = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = comp.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        out = subprocess.run([_ptxas(), f"-arch={target}", "-v", p, "-o", os.devnull],
                             capture_output=True, text=True)
    txt = out.stdout + out.stderr
    regs = re.findall(r"Used (\d+) registers", txt)
    spill_st = re.findall(r"(\d+) bytes spill stores", txt)
    spill_ld = re.findall(r"(\d+) bytes spill loads", txt)
    return dict(regs=int(regs[-1]) if regs else None, code=_code_hash(ptx),
                spill=f"{spill_st[-1] if spill_st else '?'}/{spill_ld[-1] if spill_ld else '?'}",
                shared=int(comp.metadata.shared), warps=num_warps, target=target)


def _types(fn, ptr_dtypes: dict, default_ptr="*bf16"):
    out = {}
    for n in fn.arg_names:
        if n in ptr_dtypes:
            out[n] = ptr_dtypes[n]
        elif n in ("T", "TT", "NS", "L"):
            out[n] = "i32"
        elif n in ("scale", "span_max"):
            out[n] = "fp32"
        else:
            out[n] = default_ptr
    return out


F32 = "*fp32"


def configs():
    cfg = current_tuning()
    common = dict(H=H, HV=HV, K=K, C=C, IS_VARLEN=False)
    rows = []
    # fused intra kernel (forward: bf16 A dots), as configured (the TX form), and the WU form (w and u formed in
    # the kernel; the backward's recompute) in three of its configs
    fz = intra._kda_intra_kernel
    tx = cfg.intra_form == "tx"
    t = _types(fz, dict(gam=F32, tinv="*bf16" if tx else F32, bsc=F32, flags="*i32", poison="*i32", cu=F32,
                        cseq=F32, cidx=F32))
    ci = dict(common, V=V, BK=min(128, cfg.intra_bk), BV=64, A_LOWP=True, PREC="tf32", STORE_T=False,
              PREFETCH=cfg.intra_prefetch, WU=not tx, INV_LOWP_LEVELS=intra.forward_inverse_lowp(tx, True),
              NONFINITE=cfg.nonfinite)
    for slow in (False, True):
        mx = None if slow else cfg.intra_maxnreg
        grp = cfg.intra_slow_group if slow else 1
        rows.append((f"fused _kda_intra_kernel {cfg.intra_form.upper()} form SLOW={slow} maxnreg={mx} "
                     f"prefetch={cfg.intra_prefetch}" + (f" group={grp}" if slow else ""), fz, t,
                     dict(ci, SLOW=slow, GROUP=grp), cfg.intra_warps, mx))
    rows.append(("fused _kda_intra_kernel TX form SLOW=False, no non-finite checks (nonfinite=False)", fz, t,
                 dict(ci, SLOW=False, GROUP=1, NONFINITE=False), cfg.intra_warps, cfg.intra_maxnreg))
    if tx:
        rows.append(("fused _kda_intra_kernel TX form SLOW=False, inverse on tf32 operands (float16 inputs)", fz, t,
                     dict(ci, SLOW=False, GROUP=1, INV_LOWP_LEVELS=0), cfg.intra_warps, None))
    t = _types(fz, dict(gam=F32, tinv=F32, bsc=F32, flags="*i32", poison="*i32", cu=F32, cseq=F32, cidx=F32))
    ci = dict(ci, INV_LOWP_LEVELS=0)  # the WU form (backward recompute) keeps tf32
    rows.append(("fused _kda_intra_kernel WU form SLOW=False prefetch=2 (backward recompute)", fz, t,
                 dict(ci, SLOW=False, GROUP=1, PREFETCH=2, WU=True), cfg.intra_warps, None))
    rows.append(("fused _kda_intra_kernel WU form SLOW=False maxnreg=168 prefetch=False", fz, t,
                 dict(ci, SLOW=False, PREFETCH=False, GROUP=1, WU=True), cfg.intra_warps, 168))
    rows.append(("fused _kda_intra_kernel WU form SLOW=False prefetch=1 (no early first loads)", fz, t,
                 dict(ci, SLOW=False, GROUP=1, PREFETCH=1, WU=True), cfg.intra_warps, None))
    # pass kernel (forward config, and the WU form's)
    fp = chunk_pass._kda_pass_kernel
    t = _types(fp, dict(gam=F32, poison="*i32", bsc=F32, h0=F32, ht=F32, hseg=F32, hs=F32, ubuf=F32, cu=F32,
                        cchunk=F32))
    ce = dict(H=H, HV=HV, K=K, V=V, BK=128, BV=cfg.pass_bv, C=C, NSEG=1, IS_VARLEN=False, USE_H0=True,
              STORE_O=True, STORE_HT=True, STORE_H=False, STORE_U=False, LOWP=True, PREC="tf32", TX=tx,
              NONFINITE=cfg.nonfinite)
    rows.append((f"_kda_pass_kernel fwd {cfg.intra_form.upper()} form", fp, t, ce, cfg.pass_warps, None,
                 cfg.pass_stages))
    rows.append((f"_kda_pass_kernel fwd {cfg.intra_form.upper()} form, no non-finite checks", fp, t,
                 dict(ce, NONFINITE=False), cfg.pass_warps, None, cfg.pass_stages))
    rows.append(("_kda_pass_kernel fwd WU form", fp, t, dict(ce, TX=False), cfg.pass_warps, None,
                 cfg.pass_stages))
    # backward chunk kernel
    fc = backward._kda_chunk_bwd_kernel
    st = "*bf16" if cfg.bwd_state_lowp else F32  # h, dh', U, dU as the backward stores them
    t = _types(fc, dict(tinv=F32, ubuf=st, dubuf=st, hs=st, dhs=st, flags="*i32", cu=F32, cseq=F32,
                        cidx=F32, dq=F32, dk=F32, dg=F32, dbeta=F32, dv=F32))
    for slow in (False, True):
        ce = dict(common, V=V, BK=min(128, cfg.bwd_bk), BV=min(128, cfg.bwd_bv), PREC="tf32", SLOW=slow,
                  QK_PER_HV=False)
        rows.append((f"_kda_chunk_bwd_kernel SLOW={slow}", fc, t, ce, cfg.bwd_warps, None))
    # backward reverse pass and the decode token loop
    fr = backward._kda_pass_bwd_kernel
    t = _types(fr, dict(w=F32, qg=F32, kg=F32, aqk=F32, gam=F32, dht=F32, dh0=F32, dhs=F32, dubuf=F32, cu=F32,
                        cchunk=F32))
    ce = dict(H=H, HV=HV, K=K, V=V, BK=128, BV=cfg.bwd_pass_bv, C=C, IS_VARLEN=False, USE_DHT=True,
              STORE_DH0=True, LOWP=False, PREC="tf32")
    rows.append(("_kda_pass_bwd_kernel fp32 intermediates", fr, t, ce, cfg.bwd_pass_warps, None))
    t = _types(fr, dict(gam=F32, dht=F32, dh0=F32, dhs=F32, dubuf=F32, cu=F32, cchunk=F32))
    for lowp in (False, True):
        ce = dict(ce, LOWP=lowp)
        rows.append((f"_kda_pass_bwd_kernel bf16 intermediates LOWP={lowp}", fr, t, ce, cfg.bwd_pass_warps,
                     None, cfg.bwd_pass_stages or 3))
    # the forward pass as the backward runs it (h and U stored, no o)
    fp = chunk_pass._kda_pass_kernel
    ce = dict(H=H, HV=HV, K=K, V=V, BK=128, BV=cfg.bwd_fpass_bv, C=C, NSEG=1, IS_VARLEN=False, USE_H0=True,
              STORE_O=False, STORE_HT=True, STORE_H=True, STORE_U=True, LOWP=False, PREC="tf32", TX=False,
              NONFINITE=cfg.nonfinite)
    t = _types(fp, dict(w=F32, u=F32, qg=F32, kg=F32, aqk=F32, gam=F32, poison="*i32", h0=F32, ht=F32, hseg=F32,
                        hs=F32, ubuf=F32, cu=F32, cchunk=F32))
    rows.append(("_kda_pass_kernel in bwd, fp32 intermediates", fp, t, ce, cfg.pass_warps, None,
                 min(2, cfg.bwd_fpass_stages)))  # what fit_stages leaves of the depth on an H200
    t = _types(fp, dict(gam=F32, poison="*i32", h0=F32, ht=F32, hseg=F32, hs=F32, ubuf=F32, cu=F32, cchunk=F32))
    rows.append(("_kda_pass_kernel in bwd, bf16 intermediates", fp, t, dict(ce, LOWP=cfg.bwd_pass_lowp),
                 cfg.pass_warps, None, cfg.bwd_fpass_stages))
    fd = recurrent._kda_recurrent_kernel
    t = _types(fd, dict(h0=F32, ht=F32, cu=F32))
    ce = dict(H=H, HV=HV, K=K, V=V, BK=128, BV=cfg.decode_bv, IS_VARLEN=False, USE_H0=True)
    rows.append(("_kda_recurrent_kernel (decode)", fd, t, ce, cfg.decode_warps, None))
    return rows


def main():
    import triton as _t
    print(f"# offline sm_90 compile, triton {_t.__version__}; H=HV={H} K=V={K} bf16, non-varlen")
    print("| kernel config | warps | registers | spill st/ld bytes | shared bytes | target | PTX md5 (no debug) |")
    print("|---|---|---|---|---|---|---|")
    for row in configs():
        name, fn, t, ce, warps, mx = row[:6]
        stages = row[6] if len(row) > 6 else 1
        try:
            s = compile_stats(fn, t, ce, warps, stages, mx)
            print(f"| {name} | {warps} | {s['regs']} | {s['spill']} | {s['shared']} | {s['target']} | {s['code']} |",
                  flush=True)
        except Exception as e:  # keep the other rows
            print(f"| {name} | {warps} | error {type(e).__name__}: {str(e)[:200]} | | | | |", flush=True)


if __name__ == "__main__":
    main()
