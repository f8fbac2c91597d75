"""The persistent kernels' registers and local memory from a build's ``-Xptxas -v`` output, one
line per kernel (direction, dtype, tile, planes per pass, register tier, variant), in the format of
``benchmarks/results/ptxas_*.txt``:

    python tools/ptxas_table.py build.log [--diff OLD_TABLE]

``--diff`` prints only the kernels whose line differs from an earlier table (a kernel change's
effect on registers and spills). Build with ``-DJAX_SPRNN_PTXAS_VERBOSE=ON``.
"""
from __future__ import annotations

import argparse
import re
import sys

# PersistentConfig<Direction, T, TILE, RS, WIDE, PP> in its mangled name
_CONFIG = re.compile(r"sprnn_persistent_kernelINS0_16PersistentConfigILNS0_9DirectionE(\d)E"
                     r"(\w+?)Li(\d+)ELi(\d+)ELb([01])ELi(\d+)E")
_DIRECTIONS = ["forward", "backward", "lstm", "gru", "lstm_bwd", "gru_bwd"]
_TYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}


def table(log: str) -> list[str]:
    """One line per persistent kernel of a ptxas -v log."""
    rows, current, props = {}, None, None
    for line in log.splitlines():
        if "Compiling entry function" in line or "Function properties for" in line:
            m = _CONFIG.search(line)
            if "Compiling entry function" in line:
                current = m.groups() if m else None
            else:  # (a callee's properties may come between an entry's and its registers)
                props = m.groups() if m else None
            continue
        if props and "bytes stack frame" in line:
            nums = [int(n) for n in re.findall(r"(\d+) bytes", line)]
            rows.setdefault(props, {})["stack"] = nums
            props = None
        elif current and "Used" in line and "registers" in line:
            rows.setdefault(current, {})["regs"] = int(re.search(r"Used (\d+) registers", line).group(1))
    out = []
    for (d, t, tile, rs, wide, pp), v in sorted(rows.items(), key=lambda kv: (int(kv[0][0]), kv[0][1:])):
        stack, st, ld = v.get("stack", [0, 0, 0])
        out.append(f"{_DIRECTIONS[int(d)]:9s} {_TYPES.get(t, t):14s} tile{tile} pp{pp} rs{int(rs):3d} "
                   f"{'wide' if wide == '1' else 'narrow'} regs {v.get('regs', 0):3d} stack {stack:3d} "
                   f"spill st {st:3d} ld {ld:3d}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log")
    ap.add_argument("--diff", metavar="OLD_TABLE")
    args = ap.parse_args()
    lines = table(open(args.log).read())
    if not lines:
        sys.exit(f"no persistent kernel in {args.log} (built with -Xptxas -v?)")
    if args.diff:
        old = {ln.split(" regs")[0]: ln
               for ln in open(args.diff).read().splitlines() if not ln.startswith("#")}
        for ln in lines:
            before = old.get(ln.split(" regs")[0])
            if before != ln:
                print(f"- {before}\n+ {ln}")
        return
    print("\n".join(lines))


if __name__ == "__main__":
    main()
