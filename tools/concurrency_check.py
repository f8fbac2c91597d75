"""Concurrency check: N Python threads, each running its own jitted sparse_rnn (a different layer,
dtype and shape; forward and jax.grad) many times at once. Every result must match its reference
and be bitwise equal to that job's first result, and each phase must finish before a deadline: a
deadlock is reported (with every thread's stack) and fails, it never hangs the caller (issue 8).

  python tools/concurrency_check.py [--threads 2] [--iters 500] [--timeout 300] [--out c.json]

Phases (--placement auto): "one" puts every thread on the first device (one JAX compute stream, so
the persistent kernels interleave on it); "each" gives thread k device k % n, run when two or more
devices are visible. Exit status: 0 passed, 1 a wrong result or error, 3 a phase missed its deadline.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (the problem pool, jobs and their checks)

# Layers of different sizes, dtypes and activations: forward only, or forward and grad.
THREAD_CONFIGS = (soak.GPU_POOL[0], soak.GPU_POOL[1], soak.GPU_POOL[4], soak.GPU_POOL[5],
                  soak.GPU_POOL[10], soak.GPU_POOL[6])


def _configs(threads: int, pool_kind: str):
    if pool_kind == "auto":
        pool_kind = "gpu" if soak.on_gpu() else "tiny"
    configs = [THREAD_CONFIGS[k % len(THREAD_CONFIGS)] for k in range(threads)]
    return configs if pool_kind == "gpu" else [c.tiny() for c in configs]


def _worker(jobs, iters, depth, barrier, report):
    """Run the thread's jobs round-robin, ``depth`` calls in flight, then check them in order."""
    barrier.wait()
    start = time.perf_counter()
    slots = [(job, v) for job in jobs for v in range(len(job.variants))]
    try:
        while report["calls"] < iters and not report["failures"]:
            done = report["calls"]
            pending = [slots[(done + i) % len(slots)] for i in range(min(depth, iters - done))]
            outs = [job.run(v) for job, v in pending]  # dispatch several before syncing
            for (job, v), out in zip(pending, outs):
                message = job.check(v, out)
                if message:
                    report["failures"].append(message)
            report["calls"] += len(pending)
    except Exception as e:  # an XLA error (e.g. a deferred kernel timeout) is a failure too
        report["failures"].append(f"{type(e).__name__}: {e}")
    finally:
        report["wall_s"] = round(time.perf_counter() - start, 3)
        report["max_rel_err"] = {job.name: job.max_err for job in jobs}


def run_phase(placement: str, threads: int, iters: int, timeout: float, *, depth: int = 4,
              pool_kind: str = "auto", seed: int = 0, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    devices = jax.devices()
    configs = _configs(threads, pool_kind)
    placed = [devices[k % len(devices)] if placement == "each" else devices[0]
              for k in range(threads)]
    # Build and compile everything first (one warm-up call per job input, checked), so the
    # deadline covers only the concurrent execution.
    thread_jobs = []
    for k, (cfg, dev) in enumerate(zip(configs, placed)):
        jobs = soak.build_jobs([cfg], seed=seed + 100 * k, device=dev)
        for job in jobs:
            for v in range(len(job.variants)):
                message = job.check(v, job.run(v))
                if message:
                    return {"placement": placement, "ok": False, "deadlock": False,
                            "failures": [f"warm-up: {message}"]}
        thread_jobs.append(jobs)
    reports = [{"thread": k, "device": str(placed[k]), "jobs": [j.name for j in jobs],
                "failures": [], "calls": 0} for k, jobs in enumerate(thread_jobs)]
    barrier = threading.Barrier(threads)
    workers = [threading.Thread(target=_worker, args=(jobs, iters, depth, barrier, rep),
                                name=f"sprnn-{k}", daemon=True)
               for k, (jobs, rep) in enumerate(zip(thread_jobs, reports))]
    start = time.perf_counter()
    for w in workers:
        w.start()
    deadline = start + timeout
    for w in workers:
        w.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - start
    stuck = [w.name for w in workers if w.is_alive()]
    if stuck:
        say(f"DEADLINE: {stuck} still running after {timeout:g} s; stacks follow", flush=True)
        faulthandler.dump_traceback(all_threads=True)
    error = soak.pending_error()
    failures = [f"thread {r['thread']}: {f}" for r in reports for f in r["failures"]]
    if stuck:
        failures.append(f"threads {stuck} did not finish within {timeout:g} s")
    if error:
        failures.append(f"pending kernel error: {error}")
    calls = sum(r["calls"] for r in reports)
    return {"placement": placement, "ok": not failures, "deadlock": bool(stuck),
            "threads": threads, "iters_per_thread": iters, "in_flight_per_thread": depth,
            "devices": sorted({r["device"] for r in reports}), "wall_s": round(wall, 3),
            "calls": calls, "calls_per_s": round(calls / wall, 1) if wall > 0 else None,
            "per_thread": reports, "failures": failures}


def run_concurrency(threads: int = 2, iters: int = 500, timeout: float = 300.0, *,
                    placement: str = "auto", depth: int = 4, pool_kind: str = "auto",
                    verbose: bool = True) -> dict:
    n = len(jax.devices())
    phases = {"auto": ["one"] + (["each"] if n >= 2 else []), "one": ["one"],
              "each": ["each"]}[placement]
    results = []
    for phase in phases:
        # "each" puts at least one thread on every device.
        count = max(threads, n) if phase == "each" else threads
        r = run_phase(phase, count, iters, timeout, depth=depth, pool_kind=pool_kind,
                      verbose=verbose)
        results.append(r)
        if verbose:
            print_phase(r)
        if r["deadlock"]:
            break  # stuck threads hold the devices: later phases would say nothing
    return {"ok": all(r["ok"] for r in results), "deadlock": any(r["deadlock"] for r in results),
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "device_count": n, "jax": jax.__version__, "phases": results}


def print_phase(r: dict) -> None:
    if "threads" not in r:  # failed during warm-up
        print(f"phase {r['placement']}: FAILED in warm-up: {r['failures']}")
        return
    print(f"phase {r['placement']}: {'PASSED' if r['ok'] else 'FAILED'}: {r['threads']} threads on "
          f"{r['devices']}, {r['calls']} calls in {r['wall_s']:.2f} s ({r['calls_per_s']} calls/s)")
    for t in r["per_thread"]:
        errs = ", ".join(f"{k.split()[0]} {v:.2g}" for k, v in t.get("max_rel_err", {}).items())
        print(f"  thread {t['thread']} on {t['device']}: {t['calls']} calls in "
              f"{t.get('wall_s', float('nan'))} s; {t['jobs'][0].split(' ', 1)[1]}; max rel err {errs}")
    for f in r["failures"]:
        print("  FAILURE:", f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=500, help="calls per thread")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each phase, seconds")
    p.add_argument("--placement", choices=("auto", "one", "each"), default="auto")
    p.add_argument("--depth", type=int, default=4, help="calls in flight per thread")
    p.add_argument("--pool", choices=("auto", "gpu", "tiny"), default="auto")
    p.add_argument("--out", help="write the summary as JSON here")
    a = p.parse_args(argv)
    s = run_concurrency(a.threads, a.iters, a.timeout, placement=a.placement, depth=a.depth,
                        pool_kind=a.pool)
    print(f"concurrency check {'PASSED' if s['ok'] else 'FAILED'} on {s['device_count']} x "
          f"{s['device']} (jax {s['jax']})")
    if a.out:
        Path(a.out).write_text(json.dumps(s, indent=1) + "\n")
    if s["deadlock"]:
        sys.stdout.flush()
        os._exit(3)  # threads stuck in a native call cannot be joined; do not wait for them
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
