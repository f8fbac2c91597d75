"""Where a kernel's instructions and stall samples go, by source line: an Nsight Compute profile's
per-instruction counters joined with the kernel's SASS and its line table.

    # the profile: tools/gpu_check.sh profile keeps it as $OUT/ncu_<case>.csv.gz
    # the SASS with lines, from a build of the same commit (-lineinfo, the same nvcc and arch):
    nvcc -arch=sm_90 -O3 -lineinfo --expt-relaxed-constexpr -std=c++17 -cubin -Icuda \
        -I<dir of jax_sprnn_constants.h> -o fwd.cubin <build>/generated/instances/forward_f16_tile1_pp1.cu
    # (one unit per recurrence, dtype, batch tile and planes a pass: CMakeLists.txt generates them)
    nvdisasm -c -gi fwd.cubin > fwd.sass
    python3 tools/ncu_lines.py ncu_case.csv.gz fwd.sass --per 8192   # launches' steps * warps

The profile's instructions are matched to the SASS by offset from the kernel's first one, and
every opcode is checked, so a profile of another build is refused rather than misread. Each
instruction counts toward the innermost source line of the persistent kernel's body
(persistent_body) it was inlined into, and toward its innermost source line of all; `--per`
divides the executed counts (e.g. by steps * warps for instructions per warp-step).
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import re
import sys
from pathlib import Path

FILE_LINE = re.compile(r'\s*//## File ".*?/([^/"]+)", line (\d+)')
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def kernel_sass(path: str, symbol: str) -> dict[int, tuple[list[tuple[str, int]], str]]:
    """offset -> (inlining chain of (file, line), innermost first; the instruction's text)."""
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f".text.{symbol}:")), None)
    if start is None:
        sys.exit(f"{path}: no function {symbol}")
    out, chain, fresh = {}, [], True
    for line in lines[start + 1:]:
        if line.lstrip().startswith(".section"):
            break
        m = FILE_LINE.match(line)
        if m:
            if fresh:
                chain, fresh = [], False
            chain.append((m.group(1), int(m.group(2))))
            continue
        m = INSTR.match(line)
        if m:
            out[int(m.group(1), 16)] = (list(chain), m.group(2))
            fresh = True
    return out


def mangled(kernel_name: str, sass_path: str) -> str:
    """The mangled name in the SASS of the profile's demangled kernel name (by its template
    arguments: direction, type, tile, register slots, wide, planes a pass, tiles)."""
    args = re.search(r"\(jax_sprnn::cuda::Direction\)(\d+), (\w+), \(int\)(\d+), \(int\)(\d+), "
                     r"\(bool\)(\d), \(int\)(\d+), \(bool\)(\d)", kernel_name)
    if args is None:
        sys.exit(f"not a persistent kernel: {kernel_name}")
    d, t, tile, rs, wide, pp, tiles = args.groups()
    key = f"DirectionE{d}E{len(t)}{t}Li{tile}ELi{rs}ELb{wide}ELi{pp}ELb{tiles}EE"
    names = {m.group(1) for m in re.finditer(r"^\.text\.(\S+):", open(sass_path).read(), re.M)}
    found = [n for n in names if "sprnn_persistent_kernel" in n and key in n]
    if len(found) != 1:
        sys.exit(f"{sass_path}: {len(found)} kernels match {key}")
    return found[0]


KERNEL_SOURCE = Path(__file__).resolve().parents[1] / "cuda" / "persistent_kernel.cuh"


def body_lines(source: Path) -> str:
    """``FILE:FIRST-LAST`` of persistent_body in `source`: its signature's line to the first line
    after it that is a lone ``}`` (the file's functions close at column 0)."""
    lines = source.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if "void persistent_body(" in line) + 1
    last = next(i for i in range(first, len(lines)) if lines[i] == "}") + 1
    return f"{source.name}:{first}-{last}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile_csv", help="ncu --page source --csv --print-source sass (.gz or not)")
    parser.add_argument("sass", help="nvdisasm -c -gi output of the same build")
    parser.add_argument("--per", type=float, default=1.0, help="divide executed counts by this")
    parser.add_argument("--body", default=None,
                        help="FILE:FIRST-LAST, the source lines of the kernel's body (default: "
                             "persistent_body in this checkout's cuda/persistent_kernel.cuh)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    opener = gzip.open if args.profile_csv.endswith(".gz") else open
    with opener(args.profile_csv, "rt") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    name = rows[0][1]
    header, body = rows[1], rows[2:]
    executed = header.index("Instructions Executed")
    stalls = header.index("Warp Stall Sampling (All Samples)")
    sass = kernel_sass(args.sass, mangled(name, args.sass))
    base = int(body[0][0], 16)
    body_file, span = (args.body or body_lines(KERNEL_SOURCE)).split(":")
    first, last = (int(v) for v in span.split("-"))
    by_body, by_inner = collections.Counter(), collections.Counter()
    stall_body, stall_inner = collections.Counter(), collections.Counter()
    total = total_stalls = 0.0
    for r in body:
        offset = int(r[0], 16) - base
        chain, text = sass.get(offset, (None, None))
        if text is None or text.split()[0] != r[1].split()[0]:
            if not (text and text.startswith("@") and r[1].strip().startswith("@")):
                sys.exit(f"offset {offset:#x}: the profile has '{r[1].strip()}', the SASS '{text}': "
                         "not the same build")
        n, s = float(r[executed].replace(",", "")), float(r[stalls].replace(",", ""))
        in_body = [ln for f, ln in chain if f == body_file and first <= ln <= last]
        where = in_body[0] if in_body else -1
        inner = chain[0] if chain else ("?", -1)
        by_body[where] += n
        stall_body[where] += s
        by_inner[inner] += n
        stall_inner[inner] += s
        total += n
        total_stalls += s
    print(f"{name[:120]}\n{total / args.per:.1f} instructions executed (per --per), "
          f"{total_stalls:.0f} stall samples")
    print(f"by line of the kernel body ({body_file}):")
    for line, n in by_body.most_common(args.top):
        print(f"  {line:6d} {n / args.per:9.1f} {100 * stall_body[line] / max(total_stalls, 1):5.1f}%")
    print("by innermost line:")
    for (f, line), n in by_inner.most_common(args.top):
        print(f"  {f}:{line} {n / args.per:9.1f} {100 * stall_inner[(f, line)] / max(total_stalls, 1):5.1f}%")


if __name__ == "__main__":
    main()
