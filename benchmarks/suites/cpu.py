"""cpu: jax_sprnn's C++ CPU kernels against XLA's dense lax.scan, on the CPU, per call.

    python -m benchmarks.run --suite cpu [--quick] [--budget-s 1800]

Four peers on the same inputs: ``sparse_rnn(method='native')`` (the C++ kernel) and the dense
``lax.scan`` of the storage dtype, each forward only and forward + backward (the gradient with
respect to x, h0 and the weights: on the nonzeros for ours, the dense kernel for lax.scan). Grid:
H in {256, 512, 1024, 2048}, 10% density, B in {1, 4, 16}, float32 and float16. Ours and dense run
in turns, call for call (after warm-up, inputs rotated), at T1 and T2, so that both see the same
load on a shared machine; each keeps the median of its N calls. The table shows milliseconds per
call at T2 and the speedup over dense; the JSON also the per-step slope and the fixed cost per call
(the kernel rebuilds its rows once per call), and the fastest call.

The JSON's ``crossovers`` give, per dtype, batch and direction, the smallest H of the grid from
which the kernel is faster than dense at every larger H (what ``auto`` on the CPU should follow);
``targets`` checks issue 18's goals (at least dense's speed at H >= 512, 3x at H >= 2048). The
load average is recorded before and after: on a shared machine both peers slow down together.

It measures the CPU backend (on a GPU machine: JAX_PLATFORMS=cpu). A full run (not smoke) also
copies its JSON to benchmarks/results/cpu_<date>.json.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jax_sprnn as js
from jax_sprnn import fallback

from .. import plots
from ..harness import Case, Peer, Skip, as_numpy
from ..peers_jax import ALL_DTYPES, DENSE, OURS, auto_choice, jax_runner
from ..problems import SHORT, Layer, rel_err
from ..report import Column
from . import training
from ..timing import per_step, wall_clock
from .common import Context, forward_reference

#: wanted by the CPU suite however run.py was asked (its timing is its own: see run.TIMINGS)
RUNS_ON_CPU = True

HIDDEN = (256, 512, 1024, 2048)
QUICK_HIDDEN = (512, 2048)
BATCH = (1, 4, 16)
DTYPES = ("float32", "float16")
DENSITY = 0.1
SMOKE = [(64, 2, "float32"), (64, 2, "float16")]  # (H, B, dtype)
RESULTS = Path(__file__).resolve().parents[1] / "results"

FWD = Peer("ours", "sparse_rnn(method='native'): the C++ CPU kernel, forward", ALL_DTYPES,
           OURS.build, competitor=False)
DENSE_FWD = Peer("dense", "lax.scan of tanh(x_t + h @ K), dense K in the storage dtype, forward",
                 ALL_DTYPES, DENSE.build)
GRAD = Peer("ours_grad", "forward + backward through the C++ CPU kernel (gradient on the nonzeros)",
            ALL_DTYPES, training.OURS.build, competitor=False)
DENSE_GRAD = Peer("dense_grad", "forward + backward through the dense lax.scan", ALL_DTYPES,
                  training.DENSE.build)


def _build_path(method: str):
    def build(layer: Layer, batch: int, T: int):
        fn = lambda x, h0, w: js.sparse_rnn(x, h0, w, time_major=True, method=method)  # noqa: E731
        return jax_runner(fn, layer, batch, T, layer.weights)
    return build


def _build_dense_path(layer: Layer, batch: int, T: int):
    def fn(x, h0, w):
        lengths = jnp.full((x.shape[1],), x.shape[0], jnp.int32)
        return fallback.forward(x, h0, w.values, w.indices, w.lane_row, lengths, activation="tanh",
                                reverse=False, meta=w.meta)
    return jax_runner(fn, layer, batch, T, layer.weights)


#: What ``method="auto"`` runs, and the path it runs where it does not take the kernel: XLA's
#: dense scan of the kernel built from the packed layout in every call (the dense peer above keeps
#: a dense K, which a SparseWeights user does not have).
AUTO_FWD = Peer("auto", "sparse_rnn(method='auto'), forward", ALL_DTYPES, _build_path("auto"),
                competitor=False)
DENSE_PATH_FWD = Peer("dense_path", "XLA's dense path of sparse_rnn: K built from the packed layout "
                      "in every call, then lax.scan, forward", ALL_DTYPES, _build_dense_path,
                      competitor=False)
#: The first two peers of a direction are ours and its dense peer (speedup, crossovers, targets).
DIRECTIONS = {"forward": (FWD, DENSE_FWD, AUTO_FWD, DENSE_PATH_FWD), "grad": (GRAD, DENSE_GRAD)}
#: Short calls (streaming chunks): T = 1 and 3, forward only, where building K or the rows is most
#: of a call.
SHORT_TIMING = dict(t1=1, t2=3)
SHORT_GRID = [(256, 4, "float32"), (1024, 4, "float32"), (2048, 4, "float32"), (1024, 1, "float16")]


def cpu_info() -> dict:
    """The CPU the numbers were taken on, and how busy it was."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=model, cores=os.cpu_count(), load_average=os.getloadavg(),
                isa_override=os.environ.get("JAX_SPRNN_CPU_ISA"),
                threads_cap=os.environ.get("JAX_SPRNN_CPU_THREADS"))


def speedup(row: dict, direction: str) -> float | None:
    """Dense's time per call over ours (> 1: the kernel is faster). A ratio of whole calls, so it
    exists whenever both were timed, even where a noisy per-step slope came out <= 0."""
    ours, dense = (row["peers"].get(p.name) or {} for p in DIRECTIONS[direction][:2])
    if not (ours.get("call_ms", 0) > 0 and dense.get("call_ms", 0) > 0):
        return None
    return dense["call_ms"] / ours["call_ms"]


def measure_pair(pair, case: Case) -> dict:
    """Each peer of ``pair`` timed in turns with the other at T1 and T2 (the median of the timing's
    calls), its per-step slope and fixed cost, and its error against the case's reference."""
    timing = case.timing
    results = {p.name: {} for p in pair}
    medians = {p.name: {} for p in pair}
    for T in (timing.t1, timing.t2):
        runners, sets = {}, {}
        for p in pair:
            if "skipped" in results[p.name] or "error" in results[p.name]:
                continue
            try:
                runners[p.name] = p.build(case.layer, case.batch, T)
            except Skip as e:
                results[p.name] = dict(skipped=str(e))
                continue
            except Exception as e:  # one failing peer must not hide the other
                results[p.name] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
                continue
            sets[p.name] = [runners[p.name].prepare(*inp) for inp in case.inputs(T)]
        times = {name: [] for name in runners}
        for i in range(timing.warmup + timing.reps):
            order = list(runners) if i % 2 == 0 else list(reversed(runners))
            for name in order:
                seconds = wall_clock(runners[name].run, [sets[name][i % len(sets[name])]])
                if i >= timing.warmup:
                    times[name].append(seconds)
        for name, runner in runners.items():
            medians[name][T] = statistics.median(times[name])
            results[name]["min_ms"] = min(times[name]) * 1e3
            if T == timing.t1 and runner.check is not None:
                out = as_numpy(runner.check(runner.run(*sets[name][0])))
                results[name]["rel_err"] = rel_err(out, case.expected())
    for name, at in medians.items():
        if len(at) == 2:
            results[name].update(per_step(at.__getitem__, timing.t1, timing.t2))
    jax.clear_caches()  # programs compiled for this size are not needed again
    return results


def measure_case(ctx: Context, hidden: int, batch: int, dtype: str) -> dict:
    layer = Layer.make(hidden, DENSITY, dtype)
    row = dict(hidden=hidden, density=layer.density, batch=batch, dtype=dtype, nnz=layer.nnz,
               T=ctx.timing.t2, auto=auto_choice(layer, batch, ctx.timing.t2), peers={})
    row["peers"].update(measure_pair(DIRECTIONS["forward"], Case(layer, batch, ctx.timing,
                                                                  forward_reference)))
    row["peers"].update(measure_pair(DIRECTIONS["grad"], Case(layer, batch, ctx.timing,
                                                               training.grad_reference)))
    for direction in DIRECTIONS:
        row[f"speedup_{direction}"] = speedup(row, direction)
    row["auto_over_best"] = auto_over_best(row)
    return row


def measure_short(ctx: Context, hidden: int, batch: int, dtype: str) -> dict:
    """A short call (T = 1 and 3), forward only: the kernel, auto, and both dense paths."""
    layer = Layer.make(hidden, DENSITY, dtype)
    timing = dataclasses.replace(ctx.timing, **SHORT_TIMING)
    row = dict(kind="short", hidden=hidden, density=layer.density, batch=batch, dtype=dtype,
               nnz=layer.nnz, T=timing.t2, auto=auto_choice(layer, batch, timing.t2), peers={})
    row["peers"].update(measure_pair(DIRECTIONS["forward"], Case(layer, batch, timing,
                                                                  forward_reference)))
    row["speedup_forward"] = speedup(row, "forward")
    row["auto_over_best"] = auto_over_best(row)
    return row


def auto_over_best(row: dict) -> float | None:
    """``method="auto"``'s call time over the faster of the two paths it chooses between (the
    kernel and the dense path of the packed weights): issue 18 asks for at most 1.1."""
    times = {name: (row["peers"].get(name) or {}).get("call_ms", 0) for name in
             (FWD.name, DENSE_PATH_FWD.name, AUTO_FWD.name)}
    if not all(t > 0 for t in times.values()):
        return None
    return times[AUTO_FWD.name] / min(times[FWD.name], times[DENSE_PATH_FWD.name])


def crossovers(rows) -> dict:
    """Per ``dtype/batch/direction``: the smallest H from which ours is faster at every larger H of
    the grid (None: never, or not at the largest)."""
    out = {}
    rows = [r for r in rows if r.get("kind") != "short"]
    keys = sorted({(r["dtype"], r["batch"]) for r in rows if "peers" in r})
    for dtype, batch in keys:
        cells = sorted((r for r in rows if "peers" in r and (r["dtype"], r["batch"]) == (dtype, batch)),
                       key=lambda r: r["hidden"])
        for direction in DIRECTIONS:
            from_h = None
            for r in reversed(cells):
                s = r.get(f"speedup_{direction}")
                if s is None or s < 1:
                    break
                from_h = r["hidden"]
            out[f"{dtype}/{batch}/{direction}"] = from_h
    return out


def targets(rows) -> list[dict]:
    """Issue 18's goals per row: at least dense's speed at H >= 512, 3x at H >= 2048 (the long
    rows), and ``auto`` at most 10% over the faster of its two paths (every row)."""
    out = []
    for r in rows:
        if r.get("auto_over_best") is not None:
            out.append(dict(hidden=r["hidden"], batch=r["batch"], dtype=r["dtype"], T=r["T"],
                            direction="auto", ratio=r["auto_over_best"], goal=1.1,
                            met=r["auto_over_best"] <= 1.1))
        if r.get("kind") == "short":
            continue
        for direction in DIRECTIONS:
            s = r.get(f"speedup_{direction}")
            goal = 3.0 if r["hidden"] >= 2048 else 1.0 if r["hidden"] >= 512 else None
            if goal is not None and s is not None:
                out.append(dict(hidden=r["hidden"], batch=r["batch"], dtype=r["dtype"],
                                direction=direction, speedup=s, goal=goal, met=s >= goal))
    return out


def run(ctx: Context) -> None:
    ctx.recorder.set(peers={p.name: dict(title=p.title, dtypes_tried=list(p.dtypes))
                            for pair in DIRECTIONS.values() for p in pair},
                     cpu_before=cpu_info())
    if jax.default_backend() != "cpu":
        ctx.recorder.set(skipped=f"measures the CPU backend, not {jax.default_backend()}: run with "
                                 "JAX_PLATFORMS=cpu", plots=[])
        print(ctx.recorder.payload["skipped"], flush=True)
        return
    grid = SMOKE if ctx.smoke else [(h, b, d) for d in DTYPES for b in BATCH
                                    for h in (QUICK_HIDDEN if ctx.quick else HIDDEN)]
    for hidden, batch, dtype in grid:
        if ctx.over_budget():
            ctx.recorder.add(dict(hidden=hidden, density=DENSITY, batch=batch, dtype=dtype,
                                  not_run="time budget"))
            continue
        ctx.recorder.add(measure_case(ctx, hidden, batch, dtype))
    for hidden, batch, dtype in ([] if ctx.smoke else SHORT_GRID):
        if ctx.over_budget():
            ctx.recorder.add(dict(kind="short", hidden=hidden, batch=batch, dtype=dtype,
                                  not_run="time budget"))
            continue
        ctx.recorder.add(measure_short(ctx, hidden, batch, dtype))
    rows = ctx.recorder.rows
    ctx.recorder.set(cpu_after=cpu_info(), crossovers=crossovers(rows), targets=targets(rows),
                     plots=[str(plots.per_step_bars(rows, ctx.out_dir / "cpu.png",
                                                    "µs per step on the CPU (log scale)"))])
    if not ctx.smoke:
        dated = RESULTS / f"cpu_{time.strftime('%Y-%m-%d')}.json"
        shutil.copyfile(ctx.recorder.path, dated)
        print(f"copied to {dated}", flush=True)


def _ms(name: str):
    return lambda row: (row["peers"].get(name) or {}).get("call_ms")


def columns(peers):
    return [Column("H", lambda r: r["hidden"], 5), Column("B", lambda r: r["batch"], 3),
            Column("dtype", lambda r: SHORT[r["dtype"]], 5), Column("T", lambda r: r.get("T"), 4),
            *[Column(f"{p.name} ms", _ms(p.name), 10) for p in (FWD, DENSE_FWD)],
            Column("x fwd", lambda r: r.get("speedup_forward"), 6),
            *[Column(f"{p.name} ms", _ms(p.name), 13) for p in (DENSE_PATH_FWD, AUTO_FWD)],
            Column("auto/best", lambda r: r.get("auto_over_best"), 9),
            *[Column(f"{p.name} ms", _ms(p.name), 14) for p in (GRAD, DENSE_GRAD)],
            Column("x grad", lambda r: r.get("speedup_grad"), 6)]
