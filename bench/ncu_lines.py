"""Where a kernel's time goes, from Nsight Compute's source page (bench/device_run.sh ORDER=ncu_profile).

    python bench/ncu_lines.py OUT/ncu_src_sass.csv [--top 30]

The csv (``ncu --page source --csv --print-source cuda,sass``) lists, per source file, each source line's row
(its line number set) followed by that line's SASS rows (line number empty); both carry warp-stall samples.
Prints the stall reasons overall, the SASS opcodes and the source lines by share of samples, each with its
three largest stall reasons. Line rows and SASS rows are summed separately (adding both would count twice).
"""
from __future__ import annotations

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _int(x: str) -> int:
    return int(x) if x not in ("", "-") else 0


def summarize(path: str):
    lines, opcodes = collections.Counter(), collections.Counter()
    line_stalls, op_stalls = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    line_inst, text = collections.Counter(), {}
    header, fname = None, None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "File Path":
                fname = row[1].rsplit("/", 1)[-1]
                continue
            if row[0] == "Line No":
                header = row
                continue
            if header is None or len(row) < len(header) or row[header.index(SAMPLES)] in ("", "-"):
                continue
            samples = _int(row[header.index(SAMPLES)])
            stalls = {h[6:]: _int(row[i]) for i, h in enumerate(header)
                      if h.startswith("stall_") and "Not Issued" not in h}
            if row[0]:  # a source line's row
                key = (fname, row[0])
                lines[key] += samples
                line_inst[key] += _int(row[header.index(EXECUTED)])
                text[key] = row[1].strip()
                line_stalls[key].update(stalls)
            else:  # one SASS instruction: "[@P0] OPCODE.MODIFIERS operands"
                words = [w for w in row[3].split() if not w.startswith("@")]
                op = words[0].split(".")[0] if words else "?"
                opcodes[op] += samples
                op_stalls[op].update(stalls)
    return lines, line_stalls, line_inst, text, opcodes, op_stalls


def _top(counter: collections.Counter, total: int) -> str:
    return ", ".join(f"{k} {100 * v / max(total, 1):.0f}%" for k, v in counter.most_common(3))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    lines, line_stalls, line_inst, text, opcodes, op_stalls = summarize(a.csv)
    total = sum(lines.values())
    reasons = collections.Counter()
    for c in line_stalls.values():
        reasons.update(c)
    print(f"samples {total}; stall reasons: {_top(reasons, total)}")
    print("| opcode | samples % | top stalls |\n|---|---|---|")
    for op, n in opcodes.most_common(a.top // 2):
        print(f"| {op} | {100 * n / total:.1f} | {_top(op_stalls[op], n)} |")
    print("\n| line | samples % | instructions executed (M) | source | top stalls |\n|---|---|---|---|---|")
    for key, n in lines.most_common(a.top):
        print(f"| {key[0]}:{key[1]} | {100 * n / total:.1f} | {line_inst[key] / 1e6:.2f} | `{text[key][:70]}` | "
              f"{_top(line_stalls[key], n)} |")


if __name__ == "__main__":
    main()
