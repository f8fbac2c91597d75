"""How every benchmark here measures time: clocks, the median of N calls, and the per-step slope.

* A *clock* times one call ``fn(*args)`` in seconds, including waiting for the device to finish.
  :func:`wall_clock` is for JAX (host clock around a blocking call); ``peers_torch.event_clock``
  uses CUDA events for PyTorch.
* :func:`median_time` warms up on the first argument sets, then takes the median of ``reps`` timed
  calls with inputs rotated over the given sets, so that the L2 cache does not flatter a call by
  still holding the previous call's inputs.
* :func:`per_step` turns two sequence lengths into a per-step time and a fixed per-call cost:
  ``slope = (t(T2) - t(T1)) / (T2 - T1)`` removes what every call pays once (dispatch, launch,
  workspace reset, layout transposes of the inputs are linear in T but tiny).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import jax


def wall_clock(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def median_time(fn, arg_sets: Sequence[tuple], reps: int, *, clock=wall_clock, warmup: int = 2,
                max_seconds: float | None = None, min_reps: int = 3) -> float:
    """Median seconds of ``fn`` over ``reps`` calls (fewer, but at least ``min_reps``, when the
    calls together exceed ``max_seconds``: slow peers get fewer repetitions, not a longer run)."""
    for args in list(arg_sets)[:max(warmup, 1)]:
        clock(fn, args)
    times: list[float] = []
    for i in range(reps):
        times.append(clock(fn, arg_sets[i % len(arg_sets)]))
        if max_seconds is not None and len(times) >= min_reps and sum(times) > max_seconds:
            break
    return statistics.median(times)


def per_step(time_at: Callable[[int], float], t1: int, t2: int) -> dict:
    """``time_at(T)``: seconds of one call on a sequence of length T. Returns microseconds per step
    (the slope), the fixed microseconds per call (the intercept) and the call time at T2 in ms."""
    times = {T: time_at(T) for T in (t1, t2)}
    slope = (times[t2] - times[t1]) / (t2 - t1)
    return dict(us_per_step=slope * 1e6, fixed_us=(times[t1] - slope * t1) * 1e6,
                call_ms=times[t2] * 1e3)


@dataclasses.dataclass(frozen=True)
class Timing:
    """The knobs of one measurement: two sequence lengths, repetitions, rotated input sets."""

    t1: int = 64
    t2: int = 256
    reps: int = 20
    rotate: int = 4
    warmup: int = 2
    #: seconds of timed calls per sequence length after which a slow peer stops repeating
    max_seconds: float = 3.0
