"""The benchmark suites of jax_sprnn, each sized for one 10-minute run on an H200.

    python -m benchmarks.run --suite paper|sweep|capacity|training|ablation|cpu|cluster|gated [--quick]
        [--out DIR]

Writes ``DIR/<suite>.json`` (rewritten after every row) and PNG plots, and prints a table. Every peer
runs in this process on the same inputs; per-step time is the slope between two sequence lengths of
the median of N timed calls (after warm-up, inputs rotated over several sets). Without a GPU the
suites run a tiny smoke grid (also forced by --smoke; the capacity suite's planner grid needs no GPU
and stays whole) and GPU-only peers say why they skipped. See benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

# The PyTorch peers share the GPU with JAX: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable (appended,
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # so an installed jax_sprnn still wins)

import jax  # noqa: E402

import jax_sprnn  # noqa: E402
from jax_sprnn import _native  # noqa: E402

from benchmarks import peers as peer_registry  # noqa: E402
from benchmarks.report import Recorder, environment  # noqa: E402
from benchmarks.suites import SUITES  # noqa: E402
from benchmarks.suites.common import Context, dtype_support, peer_header  # noqa: E402
from benchmarks.timing import Timing  # noqa: E402

#: per suite: (full, --quick) timing. Sweep trades repetitions for coverage.
TIMINGS = {
    "paper": (Timing(64, 256, reps=20, rotate=4), Timing(64, 256, reps=10, rotate=2)),
    "sweep": (Timing(64, 256, reps=7, rotate=2, max_seconds=1.0),
              Timing(64, 256, reps=7, rotate=2, max_seconds=1.0)),
    "capacity": (Timing(), Timing()),  # only its cuDNN probe times anything, with its own
    "training": (Timing(64, 256, reps=10, rotate=2), Timing(64, 256, reps=7, rotate=2)),
    "ablation": (Timing(64, 256, reps=20, rotate=4), Timing(64, 256, reps=10, rotate=2)),
    "cpu": (Timing(20, 100, reps=15, rotate=2), Timing(20, 100, reps=7, rotate=2)),
    "cluster": (Timing(64, 256, reps=10, rotate=2), Timing(64, 256, reps=7, rotate=2)),
    "gated": (Timing(64, 256, reps=10, rotate=2), Timing(64, 256, reps=7, rotate=2)),
}
SMOKE_TIMING = Timing(t1=8, t2=256, reps=7, rotate=2, warmup=1, max_seconds=1.0)
DEFAULT_PEERS = {"training": ("ours", "dense"), "ablation": ("ours",),  # ablation: its own variants
                 "cluster": ("ours", "dense", "cudnn", "cuda_graph", "floor"),
                 "gated": ("ours",)}  # gated: its own LSTM / GRU peers (--peers does not apply)


def _ints(text):
    return tuple(int(v) for v in text.split(",")) if text else None


def _floats(text):
    return tuple(float(v) for v in text.split(",")) if text else None


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, choices=sorted(SUITES))
    p.add_argument("--quick", action="store_true", help="a much smaller grid and fewer repetitions")
    p.add_argument("--smoke", action="store_true", help="tiny sizes that run anywhere (CPU tests)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench_out/<suite>)")
    p.add_argument("--peers", help=f"comma-separated subset of {','.join(peer_registry.ALL)}")
    p.add_argument("--budget-s", type=float, default=450,
                   help="start no new case after this many seconds (leaves room in a 10-minute "
                        "run for start-up, the case in flight and the plots)")
    p.add_argument("--t1", type=int)
    p.add_argument("--t2", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--rotate", type=int)
    p.add_argument("--hidden", type=_ints, help="sweep, gated, cluster: hidden sizes, e.g. 1152,2304")
    p.add_argument("--batch", type=_ints, help="sweep, gated, cluster: batch sizes")
    p.add_argument("--density", type=_floats, help="sweep, gated, cluster: densities")
    p.add_argument("--dtype", type=lambda s: tuple(s.split(",")),
                   help="sweep, gated, cluster: float16,float32,...")
    p.add_argument("--cell", type=lambda s: tuple(s.split(",")), help="gated: lstm,gru")
    p.add_argument("--parts", type=lambda s: tuple(s.split(",")),
                   help="gated: which of capacity,training,forward run (default: all three)")
    p.add_argument("--resume", type=Path, help="sweep: a previous sweep.json whose cases are kept")
    p.add_argument("--verify", action="store_true",
                   help="capacity: run the largest admitted layer once (10%% fp16 with --quick)")
    return p.parse_args(argv)


def timing_for(args, smoke: bool) -> Timing:
    base = SMOKE_TIMING if smoke else TIMINGS[args.suite][bool(args.quick)]
    given = {k: getattr(args, k) for k in ("t1", "t2", "reps", "rotate") if getattr(args, k)}
    return dataclasses.replace(base, **given)


def main(argv=None) -> Path:
    args = parse(argv)
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and _native.cuda_module() is None:
        sys.exit(f"jax_sprnn was imported from {Path(jax_sprnn.__file__).parent} without its CUDA "
                 "module: run from a folder where the installed package is found first (see "
                 "benchmarks/RESULTS.md), or build the modules in place")
    suite = SUITES[args.suite]
    smoke = args.smoke or not (on_gpu or getattr(suite, "RUNS_ON_CPU", False))
    if smoke and not args.smoke:
        print(f"no GPU ({jax.default_backend()} backend): running the smoke grid", flush=True)
    peers = peer_registry.select(args.peers, DEFAULT_PEERS.get(args.suite, tuple(peer_registry.ALL)))
    timing = timing_for(args, smoke)
    out_dir = args.out or Path("bench_out") / args.suite
    ctx = Context(out_dir=Path(out_dir), timing=timing, peers=peers, quick=args.quick, smoke=smoke,
                  budget_s=args.budget_s, hidden=args.hidden, batch=args.batch,
                  density=args.density, dtype=args.dtype, resume=args.resume, verify=args.verify,
                  cell=args.cell, parts=args.parts)
    ctx.recorder = Recorder(ctx.out_dir, args.suite, suite.columns(peers), dict(
        info=environment(), smoke=smoke, quick=args.quick, timing=dataclasses.asdict(timing),
        peers=peer_header(peers)))
    print(f"suite {args.suite} on {ctx.recorder.payload['info']['device']}: t1={timing.t1} "
          f"t2={timing.t2} reps={timing.reps} rotate={timing.rotate}; µs per step", flush=True)
    suite.run(ctx)
    ctx.recorder.set(info=environment(), dtype_support=dtype_support(ctx.recorder.rows),
                     elapsed_s=round(time.perf_counter() - ctx.started, 1))
    print(f"wrote {ctx.recorder.path} in {ctx.recorder.payload['elapsed_s']} s", flush=True)
    return ctx.recorder.path


if __name__ == "__main__":
    main()
