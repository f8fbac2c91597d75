"""Where a kernel's local-memory instructions sit, from ``cuobjdump -sass`` output (no Nsight needed).

    python tools/sass_local.py module.sass --match SUBSTRING [--dump matched.txt]

For every function whose name contains SUBSTRING: its instruction count, its calls, and each LDL/STL
(spill or stack traffic) with the loops that contain it. A loop is the span from a backward branch's
target to the branch. A spill inside the kernel's phase loop costs every step; one outside every loop,
or only around a call of a slow path, costs nothing in steady state.
"""
from __future__ import annotations

import argparse
import re
import sys

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b.*?(?:0x)?([0-9a-f]+)\s*$")


def functions(text: str):
    name, body = None, []
    for line in text.splitlines():
        if "Function :" in line:
            if name:
                yield name, body
            name, body = line.split("Function :", 1)[1].strip(), []
        elif name:
            m = INSTR.search(line)
            if m:
                body.append((int(m.group(1), 16), m.group(2)))
    if name:
        yield name, body


def loops(body):
    spans = []
    for addr, ins in body:
        if "BRA" in ins.split()[:3] or " BRA " in f" {ins} ":
            m = re.search(r"0x([0-9a-f]+)\s*$", ins)
            if m and int(m.group(1), 16) < addr:
                spans.append((int(m.group(1), 16), addr))
    return spans


def report(name: str, body) -> None:
    spans = loops(body)
    local = [(a, i) for a, i in body if re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", i)]
    calls = [(a, i) for a, i in body if re.match(r"(@!?U?P\w+\s+)?CALL\b", i)]
    print(f"\n{name[:160]}\n  {len(body)} instructions, {len(spans)} loops, {len(calls)} calls, "
          f"{len(local)} local-memory instructions")
    for a, i in calls:
        print(f"    {a:#07x} {i}")
    for a, i in local:
        inside = [(lo, hi) for lo, hi in spans if lo <= a <= hi]
        where = (", ".join(f"loop {lo:#x}-{hi:#x} ({(hi - lo) // 16} instrs)" for lo, hi in inside)
                 or "outside every loop")
        print(f"    {a:#07x} {i[:60]:60s} {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sass")
    ap.add_argument("--match", required=True)
    ap.add_argument("--dump", help="write the matched functions' SASS here")
    args = ap.parse_args()
    text = open(args.sass, errors="replace").read()
    matched = [(n, b) for n, b in functions(text) if args.match in n]
    if not matched:
        sys.exit(f"no function matches {args.match!r}")
    for name, body in matched:
        report(name, body)
    if args.dump:
        with open(args.dump, "w") as f:
            for name, body in matched:
                f.write(f"Function : {name}\n")
                f.writelines(f"/*{a:04x}*/ {i} ;\n" for a, i in body)


if __name__ == "__main__":
    main()
