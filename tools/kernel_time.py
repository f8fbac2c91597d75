"""The persistent kernel's device time per step, from Nsight Compute, free of the host's jitter.

    ncu --csv --print-units base --clock-control none --kernel-name regex:sprnn_persistent_kernel \
        --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
        python3 tools/kernel_time.py run --manifest m.json "simple 256 0.1 1 float16" ... > k.csv
    python3 tools/kernel_time.py summarize k.csv --manifest m.json

`run` calls each case (CELL HIDDEN DENSITY BATCH DTYPE [ctas=N] [k=K] [plan=B], as
tools/profile_case.py takes them: CELL simple, tiles, bidir, lstm or gru; plan=B the layout planned
for a batch of B; ctas=N a layout of at most N CTAs, k=K one of K
slots a lane) at two sequence lengths, WARMUP + CALLS times each, one persistent-kernel launch a
call, and writes the order of those calls to the manifest. `summarize` matches ncu's launches to it
and prints, per case, the median kernel duration at each length, the slope between them (µs per
step: the kernel's own step, where `benchmarks.run`'s wall-clock slope also holds the host's jitter,
±0.3 µs a step at these sizes), the warp instructions per step, and the layout that ran (what
`python -m benchmarks.cost_fit` reads to refit `jax_sprnn/cost.py`).
`tools/gpu_check.sh kerneltime` runs both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

# The repository, for benchmarks.ncu_csv: appended, so that jax_sprnn stays the installed one.
sys.path.append(str(Path(__file__).resolve().parents[1]))
from benchmarks.ncu_csv import launches  # noqa: E402

STEPS = (64, 256)
WARMUP = 2
CALLS = 5


def run(cases: list[str], manifest: Path) -> None:
    import jax

    from profile_case import option_call

    order = []
    for case in cases:
        cell, hidden, density, batch, dtype, *options = case.split()
        try:  # (both lengths packed before any launch: a layout that does not fit skips its case)
            calls = [option_call(cell, int(hidden), float(density), int(batch), dtype, steps, options)
                     for steps in STEPS]
        except SystemExit as e:
            print(f"skipped {case!r}: {e}", file=sys.stderr, flush=True)
            continue
        for steps, (w, f) in zip(STEPS, calls):
            try:  # a call the dispatcher refuses (a batch past the layout's limit) fails in
                jax.block_until_ready(f())  # compilation, before any launch: its case is skipped
            except ValueError as e:
                print(f"skipped {case!r} (T={steps}): {e}", file=sys.stderr, flush=True)
                break
            for _ in range(WARMUP + CALLS - 1):
                jax.block_until_ready(f())
            meta = w.meta
            layout = dict(cell=cell, hidden=int(hidden), batch=int(batch), dtype=dtype,
                          K=meta.slots_per_lane, ctas=meta.num_ctas,
                          warps_per_cta=meta.warps_per_cta, exchange=meta.exchange)
            order.append({"case": case, "steps": steps, "launches": WARMUP + CALLS, "layout": layout})
        # After every case, so that a run stopped by its time limit keeps the cases it finished.
        manifest.write_text(json.dumps(order))


def summarize(ncu_csv: Path, manifest: Path) -> list[dict]:
    if not manifest.exists():
        sys.exit(f"{manifest}: no manifest (its run finished no case)")
    order = json.loads(manifest.read_text())
    found = launches(ncu_csv)
    expected = sum(o["launches"] for o in order)
    if len(found) < expected:
        sys.exit(f"{ncu_csv}: {len(found)} kernel launches, the manifest expects {expected}")
    if len(found) > expected:  # a case cut off by the time limit, after the manifest's last one
        print(f"({len(found) - expected} launches past the manifest's cases ignored: a case that "
              f"did not finish)", file=sys.stderr)
    rows: dict[str, dict] = {}
    i = 0
    for o in order:
        timed = found[i + WARMUP:i + o["launches"]]
        i += o["launches"]
        row = rows.setdefault(o["case"], {"case": o["case"], **o.get("layout", {})})
        row[f"us_T{o['steps']}"] = statistics.median(k["gpu__time_duration.sum"] for k in timed) / 1e3
        row[f"all_us_T{o['steps']}"] = [round(k["gpu__time_duration.sum"] / 1e3, 2) for k in timed]
        row[f"inst_T{o['steps']}"] = statistics.median(k["smsp__inst_executed.sum"] for k in timed)
    t1, t2 = STEPS
    for case in [c for c, row in rows.items() if f"us_T{t2}" not in row]:
        print(f"({case!r}: no T={t2} launches, skipped)", file=sys.stderr)
        del rows[case]
    for row in rows.values():
        row["us_per_step"] = (row[f"us_T{t2}"] - row[f"us_T{t1}"]) / (t2 - t1)
        row["inst_per_step"] = (row[f"inst_T{t2}"] - row[f"inst_T{t1}"]) / (t2 - t1)
        print(f"{row['case']:28s} {row['us_per_step']:6.3f} µs/step  "
              f"{row['inst_per_step']:8.0f} warp-inst/step"
              f"  (T={t1}: {row[f'us_T{t1}']:.1f} µs, T={t2}: {row[f'us_T{t2}']:.1f} µs;"
              f" T={t2} launches {row[f'all_us_T{t2}']})")
    return list(rows.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--manifest", type=Path, required=True)
    r.add_argument("cases", nargs="+")
    s = sub.add_parser("summarize", help="one or more runs (each its CSV and manifest, in order)")
    s.add_argument("ncu_csv", type=Path, nargs="+")
    s.add_argument("--manifest", type=Path, nargs="+", required=True)
    s.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.what == "run":
        run(args.cases, args.manifest)
        return
    if len(args.ncu_csv) != len(args.manifest):
        parser.error(f"{len(args.ncu_csv)} CSV files but {len(args.manifest)} manifests: one each")
    rows, lost = [], []
    for ncu_csv, manifest in zip(args.ncu_csv, args.manifest):
        try:  # one run that lost its launches (Nsight Compute crashed, 2026-12-06) costs only its cases
            rows += summarize(ncu_csv, manifest)
        except SystemExit as e:
            print(f"skipped this run: {e}", file=sys.stderr)
            lost.append(str(ncu_csv))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if lost:
        sys.exit(f"{len(lost)} of {len(args.ncu_csv)} runs summarized nothing: {', '.join(lost)}")


if __name__ == "__main__":
    main()
