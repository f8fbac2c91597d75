"""Where a call of the speech example's recurrent layers spends its time (issue 16's speech row):
the stack of ``examples/speech`` (LayerNorm, input projections, bidirectional sparse layers) timed
as the example's speed table times it (each call waited for: its latency), the same calls issued
back to back (a stream's throughput), then ``--reps`` calls under the JAX profiler, each event kind
with its time per call: our persistent kernels' device time against XLA's kernels and the host.

    python benchmarks/probes/speech_layers.py [--hidden 256] [--layers 2] [--density 0.1]
        [--batch 1] [--steps 250] [--dtype float32] [--trace DIR] [--hlo FILE] [--out FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "examples"):  # the benchmarks package and the example's speech package
    if str(path) not in sys.path:
        sys.path.append(str(path))
from benchmarks.probes.fixed_cost import trace_per_call  # noqa: E402
from speech import bench, model  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--trace", metavar="DIR", help="keep the profiler's trace here")
    ap.add_argument("--hlo", metavar="FILE", help="write the sparse stack's optimized HLO here")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    config = model.ModelConfig(hidden=args.hidden, layers=args.layers, dtype=args.dtype,
                               rnn_impl="layer", method="native" if on_gpu else "auto")
    dense, sparse = bench.recurrent_stack_variables(config, args.density)
    inputs = bench._inputs(args.batch, args.steps, bench._stack_input_features(config),
                           jax.numpy.float32)
    if args.hlo:
        Path(args.hlo).write_text(sparse.lower(*inputs[0]).compile().as_text())
    times = {name: bench.median_ms(fn, inputs, args.reps)
             for name, fn in (("sparse", sparse), ("dense lax.scan", dense))}
    times["sparse, pipelined"] = pipelined_ms(sparse, inputs, args.reps)
    for name, ms in times.items():
        print(f"{name:17s} {ms:8.3f} ms per call", flush=True)
    events = trace_per_call(sparse, inputs, args.reps, args.trace or tempfile.mkdtemp(), top=None)
    ours, busy = device_us(events)
    print(f"our kernels: {ours:.1f} us a call of {1e3 * times['sparse']:.1f}; the device busy "
          f"{busy:.1f} us (XLA's kernels {busy - ours:.1f})")
    events = events[:40]
    print("-- the sparse stack under the JAX profiler: us per call, events per call, median us, event")
    for e in events:
        print(f"{e['us_per_call']:9.2f} {e['per_call']:6.2f} {e['median_us']:9.2f}  "
              f"{e['line'][:28]:28s} {e['event']}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            device=str(jax.devices()[0]), jax=jax.__version__, config=dataclasses.asdict(config),
            density=args.density, batch=args.batch, steps=args.steps, ms=times, ours_us=ours,
            device_busy_us=busy, trace=events),
            indent=1))


def device_us(events: list[dict]) -> tuple[float, float]:
    """(ours, busy): µs per call of our kernels (named "sprnn") and of every kernel, memset and
    copy on the device's stream lines. What a waited call adds to ``busy`` is the host's dispatch
    (PjRt, the command buffer's update and launch) and the wait, which back-to-back calls hide.
    The device planes' other lines and the host's planes do not count."""
    on_device = [e for e in events if "GPU" in e["plane"] and e["line"].startswith("Stream")]
    return (sum(e["us_per_call"] for e in on_device if "sprnn" in e["event"]),
            sum(e["us_per_call"] for e in on_device))


def pipelined_ms(fn, inputs: list, reps: int) -> float:
    """Milliseconds per call of ``reps`` calls issued back to back with one wait at the end: the
    throughput of a stream of independent calls, where the host's dispatch of one call overlaps
    the device's work on the one before (``bench.median_ms`` waits for each call: its latency)."""
    jax.block_until_ready(fn(*inputs[0]))
    start = time.perf_counter()
    jax.block_until_ready([fn(*inputs[i % len(inputs)]) for i in range(reps)])
    return 1e3 * (time.perf_counter() - start) / reps


if __name__ == "__main__":
    main()
