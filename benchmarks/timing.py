"""How every benchmark here measures time: clocks, the median of N calls, and the per-step slope.

* A *clock* times a group of calls ``fn(*args)``, one per argument set of the group, issued back to
  back with one wait for the device at the end, and returns seconds per call.
  :func:`wall_clock` is for JAX (host clock; JAX dispatches asynchronously, so the device runs the
  group's calls without waiting for the host between them); ``peers_torch.event_clock`` uses CUDA
  events for PyTorch.
* :func:`median_sample` warms up on the first argument sets, then takes the median of ``reps``
  timed groups, with inputs rotated over the given sets so that the L2 cache does not flatter a
  call by still holding the previous call's inputs. A group holds as many calls as make it last
  ``min_sample_s`` (at most ``max_calls``): the host's jitter around one wait (0.1-0.6 ms on the
  GPU machine, RESULTS.md "The wall-clock slope is not fit for these sizes") is then shared by
  the group's calls instead of landing on one short call.
* :func:`per_step` turns two sequence lengths into a per-step time and a fixed per-call cost:
  ``slope = (t(T2) - t(T1)) / (T2 - T1)`` removes what every call pays once (dispatch, launch,
  workspace reset, layout transposes of the inputs are linear in T but tiny).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import jax


def wall_clock(fn, group: Sequence[tuple]) -> float:
    """Seconds a call of ``fn``: the group's calls issued back to back, one wait for all."""
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for args in group])
    return (time.perf_counter() - start) / len(group)


#: the default group: back-to-back calls for at least 4 ms, at most 32 of them
MIN_SAMPLE_S = 0.004
MAX_CALLS = 32


def calls_per_sample(call_s: float, min_sample_s: float, max_calls: int) -> int:
    """How many calls of ``call_s`` seconds a timed group holds to last ``min_sample_s``."""
    if min_sample_s <= 0 or call_s <= 0:
        return 1
    return max(1, min(max_calls, math.ceil(min_sample_s / call_s)))


@dataclasses.dataclass(frozen=True)
class Sample:
    seconds: float  # the median over the timed groups of seconds per call
    calls: int      # calls per timed group


def median_sample(fn, arg_sets: Sequence[tuple], reps: int, *, clock=wall_clock, warmup: int = 2,
                  max_seconds: float | None = None, min_reps: int = 3,
                  min_sample_s: float = MIN_SAMPLE_S, max_calls: int = MAX_CALLS) -> Sample:
    """Median seconds per call of ``fn`` over ``reps`` timed groups (fewer, but at least
    ``min_reps``, when the groups together exceed ``max_seconds``: slow peers get fewer
    repetitions, not a longer run). The fastest warm-up call sizes the groups."""
    arg_sets = list(arg_sets)
    warm = min(clock(fn, [args]) for args in arg_sets[:max(warmup, 1)])
    calls = calls_per_sample(warm, min_sample_s, max_calls)
    times: list[float] = []
    for i in range(reps):
        group = [arg_sets[(i * calls + j) % len(arg_sets)] for j in range(calls)]
        times.append(clock(fn, group))
        if max_seconds is not None and len(times) >= min_reps and sum(times) * calls > max_seconds:
            break
    return Sample(statistics.median(times), calls)


def median_time(fn, arg_sets: Sequence[tuple], reps: int, **kwargs) -> float:
    """:func:`median_sample`'s seconds per call."""
    return median_sample(fn, arg_sets, reps, **kwargs).seconds


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
    #: a timed group of back-to-back calls lasts at least this long (0: one call a group) ...
    min_sample_s: float = MIN_SAMPLE_S
    #: ... with at most this many calls
    max_calls: int = MAX_CALLS
