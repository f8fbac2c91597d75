"""The hottest SASS instructions of an Nsight Compute report, by warp-stall samples.

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 tools/ncu_hotspots.py sass.csv [--top 40]

Prints each instruction's share of the kernel's stall samples and of its not-issued samples, so a
profile names where a step's time goes (tools/gpu_check.sh profile runs both).
"""
import argparse
import csv
import sys


def _number(text):
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return 0.0


def _column(header, *needles):
    for i, name in enumerate(header):
        if all(n.lower() in name.lower() for n in needles):
            return i
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_path")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    with open(args.csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    start = next((i for i, r in enumerate(rows) if _column(r, "Source") is not None
                  and _column(r, "Warp Stall Sampling") is not None), None)
    if start is None:
        sys.exit(f"{args.csv_path}: no header with 'Source' and 'Warp Stall Sampling' columns")
    header, body = rows[start], rows[start + 1:]
    src = _column(header, "Source")
    addr = _column(header, "Address")
    alls = _column(header, "Warp Stall Sampling (All")
    idle = _column(header, "Warp Stall Sampling (Not")
    execd = _column(header, "Instructions Executed")
    total = sum(_number(r[alls]) for r in body if len(r) > alls) or 1.0
    total_idle = sum(_number(r[idle]) for r in body if idle is not None and len(r) > idle) or 1.0
    print(f"columns: {header}")
    print(f"{len(body)} instructions, {total:.0f} stall samples ({total_idle:.0f} not issued)")
    ranked = sorted(body, key=lambda r: -_number(r[alls]) if len(r) > alls else 0.0)
    for r in ranked[:args.top]:
        share = 100.0 * _number(r[alls]) / total
        share_idle = 100.0 * _number(r[idle]) / total_idle if idle is not None else float("nan")
        executed = _number(r[execd]) if execd is not None else float("nan")
        where = r[addr] if addr is not None else "?"
        print(f"{share:5.1f}% {share_idle:5.1f}%  exec {executed:10.0f}  {where:>6}  {r[src].strip()}")


if __name__ == "__main__":
    main()
