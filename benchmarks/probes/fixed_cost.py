"""Where the fixed cost of a short call goes (issue 18, item 6): blocking calls of T = 1 and a few
short lengths, ours against XLA's dense scan and the dispatch of a trivial jitted program.

    python benchmarks/probes/fixed_cost.py [--hidden 2304] [--density 0.1] [--batch 4]
        [--dtype float16] [--reps 300] [--out fixed_cost.json] [--trace DIR] [--hlo-dir DIR]

``--trace DIR`` also runs 100 calls of each T = 1 program under the JAX profiler and prints the
costliest host and device events per call (on a GPU, CUPTI's kernels and API calls beside XLA's
thunks): where a call's time goes outside its kernels' own device time.

Run under Nsight Compute (``ncu --clock-control none --metrics gpu__time_duration.sum``) with
``--ncu`` to get each kernel of one call with its device time: the probe then runs each program a
few times only. Each program is timed as the median of ``reps`` blocking calls on the host clock,
the programs interleaved call by call, inputs rotated over four sets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_sprnn as js

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.append(str(Path(__file__).resolve().parents[2]))
from benchmarks.ncu_csv import launches  # noqa: E402
from benchmarks.peers_jax import dense_scan, sync_floor_fn  # noqa: E402
from jax_sprnn import testing


def blocking_us(fns: dict, arg_sets, reps: int) -> dict:
    """Median wall time of a blocking call of each program, the programs interleaved call by call
    (so that a drifting host shifts them alike)."""
    for fn in fns.values():
        for args in arg_sets[:2]:
            jax.block_until_ready(fn(*args))
    times: dict = {name: [] for name in fns}
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def trace_per_call(fn, arg_sets, calls: int, log_dir: str, top: int | None = 20) -> list[dict]:
    """Run ``calls`` blocking calls under the JAX profiler (host threads and, on a GPU, CUPTI's
    kernels and API calls) and return the ``top`` costliest (plane, line, event) kinds per call (all
    of them for None): where a short call's time goes between XLA, our handler and the device,
    which Nsight Compute's one-kernel-at-a-time times do not show."""
    jax.block_until_ready(fn(*arg_sets[0]))
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # the Python tracer's events would swamp the rest
    opts.host_tracer_level = 2
    with jax.profiler.trace(log_dir, profiler_options=opts):
        for i in range(calls):
            jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    newest = max(Path(log_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    durations: dict = {}
    for plane in jax.profiler.ProfileData.from_file(str(newest)).planes:
        for line in plane.lines:
            for event in line.events:
                key = (plane.name, line.name, event.name[:70])
                durations.setdefault(key, []).append(event.duration_ns / 1e3)
    rows = [dict(plane=k[0], line=k[1], event=k[2], per_call=round(len(d) / calls, 2),
                 median_us=round(statistics.median(d), 2), us_per_call=round(sum(d) / calls, 2))
            for k, d in durations.items()]
    return sorted(rows, key=lambda r: -r["us_per_call"])[:top]


def programs(hidden: int, density: float, batch: int, dtype: str):
    dense, w, _, _ = testing.make_problem(0, hidden, batch, 1, density, dtype)
    kernel = jnp.asarray(dense, testing.DTYPES[dtype])
    return w, {
        "trivial jit (x + 1)": lambda x, h0: x + 1,
        "ours, [B, T, H]": lambda x, h0: js.sparse_rnn(x, h0, w, method="native"),
        "ours, [T, B, H]": lambda x, h0: js.sparse_rnn(jnp.swapaxes(x, 0, 1), h0, w, time_major=True,
                                                       method="native"),
        "dense lax.scan": lambda x, h0: dense_scan(x, h0, kernel),
    }


def floor_program(w, batch: int, steps: int):
    """The same grid's launch, workspace reset, exchange protocol and end-of-call check, with no weights and
    no cell: what a call of the persistent kernel costs before its own init and compute."""
    run = sync_floor_fn(w.meta, batch, steps)
    dummy = jnp.zeros((1,), jnp.float32)
    return lambda x, h0: run(dummy)


def summarize_ncu(path: str) -> None:
    """Each kernel of an ``ncu --csv --metrics gpu__time_duration.sum`` log with its median device
    time, in launch order of its first appearance."""
    found = launches(path)
    if not found:
        print("no ncu CSV in", path)
        return
    times: dict[str, list[float]] = {}
    for launch in found:
        if "gpu__time_duration.sum" in launch:
            times.setdefault(launch["kernel"][:90], []).append(launch["gpu__time_duration.sum"] / 1e3)
    for name, us in times.items():
        print(f"{statistics.median(us):9.2f} us  x{len(us):3d}  {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--steps", default="1,2,8")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--ncu", action="store_true", help="run each program 3 times, untimed")
    ap.add_argument("--only", help="run only the programs whose name contains this text")
    ap.add_argument("--hlo-dir", help="write each program's optimized HLO (its first length) here")
    ap.add_argument("--trace", metavar="DIR", help="also profile each T=1 program's calls (JAX "
                    "profiler) and print where a call's time goes; the traces stay in DIR")
    ap.add_argument("--out")
    ap.add_argument("--summarize-ncu", metavar="LOG", help="print the kernels of an ncu --csv log")
    args = ap.parse_args()
    if args.summarize_ncu:
        summarize_ncu(args.summarize_ncu)
        return
    w, progs = programs(args.hidden, args.density, args.batch, args.dtype)
    rng = np.random.default_rng(1)
    dt = testing.DTYPES[args.dtype]
    rows = []
    for T in (int(t) for t in args.steps.split(",")):
        sets = [(jnp.asarray(rng.standard_normal((args.batch, T, args.hidden)), dt),
                 jnp.asarray(rng.standard_normal((args.batch, args.hidden)) * 0.1, dt)) for _ in range(4)]
        progs_t = dict(progs)
        if jax.default_backend() == "gpu":  # (a CUDA target only)
            progs_t["sync floor (launch, reset, exchange, end check)"] = floor_program(w, args.batch, T)
        jitted = {}
        for name, fn in progs_t.items():
            if args.only and args.only not in name:
                continue
            f = jitted[name] = jax.jit(fn)
            if args.hlo_dir:
                Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
                safe = "".join(c if c.isalnum() else "_" for c in name)
                Path(args.hlo_dir, f"T{T}_{safe}.txt").write_text(f.lower(*sets[0]).compile().as_text())
            if args.ncu:
                for i in range(3):
                    jax.block_until_ready(f(*sets[i]))
        if args.ncu:
            continue
        for name, us in blocking_us(jitted, sets, args.reps).items():
            rows.append(dict(program=name, T=T, median_us=round(us, 1)))
            print(f"T={T:3d}  {name:24s} {us:8.1f} us", flush=True)
        if args.trace and T == 1:
            for name, f in jitted.items():
                safe = "".join(c if c.isalnum() else "_" for c in name)
                events = trace_per_call(f, sets, 100, str(Path(args.trace, safe)))
                rows.append(dict(program=name, T=T, trace=events))
                print(f"-- trace of {name}, T=1: us per call, events per call, median us, event")
                for e in events:
                    print(f"{e['us_per_call']:9.2f} {e['per_call']:6.2f} {e['median_us']:9.2f}  "
                          f"{e['line'][:28]:28s} {e['event']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, hidden=args.hidden,
                           density=args.density, batch=args.batch, dtype=args.dtype, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
