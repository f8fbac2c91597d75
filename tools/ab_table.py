"""The kernel-time table of an A/B run: each case's µs per step on the base and on every variant,
with the change against the base (tools/ab_check.sh prints it at the end of a run).

    python3 tools/ab_table.py out/base/kernel_time.json out/a/kernel_time.json [...]

A side is named by its folder (base, or the patch's name). A case a side did not run shows "-".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict[str, dict]:
    """``{case: row}`` of one side's tools/kernel_time.py summary."""
    return {row["case"]: row for row in json.loads(path.read_text())}


def table(sides: list[tuple[str, dict[str, dict]]]) -> list[str]:
    """The lines of the table: the first side is the base; per variant its µs per step and, where
    the base ran the case too, the change in percent (and in warp instructions per step)."""
    (base_name, base), variants = sides[0], sides[1:]
    cases = list(dict.fromkeys([*base, *(c for _, rows in variants for c in rows)]))
    width = max([len(c) for c in cases] + [4])
    head = f"{'case':{width}s}  {base_name:>9s}" + "".join(f"  {name:>24s}" for name, _ in variants)
    lines = [head]
    for case in cases:
        b = base.get(case)
        line = f"{case:{width}s}  " + (f"{b['us_per_step']:9.3f}" if b else f"{'-':>9s}")
        for _, rows in variants:
            v = rows.get(case)
            if v is None:
                line += f"  {'-':>24s}"
            elif b is None:
                line += f"  {v['us_per_step']:24.3f}"
            else:
                dt = 100.0 * (v["us_per_step"] / b["us_per_step"] - 1.0)
                di = 100.0 * (v["inst_per_step"] / b["inst_per_step"] - 1.0) if b["inst_per_step"] else 0.0
                line += f"  {v['us_per_step']:7.3f} ({dt:+5.1f}%, {di:+5.1f}% inst)"
        lines.append(line)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", type=Path, nargs="+", help="the base's kernel_time.json first")
    args = parser.parse_args(argv)
    if not args.summaries[0].exists():
        raise SystemExit(f"{args.summaries[0]}: no base summary (its kernel-time run failed)")
    sides = [(path.parent.name, load(path)) for path in args.summaries if path.exists()]
    print("\n".join(table(sides)))


if __name__ == "__main__":
    main()
